//! The fused ops' CUDA side: the `cuda_fwd` bodies of the candle custom ops, so that the fused
//! MoE layer (`moe.rs`) and its backward pass run on a GPU as they do on the CPU (same graph,
//! same formulas), and the trainer's fused loss and optimiser steps.
//!
//! - Grouped GEMMs go to cuBLAS (`cublasGemmGroupedBatchedEx`: one call for every expert's
//!   product, bfloat16 or float32 operands, float32 accumulation, tensor cores for bfloat16).
//!   Group sizes are host-known (the routing plan is built on the host), which is what that call
//!   takes. Where the library refuses it (cuBLAS before 12.5, or a combination it does not
//!   support) the same products run as one `cublasGemmEx` per non-empty group; [`gemm_path`]
//!   says which one ran.
//! - Gathers, the per-token combine, row scaling, the routing weights' dot products and the
//!   packed SwiGLU are the kernels of `cuda/ops.cu`, compiled once per process by NVRTC.
//! - The same file holds the row kernels of the model's other fused ops on CUDA: the causal
//!   softmax of attention scores, RMSNorm and the next-token cross-entropy (the trainer's loss),
//!   each with its backward pass, and AdamW's updates.
//! - Unlike the CPU, where the permutation is fused into the GEMM tiles, the gathered operand
//!   is materialised ([N, K]) before the library call: cuBLAS takes dense operands.
//!
//! Operands are float32 or bfloat16 (the CPU ops are float32/float64); the routing weights have
//! the activations' dtype, as on the CPU.
//!
//! One file per concern; an op's CUDA side has the name of the file that defines the op:
//! - `permute.rs`, `grouped_gemm.rs` (over `cublas.rs`), `swiglu.rs`, `softmax.rs`, `norm.rs`:
//!   the ops' launchers;
//! - `loss.rs`, `adamw.rs`: the trainer's cross-entropy and optimiser kernels;
//! - `arch.rs`: the NVRTC target for the device; `launch.rs`: operands, buffers and launches;
//! - `pool.rs`: the device memory pool; `device.rs`: missing libraries, the GPU's name.
//!
//! The ops reach these through this module's re-exports; the routing plan and the grouped
//! product's kind come from `plan.rs`, which imports none of the ops.

mod adamw;
mod arch;
mod cublas;
mod device;
mod grouped_gemm;
mod launch;
mod loss;
mod norm;
mod permute;
mod pool;
mod softmax;
mod swiglu;

pub use adamw::{adamw_moment, adamw_update};
pub use cublas::{gemm_path, GemmPath};
pub use device::{device_name, missing_libraries};
pub(crate) use grouped_gemm::grouped_gemm;
pub use loss::{nll, nll_grad};
pub(crate) use norm::{rms_norm, rms_norm_grad};
pub(crate) use permute::{combine, gather, scale_rows, slot_dots};
pub use pool::{keep_freed_memory, peak_memory, reset_peak_memory};
pub(crate) use softmax::{causal_softmax, causal_softmax_grad};
pub(crate) use swiglu::{swiglu_packed, swiglu_packed_grad};

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Device, Result, Tensor, Var};

    use crate::permute::RoutePlan;
    use crate::router::{Capacity, DropPolicy, Routing};
    use crate::testing::random;
    use crate::{ExpertWeights, MoeOptions};

    fn gpu() -> Option<Device> {
        if !crate::cuda::driver_available() {
            eprintln!("skipping: no libcuda here (a GPU machine runs this: scripts/gpu-check.sh)");
            return None;
        }
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("skipping: no CUDA device ({e})");
                None
            }
        }
    }

    /// `f` on the CPU in float32 and on the GPU in `dtype`, from the same values (rounded to
    /// `dtype` for both): output and every input's gradient within `tol` of the largest CPU value.
    fn compare(what: &str, gpu: &Device, dtype: DType, tol: f64, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) {
        let rounded: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()).collect();
        let run = |dev: &Device, dt: DType| -> (Tensor, Vec<Tensor>) {
            let vars: Vec<Var> =
                rounded.iter().map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap().to_device(dev).unwrap()).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            let probe = random(y.dims(), 99, DType::F32).to_dtype(dt).unwrap().to_device(dev).unwrap();
            let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = vars.iter().map(|v| grads.get(v).map_or_else(|| v.zeros_like().unwrap(), |g| g.clone())).collect();
            (y, gs)
        };
        let (want_y, want_g) = run(&Device::Cpu, DType::F32);
        let (got_y, got_g) = run(gpu, dtype);
        let pairs = std::iter::once((got_y, want_y)).chain(got_g.into_iter().zip(want_g));
        for (i, (got, want)) in pairs.enumerate() {
            let got = got.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30) as f64;
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            let part = if i == 0 { "output".to_string() } else { format!("gradient {}", i - 1) };
            assert!(diff <= tol * scale, "{what} {dtype:?} {part}: max |Δ| {diff:e} > {tol:e} · {scale:e}");
        }
    }

    #[test]
    fn gpu_ops_match_the_cpu_ops() {
        let Some(dev) = gpu() else { return };
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            compare("rms_norm", &dev, dtype, tol, &[random(&[300, 96], 1, DType::F32), random(&[96], 2, DType::F32)], &|v| {
                crate::rms_norm(&v[0], &v[1], 1e-5)
            });
            compare("swiglu_packed", &dev, dtype, tol, &[random(&[77, 2 * 40], 3, DType::F32)], &|v| crate::swiglu_packed(&v[0]));
            for window in [None, Some(5)] {
                compare("causal_softmax", &dev, dtype, tol, &[random(&[2, 3, 33, 33], 4, DType::F32)], &|v| {
                    crate::causal_softmax(&(&v[0] * 4.0)?, 0.3, window)
                });
            }
            let offsets = [0u32, 10, 10, 45, 64];
            compare("grouped_matmul", &dev, dtype, tol, &[random(&[64, 24], 5, DType::F32), random(&[4, 40, 24], 6, DType::F32)], &|v| {
                let o = Tensor::new(&offsets, v[0].device())?;
                crate::grouped_matmul(&v[0], &v[1], &o)
            });
            // The plan's operations: a routing with idle experts and a capacity drop.
            let experts: Vec<u32> = (0..50u32).flat_map(|t| [t % 3, (t * 7 + 1) % 5]).collect();
            let keep: Vec<bool> = (0..100).map(|s| s % 9 != 4).collect();
            let plan = Arc::new(RoutePlan::new(&experts, 2, 6, Some(&keep)).unwrap());
            let n = plan.kept();
            compare("permute", &dev, dtype, tol, &[random(&[50, 16], 7, DType::F32)], &|v| crate::permute(&v[0], &plan));
            compare("unpermute", &dev, dtype, tol, &[random(&[n, 16], 8, DType::F32), random(&[50, 2], 9, DType::F32)], &|v| {
                crate::unpermute(&v[0], &v[1], &plan)
            });
            compare("scale_rows", &dev, dtype, tol, &[random(&[n, 16], 10, DType::F32), random(&[50, 2], 11, DType::F32)], &|v| {
                crate::scale_rows(&v[0], &v[1], &plan)
            });
            compare("gather_matmul", &dev, dtype, tol, &[random(&[50, 16], 12, DType::F32), random(&[6, 20, 16], 13, DType::F32)], &|v| {
                crate::gather_matmul(&v[0], &v[1], &plan)
            });
            compare("matmul_combine", &dev, dtype, tol, &[random(&[n, 20], 14, DType::F32), random(&[6, 16, 20], 15, DType::F32)], &|v| {
                crate::matmul_combine(&v[0], &v[1], &plan)
            });
            // The whole layer through the router (x, router, gate_up, down).
            for capacity in [None, Some(Capacity { factor: 0.7, policy: DropPolicy::Probs })] {
                let opts = MoeOptions { top_k: 2, routing: Routing::SoftmaxThenTopk, capacity };
                compare(
                    "fused_moe",
                    &dev,
                    dtype,
                    tol * 2.0,
                    &[
                        random(&[64, 32], 16, DType::F32),
                        (random(&[8, 32], 17, DType::F32) * 3.0).unwrap(),
                        random(&[8, 2 * 24, 32], 18, DType::F32),
                        random(&[8, 32, 24], 19, DType::F32),
                    ],
                    &|v| Ok(crate::fused_moe(&v[0], &v[1], &ExpertWeights { gate_up: v[2].clone(), down: v[3].clone() }, &opts)?.0),
                );
            }
        }
        assert_ne!(super::gemm_path(), super::GemmPath::None);
        eprintln!("grouped GEMM path on this GPU: {:?}", super::gemm_path());
    }
}
