//! Fused causal self-attention with rotary embeddings for the CPU, with its backward pass.
//!
//! One op takes the packed output of the q, k and v projections, [B·T, (H + 2·H_kv)·D] (each
//! row `[q | k | v]`), rotates q and k (Su et al. 2021, Hugging Face's `rotate_half`
//! convention: `x · cos + rotate_half(x) · sin`) and computes
//! `O = softmax(scale · Q Kᵀ + causal mask) V` per head, grouped-query (Ainslie et al. 2023:
//! query head `h` reads key/value head `h / group`), optionally with a sliding window. The
//! products read q, k and v with strides, so no transposes, no repeated key/value heads and no
//! [B, H, T, T] mask tensor are materialised, and the whole chain (rotations, two products,
//! scale, mask, softmax) is one graph node instead of about twenty. The backward pass
//! recomputes the probabilities (as FlashAttention does; Dao et al. 2022) rather than storing
//! them, and writes the gradient in the packed layout:
//! - `dP = dO Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))`
//! - `dQ = scale · dS K`, `dK = scale · dSᵀ Q`, `dV = Pᵀ dO` (summed over a key/value head's
//!   group), then dQ and dK rotated back (the rotation's transpose).
//!
//! Query blocks skip the masked upper triangle. Work is split over (batch, key/value head)
//! pairs on rayon's pool; each pair's products run single-threaded through the `gemm` crate,
//! so results do not depend on the thread count.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{by_dtype, slice, Real, SendPtr};

/// The shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Query heads per token.
    pub heads: usize,
    /// Key/value heads per token; must divide `heads` (each serves `heads / kv_heads` query heads).
    pub kv_heads: usize,
    /// Width D of one head; must be even (the rotary embedding rotates pairs).
    pub head_dim: usize,
    /// Multiplies the scores (usually 1/√D); must be positive.
    pub scale: f64,
    /// Query `i` sees keys `j` with `i − window < j ≤ i`; `None` = all `j ≤ i`.
    pub window: Option<usize>,
}

impl AttentionShape {
    /// Elements of one packed row: q, then k, then v.
    pub fn packed_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// Causal attention over the token rows of B sequences of `seq_len` tokens. `qkv` is
/// [B·T, (heads + 2·kv_heads)·D], rows `[q | k | v]` before the rotary embedding; `cos` and
/// `sin` are the rotary tables [T, D] for positions 0..T. Returns [B·T, heads·D].
/// Differentiable in `qkv`.
pub fn causal_attention(qkv: &Tensor, seq_len: usize, shape: AttentionShape, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (rows, width) = qkv.dims2()?;
    let d = shape.head_dim;
    if shape.kv_heads == 0
        || !shape.heads.is_multiple_of(shape.kv_heads)
        || width != shape.packed_width()
        || !d.is_multiple_of(2)
        || seq_len == 0
        || !rows.is_multiple_of(seq_len)
        || shape.scale.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
    {
        candle_core::bail!("causal_attention: qkv {:?} does not fit {shape:?} with sequences of {seq_len}", qkv.dims());
    }
    if cos.dims() != [seq_len, d] || sin.dims() != [seq_len, d] {
        candle_core::bail!("causal_attention: rotary tables {:?} / {:?}, expected [{seq_len}, {d}]", cos.dims(), sin.dims());
    }
    let table =
        |t: &Tensor| -> Result<Arc<Vec<f64>>> { Ok(Arc::new(t.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1::<f64>()?)) };
    let op = Attention { shape, batch: rows / seq_len, seq_len, cos: table(cos)?, sin: table(sin)? };
    qkv.contiguous()?.apply_op1(op)
}

/// The forward op, and (through `grad: true`) its backward: (qkv, O, dO) → d(qkv).
#[derive(Clone)]
struct Attention {
    shape: AttentionShape,
    batch: usize,
    seq_len: usize,
    /// Rotary tables [T, D], row-major.
    cos: Arc<Vec<f64>>,
    sin: Arc<Vec<f64>>,
}

/// Rotate one row of D elements at a position with tables `c`, `s`: `x · cos + rotate_half(x)
/// · sin`, or its transpose when `inverse` (the backward pass; with Hugging Face's tables,
/// whose halves repeat, that is the same map with `−sin`).
fn rotate<T: Real>(src: &[T], dst: &mut [T], c: &[T], s: &[T], inverse: bool) {
    let half = src.len() / 2;
    for i in 0..half {
        let (x1, x2) = (src[i], src[i + half]);
        if inverse {
            dst[i] = x1 * c[i] + x2 * s[i + half];
            dst[i + half] = x2 * c[i + half] - x1 * s[i];
        } else {
            // rotate_half(x) = (−x₂, x₁)
            dst[i] = x1 * c[i] - x2 * s[i];
            dst[i + half] = x2 * c[i + half] + x1 * s[i + half];
        }
    }
}

/// Head `head` of every row of one sequence in `qkv` (row stride `width`), rotated, into
/// `dst` [T, D].
fn rotated_head<T: Real>(qkv: &[T], width: usize, offset: usize, d: usize, (cos, sin): (&[T], &[T]), dst: &mut [T]) {
    for (i, out) in dst.chunks_mut(d).enumerate() {
        let src = &qkv[i * width + offset..][..d];
        rotate(src, out, &cos[i * d..][..d], &sin[i * d..][..d], false);
    }
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
#[inline(always)]
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
#[inline(always)]
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
    masked_softmax(&mut p[..(i1 - i0) * width], width, i0, lo, s.window, T::from_f64(s.scale));
}

crate::multiversion! {
    /// Rows of scores for queries `i0..` over the `width` keys `lo..` into probabilities:
    /// masked keys set to 0, `softmax(scale · s)` over the others.
    fn masked_softmax<T: Real>(p: &mut [T], width: usize, i0: usize, lo: usize, window: Option<usize>, scale: T) {
        for (r, row) in p.chunks_mut(width).enumerate() {
            let i = i0 + r;
            let (first, last) = (first_key(i, window) - lo, i - lo);
            let seen = &mut row[first..=last];
            // softmax(scale · s) with max(scale · s) = scale · max(s) (scale > 0); each loop
            // is branch-free so that it vectorises.
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
}

fn forward_cpu<T: Real>(qkv: &[T], (b, t): (usize, usize), s: &AttentionShape, tables: (&[T], &[T])) -> Vec<T> {
    let (d, hq, hkv) = (s.head_dim, s.heads, s.kv_heads);
    let group = hq / hkv;
    let (width, qw) = (s.packed_width(), hq * d);
    let mut out = vec![T::zero(); b * t * qw];
    let dst = SendPtr(out.as_mut_ptr());
    let block = QUERY_BLOCK.min(t);
    (0..b * hkv).into_par_iter().for_each_init(
        || (vec![T::zero(); block * t], vec![T::zero(); t * d], vec![T::zero(); t * d]),
        |(p, q_rot, k_rot), task| {
            let (bi, kvh) = (task / hkv, task % hkv);
            let seq = &qkv[bi * t * width..][..t * width];
            rotated_head(seq, width, qw + kvh * d, d, tables, k_rot);
            let k_h = (k_rot.as_ptr(), d, 1);
            let v_h = (seq[qw + hkv * d + kvh * d..].as_ptr(), width, 1);
            for h in kvh * group..(kvh + 1) * group {
                rotated_head(seq, width, h * d, d, tables, q_rot);
                let q_h = (q_rot.as_ptr(), d, 1);
                for (i0, i1, lo) in blocks(t, s.window) {
                    // SAFETY: every view lies inside its buffer; each task writes only its own
                    // heads' columns of `out`.
                    unsafe {
                        probabilities(p, (i0, i1, lo), d, q_h, k_h, s);
                        let o = dst.get().add((bi * t + i0) * qw + h * d);
                        gemm((i1 - i0, d, i1 - lo), (o, qw), false, (p.as_ptr(), i1 - lo, 1), down(v_h, lo), T::one());
                    }
                }
            }
        },
    );
    out
}

/// Scratch buffers of one backward task.
struct GradScratch<T> {
    p: Vec<T>,
    dp: Vec<T>,
    row_dot: Vec<T>,
    q_rot: Vec<T>,
    k_rot: Vec<T>,
    dq: Vec<T>,
    dk: Vec<T>,
}

/// `Σ aᵢ·bᵢ` of one row, in order (D is small).
fn row_dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |acc, (&a, &b)| acc + a * b)
}

crate::multiversion! {
    /// `dS = P ⊙ (dP − rowsum(dO ⊙ O))` in place of `dp`, rows of `p.len() / row_dot.len()`.
    fn score_gradient<T: Real>(dp: &mut [T], p: &[T], row_dot: &[T]) {
        let keys = p.len() / row_dot.len().max(1);
        for ((dp_row, p_row), &dot) in dp.chunks_mut(keys).zip(p.chunks(keys)).zip(row_dot) {
            for (x, &pr) in dp_row.iter_mut().zip(p_row) {
                *x = pr * (*x - dot);
            }
        }
    }
}

/// d(qkv) for the packed input, the forward output `o` and its gradient `g`.
fn backward_cpu<T: Real>(qkv: &[T], o: &[T], g: &[T], (b, t): (usize, usize), s: &AttentionShape, tables: (&[T], &[T])) -> Vec<T> {
    let (d, hq, hkv) = (s.head_dim, s.heads, s.kv_heads);
    let group = hq / hkv;
    let (width, qw) = (s.packed_width(), hq * d);
    // dv accumulates over query heads and blocks: the buffer starts at zero.
    let mut out = vec![T::zero(); qkv.len()];
    let dst = SendPtr(out.as_mut_ptr());
    let scale = T::from_f64(s.scale);
    let block = QUERY_BLOCK.min(t);
    (0..b * hkv).into_par_iter().for_each_init(
        || GradScratch {
            p: vec![T::zero(); block * t],
            dp: vec![T::zero(); block * t],
            row_dot: vec![T::zero(); block],
            q_rot: vec![T::zero(); t * d],
            k_rot: vec![T::zero(); t * d],
            dq: vec![T::zero(); t * d],
            dk: vec![T::zero(); t * d],
        },
        |w, task| {
            let (bi, kvh) = (task / hkv, task % hkv);
            let seq = &qkv[bi * t * width..][..t * width];
            rotated_head(seq, width, qw + kvh * d, d, tables, &mut w.k_rot);
            w.dk.iter_mut().for_each(|x| *x = T::zero());
            let k_h = (w.k_rot.as_ptr(), d, 1);
            let v_h = (seq[qw + hkv * d + kvh * d..].as_ptr(), width, 1);
            // This task's own columns of d(qkv): its query heads, its k and v head.
            let seq_out = (bi * t) * width;
            let dv_h = unsafe { dst.get().add(seq_out + qw + hkv * d + kvh * d) };
            for h in kvh * group..(kvh + 1) * group {
                rotated_head(seq, width, h * d, d, tables, &mut w.q_rot);
                let q_h = (w.q_rot.as_ptr(), d, 1);
                let g_h = (g[(bi * t) * qw + h * d..].as_ptr(), qw, 1);
                for (i0, i1, lo) in blocks(t, s.window) {
                    let (rows, keys) = (i1 - i0, i1 - lo);
                    for (r, dot) in w.row_dot[..rows].iter_mut().enumerate() {
                        let row = (bi * t + i0 + r) * qw + h * d;
                        *dot = row_dot(&o[row..row + d], &g[row..row + d]);
                    }
                    // SAFETY: every view lies inside its buffer; the task writes only its own
                    // heads' columns of the output (dv) and its own scratch.
                    unsafe {
                        probabilities(&mut w.p, (i0, i1, lo), d, q_h, k_h, s);
                        // dP = dO Vᵀ
                        let v_lo = down(v_h, lo);
                        gemm((rows, keys, d), (w.dp.as_mut_ptr(), keys), false, down(g_h, i0), (v_lo.0, v_lo.2, v_lo.1), T::one());
                        // dS = P ⊙ (dP − rowsum(dO ⊙ O))
                        score_gradient(&mut w.dp[..rows * keys], &w.p[..rows * keys], &w.row_dot[..rows]);
                        let ds = (w.dp.as_ptr(), keys, 1);
                        let ds_t = (w.dp.as_ptr(), 1, keys);
                        let p_t = (w.p.as_ptr(), 1, keys);
                        gemm((rows, d, keys), (w.dq.as_mut_ptr().add(i0 * d), d), false, ds, down(k_h, lo), scale);
                        gemm((keys, d, rows), (w.dk.as_mut_ptr().add(lo * d), d), true, ds_t, down(q_h, i0), scale);
                        gemm((keys, d, rows), (dv_h.add(lo * width), width), true, p_t, down(g_h, i0), T::one());
                    }
                }
                // dq back through the rotation, into this head's columns.
                for (i, dq_row) in w.dq.chunks(d).enumerate() {
                    // SAFETY: row i, head h of this sequence: only this task writes it.
                    let out_row = unsafe { std::slice::from_raw_parts_mut(dst.get().add(seq_out + i * width + h * d), d) };
                    rotate(dq_row, out_row, &tables.0[i * d..][..d], &tables.1[i * d..][..d], true);
                }
            }
            for (i, dk_row) in w.dk.chunks(d).enumerate() {
                // SAFETY: row i, key head kvh of this sequence: only this task writes it.
                let out_row = unsafe { std::slice::from_raw_parts_mut(dst.get().add(seq_out + i * width + qw + kvh * d), d) };
                rotate(dk_row, out_row, &tables.0[i * d..][..d], &tables.1[i * d..][..d], true);
            }
        },
    );
    out
}

impl Attention {
    fn tables<T: Real>(&self) -> (Vec<T>, Vec<T>) {
        let conv = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect();
        (conv(&self.cos), conv(&self.sin))
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = "causal-attention";
        let (rows, _) = l.shape().dims2()?;
        let out = by_dtype!(s.dtype(), name, |T| {
            let (cos, sin) = self.tables::<T>();
            forward_cpu::<T>(slice(s, l, name)?, (self.batch, self.seq_len), &self.shape, (&cos, &sin))
        });
        Ok((out, Shape::from((rows, self.shape.heads * self.shape.head_dim))))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op3_no_bwd(res, &grad.contiguous()?, &AttentionGrad(self.clone()))?))
    }
}

/// Backward: (qkv, O, dO) → d(qkv).
struct AttentionGrad(Attention);

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
        let a = &self.0;
        let out = by_dtype!(s1.dtype(), name, |T| {
            let (cos, sin) = a.tables::<T>();
            backward_cpu::<T>(
                slice(s1, l1, name)?,
                slice(s2, l2, name)?,
                slice(s3, l3, name)?,
                (a.batch, a.seq_len),
                &a.shape,
                (&cos, &sin),
            )
        });
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, finite_difference_check, random};
    use candle_core::{DType, Var, D};

    /// Hugging Face's tables: angles pos · θ_i, halves repeated.
    fn tables(t: usize, d: usize, dtype: DType) -> (Tensor, Tensor) {
        let angles: Vec<f64> =
            (0..t).flat_map(|pos| (0..d).map(move |i| pos as f64 * 10000f64.powf(-2.0 * (i % (d / 2)) as f64 / d as f64))).collect();
        let a = Tensor::from_vec(angles, (t, d), &candle_core::Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        (a.cos().unwrap(), a.sin().unwrap())
    }

    /// The plain candle chain the model uses off the CPU: q, k, v cut from the packed rows,
    /// rotated with `rotate_half`, heads transposed out, keys/values repeated, an additive mask,
    /// softmax from primitives.
    fn reference(qkv: &Tensor, t: usize, s: AttentionShape, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (rows, _) = qkv.dims2()?;
        let b = rows / t;
        let d = s.head_dim;
        let (qw, kw) = (s.heads * d, s.kv_heads * d);
        let rot = |x: &Tensor| -> Result<Tensor> {
            // x [B, H, T, D]; tables [T, D] broadcast over B and H.
            let half = d / 2;
            let rotated = Tensor::cat(&[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?], D::Minus1)?;
            x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
        };
        let heads = |x: Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
        let group = s.heads / s.kv_heads;
        let repeat = |x: Tensor| -> Result<Tensor> {
            let (b, n, t, d) = x.dims4()?;
            x.unsqueeze(2)?.expand((b, n, group, t, d))?.reshape((b, n * group, t, d))
        };
        let q = rot(&heads(qkv.narrow(1, 0, qw)?, s.heads)?)?;
        let k = repeat(rot(&heads(qkv.narrow(1, qw, kw)?, s.kv_heads)?)?)?;
        let v = repeat(heads(qkv.narrow(1, qw + kw, kw)?, s.kv_heads)?)?;
        let window = s.window.unwrap_or(usize::MAX);
        let mask: Vec<f64> =
            (0..t).flat_map(|i| (0..t).map(move |j| if j <= i && i - j < window { 0.0 } else { f64::NEG_INFINITY })).collect();
        let mask = Tensor::from_vec(mask, (t, t), q.device())?.to_dtype(q.dtype())?;
        let scores = (q.matmul(&k.t()?)? * s.scale)?.broadcast_add(&mask)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((rows, qw))
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
            let qkv = Var::from_tensor(&random(&[b * t, s.packed_width()], 1, DType::F32)).unwrap();
            let probe = random(&[b * t, s.heads * s.head_dim], 4, DType::F32);
            let (cos, sin) = tables(t, s.head_dim, DType::F32);
            let fused = causal_attention(&qkv, t, s, &cos, &sin).unwrap();
            let plain = reference(&qkv, t, s, &cos, &sin).unwrap();
            assert_close(&fused, &plain, 1e-5, "forward");
            let gf = (fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gp = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert_close(gf.get(&qkv).unwrap(), gp.get(&qkv).unwrap(), 1e-5, "d qkv");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for s in shapes() {
            let s = AttentionShape { head_dim: 4, ..s };
            let t = 5;
            let qkv = Var::from_tensor(&random(&[t, s.packed_width()], 5, DType::F64)).unwrap();
            let probe = random(&[t, s.heads * 4], 8, DType::F64);
            // Arbitrary tables (halves not repeated) check the rotation's transpose in general.
            let (cos, sin) = (random(&[t, 4], 9, DType::F64), random(&[t, 4], 10, DType::F64));
            finite_difference_check(&[&qkv], |x| (causal_attention(x[0], t, s, &cos, &sin)? * &probe)?.sum_all());
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let s = shapes()[1];
        let (cos, sin) = tables(6, 8, DType::F32);
        let qkv = random(&[12, s.packed_width()], 1, DType::F32);
        assert!(causal_attention(&qkv, 6, s, &cos, &sin).is_ok());
        assert!(causal_attention(&qkv, 5, s, &cos, &sin).is_err(), "rows not a multiple of T");
        assert!(causal_attention(&qkv.narrow(1, 0, 40).unwrap(), 6, s, &cos, &sin).is_err(), "width");
        assert!(causal_attention(&qkv, 6, AttentionShape { scale: 0.0, ..s }, &cos, &sin).is_err(), "scale");
        assert!(causal_attention(&qkv, 6, s, &cos.narrow(0, 0, 5).unwrap(), &sin,).is_err(), "tables");
    }
}
