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

/// `btm run --dry-run`'s manifests for a three-domain pipeline with this storage and these
/// extra engine settings.
fn dry_run_manifests(tmp: &std::path::Path, storage: &str, engine_extra: &str) -> Vec<String> {
    dry_run_manifests_with(tmp, storage, engine_extra, "steps: 10")
}

/// The same with the expert phase's `train` block (inside its braces) given.
fn dry_run_manifests_with(tmp: &std::path::Path, storage: &str, engine_extra: &str, train: &str) -> Vec<String> {
    let mut yaml = format!(
        "name: k8s\nstorage: {storage}\nengine: {{kind: kubernetes, image: 'registry.example/btm:0.1', namespace: research, cpus_per_task: 4, memory_mb: 8192, gpus_per_task: 1{engine_extra}}}\n\
         seed: {{checkpoint: {}}}\ndomains:\n",
        repo().join("model/tests/fixtures/llama").display()
    );
    for d in ["scripture", "code", "computing"] {
        yaml.push_str(&domain(d));
    }
    yaml.push_str(&format!("experts: {{{train}}}\nmerge: {{top_k: 2}}\n"));
    let file = tmp.join("k8s.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_btm")).arg("run").arg(&file).arg("--dry-run").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("---\n").skip(1).map(str::to_string).collect()
}

fn check_schema(tmp: &std::path::Path, manifests: &[String]) {
    let Some(validate) = validator() else { return };
    for (i, m) in manifests.iter().enumerate() {
        let path = tmp.join(format!("m{i}.yaml"));
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

#[test]
fn dry_run_prints_indexed_jobs_that_pass_the_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let manifests = dry_run_manifests(tmp.path(), "/runs", ", volume: {claim: btm-runs, mount_path: /runs}");
    // Experts, merge, and the evals grouped by the model they score.
    assert!(manifests.len() >= 3, "{manifests:?}");
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
    check_schema(tmp.path(), &manifests);
}

#[test]
fn a_run_in_a_bucket_takes_store_credentials_from_a_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let manifests = dry_run_manifests(tmp.path(), "s3://btm-bucket/runs", ", env_from_secret: btm-s3-credentials");
    let experts = manifests.iter().find(|m| m.contains("expert-scripture")).expect("an expert batch");
    for needle in ["secretRef:", "name: btm-s3-credentials", "JOB_COMPLETION_INDEX"] {
        assert!(experts.contains(needle), "`{needle}` missing from:\n{experts}");
    }
    assert!(!experts.contains("persistentVolumeClaim") && !experts.contains(">>"), "{experts}");
    check_schema(tmp.path(), &manifests);
}

/// Experts trained by a two-node torchrun: each expert takes two indices of the Indexed Job,
/// its pods named through a headless Service so that node 1 finds the rendezvous on node 0.
#[test]
fn a_multi_node_torchrun_gets_two_pods_per_job_and_a_headless_service() {
    let tmp = tempfile::tempdir().unwrap();
    let trainer = format!(
        "steps: 10, trainer: {{kind: torchrun, script: {}, nproc_per_node: 8, nnodes: 2}}",
        repo().join("scripts/train_hf.py").display()
    );
    let manifests = dry_run_manifests_with(tmp.path(), "/runs", ", volume: {claim: btm-runs, mount_path: /runs}", &trainer);
    let experts = manifests.iter().find(|m| m.contains("kind: Job") && m.contains("expert-scripture")).expect("an expert batch");
    for needle in [
        "completions: 6",
        "parallelism: 6",
        "J=$((JOB_COMPLETION_INDEX / 2))",
        "BTM_NODE_RANK=$((JOB_COMPLETION_INDEX % 2))",
        "BTM_RDZV_ENDPOINT=",
        ":29500",
        "subdomain: btm-k8s-expert-",
    ] {
        assert!(experts.contains(needle), "`{needle}` missing from:\n{experts}");
    }
    let service = manifests.iter().find(|m| m.contains("kind: Service")).expect("a headless Service");
    for needle in ["clusterIP: None", "publishNotReadyAddresses: true", "batch.kubernetes.io/job-name: btm-k8s-expert-"] {
        assert!(service.contains(needle), "`{needle}` missing from:\n{service}");
    }
    check_schema(tmp.path(), &manifests);
}

/// A data-parallel expert phase: each expert's two ranks are two pods that meet over the TCP
/// collective, the first pod their rank 0, named by a headless Service.
#[test]
fn btm_ranks_get_a_pod_each_and_meet_over_tcp() {
    let tmp = tempfile::tempdir().unwrap();
    let manifests = dry_run_manifests_with(
        tmp.path(),
        "/runs",
        ", volume: {claim: btm-runs, mount_path: /runs}",
        "steps: 10, grad_accum: 2, data_parallel: 2",
    );
    let experts = manifests.iter().find(|m| m.contains("kind: Job") && m.contains("expert-scripture")).expect("an expert batch");
    for needle in
        ["completions: 6", "parallelism: 6", "RANK=$((JOB_COMPLETION_INDEX % 2)) WORLD_SIZE=2", "MASTER_ADDR=", "MASTER_PORT=29500"]
    {
        assert!(experts.contains(needle), "`{needle}` missing from:\n{experts}");
    }
    assert!(manifests.iter().any(|m| m.contains("kind: Service") && m.contains("clusterIP: None")), "{manifests:?}");
    check_schema(tmp.path(), &manifests);
}
