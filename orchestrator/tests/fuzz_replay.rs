//! Replays every fuzz target's seed corpus and regressions (`fuzz/corpus/<target>`,
//! `fuzz/regressions/<target>`) through the plain functions the cargo-fuzz targets call
//! ([`btm::fuzz_targets`], [`btm_trainer::fuzz_targets`], [`btm_model::fuzz_targets`]), on
//! stable and in a few seconds, so every CI run checks that no input kept in the tree panics or
//! hangs again: pipeline files, job specs, the answers of Slurm, Kubernetes and Ray, model
//! folders and training data. It lives here because this crate depends on the other two, so the
//! replay is written once. Fuzzing itself is described in docs/testing.md.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Every input of `target` kept in the tree: its seed corpus (which must not be empty: a
/// missing corpus would make the replay pass vacuously) and its regressions, if any.
fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let files = |kind: &str| -> Vec<PathBuf> {
        let dir = fuzz.join(kind).join(target);
        match std::fs::read_dir(&dir) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => panic!("{}: {e}", dir.display()),
        }
    };
    let corpus = files("corpus");
    assert!(!corpus.is_empty(), "no seed corpus for {target} in {}", fuzz.join("corpus").display());
    let mut all: Vec<PathBuf> = corpus.into_iter().chain(files("regressions")).collect();
    all.sort();
    all
}

/// An input slower than this is a finding, as libFuzzer's `-timeout` (used at 20 s) would
/// report it; generous, since tests run unoptimised on busy machines.
const SLOW: Duration = Duration::from_secs(20);

/// Call `run` on every input of `target`; fail naming each input on which it panicked or that
/// took longer than [`SLOW`]. Its result is not checked: any `Ok` or named error is a pass, as
/// in the fuzzer.
fn replay<T>(target: &str, run: impl Fn(&[u8]) -> T) {
    let mut failed = vec![];
    let inputs = inputs(target);
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        let start = Instant::now();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(run(&data)))).is_err() {
            failed.push(format!("{}: panicked", path.display()));
        } else if start.elapsed() > SLOW {
            failed.push(format!("{}: took {:?}", path.display(), start.elapsed()));
        }
    }
    assert!(failed.is_empty(), "{target}: {} of {} inputs failed: {failed:#?}", failed.len(), inputs.len());
}

#[test]
fn pipeline_yaml() {
    replay("pipeline_yaml", btm::fuzz_targets::pipeline_yaml);
}

#[test]
fn job_spec() {
    replay("job_spec", btm::fuzz_targets::job_spec);
}

#[test]
fn slurm_answers() {
    replay("slurm_answers", btm::fuzz_targets::slurm_answers);
}

#[test]
fn kubernetes_answers() {
    replay("kubernetes_answers", btm::fuzz_targets::kubernetes_answers);
}

#[test]
fn ray_answers() {
    replay("ray_answers", btm::fuzz_targets::ray_answers);
}

#[test]
fn jsonl_source() {
    replay("jsonl_source", btm_trainer::fuzz_targets::jsonl_source_input);
}

#[test]
fn parquet_source() {
    replay("parquet_source", btm_trainer::fuzz_targets::parquet_source);
}

#[test]
fn megatron_index() {
    replay("megatron_index", btm_trainer::fuzz_targets::megatron_index);
}

#[test]
fn megatron_dataset() {
    replay("megatron_dataset", btm_trainer::fuzz_targets::megatron_dataset);
}

#[test]
fn token_cache() {
    replay("token_cache", btm_trainer::fuzz_targets::token_cache);
}

#[test]
fn safetensors() {
    replay("safetensors", btm_model::fuzz_targets::safetensors);
}

#[test]
fn config_json() {
    replay("config_json", btm_model::fuzz_targets::config_json);
}

#[test]
fn tokenizer_json() {
    replay("tokenizer_json", btm_model::fuzz_targets::tokenizer_json);
}

#[test]
fn manifest_and_lineage() {
    replay("manifest_and_lineage", btm_model::fuzz_targets::manifest_and_lineage);
}

#[test]
fn jsonl() {
    replay("jsonl", btm_model::fuzz_targets::jsonl_input);
}

#[test]
fn checkpoint() {
    replay("checkpoint", btm_model::fuzz_targets::checkpoint);
}
