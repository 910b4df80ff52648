//! `btm merge`: assemble trained dense experts into a Mixture of Experts.

use anyhow::Result;
use btm_merger::merge::{merge, MergeOptions, NonExpert};
use btm_model::Routing;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct MergeArgs {
    /// Dense expert checkpoints (directories or URLs); expert i's FFN becomes expert i.
    #[arg(long, num_args = 1.., required_unless_present = "mergekit_config")]
    experts: Vec<String>,
    /// Take the merge from a mergekit-moe YAML instead (base_model, gate_mode, experts with
    /// positive_prompts, experts_per_token, dtype, shared_experts); what btm cannot honour is
    /// an error. --out, --shard-mb and --overwrite still apply.
    #[arg(long, conflicts_with_all = ["experts", "calib", "top_k", "routing", "non_expert", "weights", "shared_expert"])]
    mergekit_config: Option<PathBuf>,
    /// The merged MoE's folder (or object-store URL).
    #[arg(long)]
    out: PathBuf,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// topk_then_softmax (Mixtral) or softmax_then_topk (Qwen2-MoE, norm_topk_prob false).
    #[arg(long, default_value = "topk_then_softmax")]
    routing: Routing,
    #[command(flatten)]
    router: super::RouterArgs,
    /// Calibration text per expert, in expert order: NAME=FILE.jsonl …
    #[arg(long, num_args = 1..)]
    calib: Vec<String>,
    /// Non-expert weights: average (BTX) | weighted (with --weights) | from:CKPT.
    #[arg(long, default_value = "average")]
    non_expert: String,
    /// One weight per expert for --non-expert weighted.
    #[arg(long, num_args = 1..)]
    weights: Option<Vec<f64>>,
    /// Keep this dense model's FFN as an always-on shared expert.
    #[arg(long)]
    shared_expert: Option<String>,
    #[command(flatten)]
    output: super::OutputArgs,
}

/// The merge the flags ask for, writing `out`.
fn options(args: &MergeArgs, out: &std::path::Path) -> Result<MergeOptions> {
    let experts = args.experts.iter().map(|e| btm_model::storage::local_dir(e)).collect::<Result<Vec<_>, _>>()?;
    let mut o = MergeOptions::new(experts, out);
    o.top_k = args.top_k;
    o.routing = args.routing;
    o.router = args.router.options(!args.calib.is_empty());
    o.calib = args.calib.iter().map(|c| super::fetch_named(c)).collect::<Result<_>>()?;
    o.non_expert = match args.non_expert.strip_prefix("from:") {
        Some(ckpt) => NonExpert::From(btm_model::storage::local_dir(ckpt)?),
        None => NonExpert::parse(&args.non_expert, args.weights.clone())?,
    };
    o.shared_expert = args.shared_expert.as_deref().map(btm_model::storage::local_dir).transpose()?;
    o.output = args.output.options()?;
    Ok(o)
}

pub fn run(args: MergeArgs) -> Result<()> {
    // An object-store --out is written locally, then uploaded manifest last.
    let output = btm_model::folder::Output::new(&args.out.to_string_lossy())?;
    let calib_dir = tempfile::tempdir()?;
    let o = match &args.mergekit_config {
        Some(file) => {
            let mut o = super::mergekit::read(file)?.options(output.path(), calib_dir.path())?;
            let dtype = o.output.dtype;
            o.output = args.output.options()?;
            o.output.dtype = dtype.or(o.output.dtype);
            o
        }
        None => options(&args, output.path())?,
    };
    let start = std::time::Instant::now();
    let report = merge(&o)?;
    output.publish()?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let m = report.config.moe.as_ref().expect("an MoE");
    println!(
        "wrote {} as {}: {} experts, top-{}, {}, router {} ({:.1}s)",
        args.out.display(),
        report.config.output_architecture().class_name(),
        m.experts,
        m.top_k,
        m.routing.as_str(),
        o.router.init.as_str(),
        start.elapsed().as_secs_f64()
    );
    if let Some(layers) = report.lineage.extra.get("routing_accuracy").and_then(|v| v.as_array()) {
        for l in layers {
            println!("  layer {}: held-out routing accuracy {:.3} {}", l["layer"], l["mean"].as_f64().unwrap_or(f64::NAN), l["per_domain"]);
        }
    }
    Ok(())
}
