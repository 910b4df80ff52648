//! Fused RMSNorm (Zhang & Sennrich 2019) for the CPU (and CUDA, `cuda_ops/norm.rs`), with its
//! backward pass.
//!
//! `y = x · r · w` with `r = 1 / √(mean(x²) + ε)` per row. With `u = G ⊙ w`:
//! - `dx = r · u − x · r³ · mean(u ⊙ x)`
//! - `dw = Σ_rows G ⊙ x · r`
//!
//! One multi-threaded pass each way, where candle's chain (square, mean, add, sqrt, recip,
//! two broadcast products and their gradients) makes about twenty. `dw`'s sum over rows is
//! taken over fixed row blocks in a fixed order, so results do not depend on the thread count.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{by_dtype, dot, dot3, rows_per_task, slice, Real};

/// RMSNorm over the last dimension of x [..., H] with weight [H]; differentiable in both.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let h = xs.dim(candle_core::D::Minus1)?;
    if weight.dims() != [h] || weight.dtype() != xs.dtype() {
        candle_core::bail!("rms_norm: weight {:?} {:?} for input {:?} {:?}", weight.dims(), weight.dtype(), xs.dims(), xs.dtype());
    }
    xs.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f64,
}

/// Backward: (x, w, G) → dx ‖ dw flattened.
struct RmsNormGrad {
    eps: f64,
}

/// `1 / √(mean(x²) + ε)` of one row.
#[inline(always)]
fn inv_rms<T: Real>(row: &[T], eps: f64) -> T {
    let sum_sq = dot(row, row);
    T::from_f64(1.0 / (sum_sq.to_f64() / row.len() as f64 + eps).sqrt())
}

crate::multiversion! {
    /// The rows of `x` (width `w.len()`) normalised into `y`.
    fn forward_rows<T: Real>(y: &mut [T], x: &[T], w: &[T], eps: f64) {
        let h = w.len();
        for (y, x) in y.chunks_mut(h).zip(x.chunks(h)) {
            let r = inv_rms(x, eps);
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        }
    }
}

crate::multiversion! {
    /// dx of the rows of `x` with output gradient `g` into `dx`; their dw added to `dw`.
    fn backward_rows<T: Real>(dx: &mut [T], dw: &mut [T], x: &[T], g: &[T], w: &[T], eps: f64) {
        let h = w.len();
        for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
            let r = inv_rms(x, eps);
            let mean_ux = dot3(g, w, x) / T::from_f64(h as f64);
            let r3_mean_ux = r * r * r * mean_ux;
            for ((((dx, dw), &x), &g), &w) in dx.iter_mut().zip(dw.iter_mut()).zip(x).zip(g).zip(w) {
                *dx = r * g * w - x * r3_mean_ux;
                *dw += g * x * r;
            }
        }
    }
}

fn forward_cpu<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let h = w.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(h * rows_per_task(h)).zip(x.par_chunks(h * rows_per_task(h))).for_each(|(dst, src)| forward_rows(dst, src, w, eps));
    out
}

fn backward_cpu<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let h = w.len();
    let block = h * rows_per_task(h);
    let mut out = vec![T::zero(); x.len() + h];
    let (dx, dw) = out.split_at_mut(x.len());
    let partial_dw: Vec<Vec<T>> = dx
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(g.par_chunks(block)))
        .map(|(dx, (x, g))| {
            let mut dw = vec![T::zero(); h];
            backward_rows(dx, &mut dw, x, g, w, eps);
            dw
        })
        .collect();
    for part in partial_dw {
        dw.iter_mut().zip(part).for_each(|(d, p)| *d += p);
    }
    out
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = "rms-norm";
        let out = by_dtype!(s1.dtype(), name, |T| forward_cpu::<T>(slice(s1, l1, name)?, slice(s2, l2, name)?, self.eps));
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
        Ok((crate::cuda_ops::rms_norm(s1, l1, s2, l2, self.eps)?, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        let n = x.elem_count();
        Ok((Some(both.narrow(0, 0, n)?.reshape(x.shape())?), Some(both.narrow(0, n, w.elem_count())?)))
    }
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "rms-norm-grad";
        let out =
            by_dtype!(s1.dtype(), name, |T| backward_cpu::<T>(slice(s1, l1, name)?, slice(s2, l2, name)?, slice(s3, l3, name)?, self.eps));
        Ok((out, Shape::from(l1.shape().elem_count() + l2.shape().elem_count())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda_ops::rms_norm_grad(s1, l1, s2, l2, s3, l3, self.eps)?;
        Ok((out, Shape::from(l1.shape().elem_count() + l2.shape().elem_count())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, finite_difference_check, random};
    use candle_core::{DType, Var, D};

    fn reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(w)
    }

    #[test]
    fn matches_primitives_with_gradients() {
        let x = Var::from_tensor(&random(&[3, 50, 96], 1, DType::F32)).unwrap();
        let w = Var::from_tensor(&random(&[96], 2, DType::F32)).unwrap();
        let probe = random(&[3, 50, 96], 3, DType::F32);
        let fused = rms_norm(&x, &w, 1e-5).unwrap();
        let plain = reference(&x, &w, 1e-5).unwrap();
        assert_close(&fused, &plain, 1e-5, "forward");
        let gf = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(gf.get(&x).unwrap(), gp.get(&x).unwrap(), 1e-5, "dx");
        assert_close(gf.get(&w).unwrap(), gp.get(&w).unwrap(), 1e-5, "dw");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = Var::from_tensor(&random(&[4, 6], 4, DType::F64)).unwrap();
        let w = Var::from_tensor(&random(&[6], 5, DType::F64)).unwrap();
        let probe = random(&[4, 6], 6, DType::F64);
        finite_difference_check(&[&x, &w], |v| (rms_norm(v[0], v[1], 1e-6)? * &probe)?.sum_all());
    }
}
