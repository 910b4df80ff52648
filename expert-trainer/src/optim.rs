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

use crate::spec;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

/// One trained tensor with its moments.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Whether weight decay applies (rank ≥ 2).
    pub decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates taken so far.
    pub t: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: &spec::Optimizer) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(Param {
                    decay: var.rank() >= 2,
                    m: zeros.clone(),
                    v: zeros,
                    name,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            beta1: cfg.betas[0],
            beta2: cfg.betas[1],
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            t: 0,
        })
    }

    /// Apply one update with gradients `grads` (in the order of `params`) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
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
            let m = ((&p.m * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let mut w = p.var.as_tensor().detach();
            if p.decay && self.weight_decay != 0.0 {
                w = (w * (1.0 - lr * self.weight_decay))?;
            }
            let w = (w - (update * lr)?)?;
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
            out.insert(format!("exp_avg.{}", p.name), p.m.clone());
            out.insert(format!("exp_avg_sq.{}", p.name), p.v.clone());
        }
        out
    }

    /// Restore moments saved by [`Self::state_tensors`] after `t` updates.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, t: u64) -> Result<()> {
        for p in &mut self.params {
            for (prefix, slot) in [("exp_avg", &mut p.m), ("exp_avg_sq", &mut p.v)] {
                let key = format!("{prefix}.{}", p.name);
                let x = tensors
                    .remove(&key)
                    .with_context(|| format!("optimizer state has no `{key}` (did `trainable` change?)"))?;
                if x.dims() != p.var.dims() {
                    bail!("optimizer state `{key}` has shape {:?}, the parameter {:?}", x.dims(), p.var.dims());
                }
                *slot = x.to_dtype(DType::F32)?.to_device(p.var.device())?;
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
    for g in grads {
        sum += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Scale gradients so their global norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: Option<f64>) -> Result<f64> {
    let norm = global_norm(grads)?;
    if let Some(max) = max_norm {
        if norm > max {
            let scale = max / (norm + 1e-6);
            for g in grads.iter_mut() {
                *g = (&*g * scale)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// AdamW against a scalar re-implementation of the update rule, two steps.
    #[test]
    fn matches_the_update_rule() {
        let cfg = spec::Optimizer {
            lr: 0.1,
            betas: [0.9, 0.99],
            eps: 1e-8,
            weight_decay: 0.5,
        };
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

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
        ];
        let norm = clip_global_norm(&mut g, Some(1.0)).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        let norm = clip_global_norm(&mut g, Some(10.0)).unwrap();
        assert!((norm - 1.0).abs() < 1e-5, "below the max: untouched");
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
