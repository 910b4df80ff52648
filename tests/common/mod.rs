//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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
    format!("  - {{name: {name}, train: {}, valid: {}, test: {}}}\n", sample(name, "train"), sample(name, "valid"), sample(name, "test"))
}

/// Two experts (scripture, code) branched from the llama fixture, merged top-1 with a centroid
/// router and evaluated; `train` is the expert phase's block (inside the braces), `tail` more
/// YAML before `eval` (a `continue:` line, say). Written to `dir/NAME.yaml`; `train` is on line 8.
pub fn fixture_pipeline(dir: &Path, name: &str, storage: &str, engine: &str, train: &str, tail: &str) -> PathBuf {
    let yaml = format!(
        "name: {name}\nstorage: {storage}\nengine: {engine}\nseed: {{checkpoint: {}}}\ndomains:\n{}{}\
         experts: {{{train}}}\n\
         merge: {{top_k: 1, router_init: centroid, calib_tokens: 512}}\n{tail}\
         eval: {{split: test, seq_len: 32, max_docs: 1}}\n",
        repo().join("model/tests/fixtures/llama").display(),
        domain("scripture"),
        domain("code"),
    );
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    file
}

/// A tiny pipeline with every stage (tokenizer, seed, experts, merge, upcycle, continue,
/// baseline, eval) on the scripture and code samples, its run in `storage`, and `extra` YAML
/// appended (e.g. `add_experts`); written to `dir/mini.yaml`.
pub fn every_stage_pipeline(dir: &Path, storage: &str, extra: &str) -> PathBuf {
    let yaml = format!(
        "name: mini\nstorage: {storage}\nengine: {{kind: local, slots: 2, threads_per_job: 1}}\n\
         seed:\n  model: {{hidden_size: 32, layers: 1, heads: 2, ffn: 64, max_positions: 64}}\n  \
         tokenizer: {{vocab_size: 300, max_docs_per_domain: 20}}\n  train: {{steps: 6, batch_size: 4, seq_len: 32}}\n\
         domains:\n{}{}\
         experts: {{steps: 6, batch_size: 4, seq_len: 32, checkpoint_interval: 3}}\n\
         merge: {{top_k: 1, router_init: centroid, calib_tokens: 512}}\n\
         upcycle: {{experts: 2, top_k: 1}}\n\
         continue: {{steps: 3}}\n\
         eval: {{split: test, seq_len: 32, max_docs: 2, baseline: true}}\n{extra}",
        domain("scripture"),
        domain("code"),
    );
    let file = dir.join("mini.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

/// A seed of about 1.8 M parameters (7 MB of weights, 15 MB of optimizer state) and one
/// expert, the run in `storage`, checkpoints every 2 steps: with 5 MiB parts (S3's smallest)
/// every checkpoint is a multipart upload. Written to `dir/NAME.yaml`.
pub fn multipart_pipeline(dir: &Path, name: &str, storage: &str) -> PathBuf {
    let yaml = format!(
        "name: {name}\nstorage: {storage}\nengine: {{kind: local, slots: 1, threads_per_job: 1, retries: 0}}\n\
         seed:\n  model: {{hidden_size: 256, layers: 2, heads: 4, ffn: 688, max_positions: 64}}\n  \
         tokenizer: {{vocab_size: 512, max_docs_per_domain: 20}}\n  train: {{steps: 2, batch_size: 2, seq_len: 32}}\n\
         domains:\n{}\
         experts: {{steps: 4, batch_size: 2, seq_len: 32, checkpoint_interval: 2}}\n\
         eval: {{split: test, seq_len: 32, max_docs: 1}}\n",
        domain("scripture"),
    );
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    file
}

/// Whether a trainer's output folder holds a published checkpoint.
pub fn has_checkpoint(expert: &Path) -> bool {
    // Published checkpoints only, as the trainer lists them: a hidden `.step-*.partial-*`
    // staging directory already holds the weights' manifest while the optimizer state is still
    // being written, and a kill in that window leaves nothing to resume from.
    btm_trainer::checkpoint::list(&expert.join("checkpoints"))
        .map(|steps| steps.iter().any(|(_, dir)| dir.join("MANIFEST.json").exists()))
        .unwrap_or(false)
}

/// The bucket the S3 tests use.
pub const BUCKET: &str = "btm-test";

/// A real S3-compatible server (`tests/s3-server`: s3s over s3s-fs) on a free loopback port,
/// storing into a temporary root; killed when dropped.
pub struct S3Server {
    child: Option<std::process::Child>,
    pub port: u16,
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// Built by `cargo test --workspace` (its crate has a test of its own).
    fn binary() -> PathBuf {
        Path::new(env!("CARGO_BIN_EXE_btm")).with_file_name("btm-s3-server")
    }

    /// A running server with an empty bucket, or `None` (saying why) when the server binary
    /// is not built — unless `BTM_REQUIRE_S3=1` (CI), which makes that a failure.
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// [`S3Server::start`] with more server arguments (a fault to inject).
    pub fn start_with(extra: &[&str]) -> Option<Self> {
        if !Self::binary().exists() {
            assert!(
                std::env::var("BTM_REQUIRE_S3").as_deref() != Ok("1"),
                "BTM_REQUIRE_S3=1 but {} is not built (cargo build -p btm-s3-server)",
                Self::binary().display()
            );
            eprintln!("skipping: {} is not built (cargo build -p btm-s3-server)", Self::binary().display());
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s3");
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let mut s = S3Server { child: None, port: 0, root, _dir: dir };
        s.spawn(extra);
        Some(s)
    }

    /// Start the server process (on the same port as before, once it has one).
    pub fn spawn(&mut self, extra: &[&str]) {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(Self::binary());
        cmd.arg("--root")
            .arg(&self.root)
            .args(["--port", &self.port.to_string(), "--access-key", "btm-test-key", "--secret-key", "btm-test-secret"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        // SAFETY: prctl in the child before exec; the server dies with the test process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("starting btm-s3-server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        self.port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("btm-s3-server said `{line}`"));
        self.child = Some(child);
    }

    /// Stop the server and start it again on the same root and port, with `extra` arguments
    /// (other faults, or none).
    pub fn restart(&mut self, extra: &[&str]) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn(extra);
    }

    /// The server's exit status once it has exited by itself (a fault it was told to inject).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut().expect("a running server").try_wait().unwrap();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Set the environment btm reads for an S3-compatible endpoint.
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port))
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "btm-test-key")
            .env("AWS_SECRET_ACCESS_KEY", "btm-test-secret")
    }

    /// The objects under `prefix` in the bucket (s3s-fs keeps each as a file), sorted.
    pub fn objects(&self, prefix: &str) -> Vec<String> {
        let base = self.root.join(BUCKET);
        let mut out = vec![];
        let mut stack = vec![base.join(prefix)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if !e.file_name().to_string_lossy().starts_with('.') {
                    out.push(p.strip_prefix(&base).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }

    /// The local directory holding the objects under `prefix` (to verify manifests in place).
    pub fn dir(&self, prefix: &str) -> PathBuf {
        self.root.join(BUCKET).join(prefix)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A Python that imports torch, transformers and tensorboard (the references the tests compare
/// against), or `None` (a failure under BTM_REQUIRE_TORCH=1).
pub fn torch_python() -> Option<PathBuf> {
    let candidates = std::env::var_os("BTM_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/opt/pyref/bin/python"), PathBuf::from("python3")]);
    for py in candidates {
        let works = Command::new(&py)
            .args(["-c", "import torch, transformers, tensorboard"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if works {
            return Some(py);
        }
    }
    assert!(
        std::env::var("BTM_REQUIRE_TORCH").as_deref() != Ok("1"),
        "BTM_REQUIRE_TORCH=1 but no Python with torch, transformers and tensorboard was found (set BTM_PYTHON)"
    );
    eprintln!("skipped: no Python with torch, transformers and tensorboard (set BTM_PYTHON, or BTM_REQUIRE_TORCH=1 to fail)");
    None
}

/// PATH with the Python's folder first, so `torchrun` is the one next to it.
pub fn path_with(python: &Path) -> String {
    let bin = std::fs::canonicalize(python).ok().and_then(|p| p.parent().map(Path::to_path_buf));
    let bin = python.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf).or(bin).unwrap_or_default();
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
}

/// The reference trainer's block, every placeholder it takes.
pub fn torchrun_trainer() -> String {
    let args = [
        "--model-in",
        "{model_in}",
        "--model-out",
        "{model_out}",
        "--work-dir",
        "{work_dir}",
        "--train",
        "{train_files}",
        "--weights",
        "{train_weights}",
        "--valid",
        "{valid_files}",
        "--steps",
        "{steps}",
        "--batch-size",
        "{batch_size}",
        "--grad-accum",
        "{grad_accum}",
        "--seq-len",
        "{seq_len}",
        "--lr",
        "{lr}",
        "--min-lr",
        "{min_lr}",
        "--warmup-steps",
        "{warmup_steps}",
        "--decay",
        "{decay}",
        "--weight-decay",
        "{weight_decay}",
        "--beta1",
        "{beta1}",
        "--beta2",
        "{beta2}",
        "--grad-clip",
        "{grad_clip}",
        "--seed",
        "{seed}",
        "--checkpoint-interval",
        "2",
        "--log-interval",
        "2",
    ];
    let args: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    format!("{{kind: torchrun, script: {}, nproc_per_node: 2, args: [{}]}}", repo().join("scripts/train_hf.py").display(), args.join(", "))
}

/// The llama fixture trained a few steps on `domain`'s sample (the job in `dir/<domain>`); its model.
pub fn trained_expert(dir: &Path, domain: &str) -> PathBuf {
    let out = dir.join(domain);
    let job = format!(
        "init: {{checkpoint: {}}}\nout: {}\ndata: {{train: [{{path: {}}}]}}\nsteps: 12\nbatch_size: 4\nseq_len: 32\noptimizer: {{lr: 0.01}}\nthreads: 1\ndomain: {domain}\n",
        repo().join("model/tests/fixtures/llama").display(),
        out.display(),
        sample(domain, "train"),
    );
    let file = dir.join(format!("{domain}.yaml"));
    std::fs::write(&file, job).unwrap();
    ok(btm().args(["train", "--quiet", "--job"]).arg(&file).output().unwrap());
    out.join("model")
}

/// Poll `f` every `poll` until it holds; fail the test, naming `what`, after `deadline`.
pub fn wait_for(what: &str, deadline: std::time::Duration, poll: std::time::Duration, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(poll);
    }
}
