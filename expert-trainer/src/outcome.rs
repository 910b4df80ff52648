//! What a training run produces, whoever trains: how it ended ([`Outcome`]) and the lineage
//! recorded with its model ([`trained_lineage`]). btm's own loop and external trainers both
//! report through it.

use crate::spec::JobSpec;
use anyhow::Result;
use btm_model::lineage::Parent;
use btm_model::Lineage;
use std::path::PathBuf;

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All steps done; the model is at `model_dir`.
    Finished { step: u64, model_dir: PathBuf },
    /// Stopped by a signal after writing `checkpoint`; rerun the job to continue.
    Interrupted { step: u64, signal: i32, checkpoint: PathBuf },
}

/// Lineage fields that describe what a model is made of — its experts and their seeds, the
/// calibration text its routers were initialised from, the expert output scale, the routing —
/// which later jobs read (`btm add-expert` takes its background text and scale from them).
/// Training does not change them, so a trained model inherits them from the model it started
/// from; what produced that model (its routing accuracy, warnings) is not inherited.
pub const INHERITED_LINEAGE: &[&str] = &[
    "experts",
    "calibration",
    "expert_output_scale",
    "scale",
    "top_k",
    "routing",
    "router_init",
    "non_expert",
    "shared_expert",
    "granularity",
    "scaling",
    "projection_scales",
    "non_expert_on_add",
];

/// The lineage of a model trained by `spec` for `steps` steps and `tokens_seen` tokens, from
/// the model in `init_dir` (`None`: from scratch, a seed): its parent (with the manifest hash
/// where it has one), its domain, and the parent's [`INHERITED_LINEAGE`]. btm's trainer and
/// external trainers both record their models through it.
pub fn trained_lineage(spec: &JobSpec, init_dir: Option<&std::path::Path>, steps: u64, tokens_seen: u64) -> Result<Lineage> {
    let mut l = Lineage::new(if init_dir.is_some() { "expert" } else { "seed" });
    if let Some(dir) = init_dir {
        if let Some(p) = Lineage::read(dir)? {
            for key in INHERITED_LINEAGE {
                if let Some(v) = p.extra.get(*key) {
                    l.extra.insert((*key).to_string(), v.clone());
                }
            }
        }
        if let Some(uri) = &spec.init.checkpoint {
            let manifest = dir.join(btm_model::manifest::MANIFEST);
            l.parents.push(Parent {
                uri: uri.clone(),
                manifest_sha256: if manifest.exists() { Some(btm_model::Manifest::id(dir)?) } else { None },
                domain: None,
            });
        }
    }
    l.domain = spec.domain.clone();
    l.steps = Some(steps);
    l.tokens_seen = Some(tokens_seen);
    Ok(l)
}
