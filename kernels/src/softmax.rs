//! The causal softmax of attention scores, fused: scale, causal (and sliding-window) mask and
//! softmax in one pass, as Megatron-LM's `scaled_upper_triang_masked_softmax` does.
//!
//! For scores S [B, H, T, T] (row r is query `i = r mod T`), with valid keys
//! `j ≤ i, i − j < window`:
//! - forward: `P_ij = exp(scale·S_ij − m_i) / Σ_valid exp(scale·S_ik − m_i)`, 0 where masked;
//! - backward: `dS_ij = scale · P_ij · (dP_ij − Σ_k P_ik dP_ik)`.
//!
//! It serves the attention of devices without btm's fused CPU attention (CUDA): the two matrix
//! products stay on the vendor library's tensor cores, and the [T, T] scores and probabilities
//! are kept in the activations' dtype (bfloat16 in mixed precision) instead of float32 with a
//! separate mask tensor and half a dozen element-wise passes. Arithmetic is float32 (float64 on
//! float64 inputs).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{by_dtype, slice, Real};

/// `softmax(scale · S + causal mask)` over the last dimension of scores [..., T, T];
/// `window`: sliding-window attention's span (`None`: every earlier key). Differentiable.
pub fn causal_softmax(scores: &Tensor, scale: f64, window: Option<usize>) -> Result<Tensor> {
    let dims = scores.dims();
    if dims.len() < 2 || dims[dims.len() - 1] != dims[dims.len() - 2] {
        candle_core::bail!("causal_softmax: scores {dims:?} must end in [T, T]");
    }
    if window == Some(0) {
        candle_core::bail!("causal_softmax: a window of 0 keys");
    }
    scores.contiguous()?.apply_op1(CausalSoftmax { scale, window })
}

#[derive(Debug, Clone, Copy)]
struct CausalSoftmax {
    scale: f64,
    window: Option<usize>,
}

/// (P, dP) → dS.
struct CausalSoftmaxGrad {
    scale: f64,
}

/// The valid keys `lo..=i` of query `i`.
fn keys(i: usize, window: Option<usize>) -> std::ops::RangeInclusive<usize> {
    let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
    lo..=i
}

fn forward_cpu<T: Real>(s: &[T], t: usize, scale: f64, window: Option<usize>) -> Vec<T> {
    let mut out = vec![T::zero(); s.len()];
    let scale = T::from_f64(scale);
    out.par_chunks_mut(t).zip(s.par_chunks(t)).enumerate().for_each(|(r, (p, s))| {
        let valid = keys(r % t, window);
        let m = s[valid.clone()].iter().map(|&x| x * scale).fold(T::from_f64(f64::NEG_INFINITY), |a, b| if b > a { b } else { a });
        let mut sum = T::zero();
        for j in valid.clone() {
            p[j] = (s[j] * scale - m).exp();
            sum += p[j];
        }
        let inv = T::from_f64(1.0) / sum;
        for j in valid {
            p[j] *= inv;
        }
    });
    out
}

fn backward_cpu<T: Real>(p: &[T], dp: &[T], t: usize, scale: f64) -> Vec<T> {
    let mut out = vec![T::zero(); p.len()];
    let scale = T::from_f64(scale);
    out.par_chunks_mut(t).zip(p.par_chunks(t).zip(dp.par_chunks(t))).enumerate().for_each(|(r, (ds, (p, dp)))| {
        let i = r % t;
        let dot = (0..=i).fold(T::zero(), |acc, j| acc + p[j] * dp[j]);
        for j in 0..=i {
            ds[j] = scale * p[j] * (dp[j] - dot);
        }
    });
    out
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = l.shape().dims()[l.shape().rank() - 1];
        let out = by_dtype!(s.dtype(), self.name(), |T| forward_cpu::<T>(slice(s, l, self.name())?, t, self.scale, self.window));
        Ok((out, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let t = l.shape().dims()[l.shape().rank() - 1];
        Ok((crate::cuda_ops::causal_softmax(s, l, t, self.scale, self.window)?, l.shape().clone()))
    }
    fn bwd(&self, _s: &Tensor, p: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(&grad.contiguous()?, &CausalSoftmaxGrad { scale: self.scale })?))
    }
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = l1.shape().dims()[l1.shape().rank() - 1];
        let name = self.name();
        let out = by_dtype!(s1.dtype(), name, |T| backward_cpu::<T>(slice(s1, l1, name)?, slice(s2, l2, name)?, t, self.scale));
        Ok((out, l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let t = l1.shape().dims()[l1.shape().rank() - 1];
        Ok((crate::cuda_ops::causal_softmax_grad(s1, l1, s2, l2, t, self.scale)?, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, finite_difference_check, random};
    use candle_core::{DType, Device, Var, D};

    /// The primitives' formulation: scale, add the −∞ mask, softmax.
    fn reference(s: &Tensor, scale: f64, window: Option<usize>) -> Tensor {
        let t = s.dim(D::Minus1).unwrap();
        let mask: Vec<f64> =
            (0..t).flat_map(|i| (0..t).map(move |j| if keys(i, window).contains(&j) { 0.0 } else { f64::NEG_INFINITY })).collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap().to_dtype(s.dtype()).unwrap();
        crate::router::softmax_last(&(s * scale).unwrap().broadcast_add(&mask).unwrap()).unwrap()
    }

    #[test]
    fn matches_masked_softmax_with_gradients() {
        for window in [None, Some(3)] {
            let s = Var::from_tensor(&random(&[2, 3, 7, 7], 1, DType::F32)).unwrap();
            let probe = random(&[2, 3, 7, 7], 2, DType::F32);
            let fused = causal_softmax(&s, 0.4, window).unwrap();
            let plain = reference(&s, 0.4, window);
            assert_close(&fused, &plain, 1e-6, "forward");
            let gf = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gp = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert_close(gf.get(&s).unwrap(), gp.get(&s).unwrap(), 1e-6, "d scores");
        }
    }

    #[test]
    fn masked_entries_are_exactly_zero_and_rows_sum_to_one() {
        let s = random(&[1, 1, 5, 5], 3, DType::F64);
        let p = causal_softmax(&s, 1.0, Some(2)).unwrap().flatten_to(2).unwrap().to_vec2::<f64>().unwrap();
        for (i, row) in p.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                assert_eq!(v == 0.0, !(j <= i && i - j < 2), "row {i} key {j}: {v}");
            }
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        assert!(causal_softmax(&random(&[2, 3], 4, DType::F64), 1.0, None).is_err());
    }

    #[test]
    fn gradients_pass_finite_differences() {
        let s = Var::from_tensor(&random(&[2, 4, 4], 5, DType::F64)).unwrap();
        let probe = random(&[2, 4, 4], 6, DType::F64);
        finite_difference_check(&[&s], |v| (causal_softmax(v[0], 0.7, Some(3))? * &probe)?.sum_all());
    }
}
