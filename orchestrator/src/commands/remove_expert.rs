//! `btm remove-expert`: drop one expert (and its router rows) from an MoE; the inverse of
//! `btm add-expert`, bit for bit.

use anyhow::Result;
use btm_merger::remove_expert::remove_expert;
use btm_merger::RemoveExpertSpec;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct RemoveExpertArgs {
    /// The removal's job file (JSON or YAML, the keys of the flags below); instead of the flags.
    #[arg(long, exclusive = true)]
    spec: Option<PathBuf>,
    #[command(flatten)]
    flags: Option<RemoveExpertSpec>,
}

impl RemoveExpertArgs {
    /// The job's spec: its file, or the flags.
    pub fn into_spec(self) -> Result<RemoveExpertSpec> {
        super::spec_or_flags(self.spec.as_deref(), self.flags)
    }
}

pub fn run(args: RemoveExpertArgs) -> Result<()> {
    let spec = args.into_spec()?;
    let report = remove_expert(&spec.options(super::local_dir)?)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    println!("removed expert {} → {}", spec.expert, spec.out);
    Ok(())
}
