//! `btm upcycle`: turn a dense model into an MoE that computes the same function (He et al. 2024).

use anyhow::Result;
use btm_merger::upcycle::{upcycle, UpcycleOptions};
use btm_merger::{OutputOptions, ScalingMode};
use btm_model::Routing;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct UpcycleArgs {
    /// The dense model (directory or URL).
    #[arg(long)]
    model: String,
    /// Number of experts E (a multiple of the granularity).
    #[arg(long)]
    experts: usize,
    /// Experts per token k (a multiple of the granularity).
    #[arg(long)]
    top_k: usize,
    /// G = dense FFN width / expert width.
    #[arg(long, default_value_t = 1)]
    granularity: usize,
    #[arg(long, default_value = "topk_then_softmax")]
    routing: Routing,
    /// exact (√a on up and down) or megatron (a^(1/3) on gate, up and down).
    #[arg(long, default_value = "exact")]
    scaling: ScalingMode,
    /// Std of the router's random rows (0: zero router).
    #[arg(long, default_value_t = 0.02)]
    router_std: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    /// Dtype on disk (default: the model's).
    #[arg(long)]
    dtype: Option<String>,
    /// Largest shard in MiB.
    #[arg(long, default_value_t = 2048)]
    shard_mb: u64,
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: UpcycleArgs) -> Result<()> {
    let model = btm_model::storage::local_dir(&args.model)?;
    // An object-store --out is written locally, then uploaded manifest last.
    let output = btm_model::folder::Output::new(&args.out.to_string_lossy())?;
    let mut o = UpcycleOptions::new(model, output.path(), args.experts, args.top_k);
    o.granularity = args.granularity;
    o.routing = args.routing;
    o.scaling = args.scaling;
    o.router_std = args.router_std;
    o.seed = args.seed;
    o.output = OutputOptions {
        dtype: args.dtype.as_deref().map(super::dtype).transpose()?,
        max_shard_bytes: args.shard_mb << 20,
        overwrite: args.overwrite,
    };
    let report = upcycle(&o)?;
    output.publish()?;
    let m = report.config.moe.as_ref().expect("an MoE");
    println!(
        "wrote {} as {}: {} experts of width {}, top-{}, {}, scale a = {} ({})",
        args.out.display(),
        report.config.output_architecture().class_name(),
        m.experts,
        m.expert_ffn,
        m.top_k,
        m.routing.as_str(),
        report.scale,
        o.scaling.as_str()
    );
    Ok(())
}
