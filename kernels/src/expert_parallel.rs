//! Expert parallelism for the fused MoE layer: each rank of an expert-parallel group holds
//! E/ep of the experts and tokens travel to them (Megatron-Core's all-to-all token dispatcher,
//! torchtitan's `ExpertParallel`; Lepikhin et al. 2020, GShard).
//!
//! On every rank of the group, for its own token rows X [T, H]:
//!
//! ```text
//! route locally (full router, all E experts)  → plan: the T·k assignments grouped by expert
//! P = permute(X), w = the routing weight of each row   [N, H], [N, 1]   (N kept assignments)
//! exchange counts: how many rows each rank sends to each of the receiver's local experts
//! all-to-all-v [P | w] → rows from every rank, ordered (source rank, local expert)
//! per source: grouped GEMM gate_up, SwiGLU, ·w, grouped GEMM down
//! all-to-all-v back (counts swapped) → Y[t] = Σ_j rows of t   (unpermute_sum)
//! ```
//!
//! which is the single-process fused layer's arithmetic (`w` scales the SwiGLU output before
//! the down projection in both), with rows merely computed on another rank. Every step is
//! differentiable; the all-to-all's backward pass is the reverse all-to-all, so gradients of a
//! rank's experts include every rank's tokens, and gradients of X and of the router come home.
//! Each rank runs both exchanges for every MoE layer even when it has no rows to send or
//! receive, so forward and backward collectives line up across the group.

use std::ops::Range;
use std::sync::Arc;

use btm_collective::{all_to_all_v, exchange_counts, Collective};
use candle_core::{DType, Result, Tensor};

use crate::grouped_gemm::grouped_matmul;
use crate::moe::{route_tokens, ExpertWeights, MoeOptions, RouterStats};
use crate::permute::{permute, scale_rows, unpermute_sum, RoutePlan};
use crate::swiglu::swiglu_packed;

/// Which experts of an MoE layer this rank holds, and the group it exchanges tokens with.
#[derive(Debug, Clone)]
pub struct ExpertShard {
    /// The expert-parallel group; rank i holds the i-th block of E / size experts.
    pub group: Arc<dyn Collective>,
    /// Number of experts of the whole layer, E.
    pub experts: usize,
}

impl ExpertShard {
    /// The shard of a layer of `experts` experts over `group`; an error unless the group's
    /// size divides `experts` (and `experts` > 0).
    pub fn new(group: Arc<dyn Collective>, experts: usize) -> Result<Self> {
        if experts == 0 || !experts.is_multiple_of(group.size()) {
            candle_core::bail!("expert parallelism: {experts} experts cannot be split evenly over {} ranks", group.size());
        }
        Ok(Self { group, experts })
    }

    /// Experts per rank.
    pub fn per_rank(&self) -> usize {
        self.experts / self.group.size()
    }

    /// The global indices of this rank's experts.
    pub fn local(&self) -> Range<usize> {
        let n = self.per_rank();
        self.group.rank() * n..(self.group.rank() + 1) * n
    }
}

/// The MoE layer with experts spread over `shard.group`: `x` [T, H] (this rank's tokens),
/// the full router [E, H], this rank's experts `local` ([E/ep, 2F, H], [E/ep, H, F]).
/// Returns y [T, H] in `x`'s dtype and the router's record, as [`crate::fused_moe`] does.
pub fn expert_parallel_moe(
    x: &Tensor,
    router: &Tensor,
    local: &ExpertWeights,
    opts: &MoeOptions,
    shard: &ExpertShard,
) -> Result<(Tensor, RouterStats)> {
    let (_, h) = x.dims2()?;
    let (el, _, hw) = local.dims()?;
    let (e, ep) = (shard.experts, shard.group.size());
    if router.dims() != [e, h] || hw != h || el != shard.per_rank() {
        candle_core::bail!(
            "expert_parallel_moe: x {:?}, router {:?}, {el} local experts of width {hw} (expected {} of {e} over {ep} ranks)",
            x.dims(),
            router.dims(),
            shard.per_rank()
        );
    }
    let stats = route_tokens(x, router, opts)?;
    let plan = &stats.plan;
    let dtype = if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let device = x.device();

    // Rows in expert order, each with its routing weight as one more column (one exchange).
    let rows = permute(&x.to_dtype(dtype)?, plan)?;
    let n = rows.dim(0)?;
    let row_weights = scale_rows(&Tensor::ones((n, 1), dtype, device)?, &stats.routed.weights.to_dtype(dtype)?, plan)?;
    let send = Tensor::cat(&[&rows, &row_weights], 1)?;

    // Counts: sizes[g] rows for global expert g; rank d receives the block of its experts.
    let sizes = plan.group_sizes();
    let send_rows: Vec<usize> = sizes.chunks(el).map(|c| c.iter().sum()).collect();
    let received = exchange_counts(shard.group.as_ref(), &sizes)?; // [source][local expert]
    let recv_rows: Vec<usize> = received.chunks(el).map(|c| c.iter().sum()).collect();
    let arrived = all_to_all_v(&shard.group, &send, &send_rows, &recv_rows)?;

    // Arrived rows come in one chunk per source rank, each already grouped by local expert.
    // Each chunk is its own grouped GEMM: with two ranks, an expert's weight gradient is then
    // the sum of two products (one per source), as in one process accumulating two
    // micro-batches, so expert parallelism adds no rounding of its own.
    let (gate_up_w, down_w) = (local.gate_up.to_dtype(dtype)?, local.down.to_dtype(dtype)?);
    let mut outputs = Vec::with_capacity(ep);
    let mut start = 0usize;
    for counts in received.chunks(el) {
        let rows: usize = counts.iter().sum();
        let chunk = arrived.narrow(0, start, rows)?;
        start += rows;
        if rows == 0 {
            // Empty, but still part of the graph: both exchanges stay on every rank's backward pass.
            outputs.push(chunk.narrow(1, 0, h)?);
            continue;
        }
        let mut offsets = Vec::with_capacity(el + 1);
        offsets.push(0u32);
        for &c in counts {
            offsets.push(offsets.last().expect("offsets start at 0") + c as u32);
        }
        let offsets = Tensor::from_vec(offsets, el + 1, device)?;
        let gate_up = grouped_matmul(&chunk.narrow(1, 0, h)?, &gate_up_w, &offsets)?;
        // Row r scaled by its weight: `scale_rows` over the identity plan, the same op (and
        // the same gradient arithmetic) as the one-process layer.
        let identity = Arc::new(RoutePlan::new(&vec![0u32; rows], 1, 1, None)?);
        let hidden = scale_rows(&swiglu_packed(&gate_up)?, &chunk.narrow(1, h, 1)?.contiguous()?, &identity)?;
        outputs.push(grouped_matmul(&hidden, &down_w, &offsets)?);
    }
    let y = Tensor::cat(&outputs, 0)?;

    let back = all_to_all_v(&shard.group, &y, &recv_rows, &send_rows)?;
    let out = unpermute_sum(&back, plan)?;
    Ok((out.to_dtype(x.dtype())?, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Routing;
    use btm_collective::Single;
    use candle_core::{Device, Var};

    /// On a group of one, the expert-parallel layer is the fused layer: same output, same
    /// gradients for the input, the router and the experts.
    #[test]
    fn one_rank_matches_the_fused_layer() {
        let dev = Device::Cpu;
        let (t, h, f, e) = (9, 8, 6, 4);
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (t, h), &dev).unwrap()).unwrap();
        let router = Var::from_tensor(&Tensor::randn(0f64, 1.0, (e, h), &dev).unwrap()).unwrap();
        let gate_up = Var::from_tensor(&Tensor::randn(0f64, 0.3, (e, 2 * f, h), &dev).unwrap()).unwrap();
        let down = Var::from_tensor(&Tensor::randn(0f64, 0.3, (e, h, f), &dev).unwrap()).unwrap();
        let weights = ExpertWeights { gate_up: gate_up.as_tensor().clone(), down: down.as_tensor().clone() };
        let opts = MoeOptions { top_k: 2, routing: Routing::SoftmaxThenTopk, capacity: None };
        let shard = ExpertShard::new(Arc::new(Single), e).unwrap();
        let probe = Tensor::randn(0f64, 1.0, (t, h), &dev).unwrap();
        let run = |ep: bool| {
            let (y, _) = if ep {
                expert_parallel_moe(x.as_tensor(), router.as_tensor(), &weights, &opts, &shard).unwrap()
            } else {
                crate::fused_moe(x.as_tensor(), router.as_tensor(), &weights, &opts).unwrap()
            };
            let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let mut out = vec![y.flatten_all().unwrap().to_vec1::<f64>().unwrap()];
            for v in [&x, &router, &gate_up, &down] {
                out.push(grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap());
            }
            out
        };
        for (a, b) in run(true).iter().zip(run(false)) {
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 1e-12 * (1.0 + q.abs()), "{p} vs {q}");
            }
        }
        assert!(ExpertShard::new(Arc::new(Single), 0).is_err());
    }

    /// The same over a one-rank NCCL group (its exchanges go through the GPU), on a machine
    /// with libcuda and libnccl (`cargo test -p btm-kernels --features nccl gpu`).
    #[cfg(feature = "nccl")]
    #[test]
    fn gpu_one_rank_over_nccl_matches_the_fused_layer() {
        if !btm_collective::nccl_available() {
            assert!(std::env::var("BTM_REQUIRE_GPU").as_deref() != Ok("1"), "BTM_REQUIRE_GPU=1 but libnccl cannot be loaded");
            eprintln!("skipping: no libcuda/libnccl here");
            return;
        }
        let dev = Device::Cpu;
        let (t, h, f, e) = (16, 8, 6, 4);
        let x = Tensor::randn(0f32, 1.0, (t, h), &dev).unwrap();
        let router = Tensor::randn(0f32, 1.0, (e, h), &dev).unwrap();
        let weights = ExpertWeights {
            gate_up: Tensor::randn(0f32, 0.3, (e, 2 * f, h), &dev).unwrap(),
            down: Tensor::randn(0f32, 0.3, (e, h, f), &dev).unwrap(),
        };
        let opts = MoeOptions { top_k: 2, routing: Routing::TopkThenSoftmax, capacity: None };
        let group: Arc<dyn btm_collective::Collective> = Arc::new(btm_collective::Nccl::init(Arc::new(Single), 0).unwrap());
        let shard = ExpertShard::new(group, e).unwrap();
        let (ep, _) = expert_parallel_moe(&x, &router, &weights, &opts, &shard).unwrap();
        let (fused, _) = crate::fused_moe(&x, &router, &weights, &opts).unwrap();
        assert_eq!(ep.to_vec2::<f32>().unwrap(), fused.to_vec2::<f32>().unwrap());
    }
}
