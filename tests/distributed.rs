//! Multi-process phases end to end through `btm run` (needs `--features mpi` and `mpirun`):
//! the experts train with data parallelism, the merged MoE continues with its experts split
//! over two ranks, and the continued model is evaluated like any other.
#![cfg(feature = "mpi")]

mod common;

use common::{btm, fixture_pipeline, ok};

#[test]
fn a_pipeline_trains_data_parallel_experts_and_continues_its_moe_expert_parallel() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let file = fixture_pipeline(
        tmp.path(),
        "ranks",
        &runs.to_string_lossy(),
        "{kind: local, slots: 2, threads_per_job: 1}",
        "steps: 4, batch_size: 2, seq_len: 32, grad_accum: 2, data_parallel: 2",
        "continue: {steps: 4, expert_parallel: 2}\n",
    );
    let dry = ok(btm().arg("run").arg(&file).arg("--dry-run").output().unwrap());
    let continue_block = dry.split("continue/merged [").nth(1).expect("a continue job");
    let command = continue_block.lines().find(|l| l.trim_start().starts_with("command:")).unwrap();
    assert!(command.contains("mpirun") && command.contains("-np 2") && command.contains("btm train"), "{command}");

    let out = ok(btm().arg("run").arg(&file).arg("--quiet").output().unwrap());
    assert!(out.contains("| continued |"), "the continued MoE is evaluated:\n{out}");
    let run = runs.join("ranks");
    for (job, layout) in [("continue-merged", "expert_parallel 2"), ("expert-code", "data_parallel 2")] {
        let log = std::fs::read_dir(run.join("logs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(job))
            .unwrap_or_else(|| panic!("no log of {job}"));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains(&format!(
                "2 ranks: data_parallel {}",
                if layout.starts_with("data") { "2 × expert_parallel 1" } else { "1 × expert_parallel 2" }
            )),
            "{job}: {text}"
        );
    }
    // The continued model is an ordinary checkpoint with every expert (written by rank 0).
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("continued/model/config.json")).unwrap()).unwrap();
    assert_eq!(config["num_local_experts"], 2);
}

#[test]
fn the_training_benchmark_runs_on_two_expert_parallel_ranks() {
    let out = ok(btm().args(["bench", "train", "--moe", "--ranks", "2", "--threads", "1", "--steps", "1", "--json"]).output().unwrap());
    let line = out.lines().find(|l| l.starts_with('{')).expect("one JSON line, from rank 0 only");
    assert_eq!(out.lines().filter(|l| l.starts_with('{')).count(), 1, "{out}");
    let r: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!((r["ranks"].as_u64(), r["expert_parallel"].as_u64()), (Some(2), Some(2)), "{r}");
    assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0 && r["collective_s"].as_f64().unwrap() > 0.0, "{r}");
}
