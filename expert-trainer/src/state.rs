//! The model's weights as training state: every tensor by canonical name, the trainable ones
//! as candle `Var`s (float32 master weights) that the optimizer updates in place.
//!
//! The transformer is built once over these tensors ([`Weights::model`]); since `Var::set`
//! writes into the variable's storage, the model sees every update without being rebuilt.
//! Frozen tensors are plain tensors, so backpropagation computes no gradient for them.
//!
//! Each MoE layer's routed experts are kept stacked, as the fused MoE layer consumes them:
//! `mlp.experts.gate_up_proj` [E, 2F, H] and `mlp.experts.down_proj` [E, H, F], one parameter
//! each instead of 3·E, so no step copies them into a stack and back. Checkpoint names
//! (`mlp.experts.{e}.gate_proj.weight`, …) are mapped to slices of the stacks only at I/O
//! ([`Weights::tensor`]). When `trainable` selects some experts (or halves) of a layer and not
//! others, the stack is one variable with a [mask](Weights::masks) of the element ranges that
//! train; the optimizer leaves the rest untouched.

use crate::spec::Trainable;
use anyhow::{bail, Context, Result};
use btm_kernels::ExpertShard;
use btm_model::model::{STACKED_DOWN, STACKED_GATE_UP};
use btm_model::weights::expected_tensors;
use btm_model::{Checkpoint, ModelConfig, Transformer};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ops::Range;

/// Standard deviation of the random initialisation (GPT-2, Llama's `initializer_range`).
pub const INIT_STD: f64 = 0.02;

pub struct Weights {
    pub config: ModelConfig,
    /// Every tensor the model reads, by the name it reads it under: the canonical name, or for
    /// routed experts their layer's stack. Trainable ones share storage with their `Var`.
    tensors: HashMap<String, Tensor>,
    /// Canonical names of routed experts' weights → where they lie in their layer's stack.
    slices: HashMap<String, Slice>,
    /// Trainable tensors in model order.
    pub trainable: Vec<(String, Var)>,
    /// Trainable stacks of which only part trains: the flat element ranges that do.
    pub masks: HashMap<String, Vec<Range<usize>>>,
    /// With expert parallelism, the experts this rank holds (its stacks hold only those).
    pub shard: Option<ExpertShard>,
}

/// The expert index of a routed expert's checkpoint name (`….mlp.experts.{e}.….weight`).
fn expert_of(name: &str) -> Option<usize> {
    let (_, rest) = name.split_once(".mlp.experts.")?;
    rest.split('.').next()?.parse().ok()
}

/// Expert `expert`'s rows `rows` of the stacked tensor `stacked` ([E, rows, columns]).
#[derive(Debug, Clone)]
struct Slice {
    stacked: String,
    expert: usize,
    rows: Range<usize>,
}

impl Slice {
    /// The slice's elements in the flattened stack of `dims` [E, R, C].
    fn flat_range(&self, dims: &[usize]) -> Range<usize> {
        let per_expert = dims[1] * dims[2];
        let start = self.expert * per_expert + self.rows.start * dims[2];
        start..start + self.rows.len() * dims[2]
    }
}

/// Replace each MoE layer's per-expert weights in `tensors` (those of the experts `local`) by
/// its two stacks; return where each per-expert name now lies.
fn stack_experts(config: &ModelConfig, tensors: &mut HashMap<String, Tensor>, local: Range<usize>) -> Result<HashMap<String, Slice>> {
    let slices = expert_slices(config, local.clone());
    let Some(moe) = &config.moe else {
        return Ok(slices);
    };
    let (f, h) = (moe.expert_ffn, config.hidden_size);
    for layer in (0..config.num_layers).filter(|&l| config.is_moe_layer(l)) {
        let prefix = format!("model.layers.{layer}.mlp.experts");
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in local.clone() {
            for part in ["gate_proj", "up_proj", "down_proj"] {
                let name = format!("{prefix}.{e}.{part}.weight");
                let t = tensors.remove(&name).with_context(|| format!("no tensor `{name}`"))?;
                if part == "down_proj" {
                    down.push(t)
                } else {
                    gate_up.push(t)
                }
            }
        }
        tensors.insert(format!("{prefix}.{STACKED_GATE_UP}"), Tensor::cat(&gate_up, 0)?.reshape((local.len(), 2 * f, h))?);
        tensors.insert(format!("{prefix}.{STACKED_DOWN}"), Tensor::stack(&down, 0)?);
    }
    Ok(slices)
}

/// Whether this rank holds the tensor `name` (all but other ranks' experts).
fn holds(shard: Option<&ExpertShard>, name: &str) -> bool {
    match (shard, expert_of(name)) {
        (Some(shard), Some(e)) => shard.local().contains(&e),
        _ => true,
    }
}

/// Where each per-expert checkpoint name of the experts `local` lies in its layer's stacks.
fn expert_slices(config: &ModelConfig, local: Range<usize>) -> HashMap<String, Slice> {
    let mut slices = HashMap::new();
    let Some(moe) = &config.moe else {
        return slices;
    };
    let (f, h) = (moe.expert_ffn, config.hidden_size);
    for layer in (0..config.num_layers).filter(|&l| config.is_moe_layer(l)) {
        let prefix = format!("model.layers.{layer}.mlp.experts");
        let (gate_up, down) = (format!("{prefix}.{STACKED_GATE_UP}"), format!("{prefix}.{STACKED_DOWN}"));
        for e in local.clone() {
            for (part, stacked, rows) in [("gate_proj", &gate_up, 0..f), ("up_proj", &gate_up, f..2 * f), ("down_proj", &down, 0..h)] {
                slices.insert(format!("{prefix}.{e}.{part}.weight"), Slice { stacked: stacked.clone(), expert: e - local.start, rows });
            }
        }
    }
    slices
}

/// Sorted ranges with adjacent ones joined.
fn join_ranges(mut ranges: Vec<Range<usize>>) -> Vec<Range<usize>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

impl Weights {
    /// Weights from a checkpoint, in float32 on `device`.
    pub fn from_checkpoint(ckpt: &Checkpoint, device: &Device, select: &Trainable) -> Result<Self> {
        Self::from_checkpoint_sharded(ckpt, device, select, None)
    }

    /// Like [`Self::from_checkpoint`], reading only the experts `shard` gives this rank.
    pub fn from_checkpoint_sharded(ckpt: &Checkpoint, device: &Device, select: &Trainable, shard: Option<&ExpertShard>) -> Result<Self> {
        let mut tensors = HashMap::new();
        for spec in expected_tensors(&ckpt.config).into_iter().filter(|s| holds(shard, &s.name)) {
            let t = ckpt.tensor(&spec.name)?.to_dtype(DType::F32)?.to_device(device)?;
            tensors.insert(spec.name, t);
        }
        Self::new(ckpt.config.clone(), tensors, select, shard)
    }

    /// Random weights for training from scratch: matrices ~ N(0, 0.02²), norms 1, biases 0.
    /// Each tensor draws from `StdRng` seeded by (seed, SHA-256 of its name), so the result
    /// does not depend on the order tensors are made in.
    pub fn random(config: &ModelConfig, seed: u64, device: &Device, select: &Trainable) -> Result<Self> {
        Self::random_sharded(config, seed, device, select, None)
    }

    /// Like [`Self::random`], making only the experts `shard` gives this rank (each tensor's
    /// values depend on its name only, so every rank makes its part of the same model).
    pub fn random_sharded(
        config: &ModelConfig,
        seed: u64,
        device: &Device,
        select: &Trainable,
        shard: Option<&ExpertShard>,
    ) -> Result<Self> {
        config.validate()?;
        let normal = Normal::new(0f32, INIT_STD as f32).expect("valid std");
        let mut tensors = HashMap::new();
        for spec in expected_tensors(config).into_iter().filter(|s| holds(shard, &s.name)) {
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
        Self::new(config.clone(), tensors, select, shard)
    }

    fn new(config: ModelConfig, mut tensors: HashMap<String, Tensor>, select: &Trainable, shard: Option<&ExpertShard>) -> Result<Self> {
        let all = config.moe.as_ref().map_or(0, |m| m.experts);
        let slices = stack_experts(&config, &mut tensors, shard.map_or(0..all, |s| s.local()))?;
        // Model order, a stack taking the place of its first expert's first weight; for each
        // tensor the element ranges `trainable` selects (all, none, or part of a stack).
        let mut order: Vec<String> = Vec::new();
        let mut selected: HashMap<String, Vec<Range<usize>>> = HashMap::new();
        for spec in expected_tensors(&config).into_iter().filter(|s| holds(shard, &s.name)) {
            let (name, parts) = match slices.get(&spec.name) {
                Some(slice) => {
                    let dims = tensors[&slice.stacked].dims().to_vec();
                    let parts = if select.selects(&spec.name) {
                        if select.selected_rows(&spec.name, slice.rows.len())? != std::slice::from_ref(&(0..slice.rows.len())) {
                            bail!("trainable: `{}` is an expert's weight; select experts by name (`*.mlp.experts.4.*`), rows only of other tensors such as the router", spec.name);
                        }
                        vec![slice.flat_range(&dims)]
                    } else {
                        vec![]
                    };
                    (slice.stacked.clone(), parts)
                }
                None => {
                    let t = tensors.get(&spec.name).with_context(|| format!("no tensor `{}`", spec.name))?;
                    // Row ranges of the tensor (a router's rows are its experts) as flat ranges.
                    let rows = t.dims().first().copied().unwrap_or(1);
                    let width = t.elem_count() / rows.max(1);
                    let parts = if select.selects(&spec.name) {
                        select.selected_rows(&spec.name, rows)?.into_iter().map(|r| r.start * width..r.end * width).collect()
                    } else {
                        vec![]
                    };
                    (spec.name.clone(), parts)
                }
            };
            if !selected.contains_key(&name) {
                order.push(name.clone());
            }
            selected.entry(name).or_default().extend(parts);
        }
        let (mut trainable, mut masks) = (Vec::new(), HashMap::new());
        for name in order {
            let ranges = join_ranges(selected.remove(&name).unwrap_or_default());
            if ranges.is_empty() {
                continue;
            }
            let t = &tensors[&name];
            if ranges.len() != 1 || ranges[0] != (0..t.elem_count()) {
                masks.insert(name.clone(), ranges);
            }
            let var = Var::from_tensor(&t.contiguous()?)?;
            tensors.insert(name.clone(), var.as_tensor().clone());
            trainable.push((name, var));
        }
        Ok(Self { config, tensors, slices, trainable, masks, shard: shard.cloned() })
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
        Ok(Transformer::new_sharded(&self.config, vb, self.shard.as_ref())?)
    }

    /// Every tensor by the name the trainer keeps it under (expert stacks as stacks), in a
    /// fixed order: what [`crate::distributed::Ranks::gather_experts`] makes whole.
    pub fn stored(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self.tensors.iter().map(|(n, t)| (n.clone(), t.detach())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Weights for writing a checkpoint from `stored` tensors holding every expert (gathered
    /// over the expert-parallel ranks): nothing trains, nothing is sharded.
    pub fn whole(config: &ModelConfig, stored: Vec<(String, Tensor)>) -> Result<Self> {
        let tensors: HashMap<String, Tensor> = stored.into_iter().collect();
        let all = config.moe.as_ref().map_or(0, |m| m.experts);
        let slices = expert_slices(config, 0..all);
        Ok(Self { config: config.clone(), tensors, slices, trainable: Vec::new(), masks: HashMap::new(), shard: None })
    }

    /// The expert-parallel rank that holds tensor `name` (by canonical name): a routed
    /// expert's block; 0 for every other tensor, and for every tensor without expert
    /// parallelism. That rank writes it into a checkpoint.
    pub fn holder(&self, name: &str) -> usize {
        match (&self.shard, expert_of(name)) {
            (Some(shard), Some(e)) => e / shard.per_rank(),
            _ => 0,
        }
    }

    /// A tensor by canonical name (its current value), on the CPU.
    pub fn tensor(&self, name: &str) -> btm_model::Result<Tensor> {
        let missing = || btm_model::Error::Unsupported(format!("no tensor `{name}`"));
        let t = match self.slices.get(name) {
            Some(slice) => {
                let stack = self.tensors.get(&slice.stacked).ok_or_else(missing)?;
                stack.get(slice.expert)?.narrow(0, slice.rows.start, slice.rows.len())?.contiguous()?
            }
            None => self.tensors.get(name).ok_or_else(missing)?.clone(),
        };
        Ok(t.detach().to_device(&Device::Cpu)?)
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.trainable
            .iter()
            .map(|(name, v)| self.masks.get(name).map_or(v.elem_count(), |ranges| ranges.iter().map(|r| r.len()).sum()))
            .sum()
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

    /// One AdamW update of every trainable parameter with all-ones gradients, through the masks
    /// the selection made (as the trainer applies them).
    fn one_masked_update(w: &Weights, cfg: &crate::spec::Optimizer) {
        let mut opt = crate::optim::AdamW::new(w.trainable.clone(), cfg).unwrap();
        for (name, ranges) in &w.masks {
            opt.set_mask(name, ranges.clone()).unwrap();
        }
        let mut grads: Vec<Tensor> = w.trainable.iter().map(|(_, v)| v.as_tensor().ones_like().unwrap()).collect();
        opt.mask_gradients(&mut grads).unwrap();
        opt.step(&grads, 0.1).unwrap();
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
        // Every parameter trains; each MoE layer's experts are two stacked variables.
        assert_eq!(a.num_trainable(), cfg.num_parameters());
        let moe = cfg.moe.as_ref().unwrap();
        let moe_layers = (0..cfg.num_layers).filter(|&l| cfg.is_moe_layer(l)).count();
        assert_eq!(a.trainable.len(), expected_tensors(&cfg).len() - moe_layers * (3 * moe.experts - 2));
        assert!(a.masks.is_empty());
        let logits = a.model().unwrap().forward(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap()).unwrap();
        assert_eq!(logits.dims(), &[1, 3, cfg.vocab_size]);
    }

    /// Checkpoint names read back as slices of the stacks, and a `trainable` that selects
    /// some experts masks the stack: an AdamW step with weight decay leaves the others' bits
    /// alone.
    #[test]
    fn stacked_experts_read_back_by_name_and_train_only_where_selected() {
        let cfg = fixture_config();
        let full = Weights::random(&cfg, 7, &Device::Cpu, &Trainable::default()).unwrap();
        let mut tensors = HashMap::new();
        for spec in expected_tensors(&cfg) {
            tensors.insert(spec.name.clone(), full.tensor(&spec.name).unwrap());
            assert_eq!(full.tensor(&spec.name).unwrap().dims(), spec.shape.as_slice(), "{}", spec.name);
        }
        let one_expert = Trainable { include: vec!["*.experts.1.*".into(), "*.experts.0.up_proj.*".into()], exclude: vec![] };
        let w = Weights::new(cfg.clone(), tensors.clone(), &one_expert, None).unwrap();
        let names: Vec<&str> = w.trainable.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.iter().all(|n| n.ends_with("experts.gate_up_proj") || n.ends_with("experts.down_proj")), "{names:?}");
        assert_eq!(w.num_trainable(), cfg.num_layers * 4 * cfg.hidden_size * cfg.moe.as_ref().unwrap().expert_ffn);
        one_masked_update(&w, &crate::spec::Optimizer { lr: 0.1, betas: [0.9, 0.95], eps: 1e-8, weight_decay: 0.5 });
        for spec in expected_tensors(&cfg) {
            let (before, after) = (
                tensors[&spec.name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                w.tensor(&spec.name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(before != after, one_expert.selects(&spec.name), "{}", spec.name);
        }
    }

    /// One expert and its router row inside a frozen MoE: after an update every other expert,
    /// every other router row and every other tensor keeps its exact bits.
    #[test]
    fn a_router_row_trains_with_its_expert_and_the_rest_keeps_its_bits() {
        let cfg = fixture_config();
        let full = Weights::random(&cfg, 7, &Device::Cpu, &Trainable::default()).unwrap();
        let tensors: HashMap<String, Tensor> =
            expected_tensors(&cfg).iter().map(|s| (s.name.clone(), full.tensor(&s.name).unwrap())).collect();
        let last = cfg.moe.as_ref().unwrap().experts - 1;
        let new_expert =
            Trainable { include: vec![format!("*.mlp.experts.{last}.*"), format!("*.mlp.gate.weight[{last}]")], exclude: vec![] };
        let w = Weights::new(cfg.clone(), tensors.clone(), &new_expert, None).unwrap();
        let (h, f) = (cfg.hidden_size, cfg.moe.as_ref().unwrap().expert_ffn);
        assert_eq!(w.num_trainable(), cfg.num_layers * (3 * h * f + h));
        one_masked_update(&w, &crate::spec::Optimizer::default());
        for spec in expected_tensors(&cfg) {
            let (before, after) = (tensors[&spec.name].to_vec2::<f32>().ok(), w.tensor(&spec.name).unwrap().to_vec2::<f32>().ok());
            let (Some(before), Some(after)) = (before, after) else { continue };
            for (row, (b, a)) in before.iter().zip(&after).enumerate() {
                let trains = spec.name.contains(&format!("experts.{last}.")) || (spec.name.ends_with("mlp.gate.weight") && row == last);
                assert_eq!(b != a, trains, "{} row {row}", spec.name);
            }
        }
        // Rows past the end, and rows of an expert's weight, are named errors.
        let past = Trainable { include: vec![format!("*.mlp.gate.weight[{}]", last + 1)], exclude: vec![] };
        assert!(format!("{:#}", Weights::new(cfg.clone(), tensors.clone(), &past, None).err().unwrap()).contains("has 4 rows"));
        let expert_rows = Trainable { include: vec!["*.mlp.experts.0.up_proj.weight[0:2]".into()], exclude: vec![] };
        assert!(format!("{:#}", Weights::new(cfg, tensors, &expert_rows, None).err().unwrap()).contains("an expert's weight"));
        assert!(crate::spec::split_rows("x[2:1]").is_err() && crate::spec::split_rows("x[a]").is_err());
    }

    #[test]
    fn only_selected_tensors_become_variables() {
        let cfg = fixture_config();
        let routers = Trainable { include: vec!["*.mlp.gate.weight".into()], exclude: vec![] };
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
