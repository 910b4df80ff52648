//! `btm average`: BTM's parameter-averaged model, θ = Σ_j w_j θ_j over dense experts
//! (`btm_model::ensemble::average`), with w given or estimated as the ensemble's domain prior
//! on a target domain's held-out text.

use anyhow::{Context, Result};
use btm_model::lineage::{Lineage, Parent};
use btm_model::{Extras, WriteOptions};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct AverageArgs {
    /// Dense experts of one architecture and tokenizer (directories or object-store URLs).
    #[arg(long, num_args = 2.., required = true)]
    experts: Vec<String>,
    /// Weights: the ensemble's domain prior estimated on this held-out JSONL of the target domain.
    #[arg(long, conflicts_with = "weights", required_unless_present = "weights")]
    weights_from: Option<PathBuf>,
    /// Weights given, one per expert (normalised to sum to 1).
    #[arg(long, num_args = 1..)]
    weights: Vec<f64>,
    /// Window length for estimating the prior.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// The averaged model's folder (Hugging Face layout; written atomically, manifest last).
    #[arg(long)]
    out: PathBuf,
    /// Where the domain posterior is scored.
    #[arg(long, value_enum, default_value_t = super::Device::Cpu)]
    device: super::Device,
}

pub fn run(args: AverageArgs) -> Result<()> {
    let members = super::eval::open_members(&args.experts)?;
    let weights = match &args.weights_from {
        Some(path) => {
            let device = args.device.open()?;
            let models = members.iter().map(|m| Ok(m.load_model(candle_core::DType::F32, &device)?)).collect::<Result<Vec<_>>>()?;
            let tokenizer = members[0].tokenizer()?;
            let docs = super::eval::tokenized(path, &tokenizer, None, None)?;
            btm_model::ensemble::estimate_prior(&models, &docs, args.seq_len, &device)?
        }
        None => {
            anyhow::ensure!(args.weights.len() == members.len(), "{} --weights for {} --experts", args.weights.len(), members.len());
            anyhow::ensure!(
                args.weights.iter().all(|w| w.is_finite() && *w >= 0.0) && args.weights.iter().sum::<f64>() > 0.0,
                "--weights must be non-negative with a positive sum"
            );
            args.weights.clone()
        }
    };
    let total: f64 = weights.iter().sum();
    let weights: Vec<f64> = weights.iter().map(|w| w / total).collect();
    let (config, mut get) = btm_model::ensemble::average(&members, &weights)?;
    let mut lineage = Lineage::new("average");
    for (uri, m) in args.experts.iter().zip(&members) {
        let manifest = m.dir().join(btm_model::manifest::MANIFEST);
        let id = if manifest.exists() { Some(btm_model::Manifest::id(m.dir())?) } else { None };
        lineage.parents.push(Parent { uri: uri.clone(), manifest_sha256: id, domain: None });
    }
    lineage.extra.insert("weights".into(), serde_json::to_value(&weights)?);
    let extras = Extras { tokenizer: Some(members[0].dir().join("tokenizer.json")), lineage: Some(lineage) };
    btm_model::write_checkpoint(&args.out, &config, &mut get, &extras, &WriteOptions::default())
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("{}", serde_json::json!({"out": args.out, "weights": weights, "experts": args.experts}));
    Ok(())
}
