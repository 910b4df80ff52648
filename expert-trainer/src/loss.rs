//! Next-token cross-entropy.
//!
//! On the CPU it is one fused operator: the forward pass reads each row of logits twice
//! (max, then log-sum-exp) and writes one number per row; the backward pass writes
//! `(softmax − onehot) · grad` in one sweep. Built from candle primitives instead, the same
//! loss makes about ten full passes over the [tokens, vocab] logits and as many temporary
//! tensors of that size, which is a sizeable share of a small model's step. Rows are split
//! across threads; each row is computed by exactly one thread in a fixed order, so results do
//! not depend on the thread count. On CUDA the same two passes are the kernels `btm_nll` and
//! `btm_nll_bwd` of btm-kernels (one block per row). Other devices use the primitive formulation.

use btm_kernels::math::exp_f32;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// Mean cross-entropy of next-token prediction: logits [..., V], targets [...] (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    // Rows [N, V] go in as they are: a reshape is a graph node, and its gradient costs a pass
    // over the whole [N, V] gradient.
    let logits = if logits.rank() == 2 { logits.clone() } else { logits.reshape(((), v))? };
    let targets = targets.flatten_all()?.to_dtype(DType::U32)?;
    if logits.device().is_cpu() {
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        let targets = targets.contiguous()?;
        return logits.apply_op2(&targets, RowNll)?.mean_all();
    }
    // On CUDA the fused op reads bfloat16 logits as they are (float32 arithmetic): no float32
    // copy of the [tokens, vocab] matrix.
    if cfg!(feature = "cuda") && logits.device().is_cuda() && matches!(logits.dtype(), DType::F32 | DType::BF16) {
        // The kernel indexes rows by target: check the range here, as the CPU op does.
        if targets.elem_count() > 0 && targets.max_all()?.to_scalar::<u32>()? as usize >= v {
            candle_core::bail!("cross-entropy: a target is outside the vocabulary ({v})");
        }
        return logits.contiguous()?.apply_op2(&targets.contiguous()?, RowNll)?.mean_all();
    }
    cross_entropy_reference(&logits.to_dtype(DType::F32)?, &targets)
}

/// The same loss from differentiable candle primitives (any device).
pub fn cross_entropy_reference(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), v))?.to_dtype(DType::F32)?;
    let targets = targets.flatten_all()?.unsqueeze(1)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    let picked = logits.gather(&targets, D::Minus1)?;
    (lse - picked)?.mean_all()
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("cross-entropy: {what} must be contiguous"),
    }
}

/// Run `f(first_row, rows_out)` over `out` split into per-thread blocks of `width`-wide rows.
fn par_rows<F: Fn(usize, &mut [f32]) + Sync>(out: &mut [f32], width: usize, f: F) {
    let rows = out.len() / width.max(1);
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per * width).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk));
        }
    });
}

#[inline(always)]
fn log_sum_exp(row: &[f32]) -> f32 {
    // Eight running maxima and sums in a fixed order: the compiler vectorises them with the
    // inlined exp, and every instruction set gives the same bits.
    let mut maxima = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail_max = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (m, &x) in maxima.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    let max = maxima.iter().copied().fold(tail_max, f32::max);
    let mut lanes = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| exp_f32(x - max)).sum();
    for c in chunks {
        for (acc, &x) in lanes.iter_mut().zip(c) {
            *acc += exp_f32(x - max);
        }
    }
    (lanes.iter().sum::<f32>() + tail).ln() + max
}

btm_kernels::multiversion! {
    /// `nll` of the rows `first..` of `logits` (width `v`) into `out`.
    fn nll_rows(out: &mut [f32], logits: &[f32], targets: &[u32], first: usize, v: usize) {
        for (i, o) in out.iter_mut().enumerate() {
            let r = first + i;
            let row = &logits[r * v..(r + 1) * v];
            *o = log_sum_exp(row) - row[targets[r] as usize];
        }
    }
}

btm_kernels::multiversion! {
    /// `(softmax − onehot) · g` of the rows `first..` into `out` (width `v`), each row's
    /// log-sum-exp recovered as `nll + logit[target]`.
    fn nll_grad_rows(out: &mut [f32], logits: &[f32], targets: &[u32], grad: &[f32], nll: &[f32], first: usize, v: usize) {
        for (i, o) in out.chunks_mut(v).enumerate() {
            let r = first + i;
            let row = &logits[r * v..(r + 1) * v];
            let target = targets[r] as usize;
            let lse = nll[r] + row[target];
            let g = grad[r];
            for (o, x) in o.iter_mut().zip(row) {
                *o = exp_f32(x - lse) * g;
            }
            o[target] -= g;
        }
    }
}

/// Per-row negative log-likelihood: logits [N, V] f32, targets [N] u32 → [N] f32.
struct RowNll;

impl CustomOp2 for RowNll {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let (CpuStorage::F32(logits), CpuStorage::U32(targets)) = (s1, s2) else {
            candle_core::bail!("cross-entropy: expected f32 logits and u32 targets");
        };
        let logits = contiguous(logits, l1, "logits")?;
        let targets = contiguous(targets, l2, "targets")?;
        if targets.len() != n {
            candle_core::bail!("cross-entropy: {} targets for {n} rows", targets.len());
        }
        if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross-entropy: target {t} is outside the vocabulary ({v})");
        }
        let mut out = vec![0f32; n];
        par_rows(&mut out, 1, |first, block| nll_rows(block, logits, targets, first, v));
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, _) = l1.shape().dims2()?;
        Ok((btm_kernels::cuda_ops::nll(s1, l1, s2, l2)?, Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, targets: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The backward pass needs each row's log-sum-exp; nll = lse − logit[target] gives it
        // back without another pass of exponentials. Custom ops take three inputs, so the
        // upstream gradient and the nll travel as one [2, N] tensor.
        let grad_and_nll = Tensor::stack(&[grad.to_dtype(DType::F32)?, res.clone()], 0)?;
        let g = logits.apply_op3_no_bwd(targets, &grad_and_nll, &RowNllGrad)?;
        Ok((Some(g), None))
    }
}

/// d nll_r / d logits_r · g_r = (softmax(logits_r) − onehot(target_r)) · g_r, from logits,
/// targets and [g; nll].
struct RowNllGrad;

impl CustomOp3 for RowNllGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
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
        let (n, v) = l1.shape().dims2()?;
        let (CpuStorage::F32(logits), CpuStorage::U32(targets), CpuStorage::F32(grad)) = (s1, s2, s3) else {
            candle_core::bail!("cross-entropy backward: unexpected dtypes");
        };
        let logits = contiguous(logits, l1, "logits")?;
        let targets = contiguous(targets, l2, "targets")?;
        let grad_and_nll = contiguous(grad, l3, "gradient")?;
        if grad_and_nll.len() != 2 * n {
            candle_core::bail!("cross-entropy backward: {} gradient values for {n} rows", grad_and_nll.len() / 2);
        }
        let (grad, nll) = grad_and_nll.split_at(n);
        let mut out = vec![0f32; n * v];
        par_rows(&mut out, v, |first, block| nll_grad_rows(block, logits, targets, grad, nll, first, v));
        Ok((CpuStorage::F32(out), Shape::from((n, v))))
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
        let (n, v) = l1.shape().dims2()?;
        Ok((btm_kernels::cuda_ops::nll_grad(s1, l1, s2, l2, s3, l3)?, Shape::from((n, v))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_matches_the_reference_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (n, v) = (37, 11);
        let values: Vec<f32> = (0..n * v).map(|i| ((i * 7919) % 97) as f32 / 9.0 - 5.0).collect();
        let targets: Vec<u32> = (0..n).map(|i| ((i * 5) % v) as u32).collect();
        let targets = Tensor::from_vec(targets, n, &dev).unwrap();
        let a = Var::from_tensor(&Tensor::from_vec(values.clone(), (n, v), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::from_vec(values, (n, v), &dev).unwrap()).unwrap();
        let fused = (cross_entropy(a.as_tensor(), &targets).unwrap() * 3.0).unwrap();
        let reference = (cross_entropy_reference(b.as_tensor(), &targets).unwrap() * 3.0).unwrap();
        let (x, y) = (fused.to_scalar::<f32>().unwrap(), reference.to_scalar::<f32>().unwrap());
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        let ga = fused.backward().unwrap().get(a.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gb = reference.backward().unwrap().get(b.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = ga.iter().zip(&gb).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-6, "gradient differs by {diff}");
    }

    /// The fused loss is compiled once per instruction set: each gives the baseline's bits,
    /// in value and gradient (odd widths, so the tail loops run too).
    #[test]
    fn every_instruction_set_gives_the_baseline_bits() {
        use btm_kernels::isa::{force, Isa};
        let dev = Device::Cpu;
        let (n, v) = (29, 517);
        let values: Vec<f32> = (0..n * v).map(|i| ((i * 7919) % 997) as f32 / 50.0 - 10.0).collect();
        let targets = Tensor::from_vec((0..n).map(|i| ((i * 131) % v) as u32).collect::<Vec<_>>(), n, &dev).unwrap();
        let run = |isa: Isa| {
            force(Some(isa));
            let x = Var::from_tensor(&Tensor::from_vec(values.clone(), (n, v), &dev).unwrap()).unwrap();
            let loss = cross_entropy(x.as_tensor(), &targets).unwrap();
            let grad = loss.backward().unwrap().get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            force(None);
            (loss.to_scalar::<f32>().unwrap().to_bits(), grad.iter().map(|g| g.to_bits()).collect::<Vec<_>>())
        };
        let baseline = run(Isa::Baseline);
        for isa in Isa::ALL.into_iter().filter(|&isa| isa > Isa::Baseline && isa <= Isa::detected()) {
            assert!(run(isa) == baseline, "cross-entropy at {} differs from the baseline", isa.name());
        }
    }

    #[test]
    fn targets_outside_the_vocabulary_are_an_error() {
        let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let targets = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
        let err = cross_entropy(&logits, &targets).unwrap_err().to_string();
        assert!(err.contains("target 4 is outside the vocabulary (4)"), "{err}");
    }
}
