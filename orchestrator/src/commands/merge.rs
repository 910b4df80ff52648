//! `btm merge`: assemble trained dense experts into a Mixture of Experts.

use anyhow::Result;
use btm_merger::merge::merge;
use btm_merger::MergeSpec;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct MergeArgs {
    /// The merge's job file (JSON or YAML, the keys of the flags below), as a pipeline's plan
    /// writes it; instead of the flags.
    #[arg(long, exclusive = true)]
    spec: Option<PathBuf>,
    /// Take the merge from a mergekit-moe YAML instead (base_model, gate_mode, experts with
    /// positive_prompts, experts_per_token, dtype, shared_experts); what btm cannot honour is
    /// an error. --out, --shard-mb and --overwrite still apply.
    #[arg(long, requires = "out", conflicts_with_all = ["experts", "calib", "top_k", "routing", "non_expert", "weights", "shared_expert"])]
    mergekit_config: Option<PathBuf>,
    #[command(flatten)]
    flags: Option<MergeSpec>,
    #[command(flatten)]
    router: btm_merger::RouterSpec,
    #[command(flatten)]
    output: btm_merger::OutputSpec,
}

impl MergeArgs {
    /// The merge's spec: its file, or the flags.
    pub fn into_spec(self) -> Result<MergeSpec> {
        let flags = self.flags.map(|f| MergeSpec { router: self.router, output: self.output, ..f });
        super::spec_or_flags(self.spec.as_deref(), flags)
    }
}

pub fn run(args: MergeArgs) -> Result<()> {
    let mergekit_config = args.mergekit_config.clone();
    let spec = args.into_spec()?;
    // An object-store --out is written locally, then uploaded manifest last.
    let output = btm_model::folder::Output::new(&spec.out)?;
    let calib_dir = tempfile::tempdir()?;
    let o = match &mergekit_config {
        Some(file) => {
            let mut o = super::mergekit::read(file)?.options(output.path(), calib_dir.path())?;
            let dtype = o.output.dtype;
            o.output = spec.output.options();
            o.output.dtype = dtype.or(o.output.dtype);
            o
        }
        None => spec.options(output.path(), super::local_dir, super::fetch_file)?,
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
        spec.out,
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
