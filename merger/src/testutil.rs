//! Test helpers: the model crate's tiny fixtures, seeded perturbations of them as "trained
//! experts", synthetic calibration domains, and logit/perplexity comparisons.

use btm_model::{Checkpoint, Extras, Lineage, WriteOptions};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::path::{Path, PathBuf};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures").join(name)
}

/// The fixtures' token ids [2, 16] (from transformers' expected outputs).
pub fn input_ids() -> Tensor {
    let t = candle_core::safetensors::load(fixture("llama").join("expected.safetensors"), &Device::Cpu).unwrap();
    t["input_ids"].to_dtype(DType::U32).unwrap()
}

pub fn logits(dir: &Path) -> Tensor {
    let ckpt = Checkpoint::open(dir).unwrap();
    let model = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
    model.forward(&input_ids()).unwrap()
}

/// max |a − b| / max |a|.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    d / a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64
}

pub fn ppl(dir: &Path) -> f64 {
    let ckpt = Checkpoint::open(dir).unwrap();
    let model = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
    let texts = btm_model::jsonl::read_texts(&fixture("eval.jsonl"), None).unwrap();
    btm_model::eval::perplexity(&model, &ckpt.tokenizer().unwrap(), &texts, 16, &Device::Cpu).unwrap().ppl
}

/// A "trained expert": `base` with seeded noise of relative size `noise` on every FFN weight
/// (and on everything else when `all` is set), written with btm's writer and an `expert` lineage.
pub fn perturbed(base: &Path, dest: &Path, seed: u64, noise: f32, all: bool, domain: &str) -> PathBuf {
    let src = Checkpoint::open(base).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut get = |name: &str| -> btm_model::Result<Tensor> {
        let t = src.tensor(name)?.to_dtype(DType::F32)?;
        if !(all || name.contains(".mlp.")) {
            return Ok(t);
        }
        let std = (t.sqr()?.mean_all()?.to_scalar::<f32>()?).sqrt() * noise;
        let normal = Normal::new(0f32, std.max(1e-12)).unwrap();
        let noise: Vec<f32> = (0..t.elem_count()).map(|_| normal.sample(&mut rng)).collect();
        let noise = Tensor::from_vec(noise, t.dims(), &Device::Cpu)?;
        Ok((t + noise)?)
    };
    let mut lineage = Lineage::new("expert");
    lineage.domain = Some(domain.into());
    lineage.parents =
        vec![btm_model::lineage::Parent { uri: base.display().to_string(), manifest_sha256: Some("seed".into()), domain: None }];
    let extras = Extras { tokenizer: Some(base.join("tokenizer.json")), lineage: Some(lineage) };
    btm_model::write_checkpoint(dest, &src.config, &mut get, &extras, &WriteOptions::default()).unwrap();
    dest.to_path_buf()
}

/// Three calibration domains that look nothing alike to a byte-level tokenizer.
pub fn domain_texts(domain: &str, docs: usize, offset: usize) -> Vec<String> {
    (offset..offset + docs)
        .map(|i| match domain {
            "prose" => format!(
                "the children walk to the river in the morning and the old man tells them a story about the bridge and the rain {}",
                ["one", "two", "three", "four", "five"][i % 5]
            ),
            "code" => format!("{{[(<{i}>)]}}; ${i} := @[{{}}] => ({i}) <> [[]]; && || !== {{}};"),
            "digits" => format!("{} {} {} {}", i * 7919 % 10007, i * 104729 % 99991, i * 31 + 12345, (i * i) % 977),
            other => panic!("unknown domain {other}"),
        })
        .collect()
}

/// Write `{"text": ...}` lines.
pub fn write_jsonl(path: &Path, texts: &[String]) -> PathBuf {
    let lines: Vec<String> = texts.iter().map(|t| serde_json::json!({ "text": t }).to_string()).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    path.to_path_buf()
}
