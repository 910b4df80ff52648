//! `btm train --job JOB.yaml`: run a training job (see `btm_trainer::spec` for the file).
//!
//! Exit status: 0 when the job is done (rerunning a finished job is a no-op), 1 on an error,
//! 128 + signal (130 for SIGINT, 143 for SIGTERM) when stopped by a signal after writing a
//! checkpoint; rerunning the same job then resumes from it.

use anyhow::Result;
use btm_trainer::{JobSpec, Options, Outcome};
use clap::Args;

#[derive(Args)]
pub struct TrainArgs {
    /// The job spec (YAML; a path or an object-store URL); relative paths in it are relative
    /// to its directory.
    #[arg(long)]
    job: String,
    /// No progress lines on stderr (metrics.jsonl is written regardless).
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let spec = JobSpec::load(&btm_model::folder::fetch_file(&args.job)?)?;
    let options = Options { stop: btm_trainer::signals::install()?, quiet: args.quiet, on_checkpoint: None };
    match btm_trainer::run(&spec, options)? {
        Outcome::Finished { model_dir, .. } => {
            println!("{}", model_dir.display());
            Ok(())
        }
        Outcome::Interrupted { step, signal, checkpoint } => {
            eprintln!("stopped by signal {signal} at step {step}; checkpoint {}; rerun to resume", checkpoint.display());
            std::process::exit(128 + signal);
        }
    }
}
