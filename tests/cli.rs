//! Drive the `btm` binary the way a user does: real files in, exit codes and output checked.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn btm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_btm")).args(args).output().expect("btm runs")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures")
}

fn fixture(rel: &str) -> String {
    fixtures().join(rel).to_string_lossy().into_owned()
}

fn eval_json(model: &str) -> serde_json::Value {
    let out = btm(&["eval", "--model", model, "--data", &fixture("eval.jsonl"), "--seq-len", "16", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn eval_prints_transformers_perplexity() {
    let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(fixtures().join("mixtral/expected.json")).unwrap()).unwrap();
    let got = eval_json(&fixture("mixtral"));
    assert_eq!(got["tokens"], expected["eval"]["tokens"]);
    let (g, w) = (got["ppl"].as_f64().unwrap(), expected["eval"]["ppl"].as_f64().unwrap());
    assert!((g - w).abs() / w <= 1e-5, "{g} vs {w}");
}

#[test]
fn convert_then_eval_agrees_and_accepts_file_urls() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qwen-bf16");
    let o = btm(&["convert", "--model", &fixture("qwen2_moe"), "--out", out.to_str().unwrap(), "--dtype", "bfloat16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("MANIFEST.json").exists() && out.join("btm.json").exists());
    let lineage: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("btm.json")).unwrap()).unwrap();
    assert_eq!(lineage["kind"], "import");
    assert_eq!(lineage["parents"][0]["uri"], fixture("qwen2_moe"));
    let url = format!("file://{}", out.display());
    let a = eval_json(out.to_str().unwrap());
    let b = eval_json(&url);
    assert_eq!(a, b);
    // bfloat16 weights move perplexity a little, not a lot.
    let f32_ppl = eval_json(&fixture("qwen2_moe"))["ppl"].as_f64().unwrap();
    let rel = (a["ppl"].as_f64().unwrap() - f32_ppl).abs() / f32_ppl;
    assert!(rel > 0.0 && rel < 0.01, "{rel}");
}

#[test]
fn bad_input_fails_with_a_named_error_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let o = btm(&["eval", "--model", tmp.path().to_str().unwrap(), "--data", &fixture("eval.jsonl")]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("config.json: file not found"), "{err}");

    let out = tmp.path().join("out");
    let o = btm(&["convert", "--model", &fixture("llama"), "--out", out.to_str().unwrap(), "--dtype", "int8"]);
    // A value outside an enumeration is a usage error (exit 2) that lists the possible values.
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("invalid value 'int8' for '--dtype") && err.contains("float32, bfloat16, float16"), "{err}");
    assert!(!out.exists());
}

#[test]
fn tokenizer_train_then_encode() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tokenizer.json");
    let o = btm(&["tokenizer", "train", "--data", &fixture("eval.jsonl"), "--vocab-size", "300", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tok: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(tok["model"]["type"], "BPE");
    assert_eq!(tok["added_tokens"][0]["content"], "<s>");
}

#[test]
fn a_closed_stdout_ends_btm_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_btm"))
        .arg("schema")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    // The schema is larger than a pipe's buffer only sometimes; either it all fitted (exit 0)
    // or printing hit the closed pipe (exit 141, as a SIGPIPE death reads in a shell).
    assert!(matches!(out.status.code(), Some(0) | Some(141)), "{:?}", out.status);
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn version_names_the_commit_and_completions_cover_every_subcommand() {
    let out = btm(&["--version"]);
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && v.starts_with("btm 0.") && v.contains(" (") && v.trim_end().ends_with(')'), "{v}");
    for shell in ["bash", "zsh", "fish"] {
        let out = btm(&["completions", shell]);
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}");
        for sub in ["run", "remove-expert", "average", "add-expert"] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    assert!(!btm(&["completions", "tcsh"]).status.success());
}

/// `btm merge --mergekit-config` reads mergekit-moe's YAML: `gate_mode: random` gives the same
/// weights as the equivalent flags (experts, `from:` the base, top-k), `hidden` turns each
/// expert's `positive_prompts` into its centroid router's calibration text, and what btm cannot
/// honour is a named error (with the line for an unknown key) that writes nothing.
#[test]
fn mergekit_moe_configs_become_the_equivalent_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = fixture("llama");
    let config = |name: &str, body: &str| {
        let f = tmp.path().join(format!("{name}.yml"));
        std::fs::write(&f, format!("base_model: {llama}\ndtype: float32\n{body}")).unwrap();
        f.to_string_lossy().into_owned()
    };
    let out = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
    let ok = |o: Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let random = config(
        "random",
        &format!("gate_mode: random\nexperts_per_token: 1\nexperts:\n  - source_model: {llama}\n  - source_model: {llama}\n"),
    );
    ok(btm(&["merge", "--mergekit-config", &random, "--out", &out("from-mergekit")]));
    let from = format!("from:{llama}");
    let flags = [
        "merge",
        "--experts",
        &llama,
        &llama,
        "--top-k",
        "1",
        "--router-init",
        "random",
        "--non-expert",
        &from,
        "--out",
        &out("from-flags"),
    ];
    ok(btm(&flags));
    let weights = |name: &str| std::fs::read(tmp.path().join(name).join("model.safetensors")).unwrap();
    assert!(weights("from-mergekit") == weights("from-flags"), "the mergekit config and the flags wrote different weights");

    let prompts = "experts:\n  - source_model: LLAMA\n    positive_prompts: [\"fn main() { let x = 1; }\", \"impl Drop for Guard {}\"]\n  - source_model: LLAMA\n    positive_prompts:\n      - \"In the beginning was the word, and the word was with the river.\"\n"
        .replace("LLAMA", &llama);
    let hidden = config("hidden", &prompts);
    let said = ok(btm(&["merge", "--mergekit-config", &hidden, "--out", &out("hidden")]));
    assert!(said.contains("router centroid"), "{said}");
    let lineage: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.path().join("hidden/btm.json")).unwrap()).unwrap();
    assert_eq!(lineage["router_init"]["method"], "centroid");
    assert_eq!(lineage["calibration"][1]["domain"], "expert1");

    for (name, body, want) in [
        ("cheap", prompts.replace("experts:", "gate_mode: cheap_embed\nexperts:"), "gate_mode: cheap_embed is not supported".to_string()),
        (
            "negative",
            prompts.replace("    positive_prompts:\n", "    negative_prompts: [\"no\"]\n    positive_prompts:\n"),
            "experts[1].negative_prompts: not supported".to_string(),
        ),
        ("unknown", format!("tokenizer_source: union\n{prompts}"), "unknown field `tokenizer_source`".to_string()),
        (
            "hub",
            "experts:\n  - source_model: mistralai/Mistral-7B-v0.1\n    positive_prompts: [a b]\n".to_string(),
            "btm does not download from the Hugging Face Hub".to_string(),
        ),
    ] {
        let o = btm(&["merge", "--mergekit-config", &config(name, &body), "--out", &out(name)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(&want), "{name}: {err}");
        assert!(!tmp.path().join(name).exists(), "{name}: wrote an output");
    }
    let o = btm(&["merge", "--mergekit-config", &config("unknown2", &format!("tokenizer_source: union\n{prompts}")), "--out", &out("u2")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 3"), "an unknown key names its line: {err}");
}
