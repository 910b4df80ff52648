//! `btm average`: BTM's parameter-averaged model, θ = Σ_j w_j θ_j over dense experts
//! (`btm_model::ensemble::average`), with w given or estimated as the ensemble's domain prior
//! on a target domain's held-out text.

use anyhow::{Context, Result};
use btm_model::lineage::{Lineage, Parent};
use btm_model::{Extras, WriteOptions};
use btm_trainer::jobs::AverageSpec;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct AverageArgs {
    /// The average's job file (JSON or YAML, the keys of the flags below), as a pipeline's plan
    /// writes it; instead of the flags.
    #[arg(long, exclusive = true)]
    spec: Option<PathBuf>,
    #[command(flatten)]
    flags: Option<AverageSpec>,
}

impl AverageArgs {
    /// The job's spec: its file, or the flags.
    pub fn into_spec(self) -> Result<AverageSpec> {
        super::spec_or_flags(self.spec.as_deref(), self.flags)
    }
}

pub fn run(args: AverageArgs) -> Result<()> {
    let args = args.into_spec()?;
    anyhow::ensure!(args.experts.len() >= 2, "average: give at least two experts");
    anyhow::ensure!(args.weights_from.is_some() == args.weights.is_empty(), "average: give --weights-from or --weights, one of them");
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
