//! Tokenizers through the `tokenizers` crate: load a `tokenizer.json`, or train a byte-level
//! BPE tokenizer (GPT-2 style) from JSONL text for seeds trained from scratch.

use crate::error::{Error, Result};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;
/// The tokenizer type every btm crate uses (the `tokenizers` crate's).
pub use tokenizers::Tokenizer;

/// Beginning-of-sequence token of tokenizers btm trains.
pub const BOS: &str = "<s>";
/// End-of-sequence token of tokenizers btm trains (appended between packed documents).
pub const EOS: &str = "</s>";

/// Load a `tokenizer.json` ([`Error::MissingFile`] if it does not exist).
pub fn load(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::MissingFile(path.to_path_buf()));
    }
    Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

/// Number of embedding rows the tokenizer needs: its largest token id + 1.
pub fn required_vocab(tok: &Tokenizer) -> usize {
    tok.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1)
}

/// A tokenizer whose ids do not all fit the embedding is an error, not a silent crash later.
pub fn check_fits(tok: &Tokenizer, vocab_size: usize) -> Result<()> {
    let need = required_vocab(tok);
    if need > vocab_size {
        return Err(Error::TokenizerVocab { tokenizer: need, embedding: vocab_size });
    }
    Ok(())
}

/// Train a byte-level BPE tokenizer with `vocab_size` entries (the 256 byte symbols and the
/// special tokens `<s>` = 0 and `</s>` = 1 included). Its post-processor prepends `<s>`.
pub fn train_bpe<I, S>(texts: I, vocab_size: usize) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    if vocab_size < 258 + 1 {
        return Err(Error::Tokenizer(format!("vocab size {vocab_size} is too small for byte-level BPE (needs at least 259)")));
    }
    let specials = vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)];
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let mut trainer = TrainerWrapper::from(trainer);
    tok.train(&mut trainer, texts).map_err(|e| Error::Tokenizer(format!("training BPE: {e}")))?;
    let bos_id = tok.token_to_id(BOS).expect("special token added");
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .and_then(|b| b.try_pair(format!("{BOS} $A {BOS} $B")))
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .special_tokens(vec![(BOS, bos_id)])
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    tok.with_post_processor(Some(post));
    Ok(tok)
}

/// Write `tok` as compact `tokenizer.json` to `path` (in place, not staged).
pub fn save(tok: &Tokenizer, path: &Path) -> Result<()> {
    tok.save(path, false).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

/// Token ids of one document as `tokenizer.json` says (its post-processor decides special tokens).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_bpe_round_trips_text_and_prepends_bos() {
        let texts = ["the quick brown fox jumps over the lazy dog"; 50];
        let tok = train_bpe(texts.iter(), 300).unwrap();
        assert_eq!(tok.token_to_id(BOS), Some(0));
        assert_eq!(tok.token_to_id(EOS), Some(1));
        let ids = encode(&tok, "the lazy fox").unwrap();
        assert_eq!(ids[0], 0);
        assert!(ids.len() < 12, "merges were learned: {ids:?}");
        let text = tok.decode(&ids, true).unwrap();
        assert_eq!(text, "the lazy fox");
        assert!(required_vocab(&tok) <= 300);
        let err = check_fits(&tok, 10).unwrap_err().to_string();
        assert!(err.contains("but the model's embedding has only 10 rows"), "{err}");
    }
}
