//! Fused causal self-attention and rotary embeddings for the CPU, with their backward passes.
//!
//! Attention `O = softmax(scale · Q Kᵀ + causal mask) V` per head, grouped-query (Ainslie et
//! al. 2023: query head `h` reads key/value head `h / group`), optionally with a sliding window.
//! Q, K and V stay in the projections' [B, T, heads · D] layout: the products read them with
//! strides, so no transposes, no repeated key/value heads and no [B, H, T, T] mask tensor are
//! materialised, and the whole chain (two products, scale, mask, softmax) is one graph node
//! instead of about ten. The backward pass recomputes the probabilities (as FlashAttention
//! does; Dao et al. 2022) rather than storing them:
//! - `dP = dO Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))`
//! - `dQ = scale · dS K`, `dK = scale · dSᵀ Q`, `dV = Pᵀ dO` (summed over a key/value head's group)
//!
//! Rotary embeddings (Su et al. 2021, Hugging Face's `rotate_half` convention) on [B, T, H, D]:
//! `y = x · cos + rotate_half(x) · sin`; the backward pass is the same map with `−sin`.
//!
//! Work is split over (batch, key/value head) pairs on rayon's pool; each pair's products run
//! single-threaded through the `gemm` crate.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{by_dtype, slice, Real, SendPtr};

/// The shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies the scores (usually 1/√D).
    pub scale: f64,
    /// Query `i` sees keys `j` with `i − window < j ≤ i`; `None` = all `j ≤ i`.
    pub window: Option<usize>,
}

/// Causal attention over the token rows of B sequences of `seq_len` tokens: q [B·T, heads · D]
/// and k, v [B·T, kv_heads · D] (the projections' outputs; a leading [B, T] works too); returns
/// q's shape. Differentiable in q, k and v.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, seq_len: usize, shape: AttentionShape) -> Result<Tensor> {
    let qw = q.dim(candle_core::D::Minus1)?;
    let rows = q.elem_count() / qw.max(1);
    let kv_w = shape.kv_heads * shape.head_dim;
    if shape.kv_heads == 0
        || !shape.heads.is_multiple_of(shape.kv_heads)
        || qw != shape.heads * shape.head_dim
        || seq_len == 0
        || !rows.is_multiple_of(seq_len)
        || !(shape.scale > 0.0)
    {
        candle_core::bail!("causal_attention: q {:?} does not fit {shape:?} with sequences of {seq_len}", q.dims());
    }
    for (name, x) in [("k", k), ("v", v)] {
        if x.elem_count() != rows * kv_w || x.dim(candle_core::D::Minus1)? != kv_w || x.dtype() != q.dtype() {
            candle_core::bail!("causal_attention: {name} {:?} {:?}, expected {rows} rows of {kv_w} {:?}", x.dims(), x.dtype(), q.dtype());
        }
    }
    let op = Attention { shape, batch: rows / seq_len, seq_len };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct Attention {
    shape: AttentionShape,
    batch: usize,
    seq_len: usize,
}

/// Backward: (q ‖ k ‖ v flattened, O, dO) → dq ‖ dk ‖ dv flattened.
struct AttentionGrad {
    shape: AttentionShape,
    batch: usize,
    seq_len: usize,
}

/// Strided matrix views for `gemm`: (pointer, row stride, column stride).
type View<T> = (*const T, usize, usize);

/// `dst = beta · lhs · rhs` (or `dst += …` when `accumulate`), one thread.
///
/// # Safety
/// All pointers must be valid for the strided extents of an m×depth, depth×n and m×n matrix.
unsafe fn gemm<T: Real>(
    (m, n, depth): (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    accumulate: bool,
    lhs: View<T>,
    rhs: View<T>,
    beta: T,
) {
    gemm::gemm(
        m,
        n,
        depth,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        T::one(),
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// The keys query `i` may see: `lo..=i`.
fn first_key(i: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (i + 1).saturating_sub(w))
}

/// Query rows per block. A block of queries `i0..i1` only needs keys `first_key(i0)..i1`, so
/// the products skip the masked upper triangle (about 40 % of the work at T = 256).
const QUERY_BLOCK: usize = 64;

/// The query blocks of a sequence of `t` tokens: (queries `i0..i1`, keys `lo..i1`).
fn blocks(t: usize, window: Option<usize>) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..t).step_by(QUERY_BLOCK).map(move |i0| (i0, (i0 + QUERY_BLOCK).min(t), first_key(i0, window)))
}

/// Offset a strided view by `rows` rows.
fn down<T>(view: View<T>, rows: usize) -> View<T> {
    // SAFETY (for callers): the offset stays inside the buffer the view was made from.
    (view.0.wrapping_add(rows * view.1), view.1, view.2)
}

/// The largest element (−∞ for none), over eight running maxima.
fn max_of<T: Real>(xs: &[T]) -> T {
    let neg_inf = T::from_f64(f64::NEG_INFINITY);
    let mut lanes = [neg_inf; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(neg_inf, |m, &x| if x > m { x } else { m });
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    lanes.iter().fold(tail, |m, &x| if x > m { x } else { m })
}

/// The sum of the elements, over eight running sums.
fn sum_of<T: Real>(xs: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(T::zero(), |acc, &x| acc + x);
    for c in chunks {
        for (acc, &x) in lanes.iter_mut().zip(c) {
            *acc += x;
        }
    }
    lanes.iter().fold(tail, |acc, &x| acc + x)
}

/// Probabilities of one head for queries `i0..i1` over keys `lo..i1` into `p`
/// [(i1 − i0) × (i1 − lo)]: scores `scale · q kᵀ`, masked softmax per row.
///
/// # Safety
/// `q` must be valid for rows `i0..i1` and `k` for rows `lo..i1`, D elements each.
unsafe fn probabilities<T: Real>(p: &mut [T], (i0, i1, lo): (usize, usize, usize), d: usize, q: View<T>, k: View<T>, s: &AttentionShape) {
    let width = i1 - lo;
    let k = down(k, lo);
    // S = Q Kᵀ: Kᵀ's (row, column) strides are K's (column, row) strides.
    gemm((i1 - i0, width, d), (p.as_mut_ptr(), width), false, down(q, i0), (k.0, k.2, k.1), T::one());
    let scale = T::from_f64(s.scale);
    for (r, row) in p[..(i1 - i0) * width].chunks_mut(width).enumerate() {
        let i = i0 + r;
        let (first, last) = (first_key(i, s.window) - lo, i - lo);
        let seen = &mut row[first..=last];
        // softmax(scale · s) with max(scale · s) = scale · max(s) (scale > 0); each loop is
        // branch-free so that it vectorises.
        let max = max_of(seen) * scale;
        for x in seen.iter_mut() {
            *x = (*x * scale - max).exp();
        }
        let inv = T::one() / sum_of(seen);
        seen.iter_mut().for_each(|x| *x *= inv);
        row[..first].iter_mut().for_each(|x| *x = T::zero());
        row[last + 1..].iter_mut().for_each(|x| *x = T::zero());
    }
}

fn forward_cpu<T: Real>(q: &[T], k: &[T], v: &[T], b: usize, t: usize, s: &AttentionShape) -> Vec<T> {
    let (d, hq, hkv) = (s.head_dim, s.heads, s.kv_heads);
    let group = hq / hkv;
    let (qw, kw) = (hq * d, hkv * d);
    let mut out = vec![T::zero(); b * t * qw];
    let dst = SendPtr(out.as_mut_ptr());
    (0..b * hkv).into_par_iter().for_each_init(
        || vec![T::zero(); QUERY_BLOCK.min(t) * t],
        |p, task| {
            let (bi, kvh) = (task / hkv, task % hkv);
            let k_h = (k[bi * t * kw + kvh * d..].as_ptr(), kw, 1);
            let v_h = (v[bi * t * kw + kvh * d..].as_ptr(), kw, 1);
            for h in kvh * group..(kvh + 1) * group {
                let at = bi * t * qw + h * d;
                let q_h = (q[at..].as_ptr(), qw, 1);
                for (i0, i1, lo) in blocks(t, s.window) {
                    let width = i1 - lo;
                    // SAFETY: every view lies inside its buffer (row i of head h at at + i·width);
                    // each task writes only its own heads' columns of `out`.
                    unsafe {
                        probabilities(p, (i0, i1, lo), d, q_h, k_h, s);
                        let o = dst.get().add(at + i0 * qw);
                        gemm((i1 - i0, d, width), (o, qw), false, (p.as_ptr(), width, 1), down(v_h, lo), T::one());
                    }
                }
            }
        },
    );
    out
}

/// `(dq ‖ dk ‖ dv)` for q, k, v, the forward output `o` and its gradient `g`.
fn backward_cpu<T: Real>((q, k, v): (&[T], &[T], &[T]), o: &[T], g: &[T], (b, t): (usize, usize), s: &AttentionShape) -> Vec<T> {
    let (d, hq, hkv) = (s.head_dim, s.heads, s.kv_heads);
    let group = hq / hkv;
    let (qw, kw) = (hq * d, hkv * d);
    // dk and dv accumulate over query heads and blocks: they start at zero.
    let mut out = vec![T::zero(); b * t * (qw + 2 * kw)];
    let (dq, dkv) = out.split_at_mut(b * t * qw);
    let (dk, dv) = dkv.split_at_mut(b * t * kw);
    let (dq, dk, dv) = (SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    let scale = T::from_f64(s.scale);
    let block = QUERY_BLOCK.min(t);
    (0..b * hkv).into_par_iter().for_each_init(
        || (vec![T::zero(); block * t], vec![T::zero(); block * t], vec![T::zero(); block]),
        |(p, dp, row_dot), task| {
            let (bi, kvh) = (task / hkv, task % hkv);
            let kv_at = bi * t * kw + kvh * d;
            let k_h = (k[kv_at..].as_ptr(), kw, 1);
            let v_h = (v[kv_at..].as_ptr(), kw, 1);
            for h in kvh * group..(kvh + 1) * group {
                let at = bi * t * qw + h * d;
                let q_h = (q[at..].as_ptr(), qw, 1);
                let g_h = (g[at..].as_ptr(), qw, 1);
                for (i0, i1, lo) in blocks(t, s.window) {
                    let (rows, width) = (i1 - i0, i1 - lo);
                    for (r, dot) in row_dot[..rows].iter_mut().enumerate() {
                        let row = at + (i0 + r) * qw;
                        *dot = o[row..row + d].iter().zip(&g[row..row + d]).fold(T::zero(), |acc, (&a, &b)| acc + a * b);
                    }
                    // SAFETY: as in forward_cpu; this task owns heads kvh·group.. of dq and head
                    // kvh of dk and dv.
                    unsafe {
                        probabilities(p, (i0, i1, lo), d, q_h, k_h, s);
                        // dP = dO Vᵀ
                        let v_lo = down(v_h, lo);
                        gemm((rows, width, d), (dp.as_mut_ptr(), width), false, down(g_h, i0), (v_lo.0, v_lo.2, v_lo.1), T::one());
                        // dS = P ⊙ (dP − rowsum(dO ⊙ O))
                        for (r, (dp_row, p_row)) in dp.chunks_mut(width).zip(p.chunks(width)).take(rows).enumerate() {
                            for (x, &pr) in dp_row.iter_mut().zip(p_row) {
                                *x = pr * (*x - row_dot[r]);
                            }
                        }
                        let ds = (dp.as_ptr(), width, 1);
                        let ds_t = (dp.as_ptr(), 1, width);
                        let p_t = (p.as_ptr(), 1, width);
                        gemm((rows, d, width), (dq.get().add(at + i0 * qw), qw), false, ds, down(k_h, lo), scale);
                        gemm((width, d, rows), (dk.get().add(kv_at + lo * kw), kw), true, ds_t, down(q_h, i0), scale);
                        gemm((width, d, rows), (dv.get().add(kv_at + lo * kw), kw), true, p_t, down(g_h, i0), T::one());
                    }
                }
            }
        },
    );
    out
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
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
        let name = "causal-attention";
        let out = by_dtype!(s1.dtype(), name, |T| forward_cpu::<T>(
            slice(s1, l1, name)?,
            slice(s2, l2, name)?,
            slice(s3, l3, name)?,
            self.batch,
            self.seq_len,
            &self.shape
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Custom ops take at most three inputs: q, k and v travel as one buffer.
        let qkv = Tensor::cat(&[q.flatten_all()?, k.flatten_all()?, v.flatten_all()?], 0)?;
        let grad_op = AttentionGrad { shape: self.shape, batch: self.batch, seq_len: self.seq_len };
        let all = qkv.apply_op3_no_bwd(res, &grad.contiguous()?, &grad_op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        Ok((
            Some(all.narrow(0, 0, nq)?.reshape(q.shape())?),
            Some(all.narrow(0, nq, nk)?.reshape(k.shape())?),
            Some(all.narrow(0, nq + nk, nk)?.reshape(v.shape())?),
        ))
    }
}

impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        "causal-attention-grad"
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
        let name = "causal-attention-grad";
        let (b, t, s) = (self.batch, self.seq_len, &self.shape);
        let (nq, nk) = (b * t * s.heads * s.head_dim, b * t * s.kv_heads * s.head_dim);
        let out = by_dtype!(s1.dtype(), name, |T| {
            let qkv = slice::<T>(s1, l1, name)?;
            backward_cpu::<T>(
                (&qkv[..nq], &qkv[nq..nq + nk], &qkv[nq + nk..]),
                slice(s2, l2, name)?,
                slice(s3, l3, name)?,
                (b, t),
                s,
            )
        });
        Ok((out, Shape::from(nq + 2 * nk)))
    }
}

/// Rotary embeddings on the token rows of B sequences: x [B·T, heads · D] (or [B, T, heads · D])
/// with cos and sin tables [T, D] for positions 0..T. Differentiable in x.
pub fn rotary(xs: &Tensor, cos: &Tensor, sin: &Tensor, head_dim: usize) -> Result<Tensor> {
    let (t, d) = cos.dims2()?;
    let width = xs.dim(candle_core::D::Minus1)?;
    if d != head_dim || sin.dims() != [t, d] || !width.is_multiple_of(d) || !xs.elem_count().is_multiple_of((t * width).max(1)) {
        candle_core::bail!("rotary: x {:?} does not fit cos {:?} / sin {:?} with head_dim {head_dim}", xs.dims(), cos.dims(), sin.dims());
    }
    let (cos, sin) = (cos.to_dtype(xs.dtype())?.contiguous()?, sin.to_dtype(xs.dtype())?.contiguous()?);
    xs.contiguous()?.apply_op3(&cos, &sin, Rotary { heads: width / d, inverse: false })
}

/// `x · cos + rotate_half(x) · sin`, or its transpose when `inverse` (the backward pass; with
/// Hugging Face's tables, whose halves repeat, that is the same map with `−sin`).
struct Rotary {
    heads: usize,
    inverse: bool,
}

fn rotary_cpu<T: Real>(x: &[T], cos: &[T], sin: &[T], (t, h, d): (usize, usize, usize), inverse: bool) -> Vec<T> {
    const ROWS: usize = 64;
    let half = d / 2;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d * ROWS).enumerate().for_each(|(c, dst)| {
        for (r, y) in dst.chunks_mut(d).enumerate() {
            // Row (b, pos, head) of [B, T, H, D].
            let row = c * ROWS + r;
            let pos = (row / h) % t;
            let (c, s) = (&cos[pos * d..][..d], &sin[pos * d..][..d]);
            let x = &x[row * d..][..d];
            for i in 0..half {
                if inverse {
                    // The transpose of the forward map below.
                    y[i] = x[i] * c[i] + x[i + half] * s[i + half];
                    y[i + half] = x[i + half] * c[i + half] - x[i] * s[i];
                } else {
                    // rotate_half(x) = (−x₂, x₁)
                    y[i] = x[i] * c[i] - x[i + half] * s[i];
                    y[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
                }
            }
        }
    });
    out
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "rotary"
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
        let name = "rotary";
        let (t, d) = l2.shape().dims2()?;
        let h = self.heads;
        let out = by_dtype!(s1.dtype(), name, |T| rotary_cpu::<T>(
            slice(s1, l1, name)?,
            slice(s2, l2, name)?,
            slice(s3, l3, name)?,
            (t, h, d),
            self.inverse
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &Rotary { heads: self.heads, inverse: !self.inverse })?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, finite_difference_check, random};
    use candle_core::{DType, Var, D};

    /// The plain candle chain the model used before: heads transposed out, keys/values repeated,
    /// an additive mask, softmax from primitives.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, s: AttentionShape) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let heads = |x: &Tensor, n: usize| x.reshape((b, t, n, s.head_dim))?.transpose(1, 2)?.contiguous();
        let group = s.heads / s.kv_heads;
        let repeat = |x: Tensor| -> Result<Tensor> {
            let (b, n, t, d) = x.dims4()?;
            x.unsqueeze(2)?.expand((b, n, group, t, d))?.reshape((b, n * group, t, d))
        };
        let (q, k, v) = (heads(q, s.heads)?, repeat(heads(k, s.kv_heads)?)?, repeat(heads(v, s.kv_heads)?)?);
        let window = s.window.unwrap_or(usize::MAX);
        let mask: Vec<f64> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i && i - j < window { 0.0 } else { f64::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), q.device())?.to_dtype(q.dtype())?;
        let scores = (q.matmul(&k.t()?)? * s.scale)?.broadcast_add(&mask)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, s.heads * s.head_dim))
    }

    fn shapes() -> Vec<AttentionShape> {
        let base = AttentionShape { heads: 4, kv_heads: 4, head_dim: 8, scale: 8f64.powf(-0.5), window: None };
        vec![
            base,
            AttentionShape { kv_heads: 2, ..base },
            AttentionShape { kv_heads: 1, window: Some(3), ..base },
            AttentionShape { kv_heads: 2, window: Some(70), ..base },
        ]
    }

    #[test]
    fn matches_the_plain_chain_with_gradients() {
        // 11 tokens: one query block; 150: three, the last one partial.
        for (s, t) in shapes().into_iter().flat_map(|s| [(s, 11), (s, 150)]) {
            let b = 2;
            let q = Var::from_tensor(&random(&[b, t, s.heads * s.head_dim], 1, DType::F32)).unwrap();
            let k = Var::from_tensor(&random(&[b, t, s.kv_heads * s.head_dim], 2, DType::F32)).unwrap();
            let v = Var::from_tensor(&random(&[b, t, s.kv_heads * s.head_dim], 3, DType::F32)).unwrap();
            let probe = random(&[b, t, s.heads * s.head_dim], 4, DType::F32);
            let fused = causal_attention(&q, &k, &v, t, s).unwrap();
            let plain = reference(&q, &k, &v, s).unwrap();
            assert_close(&fused, &plain, 1e-5, "forward");
            let gf = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gp = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, x) in [("dq", &q), ("dk", &k), ("dv", &v)] {
                assert_close(gf.get(x).unwrap(), gp.get(x).unwrap(), 1e-5, name);
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for s in shapes() {
            let s = AttentionShape { head_dim: 4, ..s };
            let (b, t) = (1, 5);
            let q = Var::from_tensor(&random(&[b, t, s.heads * 4], 5, DType::F64)).unwrap();
            let k = Var::from_tensor(&random(&[b, t, s.kv_heads * 4], 6, DType::F64)).unwrap();
            let v = Var::from_tensor(&random(&[b, t, s.kv_heads * 4], 7, DType::F64)).unwrap();
            let probe = random(&[b, t, s.heads * 4], 8, DType::F64);
            finite_difference_check(&[&q, &k, &v], |x| (causal_attention(x[0], x[1], x[2], t, s)? * &probe)?.sum_all());
        }
    }

    /// The model's rotary map from candle primitives.
    fn rotary_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let rotated = Tensor::cat(&[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?], D::Minus1)?;
        // Tables [T, D] against x [B, T, H, D]: broadcast over B and H.
        let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }

    #[test]
    fn rotary_matches_primitives_with_gradients() {
        let (b, t, h, d) = (2, 7, 3, 8);
        let x = Var::from_tensor(&random(&[b, t, h, d], 9, DType::F64)).unwrap();
        let cos = random(&[t, d], 10, DType::F64);
        let sin = random(&[t, d], 11, DType::F64);
        let probe = random(&[b, t, h, d], 12, DType::F64);
        let fused = rotary(&x.reshape((b * t, h * d)).unwrap(), &cos, &sin, d).unwrap().reshape((b, t, h, d)).unwrap();
        let plain = rotary_reference(&x, &cos, &sin).unwrap();
        assert_close(&fused, &plain, 1e-12, "forward");
        let gf = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(gf.get(&x).unwrap(), gp.get(&x).unwrap(), 1e-12, "dx");
    }
}
