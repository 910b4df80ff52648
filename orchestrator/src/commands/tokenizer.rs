//! `btm tokenizer train`: a byte-level BPE tokenizer from text sources (JSONL or parquet, local
//! or in an object store; see `btm_trainer::sources`).

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (`<s>` = 0 is prepended, `</s>` = 1 ends documents).
    Train {
        /// Text sources: JSONL (`.jsonl`, `.gz`, `.zst`), parquet (a file, a folder of shards or
        /// a `*` glob), paths or URLs.
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<PathBuf>,
        /// The JSON field or parquet column holding the text.
        #[arg(long, default_value = btm_trainer::sources::DEFAULT_TEXT_KEY)]
        text_key: String,
        /// Tokens in the vocabulary, special tokens included.
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Use at most this many documents per file.
        #[arg(long)]
        max_docs: Option<usize>,
        /// Where to write tokenizer.json.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Train { data, text_key, vocab_size, max_docs, out } => {
            let mut texts = Vec::new();
            for f in &data {
                let location = f.to_string_lossy();
                let format = btm_trainer::sources::Format::detect(&location);
                let docs = btm_trainer::sources::Documents::open(&location, format, &text_key)?;
                for t in docs.take(max_docs.unwrap_or(usize::MAX)) {
                    texts.push(t?);
                }
            }
            anyhow::ensure!(!texts.is_empty(), "no documents in {data:?}");
            let tok = btm_model::tokenizer::train_bpe(texts.iter(), vocab_size)?;
            // An object-store --out is written locally, then uploaded.
            let output = btm_model::folder::Output::new(&out.to_string_lossy())?;
            btm_model::tokenizer::save(&tok, output.path())?;
            output.publish()?;
            println!(
                "trained a byte-level BPE tokenizer of {} tokens on {} documents → {}",
                tok.get_vocab_size(true),
                texts.len(),
                out.display()
            );
            Ok(())
        }
    }
}
