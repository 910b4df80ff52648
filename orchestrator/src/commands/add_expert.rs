//! `btm add-expert`: append a dense model's FFN to an existing MoE as a new expert.

use anyhow::Result;
use btm_merger::add_expert::add_expert;
use btm_merger::AddExpertSpec;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct AddExpertArgs {
    /// The addition's job file (JSON or YAML, the keys of the flags below), as a pipeline's
    /// plan writes it; instead of the flags.
    #[arg(long, exclusive = true)]
    spec: Option<PathBuf>,
    #[command(flatten)]
    flags: Option<AddExpertSpec>,
    #[command(flatten)]
    router: btm_merger::RouterSpec,
    #[command(flatten)]
    output: btm_merger::OutputSpec,
}

impl AddExpertArgs {
    /// The addition's spec: its file, or the flags.
    pub fn into_spec(self) -> Result<AddExpertSpec> {
        let flags = self.flags.map(|f| AddExpertSpec { router: self.router, output: self.output, ..f });
        super::spec_or_flags(self.spec.as_deref(), flags)
    }
}

pub fn run(args: AddExpertArgs) -> Result<()> {
    let spec = args.into_spec()?;
    // An object-store --out is written locally, then uploaded manifest last.
    let output = btm_model::folder::Output::new(&spec.out)?;
    let o = spec.options(output.path(), super::local_dir, super::fetch_file)?;
    let report = add_expert(&o)?;
    output.publish()?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let m = report.config.moe.as_ref().expect("an MoE");
    println!("wrote {} with {} experts (top-{}, {})", spec.out, m.experts, m.top_k, m.routing.as_str());
    if let Some(layers) = report.lineage.extra["added_expert"].get("routing_accuracy").and_then(|v| v.as_array()) {
        for l in layers {
            let share = |key: &str| l.get(key).and_then(|v| v.as_f64()).map_or("n/a".to_string(), |v| format!("{:.3}", v));
            println!(
                "  layer {}: held-out new-domain tokens with the new expert top-1 {}, in top-{} {}; held-out old tokens with it in top-{} {}",
                l["layer"],
                share("accuracy"),
                m.top_k,
                share("new_in_top_k"),
                m.top_k,
                share("background_new_in_top_k"),
            );
        }
    }
    Ok(())
}
