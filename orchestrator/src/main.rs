//! `btm`: grow language models the Branch-Train-Merge way.
//!
//! One binary with subcommands; each subcommand lives in `commands/` and is a thin layer
//! over the library crates (`btm-model`, and the trainer, merger and kernels as they land).

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "btm", version, about = "Branch, train and merge language models into a Mixture of Experts")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Perplexity of a model on a JSONL file (one `{"text": ...}` per line).
    Eval(commands::eval::EvalArgs),
    /// Show a checkpoint's architecture, shape and parameter counts.
    Inspect(commands::inspect::InspectArgs),
    /// Rewrite a checkpoint (to another dtype or shard size) in btm's output layout.
    Convert(commands::convert::ConvertArgs),
    /// Tokenizer utilities.
    #[command(subcommand)]
    Tokenizer(commands::tokenizer::TokenizerCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(args) => commands::eval::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Convert(args) => commands::convert::run(args),
        Command::Tokenizer(cmd) => commands::tokenizer::run(cmd),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
