//! `btm upcycle`: turn a dense model into an MoE that computes the same function (He et al. 2024).

use anyhow::Result;
use btm_merger::upcycle::upcycle;
use btm_merger::UpcycleSpec;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct UpcycleArgs {
    /// The upcycle's job file (JSON or YAML, the keys of the flags below), as a pipeline's plan
    /// writes it; instead of the flags.
    #[arg(long, exclusive = true)]
    spec: Option<PathBuf>,
    #[command(flatten)]
    flags: Option<UpcycleSpec>,
    #[command(flatten)]
    output: btm_merger::OutputSpec,
}

impl UpcycleArgs {
    /// The upcycle's spec: its file, or the flags.
    pub fn into_spec(self) -> Result<UpcycleSpec> {
        let flags = self.flags.map(|f| UpcycleSpec { output: self.output, ..f });
        super::spec_or_flags(self.spec.as_deref(), flags)
    }
}

pub fn run(args: UpcycleArgs) -> Result<()> {
    let spec = args.into_spec()?;
    // An object-store --out is written locally, then uploaded manifest last.
    let output = btm_model::folder::Output::new(&spec.out)?;
    let o = spec.options(output.path(), super::local_dir)?;
    let report = upcycle(&o)?;
    output.publish()?;
    let m = report.config.moe.as_ref().expect("an MoE");
    println!(
        "wrote {} as {}: {} experts of width {}, top-{}, {}, scale a = {} ({})",
        spec.out,
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
