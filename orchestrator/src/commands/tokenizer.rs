//! `btm tokenizer train`: a byte-level BPE tokenizer from text sources (JSONL or parquet, local
//! or in an object store; see `btm_trainer::sources`).

use anyhow::Result;
use btm_trainer::jobs::TokenizerSpec;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (`<s>` = 0 is prepended, `</s>` = 1 ends documents).
    Train(TrainArgs),
}

/// `btm tokenizer train`: its flags, or its job file.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// The job file (JSON or YAML, the keys of the flags below), as a pipeline's plan writes it;
    /// instead of the flags.
    #[arg(long, exclusive = true)]
    spec: Option<PathBuf>,
    #[command(flatten)]
    flags: Option<TokenizerSpec>,
}

impl TrainArgs {
    /// The job's spec: its file, or the flags.
    pub fn into_spec(self) -> Result<TokenizerSpec> {
        super::spec_or_flags(self.spec.as_deref(), self.flags)
    }
}

pub fn run(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Train(args) => {
            let TokenizerSpec { data, text_key, vocab_size, max_docs, out } = args.into_spec()?;
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
