//! End-to-end pipeline runs through the `btm` binary: every stage on a miniature model,
//! idempotent re-runs, resume after SIGKILL (of the orchestrator, and of one trainer), and the
//! exact messages of pipeline validation errors.

mod common;

use common::{btm, domain, every_stage_pipeline, fixture_pipeline, has_checkpoint, ok, repo, sample};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Every stage: tokenizer, seed, experts, merge, upcycle, continue, baseline, add-expert, eval.
fn miniature(dir: &Path) -> PathBuf {
    let add = format!("add_experts:\n  domains:\n{}  train_in_place: {{steps: 3}}\n", domain("computing").replace("  - ", "    - "));
    every_stage_pipeline(dir, &dir.join("runs").to_string_lossy(), &add)
}

#[test]
fn every_stage_runs_and_a_second_run_does_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let file = miniature(tmp.path());
    let dry = ok(btm().arg("run").arg(&file).arg("--dry-run").output().unwrap());
    for job in [
        "tokenizer",
        "seed",
        "expert/scripture",
        "merge",
        "upcycle",
        "continue/merged",
        "continue/upcycled",
        "baseline",
        "added/computing",
        "add-expert/computing",
        "train-in-place/computing",
        "eval/merged",
    ] {
        assert!(dry.contains(&format!("\n{job} [")) || dry.contains(&format!("{job} [")), "{job} missing from the plan:\n{dry}");
    }
    let out = ok(btm().arg("run").arg(&file).arg("--quiet").output().unwrap());
    for model in [
        "seed",
        "expert-scripture",
        "expert-code",
        "merged",
        "continued",
        "upcycled",
        "upcycled-continued",
        "baseline",
        "extended-computing",
        "in-place-computing",
    ] {
        assert!(out.contains(&format!("| {model} |")), "{model} missing from the table:\n{out}");
    }
    let run = tmp.path().join("runs/mini");
    for f in ["report.md", "report.html", "plots/loss.svg", "plots/routing-merged.svg", "pipeline.yaml", "plan.json"] {
        assert!(run.join(f).exists(), "{f}");
    }
    // The HTML report has every section of the Markdown one (the Arms table included).
    let (md, html) = (std::fs::read_to_string(run.join("report.md")).unwrap(), std::fs::read_to_string(run.join("report.html")).unwrap());
    let sections: Vec<&str> = md.lines().filter_map(|l| l.strip_prefix("## ")).collect();
    assert!(sections.contains(&"Arms"), "{md}");
    for h in sections {
        assert!(html.contains(&format!("<h2>{h}</h2>")), "section `{h}` missing from report.html");
    }
    // Trained in place, only the new expert and its router row moved: taking the expert out
    // again gives back the merged MoE, every tensor bit for bit.
    let removed = tmp.path().join("removed");
    let in_place = run.join("in-place/computing/model");
    ok(btm().args(["remove-expert", "--moe"]).arg(&in_place).args(["--expert", "2", "--out"]).arg(&removed).output().unwrap());
    let tensors = |dir: &Path| {
        let ck = btm_model::Checkpoint::open(dir).unwrap();
        let f32s =
            |n: &str| ck.tensor(n).unwrap().to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        ck.tensor_specs().into_iter().map(|s| (s.name.clone(), f32s(&s.name))).collect::<Vec<_>>()
    };
    let (before, after) = (tensors(&run.join("merged")), tensors(&removed));
    assert_eq!(before.len(), after.len());
    for ((n, a), (m, b)) in before.iter().zip(&after) {
        assert_eq!(n, m);
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{n} changed");
    }
    tensorboard_reads_the_training_curves(&run);
    the_model_card_carries_the_validation_perplexities(&run);
    let again = ok(btm().arg("run").arg(&file).output().unwrap());
    assert!(again.contains("nothing to do: all"), "{again}");

    // A changed hyperparameter redoes that job and what depends on it, nothing else.
    let changed = ok(btm().arg("run").arg(&file).args(["--set", "continue.steps=4"]).output().unwrap());
    assert!(changed.contains("start continue/merged"), "{changed}");
    assert!(!changed.contains("start expert/"), "{changed}");
    assert!(!changed.contains("start merge"), "{changed}");

    let status = ok(btm().arg("status").arg(&run).output().unwrap());
    assert!(status.contains("expert/code") && status.contains("done") && status.contains("step 6/6"), "{status}");
    // The pipeline file names its run folder, as `btm run` places it.
    assert_eq!(ok(btm().arg("status").arg(&file).output().unwrap()), status);
}

/// TensorBoard's own reader finds every training job's curves in `<job>/tb/`: the step records
/// (loss, learning rate, grad norm, throughput), validation perplexity and, for an MoE, each
/// layer's expert load and dropped share, at the steps and values of `metrics.jsonl`.
fn tensorboard_reads_the_training_curves(run: &Path) {
    let Some(python) = common::torch_python() else { return };
    let script = "import json, sys\n\
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
        out = {}\n\
        for d in sys.argv[1:]:\n\
        \x20   ea = EventAccumulator(d, size_guidance={'scalars': 0})\n\
        \x20   ea.Reload()\n\
        \x20   out[d] = {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()['scalars']}\n\
        print(json.dumps(out))\n";
    let jobs = [run.join("experts/scripture"), run.join("continued")];
    let read = ok(std::process::Command::new(python).args(["-c", script]).args(jobs.iter().map(|j| j.join("tb"))).output().unwrap());
    let curves: serde_json::Value = serde_json::from_str(&read).unwrap();
    for (job, moe) in jobs.iter().zip([false, true]) {
        let tags = &curves[job.join("tb").to_string_lossy().as_ref()];
        let mut want = vec!["loss", "lr", "grad_norm", "tokens_per_s", "val_ppl"];
        if moe {
            // Trained on the mix: validated on each domain's file too.
            want.extend(["expert_load/layer0/expert0", "dropped/layer0", "aux_loss", "val_ppl_by_data/code/valid.jsonl"]);
        }
        for t in want {
            assert!(tags.get(t).is_some_and(|c| !c.as_array().unwrap().is_empty()), "{}: no `{t}` curve in {tags}", job.display());
        }
        // The last loss TensorBoard shows is metrics.jsonl's, at its step (float32).
        let metrics = std::fs::read_to_string(job.join("metrics.jsonl")).unwrap();
        let last: serde_json::Value =
            metrics.lines().rev().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|r| r.get("loss").is_some()).unwrap();
        let curve = tags["loss"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(curve[0], last["step"], "{}", job.display());
        assert_eq!(curve[1].as_f64().unwrap() as f32, last["loss"].as_f64().unwrap() as f32, "{}", job.display());
    }
}

/// huggingface_hub reads a trained model's card: the validation perplexity of each domain the
/// job validated on, as structured results (`model-index`), equal to `btm.json`'s.
fn the_model_card_carries_the_validation_perplexities(run: &Path) {
    let Some(python) = common::torch_python() else { return };
    let model = run.join("continued/model");
    let script = "import json, sys\n\
        from huggingface_hub import ModelCard\n\
        card = ModelCard.load(sys.argv[1])\n\
        print(json.dumps([[r.dataset_name, r.metric_type, r.metric_value] for r in card.data.eval_results]))\n";
    let read = ok(std::process::Command::new(python).args(["-c", script]).arg(model.join("README.md")).output().unwrap());
    let results: Vec<(String, String, f64)> = serde_json::from_str(&read).unwrap();
    let lineage: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("btm.json")).unwrap()).unwrap();
    let recorded: Vec<(String, String, f64)> = lineage["validation"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["name"].as_str().unwrap().to_string(), "perplexity".to_string(), d["perplexity"].as_f64().unwrap()))
        .collect();
    assert_eq!(results.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["scripture/valid.jsonl", "code/valid.jsonl"]);
    assert_eq!(results, recorded);
}

/// Experts from an existing seed, merged, continued: small enough to run four times, long
/// enough (200 steps, about 2 s on a Zen 4) that a kill after the first checkpoint (step 10)
/// lands while the experts still train; at 40 steps they could finish between two polls.
fn resumable(dir: &Path, name: &str) -> PathBuf {
    let engine = "{kind: local, slots: 2, threads_per_job: 1, retries: 2}";
    let train = "steps: 200, batch_size: 4, seq_len: 32, checkpoint_interval: 10";
    fixture_pipeline(dir, name, &dir.join("runs").display().to_string(), engine, train, "continue: {steps: 4, checkpoint_interval: 2}\n")
}

fn weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("continued/model/model.safetensors")).unwrap()
}

/// [`common::wait_for`], polling every 50 ms.
fn wait_for(what: &str, deadline: Duration, f: impl FnMut() -> bool) {
    common::wait_for(what, deadline, Duration::from_millis(50), f)
}

/// Pids of processes whose command line contains `needle`.
fn pids_with(needle: &str) -> Vec<i32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

#[test]
fn resume_after_sigkill_gives_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();

    // Uninterrupted reference.
    let reference = resumable(tmp.path(), "reference");
    ok(btm().arg("run").arg(&reference).arg("--quiet").output().unwrap());
    let want = weights(&tmp.path().join("runs/reference"));

    // Kill the orchestrator with SIGKILL once both trainers have checkpointed.
    let file = resumable(tmp.path(), "killed");
    let run = tmp.path().join("runs/killed");
    let mut child = btm().arg("run").arg(&file).arg("--quiet").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for("expert checkpoints", Duration::from_secs(120), || {
        has_checkpoint(&run.join("experts/scripture")) && has_checkpoint(&run.join("experts/code"))
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!run.join("jobs/expert-scripture/done.json").exists(), "the kill came too late to test resume");
    // The trainers die with the orchestrator.
    wait_for("orphans to exit", Duration::from_secs(10), || pids_with(&run.join("jobs").to_string_lossy()).is_empty());
    let out = ok(btm().arg("run").arg(&file).output().unwrap());
    assert!(out.contains("resuming from") || run.join("experts/scripture/metrics.jsonl").exists());
    assert_eq!(weights(&run), want, "resumed run differs from the uninterrupted one");
    // Resumed, not restarted: the trainer's log says where it picked up.
    let log = std::fs::read_to_string(run.join("logs/expert-scripture.log")).unwrap();
    assert!(log.contains("resuming from"), "{log}");

    // Ctrl-C: the orchestrator asks its trainers to checkpoint and exit, then stops.
    let file = resumable(tmp.path(), "interrupted");
    let run = tmp.path().join("runs/interrupted");
    let child = btm().arg("run").arg(&file).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("expert checkpoints", Duration::from_secs(120), || has_checkpoint(&run.join("experts/code")));
    // SAFETY: interrupting a process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interrupted; run `btm run` again to continue where it stopped"), "{err}");
    let out = ok(btm().arg("run").arg(&file).output().unwrap());
    assert!(!out.contains("nothing to do"), "{out}");
    assert_eq!(weights(&run), want, "run resumed after Ctrl-C differs from the uninterrupted one");

    // Kill one trainer; the orchestrator retries it and it resumes.
    let file = resumable(tmp.path(), "trainer-killed");
    let run = tmp.path().join("runs/trainer-killed");
    let child = btm().arg("run").arg(&file).arg("--quiet").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let job = run.join("jobs/expert-code/job.yaml").to_string_lossy().into_owned();
    wait_for("a code checkpoint", Duration::from_secs(120), || has_checkpoint(&run.join("experts/code")));
    for pid in pids_with(&job) {
        // SAFETY: killing a process this test's run started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    ok(child.wait_with_output().unwrap());
    assert_eq!(weights(&run), want, "run with a killed trainer differs from the uninterrupted one");
    let log = std::fs::read_to_string(run.join("logs/expert-code.log")).unwrap();
    assert!(log.contains("resuming from"), "{log}");
    // A finished expert is never retrained.
    let log = std::fs::read_to_string(run.join("logs/expert-scripture.log")).unwrap();
    assert!(!log.contains("resuming from"), "{log}");
}

fn validate(dir: &Path, yaml: &str, sets: &[&str]) -> String {
    let file = dir.join("p.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut cmd = btm();
    cmd.current_dir(dir).arg("validate").arg("p.yaml");
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "validation passed:\n{yaml}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn validation_errors_name_file_line_column_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir(d.join("data")).unwrap();
    std::fs::write(d.join("data/a.jsonl"), "{\"text\": \"hello\"}\n").unwrap();
    std::fs::write(d.join("data/empty.jsonl"), "").unwrap();
    let seed = repo().join("model/tests/fixtures/llama").display().to_string();
    let head = format!("name: t\nseed: {{checkpoint: {seed}}}\n");
    let one = "domains:\n  - {name: a, train: data/a.jsonl, test: data/a.jsonl}\n";

    // Unknown key, with a suggestion.
    let e = validate(d, &format!("{head}{one}experts:\n  stesp: 10\n"), &[]);
    assert_eq!(e, "error: p.yaml:6:3: experts.stesp: unknown key `stesp`; did you mean `steps`?\n");
    // Unknown key, no close match.
    let e = validate(d, &format!("{head}{one}colour: red\n"), &[]);
    assert!(
        e.starts_with("error: p.yaml:5:1: colour: unknown key `colour` (expected one of: name, storage, engine, seed, domains, "),
        "{e}"
    );
    // Wrong type.
    let e = validate(d, &format!("{head}{one}experts: {{steps: ten}}\n"), &[]);
    assert_eq!(e, "error: p.yaml:5:18: experts.steps: invalid type: string \"ten\", expected u64\n");
    // Duplicate names, names unusable as path segments, missing and empty data.
    let e = validate(
        d,
        &format!(
            "{head}domains:\n  - {{name: a, train: data/a.jsonl, test: data/a.jsonl}}\n  - {{name: a, train: data/missing.jsonl, test: data/a.jsonl}}\n  - {{name: \"x/y\", train: data/empty.jsonl, test: data/a.jsonl}}\n"
        ),
        &[],
    );
    assert_eq!(
        e,
        "error: p.yaml:5:12: domains[1].name: duplicate domain name `a`\n\
         p.yaml:5:22: domains[1].train: data file `data/missing.jsonl` does not exist\n\
         p.yaml:6:12: domains[2].name: `x/y` cannot be used as a path segment (use letters, digits, `-`, `_`, `.`)\n\
         p.yaml:6:26: domains[2].train: data file `data/empty.jsonl` is empty\n"
    );
    // Semantic checks on values.
    let e = validate(d, &format!("{head}{one}experts: {{lr: -0.1}}\nmerge: {{top_k: 3, router_init: centroid}}\n"), &[]);
    assert_eq!(
        e,
        "error: p.yaml:5:15: experts.lr: must be a positive number, got -0.1\n\
         p.yaml:6:16: merge.top_k: must be between 1 and the number of domains (1), got 3\n\
         p.yaml:4:6: domains[0].valid: `centroid` router init takes calibration text from every domain's `valid` file\n"
    );
    // A value given with --set has no line in the file.
    let e = validate(d, &format!("{head}{one}"), &["domains.0.train=data/empty.jsonl"]);
    assert_eq!(e, "error: p.yaml: domains[0].train: data file `data/empty.jsonl` is empty (set with --set)\n");
    // Environment variables.
    let e = validate(d, &format!("name: ${{BTM_E2E_UNSET}}\nseed: {{checkpoint: {seed}}}\n{one}"), &[]);
    assert_eq!(e, "error: p.yaml:1:7: name: environment variable `BTM_E2E_UNSET` is not set\n");
    // Both or neither seed source.
    let e = validate(d, &format!("name: t\nseed: {{}}\n{one}"), &[]);
    assert_eq!(e, "error: p.yaml:2:1: seed: give `checkpoint` (an existing model) or `model` (a seed to train here)\n");
    // Multi-process phases: ranks that cannot share a step, expert parallelism of a dense phase.
    let e = validate(d, &format!("{head}{one}experts: {{grad_accum: 3, data_parallel: 2, expert_parallel: 2}}\n"), &[]);
    assert_eq!(
        e,
        "error: p.yaml:5:23: experts.grad_accum: 3 is not a multiple of the 4 ranks (data_parallel × expert_parallel): each rank takes an equal share of a step's micro-batches\n\
         p.yaml:5:61: experts.expert_parallel: this phase trains dense models; expert parallelism is for the MoE phases (`continue`, `upcycle.train`)\n"
    );
    // A multi-node torchrun on the local engine.
    let script = repo().join("scripts/train_hf.py").display().to_string();
    let e = validate(d, &format!("{head}{one}experts: {{trainer: {{kind: torchrun, script: {script}, nnodes: 2}}}}\n"), &[]);
    assert!(e.contains("experts.trainer.nnodes: 2 nodes need a cluster engine (Slurm or Kubernetes)"), "{e}");
    // Replay is a share of the in-place training data.
    let add = "add_experts:\n  domains: [{name: b, train: data/a.jsonl, test: data/a.jsonl}]\n  replay: 1.5\n";
    let e = validate(d, &format!("{head}{one}{add}"), &[]);
    assert!(e.contains(":7:11: add_experts.replay: must lie in [0, 1) (a share of the training data), got 1.5"), "{e}");
}

/// Impossible device and precision pairs are named where they are written.
#[test]
fn device_and_dtype_errors_name_file_line_column_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("a.jsonl"), "{\"text\": \"hello\"}\n").unwrap();
    let seed = repo().join("model/tests/fixtures/llama").display().to_string();
    let one = "domains:\n  - {name: a, train: a.jsonl, test: a.jsonl}\n";
    let head = format!("name: t\nseed: {{checkpoint: {seed}}}\n{one}");

    let e = validate(d, &format!("{head}experts: {{dtype: float16}}\n"), &[]);
    assert!(e.contains("p.yaml:5:18: experts.dtype: float16 training needs loss scaling"), "{e}");
    // A cluster places GPUs only where they are asked for.
    let slurm = "engine: {kind: slurm}\n";
    let e = validate(d, &format!("{head}{slurm}experts: {{device: cuda}}\n"), &[]);
    assert!(e.contains("p.yaml:6:19: experts.device: `cuda`, but this phase asks for no GPU: set experts.resources.gpus_per_task"), "{e}");
    let e =
        validate(d, &format!("{head}engine: {{kind: local, gpus: 1}}\ncontinue: {{device: cuda, data_parallel: 2, grad_accum: 2}}\n"), &[]);
    assert!(
        e.contains("continue.resources.gpus_per_task: each job of this phase needs 2 GPUs (1 per rank × 2 ranks); engine.gpus is 1"),
        "{e}"
    );
    let e = validate(d, &format!("{head}engine: {{kind: local, gpus: many}}\n"), &[]);
    assert!(e.contains("p.yaml:5:10: engine: gpus: `many`: expected a number of GPUs or `auto`"), "{e}");
    let e = validate(d, &format!("{head}experts: {{device: gpu}}\n"), &[]);
    assert!(e.contains("experts.device: unknown variant `gpu`, expected `cpu` or `cuda`"), "{e}");
}

/// The quickstart on three GPUs: the dry run places each expert on its own GPU; on a machine
/// without one, `btm run` stops before any job starts and names what is missing.
#[test]
fn the_quickstart_on_gpus_places_each_expert_on_its_own_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let quickstart = repo().join("configs/quickstart.yaml");
    let sets = ["--set", "experts.device=cuda", "--set", "experts.dtype=bfloat16", "--set", "engine.gpus=3"];
    let run_dir = tmp.path().join("run");
    let out = ok(btm().arg("run").arg(&quickstart).args(sets).arg("--run-dir").arg(&run_dir).arg("--dry-run").output().unwrap());
    let experts: Vec<String> = ["scripture", "code", "computing"]
        .iter()
        .map(|d| {
            let block = out.split(&format!("\nexpert/{d} [")).nth(1).unwrap_or_else(|| panic!("no expert/{d} in:\n{out}"));
            block.lines().find(|l| l.trim_start().starts_with("device:")).unwrap().trim().to_string()
        })
        .collect();
    assert_eq!(
        experts,
        [
            "device:  cuda bfloat16, CUDA_VISIBLE_DEVICES=0",
            "device:  cuda bfloat16, CUDA_VISIBLE_DEVICES=1",
            "device:  cuda bfloat16, CUDA_VISIBLE_DEVICES=2"
        ]
    );
    let seed = out.split("\nseed [").nth(1).unwrap();
    assert!(seed.lines().any(|l| l.trim() == "device:  cpu float32"), "{out}");

    if std::path::Path::new("/proc/driver/nvidia/version").exists() {
        eprintln!("this machine has the NVIDIA driver: the missing-GPU error is not reachable here");
        return;
    }
    let out = btm().arg("run").arg(&quickstart).args(sets).arg("--run-dir").arg(&run_dir).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("jobs train on CUDA") && stderr.contains("the NVIDIA driver: /proc/driver/nvidia/version does not exist"),
        "{stderr}"
    );
    assert!(!run_dir.exists(), "nothing is written before the check");
}

/// Five one-GPU experts on a local engine with two GPUs, trained by a command trainer that
/// records the `CUDA_VISIBLE_DEVICES` it was given and when it ran: no two running experts
/// share a GPU, none waits while a GPU is free, and two run at once. (`device: cpu`: the
/// trainer holds GPUs without btm computing on them, so no driver is needed.)
#[test]
fn five_one_gpu_experts_on_two_gpus_never_share_one() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let record = d.join("gpus.tsv");
    let command = format!(
        "s=$(date +%s.%N); sleep 3; cp -r {{model_in}}/. {{model_out}}/; echo $CUDA_VISIBLE_DEVICES $s $(date +%s.%N) {{model_out}} >> {}",
        record.display()
    );
    let domains: String = (0..5)
        .map(|i| format!("  - {{name: d{i}, train: {}, test: {}}}\n", sample("scripture", "train"), sample("scripture", "test")))
        .collect();
    let yaml = format!(
        "name: gpus\nstorage: {}\nengine: {{kind: local, slots: 8, gpus: 2, retries: 0}}\nseed: {{checkpoint: {}}}\ndomains:\n{domains}\
         experts: {{steps: 1, batch_size: 2, seq_len: 32, device: cpu, resources: {{gpus_per_task: 1}}, trainer: {{kind: command, command: \"{command}\"}}}}\n\
         eval: {{split: test, seq_len: 32, max_docs: 1}}\n",
        d.join("runs").display(),
        repo().join("model/tests/fixtures/llama").display()
    );
    let file = d.join("gpus.yaml");
    std::fs::write(&file, yaml).unwrap();
    ok(btm().arg("run").arg(&file).arg("--quiet").output().unwrap());
    let runs: Vec<(String, f64, f64)> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(runs.len(), 5, "{runs:?}");
    for (i, a) in runs.iter().enumerate() {
        assert!(a.0 == "0" || a.0 == "1", "one GPU of the two: {a:?}");
        for b in &runs[i + 1..] {
            assert!(!(a.1 < b.2 && b.1 < a.2 && a.0 == b.0), "two experts shared GPU {} at once: {a:?} {b:?}", a.0);
        }
    }
    // Every expert started at once, or soon after another ended: well within the 3 s an expert
    // takes (the poll is 50 ms; the gap includes btm's own work around the command).
    let first = runs.iter().map(|r| r.1).fold(f64::MAX, f64::min);
    for r in &runs {
        let freed = runs.iter().filter(|o| o.2 <= r.1).map(|o| r.1 - o.2).fold(f64::MAX, f64::min);
        assert!(r.1 - first < 2.0 || freed < 2.0, "{r:?} waited {freed:.2}s with a GPU free");
    }
    assert_eq!(runs.iter().filter(|r| r.1 - first < 2.0).count(), 2, "two GPUs run two experts at once: {runs:?}");
}

/// `domains: {discover}`: three sources shuffled into one unlabelled file; the cluster job
/// finds the domains, the run trains, merges and scores one expert per cluster, the ensemble
/// weighed by the clusterer (c-BTM), and the report has their rows.
#[test]
fn discovered_domains_run_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let mut docs: Vec<String> = vec![];
    for d in ["scripture", "code", "computing"] {
        let text = std::fs::read_to_string(repo().join(format!("data/sample/{d}/train.jsonl"))).unwrap();
        docs.extend(text.lines().map(String::from));
    }
    // A fixed interleaving: no source's documents stay together.
    let n = docs.len();
    let shuffled: Vec<&String> = (0..n).map(|i| &docs[(i * 37) % n]).collect();
    let unlabelled = tmp.path().join("all.jsonl");
    std::fs::write(&unlabelled, shuffled.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let yaml = format!(
        "name: disc\nstorage: {}\nengine: {{kind: local, slots: 2, threads_per_job: 1}}\n\
         seed:\n  model: {{hidden_size: 32, layers: 1, heads: 2, ffn: 64, max_positions: 64}}\n  \
         tokenizer: {{vocab_size: 300}}\n  train: {{steps: 4, batch_size: 4, seq_len: 32}}\n\
         domains:\n  discover: {{data: [all.jsonl], k: 3, seed: 1}}\n\
         experts: {{steps: 4, batch_size: 4, seq_len: 32}}\n\
         merge: {{top_k: 1, router_init: centroid, calib_tokens: 256}}\n\
         eval: {{split: test, seq_len: 32, max_docs: 2, ensemble: true}}\n",
        tmp.path().join("runs").display()
    );
    let file = tmp.path().join("disc.yaml");
    std::fs::write(&file, yaml).unwrap();
    ok(btm().arg("validate").arg(&file).output().unwrap());
    let out = ok(btm().arg("run").arg(&file).arg("--quiet").output().unwrap());
    for model in ["expert-cluster-0", "expert-cluster-1", "expert-cluster-2", "merged", "ensemble"] {
        assert!(out.contains(&format!("| {model} |")), "{model} missing from the table:\n{out}");
    }
    let run = tmp.path().join("runs/disc");
    assert!(run.join("clusters/cluster-2/train.jsonl").exists() && run.join("report.md").exists());
    let spec = std::fs::read_to_string(run.join("jobs/eval-ensemble/spec.json")).unwrap();
    assert!(spec.contains("\"clusters\""), "the ensemble is weighed by the clusterer: {spec}");
    // A discover block with a missing file and one cluster is refused with where it is.
    std::fs::write(&file, std::fs::read_to_string(&file).unwrap().replace("[all.jsonl], k: 3", "[none.jsonl], k: 1")).unwrap();
    let bad = btm().arg("validate").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("domains.discover.k") && err.contains("domains.discover.data[0]"), "{err}");
}
