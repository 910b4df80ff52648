//! Kubernetes: `btm run --dry-run` prints one Indexed Job per batch of jobs, and every manifest
//! passes the official schema (`kubernetes-validate --strict`, from PyPI; CI installs it).
//! The REST calls themselves are tested against a fake API server in the engine's unit tests;
//! no live cluster is used.

mod common;

use common::{domain, repo};
use std::process::Command;

fn validator() -> Option<String> {
    let exe = std::env::var("BTM_KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    if Command::new(&exe).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some(exe);
    }
    assert!(
        std::env::var("BTM_REQUIRE_KUBERNETES_VALIDATE").as_deref() != Ok("1"),
        "BTM_REQUIRE_KUBERNETES_VALIDATE=1 but `{exe}` does not run"
    );
    eprintln!("skipping the schema check: `{exe}` not found (pip install kubernetes-validate)");
    None
}

#[test]
fn dry_run_prints_indexed_jobs_that_pass_the_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let mut yaml = format!(
        "name: k8s\nstorage: /runs\nengine: {{kind: kubernetes, image: 'registry.example/btm:0.1', namespace: research, cpus_per_task: 4, memory_mb: 8192, gpus_per_task: 1, volume: {{claim: btm-runs, mount_path: /runs}}}}\n\
         seed: {{checkpoint: {}}}\ndomains:\n",
        repo().join("model/tests/fixtures/llama").display()
    );
    for d in ["scripture", "code", "computing"] {
        yaml.push_str(&domain(d));
    }
    yaml.push_str("train: {steps: 10}\nmerge: {top_k: 2}\n");
    let file = tmp.path().join("k8s.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_btm")).arg("run").arg(&file).arg("--dry-run").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let manifests: Vec<&str> = text.split("---\n").skip(1).collect();
    // Experts, merge, and the evals grouped by the model they score.
    assert!(manifests.len() >= 3, "{text}");
    let experts = manifests.iter().find(|m| m.contains("expert-scripture")).expect("an expert batch");
    for needle in [
        "kind: Job",
        "completionMode: Indexed",
        "completions: 3",
        "JOB_COMPLETION_INDEX",
        "nvidia.com/gpu: '1'",
        "claimName: btm-runs",
        "backoffLimitPerIndex: 2",
        "namespace: research",
    ] {
        assert!(experts.contains(needle), "`{needle}` missing from:\n{experts}");
    }
    let Some(validate) = validator() else { return };
    for (i, m) in manifests.iter().enumerate() {
        let path = tmp.path().join(format!("m{i}.yaml"));
        std::fs::write(&path, m).unwrap();
        let out = Command::new(&validate).arg("--strict").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "manifest {i} fails the schema:\n{}{}\n{m}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
