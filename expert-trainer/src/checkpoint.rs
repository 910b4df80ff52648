//! Training checkpoints: `<out>/checkpoints/step-00000120/`.
//!
//! Each is a complete Hugging Face checkpoint (float32 weights, `config.json`,
//! `tokenizer.json`, `btm.json`) that `btm eval` and the merger read as is, plus
//! `optimizer.safetensors` (AdamW moments, float32) and `trainer_state.json` (step, tokens
//! seen, data position, optimizer step count). Everything is written into a hidden temporary
//! directory, `MANIFEST.json` (sizes and SHA-256 of every file) last, and the directory is
//! then renamed into place. A directory without a manifest that verifies is not a checkpoint:
//! resuming skips it with a warning, or refuses it with the reason when it is named explicitly.

use crate::data::Position;
use crate::optim::AdamW;
use crate::state::Weights;
use anyhow::{bail, Context, Result};
use btm_kernels::ExpertShard;
use btm_model::manifest::{Manifest, MANIFEST};
use btm_model::publish::StagingDir;
use btm_model::{write_checkpoint_files, Extras, WriteOptions};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const STATE: &str = "trainer_state.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
const FORMAT: &str = "btm-trainer-state/1";

/// Everything besides weights and moments that training needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: String,
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    /// Where the training data stream stands.
    pub data: Position,
    /// AdamW's update count (equals `step` unless the optimizer was reset).
    pub optimizer_t: u64,
    pub seed: u64,
    /// The names of the trained tensors, in order.
    pub trainable: Vec<String>,
}

impl TrainerState {
    pub fn new(step: u64, tokens_seen: u64, data: Position, optimizer_t: u64, seed: u64, trainable: Vec<String>) -> Self {
        Self { format: FORMAT.into(), step, tokens_seen, data, optimizer_t, seed, trainable }
    }
}

/// The directory name of the checkpoint after `step` steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a published checkpoint folder's name ([`step_dir_name`]); `None` for any
/// other name (a hidden staging folder, a file).
pub fn parse_step_dir_name(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Write and publish a checkpoint under `root`: `weights` and the AdamW `moments`
/// ([`AdamW::state_tensors`]), whole; returns its directory.
pub fn save(
    root: &Path,
    weights: &Weights,
    moments: HashMap<String, candle_core::Tensor>,
    state: &TrainerState,
    extras: &Extras,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let name = step_dir_name(state.step);
    let dest = root.join(&name);
    // A checkpoint of the same step from an earlier attempt is replaced.
    let staging = StagingDir::new(&dest, true)?;
    // The weights, in Hugging Face layout.
    let opts = WriteOptions { overwrite: false, ..WriteOptions::default() };
    write_checkpoint_files(&staging.path, &weights.config, &mut |n| weights.tensor(n), extras, &opts)
        .with_context(|| format!("writing weights to {}", staging.path.display()))?;
    // The optimizer and trainer state beside them, then a manifest covering everything.
    let moments: HashMap<String, candle_core::Tensor> =
        moments.into_iter().map(|(k, t)| Ok((k, t.to_device(&candle_core::Device::Cpu)?))).collect::<Result<_>>()?;
    candle_core::safetensors::save(&moments, staging.path.join(OPTIMIZER)).context("writing optimizer state")?;
    std::fs::write(staging.path.join(STATE), serde_json::to_vec_pretty(state)?).context("writing trainer state")?;
    let known: BTreeMap<String, (u64, String)> =
        Manifest::read(&staging.path)?.files.into_iter().map(|f| (f.path, (f.size, f.sha256))).collect();
    Manifest::build(&staging.path, &known)?.write(&staging.path)?;
    staging.publish().with_context(|| format!("publishing {}", dest.display()))?;
    Ok(dest)
}

/// Published step checkpoints under `root`, newest first (not yet verified).
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    for entry in entries {
        let entry = entry?;
        if let Some(step) = parse_step_dir_name(&entry.file_name().to_string_lossy()) {
            if entry.file_type()?.is_dir() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.0));
    Ok(out)
}

/// Check a checkpoint completely: a manifest listing the weights, the optimizer and the
/// trainer state, every file's size and SHA-256 matching it. Returns its trainer state.
pub fn verify(dir: &Path) -> Result<TrainerState> {
    if !dir.join(MANIFEST).exists() {
        bail!("{}: no {MANIFEST} (an unfinished or foreign directory)", dir.display());
    }
    let manifest = Manifest::read(dir)?;
    for need in [STATE, OPTIMIZER, "config.json"] {
        if !manifest.files.iter().any(|f| f.path == need) {
            bail!("{}: the manifest does not list {need}", dir.display());
        }
    }
    manifest.verify(dir)?;
    let bytes = std::fs::read(dir.join(STATE))?;
    let state: TrainerState = serde_json::from_slice(&bytes).with_context(|| format!("{}: invalid {STATE}", dir.display()))?;
    if state.format != FORMAT {
        bail!("{}: unknown trainer state format `{}`", dir.display(), state.format);
    }
    Ok(state)
}

/// The newest checkpoint under `root` that verifies; the ones skipped are reported through `warn`.
pub fn newest_valid(root: &Path, warn: &mut dyn FnMut(String)) -> Result<Option<(PathBuf, TrainerState)>> {
    for (_, dir) in list(root)? {
        match verify(&dir) {
            Ok(state) => return Ok(Some((dir, state))),
            Err(e) => warn(format!("skipping checkpoint {}: {e:#}", dir.display())),
        }
    }
    Ok(None)
}

/// Load the optimizer moments of a verified checkpoint into `opt` (with expert parallelism,
/// the moments of this rank's experts, `shard`).
pub fn load_optimizer(dir: &Path, opt: &mut AdamW, state: &TrainerState, shard: Option<&ExpertShard>) -> Result<()> {
    let names: Vec<&str> = opt.params.iter().map(|p| p.name.as_str()).collect();
    if names != state.trainable.iter().map(String::as_str).collect::<Vec<_>>() {
        bail!(
            "{}: the checkpoint trained {} tensors, this job trains {} (did `trainable` change?)",
            dir.display(),
            state.trainable.len(),
            names.len()
        );
    }
    let device = opt.params.first().map(|p| p.var.device().clone()).unwrap_or(candle_core::Device::Cpu);
    let tensors = candle_core::safetensors::load(dir.join(OPTIMIZER), &device)
        .with_context(|| format!("reading {}", dir.join(OPTIMIZER).display()))?;
    opt.load_state(crate::distributed::local_experts(tensors, shard)?, state.optimizer_t)
}

/// Delete all but the newest `keep` checkpoints.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    for (_, dir) in list(root)?.into_iter().skip(keep) {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// Remove the hidden half-written directories (`.step-*`, and the weight writer's own
/// staging directories inside their names) that a killed process left behind. Call before
/// training starts, when no write of this job is under way.
pub fn remove_partials(root: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains("step-") && entry.file_type()?.is_dir() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}
