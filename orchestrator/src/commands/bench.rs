//! `btm bench train --preset tiny|small [--moe] --threads N [--steps N] [--json]`: training
//! throughput (forward + backward + AdamW on random tokens) and peak memory.

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Tokens per second of training steps, and peak resident memory.
    Train(BenchTrainArgs),
}

#[derive(Args)]
pub struct BenchTrainArgs {
    /// Model shape: tiny (hidden 256, 4 layers, seq 256) or small (hidden 512, 8 layers, seq 512).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Every FFN becomes 4 experts, top-2.
    #[arg(long)]
    moe: bool,
    /// CPU threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Print one JSON line {"tokens_per_s", "peak_rss_mb", ...}.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train(args) => {
            anyhow::ensure!(args.threads > 0 && args.steps > 0, "--threads and --steps must be positive");
            let r = btm_trainer::bench::run(&args.preset, args.moe, args.threads, args.steps)?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "train {}{}: {:.0} tokens/s ({:.3} s/step, {} threads, {} parameters), peak RSS {:.0} MiB",
                    r.preset,
                    if r.moe { " moe" } else { "" },
                    r.tokens_per_s,
                    r.step_s,
                    r.threads,
                    r.parameters,
                    r.peak_rss_mb
                );
            }
            Ok(())
        }
    }
}
