//! `btm upcycle`: turn a dense model into an MoE that computes the same function (He et al. 2024).

use anyhow::Result;
use btm_merger::upcycle::{upcycle, UpcycleOptions};
use btm_merger::ScalingMode;
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
    /// topk_then_softmax (Mixtral) or softmax_then_topk (Qwen2-MoE, norm_topk_prob false).
    #[arg(long, default_value = "topk_then_softmax")]
    routing: Routing,
    /// exact (√a on up and down) or megatron (a^(1/3) on gate, up and down).
    #[arg(long, default_value = "exact")]
    scaling: ScalingMode,
    /// Std of the router's random rows (0: zero router).
    #[arg(long, default_value_t = btm_merger::router_init::DEFAULT_ROUTER_STD)]
    router_std: f64,
    /// Seed of the router's random rows.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The upcycled MoE's folder (or object-store URL).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    output: super::OutputArgs,
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
    o.output = args.output.options()?;
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
