//! `btm add-expert`: append a dense model's FFN to an existing MoE as a new expert.

use anyhow::Result;
use btm_merger::add_expert::{add_expert, AddExpertOptions, NonExpertOnAdd};
use btm_merger::router_init::GuardOptions;
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
    /// The extended MoE's folder (or object-store URL).
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
    #[command(flatten)]
    router: super::RouterArgs,
    /// The margin guard's δ in logits: on the old domains' calibration tokens, the new row stays
    /// this far below each token's k-th largest old logit, so old tokens keep their top-k.
    #[arg(long, default_value_t = GuardOptions::default().margin)]
    margin: f64,
    /// Keep the centroid or fitted row as it is (old tokens may then route to the new expert).
    #[arg(long)]
    no_guard: bool,
    /// Share of the old domains' calibration tokens the guard may leave above the bound: 0
    /// holds every one (old domains first); more lets the new expert take tokens the old domains
    /// share with the new one (the report gives the measured leak on held-out text).
    #[arg(long, default_value_t = GuardOptions::default().tolerance)]
    guard_tolerance: f64,
    /// Gradient steps per penalty weight of the guard.
    #[arg(long, default_value_t = GuardOptions::default().steps)]
    guard_steps: usize,
    /// The extended MoE's non-expert weights.
    #[arg(long, value_enum, default_value_t = NonExpertOnAdd::Keep)]
    non_expert: NonExpertOnAdd,
    #[command(flatten)]
    output: super::OutputArgs,
}

pub fn run(args: AddExpertArgs) -> Result<()> {
    // An object-store --out is written locally, then uploaded manifest last.
    let output = btm_model::folder::Output::new(&args.out.to_string_lossy())?;
    let mut o =
        AddExpertOptions::new(btm_model::storage::local_dir(&args.moe)?, btm_model::storage::local_dir(&args.expert)?, output.path());
    o.router = args.router.options(args.calib.is_some());
    o.calib = args.calib.map(|c| btm_model::folder::fetch_file(&c.to_string_lossy())).transpose()?;
    o.name = args.name;
    o.background = args.background.iter().map(|b| btm_model::folder::fetch_file(&b.to_string_lossy())).collect::<Result<_, _>>()?;
    o.guard = (!args.no_guard).then_some(GuardOptions {
        margin: args.margin,
        tolerance: args.guard_tolerance,
        steps: args.guard_steps,
        ..GuardOptions::default()
    });
    o.non_expert = args.non_expert;
    o.output = args.output.options()?;
    let report = add_expert(&o)?;
    output.publish()?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let m = report.config.moe.as_ref().expect("an MoE");
    println!("wrote {} with {} experts (top-{}, {})", args.out.display(), m.experts, m.top_k, m.routing.as_str());
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
