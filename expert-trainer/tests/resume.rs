//! Exact resume: a run killed with SIGKILL after a checkpoint and resumed ends with
//! bit-identical weights and optimizer state to a run that was never interrupted; corrupt
//! checkpoints are skipped on resume and refused when named; SIGTERM checkpoints and exits.

mod common;

use btm_trainer::checkpoint;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

fn worker(job: &Path, hang_after: Option<u64>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_btm-train-worker"));
    cmd.arg(job).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(k) = hang_after {
        cmd.args(["--hang-after-checkpoint", &k.to_string()]);
    }
    cmd.spawn().unwrap()
}

/// Read the child's stdout until a line equal to `want`.
fn wait_for_line(child: &mut Child, want: &str) -> Vec<String> {
    let stdout = child.stdout.as_mut().unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let done = line == want;
        seen.push(line);
        if done {
            return seen;
        }
    }
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    panic!("worker ended without printing `{want}`: stdout {seen:?}, stderr {err}");
}

fn run_to_end(job: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_btm-train-worker")).arg(job).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "worker failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn exact_resume(model: &str, trainable: &str) -> tempfile::TempDir {
    let (dir, train, valid) = data_dir();
    let cache = dir.path().join("cache");
    let extra = format!("steps: 12\ngrad_accum: 2\ncheckpoint: {{interval: 4, keep: 3}}\nseed: 7\n{trainable}");
    let job = |name: &str| {
        let path = dir.path().join(format!("{name}.yaml"));
        let yaml = job_yaml(model, &train, &valid, &dir.path().join(name), &cache, &extra);
        std::fs::write(&path, yaml).unwrap();
        path
    };
    let (job_a, job_b) = (job("a"), job("b"));

    // A: uninterrupted.
    let out_a = run_to_end(&job_a);
    assert!(out_a.contains("finished 12"), "{out_a}");

    // B: killed after the step-4 checkpoint, then resumed.
    let mut child = worker(&job_b, Some(4));
    wait_for_line(&mut child, "checkpoint 4");
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    let ckpts = dir.path().join("b/checkpoints");
    assert_eq!(checkpoint::list(&ckpts).unwrap().len(), 1, "killed right after step 4");
    // Debris a crash can leave: a half-written newer checkpoint with no manifest.
    std::fs::create_dir_all(ckpts.join("step-00000008")).unwrap();
    std::fs::write(ckpts.join("step-00000008/model.safetensors"), b"partial").unwrap();

    let out_b = run_to_end(&job_b);
    assert!(out_b.contains("checkpoint 8") && out_b.contains("finished 12"), "{out_b}");
    assert!(!out_b.contains("checkpoint 4"), "resumed after step 4, not from scratch: {out_b}");

    for file in ["model/model.safetensors", "checkpoints/step-00000012/optimizer.safetensors"] {
        let (a, b) = (read(&dir.path().join("a").join(file)), read(&dir.path().join("b").join(file)));
        assert!(a == b, "{file} differs between the uninterrupted and the resumed run");
    }
    let state = |run: &str| std::fs::read_to_string(dir.path().join(run).join("checkpoints/step-00000012/trainer_state.json")).unwrap();
    assert_eq!(state("a"), state("b"));
    // The weights moved away from the initial checkpoint.
    let init = read(&fixtures().join(model).join("model.safetensors"));
    assert_ne!(init, read(&dir.path().join("a/model/model.safetensors")));
    // The metrics read as one run: one training line per step.
    let metrics = std::fs::read_to_string(dir.path().join("b/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    if model == "mixtral" {
        // MoE lines carry the router losses and every layer's expert load.
        let line: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
        let line = if line.get("loss").is_some() { line } else { serde_json::from_str(metrics.lines().rev().nth(1).unwrap()).unwrap() };
        assert!(line["aux_loss"].as_f64().unwrap() > 0.0 && line["z_loss"].as_f64().unwrap() > 0.0, "{line}");
        let load = line["expert_load"].as_array().unwrap();
        assert_eq!(load.len(), 2, "one entry per MoE layer: {line}");
        for layer in load {
            let shares: Vec<f64> = layer.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            assert_eq!(shares.len(), 4);
            assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{shares:?}");
        }
    }
    // keep: 3
    let kept: Vec<u64> = checkpoint::list(&ckpts).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(kept, vec![12, 8, 4]);
    dir
}

#[test]
fn sigkill_and_resume_is_bit_identical_dense() {
    exact_resume("llama", "");
}

#[test]
fn sigkill_and_resume_is_bit_identical_moe() {
    exact_resume("mixtral", "");
}

/// An added expert trained in place (its FFN and its router row, the rest of the MoE frozen)
/// resumes exactly too, and only those weights move: every other tensor and router row of the
/// result is the initial checkpoint's, bit for bit.
#[test]
fn sigkill_and_resume_is_bit_identical_training_one_expert_in_place() {
    let trainable = "trainable: {include: [\"*.mlp.experts.3.*\", \"*.mlp.gate.weight[3]\"]}\n";
    let dir = exact_resume("mixtral", trainable);
    let (init, out) = (
        btm_model::Checkpoint::open(fixtures().join("mixtral")).unwrap(),
        btm_model::Checkpoint::open(dir.path().join("a/model")).unwrap(),
    );
    let rows = |ck: &btm_model::Checkpoint, name: &str| {
        let t = ck.tensor(name).unwrap().to_dtype(candle_core::DType::F32).unwrap();
        let t = if t.rank() == 1 { t.unsqueeze(0).unwrap() } else { t };
        t.to_vec2::<f32>().unwrap()
    };
    let mut moved = 0;
    for spec in init.tensor_specs() {
        let (a, b) = (rows(&init, &spec.name), rows(&out, &spec.name));
        for (row, (x, y)) in a.iter().zip(&b).enumerate() {
            let trains = spec.name.contains(".experts.3.") || (spec.name.ends_with("mlp.gate.weight") && row == 3);
            let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert_eq!(!same, trains, "{} row {row}", spec.name);
            moved += usize::from(trains);
        }
    }
    assert!(moved > 0);
}

#[test]
fn corrupt_checkpoints_are_skipped_or_refused() {
    let (dir, train, valid) = data_dir();
    let cache = dir.path().join("cache");
    let out = dir.path().join("run");
    let yaml = job_yaml("llama", &train, &valid, &out, &cache, "steps: 6\ncheckpoint: {interval: 2, keep: 10}\n");
    let job = dir.path().join("job.yaml");
    std::fs::write(&job, &yaml).unwrap();
    run_to_end(&job);
    let root = out.join("checkpoints");
    let step = |s: u64| root.join(checkpoint::step_dir_name(s));

    // Step 6: truncated weights. Step 4: a flipped byte (same size, bad hash).
    let w6 = step(6).join("model.safetensors");
    let bytes = read(&w6);
    std::fs::write(&w6, &bytes[..bytes.len() / 2]).unwrap();
    let o4 = step(4).join("optimizer.safetensors");
    let mut bytes = read(&o4);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&o4, &bytes).unwrap();
    let mut warnings = Vec::new();
    let (found, state) = checkpoint::newest_valid(&root, &mut |w| warnings.push(w)).unwrap().unwrap();
    assert_eq!(found, step(2));
    assert_eq!(state.step, 2);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("step-00000006") && warnings[0].contains("bytes, the manifest says"), "{warnings:?}");
    assert!(warnings[1].contains("step-00000004") && warnings[1].contains("SHA-256 differs"), "{warnings:?}");

    // Step 2 without its manifest: nothing valid is left.
    std::fs::remove_file(step(2).join("MANIFEST.json")).unwrap();
    let mut warnings = Vec::new();
    assert!(checkpoint::newest_valid(&root, &mut |w| warnings.push(w)).unwrap().is_none());
    assert!(warnings[2].contains("no MANIFEST.json"), "{warnings:?}");

    // Named explicitly, a bad checkpoint is an error that says why.
    for (s, why) in [(6, "bytes, the manifest says"), (4, "SHA-256 differs"), (2, "no MANIFEST.json")] {
        let named = format!("{yaml}resume: {}\n", step(s).display());
        let spec = btm_trainer::JobSpec::parse(&named, dir.path()).unwrap();
        let options = btm_trainer::Options { quiet: true, ..Default::default() };
        let err = format!("{:#}", btm_trainer::run(&spec, options).unwrap_err());
        assert!(err.contains("is not a valid checkpoint") && err.contains(why), "{err}");
    }
}

#[test]
fn sigterm_writes_a_checkpoint_and_exits() {
    let (dir, train, valid) = data_dir();
    let cache = dir.path().join("cache");
    let out = dir.path().join("run");
    let yaml = job_yaml("llama", &train, &valid, &out, &cache, "steps: 100000\ncheckpoint: {interval: 3}\n");
    let job = dir.path().join("job.yaml");
    std::fs::write(&job, yaml).unwrap();
    let mut child = worker(&job, None);
    wait_for_line(&mut child, "checkpoint 3");
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(128 + libc::SIGTERM), "{stdout}");
    let step: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("interrupted "))
        .unwrap_or_else(|| panic!("no `interrupted` line: {stdout}"))
        .parse()
        .unwrap();
    assert!((3..100000).contains(&step), "{step}");
    let state = checkpoint::verify(&out.join("checkpoints").join(checkpoint::step_dir_name(step))).unwrap();
    assert_eq!(state.step, step);
    assert_eq!(state.data.samples, step * 2);
}
