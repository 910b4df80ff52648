//! Tokenizers through the `tokenizers` crate: load a `tokenizer.json`, or train a byte-level
//! BPE tokenizer (GPT-2 style) from JSONL text for seeds trained from scratch.

use crate::error::{read_capped, Error, Result, MAX_TOKENIZER_BYTES};
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

/// Load a `tokenizer.json` ([`Error::MissingFile`] if it does not exist; [`Error::TooLarge`]
/// beyond [`MAX_TOKENIZER_BYTES`], checked before it is read).
pub fn load(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::MissingFile(path.to_path_buf()));
    }
    from_bytes(path, &read_capped(path, MAX_TOKENIZER_BYTES, "tokenizer file")?)
}

/// Parse the bytes of a `tokenizer.json` read from `path` (which errors name).
///
/// The tokenizers crate (0.23) panics instead of failing on some malformed files: a JSON syntax
/// error inside `decoder` reaches an `.expect`, as does a corrupt precompiled normalizer. So
/// the JSON's syntax is checked first (a plain error, no panic), and a panic the crate still
/// raises is caught and named as an error (its message is printed by the panic hook too).
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Tokenizer> {
    let fail = |e: &dyn std::fmt::Display| Error::Tokenizer(format!("{}: {e}", path.display()));
    // As `Tokenizer::from_file` does: the whole file must be UTF-8, not only its strings.
    let text = std::str::from_utf8(bytes).map_err(|e| fail(&e))?;
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| fail(&e))?;
    match std::panic::catch_unwind(|| text.parse::<Tokenizer>()) {
        Ok(parsed) => parsed.map_err(|e| fail(&e)),
        Err(panic) => Err(fail(&format!("the tokenizers crate panicked reading it: {}", panic_message(&*panic)))),
    }
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
///
/// A malformed `tokenizer.json` can load and then make the tokenizers crate panic while encoding
/// (found by fuzzing: a template naming a special token it does not define, a BPE merge longer
/// than its buffer); such a panic is caught and named as an error.
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    match std::panic::catch_unwind(|| tok.encode(text, true)) {
        Ok(encoded) => Ok(encoded.map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec()),
        Err(panic) => Err(Error::Tokenizer(format!("the tokenizers crate panicked encoding a text: {}", panic_message(&*panic)))),
    }
}

/// The message of a caught panic, when it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_default()
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

    /// A tokenizer.json past the bound is refused before it is read (a sparse file: no memory,
    /// no disk); garbage is a named error.
    #[test]
    fn oversized_or_garbage_tokenizers_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::File::create(&p).unwrap().set_len(MAX_TOKENIZER_BYTES + 1).unwrap();
        let err = load(&p).unwrap_err().to_string();
        assert!(err.ends_with("tokenizer.json: tokenizer file of 268435457 bytes exceeds the limit of 256 MiB (268435456 bytes)"), "{err}");
        std::fs::write(&p, b"\xff\xfe garbage").unwrap();
        assert!(load(&p).unwrap_err().to_string().starts_with("tokenizer: "));
        std::fs::write(&p, b"{\"model\": 3}").unwrap();
        assert!(load(&p).unwrap_err().to_string().starts_with("tokenizer: "));
        // A syntax error inside `decoder`, on which tokenizers 0.23 panics (found by fuzzing).
        std::fs::write(&p, br#"{"model": {"type": "BPE", "vocab": {}, "merges": []}, "decoder": {"type" "x"}}"#).unwrap();
        let err = load(&p).unwrap_err().to_string();
        assert!(err.starts_with("tokenizer: ") && err.ends_with("expected `:` at line 1 column 74"), "{err}");
    }

    /// A tokenizer that loads but whose template names a special token it does not define: the
    /// tokenizers crate panics encoding with it (found by fuzzing); btm names the error.
    #[test]
    fn a_panic_while_encoding_is_a_named_error() {
        let mut tok = train_bpe(["a b c a b c"; 10].iter(), 270).unwrap();
        let post = TemplateProcessing::builder().try_single(format!("{BOS} $A")).unwrap().special_tokens(vec![(BOS, 0)]).build().unwrap();
        tok.with_post_processor(Some(post));
        let json = tok.to_string(false).unwrap().replace("\"special_tokens\":{\"<s>\"", "\"special_tokens\":{\"<t>\"");
        let tok: Tokenizer = json.parse().unwrap();
        let err = encode(&tok, "a b").unwrap_err().to_string();
        assert_eq!(err, "tokenizer: the tokenizers crate panicked encoding a text: no entry found for key");
    }

    /// A panic inside the tokenizers crate on a syntactically valid file is caught and named.
    #[test]
    fn a_panic_in_the_tokenizers_crate_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        // tokenizers 0.23 `.expect`s a Precompiled normalizer to deserialize; this one has no charsmap.
        let tok = r#"{"model": {"type": "BPE", "vocab": {}, "merges": []}, "normalizer": {"type": "Precompiled"}}"#;
        std::fs::write(&p, tok).unwrap();
        let err = load(&p).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json: the tokenizers crate panicked reading it: Precompiled"), "{err}");
    }
}
