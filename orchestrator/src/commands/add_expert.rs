//! `btm add-expert`: append a dense model's FFN to an existing MoE as a new expert.

use anyhow::{bail, Result};
use btm_merger::add_expert::{add_expert, AddExpertOptions};
use btm_merger::calib::CalibOptions;
use btm_merger::router_init::{FitOptions, RouterInit};
use btm_merger::OutputOptions;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct AddExpertArgs {
    /// The existing MoE (directory or URL).
    #[arg(long)]
    moe: String,
    /// The dense model whose FFN becomes the new expert.
    #[arg(long)]
    expert: String,
    #[arg(long)]
    out: PathBuf,
    /// Calibration text of the new expert's domain (JSONL).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// The new domain's name (default: the expert's btm.json domain).
    #[arg(long)]
    name: Option<String>,
    /// Text of the existing domains to centre against (default: the calibration files recorded
    /// in the MoE's btm.json).
    #[arg(long, num_args = 1..)]
    background: Vec<PathBuf>,
    /// centroid | fit | random | zero (default: centroid with --calib, else random).
    #[arg(long)]
    router_init: Option<RouterInit>,
    #[arg(long, default_value_t = 0.02)]
    router_std: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0.8)]
    target_prob: f64,
    #[arg(long, default_value_t = 300)]
    fit_steps: usize,
    #[arg(long, default_value_t = 128)]
    calib_seq_len: usize,
    #[arg(long, default_value_t = 8192)]
    calib_tokens: usize,
    /// Non-expert weights: keep (the MoE's) or average (re-average with the new expert).
    #[arg(long, default_value = "keep")]
    non_expert: String,
    #[arg(long)]
    dtype: Option<String>,
    #[arg(long, default_value_t = 2048)]
    shard_mb: u64,
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: AddExpertArgs) -> Result<()> {
    // An object-store --out is written locally, then uploaded manifest last.
    let output = btm_model::folder::Output::new(&args.out.to_string_lossy())?;
    let mut o =
        AddExpertOptions::new(btm_model::storage::local_dir(&args.moe)?, btm_model::storage::local_dir(&args.expert)?, output.path());
    o.router_init = args.router_init.unwrap_or(if args.calib.is_some() { RouterInit::Centroid } else { RouterInit::Random });
    o.calib = args.calib.map(|c| btm_model::folder::fetch_file(&c.to_string_lossy())).transpose()?;
    o.name = args.name;
    o.background = args.background.iter().map(|b| btm_model::folder::fetch_file(&b.to_string_lossy())).collect::<Result<_, _>>()?;
    o.router_std = args.router_std;
    o.seed = args.seed;
    o.target_prob = args.target_prob;
    o.fit = FitOptions { steps: args.fit_steps, ..Default::default() };
    o.calib_options = CalibOptions { seq_len: args.calib_seq_len, max_tokens: args.calib_tokens, ..Default::default() };
    o.reaverage = match args.non_expert.as_str() {
        "keep" => false,
        "average" => true,
        other => bail!("unknown --non-expert `{other}` (expected keep or average)"),
    };
    o.output = OutputOptions {
        dtype: args.dtype.as_deref().map(super::dtype).transpose()?,
        max_shard_bytes: args.shard_mb << 20,
        overwrite: args.overwrite,
    };
    let report = add_expert(&o)?;
    output.publish()?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let m = report.config.moe.as_ref().expect("an MoE");
    println!("wrote {} with {} experts (top-{}, {})", args.out.display(), m.experts, m.top_k, m.routing.as_str());
    if let Some(layers) = report.lineage.extra["added_expert"].get("routing_accuracy").and_then(|v| v.as_array()) {
        for l in layers {
            println!(
                "  layer {}: new-domain held-out tokens routed to the new expert {:.3}, background {}",
                l["layer"],
                l["accuracy"].as_f64().unwrap_or(f64::NAN),
                l.get("background_routed_to_new").map_or("n/a".to_string(), |v| format!("{:.3}", v.as_f64().unwrap_or(f64::NAN)))
            );
        }
    }
    Ok(())
}
