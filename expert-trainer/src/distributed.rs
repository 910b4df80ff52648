//! Training on many processes: data parallelism and expert parallelism over the collectives of
//! `btm-collective`.
//!
//! A run has `data_parallel × expert_parallel` ranks ([`btm_collective::Groups`] lays them out).
//! Every rank reads the same data stream (a function of seed and position, so any world size
//! reads the same sequences) and trains on micro-batches `rank, rank + ranks, …` of each step:
//!
//! ```text
//! forward/backward of its micro-batches (loss ÷ all micro-batches of the step)
//!   MoE layers with expert_parallel > 1: tokens to the rank of their expert and back (all-to-all)
//!   load-balancing loss: expert counts summed over all ranks, so f_i is the whole round's
//! gradients summed: non-expert tensors over all ranks, expert stacks over the ranks that hold
//!   the same experts — one collective each over one flat buffer, in parameter order
//! clip to the global norm (expert stacks' squares summed over the expert-parallel group)
//! AdamW on every rank (identical for replicated tensors, local for each rank's experts)
//! ```
//!
//! With two ranks the sum of two micro-batches' gradients is one IEEE addition either way, so
//! data parallelism over two ranks is bit-identical to one process accumulating the same two
//! micro-batches. Rank 0 writes metrics. Checkpoints and the model are written by the ranks of
//! rank 0's expert-parallel group together, each its own experts (and their AdamW moments) into
//! the folder rank 0 stages, rank 0 the rest and the manifest last, so no rank holds more than
//! its share; where the ranks share no file system, the experts are gathered to rank 0, which
//! writes alone. Either way checkpoints are ordinary Hugging Face folders that resume on any
//! number of ranks.

use crate::optim::{global_norm, Param};
use anyhow::{bail, Result};
use btm_collective::{all_gather, all_reduce_sum_host, all_reduce_sum_many, Collective, Groups};
use btm_kernels::ExpertShard;
use btm_model::model::{STACKED_DOWN, STACKED_GATE_UP};
use btm_model::ModelConfig;
use candle_core::Tensor;
use std::collections::HashMap;

/// This process's place in a multi-process run.
#[derive(Debug, Clone)]
pub struct Ranks {
    pub groups: Groups,
    expert_parallel: usize,
}

/// Whether a trainer tensor is an MoE layer's stacked experts (split over expert-parallel ranks).
pub fn is_expert_stack(name: &str) -> bool {
    name.ends_with(&format!("experts.{STACKED_GATE_UP}")) || name.ends_with(&format!("experts.{STACKED_DOWN}"))
}

impl Ranks {
    /// One process.
    pub fn single() -> Self {
        Self { groups: Groups::single(), expert_parallel: 1 }
    }

    /// Join the run of `data_parallel × expert_parallel` ranks (MPI is initialised here).
    pub fn start(data_parallel: usize, expert_parallel: usize, backend: btm_collective::Backend) -> Result<Self> {
        let comm = btm_collective::init(data_parallel * expert_parallel, backend)?;
        Ok(Self { groups: Groups::new(comm, expert_parallel)?, expert_parallel })
    }

    pub fn rank(&self) -> usize {
        self.groups.world.rank()
    }
    pub fn world(&self) -> usize {
        self.groups.world.size()
    }
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// The experts this rank holds in each MoE layer of `config`; `None` without expert parallelism.
    pub fn expert_shard(&self, config: &ModelConfig) -> Result<Option<ExpertShard>> {
        if self.expert_parallel == 1 {
            return Ok(None);
        }
        let Some(moe) = &config.moe else {
            bail!("expert_parallel: {} needs an MoE model; this one is dense", self.expert_parallel);
        };
        if !moe.experts.is_multiple_of(self.expert_parallel) {
            bail!("expert_parallel: {} does not divide the model's {} experts", self.expert_parallel, moe.experts);
        }
        Ok(Some(ExpertShard::new(self.groups.expert.clone(), moe.experts)?))
    }

    /// Sum `grads` (of `params`, in order) over the ranks that share them: expert stacks over
    /// the expert-data-parallel group, everything else over the world.
    pub fn sum_gradients(&self, params: &[Param], grads: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if self.world() == 1 {
            return Ok(grads);
        }
        let (mut experts, mut rest) = (Vec::new(), Vec::new());
        for (i, p) in params.iter().enumerate() {
            if self.expert_parallel > 1 && is_expert_stack(&p.name) {
                experts.push(i);
            } else {
                rest.push(i);
            }
        }
        let mut out: Vec<Option<Tensor>> = grads.into_iter().map(Some).collect();
        for (indices, group) in [(&rest, &self.groups.world), (&experts, &self.groups.expert_data)] {
            let picked: Vec<Tensor> = indices.iter().map(|&i| out[i].take().expect("each gradient once")).collect();
            for (&i, g) in indices.iter().zip(all_reduce_sum_many(group.as_ref(), &picked)?) {
                out[i] = Some(g);
            }
        }
        Ok(out.into_iter().map(|g| g.expect("every gradient summed")).collect())
    }

    /// The global L2 norm of the summed gradients: replicated tensors counted once, each
    /// rank's experts added over the expert-parallel group.
    pub fn global_norm(&self, params: &[Param], grads: &[Tensor]) -> Result<f64> {
        if self.expert_parallel == 1 {
            return global_norm(grads);
        }
        let (experts, rest): (Vec<_>, Vec<_>) = params.iter().zip(grads).partition(|(p, _)| is_expert_stack(&p.name));
        let own = |v: Vec<(&Param, &Tensor)>| v.into_iter().map(|(_, g)| g.clone()).collect::<Vec<_>>();
        let mut expert_sq = [global_norm(&own(experts))?.powi(2)];
        all_reduce_sum_host(self.groups.expert.as_ref(), &mut expert_sq)?;
        Ok((global_norm(&own(rest))?.powi(2) + expert_sq[0]).sqrt())
    }

    /// Element-wise sums of per-rank figures over the world.
    pub fn sum(&self, values: &mut [f64]) -> Result<()> {
        Ok(all_reduce_sum_host(self.groups.world.as_ref(), values)?)
    }

    /// Whether any rank says `flag` (a stop request seen by one rank stops all at the same step).
    pub fn any(&self, flag: bool) -> Result<bool> {
        if self.world() == 1 {
            return Ok(flag);
        }
        let mut v = [if flag { 1.0 } else { 0.0 }];
        self.sum(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// Rank 0's `value` on every rank.
    pub fn broadcast_u64(&self, value: u64) -> Result<u64> {
        let mut bytes = value.to_le_bytes();
        if self.world() > 1 {
            self.groups.world.broadcast_bytes(&mut bytes, 0)?;
        }
        Ok(u64::from_le_bytes(bytes))
    }

    /// Rank 0's `bytes` on every rank (the others' are ignored).
    pub fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        if self.world() == 1 {
            return Ok(bytes);
        }
        let len = self.broadcast_u64(bytes.len() as u64)? as usize;
        let mut buf = if self.is_root() { bytes } else { vec![0; len] };
        self.groups.world.broadcast_bytes(&mut buf, 0)?;
        Ok(buf)
    }

    /// Ranks that write a checkpoint's weights: the expert-parallel group of rank 0 (world ranks
    /// `0..expert_parallel`), one per block of experts.
    pub fn checkpoint_writers(&self) -> usize {
        self.expert_parallel
    }

    /// This rank's place among the checkpoint writers; `None` for a rank that holds a replica
    /// of experts another rank writes.
    pub fn checkpoint_writer(&self) -> Option<usize> {
        (self.rank() < self.expert_parallel).then_some(self.rank())
    }

    pub fn barrier(&self) -> Result<()> {
        if self.world() > 1 {
            self.groups.world.barrier()?;
        }
        Ok(())
    }

    /// Whole expert stacks from each rank's part: the named tensors (a rank's experts along
    /// dimension 0) gathered over the expert-parallel group, in the given order; others as they are.
    pub fn gather_experts(&self, tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        if self.expert_parallel == 1 {
            return Ok(tensors);
        }
        let group: &dyn Collective = self.groups.expert.as_ref();
        tensors
            .into_iter()
            .map(|(name, t)| {
                let whole = if is_expert_stack(&name) { all_gather(group, &t)? } else { t };
                Ok((name, whole))
            })
            .collect()
    }
}

/// This rank's experts out of whole stacks (AdamW moments read from a checkpoint); `None`:
/// the tensors as they are.
pub fn local_experts(tensors: HashMap<String, Tensor>, shard: Option<&ExpertShard>) -> Result<HashMap<String, Tensor>> {
    let Some(shard) = shard else { return Ok(tensors) };
    let local = shard.local();
    tensors
        .into_iter()
        .map(|(name, t)| {
            let mine = if is_expert_stack(&name) { t.narrow(0, local.start, local.len())? } else { t };
            Ok((name, mine))
        })
        .collect()
}
