//! `btm convert`: rewrite a checkpoint through btm's writer (dtype, shard size, layout).

use anyhow::Result;
use btm_model::checkpoint::rewrite;
use btm_model::{Checkpoint, Lineage};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ConvertArgs {
    /// Model directory or object-store URL.
    #[arg(long)]
    model: String,
    /// The rewritten checkpoint's folder (or object-store URL).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    output: btm_merger::OutputSpec,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let dir = btm_model::storage::local_dir(&args.model)?;
    let src = Checkpoint::open(&dir)?;
    let opts = args.output.options().write_options(src.dtype());
    let mut lineage = src.lineage()?.unwrap_or_else(|| Lineage::new("import"));
    lineage.parents =
        vec![btm_model::lineage::Parent { uri: args.model.clone(), manifest_sha256: Some(src.id()?), domain: lineage.domain.clone() }];
    rewrite(&src, &args.out, &opts, Some(lineage))?;
    println!("wrote {} as {} ({:?})", args.out.display(), src.config.output_architecture().class_name(), opts.dtype);
    Ok(())
}
