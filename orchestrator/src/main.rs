//! `btm`: grow language models the Branch-Train-Merge way.
//!
//! One binary with subcommands; each subcommand lives in the `btm` library's `commands/` and is
//! a thin layer over the library crates (`btm-model`, and the trainer, merger and kernels).

use btm::commands;
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
    /// Print the JSON Schema of pipeline files, or of one kind of job file (for editors).
    Schema {
        /// Which file: `pipeline`, or a job kind (`train`, `merge`, `eval`, ...).
        #[arg(value_enum, default_value_t = commands::pipeline::SchemaKind::default())]
        kind: commands::pipeline::SchemaKind,
    },
    /// Perplexity of a model on a JSONL file (one `{"text": ...}` per line).
    Eval(commands::eval::EvalArgs),
    /// Show a checkpoint's architecture, shape and parameter counts.
    Inspect(commands::inspect::InspectArgs),
    /// Rewrite a checkpoint (to another dtype or shard size) in btm's output layout.
    Convert(commands::convert::ConvertArgs),
    /// Write a checkpoint for another runtime: `btm export gguf` (llama.cpp).
    #[command(subcommand)]
    Export(commands::export::ExportCommand),
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
        Command::Schema { kind } => commands::pipeline::schema(kind),
        Command::Eval(args) => commands::eval::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Convert(args) => commands::convert::run(args),
        Command::Export(cmd) => commands::export::run(cmd),
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

    /// Flags → spec → file → `--spec FILE` → spec gives the same job, for every job kind.
    #[test]
    fn every_job_kind_round_trips_from_flags_through_its_spec_file() {
        let dir = tempfile::tempdir().unwrap();
        fn value<T: serde::Serialize>(spec: anyhow::Result<T>) -> serde_json::Value {
            serde_json::to_value(spec.unwrap()).unwrap()
        }
        fn spec_of(argv: &[&str]) -> serde_json::Value {
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            match cli.command {
                Command::Merge(a) => value(a.into_spec()),
                Command::Upcycle(a) => value(a.into_spec()),
                Command::AddExpert(a) => value(a.into_spec()),
                Command::RemoveExpert(a) => value(a.into_spec()),
                Command::Eval(a) => value(a.into_spec()),
                Command::Average(a) => value(a.into_spec()),
                Command::Tokenizer(commands::tokenizer::TokenizerCommand::Train(a)) => value(a.into_spec()),
                Command::Cluster(a) => value(a.into_spec()),
                _ => panic!("{argv:?}: not a job kind"),
            }
        }
        let jobs: &[&[&str]] = &[
            &[
                "merge",
                "--experts",
                "a",
                "b",
                "--out",
                "o",
                "--top-k",
                "1",
                "--router-init",
                "fit",
                "--fit-steps",
                "7",
                "--calib",
                "a=x.jsonl",
                "b=y.jsonl",
                "--non-expert",
                "from:/s",
                "--shard-mb",
                "9",
                "--dtype",
                "bf16",
            ],
            &[
                "upcycle",
                "--model",
                "d",
                "--experts",
                "8",
                "--top-k",
                "2",
                "--granularity",
                "2",
                "--scaling",
                "megatron",
                "--out",
                "o",
                "--overwrite",
            ],
            &[
                "add-expert",
                "--moe",
                "m",
                "--expert",
                "e",
                "--out",
                "o",
                "--calib",
                "c.jsonl",
                "--name",
                "law",
                "--no-guard",
                "--router-init",
                "centroid",
                "--non-expert",
                "average",
            ],
            &["remove-expert", "--moe", "m", "--expert", "2", "--out", "o"],
            &[
                "eval",
                "--ensemble",
                "a",
                "b",
                "--prior-from",
                "v.jsonl",
                "--top-k",
                "1",
                "--data",
                "t.jsonl",
                "--max-tokens",
                "100",
                "--json",
                "--out",
                "r.json",
            ],
            &["average", "--experts", "a", "b", "--weights", "0.3", "0.7", "--out", "o"],
            &["tokenizer", "train", "--data", "a.jsonl", "b.parquet", "--vocab-size", "512", "--out", "t.json"],
            &["cluster", "--data", "u.jsonl", "--k", "8", "--out", "c", "--plain", "--split-fractions", "0.8,0.1,0.1", "--min-df", "1"],
        ];
        for (i, flags) in jobs.iter().enumerate() {
            let kind: Vec<&str> = flags.iter().take_while(|a| !a.starts_with("--")).copied().collect();
            let from_flags = spec_of(&[&["btm"], *flags].concat());
            let file = dir.path().join(format!("{i}.json"));
            std::fs::write(&file, serde_json::to_string_pretty(&from_flags).unwrap()).unwrap();
            let from_file = spec_of(&[&["btm"], &kind[..], &["--spec", file.to_str().unwrap()]].concat());
            assert_eq!(from_flags, from_file, "{kind:?}");
        }
        // A mistyped key in a spec file is named, with where it is.
        let file = dir.path().join("bad.yaml");
        std::fs::write(&file, "moe: m\nexpert: 1\nout: o\noverwrit: true\n").unwrap();
        let Command::RemoveExpert(a) = Cli::try_parse_from(["btm", "remove-expert", "--spec", file.to_str().unwrap()]).unwrap().command
        else {
            unreachable!()
        };
        let err = a.into_spec().unwrap_err().to_string();
        assert!(err.contains("unknown field `overwrit`") && err.contains("line 4"), "{err}");
    }
}
