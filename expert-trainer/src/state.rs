//! The model's weights as training state: every tensor by canonical name, the trainable ones
//! as candle `Var`s (float32 master weights) that the optimizer updates in place.
//!
//! The transformer is built once over these tensors ([`Weights::model`]); since `Var::set`
//! writes into the variable's storage, the model sees every update without being rebuilt.
//! Frozen tensors are plain tensors, so backpropagation computes no gradient for them.

use crate::spec::Trainable;
use anyhow::{Context, Result};
use btm_model::weights::expected_tensors;
use btm_model::{Checkpoint, ModelConfig, Transformer};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// Standard deviation of the random initialisation (GPT-2, Llama's `initializer_range`).
pub const INIT_STD: f64 = 0.02;

pub struct Weights {
    pub config: ModelConfig,
    /// Every tensor by canonical name; trainable ones share storage with their `Var`.
    tensors: HashMap<String, Tensor>,
    /// Trainable tensors in model order.
    pub trainable: Vec<(String, Var)>,
}

impl Weights {
    /// Weights from a checkpoint, in float32 on `device`.
    pub fn from_checkpoint(ckpt: &Checkpoint, device: &Device, select: &Trainable) -> Result<Self> {
        let mut tensors = HashMap::new();
        for spec in expected_tensors(&ckpt.config) {
            let t = ckpt.tensor(&spec.name)?.to_dtype(DType::F32)?.to_device(device)?;
            tensors.insert(spec.name, t);
        }
        Self::new(ckpt.config.clone(), tensors, select)
    }

    /// Random weights for training from scratch: matrices ~ N(0, 0.02²), norms 1, biases 0.
    /// Each tensor draws from `StdRng` seeded by (seed, SHA-256 of its name), so the result
    /// does not depend on the order tensors are made in.
    pub fn random(config: &ModelConfig, seed: u64, device: &Device, select: &Trainable) -> Result<Self> {
        config.validate()?;
        let normal = Normal::new(0f32, INIT_STD as f32).expect("valid std");
        let mut tensors = HashMap::new();
        for spec in expected_tensors(config) {
            let n: usize = spec.shape.iter().product();
            let values: Vec<f32> = if spec.name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if spec.name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                let name_hash = Sha256::digest(spec.name.as_bytes());
                let salt = u64::from_le_bytes(name_hash[..8].try_into().expect("8 bytes"));
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ salt);
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            let t = Tensor::from_vec(values, spec.shape.as_slice(), device)?;
            tensors.insert(spec.name, t);
        }
        Self::new(config.clone(), tensors, select)
    }

    fn new(config: ModelConfig, mut tensors: HashMap<String, Tensor>, select: &Trainable) -> Result<Self> {
        let mut trainable = Vec::new();
        for spec in expected_tensors(&config) {
            if select.selects(&spec.name) {
                let t = tensors.get(&spec.name).with_context(|| format!("no tensor `{}`", spec.name))?;
                let var = Var::from_tensor(&t.contiguous()?)?;
                tensors.insert(spec.name.clone(), var.as_tensor().clone());
                trainable.push((spec.name, var));
            }
        }
        Ok(Self {
            config,
            tensors,
            trainable,
        })
    }

    /// The transformer over these tensors.
    pub fn model(&self) -> Result<Transformer> {
        self.model_in(DType::F32)
    }

    /// The transformer over copies of these tensors cast to `dtype` (mixed precision: the casts
    /// are graph nodes, so gradients come back to the float32 variables in float32). Float32
    /// shares the tensors themselves, so the model sees every optimizer update; any other dtype
    /// is a snapshot to rebuild after each update.
    pub fn model_in(&self, dtype: DType) -> Result<Transformer> {
        let device = self.tensors.values().next().map(|t| t.device().clone()).unwrap_or(Device::Cpu);
        let vb = VarBuilder::from_tensors(self.tensors.clone(), dtype, &device);
        Ok(Transformer::new(&self.config, vb)?)
    }

    /// A tensor by canonical name (its current value), on the CPU.
    pub fn tensor(&self, name: &str) -> btm_model::Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| btm_model::Error::Unsupported(format!("no tensor `{name}`")))?;
        Ok(t.detach().to_device(&Device::Cpu)?)
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.trainable.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_config() -> ModelConfig {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/mixtral/config.json");
        let json = btm_model::error::read_json(&p).unwrap();
        ModelConfig::from_hf(&json).unwrap().0
    }

    #[test]
    fn random_init_is_seeded_and_shaped() {
        let cfg = fixture_config();
        let all = Trainable::default();
        let a = Weights::random(&cfg, 3, &Device::Cpu, &all).unwrap();
        let b = Weights::random(&cfg, 3, &Device::Cpu, &all).unwrap();
        let c = Weights::random(&cfg, 4, &Device::Cpu, &all).unwrap();
        let name = "model.layers.0.self_attn.q_proj.weight";
        let va = a.tensor(name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(va, b.tensor(name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_ne!(va, c.tensor(name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let std = (va.iter().map(|x| x * x).sum::<f32>() / va.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.004, "std {std}");
        let norm = a.tensor("model.norm.weight").unwrap().to_vec1::<f32>().unwrap();
        assert!(norm.iter().all(|&x| x == 1.0));
        assert_eq!(a.trainable.len(), expected_tensors(&cfg).len());
        let logits = a.model().unwrap().forward(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap()).unwrap();
        assert_eq!(logits.dims(), &[1, 3, cfg.vocab_size]);
    }

    #[test]
    fn only_selected_tensors_become_variables() {
        let cfg = fixture_config();
        let routers = Trainable {
            include: vec!["*.mlp.gate.weight".into()],
            exclude: vec![],
        };
        let w = Weights::random(&cfg, 0, &Device::Cpu, &routers).unwrap();
        let names: Vec<&str> = w.trainable.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), cfg.num_layers);
        assert!(names.iter().all(|n| n.ends_with("mlp.gate.weight")), "{names:?}");
        // Updating a variable is visible through the model built before the update.
        let model = w.model().unwrap();
        let ids = Tensor::new(&[[5u32, 6, 7, 8]], &Device::Cpu).unwrap();
        let before = model.forward(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (_, var) = &w.trainable[0];
        var.set(&(var.as_tensor().detach() * 50.0).unwrap()).unwrap();
        let after = model.forward(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(before, after);
    }
}
