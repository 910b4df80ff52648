//! Training checkpoints: `<out>/checkpoints/step-00000120/`.
//!
//! Each is a complete Hugging Face checkpoint (float32 weights, `config.json`,
//! `tokenizer.json`, `btm.json`) that `btm eval` and the merger read as is, plus
//! `optimizer.safetensors` (AdamW moments, float32) and `trainer_state.json` (step, tokens
//! seen, data position, optimizer step count). Everything is written into a hidden temporary
//! directory, `MANIFEST.json` (sizes and SHA-256 of every file) last, and the directory is
//! then renamed into place. A directory without a manifest that verifies is not a checkpoint:
//! resuming skips it with a warning, or refuses it with the reason when it is named explicitly.
//!
//! With expert parallelism the ranks of rank 0's expert-parallel group write one checkpoint
//! together ([`shared_staging`], [`write_part`]): each rank its own experts, as weight shards
//! `model-0000i-of-0000n.safetensors` named in the index, and their AdamW moments (rank w > 0 in
//! `optimizer-0000w-of-0000n.safetensors`, appended to `optimizer.safetensors`' stacks when read);
//! rank 0 writes the rest and, once all are done, the manifest.

use crate::data::Position;
use crate::distributed::Ranks;
use crate::optim::AdamW;
use crate::state::Weights;
use anyhow::{bail, Context, Result};
use btm_kernels::ExpertShard;
use btm_model::manifest::{Manifest, MANIFEST};
use btm_model::publish::StagingDir;
use btm_model::{write_checkpoint_part, Extras, WriteOptions, WriterPart};
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
    let dest = root.join(step_dir_name(state.step));
    // A checkpoint of the same step from an earlier attempt is replaced.
    let staging = StagingDir::new(&dest, true)?;
    let known = write_part(&staging.path, weights, moments, Some(state), extras, &WriterPart::whole())?;
    Manifest::build(&staging.path, &known)?.write(&staging.path)?;
    staging.publish().with_context(|| format!("publishing {}", dest.display()))?;
    Ok(dest)
}

/// Write one writer's part of a checkpoint into the staging folder `dir`: its share of the
/// weights ([`write_checkpoint_part`]), its AdamW moments (writer 0: [`OPTIMIZER`], with every
/// non-expert moment; writer w > 0: [`optimizer_part_name`], its experts' stacks only) and,
/// from writer 0, the trainer `state`. Returns the hashes of what it wrote; the manifest is
/// built once every writer is done.
pub fn write_part(
    dir: &Path,
    weights: &Weights,
    moments: HashMap<String, candle_core::Tensor>,
    state: Option<&TrainerState>,
    extras: &Extras,
    part: &WriterPart,
) -> Result<BTreeMap<String, (u64, String)>> {
    let opts = WriteOptions { overwrite: false, ..WriteOptions::default() };
    let known = write_checkpoint_part(dir, &weights.config, &mut |n| weights.tensor(n), extras, &opts, part)
        .with_context(|| format!("writing weights to {}", dir.display()))?;
    let moments: HashMap<String, candle_core::Tensor> = moments
        .into_iter()
        .filter(|(name, _)| part.writer == 0 || crate::distributed::is_expert_stack(name))
        .map(|(k, t)| Ok((k, t.to_device(&candle_core::Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let file = if part.writer == 0 { OPTIMIZER.to_string() } else { optimizer_part_name(part.writer, part.writers) };
    candle_core::safetensors::save(&moments, dir.join(&file)).context("writing optimizer state")?;
    if let Some(state) = state {
        std::fs::write(dir.join(STATE), serde_json::to_vec_pretty(state)?).context("writing trainer state")?;
    }
    Ok(known)
}

/// The file of writer `writer`'s (> 0) expert moments among `writers`:
/// `optimizer-0000w-of-0000n.safetensors`, numbered from 1 like weight shards (writer 0's
/// part is [`OPTIMIZER`]).
pub fn optimizer_part_name(writer: usize, writers: usize) -> String {
    format!("optimizer-{:05}-of-{writers:05}.safetensors", writer + 1)
}

/// The AdamW moments of a checkpoint, whole: [`OPTIMIZER`], with the expert stacks of the
/// other writers' parts ([`optimizer_part_name`]) appended in writer order.
fn read_moments(dir: &Path, device: &candle_core::Device) -> Result<HashMap<String, candle_core::Tensor>> {
    let load = |file: &Path| candle_core::safetensors::load(file, device).with_context(|| format!("reading {}", file.display()));
    let mut moments = load(&dir.join(OPTIMIZER))?;
    let mut parts: Vec<(usize, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let index = name.strip_prefix("optimizer-").and_then(|r| r.strip_suffix(".safetensors")).and_then(|r| r.split_once("-of-"));
        if let Some((i, _)) = index {
            parts.push((i.parse().with_context(|| format!("{}: {name} is not an optimizer part", dir.display()))?, dir.join(&name)));
        }
    }
    parts.sort();
    for (_, file) in parts {
        for (name, t) in load(&file)? {
            let head = moments.get(&name).with_context(|| format!("{}: `{name}` has no first part", file.display()))?;
            let whole = candle_core::Tensor::cat(&[head, &t], 0)?;
            moments.insert(name, whole);
        }
    }
    Ok(moments)
}

/// A staging folder every checkpoint writer sees: rank 0 makes it for `dest` and names it to
/// the others, who look for the probe it wrote there. `None` on every rank when a writer does
/// not see it (ranks on machines that share no file system); then rank 0 writes alone.
pub fn shared_staging(ranks: &Ranks, dest: &Path, overwrite: bool) -> Result<Option<SharedStaging>> {
    const PROBE: &str = ".btm-writers-probe";
    let staging = if ranks.is_root() { Some(StagingDir::new(dest, overwrite)?) } else { None };
    let mut said = Vec::new();
    if let Some(s) = &staging {
        let nonce = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
        std::fs::write(s.path.join(PROBE), &nonce).with_context(|| format!("writing {}", s.path.display()))?;
        said = format!("{}\n{nonce}", s.path.display()).into_bytes();
    }
    let said = String::from_utf8(ranks.broadcast_bytes(said)?).context("the staging folder's name")?;
    let (path, nonce) = said.split_once('\n').context("the staging folder's name")?;
    let path = PathBuf::from(path);
    let sees = ranks.checkpoint_writer().is_none() || std::fs::read(path.join(PROBE)).is_ok_and(|b| b == nonce.as_bytes());
    if ranks.any(!sees)? {
        return Ok(None);
    }
    if let Some(s) = &staging {
        std::fs::remove_file(s.path.join(PROBE)).with_context(|| format!("cleaning {}", s.path.display()))?;
    }
    Ok(Some(SharedStaging { path, staging }))
}

/// A folder that several ranks write into, published by rank 0 ([`shared_staging`]).
pub struct SharedStaging {
    /// The folder, as every rank names it.
    pub path: PathBuf,
    /// Rank 0's handle, which publishes it.
    staging: Option<StagingDir>,
}

impl SharedStaging {
    /// Once every writer is done (after a barrier): on rank 0, the manifest (reusing `known`
    /// hashes, hashing the other writers' files) and the rename into place; nothing elsewhere.
    pub fn publish(self, known: &BTreeMap<String, (u64, String)>) -> Result<()> {
        if let Some(staging) = self.staging {
            Manifest::build(&self.path, known)?.write(&self.path)?;
            staging.publish()?;
        }
        Ok(())
    }
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
    opt.load_state(crate::distributed::local_experts(read_moments(dir, &device)?, shard)?, state.optimizer_t)
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
