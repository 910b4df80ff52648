//! `btm`: grow language models the Branch-Train-Merge way.
//!
//! One binary with subcommands; each subcommand lives in `commands/` and is a thin layer
//! over the library crates (`btm-model`, and the trainer, merger and kernels as they land).

mod commands;
mod engine;
mod executor;
mod inputs;
mod pipeline;
mod plan;
mod report;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "btm", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("BTM_COMMIT"), ")"), about = "Branch, train and merge language models into a Mixture of Experts")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Carry out a pipeline: branch, train, merge, continue, evaluate, report. Resumable.
    Run(commands::run::RunArgs),
    /// Where a run stands: each job's state, step, loss and ETA.
    Status(commands::run::RunDirArgs),
    /// (Re)write a run's report.md and report.html.
    Report(commands::run::RunDirArgs),
    /// Check a pipeline file without running it.
    Validate(commands::pipeline::ValidateArgs),
    /// Print the pipeline files' JSON Schema (for editors).
    Schema,
    /// Perplexity of a model on a JSONL file (one `{"text": ...}` per line).
    Eval(commands::eval::EvalArgs),
    /// Show a checkpoint's architecture, shape and parameter counts.
    Inspect(commands::inspect::InspectArgs),
    /// Rewrite a checkpoint (to another dtype or shard size) in btm's output layout.
    Convert(commands::convert::ConvertArgs),
    /// Tokenizer utilities.
    #[command(subcommand)]
    Tokenizer(commands::tokenizer::TokenizerCommand),
    /// Merge trained dense experts into a Mixture of Experts.
    Merge(commands::merge::MergeArgs),
    /// Turn a dense model into an MoE that computes the same function (sparse upcycling).
    Upcycle(commands::upcycle::UpcycleArgs),
    /// Append a dense model's FFN to an existing MoE as a new expert.
    AddExpert(commands::add_expert::AddExpertArgs),
    /// Drop one expert from an MoE (the inverse of add-expert, bit for bit).
    RemoveExpert(commands::remove_expert::RemoveExpertArgs),
    /// Average dense experts' parameters, weighted by their domain prior on a target domain.
    Average(commands::average::AverageArgs),
    /// Discover domains in unlabelled text (c-BTM: tf-idf, SVD, balanced k-means) and split it by cluster.
    Cluster(commands::cluster::ClusterArgs),
    /// Train a model from a checkpoint (or from scratch) as a job file says; resumable.
    Train(commands::train::TrainArgs),
    /// Check a device (CUDA) against the CPU: logits, the fused MoE layer, a training run.
    DeviceCheck(commands::device_check::DeviceCheckArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
    /// Print a shell completion script: `btm completions bash > /etc/bash_completion.d/btm`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() {
    // Die quietly on a closed pipe (`btm status RUN | head`) like other Unix tools, with the
    // status SIGPIPE would give. Not by restoring SIGPIPE's default disposition: then a write
    // to a socket the peer closed (an object store restarting mid-upload) kills the process
    // instead of being an error the store client retries.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(128 + libc::SIGPIPE);
        }
        default_hook(info);
    }));
    let cli = Cli::parse();
    // A mistyped instruction-set cap would otherwise be ignored by the kernels.
    if let Err(err) = btm_kernels::isa::check_env() {
        eprintln!("error: {err}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::Run(args) => commands::run::run(args),
        Command::Status(args) => commands::run::status(args),
        Command::Report(args) => commands::run::report(args),
        Command::Validate(args) => commands::pipeline::validate(args),
        Command::Schema => commands::pipeline::schema(),
        Command::Eval(args) => commands::eval::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Convert(args) => commands::convert::run(args),
        Command::Tokenizer(cmd) => commands::tokenizer::run(cmd),
        Command::Merge(args) => commands::merge::run(args),
        Command::Upcycle(args) => commands::upcycle::run(args),
        Command::AddExpert(args) => commands::add_expert::run(args),
        Command::Average(args) => commands::average::run(args),
        Command::Cluster(args) => commands::cluster::run(args),
        Command::RemoveExpert(args) => commands::remove_expert::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::DeviceCheck(args) => commands::device_check::run(args),
        Command::Bench(cmd) => commands::bench::run(cmd),
        Command::Completions { shell } => {
            // Into a buffer, then printed: a closed pipe ends the process quietly (see above).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "btm", &mut script);
            print!("{}", String::from_utf8_lossy(&script));
            Ok(())
        }
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand, flag and positional argument says what it is in `--help`.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if a.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {}", a.get_long().map_or(id.to_string(), |l| format!("--{l}"))));
                }
            }
            for s in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                let sub = format!("{path} {}", s.get_name());
                if s.get_about().is_none() {
                    missing.push(sub.clone());
                }
                walk(s, &sub, missing);
            }
        }
        let mut missing = vec![];
        walk(&Cli::command(), "btm", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }
}
