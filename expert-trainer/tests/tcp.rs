//! Multi-process training over the TCP collective (`collective: tcp`), with no MPI: two worker
//! processes started by this test, as a Kubernetes Indexed Job or any launcher starts them,
//! meet through `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`. Data and expert
//! parallelism are bit-identical to gradient accumulation in one process, as over MPI.

mod common;

use common::*;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const WORKER: &str = env!("CARGO_BIN_EXE_btm-train-worker");

/// A job file for run `name` over fixture `model` in `dir`; `extra` is appended YAML.
fn job(dir: &Path, train: &Path, valid: &Path, name: &str, model: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    // One thread per process everywhere: results then do not depend on thread counts.
    let yaml = job_yaml(model, train, valid, &dir.join(name), &dir.join("cache"), extra).replace("threads: 2", "threads: 1");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn single(job: &Path) {
    let out = Command::new(WORKER).arg(job).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `ranks` workers on `job`, rank 0's rendezvous on a free loopback port.
fn over_tcp(job: &Path, ranks: usize) {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port();
    let children: Vec<_> = (0..ranks)
        .map(|rank| {
            Command::new(WORKER)
                .arg(job)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", ranks.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "rank {rank} failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("finished 12"), "rank {rank}: {stdout}");
    }
}

const STEPS: &str = "steps: 12\nseed: 3\ncheckpoint: {interval: 6, keep: 1}\ngrad_accum: 2\ncollective: tcp\n";

#[test]
fn data_and_expert_parallel_over_tcp_are_bit_identical_to_gradient_accumulation() {
    let (dir, train, valid) = data_dir();
    let d = dir.path();
    let no_aux = "moe: {aux_loss_coef: 0.0, z_loss_coef: 0.0}\n";
    for (model, layout, extra) in [("llama", "data_parallel: 2\n", ""), ("mixtral", "expert_parallel: 2\n", no_aux)] {
        let accum = job(d, &train, &valid, &format!("{model}-accum"), model, &format!("{STEPS}{extra}"));
        let split = job(d, &train, &valid, &format!("{model}-tcp"), model, &format!("{STEPS}{extra}{layout}"));
        single(&accum);
        over_tcp(&split, 2);
        assert_eq!(losses(&d.join(format!("{model}-accum"))), losses(&d.join(format!("{model}-tcp"))), "{model}");
        let (a, b) = (d.join(format!("{model}-accum")), d.join(format!("{model}-tcp")));
        assert!(tensors(&a.join("model")) == tensors(&b.join("model")), "{model}: the models differ");
        let step12 = "checkpoints/step-00000012";
        assert!(moments(&a.join(step12)) == moments(&b.join(step12)), "{model}: the AdamW moments differ");
    }
    // A rank told another world size than the job's is a named error.
    let bad = job(d, &train, &valid, "bad", "llama", &format!("{STEPS}data_parallel: 2\n"));
    let out = Command::new(WORKER).arg(&bad).env("RANK", "0").env("WORLD_SIZE", "3").env("MASTER_PORT", "1").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("WORLD_SIZE is 3"), "{err}");
}
