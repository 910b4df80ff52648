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
