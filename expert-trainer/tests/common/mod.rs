//! Shared helpers for the trainer's integration tests: fixture paths, synthetic JSONL data,
//! job files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures")
}

/// `n` documents of varied English-like text.
pub fn write_docs(path: &Path, n: usize, salt: usize) {
    let words = [
        "the", "river", "runs", "under", "a", "bridge", "where", "children", "throw", "sticks", "and", "rain", "falls", "for", "seven",
        "days", "while", "experts", "route", "tokens", "to", "layers", "of", "quiet", "stone",
    ];
    let mut lines = Vec::new();
    for d in 0..n {
        let len = 20 + (d * 7 + salt) % 30;
        let text: Vec<&str> = (0..len).map(|i| words[(d * 31 + i * i * 7 + salt * 3 + i) % words.len()]).collect();
        lines.push(serde_json::json!({ "id": format!("d{d}"), "text": text.join(" ") }).to_string());
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// A workspace with train/valid data and a token cache; returns (dir, train, valid).
pub fn data_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    let valid = dir.path().join("valid.jsonl");
    write_docs(&train, 120, 0);
    write_docs(&valid, 20, 5);
    (dir, train, valid)
}

/// A small job over the fixture model `model` (llama, mixtral, ...), writing to `out`.
pub fn job_yaml(model: &str, train: &Path, valid: &Path, out: &Path, cache: &Path, extra: &str) -> String {
    format!(
        "init: {{checkpoint: {ckpt}}}\n\
         out: {out}\n\
         data:\n  train: [{{path: {train}}}]\n  valid: [{valid}]\n\
         seq_len: 16\n\
         batch_size: 2\n\
         threads: 2\n\
         token_cache: {cache}\n\
         log_interval: 1\n\
         eval: {{interval: 4, sequences: 4}}\n\
         optimizer: {{lr: 0.003, weight_decay: 0.1}}\n\
         schedule: {{warmup_steps: 2, min_lr: 0.0003}}\n\
         {extra}",
        ckpt = fixtures().join(model).display(),
        out = out.display(),
        train = train.display(),
        valid = valid.display(),
        cache = cache.display(),
    )
}

/// The training losses of the run in `out`, one per logged step.
pub fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect()
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every tensor of a Hugging Face model folder (all its weight files), as float32 values by name.
pub fn tensors(model: &Path) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = safetensors_files(model, "model").iter().flat_map(|f| tensors_in(f)).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The `<prefix>….safetensors` files of a folder, in name order.
pub fn safetensors_files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix) && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    files
}

/// The float32 tensors of one safetensors file, by name.
pub fn tensors_in(file: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = read(file);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()))
        .collect()
}

/// A checkpoint's AdamW moments, whole: `optimizer.safetensors`, then each later writer's
/// expert stacks (`optimizer-0000w-of-0000n.safetensors`) appended along the first dimension —
/// for row-major stacks, their bytes appended.
pub fn moments(ckpt: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let mut out = std::collections::BTreeMap::new();
    // `optimizer.safetensors` first: its stacks are the first writer's experts.
    let mut files = safetensors_files(ckpt, "optimizer");
    files.sort_by_key(|f| !f.ends_with("optimizer.safetensors"));
    for file in files {
        for (name, values) in tensors_in(&file) {
            out.entry(name).or_insert_with(Vec::new).extend(values);
        }
    }
    out
}

/// Two training steps of fixture `model` with only each layer's `layer_tensors` (names under
/// `model.layers.<l>.`, without `.weight`) trainable and no weight decay, so only a gradient can
/// move them. Returns the fixture, the trained model, the names of the tensors that changed
/// (sorted) and the names that should have (sorted).
pub fn train_layer_tensors(
    model: &str,
    layer_tensors: &[&str],
) -> (btm_model::Checkpoint, btm_model::Checkpoint, Vec<String>, Vec<String>) {
    use btm_model::Checkpoint;
    let (dir, train, valid) = data_dir();
    let out = dir.path().join("out");
    let include: Vec<String> = layer_tensors.iter().map(|n| format!("'*.{n}.weight'")).collect();
    let extra = format!("steps: 2\ntrainable: {{include: [{}]}}\n", include.join(", "));
    let yaml = job_yaml(model, &train, &valid, &out, &dir.path().join("cache"), &extra).replace("weight_decay: 0.1", "weight_decay: 0.0");
    assert!(yaml.contains("weight_decay: 0.0"));
    let spec = btm_trainer::JobSpec::parse(&yaml, dir.path()).unwrap();
    let outcome = btm_trainer::run(&spec, btm_trainer::Options { quiet: true, ..Default::default() }).unwrap();
    let btm_trainer::Outcome::Finished { model_dir, .. } = outcome else { panic!("{outcome:?}") };
    let before = Checkpoint::open(fixtures().join(model)).unwrap();
    let after = Checkpoint::open(&model_dir).unwrap();
    let mut changed = Vec::new();
    for spec in before.tensor_specs() {
        let a = before.tensor(&spec.name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = after.tensor(&spec.name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if a != b {
            changed.push(spec.name);
        }
    }
    changed.sort();
    let layers = before.config.num_layers;
    let mut want: Vec<String> =
        (0..layers).flat_map(|l| layer_tensors.iter().map(move |n| format!("model.layers.{l}.{n}.weight"))).collect();
    want.sort();
    (before, after, changed, want)
}
