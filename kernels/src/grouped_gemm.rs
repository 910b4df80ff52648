//! Grouped GEMM: every expert's matrix product over its own ragged group of rows, in one call.
//!
//! Rows `offsets[e]..offsets[e+1]` of X [N, K] belong to expert e (empty groups allowed), and
//! the weights use the `nn.Linear` layout W [E, M, K] (out × in):
//!
//! - forward: `Y_e = X_e · W_eᵀ`      ([n_e, K] · [K, M] → [n_e, M])
//! - dX:      `dX_e = dY_e · W_e`     ([n_e, M] · [M, K] → [n_e, K])
//! - dW:      `dW_e = dY_eᵀ · X_e`    ([M, n_e] · [n_e, K] → [M, K]; zero for an empty group)
//!
//! On the CPU the work is cut into fixed-size output tiles (a tile never spans two experts);
//! rayon runs the tiles in parallel and each tile is one single-threaded call of the `gemm`
//! crate (the packed, cache-blocked SIMD kernels candle's own matmul uses). Tile bounds do not
//! depend on the thread count, so results are identical for any number of threads.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{by_dtype, check_float, slice, Real, SendPtr};
use crate::permute::{unpermute_cpu, unpermute_sum};
use crate::plan::{Kind, RoutePlan};

/// Output tile edge (rows, and columns) of one task: large enough that packing operands is
/// cheap next to the product, small enough to spread a few experts over all threads.
const TILE: usize = 512;

/// `Y_e = X_e · W_eᵀ` for every expert e at once: X [N, K], W [E, M, K], `offsets` [E+1] u32
/// (`offsets[0] = 0`, non-decreasing, `offsets[E] = N`) → Y [N, M]. Differentiable in X and W.
pub fn grouped_matmul(x: &Tensor, w: &Tensor, offsets: &Tensor) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let (e, _, kw) = w.dims3()?;
    if kw != k {
        candle_core::bail!("grouped_matmul: x is [{n}, {k}] but weights are {:?} (expected [E, M, {k}])", w.dims());
    }
    if offsets.dims() != [e + 1] || offsets.dtype() != DType::U32 {
        candle_core::bail!("grouped_matmul: offsets must be a [{}] u32 tensor, got {:?} {:?}", e + 1, offsets.dims(), offsets.dtype());
    }
    if x.dtype() != w.dtype() {
        candle_core::bail!("grouped_matmul: x is {:?} but weights are {:?}", x.dtype(), w.dtype());
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &offsets.contiguous()?, GroupedGemm(Kind::Forward))
}

struct GroupedGemm(Kind);

fn read_offsets(s: &CpuStorage, l: &Layout, groups: usize, rows: usize) -> Result<Vec<usize>> {
    check_offsets(slice::<u32>(s, l, "grouped_matmul offsets")?, groups, rows)
}

/// `offsets` as indices, after checking they rise from 0 to `rows` over `groups` groups.
fn check_offsets(offsets: &[u32], groups: usize, rows: usize) -> Result<Vec<usize>> {
    let o: Vec<usize> = offsets.iter().map(|&v| v as usize).collect();
    if o.len() != groups + 1 || o[0] != 0 || o[groups] != rows || o.windows(2).any(|w| w[0] > w[1]) {
        candle_core::bail!("grouped_matmul: offsets {o:?} must rise from 0 to {rows} over {groups} groups");
    }
    Ok(o)
}

/// One task: output rows `r0..r1` and columns `c0..c1` of group `g` (for WeightGrad, rows are
/// indices into M of expert g's [M, K] gradient).
struct Tile {
    g: usize,
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
    /// A whole large group, multiplied by the `gemm` crate's own threads (see [`tiles`]).
    whole: bool,
}

/// On more than one thread, a group whose output spans at least this many tiles per thread
/// is one task, multiplied by `gemm` with its own parallel blocking (operands packed once and
/// shared by the threads) instead of single-threaded tiles that each pack their operands
/// again: `btm bench moe` at 2 threads, AVX-512, E = 64 (groups of ~128 × 704): 1.87× → 2.0×
/// the loop; E = 8: 84 % → 88 % of the dense GEMM rate. Nested in rayon's pool with the other
/// tasks. Either way every output element is summed over the whole depth in the same order
/// (gemm splits only rows and columns among threads, and its depth blocking depends on the
/// depth alone), so results do not depend on the split or the thread count.
const WHOLE_GROUP_TILES_PER_THREAD: usize = 1;

/// Cut each (group, first row, end row) span into TILE × TILE tiles over `cols` columns, or
/// keep it whole when large (see [`WHOLE_GROUP_TILES_PER_THREAD`]).
fn tiles(spans: impl Iterator<Item = (usize, usize, usize)>, cols: usize) -> Vec<Tile> {
    let mut out = Vec::new();
    let threads = rayon::current_num_threads().max(1);
    for (g, start, end) in spans {
        if (end - start).div_ceil(TILE) * cols.div_ceil(TILE) >= WHOLE_GROUP_TILES_PER_THREAD * threads && threads > 1 {
            out.push(Tile { g, r0: start, r1: end, c0: 0, c1: cols, whole: true });
            continue;
        }
        for r0 in (start..end).step_by(TILE) {
            for c0 in (0..cols).step_by(TILE) {
                out.push(Tile { g, r0, r1: (r0 + TILE).min(end), c0, c1: (c0 + TILE).min(cols), whole: false });
            }
        }
    }
    out
}

/// `dst[m×n] = lhs[m×depth] · rhs[depth×n]`, on one thread or (`parallel`) on all of
/// rayon's; strides are (row, column) pairs.
///
/// # Safety
/// All pointers must be valid for the strided extents given.
unsafe fn gemm_tile<T: Real>(
    (m, n, depth): (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    (lhs, lhs_rs, lhs_cs): (*const T, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const T, usize, usize),
    parallel: bool,
) {
    // gemm computes dst := alpha·dst + beta·lhs·rhs; with read_dst = false alpha is unused.
    gemm::gemm(
        m,
        n,
        depth,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::zero(),
        T::one(),
        false,
        false,
        false,
        if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None },
    )
}

/// Where the N logical rows of a row operand live: row r is `src[r]` (`None`), or, for a
/// gathered operand, the row of the token that assignment r belongs to: `src[rows[r] / k]`.
type Gather<'a> = Option<&'a RoutePlan>;

fn token_of(plan: &RoutePlan, r: usize) -> usize {
    plan.rows()[r] as usize / plan.top_k()
}

/// Run one kind of grouped product. `a` is the row operand (X or dY; [N, ·], or [T, ·] when
/// gathered through `a_rows`), `b` the other one (W, or for WeightGrad X, gathered through
/// `b_rows`). Gathered rows are copied tile by tile into a per-task buffer, so the permuted
/// [N, ·] operand is never materialised.
#[allow(clippy::too_many_arguments)]
fn grouped_cpu<T: Real>(
    kind: Kind,
    a: &[T],
    a_cols: usize,
    a_rows: Gather,
    b: &[T],
    b_dims: &[usize],
    b_rows: Gather,
    offsets: &[usize],
) -> Vec<T> {
    let groups = offsets.len() - 1;
    let n = offsets[groups];
    let spans = || (0..groups).map(|g| (g, offsets[g], offsets[g + 1])).filter(|&(_, s, e)| e > s);
    match kind {
        Kind::Forward | Kind::InputGrad => {
            // Forward: a = X [N,K], b = W [E,M,K], out [N,M], depth K.
            // InputGrad: a = dY [N,M], b = W [E,M,K], out [N,K], depth M.
            let (m_w, k_w) = (b_dims[1], b_dims[2]);
            let (cols, depth) = if kind == Kind::Forward { (m_w, k_w) } else { (k_w, m_w) };
            debug_assert_eq!(a_cols, depth);
            let mut out = vec![T::zero(); n * cols];
            let dst = SendPtr(out.as_mut_ptr());
            tiles(spans(), cols).par_iter().for_each_init(Vec::new, |buf: &mut Vec<T>, t| {
                let w = &b[t.g * m_w * k_w..][..m_w * k_w];
                // Forward reads W_eᵀ: element (p, c) = W[c, p]; InputGrad reads W_e: (p, c) = W[p, c].
                let rhs = if kind == Kind::Forward { (w[t.c0 * k_w..].as_ptr(), 1, k_w) } else { (w[t.c0..].as_ptr(), k_w, 1) };
                let lhs = match a_rows {
                    None => a[t.r0 * depth..].as_ptr(),
                    Some(plan) => {
                        buf.clear();
                        for r in t.r0..t.r1 {
                            buf.extend_from_slice(&a[token_of(plan, r) * depth..][..depth]);
                        }
                        buf.as_ptr()
                    }
                };
                // SAFETY: the tile's rows and columns lie inside `out`, `a` (or `buf`) and `w`,
                // and no two tiles share an output element.
                unsafe {
                    gemm_tile((t.r1 - t.r0, t.c1 - t.c0, depth), (dst.get().add(t.r0 * cols + t.c0), cols), (lhs, depth, 1), rhs, t.whole)
                }
            });
            out
        }
        Kind::WeightGrad => {
            // a = dY [N,M], b = X [N,K], out [E,M,K]: dW_e = dY_eᵀ · X_e, depth n_e.
            let (m, k) = (a_cols, b_dims[1]);
            let mut out = vec![T::zero(); groups * m * k];
            let dst = SendPtr(out.as_mut_ptr());
            let bufs = || (Vec::new(), Vec::new());
            tiles(spans().map(|(g, _, _)| (g, 0, m)), k).par_iter().for_each_init(bufs, |(buf_a, buf_b): &mut (Vec<T>, Vec<T>), t| {
                let (start, rows) = (offsets[t.g], offsets[t.g + 1] - offsets[t.g]);
                let (tm, tk) = (t.r1 - t.r0, t.c1 - t.c0);
                // lhs element (i, p) = dY[start + p, r0 + i]; rhs element (p, c) = X[start + p, c0 + c].
                let lhs = match a_rows {
                    None => (a[start * m + t.r0..].as_ptr(), 1, m),
                    Some(plan) => {
                        buf_a.clear();
                        for p in start..start + rows {
                            buf_a.extend_from_slice(&a[token_of(plan, p) * m + t.r0..][..tm]);
                        }
                        (buf_a.as_ptr(), 1, tm)
                    }
                };
                let rhs = match b_rows {
                    None => (b[start * k + t.c0..].as_ptr(), k, 1),
                    Some(plan) => {
                        buf_b.clear();
                        for p in start..start + rows {
                            buf_b.extend_from_slice(&b[token_of(plan, p) * k + t.c0..][..tk]);
                        }
                        (buf_b.as_ptr(), tk, 1)
                    }
                };
                // SAFETY: dW tile (r0..r1, c0..c1) of expert g lies in `out`; the operands lie
                // inside `a`/`b` or the task's buffers, which live until the call returns.
                unsafe { gemm_tile((tm, tk, rows), (dst.get().add(t.g * m * k + t.r0 * k + t.c0), k), lhs, rhs, t.whole) }
            });
            out
        }
    }
}

impl CustomOp3 for GroupedGemm {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Forward => "grouped-matmul",
            Kind::InputGrad => "grouped-matmul-dx",
            Kind::WeightGrad => "grouped-matmul-dw",
        }
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
        if s1.dtype() != s2.dtype() {
            candle_core::bail!("{}: dtypes differ ({:?} vs {:?})", self.name(), s1.dtype(), s2.dtype());
        }
        check_float(s1.dtype(), self.name())?;
        let (n, a_cols) = l1.shape().dims2()?;
        let b_dims = l2.shape().dims().to_vec();
        let (groups, shape) = match self.0 {
            Kind::Forward => (b_dims[0], Shape::from((n, b_dims[1]))),
            Kind::InputGrad => (b_dims[0], Shape::from((n, b_dims[2]))),
            Kind::WeightGrad => {
                let groups = l3.shape().dims1()?.saturating_sub(1);
                (groups, Shape::from((groups, a_cols, b_dims[1])))
            }
        };
        let offsets = read_offsets(s3, l3, groups, n)?;
        let out = by_dtype!(s1.dtype(), self.name(), |T| grouped_cpu::<T>(
            self.0,
            slice(s1, l1, "grouped_matmul")?,
            a_cols,
            None,
            slice(s2, l2, "grouped_matmul")?,
            &b_dims,
            None,
            &offsets
        ));
        Ok((out, shape))
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
        let (n, _) = l1.shape().dims2()?;
        let groups = match self.0 {
            Kind::Forward | Kind::InputGrad => l2.shape().dims3()?.0,
            Kind::WeightGrad => l3.shape().dims1()?.saturating_sub(1),
        };
        // The offsets come to the host: cuBLAS's grouped call takes host-side group sizes.
        let Some((start, end)) = l3.contiguous_offsets() else {
            candle_core::bail!("{}: offsets must be contiguous", self.name());
        };
        let all = s3.device.clone_dtoh(s3.as_cuda_slice::<u32>()?)?;
        let offsets = check_offsets(&all[start..end], groups, n)?;
        crate::cuda_ops::grouped_gemm(self.0, s1, l1, s2, l2, &offsets)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        offsets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.0 != Kind::Forward {
            candle_core::bail!("{}: no second-order gradient", self.name());
        }
        let grad = grad.contiguous()?;
        let dx = grad.apply_op3_no_bwd(w, offsets, &GroupedGemm(Kind::InputGrad))?;
        let dw = grad.apply_op3_no_bwd(x, offsets, &GroupedGemm(Kind::WeightGrad))?;
        Ok((Some(dx), Some(dw), None))
    }
}

/// `Y[r] = X[token(r)] · W_eᵀ`: the grouped product with the permutation fused in. X [T, K]
/// holds token rows, `plan` says which token each of the N assignment rows reads; the permuted
/// copy of X is never built. Output [N, M], rows grouped by expert. Differentiable in X and W:
/// `dX = unpermute_sum(dY_e · W_e)`, `dW_e = dY_eᵀ · X[token(rows of e)]`.
pub fn gather_matmul(x: &Tensor, w: &Tensor, plan: &Arc<RoutePlan>) -> Result<Tensor> {
    check_plan_operands(x, plan.tokens(), w, plan, "gather_matmul")?;
    x.contiguous()?.apply_op2(&w.contiguous()?, PlanGemm { plan: plan.clone(), which: Which::GatherForward })
}

/// `Y[t] = Σ_j (H · W_eᵀ)[row(t,j)]` over token t's kept assignments: the grouped product with
/// the (unweighted) unpermute fused in. H [N, K] rows grouped by expert → Y [T, M]. The sum
/// per token runs in a fixed order (deterministic). Differentiable in H and W:
/// `dH_e = G[token(r)] · W_e`, `dW_e = G[token(rows of e)]ᵀ · H_e`.
pub fn matmul_combine(h: &Tensor, w: &Tensor, plan: &Arc<RoutePlan>) -> Result<Tensor> {
    check_plan_operands(h, plan.kept(), w, plan, "matmul_combine")?;
    h.contiguous()?.apply_op2(&w.contiguous()?, PlanGemm { plan: plan.clone(), which: Which::CombineForward })
}

fn check_plan_operands(x: &Tensor, rows: usize, w: &Tensor, plan: &RoutePlan, what: &str) -> Result<()> {
    let (r, k) = x.dims2()?;
    let (e, _, kw) = w.dims3()?;
    if r != rows || kw != k || e != plan.num_experts() || x.dtype() != w.dtype() {
        candle_core::bail!(
            "{what}: input {:?} {:?} and weights {:?} {:?} do not fit a plan of {} experts and {rows} rows",
            x.dims(),
            x.dtype(),
            w.dims(),
            w.dtype(),
            plan.num_experts()
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    /// (X [T,K], W [E,M,K]) → X[token(r)] · W_eᵀ [N, M]
    GatherForward,
    /// (H [N,K], W [E,M,K]) → unpermute_sum(H_e · W_eᵀ) [T, M]
    CombineForward,
    /// (dY [N,M], X [T,K]) → dY_eᵀ · X[token(rows of e)] [E, M, K]
    GatherWeightGrad,
    /// (G [T,M], W [E,M,K]) → G[token(r)] · W_e [N, K]
    CombineInputGrad,
    /// (G [T,M], H [N,K]) → G[token(rows of e)]ᵀ · H_e [E, M, K]
    CombineWeightGrad,
}

struct PlanGemm {
    plan: Arc<RoutePlan>,
    which: Which,
}

impl PlanGemm {
    fn run<T: Real>(&self, a: &[T], a_dims: &[usize], b: &[T], b_dims: &[usize]) -> (Vec<T>, Shape) {
        let plan = &*self.plan;
        let offsets: Vec<usize> = plan.offsets().iter().map(|&o| o as usize).collect();
        let (n, t, e) = (plan.kept(), plan.tokens(), plan.num_experts());
        let gathered = Some(plan);
        match self.which {
            Which::GatherForward => {
                let out = grouped_cpu(Kind::Forward, a, a_dims[1], gathered, b, b_dims, None, &offsets);
                (out, Shape::from((n, b_dims[1])))
            }
            Which::CombineForward => {
                let yp = grouped_cpu(Kind::Forward, a, a_dims[1], None, b, b_dims, None, &offsets);
                (unpermute_cpu(plan, &yp, b_dims[1], None), Shape::from((t, b_dims[1])))
            }
            Which::GatherWeightGrad => {
                let out = grouped_cpu(Kind::WeightGrad, a, a_dims[1], None, b, b_dims, gathered, &offsets);
                (out, Shape::from((e, a_dims[1], b_dims[1])))
            }
            Which::CombineInputGrad => {
                let out = grouped_cpu(Kind::InputGrad, a, a_dims[1], gathered, b, b_dims, None, &offsets);
                (out, Shape::from((n, b_dims[2])))
            }
            Which::CombineWeightGrad => {
                let out = grouped_cpu(Kind::WeightGrad, a, a_dims[1], gathered, b, b_dims, None, &offsets);
                (out, Shape::from((e, a_dims[1], b_dims[1])))
            }
        }
    }
}

impl CustomOp2 for PlanGemm {
    fn name(&self) -> &'static str {
        match self.which {
            Which::GatherForward => "gather-matmul",
            Which::CombineForward => "matmul-combine",
            Which::GatherWeightGrad => "gather-matmul-dw",
            Which::CombineInputGrad => "matmul-combine-dx",
            Which::CombineWeightGrad => "matmul-combine-dw",
        }
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if s1.dtype() != s2.dtype() {
            candle_core::bail!("{}: dtypes differ ({:?} vs {:?})", self.name(), s1.dtype(), s2.dtype());
        }
        check_float(s1.dtype(), self.name())?;
        let (a_dims, b_dims) = (l1.shape().dims(), l2.shape().dims());
        let shape;
        let out = by_dtype!(s1.dtype(), self.name(), |T| {
            let (out, sh) = self.run::<T>(slice(s1, l1, self.name())?, a_dims, slice(s2, l2, self.name())?, b_dims);
            shape = sh;
            out
        });
        Ok((out, shape))
    }

    /// On CUDA the gathered operand is materialised before cuBLAS's grouped product, and the
    /// combine runs after it (cuBLAS takes dense operands).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda_ops::{combine, gather, grouped_gemm};
        let plan = &*self.plan;
        let offsets: Vec<usize> = plan.offsets().iter().map(|&o| o as usize).collect();
        let (a_dims, b_dims) = (l1.shape().dims(), l2.shape().dims());
        let n = plan.kept();
        match self.which {
            Which::GatherForward => {
                let x = gather(s1, l1, None, plan)?;
                grouped_gemm(Kind::Forward, &x, &Layout::contiguous((n, a_dims[1])), s2, l2, &offsets)
            }
            Which::CombineForward => {
                let (y, _) = grouped_gemm(Kind::Forward, s1, l1, s2, l2, &offsets)?;
                let y = combine(&y, &Layout::contiguous((n, b_dims[1])), None, plan)?;
                Ok((y, Shape::from((plan.tokens(), b_dims[1]))))
            }
            Which::GatherWeightGrad => {
                let x = gather(s2, l2, None, plan)?;
                grouped_gemm(Kind::WeightGrad, s1, l1, &x, &Layout::contiguous((n, b_dims[1])), &offsets)
            }
            Which::CombineInputGrad => {
                let g = gather(s1, l1, None, plan)?;
                grouped_gemm(Kind::InputGrad, &g, &Layout::contiguous((n, a_dims[1])), s2, l2, &offsets)
            }
            Which::CombineWeightGrad => {
                let g = gather(s1, l1, None, plan)?;
                grouped_gemm(Kind::WeightGrad, &g, &Layout::contiguous((n, a_dims[1])), s2, l2, &offsets)
            }
        }
    }

    fn bwd(&self, a: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let op = |which| PlanGemm { plan: self.plan.clone(), which };
        match self.which {
            Which::GatherForward => {
                let offsets = self.plan.offsets_tensor(a.device())?;
                let per_row = grad.apply_op3_no_bwd(w, &offsets, &GroupedGemm(Kind::InputGrad))?;
                let dx = unpermute_sum(&per_row, &self.plan)?;
                let dw = grad.apply_op2_no_bwd(a, &op(Which::GatherWeightGrad))?;
                Ok((Some(dx), Some(dw)))
            }
            Which::CombineForward => {
                let dh = grad.apply_op2_no_bwd(w, &op(Which::CombineInputGrad))?;
                let dw = grad.apply_op2_no_bwd(a, &op(Which::CombineWeightGrad))?;
                Ok((Some(dh), Some(dw)))
            }
            _ => candle_core::bail!("{}: no second-order gradient", self.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, finite_difference_check, random};
    use candle_core::{Device, Var};

    /// The plain loop: one matmul per non-empty group, concatenated.
    fn reference(x: &Tensor, w: &Tensor, offsets: &[u32]) -> Tensor {
        let mut parts = Vec::new();
        for (e, span) in offsets.windows(2).enumerate() {
            let rows = (span[1] - span[0]) as usize;
            if rows > 0 {
                let xe = x.narrow(0, span[0] as usize, rows).unwrap();
                parts.push(xe.matmul(&w.get(e).unwrap().t().unwrap()).unwrap());
            }
        }
        Tensor::cat(&parts, 0).unwrap()
    }

    #[test]
    fn matches_a_loop_of_matmuls_with_empty_groups_and_ragged_tiles() {
        // Groups of 0, 600 (crosses a tile edge), 0, 1 and 23 rows; M = 520 crosses one too.
        let offsets = [0u32, 0, 600, 600, 601, 624];
        let x = Var::from_tensor(&random(&[624, 40], 1, DType::F32)).unwrap();
        let w = Var::from_tensor(&random(&[5, 520, 40], 2, DType::F32)).unwrap();
        let probe = random(&[624, 520], 3, DType::F32);
        let off = Tensor::new(&offsets, &Device::Cpu).unwrap();

        let fused = grouped_matmul(&x, &w, &off).unwrap();
        let plain = reference(&x, &w, &offsets);
        assert_close(&fused, &plain, 1e-5, "forward");

        let g_fused = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g_plain = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(g_fused.get(&x).unwrap(), g_plain.get(&x).unwrap(), 1e-5, "dX");
        let dw = g_fused.get(&w).unwrap();
        assert_close(dw, g_plain.get(&w).unwrap(), 1e-5, "dW");
        // Experts 0 and 2 saw no rows: exactly zero gradient.
        for e in [0, 2] {
            assert_eq!(dw.get(e).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn gradients_pass_finite_differences() {
        let off = Tensor::new(&[0u32, 3, 3, 7], &Device::Cpu).unwrap();
        let x = Var::from_tensor(&random(&[7, 4], 4, DType::F64)).unwrap();
        let w = Var::from_tensor(&random(&[3, 5, 4], 5, DType::F64)).unwrap();
        let probe = random(&[7, 5], 6, DType::F64);
        finite_difference_check(&[&x, &w], |v| (grouped_matmul(v[0], v[1], &off)? * &probe)?.sqr()?.sum_all());
    }

    #[test]
    fn rejects_bad_offsets_and_shapes() {
        let x = random(&[4, 3], 1, DType::F32);
        let w = random(&[2, 5, 3], 2, DType::F32);
        let falling = Tensor::new(&[0u32, 3, 2], &Device::Cpu).unwrap();
        assert!(grouped_matmul(&x, &w, &falling).is_err());
        let short = Tensor::new(&[0u32, 3, 3], &Device::Cpu).unwrap();
        assert!(grouped_matmul(&x, &w, &short).is_err());
        let ok = Tensor::new(&[0u32, 1, 4], &Device::Cpu).unwrap();
        assert!(grouped_matmul(&x, &random(&[2, 5, 4], 2, DType::F32), &ok).is_err());
        assert_eq!(grouped_matmul(&x, &w, &ok).unwrap().dims(), &[4, 5]);
    }

    #[test]
    fn gathered_and_combined_products_match_permute_and_unpermute() {
        use crate::permute::{permute, unpermute_sum};
        // 5 tokens, k = 2, 3 experts (expert 1 idle), one dropped slot.
        let experts = [0u32, 2, 2, 0, 0, 2, 2, 0, 0, 2];
        let keep = [true, true, true, true, false, true, true, true, true, true];
        let plan = Arc::new(RoutePlan::new(&experts, 2, 3, Some(&keep)).unwrap());
        let off = plan.offsets_tensor(&Device::Cpu).unwrap();
        let x = Var::from_tensor(&random(&[5, 6], 1, DType::F32)).unwrap();
        let w = Var::from_tensor(&random(&[3, 4, 6], 2, DType::F32)).unwrap();
        let probe = random(&[9, 4], 3, DType::F32);
        let fused = gather_matmul(&x, &w, &plan).unwrap();
        let plain = grouped_matmul(&permute(&x, &plan).unwrap(), &w, &off).unwrap();
        assert_close(&fused, &plain, 1e-6, "gather_matmul");
        let gf = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(gf.get(&x).unwrap(), gp.get(&x).unwrap(), 1e-6, "gather dX");
        assert_close(gf.get(&w).unwrap(), gp.get(&w).unwrap(), 1e-6, "gather dW");

        let h = Var::from_tensor(&random(&[9, 6], 4, DType::F32)).unwrap();
        let probe = random(&[5, 4], 5, DType::F32);
        let fused = matmul_combine(&h, &w, &plan).unwrap();
        let plain = unpermute_sum(&grouped_matmul(&h, &w, &off).unwrap(), &plan).unwrap();
        assert_close(&fused, &plain, 1e-6, "matmul_combine");
        let gf = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(gf.get(&h).unwrap(), gp.get(&h).unwrap(), 1e-6, "combine dH");
        assert_close(gf.get(&w).unwrap(), gp.get(&w).unwrap(), 1e-6, "combine dW");
        assert!(gather_matmul(&h, &w, &plan).is_err(), "9 rows is not 5 tokens");
    }

    #[test]
    fn gathered_and_combined_gradients_pass_finite_differences() {
        let experts = [1u32, 0, 1, 1, 0, 1, 0, 1];
        let plan = Arc::new(RoutePlan::new(&experts, 2, 3, None).unwrap());
        let x = Var::from_tensor(&random(&[4, 3], 7, DType::F64)).unwrap();
        let w = Var::from_tensor(&random(&[3, 5, 3], 8, DType::F64)).unwrap();
        let probe = random(&[8, 5], 9, DType::F64);
        finite_difference_check(&[&x, &w], |v| (gather_matmul(v[0], v[1], &plan)? * &probe)?.sqr()?.sum_all());
        let h = Var::from_tensor(&random(&[8, 3], 10, DType::F64)).unwrap();
        let probe = random(&[4, 5], 11, DType::F64);
        finite_difference_check(&[&h, &w], |v| (matmul_combine(v[0], v[1], &plan)? * &probe)?.sqr()?.sum_all());
    }
}
