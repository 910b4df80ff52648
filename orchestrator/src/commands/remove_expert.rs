//! `btm remove-expert`: drop one expert (and its router rows) from an MoE; the inverse of
//! `btm add-expert`, bit for bit.

use anyhow::Result;
use btm_merger::remove_expert::{remove_expert, RemoveExpertOptions};
use btm_merger::OutputOptions;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct RemoveExpertArgs {
    /// The MoE (directory or URL).
    #[arg(long)]
    moe: String,
    /// 0-based index of the expert to remove (`btm inspect` lists them; an added expert is the last).
    #[arg(long)]
    expert: usize,
    /// Output folder (written atomically, manifest last).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing output folder.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: RemoveExpertArgs) -> Result<()> {
    let moe = btm_model::storage::local_dir(&args.moe)?;
    let output = OutputOptions { overwrite: args.overwrite, ..OutputOptions::default() };
    let report = remove_expert(&RemoveExpertOptions { moe, expert: args.expert, out: args.out.clone(), output })?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    println!("removed expert {} → {}", args.expert, args.out.display());
    Ok(())
}
