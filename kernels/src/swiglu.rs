//! Fused SwiGLU activation (Shazeer 2020): `h = silu(a) ⊙ b`, with `silu(a) = a · σ(a)`.
//!
//! [`swiglu_packed`] takes both halves from one [N, 2F] tensor (each row `[a | b]`): the
//! output of a single product with the gate and up projections stacked, so the layer input's
//! gradient comes from one GEMM instead of two GEMMs and a sum. One multi-threaded pass
//! forward and one backward (candle's chain of `silu`, `mul` and their gradients makes about
//! ten passes over the [N, F] activations):
//! - `dA = G ⊙ b ⊙ σ(a) · (1 + a · (1 − σ(a)))`
//! - `dB = G ⊙ silu(a)`

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{by_dtype, slice, Real};

/// `silu(a) ⊙ b` for rows `[a | b]` of x [N, 2F] → [N, F]; differentiable.
pub fn swiglu_packed(x: &Tensor) -> Result<Tensor> {
    let (_, two_f) = x.dims2()?;
    if !two_f.is_multiple_of(2) {
        candle_core::bail!("swiglu_packed: rows of {two_f} elements do not split into gate and up halves");
    }
    x.contiguous()?.apply_op1(SwiGluPacked)
}

/// [`swiglu_packed`]'s forward; its backward writes `[dA | dB]` rows.
struct SwiGluPacked;
struct SwiGluPackedGrad;

#[inline(always)]
fn sigmoid<T: Real>(a: T) -> T {
    T::one() / (T::one() + (-a).exp())
}

/// Rows per rayon task.
const ROWS: usize = 32;

crate::multiversion! {
    /// `silu(a) ⊙ b` of the rows `[a | b]` of `x` (2F wide) into `out` (F wide).
    fn forward_rows<T: Real>(out: &mut [T], x: &[T], f: usize) {
        for (d, row) in out.chunks_mut(f).zip(x.chunks(2 * f)) {
            let (a, b) = row.split_at(f);
            for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                *d = a * sigmoid(a) * b;
            }
        }
    }
}

crate::multiversion! {
    /// `[dA | dB]` rows of the rows `[a | b]` of `x` and the output gradient `g` into `out`.
    fn backward_rows<T: Real>(out: &mut [T], x: &[T], g: &[T], f: usize) {
        for ((d, row), g) in out.chunks_mut(2 * f).zip(x.chunks(2 * f)).zip(g.chunks(f)) {
            let (da, db) = d.split_at_mut(f);
            let (a, b) = row.split_at(f);
            for ((((da, db), &a), &b), &g) in da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(g) {
                let s = sigmoid(a);
                *db = g * a * s;
                *da = g * b * s * (T::one() + a * (T::one() - s));
            }
        }
    }
}

fn packed_forward_cpu<T: Real>(x: &[T], f: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len() / 2];
    out.par_chunks_mut(ROWS * f).zip(x.par_chunks(ROWS * 2 * f)).for_each(|(dst, src)| forward_rows(dst, src, f));
    out
}

fn packed_backward_cpu<T: Real>(x: &[T], g: &[T], f: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(ROWS * 2 * f)
        .zip(x.par_chunks(ROWS * 2 * f).zip(g.par_chunks(ROWS * f)))
        .for_each(|(dst, (src, g))| backward_rows(dst, src, g, f));
    out
}

impl CustomOp1 for SwiGluPacked {
    fn name(&self) -> &'static str {
        "swiglu-packed"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, two_f) = l.shape().dims2()?;
        Ok((crate::cuda_ops::swiglu_packed(s, l)?, Shape::from((n, two_f / 2))))
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, two_f) = l.shape().dims2()?;
        let out = by_dtype!(s.dtype(), "swiglu-packed", |T| packed_forward_cpu::<T>(slice(s, l, "swiglu-packed")?, two_f / 2));
        Ok((out, Shape::from((n, two_f / 2))))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &SwiGluPackedGrad)?))
    }
}

impl CustomOp2 for SwiGluPackedGrad {
    fn name(&self) -> &'static str {
        "swiglu-packed-grad"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda_ops::swiglu_packed_grad(s1, l1, s2, l2)?, l1.shape().clone()))
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = "swiglu-packed-grad";
        let (_, two_f) = l1.shape().dims2()?;
        let out = by_dtype!(s1.dtype(), name, |T| packed_backward_cpu::<T>(slice(s1, l1, name)?, slice(s2, l2, name)?, two_f / 2));
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, finite_difference_check, random};
    use candle_core::{DType, Var};

    /// Float32, against candle's `silu` and `mul`, over more rows than one rayon task takes.
    #[test]
    fn matches_candle_silu_times_up_with_gradients() {
        let x = Var::from_tensor(&random(&[70, 2 * 300], 1, DType::F32)).unwrap();
        let probe = random(&[70, 300], 3, DType::F32);
        let fused = swiglu_packed(&x).unwrap();
        let (a, b) = (x.narrow(1, 0, 300).unwrap(), x.narrow(1, 300, 300).unwrap());
        let plain = (a.silu().unwrap() * b).unwrap();
        assert_close(&fused, &plain, 1e-6, "forward");
        let gf = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (df, dp) = (gf.get(&x).unwrap(), gp.get(&x).unwrap());
        assert_close(&df.narrow(1, 0, 300).unwrap(), &dp.narrow(1, 0, 300).unwrap(), 1e-5, "d gate");
        assert_close(&df.narrow(1, 300, 300).unwrap(), &dp.narrow(1, 300, 300).unwrap(), 1e-6, "d up");
    }

    #[test]
    fn packed_matches_the_two_tensor_form_with_gradients() {
        let x = Var::from_tensor(&(random(&[70, 2 * 150], 6, DType::F64) * 3.0).unwrap()).unwrap();
        let probe = random(&[70, 150], 7, DType::F64);
        let packed = swiglu_packed(&x).unwrap();
        let (a, b) = (x.narrow(1, 0, 150).unwrap(), x.narrow(1, 150, 150).unwrap());
        let plain = (a.silu().unwrap() * b).unwrap();
        assert_close(&packed, &plain, 1e-12, "forward");
        let gf = (packed * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(gf.get(&x).unwrap(), gp.get(&x).unwrap(), 1e-12, "dx");
        assert!(swiglu_packed(&Tensor::zeros((2, 5), DType::F32, &candle_core::Device::Cpu).unwrap()).is_err());
    }

    #[test]
    fn gradients_pass_finite_differences() {
        let a = (random(&[3, 4], 4, DType::F64) * 3.0).unwrap();
        let b = random(&[3, 4], 5, DType::F64);
        let x = Var::from_tensor(&Tensor::cat(&[&a, &b], 1).unwrap()).unwrap();
        finite_difference_check(&[&x], |v| swiglu_packed(v[0])?.sqr()?.sum_all());
    }
}
