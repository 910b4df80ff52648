//! MoE operators and CPU training kernels for btm.
//!
//! Everything an MoE layer does besides its experts' arithmetic lives here, as differentiable
//! candle ops (custom ops with `bwd`, so `loss.backward()` flows through a whole layer), and
//! the other fused ops the model trains with on the CPU:
//! - [`router`]: float32 logits, top-k in both orders, auxiliary losses, expert capacity.
//! - [`permute`]: group the routed assignments by expert and back (deterministic, no atomics).
//! - `plan`: the routing plan ([`RoutePlan`]) and the grouped products' kind, which the CPU ops
//!   and their CUDA side share; it imports none of the crate's modules.
//! - [`grouped_gemm`]: all experts' products over ragged groups in one call, also with the
//!   permutation fused in (rows gathered from the token rows, outputs summed back per token).
//! - [`swiglu`]: the fused SwiGLU activation, gate and up packed in one tensor.
//! - [`attention`]: causal grouped-query attention with rotary embeddings over packed q/k/v
//!   rows, FlashAttention-style backward (probabilities recomputed), masked blocks skipped.
//! - [`norm`]: RMSNorm, forward and backward in one pass each.
//! - [`softmax`]: the causal softmax of attention scores (scale, mask, softmax in one pass), for
//!   attention through the vendor library's matrix products (CUDA).
//! - [`isa`]: the instruction set chosen at run time (baseline, AVX2, AVX-512; capped by
//!   `BTM_CPU_ISA`) and [`multiversion!`], which compiles a hot loop once per level.
//! - [`math`]: an inlinable `exp` the kernels' loops vectorise with.
//! - [`moe`]: the fused layer ([`fused_moe`]) and the plain loop over experts it is tested
//!   against ([`reference_moe`]).
//! - [`expert_parallel`]: the fused layer with its experts spread over ranks, tokens sent to
//!   them by all-to-all ([`expert_parallel_moe`]).
//! - [`bench`]: fused vs reference timings (`btm bench moe`).
//! - `cuda` (feature `nvrtc`): the same kernels as CUDA sources, compiled at run time by NVRTC.
//! - `cuda_ops` (feature `cuda`): the fused layer's candle ops on CUDA (cuBLAS grouped GEMM,
//!   NVRTC row kernels; one file per concern), so [`fused_moe`] and its backward run on a GPU
//!   ([`fused_ops_on`]).
//!
//! The CPU kernels are multi-threaded with rayon; the matrix products use the `gemm` crate
//! (the cache-blocked kernels behind candle's CPU matmul).
//!
//! Checks:
//! - `cargo test -p btm-kernels`: every op against its definition and the reference loop,
//!   finite differences in float64, determinism across thread counts.
//! - `eval "$(scripts/cuda-toolkit.sh --nvrtc-only)" && cargo test -p btm-kernels --features nvrtc nvrtc`:
//!   every CUDA kernel compiles with NVRTC (skips, saying so, when libnvrtc is absent).
//! - `cargo test -p btm-kernels --features cuda gpu` on a GPU machine (`scripts/gpu-check.sh`
//!   runs this test binary, built and packed here by `scripts/pack-gpu.sh`): the raw kernels
//!   and the candle ops on CUDA against the CPU ops.
//! - `cargo run --release -p btm-kernels --example bench_moe -- [--tokens T] [--json]`:
//!   fused vs reference timings (the code behind `btm bench moe`).

#![warn(missing_docs)]

pub mod attention;
pub mod bench;
mod cpu;
#[cfg(feature = "nvrtc")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_ops;
pub mod expert_parallel;
pub mod grouped_gemm;
pub mod isa;
pub mod math;
pub mod moe;
pub mod norm;
pub mod permute;
mod plan;
pub mod router;
pub mod softmax;
pub mod swiglu;
#[cfg(test)]
mod testing;

pub use attention::{causal_attention, AttentionShape};
pub use expert_parallel::{expert_parallel_moe, ExpertShard};
pub use grouped_gemm::{gather_matmul, grouped_matmul, matmul_combine};
pub use moe::{fused_moe, reference_moe, ExpertWeights, MoeOptions, RouterStats};
pub use norm::rms_norm;
pub use permute::{permute, scale_rows, unpermute, unpermute_sum, RoutePlan};
pub use router::{load_balancing_loss, load_balancing_loss_with_counts, route, z_loss, Capacity, DropPolicy, Routed, Routing};
pub use softmax::causal_softmax;
pub use swiglu::swiglu_packed;

/// Whether the fused ops ([`fused_moe`] and the ops under it, [`rms_norm`], [`swiglu_packed`],
/// [`causal_softmax`]) run on `device`: always on the CPU (float32, float64); on CUDA in builds
/// with the `cuda` feature (float32, bfloat16).
pub fn fused_ops_on(device: &candle_core::Device) -> bool {
    device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda())
}
