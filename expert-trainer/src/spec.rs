//! The job spec: one YAML file says everything a training run needs.
//!
//! Parsing is strict (`deny_unknown_fields` everywhere) and [`JobSpec::validate`] checks what
//! types cannot: positive learning rates, a sequence length the model can hold, data files that
//! exist and are not empty. Every error names the key path (`optimizer.lr`,
//! `data.train[1].path`) and the reason, and all of it happens before any work starts.
//! Relative paths are resolved against the job file's directory.
//!
//! ```yaml
//! init: {checkpoint: seed/}          # or {config: config.json, tokenizer: tokenizer.json}
//! out: runs/scripture                # a directory or file:// URL
//! data:
//!   train: [{path: scripture/train.jsonl, weight: 1.0}]
//!   valid: [scripture/valid.jsonl]
//! steps: 2000                        # or `tokens: 50_000_000`
//! batch_size: 8
//! seq_len: 256
//! optimizer: {lr: 3.0e-4, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1}
//! schedule: {warmup_steps: 100, decay: cosine, min_lr: 3.0e-5}
//! ```

pub use crate::device::{DType, Device};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Init {
    /// A checkpoint directory or object-store URL in Hugging Face layout.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Train from scratch: a Hugging Face `config.json` ...
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// ... and the `tokenizer.json` to train with.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
}

/// One training data source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The text ([`crate::sources`]): a JSONL file (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`), a
    /// parquet file, folder of shards or `*` glob, or a Megatron indexed dataset's `.idx`; a
    /// path or an object-store URL (streamed, never downloaded whole).
    pub path: PathBuf,
    /// Share of training sequences drawn from this source (relative to the others).
    #[serde(default = "one_f64")]
    pub weight: f64,
    /// The format, when the name does not say it ([`Format::detect`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<crate::sources::Format>,
    /// The JSON field or parquet column holding the text (default `text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_key: Option<String>,
    /// Its tokens are held out of `moe.router_guard`'s experts (an added expert's replay of
    /// the old domains).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guarded: bool,
}

impl Source {
    /// The source's location as given (a path or URL).
    pub fn location(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// Its format: as given, or as its name says.
    pub fn format(&self) -> crate::sources::Format {
        self.format.unwrap_or_else(|| crate::sources::Format::detect(&self.location()))
    }

    /// The field or column holding the text.
    pub fn text_key(&self) -> &str {
        self.text_key.as_deref().unwrap_or(crate::sources::DEFAULT_TEXT_KEY)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Data {
    pub train: Vec<Source>,
    #[serde(default)]
    pub valid: Vec<PathBuf>,
}

// The settings blocks below take a missing key from their `Default` impl (`#[serde(default)]`
// on the struct), so each default is written once, there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Optimizer {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Decoupled weight decay (Loshchilov & Hutter); never applied to norms and biases.
    pub weight_decay: f64,
}

impl Default for Optimizer {
    fn default() -> Self {
        Self { lr: DEFAULT_LR, betas: [0.9, 0.95], eps: 1e-8, weight_decay: 0.1 }
    }
}

/// The learning rate after warm-up (one definition: job files and the pipeline's `decay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    Cosine,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Schedule {
    pub warmup_steps: u64,
    pub decay: Decay,
    /// The cosine decays to this; ignored by `constant`.
    pub min_lr: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Self { warmup_steps: 0, decay: Decay::Cosine, min_lr: 0.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Eval {
    /// Validate every this many steps (and at the start and the end); 0 = start and end only.
    pub interval: u64,
    /// Number of `seq_len` windows of the validation stream to score.
    pub sequences: usize,
}

impl Default for Eval {
    fn default() -> Self {
        Self { interval: 0, sequences: DEFAULT_EVAL_SEQUENCES }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Checkpointing {
    /// Write a checkpoint every this many steps (and at the end); 0 = at the end only.
    pub interval: u64,
    /// How many step checkpoints to keep (the newest).
    pub keep: usize,
}

impl Default for Checkpointing {
    fn default() -> Self {
        Self { interval: 0, keep: 2 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Moe {
    /// Coefficient of the Switch load-balancing loss (mean over MoE layers).
    pub aux_loss_coef: f64,
    /// Coefficient of the router z-loss (mean over MoE layers).
    pub z_loss_coef: f64,
    /// Expert capacity factor: each expert takes at most ceil(T·k/E · factor) assignments per
    /// batch; null = dropless.
    pub capacity_factor: Option<f64>,
    /// Which assignments over capacity are dropped: `probs` (the lowest-probability ones, per
    /// expert) or `position` (the latest tokens).
    pub drop_policy: btm_kernels::DropPolicy,
    /// Keep some experts out of the top-k of the tokens of `guarded` sources while training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_guard: Option<RouterGuard>,
}

/// The training form of `btm add-expert`'s margin guard, for an expert trained in place
/// (its router row trains): on every token of a `guarded` source, each guarded expert's logit
/// ℓ_g should stay `margin` below the token's k-th largest logit t_k among the other experts,
/// so that the token keeps its top-k, and with it its exact output under top-k-then-softmax.
/// The loss adds `coef · mean_layers mean_tokens Σ_g max(0, ℓ_g − t_k + margin)²`, t_k held
/// fixed (a squared-hinge exterior penalty, Nocedal & Wright 2006, §17.1). The language-model
/// loss on replayed old text alone does not keep the row away: it pulls old tokens to the new
/// expert wherever it helps them a little, and their outputs change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouterGuard {
    /// The guarded experts (the added ones), 0-based.
    pub experts: Vec<usize>,
    /// Logits by which a guarded expert stays below the k-th of the others.
    #[serde(default = "default_guard_margin")]
    pub margin: f64,
    /// The penalty's coefficient.
    #[serde(default = "default_guard_coef")]
    pub coef: f64,
}

/// `btm add-expert`'s default `--margin`.
pub fn default_guard_margin() -> f64 {
    1.0
}
pub fn default_guard_coef() -> f64 {
    1.0
}

impl Moe {
    /// The capacity limit, if any.
    pub fn capacity(&self) -> Result<Option<btm_kernels::Capacity>> {
        let Some(factor) = self.capacity_factor else { return Ok(None) };
        if !(factor > 0.0 && factor.is_finite()) {
            bail!("moe.capacity_factor: must be a positive number, got {factor}");
        }
        Ok(Some(btm_kernels::Capacity { factor, policy: self.drop_policy }))
    }
}

impl Default for Moe {
    fn default() -> Self {
        Self { aux_loss_coef: 0.01, z_loss_coef: 0.001, capacity_factor: None, drop_policy: Default::default(), router_guard: None }
    }
}

/// Which tensors train, by canonical name with `*` wildcards: e.g. only the routers
/// (`include: ["*.mlp.gate.weight"]`) or only new experts
/// (`include: ["*.mlp.gate.weight", "*.mlp.experts.4.*"]`). Default: everything.
/// A pattern may end in a row selection, `[i]` or `[i:j]` (rows i to j−1): only those rows of
/// the tensor train, so `["*.mlp.experts.4.*", "*.mlp.gate.weight[4]"]` trains expert 4 and its
/// router row inside an otherwise frozen MoE (the other rows keep their exact bits).
/// (The pipeline's `train.trainable` is this same type; the schema derive serves `btm schema`.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Trainable {
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl Trainable {
    /// Whether tensor `name` trains, in whole or in part (rows a row-selecting exclusion takes
    /// away are settled by [`Self::selected_rows`]).
    pub fn selects(&self, name: &str) -> bool {
        let matching = |list: &[String]| -> Vec<Option<Range<usize>>> {
            list.iter().filter_map(|p| split_rows(p).ok()).filter(|(g, _)| glob(g, name)).map(|(_, rows)| rows).collect()
        };
        (self.include.is_empty() || !matching(&self.include).is_empty()) && !matching(&self.exclude).iter().any(Option::is_none)
    }

    /// The rows of tensor `name` (of `rows` rows) that train, as sorted disjoint ranges.
    pub fn selected_rows(&self, name: &str, rows: usize) -> Result<Vec<Range<usize>>> {
        let mut on = vec![self.include.is_empty(); rows];
        for (list, value) in [(&self.include, true), (&self.exclude, false)] {
            for p in list.iter() {
                let (glob_part, sel) = split_rows(p)?;
                if !glob(glob_part, name) {
                    continue;
                }
                let sel = sel.unwrap_or(0..rows);
                ensure!(sel.end <= rows, "trainable: `{p}` selects rows {sel:?} but `{name}` has {rows} rows");
                on[sel].iter_mut().for_each(|x| *x = value);
            }
        }
        let mut out: Vec<Range<usize>> = Vec::new();
        for (i, _) in on.iter().enumerate().filter(|(_, &x)| x) {
            match out.last_mut() {
                Some(last) if last.end == i => last.end = i + 1,
                _ => out.push(i..i + 1),
            }
        }
        Ok(out)
    }
}

/// A pattern's name part and its row selection: `name[i]` is rows i..i+1, `name[i:j]` rows i..j.
pub fn split_rows(pattern: &str) -> Result<(&str, Option<Range<usize>>)> {
    let Some(body) = pattern.strip_suffix(']') else { return Ok((pattern, None)) };
    let Some((name, sel)) = body.rsplit_once('[') else { bail!("`{pattern}`: a row selection is `[i]` or `[i:j]`") };
    let parse = |t: &str| t.trim().parse::<usize>().map_err(|_| anyhow::anyhow!("`{pattern}`: `{t}` is not a row index"));
    let rows = match sel.split_once(':') {
        Some((a, b)) => parse(a)?..parse(b)?,
        None => parse(sel)?..parse(sel)? + 1,
    };
    ensure!(rows.start < rows.end, "`{pattern}`: the row selection {rows:?} is empty");
    Ok((name, Some(rows)))
}

/// `*` matches any run of characters (dots included); everything else matches itself.
pub fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Who trains a phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Trainer {
    /// btm's own trainer.
    #[default]
    Btm,
    /// Any command: a template with `{placeholder}`s (docs/training.md lists them), run by `sh -c`.
    Command { command: String },
    /// `torchrun --standalone --nproc_per_node N SCRIPT ARGS…` on one node; on `nnodes` > 1, one
    /// torchrun per node meeting at a c10d rendezvous on the first node, which the engine gives
    /// (`BTM_RDZV_ENDPOINT`); `args` may hold placeholders.
    Torchrun {
        script: String,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default = "one_usize")]
        nproc_per_node: usize,
        #[serde(default = "one_usize")]
        nnodes: usize,
    },
}

// The command line and the check of its placeholders are the `external` module's: the spec
// only says who trains.
impl Trainer {
    /// Whether btm trains the phase itself.
    pub fn is_btm(&self) -> bool {
        matches!(self, Trainer::Btm)
    }

    /// Nodes one job of this trainer spans (torchrun's `nnodes`; 1 for the others).
    pub fn nodes(&self) -> usize {
        match self {
            Trainer::Torchrun { nnodes, .. } => *nnodes,
            _ => 1,
        }
    }
}

/// A training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub init: Init,
    /// Output directory or file:// URL: checkpoints/, model/, metrics.jsonl.
    pub out: String,
    pub data: Data,
    /// Optimizer steps to take; or give `tokens` instead.
    #[serde(default)]
    pub steps: Option<u64>,
    /// Training-token budget: steps = ceil(tokens / (batch_size · seq_len · grad_accum)).
    #[serde(default)]
    pub tokens: Option<u64>,
    pub batch_size: usize,
    pub seq_len: usize,
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    #[serde(default)]
    pub optimizer: Optimizer,
    #[serde(default)]
    pub schedule: Schedule,
    /// Clip the global gradient norm to this; null = no clipping.
    #[serde(default = "default_clip")]
    pub grad_clip: Option<f64>,
    #[serde(default)]
    pub seed: u64,
    /// The forward and backward passes' dtype: `float32`, or `bfloat16` (mixed precision).
    #[serde(default)]
    pub dtype: crate::device::DType,
    /// `cpu`, or `cuda`: the GPU of the process's local rank among `CUDA_VISIBLE_DEVICES`.
    #[serde(default)]
    pub device: crate::device::Device,
    /// CPU threads (candle/rayon); default: all cores.
    #[serde(default)]
    pub threads: Option<usize>,
    #[serde(default)]
    pub eval: Eval,
    #[serde(default)]
    pub checkpoint: Checkpointing,
    /// Write a metrics line every this many steps.
    #[serde(default = "default_log_interval")]
    pub log_interval: u64,
    #[serde(default)]
    pub moe: Moe,
    #[serde(default)]
    pub trainable: Trainable,
    /// `auto` (newest valid checkpoint under `out`, if any), `never`, or a checkpoint directory.
    #[serde(default = "default_resume")]
    pub resume: String,
    /// The domain this expert trains on (recorded in `btm.json`).
    #[serde(default)]
    pub domain: Option<String>,
    /// Where tokenized data is cached; default `$BTM_CACHE/tokens` or `~/.cache/btm/tokens`.
    #[serde(default)]
    pub token_cache: Option<PathBuf>,
    /// Local working directory. When set, or when `out` is an object store (default then
    /// `$BTM_CACHE/runs/<hash of out>`), training happens here and is mirrored to `out`.
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    /// Who trains: btm itself (default), or an external engine through Hugging Face
    /// checkpoints (the `external` module).
    #[serde(default, skip_serializing_if = "Trainer::is_btm")]
    pub trainer: Trainer,
    /// Replicas of each expert (and of every other weight) that train on different data; the
    /// run has `data_parallel × expert_parallel` ranks, launched by `mpirun`/`srun`. Each rank
    /// takes `grad_accum / ranks` of a step's micro-batches, gradients are summed over ranks
    /// (see the `distributed` module).
    #[serde(default = "one_usize", skip_serializing_if = "is_one")]
    pub data_parallel: usize,
    /// Ranks over which each MoE layer's experts are split (E / expert_parallel per rank);
    /// tokens travel to their experts by all-to-all.
    #[serde(default = "one_usize", skip_serializing_if = "is_one")]
    pub expert_parallel: usize,
    /// The collective engine of a multi-rank run: `mpi` (ranks started by `mpirun` / `srun`),
    /// `nccl` (GPUs), or `tcp` (ranks started by any launcher with `RANK`, `WORLD_SIZE`,
    /// `MASTER_ADDR`, `MASTER_PORT` set, as the Kubernetes engine does).
    #[serde(default, skip_serializing_if = "is_default_backend")]
    pub collective: btm_collective::Backend,
}

fn is_one(v: &usize) -> bool {
    *v == 1
}
fn is_default_backend(b: &btm_collective::Backend) -> bool {
    *b == btm_collective::Backend::default()
}

fn one_f64() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
/// The peak learning rate of a job (and of a pipeline's phases) that gives none.
pub const DEFAULT_LR: f64 = 1e-3;
/// Validation windows scored per stream when `eval.sequences` is not given.
pub const DEFAULT_EVAL_SEQUENCES: usize = 16;
/// A metrics line every this many steps when `log_interval` is not given.
pub const DEFAULT_LOG_INTERVAL: u64 = 10;

/// The global gradient-norm clip when `grad_clip` is not given.
pub fn default_clip() -> Option<f64> {
    Some(1.0)
}
fn default_log_interval() -> u64 {
    DEFAULT_LOG_INTERVAL
}
fn default_resume() -> String {
    "auto".into()
}

/// How to resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    Auto,
    Never,
    From(PathBuf),
}

/// What the spec says about the model, read cheaply (config only) for validation.
pub struct ModelFacts {
    pub max_positions: usize,
    pub tensor_names: Vec<String>,
}

impl JobSpec {
    /// The dtype of the forward and backward passes: `float32`, or `bfloat16` (mixed
    /// precision: float32 master weights, gradients and AdamW moments; meant for GPUs; on the
    /// CPU it runs, slower than float32, without the fused kernels).
    pub fn compute_dtype(&self) -> Result<candle_core::DType> {
        match self.dtype {
            crate::device::DType::Float16 => {
                bail!("`float16`: training in float16 needs loss scaling, which btm does not do; use bfloat16")
            }
            d => Ok(d.candle()),
        }
    }

    /// Parse YAML; relative paths are resolved against `base`.
    pub fn parse(yaml: &str, base: &Path) -> Result<Self> {
        let mut spec: JobSpec = btm_model::yaml::from_str(yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
        spec.resolve_paths(base);
        Ok(spec)
    }

    /// Read, parse and validate a job file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = btm_model::yaml::read_to_string(path).with_context(|| format!("reading job spec {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut spec = Self::parse(&text, base).with_context(|| format!("job spec {}", path.display()))?;
        spec.fetch_inputs().with_context(|| format!("job spec {}", path.display()))?;
        spec.validate().with_context(|| format!("job spec {}", path.display()))?;
        Ok(spec)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !btm_model::folder::is_remote(&p.to_string_lossy()) {
                *p = base.join(&*p);
            }
        };
        let fix_location = |s: &mut String| {
            let is_url = s.split_once("://").is_some_and(|(scheme, _)| scheme.len() > 1);
            if !is_url && Path::new(s.as_str()).is_relative() {
                *s = base.join(s.as_str()).to_string_lossy().into_owned();
            }
        };
        if let Some(c) = &mut self.init.checkpoint {
            fix_location(c);
        }
        if let Some(c) = &mut self.init.config {
            fix(c);
        }
        if let Some(t) = &mut self.init.tokenizer {
            fix(t);
        }
        fix_location(&mut self.out);
        for s in &mut self.data.train {
            fix(&mut s.path);
        }
        for p in &mut self.data.valid {
            fix(p);
        }
        if let Some(p) = &mut self.token_cache {
            fix(p);
        }
        if let Some(p) = &mut self.work_dir {
            fix(p);
        }
        if !matches!(self.resume.as_str(), "auto" | "never") {
            fix_location(&mut self.resume);
        }
    }

    /// Replace input files given as object-store URLs (config, tokenizer, data) by local
    /// copies in the cache: a worker shares no filesystem with the orchestrator.
    pub fn fetch_inputs(&mut self) -> Result<()> {
        let fetch = |key: &str, p: &mut PathBuf| -> Result<()> {
            let s = p.to_string_lossy().into_owned();
            if btm_model::folder::is_remote(&s) {
                *p = btm_model::folder::fetch_file(&s).with_context(|| key.to_string())?;
            }
            Ok(())
        };
        if let Some(p) = &mut self.init.config {
            fetch("init.config", p)?;
        }
        if let Some(p) = &mut self.init.tokenizer {
            fetch("init.tokenizer", p)?;
        }
        // Training text in an object store is streamed or read by ranges ([`crate::sources`]);
        // an indexed dataset is memory-mapped, so it needs its `.idx` and `.bin` locally.
        for (i, s) in self.data.train.iter_mut().enumerate() {
            if s.format() == crate::sources::Format::Indexed {
                fetch(&format!("data.train[{i}]"), &mut s.path)?;
            }
        }
        for (i, p) in self.data.valid.iter_mut().enumerate() {
            fetch(&format!("data.valid[{i}]"), p)?;
        }
        Ok(())
    }

    pub fn resume_mode(&self) -> Resume {
        match self.resume.as_str() {
            "auto" => Resume::Auto,
            "never" => Resume::Never,
            p => Resume::From(btm_model::storage::local_dir(p).unwrap_or_else(|_| PathBuf::from(p))),
        }
    }

    fn out_is_remote(&self) -> bool {
        self.out.split_once("://").is_some_and(|(scheme, _)| scheme.len() > 1 && scheme != "file")
    }

    /// The local directory training writes to: `work_dir`, else `out` itself when it is local.
    pub fn out_dir(&self) -> Result<PathBuf> {
        if let Some(w) = &self.work_dir {
            return Ok(w.clone());
        }
        if self.out_is_remote() {
            let key = hex::encode(sha2::Sha256::digest(self.out.trim_end_matches('/').as_bytes()));
            return Ok(btm_model::folder::cache_root().join("runs").join(&key[..24]));
        }
        Ok(btm_model::storage::local_dir(&self.out)?)
    }

    /// The URL the run is mirrored to, when it is not written in place.
    pub fn mirror_url(&self) -> Result<Option<String>> {
        if self.work_dir.is_none() && !self.out_is_remote() {
            return Ok(None);
        }
        if self.out.split_once("://").is_some_and(|(s, _)| s.len() > 1) {
            return Ok(Some(self.out.clone()));
        }
        let abs = std::path::absolute(&self.out).with_context(|| format!("out: {}", self.out))?;
        let url = url::Url::from_directory_path(&abs).map_err(|_| anyhow::anyhow!("out: {} is not a usable path", abs.display()))?;
        Ok(Some(url.to_string()))
    }

    /// Processes of the run: `data_parallel × expert_parallel`.
    pub fn ranks(&self) -> usize {
        self.data_parallel * self.expert_parallel
    }

    /// Sequences per optimizer step.
    pub fn sequences_per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }

    pub fn tokens_per_step(&self) -> u64 {
        (self.sequences_per_step() * self.seq_len) as u64
    }

    /// Total optimizer steps (from `steps`, or from the `tokens` budget).
    pub fn total_steps(&self) -> u64 {
        match (self.steps, self.tokens) {
            (Some(s), _) => s,
            (None, Some(t)) => t.div_ceil(self.tokens_per_step()),
            (None, None) => 0,
        }
    }

    /// Read the model's config (not its weights) for validation.
    pub fn model_facts(&self) -> Result<ModelFacts> {
        let config_path = match (&self.init.checkpoint, &self.init.config) {
            (Some(c), _) => btm_model::storage::local_dir(c)?.join("config.json"),
            (None, Some(c)) => c.clone(),
            (None, None) => bail!("init: give `checkpoint`, or `config` and `tokenizer`"),
        };
        let json = btm_model::error::read_json(&config_path)?;
        let (cfg, _) = btm_model::ModelConfig::from_hf(&json)?;
        Ok(ModelFacts {
            max_positions: cfg.max_position_embeddings,
            tensor_names: btm_model::weights::expected_tensors(&cfg).into_iter().map(|t| t.name).collect(),
        })
    }

    /// Check everything that can be checked before work starts; errors name the key path.
    /// Section by section, in the order the first error is reported.
    pub fn validate(&self) -> Result<()> {
        self.moe.capacity()?;
        self.check_init_and_out()?;
        self.check_length()?;
        self.check_optimizer_and_schedule()?;
        self.check_moe()?;
        self.check_runtime()?;
        self.check_distributed()?;
        self.check_cadence()?;
        self.check_data()?;
        self.check_resume()?;
        self.check_model()
    }

    /// Whether `init.checkpoint` is in an object store (checked when it is fetched, not here).
    fn init_is_remote(&self) -> bool {
        self.init.checkpoint.as_ref().is_some_and(|c| c.split_once("://").is_some_and(|(s, _)| s.len() > 1 && s != "file"))
    }

    /// `init`: a checkpoint, or a config and tokenizer, that exist; `out`: a usable place.
    fn check_init_and_out(&self) -> Result<()> {
        match (&self.init.checkpoint, &self.init.config, &self.init.tokenizer) {
            (Some(_), None, None) | (None, Some(_), Some(_)) => {}
            (Some(_), _, _) => return fail("init", "give either `checkpoint` or `config` + `tokenizer`, not both".into()),
            (None, _, _) => return fail("init", "give `checkpoint`, or `config` and `tokenizer` to train from scratch".into()),
        }
        if let Some(c) = &self.init.checkpoint {
            if !self.init_is_remote() {
                let dir = btm_model::storage::local_dir(c)?;
                if !dir.join("config.json").is_file() {
                    return fail("init.checkpoint", format!("{}: no config.json there", dir.display()));
                }
            }
        }
        for (key, p) in [("init.config", &self.init.config), ("init.tokenizer", &self.init.tokenizer)] {
            if let Some(p) = p {
                check_file(key, p)?;
            }
        }
        self.out_dir()?;
        if let Some(url) = self.mirror_url()? {
            let parsed = url::Url::parse(&url).with_context(|| format!("out: `{url}`"))?;
            btm_model::storage::store_for(&parsed).context("out")?;
        }
        Ok(())
    }

    /// `steps` or `tokens`, and the batch shape: all positive.
    fn check_length(&self) -> Result<()> {
        match (self.steps, self.tokens) {
            (Some(_), Some(_)) => return fail("steps", "give `steps` or `tokens`, not both".into()),
            (None, None) => return fail("steps", "missing: give `steps` or a `tokens` budget".into()),
            (Some(0), _) => return fail("steps", "must be positive".into()),
            (_, Some(0)) => return fail("tokens", "must be positive".into()),
            _ => {}
        }
        for (key, v) in [("batch_size", self.batch_size), ("seq_len", self.seq_len), ("grad_accum", self.grad_accum)] {
            if v == 0 {
                return fail(key, "must be positive".into());
            }
        }
        Ok(())
    }

    /// AdamW's settings, the schedule's floor, and the gradient clip.
    fn check_optimizer_and_schedule(&self) -> Result<()> {
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return fail("optimizer.lr", format!("must be positive, got {}", o.lr));
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return fail(&format!("optimizer.betas[{i}]"), format!("must be in [0, 1), got {b}"));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return fail("optimizer.eps", format!("must be positive, got {}", o.eps));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return fail("optimizer.weight_decay", format!("must be non-negative, got {}", o.weight_decay));
        }
        let s = &self.schedule;
        if !(s.min_lr.is_finite() && s.min_lr >= 0.0 && s.min_lr <= o.lr) {
            return fail("schedule.min_lr", format!("must be between 0 and optimizer.lr ({}), got {}", o.lr, s.min_lr));
        }
        if let Some(c) = self.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return fail("grad_clip", format!("must be positive (or null for no clipping), got {c}"));
            }
        }
        Ok(())
    }

    /// The MoE losses' coefficients, and the router guard with its guarded sources.
    fn check_moe(&self) -> Result<()> {
        let guard = self.moe.router_guard.iter().flat_map(|g| [("moe.router_guard.margin", g.margin), ("moe.router_guard.coef", g.coef)]);
        for (key, v) in [("moe.aux_loss_coef", self.moe.aux_loss_coef), ("moe.z_loss_coef", self.moe.z_loss_coef)].into_iter().chain(guard)
        {
            if !(v.is_finite() && v >= 0.0) {
                return fail(key, format!("must be non-negative, got {v}"));
            }
        }
        if let Some(g) = &self.moe.router_guard {
            if g.experts.is_empty() {
                return fail("moe.router_guard.experts", "name at least one expert".into());
            }
            if !self.data.train.iter().any(|s| s.guarded) {
                return fail("moe.router_guard", "no data.train source is `guarded`: the guard has no tokens to keep out".into());
            }
        } else if let Some(i) = self.data.train.iter().position(|s| s.guarded) {
            return fail(&format!("data.train[{i}].guarded"), "needs moe.router_guard (which experts to keep out)".into());
        }
        Ok(())
    }

    /// The dtype and CPU threads.
    fn check_runtime(&self) -> Result<()> {
        if let Err(e) = self.compute_dtype() {
            return fail("dtype", format!("{e}"));
        }
        if self.threads == Some(0) {
            return fail("threads", "must be positive".into());
        }
        Ok(())
    }

    /// The ranks, their share of the micro-batches, the trainer that runs them and the
    /// collective that suits the device.
    fn check_distributed(&self) -> Result<()> {
        for (key, v) in [("data_parallel", self.data_parallel), ("expert_parallel", self.expert_parallel)] {
            if v == 0 {
                return fail(key, "must be at least 1".into());
            }
        }
        if self.ranks() > 1 {
            if !self.grad_accum.is_multiple_of(self.ranks()) {
                return fail(
                    "grad_accum",
                    format!(
                        "{} is not a multiple of the {} ranks (data_parallel {} × expert_parallel {}): each rank takes an equal share of a step's micro-batches",
                        self.grad_accum,
                        self.ranks(),
                        self.data_parallel,
                        self.expert_parallel
                    ),
                );
            }
            if !self.trainer.is_btm() {
                return fail("data_parallel", "an external trainer is launched by its own command; give it its ranks there".into());
            }
            if matches!(self.collective, btm_collective::Backend::Mpi | btm_collective::Backend::Tcp)
                && self.device != crate::device::Device::Cpu
            {
                return fail(
                    "collective",
                    format!("{} sums host memory; for `device: cuda` give `collective: nccl`", self.collective.as_str()),
                );
            }
        }
        if self.collective == btm_collective::Backend::Nccl && self.device != crate::device::Device::Cuda {
            return fail("collective", format!("nccl moves GPU memory; `device: {}` needs `collective: mpi`", self.device));
        }
        Ok(())
    }

    /// Logging, checkpointing and validation intervals and sizes.
    fn check_cadence(&self) -> Result<()> {
        if self.log_interval == 0 {
            return fail("log_interval", "must be positive".into());
        }
        if self.checkpoint.keep == 0 {
            return fail("checkpoint.keep", "must be at least 1".into());
        }
        if self.eval.sequences == 0 && !self.data.valid.is_empty() {
            return fail("eval.sequences", "must be positive when validation data is given".into());
        }
        Ok(())
    }

    /// `data`: sources that exist and that the trainer can read, with positive weights.
    fn check_data(&self) -> Result<()> {
        if self.data.train.is_empty() {
            return fail("data.train", "needs at least one source".into());
        }
        for (i, src) in self.data.train.iter().enumerate() {
            let key = format!("data.train[{i}].path");
            match src.format() {
                _ if btm_model::folder::is_remote(&src.location()) => {}
                crate::sources::Format::Parquet => {
                    for f in crate::sources::parquet_files(&src.location()).with_context(|| key.clone())? {
                        check_file(&key, Path::new(&f))?;
                    }
                }
                _ => check_file(&key, &src.path)?,
            }
            if src.text_key.as_deref().is_some_and(str::is_empty) {
                return fail(&format!("data.train[{i}].text_key"), "must not be empty".into());
            }
            // An external trainer is handed the files themselves: JSONL with `text` is its contract.
            if !self.trainer.is_btm()
                && (src.format() != crate::sources::Format::Jsonl || src.text_key() != crate::sources::DEFAULT_TEXT_KEY)
            {
                return fail(
                    &format!("data.train[{i}]"),
                    "an external trainer is handed JSONL files with a `text` field; convert this source, or train it with btm".into(),
                );
            }
            if !(src.weight.is_finite() && src.weight > 0.0) {
                return fail(&format!("data.train[{i}].weight"), format!("must be positive, got {}", src.weight));
            }
        }
        for (i, p) in self.data.valid.iter().enumerate() {
            check_file(&format!("data.valid[{i}]"), p)?;
        }
        Ok(())
    }

    /// A `resume` directory that exists.
    fn check_resume(&self) -> Result<()> {
        if let Resume::From(dir) = self.resume_mode() {
            if !dir.is_dir() {
                return fail("resume", format!("{}: no such checkpoint directory", dir.display()));
            }
        }
        Ok(())
    }

    /// The model (when it is local): a sequence length it can hold, and `trainable` patterns
    /// that match its tensors.
    fn check_model(&self) -> Result<()> {
        if self.init_is_remote() {
            return Ok(());
        }
        let facts = self.model_facts().context("init")?;
        if self.seq_len > facts.max_positions {
            return fail(
                "seq_len",
                format!("{} is longer than the model's max_position_embeddings ({})", self.seq_len, facts.max_positions),
            );
        }
        self.check_trainable(&facts.tensor_names)
    }

    /// Every pattern must match at least one tensor, and something must train.
    pub fn check_trainable(&self, names: &[String]) -> Result<()> {
        for (key, list) in [("trainable.include", &self.trainable.include), ("trainable.exclude", &self.trainable.exclude)] {
            for (i, p) in list.iter().enumerate() {
                let (p, _) = split_rows(p).with_context(|| format!("{key}[{i}]"))?;
                if !names.iter().any(|n| glob(p, n)) {
                    bail!("{key}[{i}]: `{p}` matches no tensor of the model (names look like `model.layers.0.mlp.gate.weight`)");
                }
            }
        }
        if !names.iter().any(|n| self.trainable.selects(n)) {
            bail!("trainable: selects no tensor, so nothing would train");
        }
        Ok(())
    }
}

/// A validation error: the key path, then why.
fn fail(key: &str, why: String) -> Result<()> {
    bail!("{key}: {why}")
}

fn check_file(key: &str, p: &Path) -> Result<()> {
    match std::fs::metadata(p) {
        Err(_) => bail!("{key}: {}: file not found", p.display()),
        Ok(m) if !m.is_file() => bail!("{key}: {}: not a file", p.display()),
        Ok(m) if m.len() == 0 => bail!("{key}: {}: file is empty", p.display()),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_dotted_names() {
        assert!(glob("*.mlp.gate.weight", "model.layers.3.mlp.gate.weight"));
        assert!(!glob("*.mlp.gate.weight", "model.layers.3.mlp.gate_proj.weight"));
        assert!(glob("*.mlp.experts.4.*", "model.layers.0.mlp.experts.4.up_proj.weight"));
        assert!(!glob("*.mlp.experts.4.*", "model.layers.0.mlp.experts.14.up_proj.weight"));
        assert!(glob("lm_head.weight", "lm_head.weight"));
        assert!(glob("*", "anything"));
        assert!(!glob("a*b*c", "acb"));
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let yaml =
            "init: {checkpoint: x}\nout: o\ndata:\n  train:\n    - {path: a.jsonl, wieght: 2}\nsteps: 1\nbatch_size: 1\nseq_len: 8\n";
        let err = JobSpec::parse(yaml, Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("data.train[0]: unknown field `wieght`"), "{err}");
        let err = JobSpec::parse("init: {checkpoint: x}\nout: o\noptimiser: {}\n", Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("unknown field `optimiser`"), "{err}");
    }

    /// An external trainer is handed the source files: JSONL with `text` only.
    #[test]
    fn external_trainers_take_jsonl_with_text_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a.jsonl");
        std::fs::write(&data, "{\"body\": \"x\"}\n").unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/llama");
        let yaml = format!(
            "init: {{checkpoint: {}}}\nout: o\ndata: {{train: [{{path: {}, text_key: body}}]}}\nsteps: 1\nbatch_size: 1\nseq_len: 8\n\
             trainer: {{kind: command, command: \"true\"}}\n",
            fixture.display(),
            data.display()
        );
        let spec = JobSpec::parse(&yaml, dir.path()).unwrap();
        let err = format!("{:#}", spec.validate().unwrap_err());
        assert!(err.contains("data.train[0]") && err.contains("an external trainer is handed JSONL"), "{err}");
        let plain = JobSpec::parse(&yaml.replace(", text_key: body", ""), dir.path()).unwrap();
        assert!(plain.validate().is_ok());
    }

    /// The router guard and its guarded sources come together; each alone is a named error.
    #[test]
    fn a_router_guard_needs_guarded_sources_and_they_need_it() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/llama");
        let base = format!("init: {{checkpoint: {}}}\nout: o\nsteps: 1\nbatch_size: 1\nseq_len: 8\n", fixture.display());
        let dir = tempfile::tempdir().unwrap();
        for f in ["a", "b"] {
            std::fs::write(dir.path().join(f), "{\"text\": \"x\"}\n").unwrap();
        }
        let check = |extra: &str| JobSpec::parse(&format!("{base}{extra}"), dir.path()).unwrap().validate().map_err(|e| format!("{e:#}"));
        let both = "data: {train: [{path: a}, {path: b, guarded: true}]}\nmoe: {router_guard: {experts: [3]}}\n";
        assert_eq!(check(both), Ok(()));
        let err = check("data: {train: [{path: a}]}\nmoe: {router_guard: {experts: [3]}}\n").unwrap_err();
        assert!(err.contains("moe.router_guard: no data.train source is `guarded`"), "{err}");
        let err = check("data: {train: [{path: a}, {path: b, guarded: true}]}\n").unwrap_err();
        assert!(err.contains("data.train[1].guarded: needs moe.router_guard"), "{err}");
        let err = check(&both.replace("[3]}", "[3], margin: -1}")).unwrap_err();
        assert!(err.contains("moe.router_guard.margin: must be non-negative"), "{err}");
    }

    /// A settings block may give any subset of its keys; the rest are its `Default`'s, and an
    /// unknown key is still an error.
    #[test]
    fn partial_settings_blocks_take_the_rest_from_their_defaults() {
        let base = "init: {checkpoint: x}\nout: o\ndata: {train: [{path: a}]}\nsteps: 1\nbatch_size: 1\nseq_len: 8\n";
        let spec = JobSpec::parse(
            &format!(
                "{base}optimizer: {{lr: 0.01}}\nschedule: {{warmup_steps: 5}}\neval: {{interval: 3}}\ncheckpoint: {{keep: 4}}\n\
                 moe: {{z_loss_coef: 0.5}}\n"
            ),
            Path::new("/base"),
        )
        .unwrap();
        assert_eq!(spec.optimizer, Optimizer { lr: 0.01, ..Optimizer::default() });
        assert_eq!(spec.schedule, Schedule { warmup_steps: 5, ..Schedule::default() });
        assert_eq!(spec.eval, Eval { interval: 3, ..Eval::default() });
        assert_eq!(spec.checkpoint, Checkpointing { keep: 4, ..Checkpointing::default() });
        assert_eq!(spec.moe, Moe { z_loss_coef: 0.5, ..Moe::default() });
        // The defaults themselves, as job files have always read them.
        let d = JobSpec::parse(base, Path::new("/base")).unwrap();
        assert_eq!((d.optimizer.lr, d.optimizer.betas, d.optimizer.eps, d.optimizer.weight_decay), (1e-3, [0.9, 0.95], 1e-8, 0.1));
        assert_eq!((d.schedule.warmup_steps, d.schedule.decay, d.schedule.min_lr), (0, Decay::Cosine, 0.0));
        assert_eq!((d.eval.interval, d.eval.sequences, d.checkpoint.interval, d.checkpoint.keep), (0, 16, 0, 2));
        assert_eq!(
            (d.moe.aux_loss_coef, d.moe.z_loss_coef, d.moe.capacity_factor, d.moe.router_guard.is_none()),
            (0.01, 0.001, None, true)
        );
        let yaml = serde_yaml::to_string(&d).unwrap();
        assert_eq!(JobSpec::parse(&yaml, Path::new("/base")).unwrap(), d);
        let err = JobSpec::parse(&format!("{base}schedule: {{min_lr: 0, warmup: 3}}\n"), Path::new("/base")).unwrap_err().to_string();
        assert!(err.contains("unknown field `warmup`"), "{err}");
    }

    #[test]
    fn token_budget_rounds_up_to_whole_steps() {
        let yaml = "init: {checkpoint: x}\nout: o\ndata: {train: [{path: a}]}\ntokens: 1000\nbatch_size: 2\nseq_len: 16\ngrad_accum: 3\n";
        let spec = JobSpec::parse(yaml, Path::new("/base")).unwrap();
        assert_eq!(spec.total_steps(), 11); // 96 tokens a step
        assert_eq!(spec.data.train[0].path, PathBuf::from("/base/a"));
        assert_eq!(spec.out, "/base/o");
    }

    /// `btm train --job` reads job files with the same bounds as pipelines: a long anchored
    /// list aliased many times is refused by name, before anything is built.
    #[test]
    fn job_files_are_read_with_the_yaml_bounds() {
        let list = vec!["a.jsonl"; 2000].join(", ");
        let text = format!(
            "init: {{checkpoint: x}}\nout: o\ndata: {{train: [{{path: a}}], valid: &v [{list}]}}\nsteps: 1\nbatch_size: 1\n\
             seq_len: 8\nextra: [{}]\n",
            vec!["*v"; 1000].join(", ")
        );
        let err = JobSpec::parse(&text, Path::new("/base")).unwrap_err().to_string();
        assert!(err.contains("once aliases are expanded"), "{err}");
    }
}
