//! Token permutation: group the T·k routed assignments by expert, and undo it.
//!
//! Assignment (slot) `s = t·k + j` is token t's j-th choice. [`RoutePlan`] sorts the kept slots
//! by expert with a stable counting sort (slot order within an expert = token order), so expert
//! e's rows are `offsets[e]..offsets[e+1]` of one contiguous buffer.
//!
//! - `permute`:   `P[r] = X[token(rows[r])]`                               ([T,H] → [N,H])
//! - `unpermute`: `Y[t] = Σ_j w[t,j] · P[row(t,j)]`, over kept j, in order j = 0..k ([N,H] → [T,H])
//!
//! Unpermute gathers per token (each output row is written by one task, summing in a fixed
//! order), so it needs no atomics and is bitwise identical across runs and thread counts.
//!
//! Gradients (G = upstream gradient):
//! - permute:   `dX[t] = Σ_j G[row(t,j)]`              — unpermute without weights
//! - unpermute: `dP[r] = w[t,j] · G[t]`                — permute of the gradient times the weight
//!   and `dw[t,j] = ⟨P[row(t,j)], G[t]⟩` (0 for dropped assignments).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{by_dtype, rows_per_task, slice, Real};
pub use crate::plan::{RoutePlan, DROPPED};

fn check_rows(t: &Tensor, rows: usize, what: &str) -> Result<usize> {
    let (r, h) = t.dims2()?;
    if r != rows {
        candle_core::bail!("{what}: expected {rows} rows, got {r}");
    }
    Ok(h)
}

/// `P[r] = X[token(rows[r])]`: gather token rows [T, H] into the expert-sorted buffer [N, H].
pub fn permute(x: &Tensor, plan: &Arc<RoutePlan>) -> Result<Tensor> {
    check_rows(x, plan.tokens(), "permute")?;
    x.contiguous()?.apply_op1(Permute(plan.clone()))
}

/// `Y[t] = Σ_j P[row(t,j)]` over token t's kept assignments: [N, H] → [T, H].
pub fn unpermute_sum(p: &Tensor, plan: &Arc<RoutePlan>) -> Result<Tensor> {
    check_rows(p, plan.kept(), "unpermute_sum")?;
    p.contiguous()?.apply_op1(UnpermuteSum(plan.clone()))
}

/// `Y[t] = Σ_j w[t,j] · P[row(t,j)]` over token t's kept assignments: [N, H], [T, k] → [T, H].
/// `weights` must have the dtype of `p`.
pub fn unpermute(p: &Tensor, weights: &Tensor, plan: &Arc<RoutePlan>) -> Result<Tensor> {
    check_rows(p, plan.kept(), "unpermute")?;
    if weights.dims() != [plan.tokens(), plan.top_k()] {
        candle_core::bail!("unpermute: weights {:?}, expected [{}, {}]", weights.dims(), plan.tokens(), plan.top_k());
    }
    p.contiguous()?.apply_op2(&weights.contiguous()?, Unpermute(plan.clone()))
}

/// `H'[r] = w[slot(r)] · H[r]`: scale each permuted row by its routing weight ([N, F], [T, k] →
/// [N, F]). Applying the weights before the down projection instead of after it
/// (`Σ_j w·(h·Wᵀ) = Σ_j (w·h)·Wᵀ`) keeps the [N, H] expert outputs out of the backward pass.
/// Gradients: `dH[r] = w[slot(r)] · G[r]`, `dw[s] = ⟨H[row(s)], G[row(s)]⟩` (0 if dropped).
pub fn scale_rows(h: &Tensor, weights: &Tensor, plan: &Arc<RoutePlan>) -> Result<Tensor> {
    check_rows(h, plan.kept(), "scale_rows")?;
    if weights.dims() != [plan.tokens(), plan.top_k()] {
        candle_core::bail!("scale_rows: weights {:?}, expected [{}, {}]", weights.dims(), plan.tokens(), plan.top_k());
    }
    h.contiguous()?.apply_op2(&weights.contiguous()?, ScaleRows(plan.clone()))
}

struct Permute(Arc<RoutePlan>);
struct UnpermuteSum(Arc<RoutePlan>);
struct Unpermute(Arc<RoutePlan>);
/// `dP[r] = w[slot(r)] · G[token(r)]` (backward of unpermute w.r.t. P).
struct PermuteScaled(Arc<RoutePlan>);
/// `dw[t,j] = ⟨P[row(t,j)], G[t]⟩` (backward of unpermute w.r.t. w).
struct SlotDots(Arc<RoutePlan>);
struct ScaleRows(Arc<RoutePlan>);
/// `dw[s] = ⟨H[row(s)], G[row(s)]⟩` (backward of scale_rows w.r.t. w).
struct RowDots(Arc<RoutePlan>);

fn permute_cpu<T: Real>(plan: &RoutePlan, x: &[T], h: usize, scale: Option<&[T]>) -> Vec<T> {
    let mut out = vec![T::zero(); plan.kept() * h];
    let per = rows_per_task(h);
    out.par_chunks_mut(per * h).enumerate().for_each(|(c, chunk)| {
        for (i, dst) in chunk.chunks_mut(h).enumerate() {
            let slot = plan.rows()[c * per + i] as usize;
            let src = &x[(slot / plan.top_k()) * h..][..h];
            match scale {
                None => dst.copy_from_slice(src),
                Some(w) => {
                    let w = w[slot];
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s * w);
                }
            }
        }
    });
    out
}

pub(crate) fn unpermute_cpu<T: Real>(plan: &RoutePlan, p: &[T], h: usize, weights: Option<&[T]>) -> Vec<T> {
    let k = plan.top_k();
    let mut out = vec![T::zero(); plan.tokens() * h];
    let per = rows_per_task(h);
    out.par_chunks_mut(per * h).enumerate().for_each(|(c, chunk)| {
        for (i, dst) in chunk.chunks_mut(h).enumerate() {
            let t = c * per + i;
            for j in 0..k {
                let r = plan.slot_rows()[t * k + j];
                if r == DROPPED {
                    continue;
                }
                let src = &p[r as usize * h..][..h];
                match weights {
                    None => dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s),
                    Some(w) => {
                        let w = w[t * k + j];
                        dst.iter_mut().zip(src).for_each(|(d, &s)| *d += w * s);
                    }
                }
            }
        }
    });
    out
}

/// `out[s] = ⟨p[row(s)], g[token(s)]⟩`, or `⟨p[row(s)], g[row(s)]⟩` when `g_by_row`.
fn slot_dots_cpu<T: Real>(plan: &RoutePlan, p: &[T], g: &[T], h: usize, g_by_row: bool) -> Vec<T> {
    let k = plan.top_k();
    let mut out = vec![T::zero(); plan.tokens() * k];
    let per = rows_per_task(h * k);
    out.par_chunks_mut(per * k).enumerate().for_each(|(c, chunk)| {
        for (i, d) in chunk.iter_mut().enumerate() {
            let s = c * per * k + i;
            let r = plan.slot_rows()[s];
            if r != DROPPED {
                let g_at = if g_by_row { r as usize } else { s / k };
                let (pr, gr) = (&p[r as usize * h..][..h], &g[g_at * h..][..h]);
                *d = pr.iter().zip(gr).fold(T::zero(), |acc, (&a, &b)| acc + a * b);
            }
        }
    });
    out
}

/// `out[r] = w[rows[r]] · h[r]`.
fn scale_rows_cpu<T: Real>(plan: &RoutePlan, h: &[T], width: usize, w: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); h.len()];
    let per = rows_per_task(width);
    out.par_chunks_mut(per * width).enumerate().for_each(|(c, chunk)| {
        for (i, dst) in chunk.chunks_mut(width).enumerate() {
            let r = c * per + i;
            let w = w[plan.rows()[r] as usize];
            dst.iter_mut().zip(&h[r * width..][..width]).for_each(|(d, &s)| *d = w * s);
        }
    });
    out
}

fn same_dtype(s1: &CpuStorage, s2: &CpuStorage, what: &str) -> Result<()> {
    if s1.dtype() != s2.dtype() {
        candle_core::bail!("{what}: dtypes differ ({:?} vs {:?})", s1.dtype(), s2.dtype());
    }
    Ok(())
}

impl CustomOp1 for Permute {
    fn name(&self) -> &'static str {
        "moe-permute"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, h) = l.shape().dims2()?;
        Ok((crate::cuda_ops::gather(s, l, None, &self.0)?, Shape::from((self.0.kept(), h))))
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, h) = l.shape().dims2()?;
        let out = by_dtype!(s.dtype(), "permute", |T| permute_cpu::<T>(&self.0, slice(s, l, "permute")?, h, None));
        Ok((out, Shape::from((self.0.kept(), h))))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(unpermute_sum(grad, &self.0)?))
    }
}

impl CustomOp1 for UnpermuteSum {
    fn name(&self) -> &'static str {
        "moe-unpermute-sum"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, h) = l.shape().dims2()?;
        Ok((crate::cuda_ops::combine(s, l, None, &self.0)?, Shape::from((self.0.tokens(), h))))
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, h) = l.shape().dims2()?;
        let out = by_dtype!(s.dtype(), "unpermute_sum", |T| unpermute_cpu::<T>(&self.0, slice(s, l, "unpermute_sum")?, h, None));
        Ok((out, Shape::from((self.0.tokens(), h))))
    }
    fn bwd(&self, _p: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(permute(grad, &self.0)?))
    }
}

impl CustomOp2 for Unpermute {
    fn name(&self) -> &'static str {
        "moe-unpermute"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, h) = l1.shape().dims2()?;
        Ok((crate::cuda_ops::combine(s1, l1, Some((s2, l2)), &self.0)?, Shape::from((self.0.tokens(), h))))
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_dtype(s1, s2, "unpermute")?;
        let (_, h) = l1.shape().dims2()?;
        let out = by_dtype!(s1.dtype(), "unpermute", |T| unpermute_cpu::<T>(
            &self.0,
            slice(s1, l1, "unpermute")?,
            h,
            Some(slice(s2, l2, "unpermute")?)
        ));
        Ok((out, Shape::from((self.0.tokens(), h))))
    }
    fn bwd(&self, p: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dp = grad.apply_op2_no_bwd(w, &PermuteScaled(self.0.clone()))?;
        let dw = p.apply_op2_no_bwd(&grad, &SlotDots(self.0.clone()))?;
        Ok((Some(dp), Some(dw)))
    }
}

impl CustomOp2 for PermuteScaled {
    fn name(&self) -> &'static str {
        "moe-permute-scaled"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, h) = l1.shape().dims2()?;
        Ok((crate::cuda_ops::gather(s1, l1, Some((s2, l2)), &self.0)?, Shape::from((self.0.kept(), h))))
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_dtype(s1, s2, "permute_scaled")?;
        let (_, h) = l1.shape().dims2()?;
        let out = by_dtype!(s1.dtype(), "permute_scaled", |T| permute_cpu::<T>(
            &self.0,
            slice(s1, l1, "permute_scaled")?,
            h,
            Some(slice(s2, l2, "permute_scaled")?)
        ));
        Ok((out, Shape::from((self.0.kept(), h))))
    }
}

impl CustomOp2 for SlotDots {
    fn name(&self) -> &'static str {
        "moe-slot-dots"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda_ops::slot_dots(s1, l1, s2, l2, &self.0, false)?;
        Ok((out, Shape::from((self.0.tokens(), self.0.top_k()))))
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_dtype(s1, s2, "slot_dots")?;
        let (_, h) = l1.shape().dims2()?;
        let out = by_dtype!(s1.dtype(), "slot_dots", |T| slot_dots_cpu::<T>(
            &self.0,
            slice(s1, l1, "slot_dots")?,
            slice(s2, l2, "slot_dots")?,
            h,
            false
        ));
        Ok((out, Shape::from((self.0.tokens(), self.0.top_k()))))
    }
}

impl CustomOp2 for ScaleRows {
    fn name(&self) -> &'static str {
        "moe-scale-rows"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda_ops::scale_rows(s1, l1, s2, l2, &self.0)?, l1.shape().clone()))
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_dtype(s1, s2, "scale_rows")?;
        let (_, width) = l1.shape().dims2()?;
        let out = by_dtype!(s1.dtype(), "scale_rows", |T| scale_rows_cpu::<T>(
            &self.0,
            slice(s1, l1, "scale_rows")?,
            width,
            slice(s2, l2, "scale_rows")?
        ));
        Ok((out, l1.shape().clone()))
    }
    fn bwd(&self, h: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dh = grad.apply_op2_no_bwd(w, &ScaleRows(self.0.clone()))?;
        let dw = h.apply_op2_no_bwd(&grad, &RowDots(self.0.clone()))?;
        Ok((Some(dh), Some(dw)))
    }
}

impl CustomOp2 for RowDots {
    fn name(&self) -> &'static str {
        "moe-row-dots"
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda_ops::slot_dots(s1, l1, s2, l2, &self.0, true)?;
        Ok((out, Shape::from((self.0.tokens(), self.0.top_k()))))
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_dtype(s1, s2, "row_dots")?;
        let (_, h) = l1.shape().dims2()?;
        let out = by_dtype!(s1.dtype(), "row_dots", |T| slot_dots_cpu::<T>(
            &self.0,
            slice(s1, l1, "row_dots")?,
            slice(s2, l2, "row_dots")?,
            h,
            true
        ));
        Ok((out, Shape::from((self.0.tokens(), self.0.top_k()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{finite_difference_check, random};
    use candle_core::{DType, Var};

    fn plan() -> Arc<RoutePlan> {
        // 4 tokens, k = 2, 4 experts; expert 2 gets nothing; slot 5 (token 2's 2nd) is dropped.
        let experts = [1u32, 0, 3, 1, 0, 3, 1, 0];
        let keep = [true, true, true, true, true, false, true, true];
        Arc::new(RoutePlan::new(&experts, 2, 4, Some(&keep)).unwrap())
    }

    #[test]
    fn plan_sorts_stably_by_expert() {
        let p = plan();
        assert_eq!(p.offsets(), &[0, 3, 6, 6, 7]);
        assert_eq!(p.rows(), &[1, 4, 7, 0, 3, 6, 2]);
        assert_eq!(p.slot_rows()[5], DROPPED);
        assert_eq!((p.kept(), p.dropped()), (7, 1));
        assert_eq!(p.group_sizes(), vec![3, 3, 0, 1]);
        assert!(RoutePlan::new(&[0, 4], 1, 4, None).is_err());
    }

    #[test]
    fn permute_and_unpermute_match_their_definitions() {
        let p = plan();
        let x = random(&[4, 3], 1, DType::F64);
        let w = random(&[4, 2], 2, DType::F64);
        let xp = permute(&x, &p).unwrap();
        let xs = x.to_vec2::<f64>().unwrap();
        for (r, row) in xp.to_vec2::<f64>().unwrap().iter().enumerate() {
            assert_eq!(row, &xs[p.rows()[r] as usize / 2]);
        }
        let y = unpermute(&xp, &w, &p).unwrap().to_vec2::<f64>().unwrap();
        let ws = w.to_vec2::<f64>().unwrap();
        for t in 0..4 {
            // Each token's kept choices all carry the token's own row.
            let kept: f64 = (0..2).filter(|&j| t * 2 + j != 5).map(|j| ws[t][j]).sum();
            for c in 0..3 {
                assert!((y[t][c] - kept * xs[t][c]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn gradients_pass_finite_differences() {
        let p = plan();
        let x = Var::from_tensor(&random(&[4, 5], 3, DType::F64)).unwrap();
        let w = Var::from_tensor(&random(&[4, 2], 4, DType::F64)).unwrap();
        let probe = random(&[7, 5], 5, DType::F64);
        // permute then a weighted unpermute, so both ops' gradients are exercised.
        finite_difference_check(&[&x, &w], |v| {
            let xp = (permute(v[0], &p)? * &probe)?;
            unpermute(&xp, v[1], &p)?.sqr()?.sum_all()
        });
        finite_difference_check(&[&x], |v| unpermute_sum(&(permute(v[0], &p)? * &probe)?, &p)?.sqr()?.sum_all());
        // scale_rows, with a dropped slot whose weight must get a zero gradient.
        let h = Var::from_tensor(&random(&[7, 5], 8, DType::F64)).unwrap();
        finite_difference_check(&[&h, &w], |v| (scale_rows(v[0], v[1], &p)? * &probe)?.sqr()?.sum_all());
    }

    #[test]
    fn scale_rows_scales_each_row_by_its_slot_weight() {
        let p = plan();
        let h = random(&[7, 3], 9, DType::F64);
        let w = random(&[4, 2], 10, DType::F64);
        let out = scale_rows(&h, &w, &p).unwrap().to_vec2::<f64>().unwrap();
        let (hs, ws) = (h.to_vec2::<f64>().unwrap(), w.to_vec2::<f64>().unwrap());
        for r in 0..7 {
            let s = p.rows()[r] as usize;
            for c in 0..3 {
                assert_eq!(out[r][c], ws[s / 2][s % 2] * hs[r][c]);
            }
        }
    }

    #[test]
    fn unpermute_is_bitwise_identical_across_thread_counts() {
        let experts: Vec<u32> = (0..512u32 * 4).map(|s| (s * 7919 + s / 3) % 16).collect();
        let p = Arc::new(RoutePlan::new(&experts, 4, 16, None).unwrap());
        let yp = random(&[p.kept(), 96], 6, DType::F32);
        let w = random(&[512, 4], 7, DType::F32);
        let run = |threads: usize| -> Vec<u32> {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let y = pool.install(|| unpermute(&yp, &w, &p).unwrap());
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        let one = run(1);
        for threads in [1, 2, 3, 8] {
            assert_eq!(run(threads), one, "{threads} threads");
        }
    }
}
