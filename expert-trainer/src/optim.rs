//! AdamW (Loshchilov & Hutter 2019) with float32 moments and decoupled weight decay, and
//! global-norm gradient clipping.
//!
//! Per parameter p with gradient g at step t (1-based), learning rate η:
//!
//! ```text
//! m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²
//! p ← p·(1 − η·λ)  (only tensors of rank ≥ 2: no decay on norms and biases)
//! p ← p − η · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + ε)
//! ```
//!
//! The state is the moments and t; [`AdamW::state_tensors`] / [`AdamW::load_state`] save and
//! restore it exactly.
//!
//! On the CPU (float32 weights, moments and gradients) the update runs in place, in three
//! multi-threaded passes per tensor (m, v, then p) with the clipping factor folded in; as
//! candle tensor operations it is about a dozen passes and as many temporaries per tensor,
//! which cost three times the update itself. On CUDA (the `cuda` feature) the same three
//! passes are kernels of btm-kernels (`btm_adamw_moment`, `btm_adamw_update`). Other devices use
//! the tensor operations. All compute the same f32 expressions in the same order.

use crate::spec;
use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, InplaceOp3, Layout, Shape, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;

/// One trained tensor with its moments.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Whether weight decay applies (rank ≥ 2).
    pub decay: bool,
    m: Tensor,
    v: Tensor,
    /// Where only part of the tensor trains (some experts of a stack): see [`Mask`].
    mask: Option<Mask>,
}

/// The part of a parameter that trains: flat element ranges, and the same as a 0/1 tensor
/// of the parameter's shape. Gradients are zeroed outside it before the norm is taken, and
/// the update (weight decay included) touches only these elements, so frozen ones keep
/// their exact values and their moments stay zero.
struct Mask {
    ranges: Vec<std::ops::Range<usize>>,
    ones: Tensor,
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates taken so far.
    pub t: u64,
    /// Update float32 tensors in place on the CPU and on CUDA (the default); `false` uses the
    /// tensor operations everywhere (what other devices use; the in-place kernels are tested
    /// against it).
    pub in_place_cpu: bool,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: &spec::Optimizer) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                // Separate buffers: the CPU path updates them in place.
                let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                Ok(Param { decay: var.rank() >= 2, m: zeros()?, v: zeros()?, mask: None, name, var })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            beta1: cfg.betas[0],
            beta2: cfg.betas[1],
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            t: 0,
            in_place_cpu: true,
        })
    }

    /// Train only the flat element `ranges` of parameter `name` (see [`Mask`]).
    pub fn set_mask(&mut self, name: &str, ranges: Vec<std::ops::Range<usize>>) -> Result<()> {
        let p = self.params.iter_mut().find(|p| p.name == name).with_context(|| format!("AdamW: no parameter `{name}` to mask"))?;
        let n = p.var.elem_count();
        let mut ones = vec![0f32; n];
        for r in &ranges {
            anyhow::ensure!(r.end <= n, "AdamW: mask range {r:?} outside `{name}` ({n} elements)");
            ones[r.clone()].iter_mut().for_each(|x| *x = 1.0);
        }
        let ones = Tensor::from_vec(ones, p.var.shape(), p.var.device())?;
        p.mask = Some(Mask { ranges, ones });
        Ok(())
    }

    /// Zero the gradients of masked parameters outside their masks (before the global norm).
    pub fn mask_gradients(&self, grads: &mut [Tensor]) -> Result<()> {
        for (p, g) in self.params.iter().zip(grads.iter_mut()) {
            if let Some(mask) = &p.mask {
                *g = g.broadcast_mul(&mask.ones.to_dtype(g.dtype())?)?;
            }
        }
        Ok(())
    }

    /// Apply one update with gradients `grads` (in the order of `params`) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// One update with every gradient multiplied by `grad_scale` (the clipping factor).
    pub fn step_scaled(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!("AdamW: {} gradients for {} parameters", grads.len(), self.params.len());
        }
        self.t += 1;
        let t = self.t as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let g = g.detach().to_dtype(DType::F32)?;
            let w = p.var.as_tensor();
            let in_place_here = w.device().is_cpu() || (cfg!(feature = "cuda") && w.device().is_cuda());
            if self.in_place_cpu && in_place_here && w.dtype() == DType::F32 {
                let g = g.contiguous()?;
                let decay = if p.decay { self.weight_decay } else { 0.0 };
                let whole = std::iter::once(0..w.elem_count()).collect::<Vec<_>>();
                let ranges = p.mask.as_ref().map_or(&whole, |mask| &mask.ranges);
                // Flattened views share the tensors' storage: the ops write into it.
                let (wf, mf, vf, gf) = (w.flatten_all()?, p.m.flatten_all()?, p.v.flatten_all()?, g.flatten_all()?);
                for r in ranges {
                    let part = |t: &Tensor| t.narrow(0, r.start, r.len());
                    let (w, m, v, g) = (part(&wf)?, part(&mf)?, part(&vf)?, part(&gf)?);
                    m.inplace_op2(&g, &Moment { beta: b1, scale: grad_scale, square: false })?;
                    v.inplace_op2(&g, &Moment { beta: b2, scale: grad_scale, square: true })?;
                    w.inplace_op3(&m, &v, &Update { lr, bc1, bc2, eps: self.eps, decay })?;
                }
                continue;
            }
            let g = if grad_scale != 1.0 { (g * grad_scale)? } else { g };
            let m = ((&p.m * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let mut w = p.var.as_tensor().detach();
            if p.decay && self.weight_decay != 0.0 {
                w = (w * (1.0 - lr * self.weight_decay))?;
            }
            let mut w = (w - (update * lr)?)?;
            if let Some(mask) = &p.mask {
                // Frozen elements keep their values (weight decay included).
                let old = p.var.as_tensor().detach();
                w = (&old + ((w - &old)? * &mask.ones)?)?;
            }
            p.var.set(&w)?;
            p.m = m;
            p.v = v;
        }
        Ok(())
    }

    /// Moments under `exp_avg.{name}` and `exp_avg_sq.{name}`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for p in &self.params {
            // Copies: the CPU path updates the moments in place.
            out.insert(format!("exp_avg.{}", p.name), p.m.copy().expect("copying a moment"));
            out.insert(format!("exp_avg_sq.{}", p.name), p.v.copy().expect("copying a moment"));
        }
        out
    }

    /// Restore moments saved by [`Self::state_tensors`] after `t` updates.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, t: u64) -> Result<()> {
        for p in &mut self.params {
            for (prefix, slot) in [("exp_avg", &mut p.m), ("exp_avg_sq", &mut p.v)] {
                let key = format!("{prefix}.{}", p.name);
                let x = tensors.remove(&key).with_context(|| format!("optimizer state has no `{key}` (did `trainable` change?)"))?;
                if x.dims() != p.var.dims() {
                    bail!("optimizer state `{key}` has shape {:?}, the parameter {:?}", x.dims(), p.var.dims());
                }
                // A copy: the CPU path updates the moments in place, so they must not share
                // storage with the loaded file's tensors.
                *slot = x.to_dtype(DType::F32)?.to_device(p.var.device())?.copy()?;
            }
        }
        if let Some(extra) = tensors.keys().next() {
            bail!("optimizer state has `{extra}`, which is not a trained parameter (did `trainable` change?)");
        }
        self.t = t;
        Ok(())
    }
}

/// The global L2 norm of all gradients (summed in float64 in a fixed order).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0f64;
    // Off the CPU the per-tensor sums stay on the device and come back as one vector: one
    // synchronisation per step, not one per tensor.
    let mut on_device = Vec::new();
    for g in grads {
        if g.device().is_cpu() && g.dtype() == DType::F32 {
            sum += g.contiguous()?.apply_op1_no_bwd(&SumOfSquares)?.to_scalar::<f64>()?;
        } else {
            on_device.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
        }
    }
    if !on_device.is_empty() {
        sum += Tensor::stack(&on_device, 0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().sum::<f64>();
    }
    Ok(sum.sqrt())
}

/// The clipping factor for a gradient of global norm `norm`: `max / (norm + 1e-6)` above
/// `max`, else 1.
pub fn clip_scale(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) if norm > max => max / (norm + 1e-6),
        _ => 1.0,
    }
}

/// Scale gradients so their global norm is at most `max_norm`; returns the norm before clipping.
/// Elements per rayon task in the CPU passes; fixed, so sums do not depend on the thread count.
const CHUNK: usize = 1 << 16;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("AdamW: expected a contiguous tensor"),
    }
}

fn f32s_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (l.contiguous_offsets(), s) {
        (Some((a, b)), CpuStorage::F32(v)) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("AdamW: expected a contiguous float32 tensor"),
    }
}

btm_kernels::multiversion! {
    /// `m ← β·m + rest·(s·g)` (or `(s·g)²`) over one chunk.
    fn moment_chunk(m: &mut [f32], g: &[f32], beta: f32, rest: f32, scale: f32, square: bool) {
        for (m, &g) in m.iter_mut().zip(g) {
            let g = g * scale;
            *m = *m * beta + if square { g * g } else { g } * rest;
        }
    }
}

btm_kernels::multiversion! {
    /// The AdamW update of one chunk; `k` = [1/bc1, 1/bc2, η, ε, 1 − η·λ].
    fn update_chunk(w: &mut [f32], m: &[f32], v: &[f32], k: [f32; 5]) {
        let [inv_bc1, inv_bc2, lr, eps, keep] = k;
        for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
            let update = (m * inv_bc1) / ((v * inv_bc2).sqrt() + eps);
            *w = *w * keep - update * lr;
        }
    }
}

/// In place: `m ← β·m + (1−β)·(s·g)`, or with `(s·g)²` for the second moment.
struct Moment {
    beta: f64,
    scale: f64,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (m, g) = (f32s_mut(s1, l1)?, f32s(s2, l2)?);
        if m.len() != g.len() {
            candle_core::bail!("AdamW: moment of {} elements, gradient of {}", m.len(), g.len());
        }
        let (beta, rest, scale, square) = (self.beta as f32, (1.0 - self.beta) as f32, self.scale as f32, self.square);
        m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(m, g)| moment_chunk(m, g, beta, rest, scale, square));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        btm_kernels::cuda_ops::adamw_moment(s1, l1, s2, l2, self.beta, self.scale, self.square)
    }
}

/// In place: `p ← p·(1 − η·λ) − η · (m / bc1) / (sqrt(v / bc2) + ε)`.
struct Update {
    lr: f64,
    bc1: f64,
    bc2: f64,
    eps: f64,
    decay: f64,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (w, m, v) = (f32s_mut(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        if w.len() != m.len() || w.len() != v.len() {
            candle_core::bail!("AdamW: parameter, moments differ in size");
        }
        let (inv_bc1, inv_bc2) = ((1.0 / self.bc1) as f32, (1.0 / self.bc2) as f32);
        let (lr, eps, keep) = (self.lr as f32, self.eps as f32, (1.0 - self.lr * self.decay) as f32);
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(w, (m, v))| update_chunk(w, m, v, [inv_bc1, inv_bc2, lr, eps, keep]));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let k = [1.0 / self.bc1, 1.0 / self.bc2, self.lr, self.eps, 1.0 - self.lr * self.decay];
        btm_kernels::cuda_ops::adamw_update(s1, l1, s2, l2, s3, l3, k)
    }
}

/// Σ x² of a float32 tensor, accumulated in float64 per fixed-size chunk, chunks summed in order.
struct SumOfSquares;

impl CustomOp1 for SumOfSquares {
    fn name(&self) -> &'static str {
        "sum-of-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        let parts: Vec<f64> = x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum()).collect();
        Ok((CpuStorage::F64(vec![parts.iter().sum()]), Shape::from(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// AdamW against a scalar re-implementation of the update rule, two steps.
    #[test]
    fn matches_the_update_rule() {
        let cfg = spec::Optimizer { lr: 0.1, betas: [0.9, 0.99], eps: 1e-8, weight_decay: 0.5 };
        let w = Var::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap();
        let b = Var::new(&[1.0f32, 1.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], &cfg).unwrap();
        let gw = [[0.5f32, -1.0], [0.25, 2.0]];
        let gb = [1.0f32, -3.0];
        let grads = [Tensor::new(&gw, &Device::Cpu).unwrap(), Tensor::new(&gb, &Device::Cpu).unwrap()];
        opt.step(&grads, 0.1).unwrap();
        opt.step(&grads, 0.05).unwrap();

        let reference = |p0: f64, g: f64, decay: bool| {
            let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
            for (t, lr) in [(1, 0.1), (2, 0.05)] {
                m = 0.9 * m + 0.1 * g;
                v = 0.99 * v + 0.01 * g * g;
                if decay {
                    p *= 1.0 - lr * 0.5;
                }
                let mh = m / (1.0 - 0.9f64.powi(t));
                let vh = v / (1.0 - 0.99f64.powi(t));
                p -= lr * mh / (vh.sqrt() + 1e-8);
            }
            p
        };
        let got = w.as_tensor().to_vec2::<f32>().unwrap();
        let p0 = [[1.0, -2.0], [0.5, 3.0]];
        for i in 0..2 {
            for j in 0..2 {
                let want = reference(p0[i][j], gw[i][j] as f64, true);
                assert!((got[i][j] as f64 - want).abs() < 1e-5, "w[{i}][{j}] {} vs {want}", got[i][j]);
            }
        }
        let got = b.as_tensor().to_vec1::<f32>().unwrap();
        for j in 0..2 {
            let want = reference(1.0, gb[j] as f64, false);
            assert!((got[j] as f64 - want).abs() < 1e-5, "bias gets no decay: {} vs {want}", got[j]);
        }
        assert_eq!(opt.t, 2);
    }

    /// The in-place CPU passes and the tensor operations give the same weights and moments,
    /// with a clipping factor and on a tensor larger than one chunk.
    #[test]
    fn in_place_update_matches_the_tensor_operations() {
        let cfg = spec::Optimizer { lr: 0.01, betas: [0.9, 0.95], eps: 1e-8, weight_decay: 0.1 };
        let n = 17 * (CHUNK / 4);
        let values = |k: usize| -> Vec<f32> { (0..n).map(|i| (((i * 7919 + k * 104729) % 2003) as f32 - 1001.0) / 700.0).collect() };
        let run = |in_place: bool| {
            let w = Var::from_vec(values(1), (n / 17, 17), &Device::Cpu).unwrap();
            let mut opt = AdamW::new(vec![("w".into(), w.clone())], &cfg).unwrap();
            opt.in_place_cpu = in_place;
            for step in 0..3 {
                let g = Tensor::from_vec(values(2 + step), (n / 17, 17), &Device::Cpu).unwrap();
                opt.step_scaled(&[g], 0.01, 0.7).unwrap();
            }
            let state = opt.state_tensors();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(w.as_tensor()), flat(&state["exp_avg.w"]), flat(&state["exp_avg_sq.w"]))
        };
        let (a, b) = (run(true), run(false));
        for (what, x, y) in [("w", &a.0, &b.0), ("m", &a.1, &b.1), ("v", &a.2, &b.2)] {
            let diff = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-6, "{what} differs by {diff}");
        }
        // The in-place kernels are compiled once per instruction set: each gives the
        // baseline's bits.
        use btm_kernels::isa::{force, Isa};
        force(Some(Isa::Baseline));
        let baseline = run(true);
        for isa in Isa::ALL.into_iter().filter(|&isa| isa > Isa::Baseline && isa <= Isa::detected()) {
            force(Some(isa));
            assert!(run(true) == baseline, "AdamW at {} differs from the baseline", isa.name());
        }
        force(None);
    }

    #[test]
    fn global_norm_matches_the_tensor_sum() {
        let n = CHUNK * 2 + 5;
        let g = Tensor::from_vec((0..n).map(|i| (i % 13) as f32 - 6.0).collect(), n, &Device::Cpu).unwrap();
        let part = g.narrow(0, 3, 100).unwrap();
        let sq = |t: &Tensor| t.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let want = (sq(&g) + sq(&part)).sqrt();
        let got = global_norm(&[g.clone(), part]).unwrap();
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let g = vec![Tensor::new(&[3.0f32], &Device::Cpu).unwrap(), Tensor::new(&[4.0f32], &Device::Cpu).unwrap()];
        let norm = global_norm(&g).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let scale = clip_scale(norm, Some(1.0));
        let g: Vec<Tensor> = g.iter().map(|t| (t * scale).unwrap()).collect();
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        let norm = global_norm(&g).unwrap();
        assert_eq!(clip_scale(norm, Some(10.0)), 1.0, "below the max: untouched");
        assert_eq!(clip_scale(norm, None), 1.0, "no clipping");
    }

    #[test]
    fn state_round_trips_and_rejects_mismatches() {
        let cfg = spec::Optimizer::default();
        let w = Var::new(&[[1.0f32, 2.0]], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], &cfg).unwrap();
        opt.step(&[Tensor::new(&[[1.0f32, -1.0]], &Device::Cpu).unwrap()], 0.1).unwrap();
        let state = opt.state_tensors();
        let mut other = AdamW::new(vec![("w".into(), w.clone())], &cfg).unwrap();
        other.load_state(state.clone(), opt.t).unwrap();
        assert_eq!(other.t, 1);
        let m = other.state_tensors()["exp_avg.w"].to_vec2::<f32>().unwrap();
        assert_eq!(m, state["exp_avg.w"].to_vec2::<f32>().unwrap());
        let mut renamed = AdamW::new(vec![("u".into(), w)], &cfg).unwrap();
        let err = renamed.load_state(state, 1).unwrap_err().to_string();
        assert!(err.contains("no `exp_avg.u`"), "{err}");
    }
}
