//! Multi-process training under a real `mpirun` (Open MPI or MPICH), two ranks on this machine:
//! data and expert parallelism equal gradient accumulation bit for bit, expert parallelism with
//! the global load-balancing loss equals one process's batch to float32 rounding, each rank
//! writes its own experts into checkpoints that resume on another number of ranks, and a rank
//! killed mid-run fails the job, which then resumes from its last checkpoint to the same weights.
//!
//! Needs the `mpi` feature (`cargo test -p btm-trainer --features mpi --test distributed`) and
//! `mpirun` on the PATH; `.ci/run` installs Open MPI.
#![cfg(feature = "mpi")]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const WORKER: &str = env!("CARGO_BIN_EXE_btm-train-worker");

/// `mpirun -np N WORKER args…` with the flags Open MPI needs on a small machine (as root, more
/// ranks than cores, no core pinning).
fn mpirun(ranks: usize, args: &[&str]) -> Command {
    let version = Command::new("mpirun").arg("--version").output().expect("mpirun is not installed (apt-get install openmpi-bin)");
    let mut cmd = Command::new("mpirun");
    if String::from_utf8_lossy(&version.stdout).contains("Open MPI") {
        if unsafe { libc::getuid() } == 0 {
            cmd.arg("--allow-run-as-root");
        }
        cmd.args(["--oversubscribe", "--bind-to", "none"]);
    }
    cmd.args(["-np", &ranks.to_string(), WORKER]).args(args);
    cmd
}

fn run(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "run failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn single(job: &Path) -> String {
    let mut cmd = Command::new(WORKER);
    cmd.arg(job);
    run(cmd)
}

struct Runs {
    dir: tempfile::TempDir,
    train: PathBuf,
    valid: PathBuf,
}

impl Runs {
    fn new() -> Self {
        let (dir, train, valid) = data_dir();
        Self { dir, train, valid }
    }
    /// A job file for run `name` over fixture `model`; `extra` is appended YAML.
    fn job(&self, name: &str, model: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.yaml"));
        let out = self.dir.path().join(name);
        let cache = self.dir.path().join("cache");
        // One thread per process everywhere: results then do not depend on thread counts.
        let yaml = job_yaml(model, &self.train, &self.valid, &out, &cache, extra).replace("threads: 2", "threads: 1");
        std::fs::write(&path, yaml).unwrap();
        path
    }
    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Largest |a − b| / max|b| over the tensors of two models with the same names.
fn max_relative_difference(a: &Path, b: &Path) -> f64 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.iter().map(|t| &t.0).collect::<Vec<_>>(), tb.iter().map(|t| &t.0).collect::<Vec<_>>());
    ta.iter()
        .zip(&tb)
        .map(|((_, x), (_, y))| {
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
            x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs())) as f64 / scale as f64
        })
        .fold(0.0, f64::max)
}

const STEPS: &str = "steps: 20\nseed: 3\ncheckpoint: {interval: 5, keep: 2}\n";

#[test]
fn data_parallel_on_two_ranks_is_bit_identical_to_gradient_accumulation() {
    let runs = Runs::new();
    let accum = runs.job("accum", "llama", &format!("{STEPS}grad_accum: 2\n"));
    let dp = runs.job("dp", "llama", &format!("{STEPS}grad_accum: 2\ndata_parallel: 2\n"));
    single(&accum);
    let out = run(mpirun(2, &[dp.to_str().unwrap()]));
    assert_eq!(out.matches("finished 20").count(), 2, "both ranks finish: {out}");
    let (a, b) = (losses(&runs.out("accum")), losses(&runs.out("dp")));
    assert_eq!(a.len(), 20);
    assert_eq!(a, b, "losses differ");
    for file in ["model/model.safetensors", "checkpoints/step-00000020/optimizer.safetensors"] {
        assert!(read(&runs.out("accum").join(file)) == read(&runs.out("dp").join(file)), "{file} differs");
    }
    // The run is one run: rank 0 alone wrote the metrics (a line per step, validations).
    let lines = std::fs::read_to_string(runs.out("dp").join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().filter(|l| l.contains("\"loss\"")).count(), 20);
}

#[test]
fn expert_parallel_on_two_ranks_matches_one_process() {
    let runs = Runs::new();
    // Without router losses: the same two micro-batches, accumulated in one process.
    let no_aux = "moe: {aux_loss_coef: 0.0, z_loss_coef: 0.0}\n";
    let accum = runs.job("accum", "mixtral", &format!("{STEPS}{no_aux}grad_accum: 2\n"));
    let ep = runs.job("ep", "mixtral", &format!("{STEPS}{no_aux}grad_accum: 2\nexpert_parallel: 2\n"));
    // With them: the load-balancing statistics are summed over the ranks, so the loss is that
    // of the whole round's batch — one process with both micro-batches in one batch.
    let aux = "moe: {aux_loss_coef: 0.05, z_loss_coef: 0.01}\n";
    let batch = runs.job("batch", "mixtral", &format!("{STEPS}{aux}grad_accum: 1\n"));
    std::fs::write(&batch, std::fs::read_to_string(&batch).unwrap().replace("batch_size: 2", "batch_size: 4")).unwrap();
    let ep_aux = runs.job("ep-aux", "mixtral", &format!("{STEPS}{aux}grad_accum: 2\nexpert_parallel: 2\n"));

    single(&accum);
    single(&batch);
    run(mpirun(2, &[ep.to_str().unwrap()]));
    run(mpirun(2, &[ep_aux.to_str().unwrap()]));
    // Each expert's gradient is the sum of one product per source rank, so with two ranks
    // expert parallelism is bit-identical to accumulating the two micro-batches.
    assert_eq!(losses(&runs.out("accum")), losses(&runs.out("ep")));
    assert!(tensors(&runs.out("accum").join("model")) == tensors(&runs.out("ep").join("model")), "the models differ");
    let step20 = "checkpoints/step-00000020";
    assert!(moments(&runs.out("accum").join(step20)) == moments(&runs.out("ep").join(step20)), "the AdamW moments differ");
    // Each rank wrote its own experts: rank 1 the second weight file, experts 2 and 3 of each
    // layer and nothing else, and their moments; rank 0 the rest, the index and the manifest.
    let ckpt = runs.out("ep").join(step20);
    let second: Vec<String> = tensors_in(&ckpt.join("model-00002-of-00002.safetensors")).into_iter().map(|(n, _)| n).collect();
    assert!(!second.is_empty() && second.iter().all(|n| n.contains(".experts.2.") || n.contains(".experts.3.")), "{second:?}");
    let first: Vec<String> = tensors_in(&ckpt.join("model-00001-of-00002.safetensors")).into_iter().map(|(n, _)| n).collect();
    assert!(first.iter().all(|n| !n.contains(".experts.2.") && !n.contains(".experts.3.")), "{first:?}");
    assert!(ckpt.join("optimizer-00002-of-00002.safetensors").exists() && ckpt.join("model.safetensors.index.json").exists());
    let manifest = String::from_utf8(read(&ckpt.join("MANIFEST.json"))).unwrap();
    assert!(manifest.contains("model-00002-of-00002.safetensors") && manifest.contains("optimizer-00002-of-00002.safetensors"));
    // One batch of four sequences and two micro-batches of two on two ranks differ in their
    // products' shapes, so only rounding agrees: within 1e-5.
    for (one, two) in [("accum", "ep"), ("batch", "ep-aux")] {
        let (a, b) = (losses(&runs.out(one)), losses(&runs.out(two)));
        assert_eq!(a.len(), 20);
        for (step, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * x.abs(), "{two}, step {}: loss {y} vs {x}", step + 1);
        }
        let rel = max_relative_difference(&runs.out(two).join("model"), &runs.out(one).join("model"));
        assert!(rel <= 1e-5, "{two}: weights differ from one process by {rel:e} (relative)");
        // The trained weights moved: the comparison is not of two untouched copies.
        assert!(max_relative_difference(&runs.out(one).join("model"), &fixtures().join("mixtral")) > 1e-3);
    }
    // A checkpoint written by two ranks holds every expert and resumes on one rank.
    let resumed = runs.job("resumed", "mixtral", &format!("steps: 25\nseed: 3\n{no_aux}grad_accum: 2\n"));
    let ckpt = runs.out("ep").join("checkpoints/step-00000020");
    std::fs::write(&resumed, std::fs::read_to_string(&resumed).unwrap() + &format!("resume: {}\n", ckpt.display())).unwrap();
    let out = single(&resumed);
    assert!(out.contains("finished 25"), "{out}");
}

/// Wait for `want` on the child's stdout.
fn wait_for(child: &mut Child, want: &str) {
    use std::io::{BufRead, BufReader};
    for line in BufReader::new(child.stdout.as_mut().unwrap()).lines() {
        if line.unwrap() == want {
            return;
        }
    }
    panic!("the run ended without printing `{want}`");
}

#[test]
fn a_killed_rank_fails_the_run_which_resumes_to_the_same_weights() {
    let runs = Runs::new();
    let extra = "steps: 12\nseed: 5\ngrad_accum: 2\nexpert_parallel: 2\ncheckpoint: {interval: 4, keep: 3}\n";
    let whole = runs.job("whole", "mixtral", extra);
    let killed = runs.job("killed", "mixtral", extra);
    run(mpirun(2, &[whole.to_str().unwrap()]));

    let mut launcher = mpirun(2, &[killed.to_str().unwrap(), "--hang-after-checkpoint", "4"]).stdout(Stdio::piped()).spawn().unwrap();
    wait_for(&mut launcher, "checkpoint 4");
    // SIGKILL one rank (a child of the launcher); the launcher must end the other and fail.
    let ranks = Command::new("pgrep").args(["-P", &launcher.id().to_string(), "-f", "btm-train-worker"]).output().unwrap();
    let pid = String::from_utf8_lossy(&ranks.stdout).lines().next().expect("a rank process").trim().to_string();
    assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    let status = launcher.wait().unwrap();
    assert!(!status.success(), "the launcher reports the failure");

    let out = run(mpirun(2, &[killed.to_str().unwrap()]));
    assert!(out.contains("finished 12") && !out.contains("checkpoint 4"), "resumed after step 4: {out}");
    for file in ["model/model-00001-of-00002.safetensors", "model/model-00002-of-00002.safetensors"] {
        assert!(read(&runs.out("whole").join(file)) == read(&runs.out("killed").join(file)), "{file} differs");
    }
    let step12 = "checkpoints/step-00000012";
    assert!(moments(&runs.out("whole").join(step12)) == moments(&runs.out("killed").join(step12)), "the AdamW moments differ");
}

#[test]
fn a_job_launched_with_the_wrong_number_of_ranks_says_so() {
    let runs = Runs::new();
    let job = runs.job("wrong", "llama", "steps: 2\ngrad_accum: 2\ndata_parallel: 2\n");
    let out = Command::new(WORKER).arg(&job).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 ranks") && err.contains("mpirun -np 2"), "{err}");
    let odd = runs.job("odd", "llama", "steps: 2\ngrad_accum: 3\ndata_parallel: 2\n");
    let out = Command::new(WORKER).arg(&odd).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("grad_accum: 3 is not a multiple of the 2 ranks"), "{:?}", out);
}
