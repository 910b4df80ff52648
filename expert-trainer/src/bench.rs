//! `btm bench train`: tokens per second and peak memory of forward + backward + AdamW on
//! random tokens, for fixed model presets (random weights, no data pipeline, no checkpoints).
//!
//! | preset | vocab | hidden | layers | heads (KV) | FFN | seq | batch |
//! |--------|-------|--------|--------|------------|-----|-----|-------|
//! | tiny   | 4096  | 256    | 4      | 4 (4)      | 688 | 256 | 8     |
//! | small  | 8192  | 512    | 8      | 8 (8)      | 1376| 512 | 8     |
//! | gpt-125m | 50304 | 768  | 12     | 12 (12)    | 2048| 1024| 16    |
//!
//! `--moe` turns every FFN into experts of the same width, top-2 (Mixtral routing): 4 experts
//! for tiny and small, 8 for gpt-125m (GPT-2 small's shape with a Llama block; its SwiGLU width
//! 2048 ≈ 8/3 · 768 keeps the parameters besides the input embedding at 124 M, as nanoGPT's
//! GPT-2 has in all with its tied embedding; untied here, 162 M in all).
//!
//! On CUDA ([`run`] with a CUDA device) the step runs in bfloat16 mixed precision (float32
//! master weights and AdamW moments); the result adds model FLOPs utilisation (PaLM's
//! 6·N + 12·L·H·T FLOPs per token, N the parameters a token passes through, against the
//! device's dense bfloat16 peak) and the peak of the device memory pool.
//!
//! Under `mpirun -np N` ([`run`] with [`Ranks`] of N), each rank trains its own batch of the
//! preset's size: the MoE's experts split over the ranks (expert parallelism), a dense model
//! replicated (data parallelism). Tokens per second are the whole run's, and the time spent in
//! collectives is reported.

use crate::data::SplitMix64;
use crate::distributed::Ranks;
use crate::spec::{Moe, Optimizer, Trainable};
use crate::state::Weights;
use crate::train::{to_batch, Stepper};
use anyhow::{bail, ensure, Context, Result};
use btm_model::{ModelConfig, MoeConfig, Routing};
use candle_core::Device;
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// A benchmark shape.
#[derive(Debug, Clone)]
pub struct Preset {
    pub name: &'static str,
    pub config: ModelConfig,
    pub seq_len: usize,
    pub batch_size: usize,
}

pub fn preset(name: &str, moe: bool) -> Result<Preset> {
    let (name, vocab, hidden, layers, heads, ffn, seq_len, batch_size, experts) = match name {
        "tiny" => ("tiny", 4096, 256, 4, 4, 688, 256, 8, 4),
        "small" => ("small", 8192, 512, 8, 8, 1376, 512, 8, 4),
        "gpt-125m" => ("gpt-125m", 50304, 768, 12, 12, 2048, 1024, 16, 8),
        other => bail!("unknown preset `{other}` (expected tiny, small or gpt-125m)"),
    };
    let config = ModelConfig {
        moe: moe.then(|| MoeConfig {
            experts,
            top_k: 2,
            routing: Routing::TopkThenSoftmax,
            expert_ffn: ffn,
            shared_expert: None,
            dense_layers: vec![],
        }),
        ..ModelConfig::llama(vocab, hidden, layers, heads, heads, ffn)
    };
    config.validate()?;
    Ok(Preset { name, config, seq_len, batch_size })
}

impl Preset {
    /// Model FLOPs per trained token (forward and backward): PaLM's `6·N + 12·L·H·T` (Chowdhery
    /// et al. 2022, appendix B), N the non-embedding parameters a token passes through (the
    /// output projection counted, the input embedding, a lookup, not).
    pub fn flops_per_token(&self) -> f64 {
        let c = &self.config;
        let n = c.num_active_parameters() - c.vocab_size * c.hidden_size;
        6.0 * n as f64 + 12.0 * (c.num_layers * c.hidden_size * self.seq_len) as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub tokens_per_s: f64,
    pub peak_rss_mb: f64,
    pub preset: String,
    pub moe: bool,
    /// `cpu`, or `cuda` and the GPU's name.
    pub device: String,
    /// The forward and backward passes' dtype (`f32`, or `bf16` mixed precision on CUDA).
    pub dtype: String,
    /// Model FLOPs per token ([`Preset::flops_per_token`]).
    pub flops_per_token: f64,
    /// Achieved model FLOP/s over the device's dense bfloat16 peak (CUDA only).
    pub mfu: Option<f64>,
    /// The peak the MFU is taken against, in TFLOP/s.
    pub peak_tflops: Option<f64>,
    /// High-water mark of the device memory pool over the timed steps, MiB (CUDA only).
    pub peak_device_memory_mb: Option<f64>,
    pub threads: usize,
    /// The processor, the instruction set btm's kernels ran with and the GEMM kernels.
    pub cpu: btm_kernels::isa::CpuInfo,
    pub steps: usize,
    pub step_s: f64,
    /// Median seconds per step of each phase (forward + loss, backward, clipping + AdamW), to
    /// compare with `scripts/bench_train_torch.py`'s phases.
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub parameters: usize,
    /// Processes, and over how many of them each MoE layer's experts were split.
    pub ranks: usize,
    pub expert_parallel: usize,
    /// Median seconds per step rank 0 spent in collectives (waiting for the others included).
    pub collective_s: f64,
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`); 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Where `btm bench train` runs.
#[derive(Debug, Clone)]
pub struct BenchDevice {
    pub device: Device,
    /// Dense bfloat16 peak of the GPU in TFLOP/s, for the MFU (`None`: not reported).
    pub peak_tflops: Option<f64>,
}

/// Time `steps` training steps (after one untimed warm-up step) of `preset`, as one of `ranks`.
pub fn run(name: &str, moe: bool, threads: usize, steps: usize, ranks: &Ranks, on: &BenchDevice) -> Result<BenchResult> {
    crate::train::tune_runtime(Some(threads));
    let p = preset(name, moe)?;
    let device = on.device.clone();
    let cuda = device.is_cuda();
    let shard = ranks.expert_shard(&p.config)?;
    let weights = Weights::random_sharded(&p.config, 0, &device, &Trainable::default(), shard.as_ref())?;
    let mut stepper = Stepper::new(weights, &Optimizer::default(), &Moe::default(), Some(1.0))?;
    stepper.set_ranks(ranks.clone());
    let dtype = if cuda { candle_core::DType::BF16 } else { candle_core::DType::F32 };
    stepper.set_compute_dtype(dtype)?;
    let mut rng = SplitMix64::new(&[ranks.rank() as u64]);
    let mut batch = || {
        let seqs: Vec<Vec<u32>> =
            (0..p.batch_size).map(|_| (0..=p.seq_len).map(|_| rng.below(p.config.vocab_size as u64) as u32).collect()).collect();
        to_batch(&seqs, &device)
    };
    stepper.step(&[batch()?.into()], 1e-4)?;
    device.synchronize()?;
    let memory = crate::device::Memory::of(&device)?;
    if let Some(m) = &memory {
        m.reset_peak()?;
    }
    ranks.barrier()?;
    let mut phases = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let start = Instant::now();
    for _ in 0..steps {
        let before = btm_collective::time_in_collectives();
        let s = stepper.step(&[batch()?.into()], 1e-4)?;
        let collective = (btm_collective::time_in_collectives() - before).as_secs_f64();
        for (v, x) in phases.iter_mut().zip([s.forward_s, s.backward_s, s.optimizer_s, collective]) {
            v.push(x);
        }
    }
    device.synchronize()?;
    ranks.barrier()?;
    let secs = start.elapsed().as_secs_f64();
    let peak_device_memory_mb = match &memory {
        Some(m) => Some(m.peak_bytes()? as f64 / (1 << 20) as f64),
        None => None,
    };
    let [forward_s, backward_s, optimizer_s, collective_s] = phases.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    });
    let tokens = (steps * p.batch_size * p.seq_len * ranks.world()) as f64;
    let flops_per_token = p.flops_per_token();
    let peak_tflops = on.peak_tflops.filter(|_| cuda);
    Ok(BenchResult {
        tokens_per_s: tokens / secs,
        peak_rss_mb: peak_rss_mb(),
        preset: p.name.into(),
        moe,
        device: crate::device::describe(&device),
        dtype: if cuda { "bf16".into() } else { "f32".into() },
        flops_per_token,
        mfu: peak_tflops.map(|peak| tokens / secs / ranks.world() as f64 * flops_per_token / (peak * 1e12)),
        peak_tflops,
        peak_device_memory_mb,
        threads,
        cpu: btm_kernels::isa::CpuInfo::current(),
        steps,
        step_s: secs / steps as f64,
        forward_s,
        backward_s,
        optimizer_s,
        parameters: p.config.num_parameters(),
        ranks: ranks.world(),
        expert_parallel: shard.as_ref().map_or(1, |s| s.group.size()),
        collective_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_documented_shapes() {
        let t = preset("tiny", false).unwrap();
        assert_eq!((t.config.hidden_size, t.config.num_layers, t.config.vocab_size, t.seq_len, t.batch_size), (256, 4, 4096, 256, 8));
        let m = preset("small", true).unwrap();
        assert_eq!(m.config.moe.as_ref().map(|m| (m.experts, m.top_k)), Some((4, 2)));
        assert_eq!((m.config.hidden_size, m.config.intermediate_size, m.seq_len), (512, 1376, 512));
        assert!(preset("huge", false).is_err());
        assert!(peak_rss_mb() > 0.0);
        // GPT-2 small's shape: 123.6 M parameters besides the input embedding; per token
        // 6 · 123,587,328 + 12 · 12 · 768 · 1024 FLOPs (scripts/bench_train_torch.py agrees).
        let g = preset("gpt-125m", false).unwrap();
        assert_eq!((g.config.hidden_size, g.config.num_layers, g.config.vocab_size, g.seq_len, g.batch_size), (768, 12, 50304, 1024, 16));
        assert_eq!(g.config.num_parameters() - 50304 * 768, 123_587_328);
        assert_eq!(g.flops_per_token(), 854_770_176.0);
        let gm = preset("gpt-125m", true).unwrap();
        assert_eq!(gm.config.moe.as_ref().map(|m| (m.experts, m.top_k)), Some((8, 2)));
        // Two of the eight experts count per token, and each layer's router [8, 768].
        assert_eq!(gm.flops_per_token(), 854_770_176.0 + 6.0 * (12 * (3 * 768 * 2048 + 8 * 768)) as f64);
    }
}

/// What `btm bench data` measured: tokenizing a generated JSONL source through btm's data
/// pipeline (streamed, parallel batches, written to the token cache) against the `tokenizers`
/// crate's own batch encoder (`Tokenizer::encode_batch`) on the same documents, read the same
/// way, in alternating repetitions; peak memory of each.
#[derive(Debug, Clone, Serialize)]
pub struct DataBenchResult {
    /// The processor and instruction set.
    pub cpu: btm_kernels::isa::CpuInfo,
    /// Threads of the tokenizing pool.
    pub threads: usize,
    /// Size of the generated JSONL in bytes, its documents and its text bytes.
    pub source_bytes: u64,
    pub documents: u64,
    pub text_bytes: u64,
    /// Tokens of the stream (EOS after each document included).
    pub tokens: u64,
    /// Median seconds of btm's pipeline and of the reference, over the repetitions.
    pub btm_s: f64,
    pub reference_s: f64,
    /// Source megabytes (10⁶ bytes) per second and tokens per second of btm's pipeline.
    pub btm_mb_per_s: f64,
    pub btm_tokens_per_s: f64,
    pub reference_mb_per_s: f64,
    pub reference_tokens_per_s: f64,
    /// btm's throughput over the reference's (median seconds).
    pub ratio: f64,
    /// Peak resident memory (MiB, `VmHWM` after a reset) while each tokenized.
    pub btm_peak_rss_mb: f64,
    pub reference_peak_rss_mb: f64,
    pub reps: usize,
}

/// A synthetic JSONL source of about `bytes` bytes: documents of 50–2000 words drawn from a
/// fixed word list by a seeded generator, so every run and machine gets the same file.
pub fn write_data_source(path: &Path, bytes: u64) -> Result<()> {
    const WORDS: &str = "the of and to in a is that for it as was with be by on not he this are or his from at which \
        but have an they you were her she there been one all we their has would when if so no will can more \
        other its into only time some could them these may first then do any like my now over such our man me \
        even most made after also did many before must through back years where much your way well down should \
        because each just those people how too little state good very make world still own see men work long \
        get here between both life being under never day same another know while last might us great old year \
        off come since against go came right used take three model tokens expert router merge train branch \
        layer gradient dataset function variable kernel memory process thread cluster node domain scripture \
        dictionary computing code language river mountain light water earth house king city word voice heart";
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut rng = crate::data::SplitMix64::new(&[0xB7D, bytes]);
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    let mut written = 0u64;
    let mut text = String::new();
    while written < bytes {
        text.clear();
        let n = 50 + rng.below(1950) as usize;
        for i in 0..n {
            if i > 0 {
                text.push(if rng.below(12) == 0 { '\n' } else { ' ' });
            }
            text.push_str(words[rng.below(words.len() as u64) as usize]);
            if rng.below(9) == 0 {
                text.push(['.', ',', ';', '?'][rng.below(4) as usize]);
            }
        }
        let line = serde_json::json!({ "text": text }).to_string();
        w.write_all(line.as_bytes())?;
        w.write_all(b"\n")?;
        written += line.len() as u64 + 1;
    }
    w.flush()?;
    Ok(())
}

/// Reset this process's peak-RSS counter (Linux: writing 5 to `clear_refs` sets `VmHWM` to the
/// current RSS), so the next [`peak_rss_mb`] is the peak of what runs in between.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Tokenize `source` with btm's pipeline (into a fresh cache each time) and with the
/// reference, `reps` times alternately; the medians, throughput and peak memory.
pub fn run_data(source: &Path, tokenizer: &Path, threads: usize, reps: usize) -> Result<DataBenchResult> {
    use crate::data::{tokenize_source, TokenizerInfo};
    crate::train::tune_runtime(Some(threads));
    let tok = TokenizerInfo::load(tokenizer, None)?;
    let source_bytes = std::fs::metadata(source).with_context(|| format!("reading {}", source.display()))?.len();
    let location = source.to_string_lossy().into_owned();
    let (mut btm_s, mut reference_s) = (vec![], vec![]);
    let (mut btm_rss, mut reference_rss) = (0f64, 0f64);
    let (mut tokens, mut documents, mut text_bytes) = (0u64, 0u64, 0u64);
    for _ in 0..reps.max(1) {
        let cache = tempfile::tempdir()?;
        reset_peak_rss();
        let start = Instant::now();
        let mut last = crate::data::TokenizeProgress { documents: 0, tokens: 0, bytes: 0, seconds: 0.0 };
        let t = tokenize_source(&location, crate::sources::Format::Jsonl, "text", &tok, cache.path(), &mut |p| last = p)?;
        btm_s.push(start.elapsed().as_secs_f64());
        btm_rss = btm_rss.max(peak_rss_mb());
        (tokens, documents, text_bytes) = (t.tokens.len() as u64, last.documents, last.bytes);
        drop(t);

        // The reference: the same documents, read by the same streaming reader in batches of
        // the same size, encoded by the tokenizers crate's own parallel batch encoder.
        reset_peak_rss();
        let start = Instant::now();
        let mut docs = crate::sources::Documents::open(&location, crate::sources::Format::Jsonl, "text")?;
        let mut count = 0u64;
        loop {
            let batch: Vec<String> = docs.by_ref().take(crate::data::DOCS_PER_BATCH).collect::<Result<_>>()?;
            if batch.is_empty() {
                break;
            }
            let encoded = tok.tokenizer.encode_batch(batch, true).map_err(|e| anyhow::anyhow!("encode_batch: {e}"))?;
            count += encoded.iter().map(|e| e.get_ids().len() as u64 + 1).sum::<u64>();
        }
        reference_s.push(start.elapsed().as_secs_f64());
        reference_rss = reference_rss.max(peak_rss_mb());
        ensure!(count == tokens, "the reference counted {count} tokens, btm {tokens}");
    }
    let (b, r) = (median(&mut btm_s), median(&mut reference_s));
    Ok(DataBenchResult {
        cpu: btm_kernels::isa::CpuInfo::current(),
        threads,
        source_bytes,
        documents,
        text_bytes,
        tokens,
        btm_s: b,
        reference_s: r,
        btm_mb_per_s: source_bytes as f64 / 1e6 / b,
        btm_tokens_per_s: tokens as f64 / b,
        reference_mb_per_s: source_bytes as f64 / 1e6 / r,
        reference_tokens_per_s: tokens as f64 / r,
        ratio: r / b,
        btm_peak_rss_mb: btm_rss,
        reference_peak_rss_mb: reference_rss,
        reps: reps.max(1),
    })
}

/// The median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
