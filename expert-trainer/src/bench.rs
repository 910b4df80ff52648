//! `btm bench train`: tokens per second and peak memory of forward + backward + AdamW on
//! random tokens, for fixed model presets (random weights, no data pipeline, no checkpoints).
//!
//! | preset | vocab | hidden | layers | heads (KV) | FFN | seq | batch |
//! |--------|-------|--------|--------|------------|-----|-----|-------|
//! | tiny   | 4096  | 256    | 4      | 4 (4)      | 688 | 256 | 8     |
//! | small  | 8192  | 512    | 8      | 8 (8)      | 1376| 512 | 8     |
//!
//! `--moe` turns every FFN into 4 experts of the same width, top-2 (Mixtral routing).
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
use anyhow::{bail, Result};
use btm_model::{ModelConfig, MoeConfig, Routing};
use candle_core::Device;
use serde::Serialize;
use std::time::Instant;

/// A benchmark shape.
#[derive(Debug, Clone)]
pub struct Preset {
    pub config: ModelConfig,
    pub seq_len: usize,
    pub batch_size: usize,
}

pub fn preset(name: &str, moe: bool) -> Result<Preset> {
    let (vocab, hidden, layers, heads, ffn, seq_len) = match name {
        "tiny" => (4096, 256, 4, 4, 688, 256),
        "small" => (8192, 512, 8, 8, 1376, 512),
        other => bail!("unknown preset `{other}` (expected tiny or small)"),
    };
    let config = ModelConfig {
        moe: moe.then(|| MoeConfig {
            experts: 4,
            top_k: 2,
            routing: Routing::TopkThenSoftmax,
            expert_ffn: ffn,
            shared_expert: None,
            dense_layers: vec![],
        }),
        ..ModelConfig::llama(vocab, hidden, layers, heads, heads, ffn)
    };
    config.validate()?;
    Ok(Preset { config, seq_len, batch_size: 8 })
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub tokens_per_s: f64,
    pub peak_rss_mb: f64,
    pub preset: String,
    pub moe: bool,
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

/// Time `steps` training steps (after one untimed warm-up step) of `preset`, as one of `ranks`.
pub fn run(name: &str, moe: bool, threads: usize, steps: usize, ranks: &Ranks) -> Result<BenchResult> {
    crate::train::tune_runtime(Some(threads));
    let p = preset(name, moe)?;
    let device = Device::Cpu;
    let shard = ranks.expert_shard(&p.config)?;
    let weights = Weights::random_sharded(&p.config, 0, &device, &Trainable::default(), shard.as_ref())?;
    let mut stepper = Stepper::new(weights, &Optimizer::default(), &Moe::default(), Some(1.0))?;
    stepper.set_ranks(ranks.clone());
    let mut rng = SplitMix64::new(&[ranks.rank() as u64]);
    let mut batch = || {
        let seqs: Vec<Vec<u32>> =
            (0..p.batch_size).map(|_| (0..=p.seq_len).map(|_| rng.below(p.config.vocab_size as u64) as u32).collect()).collect();
        to_batch(&seqs, &device)
    };
    stepper.step(&[batch()?], 1e-4)?;
    ranks.barrier()?;
    let mut phases = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let start = Instant::now();
    for _ in 0..steps {
        let before = btm_collective::time_in_collectives();
        let s = stepper.step(&[batch()?], 1e-4)?;
        let collective = (btm_collective::time_in_collectives() - before).as_secs_f64();
        for (v, x) in phases.iter_mut().zip([s.forward_s, s.backward_s, s.optimizer_s, collective]) {
            v.push(x);
        }
    }
    ranks.barrier()?;
    let secs = start.elapsed().as_secs_f64();
    let [forward_s, backward_s, optimizer_s, collective_s] = phases.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    });
    let tokens = (steps * p.batch_size * p.seq_len * ranks.world()) as f64;
    Ok(BenchResult {
        tokens_per_s: tokens / secs,
        peak_rss_mb: peak_rss_mb(),
        preset: name.into(),
        moe,
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
    }
}
