//! The training loop.
//!
//! ```text
//! set up: validate the spec → tokenize (cached) → weights from the newest valid checkpoint
//!         under <out>/checkpoints, else from `init` → AdamW (moments restored on resume)
//! each step: lr = schedule(step)
//!            for each of grad_accum micro-batches: loss = CE (+ aux/z for MoE, + the router
//!            guard's penalty when an added expert trains in place) → backward,
//!            gradients summed (each micro-batch loss divided by grad_accum)
//!            clip to the global norm → AdamW update
//!            log / validate / checkpoint at their intervals; stop cleanly on SIGINT/SIGTERM
//! at the end: a final checkpoint and <out>/model (the weights in Hugging Face layout)
//! ```
//!
//! All randomness is a function of (seed, step or sample index), so a resumed run is
//! bit-identical to one that never stopped (on the same machine and thread count).

use crate::checkpoint::{self, TrainerState};
use crate::data::{tokenize_source, Mixture, Packed, Position, TokenizerInfo, Tokens};
use crate::distributed::Ranks;
use crate::loss::cross_entropy;
use crate::metrics::{human_duration, Metrics};
use crate::optim::{clip_scale, AdamW};
use crate::outcome::{trained_lineage, Outcome};
use crate::remote::Mirror;
use crate::schedule::Schedule;
use crate::signals::StopFlag;
use crate::sources::Format;
use crate::spec::{self, JobSpec, Resume};
use crate::state::Weights;
use anyhow::{bail, Context, Result};
use btm_model::model::Trace;
use btm_model::weights::expected_tensors;
use btm_model::{Checkpoint, Extras, ModelConfig, Transformer, WriteOptions};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Called after each published checkpoint with its step and directory.
pub type CheckpointHook = Box<dyn FnMut(u64, &Path)>;

/// What the caller can add to a run.
#[derive(Default)]
pub struct Options {
    /// Stop (with a checkpoint) when this is raised; see [`crate::signals::install`].
    pub stop: StopFlag,
    /// No progress lines on stderr.
    pub quiet: bool,
    pub on_checkpoint: Option<CheckpointHook>,
}

/// A mean next-token loss and the tokens it is over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanLoss {
    pub loss: f64,
    pub tokens: u64,
}

/// Validation: mean next-token loss over the first `sequences` windows of each stream; overall,
/// and per stream (in order).
pub fn evaluate(
    model: &Transformer,
    valid: &[Packed],
    sequences: usize,
    batch: usize,
    device: &Device,
) -> Result<(MeanLoss, Vec<MeanLoss>)> {
    let mean = |nll: f64, tokens: u64| MeanLoss { loss: if tokens == 0 { f64::NAN } else { nll / tokens as f64 }, tokens };
    let (mut nll, mut tokens) = (0f64, 0u64);
    let mut per_stream = Vec::with_capacity(valid.len());
    for src in valid {
        let n = sequences.min(src.num_sequences());
        let ids: Vec<Vec<u32>> = (0..n).map(|i| src.sequence(i)).collect();
        let (mut stream_nll, mut stream_tokens) = (0f64, 0u64);
        for chunk in ids.chunks(batch.max(1)) {
            let (inputs, targets) = to_batch(chunk, device)?;
            let logits = model.forward(&inputs)?;
            let loss = cross_entropy(&logits, &targets)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let count = targets.elem_count() as u64;
            nll += loss * count as f64;
            tokens += count;
            stream_nll += loss * count as f64;
            stream_tokens += count;
        }
        per_stream.push(mean(stream_nll, stream_tokens));
    }
    Ok((mean(nll, tokens), per_stream))
}

/// A validation pass: its step and, per validation file, the file's name and score.
#[derive(Debug, Clone)]
struct Validation {
    step: u64,
    data: Vec<(String, MeanLoss)>,
}

/// How a validation file is named in metrics and model cards: its last two path components
/// (`scripture/valid.jsonl`), which name the domain in btm's layouts.
fn validation_name(location: &str) -> String {
    let parts: Vec<&str> = location.trim_end_matches('/').rsplit('/').take(2).collect();
    parts.into_iter().rev().collect::<Vec<_>>().join("/")
}

/// Sequences of T + 1 tokens → inputs [B, T] and targets [B, T].
pub fn to_batch(seqs: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
    let t = seqs[0].len() - 1;
    let mut inputs = Vec::with_capacity(seqs.len() * t);
    let mut targets = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        inputs.extend_from_slice(&s[..t]);
        targets.extend_from_slice(&s[1..]);
    }
    Ok((Tensor::from_vec(inputs, (seqs.len(), t), device)?, Tensor::from_vec(targets, (seqs.len(), t), device)?))
}

/// A job's [`spec::RouterGuard`] on its model: the guarded experts and the others, as indices.
struct ResolvedGuard {
    experts: Vec<u32>,
    others: Vec<u32>,
    margin: f64,
    coef: f64,
}

/// One micro-batch: inputs and targets [B, T], and with a router guard
/// ([`spec::RouterGuard`]) which of its B·T tokens are guarded (1.0) and which are not (0.0).
#[derive(Debug, Clone)]
pub struct MicroBatch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub guarded: Option<Tensor>,
}

impl From<(Tensor, Tensor)> for MicroBatch {
    fn from((inputs, targets): (Tensor, Tensor)) -> Self {
        Self { inputs, targets, guarded: None }
    }
}

/// The router guard's token mask [B·T] of a micro-batch whose sequences came from `sources`
/// (indices into `train`): 1.0 for the tokens of `guarded` sources.
fn guarded_tokens(sources: &[usize], train: &[spec::Source], seq_len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = sources.iter().flat_map(|&s| std::iter::repeat_n(if train[s].guarded { 1.0 } else { 0.0 }, seq_len)).collect();
    Ok(Tensor::from_vec(mask, sources.len() * seq_len, device)?)
}

/// The router guard's penalty ([`spec::RouterGuard`]) on one layer's router logits [T, E]: the
/// mean over guarded tokens (`mask` [T], 1.0 or 0.0) of Σ_g max(0, ℓ_g − t_k + margin)² over the
/// guarded experts g, t_k the token's k-th largest logit among the `others` (held fixed: the
/// bound is the old routing's, not something the new row may push down). Also the number of
/// guarded tokens whose top-k includes a guarded expert (some ℓ_g above t_k).
pub fn router_guard_penalty(
    logits: &Tensor,
    guarded_experts: &[u32],
    others: &[u32],
    k: usize,
    margin: f64,
    mask: &Tensor,
) -> Result<(Tensor, f64)> {
    let device = logits.device();
    let mask = mask.flatten_all()?.to_dtype(DType::F32)?;
    let count = (mask.sum_all()?.to_scalar::<f32>()? as f64).max(1.0);
    let old = logits.detach().index_select(&Tensor::new(others, device)?, 1)?;
    let kth = old.sort_last_dim(false)?.0.narrow(1, k - 1, 1)?;
    let over_kth = logits.index_select(&Tensor::new(guarded_experts, device)?, 1)?.broadcast_sub(&kth)?;
    let hinge = (&over_kth + margin)?.relu()?.sqr()?.sum(1)?;
    let penalty = ((hinge * &mask)?.sum_all()? / count)?;
    let inside = over_kth.max(1)?.gt(0f32)?.to_dtype(DType::F32)?;
    let leaked = (inside * &mask)?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((penalty, leaked))
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Default)]
pub struct StepStats {
    /// Mean cross-entropy over the micro-batches.
    pub loss: f64,
    pub aux_loss: Option<f64>,
    pub z_loss: Option<f64>,
    /// The router guard's penalty (without its coefficient; mean over the MoE layers).
    pub guard_loss: Option<f64>,
    /// Guarded tokens whose top-k includes a guarded expert, and guarded tokens, both counted
    /// once per MoE layer.
    pub guard_leaked: f64,
    pub guard_tokens: f64,
    /// Per MoE layer, the share of assignments each expert got (mean over micro-batches).
    pub expert_load: Vec<Vec<f32>>,
    /// Per MoE layer, the share of assignments dropped by the capacity limit.
    pub dropped: Vec<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Wall seconds of the step's phases: forward and loss, backward (with gradient
    /// accumulation over micro-batches), clipping and the optimizer update.
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

impl StepStats {
    /// The step's metrics line (MoE models add the router losses and each layer's expert load).
    fn record(&self, step: u64, lr: f64, tokens_per_s: f64, tokens_seen: u64) -> serde_json::Value {
        let mut rec = json!({
            "step": step, "loss": self.loss, "lr": lr, "grad_norm": self.grad_norm,
            "tokens_per_s": tokens_per_s, "tokens_seen": tokens_seen,
        });
        if let (Some(aux), Some(z)) = (self.aux_loss, self.z_loss) {
            rec["aux_loss"] = json!(aux);
            rec["z_loss"] = json!(z);
            rec["expert_load"] = json!(self.expert_load);
            rec["dropped"] = json!(self.dropped);
        }
        if let Some(loss) = self.guard_loss {
            rec["guard_loss"] = json!(loss);
            // The share of the step's guarded tokens (over the MoE layers) whose top-k includes
            // a guarded expert; absent when the step drew none.
            if self.guard_tokens > 0.0 {
                rec["guard_leak"] = json!(self.guard_leaked / self.guard_tokens);
            }
        }
        rec
    }
}

/// The model, its optimizer and the loss settings: one optimizer step at a time.
pub struct Stepper {
    pub weights: Weights,
    /// The model the forward and backward passes run, in `compute_dtype`; always up to date
    /// with the master weights.
    pub model: Transformer,
    pub opt: AdamW,
    pub aux_coef: f64,
    pub z_coef: f64,
    router_guard: Option<ResolvedGuard>,
    pub grad_clip: Option<f64>,
    /// Float32, or bfloat16 for mixed precision: bfloat16 weights and activations in the
    /// forward and backward passes, float32 master weights, gradients and AdamW moments.
    compute_dtype: DType,
    capacity: Option<btm_kernels::Capacity>,
    /// The other processes of a multi-process run ([`crate::distributed`]).
    ranks: Ranks,
}

impl Stepper {
    pub fn new(weights: Weights, optimizer: &spec::Optimizer, moe: &spec::Moe, grad_clip: Option<f64>) -> Result<Self> {
        let capacity = moe.capacity()?;
        let mut model = weights.model()?;
        model.set_moe_capacity(capacity);
        let mut opt = AdamW::new(weights.trainable.clone(), optimizer)?;
        for (name, ranges) in &weights.masks {
            opt.set_mask(name, ranges.clone())?;
        }
        let router_guard = match &moe.router_guard {
            None => None,
            Some(g) => {
                let Some(m) = &weights.config.moe else {
                    bail!("moe.router_guard: the model is dense; the guard keeps experts of an MoE out of the top-k")
                };
                if let Some(e) = g.experts.iter().find(|&&e| e >= m.experts) {
                    bail!("moe.router_guard.experts: expert {e} is out of range (the model has {} experts)", m.experts);
                }
                let others: Vec<u32> = (0..m.experts).filter(|e| !g.experts.contains(e)).map(|e| e as u32).collect();
                if others.len() < m.top_k {
                    bail!("moe.router_guard.experts: {} unguarded experts cannot fill a top-{}", others.len(), m.top_k);
                }
                Some(ResolvedGuard { experts: g.experts.iter().map(|&e| e as u32).collect(), others, margin: g.margin, coef: g.coef })
            }
        };
        Ok(Self {
            weights,
            model,
            opt,
            aux_coef: moe.aux_loss_coef,
            z_coef: moe.z_loss_coef,
            router_guard,
            grad_clip,
            compute_dtype: DType::F32,
            capacity,
            ranks: Ranks::single(),
        })
    }

    /// Train as one rank of a multi-process run: gradients, statistics and the
    /// load-balancing counts are summed over `ranks` (the weights' shard must be its own).
    pub fn set_ranks(&mut self, ranks: Ranks) {
        self.ranks = ranks;
    }

    /// Run the forward and backward passes in `dtype` (float32, or bfloat16 for mixed
    /// precision); master weights, gradients and optimizer state stay float32.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        self.compute_dtype = dtype;
        self.refresh_model()
    }

    /// Rebuild the compute-dtype model from the master weights (a float32 model shares them
    /// and needs nothing).
    fn refresh_model(&mut self) -> Result<()> {
        if self.compute_dtype != DType::F32 {
            self.model = self.weights.model_in(self.compute_dtype)?;
            self.model.set_moe_capacity(self.capacity);
        }
        Ok(())
    }

    /// Forward and backward over `micro_batches` (inputs, targets), then one AdamW update at `lr`.
    /// In a multi-process run these are this rank's share; every rank has as many.
    pub fn step(&mut self, micro_batches: &[MicroBatch], lr: f64) -> Result<StepStats> {
        // Each micro-batch's loss is divided by the step's number of micro-batches on all ranks.
        let n = (micro_batches.len() * self.ranks.world()) as f64;
        let mut grads: Vec<Option<Tensor>> = vec![None; self.opt.params.len()];
        let mut stats = StepStats::default();
        let (mut aux_sum, mut z_sum) = (0f64, 0f64);
        for MicroBatch { inputs, targets, guarded } in micro_batches {
            let started = Instant::now();
            let mut trace = Trace::default();
            let logits = self.model.forward_rows(inputs, &mut trace)?;
            let ce = cross_entropy(&logits, targets)?;
            stats.loss += ce.to_dtype(DType::F64)?.to_scalar::<f64>()? / n;
            let mut loss = ce;
            if !trace.router.is_empty() {
                let (aux, z) = self.router_losses(&trace.router, &mut stats, n)?;
                aux_sum += aux.to_dtype(DType::F64)?.to_scalar::<f64>()? / n;
                z_sum += z.to_dtype(DType::F64)?.to_scalar::<f64>()? / n;
                loss = ((loss + (aux * self.aux_coef)?)? + (z * self.z_coef)?)?;
                if let (Some(guard), Some(guarded)) = (&self.router_guard, guarded) {
                    let (penalty, leaked, tokens) = self.router_guard_loss(&trace.router, guarded)?;
                    *stats.guard_loss.get_or_insert(0.0) += penalty.to_dtype(DType::F64)?.to_scalar::<f64>()? / n;
                    stats.guard_leaked += leaked;
                    stats.guard_tokens += tokens;
                    loss = (loss + (penalty * guard.coef)?)?;
                }
            }
            let loss = if n > 1.0 { (loss / n)? } else { loss };
            let backward_started = Instant::now();
            stats.forward_s += (backward_started - started).as_secs_f64();
            let store = loss.backward()?;
            for (slot, p) in grads.iter_mut().zip(&self.opt.params) {
                // A tensor the batch never reached (an expert no token chose) gets no gradient.
                if let Some(g) = store.get(p.var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        None => g.clone(),
                        Some(acc) => (acc + g)?,
                    });
                }
            }
            stats.backward_s += backward_started.elapsed().as_secs_f64();
        }
        let optimizer_started = Instant::now();
        if !stats.expert_load.is_empty() {
            stats.aux_loss = Some(aux_sum);
            stats.z_loss = Some(z_sum);
        }
        let mut grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&self.opt.params)
            .map(|(g, p)| match g {
                // A parameter's gradient may be a view (a transposed weight's): one copy here
                // serves the norm and the update.
                Some(g) => Ok(g.contiguous()?),
                None => Ok(p.var.as_tensor().zeros_like()?),
            })
            .collect::<Result<_>>()?;
        self.opt.mask_gradients(&mut grads)?;
        let grads = self.ranks.sum_gradients(&self.opt.params, grads)?;
        stats.grad_norm = self.ranks.global_norm(&self.opt.params, &grads)?;
        if self.ranks.world() > 1 {
            self.sum_stats(&mut stats, aux_sum, z_sum)?;
        }
        self.opt.step_scaled(&grads, lr, clip_scale(stats.grad_norm, self.grad_clip))?;
        self.refresh_model()?;
        stats.optimizer_s = optimizer_started.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// A micro-batch's router losses, each the mean over the MoE layers: the load-balancing
    /// loss (Switch Transformer, f_i over the whole round's assignments when there are several
    /// ranks) and the router z-loss (ST-MoE); each layer's expert load and dropped share are
    /// added to `stats` (divided by the step's `n` micro-batches).
    fn router_losses(&self, router: &[btm_model::model::RouterOutput], stats: &mut StepStats, n: f64) -> Result<(Tensor, Tensor)> {
        let layers = router.len() as f64;
        let mut aux = Vec::with_capacity(router.len());
        let mut z = Vec::with_capacity(router.len());
        if stats.expert_load.is_empty() {
            stats.expert_load = vec![Vec::new(); router.len()];
            stats.dropped = vec![0.0; router.len()];
        }
        let global_counts = self.global_expert_counts(router)?;
        for (l, r) in router.iter().enumerate() {
            aux.push(match &global_counts {
                None => r.load_balancing_loss()?,
                Some((counts, assignments)) => btm_kernels::load_balancing_loss_with_counts(&r.routed.probs, &counts[l], *assignments)?,
            });
            z.push(r.z_loss()?);
            stats.dropped[l] += r.dropped_fraction()? / n;
            let load = r.expert_load()?;
            let acc = &mut stats.expert_load[l];
            acc.resize(load.len(), 0.0);
            for (a, x) in acc.iter_mut().zip(load) {
                *a += x / n as f32;
            }
        }
        let aux = (Tensor::stack(&aux, 0)?.sum_all()? / layers)?;
        let z = (Tensor::stack(&z, 0)?.sum_all()? / layers)?;
        Ok((aux, z))
    }

    /// Per MoE layer, the assignments each expert got summed over all ranks, and the total
    /// per layer (so f_i in the load-balancing loss is the whole round's); `None` for one rank.
    fn global_expert_counts(&self, router: &[btm_model::model::RouterOutput]) -> Result<Option<(Vec<Vec<f32>>, f64)>> {
        if self.ranks.world() == 1 {
            return Ok(None);
        }
        let mut flat = Vec::new();
        let mut per_layer = Vec::with_capacity(router.len());
        for r in router {
            let counts = btm_kernels::router::expert_counts(&r.routed.experts, r.logits.dim(1)?)?;
            per_layer.push(counts.len());
            flat.extend(counts.iter().map(|&c| c as f64));
        }
        // The round's assignments travel in the same sum, after the counts.
        flat.push(router.first().map_or(0, |r| r.routed.experts.elem_count()) as f64);
        self.ranks.sum(&mut flat)?;
        let assignments = flat.pop().expect("pushed above");
        let mut out = Vec::with_capacity(per_layer.len());
        let mut at = 0;
        for len in per_layer {
            out.push(flat[at..at + len].iter().map(|&c| c as f32).collect());
            at += len;
        }
        Ok(Some((out, assignments)))
    }

    /// The router guard's penalty on one micro-batch, the mean over the MoE layers of
    /// [`router_guard_penalty`]; and, summed over the layers, the guarded tokens it finds in a
    /// guarded expert's top-k and the guarded tokens.
    fn router_guard_loss(&self, router: &[btm_model::model::RouterOutput], guarded: &Tensor) -> Result<(Tensor, f64, f64)> {
        let g = self.router_guard.as_ref().expect("a router guard");
        let k = self.weights.config.moe.as_ref().expect("checked: an MoE").top_k;
        let mut penalties = Vec::with_capacity(router.len());
        let mut leaked = 0.0;
        for r in router {
            let (penalty, leaked_here) = router_guard_penalty(&r.logits, &g.experts, &g.others, k, g.margin, guarded)?;
            penalties.push(penalty);
            leaked += leaked_here;
        }
        let layers = router.len() as f64;
        let tokens = guarded.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? * layers;
        Ok(((Tensor::stack(&penalties, 0)?.sum_all()? / layers)?, leaked, tokens))
    }

    /// Sum the step's figures over the ranks (each rank's are already divided by the step's
    /// number of micro-batches, so the sums are the step's means).
    fn sum_stats(&self, stats: &mut StepStats, aux_sum: f64, z_sum: f64) -> Result<()> {
        let mut v = vec![stats.loss, aux_sum, z_sum];
        v.extend(stats.dropped.iter().copied());
        for load in &stats.expert_load {
            v.extend(load.iter().map(|&x| x as f64));
        }
        // Every rank guards when one does (the spec is the same).
        v.extend(stats.guard_loss.iter().chain([&stats.guard_leaked, &stats.guard_tokens]));
        self.ranks.sum(&mut v)?;
        stats.loss = v[0];
        if stats.aux_loss.is_some() {
            stats.aux_loss = Some(v[1]);
            stats.z_loss = Some(v[2]);
        }
        let mut at = 3;
        for d in stats.dropped.iter_mut() {
            *d = v[at];
            at += 1;
        }
        for load in stats.expert_load.iter_mut() {
            for x in load.iter_mut() {
                *x = v[at] as f32;
                at += 1;
            }
        }
        for x in stats.guard_loss.iter_mut().chain([&mut stats.guard_leaked, &mut stats.guard_tokens]) {
            *x = v[at];
            at += 1;
        }
        Ok(())
    }
}

/// CPU runtime settings for training throughput, applied before any tensor work (thread
/// pools start on first use and read the environment then):
/// - the thread count for candle's matmuls and elementwise pool (`RAYON_NUM_THREADS`);
/// - candle's elementwise pool spins less before parking (`CANDLE_BARRIER_POOL_SPIN_LIMIT`,
///   unless set), so idle spinners do not take cores from the matmul threads (on a shared
///   2-core machine the tiny preset went from about 630 to 900–1250 tokens/s);
/// - glibc malloc serves every block from its heap and keeps freed memory instead of
///   mapping and unmapping each large activation, so a step's tensors do not page-fault in
///   afresh (by default a third of the run was kernel time spent zeroing new pages).
pub fn tune_runtime(threads: Option<usize>) {
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Run a training job to the end (or until stopped): one function per phase of
/// [the module's outline](self).
pub fn run(spec: &JobSpec, mut options: Options) -> Result<Outcome> {
    spec.validate()?;
    if !spec.trainer.is_btm() {
        return crate::external::run(spec, options.quiet);
    }
    tune_runtime(spec.threads);
    let job = TrainingRun::open(spec, options.quiet)?;
    let mut metrics = job.metrics(u64::MAX)?;
    let resume_from = job.resume_point(&metrics)?;
    let (mut mixture, valid) = job.load_data(&metrics)?;
    let (mut stepper, progress) = job.start(resume_from.as_ref(), &metrics)?;
    metrics = job.metrics(progress.step)?;
    job.open_tensorboard(&mut metrics, progress.step)?;
    let progress = match job.train(&mut stepper, &mut mixture, &valid, progress, &mut metrics, &mut options)? {
        Ok(done) => done,
        Err(interrupted) => return Ok(interrupted),
    };
    job.publish_model(&stepper, &progress, &mut metrics)
}

/// Where training stands: optimizer steps and tokens done, the data stream's position, and
/// the latest validation (recorded in the lineage of a checkpoint or model of its step, and so
/// in its card).
#[derive(Debug, Clone, Default)]
struct Progress {
    step: u64,
    tokens_seen: u64,
    position: Position,
    validation: Option<Validation>,
}

/// What the phases of one run share: the job, this process's place among the ranks (rank 0
/// writes metrics, checkpoints, the model and the mirror; the ranks share `out`'s directory),
/// the run's folders, and the model `init` names.
struct TrainingRun<'a> {
    spec: &'a JobSpec,
    ranks: Ranks,
    device: Device,
    out: PathBuf,
    ckpt_root: PathBuf,
    mirror: Option<Mirror>,
    quiet: bool,
    /// `init.checkpoint`'s folder; `None` when training from scratch (a seed).
    init_dir: Option<PathBuf>,
    init_config: ModelConfig,
    tokenizer_path: PathBuf,
    tok: TokenizerInfo,
}

impl<'a> TrainingRun<'a> {
    /// Join the ranks, find the folders and read the model `init` names (config and tokenizer).
    fn open(spec: &'a JobSpec, quiet: bool) -> Result<Self> {
        let device = spec.device.open()?;
        let ranks = Ranks::start(spec.data_parallel, spec.expert_parallel, spec.collective)?;
        let out = spec.out_dir()?;
        let mirror = match spec.mirror_url()? {
            Some(url) if ranks.is_root() => Some(Mirror::new(&url)?),
            _ => None,
        };
        let (init_dir, init_config, tokenizer_path) = match (&spec.init.checkpoint, &spec.init.config, &spec.init.tokenizer) {
            (Some(c), _, _) => {
                let dir = btm_model::storage::local_dir(c).with_context(|| format!("init.checkpoint: {c}"))?;
                let ckpt = Checkpoint::open(&dir).with_context(|| format!("init.checkpoint: {c}"))?;
                (Some(dir.clone()), ckpt.config.clone(), dir.join("tokenizer.json"))
            }
            (None, Some(cfg), Some(tok)) => {
                let (config, _) = ModelConfig::from_hf(&btm_model::error::read_json(cfg)?).context("init.config")?;
                (None, config, tok.clone())
            }
            _ => bail!("init: give `checkpoint`, or `config` and `tokenizer`"),
        };
        let tok = TokenizerInfo::load(&tokenizer_path, init_config.eos_token_id).context("init: tokenizer")?;
        btm_model::tokenizer::check_fits(&tok.tokenizer, init_config.vocab_size)?;
        let ckpt_root = out.join("checkpoints");
        Ok(Self { spec, ranks, device, out, ckpt_root, mirror, quiet, init_dir, init_config, tokenizer_path, tok })
    }

    /// The run's metrics, keeping the lines through step `keep_through` (rank 0; the other
    /// ranks write and print nothing).
    fn metrics(&self, keep_through: u64) -> Result<Metrics> {
        if self.ranks.is_root() {
            Metrics::open(&self.out, keep_through, self.quiet)
        } else {
            Ok(Metrics::silent(&self.out))
        }
    }

    /// Rank 0 also writes its records as TensorBoard events, into `<out>/tb/` (a resumed job
    /// starts a new event file at the step after `step`).
    fn open_tensorboard(&self, metrics: &mut Metrics, step: u64) -> Result<()> {
        if self.ranks.is_root() {
            let dir = self.out.join(crate::tensorboard::TB_DIR);
            metrics.set_tensorboard(crate::tensorboard::EventWriter::create(&dir, (step > 0).then_some(step + 1))?);
        }
        Ok(())
    }

    /// Upload the metrics (and the TensorBoard events) to the mirror, if there is one.
    fn mirror_metrics(&self, metrics: &Metrics) -> Result<()> {
        let Some(m) = &self.mirror else { return Ok(()) };
        m.upload_file(&self.out.join(crate::metrics::METRICS), crate::metrics::METRICS)?;
        if let Some(events) = metrics.tensorboard_path() {
            let name = events.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            m.upload_file(events, &format!("{}/{name}", crate::tensorboard::TB_DIR))?;
        }
        Ok(())
    }

    /// The checkpoint to resume from: this job's newest valid one (downloaded from the mirror
    /// when there is one), the one `resume` names, or none. Rank 0 chooses; the others take
    /// its choice.
    fn resume_point(&self, metrics: &Metrics) -> Result<Option<(PathBuf, TrainerState)>> {
        let (spec, ranks, root) = (self.spec, &self.ranks, self.ranks.is_root());
        if ranks.world() > 1 {
            metrics.say(&format!(
                "{} ranks: data_parallel {} × expert_parallel {}",
                ranks.world(),
                spec.data_parallel,
                spec.expert_parallel
            ));
        }
        if root {
            checkpoint::remove_partials(&self.ckpt_root)?;
        }
        let warn = &mut |w: String| metrics.say(&format!("warning: {w}"));
        let mode = spec.resume_mode();
        let auto = mode == Resume::Auto;
        let chosen = match mode {
            Resume::Never => None,
            Resume::Auto if !root => None,
            Resume::Auto => match &self.mirror {
                None => checkpoint::newest_valid(&self.ckpt_root, warn)?,
                Some(m) => {
                    let found = resume_from_store(m, &self.ckpt_root, warn)?;
                    // The run's history comes from the store as well: a local one left by an
                    // earlier run in this working directory would mix two runs.
                    let local = self.out.join(crate::metrics::METRICS);
                    let _ = std::fs::remove_file(&local);
                    if found.is_some() {
                        m.download_file(crate::metrics::METRICS, &local)?;
                    }
                    found
                }
            },
            Resume::From(dir) => {
                let state = checkpoint::verify(&dir).with_context(|| format!("resume: {} is not a valid checkpoint", dir.display()))?;
                Some((dir, state))
            }
        };
        if ranks.world() == 1 || !auto {
            return Ok(chosen);
        }
        match ranks.broadcast_u64(chosen.as_ref().map_or(u64::MAX, |(_, s)| s.step))? {
            u64::MAX => Ok(None),
            _ if root => Ok(chosen),
            step => {
                let dir = self.ckpt_root.join(checkpoint::step_dir_name(step));
                let state = checkpoint::verify(&dir).with_context(|| format!("resume: rank 0 chose {}", dir.display()))?;
                Ok(Some((dir, state)))
            }
        }
    }

    /// The training mixture and the validation streams, tokenized through the cache (rank 0
    /// first; the other ranks then read what it wrote).
    fn load_data(&self, metrics: &Metrics) -> Result<(Mixture, Vec<Packed>)> {
        let (spec, root) = (self.spec, self.ranks.is_root());
        let cache = spec.token_cache.clone().unwrap_or_else(crate::data::default_cache_dir);
        let started = Instant::now();
        if !root {
            self.ranks.barrier()?;
        }
        let vocab = self.init_config.vocab_size;
        // A source's tokens: an indexed dataset read in place, text through the token cache.
        let packed = |key: String, location: &str, format: Format, text_key: &str| -> Result<Packed> {
            let tokens = match format {
                Format::Indexed => Tokens::indexed(Path::new(location), vocab),
                format => self.tokenize(&key, location, format, text_key, &cache, metrics),
            }
            .with_context(|| key.clone())?;
            Packed::new(tokens, spec.seq_len, &format!("{key}: {location}"))
        };
        // The sources of a job are tokenized side by side (each in parallel batches too).
        let train = std::thread::scope(|scope| {
            let handles: Vec<_> = spec
                .data
                .train
                .iter()
                .enumerate()
                .map(|(i, s)| scope.spawn(move || packed(format!("data.train[{i}]"), &s.location(), s.format(), s.text_key())))
                .collect();
            handles.into_iter().map(|h| h.join().expect("a tokenizing thread panicked")).collect::<Result<Vec<_>>>()
        })?;
        // Validation files are JSONL with `text`, or indexed datasets.
        let valid = spec
            .data
            .valid
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let format = if crate::indexed::is_indexed(p) { Format::Indexed } else { Format::Jsonl };
                packed(format!("data.valid[{i}]"), &p.to_string_lossy(), format, crate::sources::DEFAULT_TEXT_KEY)
            })
            .collect::<Result<Vec<_>>>()?;
        if root {
            self.ranks.barrier()?;
        }
        let weights: Vec<f64> = spec.data.train.iter().map(|s| s.weight).collect();
        let train_tokens: usize = train.iter().map(|s| s.tokens.len()).sum();
        let mixture = Mixture::new(train, &weights, spec.seed);
        metrics.say(&format!(
            "data: {train_tokens} training tokens in {} source(s) ({:.1}s)",
            mixture.num_sources(),
            started.elapsed().as_secs_f64()
        ));
        Ok((mixture, valid))
    }

    /// One text source's tokens through the cache, with progress lines (documents, tokens,
    /// throughput) every few seconds while it tokenizes, and what it took at the end.
    fn tokenize(&self, key: &str, location: &str, format: Format, text_key: &str, cache: &Path, metrics: &Metrics) -> Result<Tokens> {
        let mut last = Instant::now();
        let mut report = |p: crate::data::TokenizeProgress| {
            if last.elapsed().as_secs_f64() >= 10.0 {
                last = Instant::now();
                metrics.say(&format!(
                    "{key}: tokenizing {location}: {} documents, {} tokens, {:.1} MB/s",
                    p.documents,
                    p.tokens,
                    p.bytes as f64 / 1e6 / p.seconds.max(1e-9)
                ));
            }
        };
        let started = Instant::now();
        let t = tokenize_source(location, format, text_key, &self.tok, cache, &mut report)?;
        if !t.cached {
            let secs = started.elapsed().as_secs_f64();
            metrics.say(&format!(
                "{key}: tokenized {location}: {} documents, {} tokens in {secs:.1}s ({:.0} tokens/s); {} bytes fetched from the store",
                t.documents,
                t.tokens.len(),
                t.tokens.len() as f64 / secs.max(1e-9),
                t.fetched
            ));
        }
        Ok(t.tokens)
    }

    /// The weights (this rank's experts only, with expert parallelism) and AdamW, from the
    /// resume checkpoint or from `init`, and where training stands.
    fn start(&self, resume_from: Option<&(PathBuf, TrainerState)>, metrics: &Metrics) -> Result<(Stepper, Progress)> {
        let spec = self.spec;
        let shard = self.ranks.expert_shard(&self.init_config)?;
        let (weights, progress) = match resume_from {
            Some((dir, state)) => {
                let ckpt = Checkpoint::open(dir).with_context(|| format!("resume: {}", dir.display()))?;
                if expected_tensors(&ckpt.config) != expected_tensors(&self.init_config) {
                    bail!("resume: {} holds a different model shape than `init`", dir.display());
                }
                if state.seed != spec.seed {
                    bail!("resume: {} was trained with seed {}, the job says {}", dir.display(), state.seed, spec.seed);
                }
                metrics.say(&format!("resuming from {} (step {})", dir.display(), state.step));
                let w = Weights::from_checkpoint_sharded(&ckpt, &self.device, &spec.trainable, shard.as_ref())?;
                (w, Progress { step: state.step, tokens_seen: state.tokens_seen, position: state.data.clone(), validation: None })
            }
            None => {
                let w = match &self.init_dir {
                    Some(dir) => Weights::from_checkpoint_sharded(&Checkpoint::open(dir)?, &self.device, &spec.trainable, shard.as_ref())?,
                    None => Weights::random_sharded(&self.init_config, spec.seed, &self.device, &spec.trainable, shard.as_ref())?,
                };
                (w, Progress::default())
            }
        };
        let mut stepper = Stepper::new(weights, &spec.optimizer, &spec.moe, spec.grad_clip)?;
        stepper.set_ranks(self.ranks.clone());
        stepper.set_compute_dtype(spec.compute_dtype()?)?;
        if let Some((dir, state)) = resume_from {
            checkpoint::load_optimizer(dir, &mut stepper.opt, state, shard.as_ref())?;
        }
        metrics.say(&format!(
            "model: {} parameters, {} trained; {} steps of {} tokens",
            stepper.weights.config.num_parameters(),
            stepper.weights.num_trainable(),
            spec.total_steps(),
            spec.tokens_per_step()
        ));
        Ok((stepper, progress))
    }

    /// The training loop: steps until the end (`Ok(progress)`), or until a signal any rank saw
    /// stops every rank after a checkpoint (`Err(Outcome::Interrupted)`).
    fn train(
        &self,
        stepper: &mut Stepper,
        mixture: &mut Mixture,
        valid: &[Packed],
        mut p: Progress,
        metrics: &mut Metrics,
        options: &mut Options,
    ) -> Result<std::result::Result<Progress, Outcome>> {
        let (spec, ranks) = (self.spec, &self.ranks);
        let total = spec.total_steps();
        let schedule = Schedule {
            lr: spec.optimizer.lr,
            min_lr: spec.schedule.min_lr,
            warmup_steps: spec.schedule.warmup_steps,
            total_steps: total,
            decay: spec.schedule.decay,
        };
        if p.step == 0 && total > 0 {
            p.validation = self.validate(stepper, valid, metrics, 0)?;
        }
        let mut last_log = (Instant::now(), p.tokens_seen);
        let (started, start_step) = (Instant::now(), p.step);
        let mut last_saved: Option<(u64, PathBuf)> = None;
        while p.step < total {
            let stop = options.stop.requested();
            let stop = if ranks.world() > 1 && ranks.any(stop.is_some())? { Some(stop.unwrap_or(libc::SIGTERM)) } else { stop };
            if let Some(signal) = stop {
                let dir = match &last_saved {
                    Some((s, dir)) if *s == p.step => dir.clone(),
                    _ => self.save(stepper, &p, metrics)?,
                };
                metrics.say(&format!("signal {signal}: stopped at step {}, checkpoint {}", p.step, dir.display()));
                return Ok(Err(Outcome::Interrupted { step: p.step, signal, checkpoint: dir }));
            }
            let lr = schedule.lr(p.step);
            // Every rank reads the whole step's sequences (the position advances the same way
            // everywhere) and trains on micro-batches rank, rank + ranks, ….
            let mut micro = Vec::with_capacity(spec.grad_accum / ranks.world());
            for i in 0..spec.grad_accum {
                let (seqs, sources): (Vec<Vec<u32>>, Vec<usize>) = (0..spec.batch_size).map(|_| mixture.next(&mut p.position)).unzip();
                if i % ranks.world() == ranks.rank() {
                    let mut batch = MicroBatch::from(to_batch(&seqs, &self.device)?);
                    if spec.moe.router_guard.is_some() {
                        batch.guarded = Some(guarded_tokens(&sources, &spec.data.train, spec.seq_len, &self.device)?);
                    }
                    micro.push(batch);
                }
            }
            let stats = stepper.step(&micro, lr)?;
            if !stats.loss.is_finite() {
                bail!("step {}: the loss is {} (lower optimizer.lr?)", p.step, stats.loss);
            }
            p.step += 1;
            p.tokens_seen += spec.tokens_per_step();
            let step = p.step;
            if step.is_multiple_of(spec.log_interval) || step == total {
                let tps = (p.tokens_seen - last_log.1) as f64 / last_log.0.elapsed().as_secs_f64().max(1e-9);
                last_log = (Instant::now(), p.tokens_seen);
                metrics.record(&stats.record(step, lr, tps, p.tokens_seen))?;
                let rate = (step - start_step) as f64 / started.elapsed().as_secs_f64().max(1e-9);
                let eta = human_duration((total - step) as f64 / rate.max(1e-9));
                metrics.progress(
                    step,
                    total,
                    &format!("loss {:.4} lr {lr:.3e} grad {:.3} {tps:.0} tok/s, eta {eta}", stats.loss, stats.grad_norm),
                );
            }
            if (spec.eval.interval > 0 && step.is_multiple_of(spec.eval.interval)) || step == total {
                p.validation = self.validate(stepper, valid, metrics, step)?;
            }
            if (spec.checkpoint.interval > 0 && step.is_multiple_of(spec.checkpoint.interval)) || step == total {
                let dir = self.save(stepper, &p, metrics)?;
                if let Some(cb) = options.on_checkpoint.as_mut() {
                    cb(step, &dir);
                }
                last_saved = Some((step, dir));
            }
        }
        Ok(Ok(p))
    }

    /// Validation loss and perplexity, recorded and printed (every rank computes them: expert
    /// parallel layers need all ranks); `None` without validation files.
    fn validate(&self, stepper: &Stepper, valid: &[Packed], metrics: &mut Metrics, step: u64) -> Result<Option<Validation>> {
        if valid.is_empty() {
            return Ok(None);
        }
        let (MeanLoss { loss, tokens }, per_stream) =
            evaluate(&stepper.model, valid, self.spec.eval.sequences, self.spec.batch_size, &self.device)?;
        let named: Vec<(String, MeanLoss)> =
            self.spec.data.valid.iter().map(|v| validation_name(&v.to_string_lossy())).zip(per_stream).collect();
        let mut record = json!({"step": step, "val_loss": loss, "val_ppl": loss.exp(), "val_tokens": tokens});
        if named.len() > 1 {
            record["val_ppl_by_data"] = named.iter().map(|(name, m)| (name.clone(), json!(m.loss.exp()))).collect();
        }
        metrics.record(&record)?;
        metrics.say(&format!("step {step}: validation loss {loss:.4}, perplexity {:.2}", loss.exp()));
        Ok(Some(Validation { step, data: named }))
    }

    /// The tokenizer and lineage written beside the weights; the lineage carries the
    /// validation perplexities when they were measured at this step.
    fn extras(&self, p: &Progress) -> Result<Extras> {
        let mut lineage = trained_lineage(self.spec, self.init_dir.as_deref(), p.step, p.tokens_seen)?;
        if let Some(v) = p.validation.as_ref().filter(|v| v.step == p.step) {
            let data: Vec<serde_json::Value> =
                v.data.iter().map(|(name, m)| json!({"name": name, "perplexity": m.loss.exp(), "tokens": m.tokens})).collect();
            lineage.extra.insert(btm_model::lineage::VALIDATION.into(), json!({"step": v.step, "data": data}));
        }
        Ok(Extras { tokenizer: Some(self.tokenizer_path.clone()), lineage: Some(lineage) })
    }

    /// Write and publish a checkpoint (and mirror it). Every rank takes part: with expert
    /// parallelism each checkpoint writer writes its own experts ([`Self::write_shared`]), or,
    /// where the ranks share no file system, the experts and their moments are gathered to rank
    /// 0, which writes alone; the others wait for rank 0 at a barrier (if it fails instead, the
    /// launcher ends them).
    fn save(&self, stepper: &Stepper, p: &Progress, metrics: &Metrics) -> Result<PathBuf> {
        let root = self.ranks.is_root();
        let dest = self.ckpt_root.join(checkpoint::step_dir_name(p.step));
        let trained: Vec<String> = stepper.opt.params.iter().map(|q| q.name.clone()).collect();
        let state = TrainerState::new(p.step, p.tokens_seen, p.position.clone(), stepper.opt.t, self.spec.seed, trained);
        // A checkpoint of the same step from an earlier attempt is replaced.
        if let Some(staging) = self.shared_staging(stepper, &dest)? {
            self.write_shared(staging, stepper, Some(&state), p)?;
        } else {
            let (whole, moments) = (gathered_weights(stepper, &self.ranks)?, gathered_moments(stepper, &self.ranks)?);
            if root {
                let weights = whole.as_ref().unwrap_or(&stepper.weights);
                checkpoint::save(&self.ckpt_root, weights, moments, &state, &self.extras(p)?)?;
            }
        }
        if root {
            checkpoint::prune(&self.ckpt_root, self.spec.checkpoint.keep)?;
            if let Some(m) = &self.mirror {
                let name = checkpoint::step_dir_name(p.step);
                m.upload_dir(&dest, &format!("checkpoints/{name}"))?;
                let kept: Vec<u64> = checkpoint::list(&self.ckpt_root)?.into_iter().map(|(s, _)| s).collect();
                for old in m.checkpoint_steps()?.into_iter().filter(|s| !kept.contains(s)) {
                    m.delete_dir(&format!("checkpoints/{}", checkpoint::step_dir_name(old)))?;
                }
            }
            self.mirror_metrics(metrics)?;
        }
        self.ranks.barrier()?;
        Ok(dest)
    }

    /// The result: the weights alone in Hugging Face layout under `<out>/model` (written as
    /// checkpoints are, then mirrored by rank 0).
    fn publish_model(&self, stepper: &Stepper, p: &Progress, metrics: &mut Metrics) -> Result<Outcome> {
        let model_dir = self.out.join("model");
        if let Some(staging) = self.shared_staging(stepper, &model_dir)? {
            self.write_shared(staging, stepper, None, p)?;
        } else {
            let whole = gathered_weights(stepper, &self.ranks)?;
            if self.ranks.is_root() {
                let weights = whole.as_ref().unwrap_or(&stepper.weights);
                let opts = WriteOptions { overwrite: true, ..WriteOptions::default() };
                btm_model::write_checkpoint(&model_dir, &weights.config, &mut |n| weights.tensor(n), &self.extras(p)?, &opts)?;
            }
        }
        if !self.ranks.is_root() {
            self.ranks.barrier()?;
            return Ok(Outcome::Finished { step: p.step, model_dir });
        }
        if let Some(m) = &self.mirror {
            m.delete_dir("model")?;
            m.upload_dir(&model_dir, "model")?;
        }
        self.mirror_metrics(metrics)?;
        metrics.finish();
        metrics.say(&format!("done: {} steps, {} tokens; model at {}", p.step, p.tokens_seen, model_dir.display()));
        self.ranks.barrier()?;
        Ok(Outcome::Finished { step: p.step, model_dir })
    }

    /// With expert parallelism, a staging folder for `dest` (replacing it when published) that
    /// every checkpoint writer sees; `None` without expert parallelism (rank 0 holds
    /// everything) or when some writer does not see it.
    fn shared_staging(&self, stepper: &Stepper, dest: &Path) -> Result<Option<checkpoint::SharedStaging>> {
        if stepper.weights.shard.is_none() {
            return Ok(None);
        }
        checkpoint::shared_staging(&self.ranks, dest, true)
    }

    /// Each checkpoint writer's part of a folder in `staging` — its experts, and rank 0 the
    /// rest; with `state`, a checkpoint's AdamW moments and trainer state too — then, once all
    /// are written, rank 0's manifest and publication.
    fn write_shared(
        &self,
        staging: checkpoint::SharedStaging,
        stepper: &Stepper,
        state: Option<&TrainerState>,
        p: &Progress,
    ) -> Result<()> {
        let mut known = std::collections::BTreeMap::new();
        if let Some(writer) = self.ranks.checkpoint_writer() {
            let owner = |name: &str| stepper.weights.holder(name);
            let part = btm_model::WriterPart { writer, writers: self.ranks.checkpoint_writers(), owner: &owner };
            let extras = if writer == 0 { self.extras(p)? } else { Extras::default() };
            let w = &stepper.weights;
            known = match state {
                Some(state) => {
                    let state = (writer == 0).then_some(state);
                    checkpoint::write_part(&staging.path, w, stepper.opt.state_tensors(), state, &extras, &part)?
                }
                None => {
                    let opts = WriteOptions::default();
                    btm_model::write_checkpoint_part(&staging.path, &w.config, &mut |n| w.tensor(n), &extras, &opts, &part)?
                }
            };
        }
        self.ranks.barrier()?;
        staging.publish(&known)
    }
}

/// With expert parallelism, the whole model gathered from every rank's experts (every rank
/// must call this); `None`: this rank's weights are already whole.
fn gathered_weights(stepper: &Stepper, ranks: &Ranks) -> Result<Option<Weights>> {
    if stepper.weights.shard.is_none() {
        return Ok(None);
    }
    Ok(Some(Weights::whole(&stepper.weights.config, ranks.gather_experts(stepper.weights.stored())?)?))
}

/// The AdamW moments rank 0 writes into a checkpoint, whole: with expert parallelism gathered
/// from every rank in parameter order (every rank must call this); otherwise rank 0's own, and
/// nothing on the other ranks (there is nothing to gather and they write nothing).
fn gathered_moments(stepper: &Stepper, ranks: &Ranks) -> Result<HashMap<String, Tensor>> {
    if stepper.weights.shard.is_none() {
        return Ok(if ranks.is_root() { stepper.opt.state_tensors() } else { HashMap::new() });
    }
    let mut state = stepper.opt.state_tensors();
    let mut moments = Vec::new();
    for p in &stepper.opt.params {
        for prefix in ["exp_avg", "exp_avg_sq"] {
            let key = format!("{prefix}.{}", p.name);
            let t = state.remove(&key).context("a moment of every parameter")?;
            moments.push((key, t));
        }
    }
    Ok(ranks.gather_experts(moments)?.into_iter().collect())
}

/// The newest remote checkpoint whose manifest verifies, in `root`: the working directory's
/// copy when it is the same checkpoint (same manifest), else downloaded. Local checkpoints the
/// store does not hold are removed first: they belong to an earlier run whose outputs were
/// cleared (a changed job), and resuming from them, or letting pruning keep them over the new
/// run's checkpoints, would be wrong.
fn resume_from_store(mirror: &Mirror, root: &Path, warn: &mut dyn FnMut(String)) -> Result<Option<(PathBuf, TrainerState)>> {
    let remote = mirror.checkpoint_steps()?;
    let manifest = btm_model::manifest::MANIFEST;
    for (step, dir) in checkpoint::list(root)? {
        let name = checkpoint::step_dir_name(step);
        let same =
            remote.contains(&step) && std::fs::read(dir.join(manifest)).ok() == mirror.read(&format!("checkpoints/{name}/{manifest}"))?;
        if !same {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    for step in remote {
        let name = checkpoint::step_dir_name(step);
        let dest = root.join(&name);
        if dest.exists() {
            match checkpoint::verify(&dest) {
                Ok(state) => return Ok(Some((dest, state))),
                Err(_) => std::fs::remove_dir_all(&dest).with_context(|| format!("removing invalid {}", dest.display()))?,
            }
        }
        std::fs::create_dir_all(root)?;
        let fetched = mirror.download_dir(&format!("checkpoints/{name}"), &dest).and_then(|_| checkpoint::verify(&dest));
        match fetched {
            Ok(state) => return Ok(Some((dest, state))),
            Err(e) => {
                warn(format!("skipping remote checkpoint {name}: {e:#}"));
                let _ = std::fs::remove_dir_all(&dest);
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The penalty and its gradient by hand on three tokens, four experts (expert 3 guarded),
    /// top-2, margin 1: only guarded tokens count, only over-the-bound logits are pushed down,
    /// and the old logits get no gradient (the bound is held fixed).
    #[test]
    fn router_guard_penalty_is_the_squared_hinge_over_guarded_tokens() {
        let logits = candle_core::Var::from_slice(
            &[
                3.0f32, 1.0, 0.0, 0.5, // guarded: t_2 = 1, ℓ_3 = 0.5 → hinge 0.5, in top-2? no
                0.0, 2.0, 1.0, 1.5, // guarded: t_2 = 1, ℓ_3 = 1.5 → hinge 1.5, in top-2
                0.0, 0.0, 1.0, 9.0, // not guarded
            ],
            (3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let mask = Tensor::new(&[1f32, 1.0, 0.0], &Device::Cpu).unwrap();
        let (penalty, leaked) = router_guard_penalty(logits.as_tensor(), &[3], &[0, 1, 2], 2, 1.0, &mask).unwrap();
        assert!((penalty.to_scalar::<f32>().unwrap() - (0.25 + 2.25) / 2.0).abs() < 1e-6);
        assert_eq!(leaked, 1.0);
        let grads = penalty.backward().unwrap();
        let g = grads.get(logits.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // d/dℓ_3 of mean hinge² = 2·hinge / 2 guarded tokens.
        assert_eq!(g, vec![vec![0.0, 0.0, 0.0, 0.5], vec![0.0, 0.0, 0.0, 1.5], vec![0.0; 4]]);
    }
}
