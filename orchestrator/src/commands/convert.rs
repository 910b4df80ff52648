//! `btm convert`: rewrite a checkpoint through btm's writer (dtype, shard size, layout).

use anyhow::Result;
use btm_model::checkpoint::{rewrite, WriteOptions};
use btm_model::{Checkpoint, Lineage};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ConvertArgs {
    /// Model directory or object-store URL.
    #[arg(long)]
    model: String,
    #[arg(long)]
    out: PathBuf,
    /// Dtype on disk: float32, bfloat16 or float16 (default: as read).
    #[arg(long)]
    dtype: Option<String>,
    /// Largest shard in MiB.
    #[arg(long, default_value_t = 2048)]
    shard_mb: u64,
    /// Replace --out if it exists.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let dir = btm_model::storage::local_dir(&args.model)?;
    let src = Checkpoint::open(&dir)?;
    let opts = WriteOptions {
        dtype: match &args.dtype {
            Some(d) => super::dtype(d)?,
            None => src.dtype(),
        },
        max_shard_bytes: args.shard_mb << 20,
        overwrite: args.overwrite,
    };
    let mut lineage = src.lineage()?.unwrap_or_else(|| Lineage::new("import"));
    lineage.parents =
        vec![btm_model::lineage::Parent { uri: args.model.clone(), manifest_sha256: Some(src.id()?), domain: lineage.domain.clone() }];
    rewrite(&src, &args.out, &opts, Some(lineage))?;
    println!("wrote {} as {} ({:?})", args.out.display(), src.config.output_architecture().class_name(), opts.dtype);
    Ok(())
}
