//! `btm tokenizer train`: a byte-level BPE tokenizer from JSONL text.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (`<s>` = 0 is prepended, `</s>` = 1 ends documents).
    Train {
        /// JSONL files with a `text` field.
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<PathBuf>,
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
        TokenizerCommand::Train { data, vocab_size, max_docs, out } => {
            let mut texts = Vec::new();
            for f in &data {
                let f = btm_model::folder::fetch_file(&f.to_string_lossy())?;
                texts.extend(btm_model::jsonl::read_texts(&f, max_docs)?);
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
