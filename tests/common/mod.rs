//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `btm` binary under test.
pub fn btm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_btm"))
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A file of the bundled sample corpus.
pub fn sample(domain: &str, split: &str) -> String {
    repo().join(format!("data/sample/{domain}/{split}.jsonl")).to_string_lossy().into_owned()
}

/// stdout + stderr of a command that must have succeeded.
pub fn ok(out: Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "btm failed:\n{text}");
    text
}

/// A pipeline `domains:` entry for a sample domain.
pub fn domain(name: &str) -> String {
    format!(
        "  - {{name: {name}, train: {}, valid: {}, test: {}}}\n",
        sample(name, "train"),
        sample(name, "valid"),
        sample(name, "test")
    )
}

/// Whether a trainer's output folder holds a published checkpoint.
pub fn has_checkpoint(expert: &Path) -> bool {
    std::fs::read_dir(expert.join("checkpoints"))
        .map(|d| d.flatten().any(|e| e.path().join("MANIFEST.json").exists()))
        .unwrap_or(false)
}
