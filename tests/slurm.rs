//! The pipeline on a real Slurm cluster, through the CLI and through slurmrestd.
//!
//! Needs Slurm on this machine (`scripts/slurm-local.sh start`, which CI runs); the REST tests
//! also need `SLURM_JWT` and `SLURMRESTD_URL` from it. Without them the tests say so and pass,
//! unless `BTM_REQUIRE_SLURM=1` (set by CI), which makes a missing cluster a failure. The
//! object-store variants also start the S3 test server (see tests/s3.rs).

mod common;

use common::{btm, fixture_pipeline, has_checkpoint, ok, path_with, torch_python, torchrun_trainer, S3Server, BUCKET};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A Slurm CLI tool; with `SLURM_JWT` set they try JWT authentication and fail.
fn slurm(tool: &str) -> Command {
    let mut cmd = Command::new(tool);
    cmd.env_remove("SLURM_JWT");
    cmd
}

fn slurm_available(rest: bool) -> bool {
    let cli = slurm("sinfo").arg("-h").output().is_ok_and(|o| o.status.success());
    let ok = cli && (!rest || (std::env::var("SLURM_JWT").is_ok() && std::env::var("SLURMRESTD_URL").is_ok()));
    if !ok {
        assert!(
            std::env::var("BTM_REQUIRE_SLURM").as_deref() != Ok("1"),
            "BTM_REQUIRE_SLURM=1 but no Slurm cluster (or no SLURM_JWT/SLURMRESTD_URL) is available"
        );
        eprintln!("skipping: no Slurm cluster here (run scripts/slurm-local.sh start)");
    }
    ok
}

fn pipeline(dir: &Path, name: &str, engine: &str, steps: u64) -> PathBuf {
    pipeline_in(dir, name, engine, steps, &dir.join("runs").display().to_string())
}

fn pipeline_in(dir: &Path, name: &str, engine: &str, steps: u64, storage: &str) -> PathBuf {
    fixture_pipeline(dir, name, storage, engine, &format!("steps: {steps}, batch_size: 4, seq_len: 32, checkpoint_interval: 5"), "")
}

/// The two experts went to Slurm as one array (one batch script with both tasks).
fn assert_experts_in_one_array(run: &Path) {
    let scripts: Vec<String> =
        std::fs::read_dir(run.join("jobs/slurm")).unwrap().flatten().map(|e| std::fs::read_to_string(e.path()).unwrap()).collect();
    assert!(
        scripts.iter().any(|s| s.contains("expert-scripture") && s.contains("expert-code") && s.contains("  1) mkdir -p")),
        "{scripts:?}"
    );
}

/// The Slurm ids of running tasks whose job name is `name`.
fn slurm_ids(name: &str) -> Vec<String> {
    let out = slurm("squeue").args(["-h", "-o", "%i %j %T"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[1] == name && f[2] == "RUNNING").then(|| f[0].to_string())
        })
        .collect()
}

#[test]
fn cli_runs_the_experts_as_an_array_and_survives_a_cancelled_task() {
    if !slurm_available(false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Long enough that the cancel lands mid-training: 60 steps took a quarter of a second on a
    // Zen 4, ending before the poll below could catch the task between checkpoint and done.
    let file = pipeline(tmp.path(), "slurm-cli", "{kind: slurm, api: cli, cpus_per_task: 1, mem_per_cpu_mb: 400, retries: 2}", 600);
    let run = tmp.path().join("runs/slurm-cli");
    let child = btm().arg("run").arg(&file).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();

    // scancel the code expert's array task once it has a checkpoint.
    let start = Instant::now();
    let mut cancelled = None;
    while cancelled.is_none() && start.elapsed() < Duration::from_secs(240) {
        if has_checkpoint(&run.join("experts/code")) && !run.join("jobs/expert-code/done.json").exists() {
            // Array task 1 is the second domain, `code`.
            if let Some(id) = slurm_ids("btm-expert").into_iter().find(|id| id.ends_with("_1")) {
                let s = slurm("scancel").arg(&id).status().unwrap();
                assert!(s.success());
                cancelled = Some(id);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = ok(child.wait_with_output().unwrap());
    assert!(cancelled.is_some(), "never caught the code expert running with a checkpoint:\n{out}");
    assert!(out.contains("| merged |"), "{out}");
    // One array for the two experts.
    assert_experts_in_one_array(&run);
    // The cancelled expert resumed from its checkpoint rather than step 0.
    let log = std::fs::read_to_string(run.join("logs/expert-code.log")).unwrap();
    assert!(log.contains("resuming from"), "{log}");
}

/// The experts trained by an external engine (scripts/train_hf.py under torchrun, two
/// processes per task) as one Slurm array; btm merges and evaluates on the cluster too.
#[test]
fn cli_runs_external_trainers_as_an_array() {
    if !slurm_available(false) {
        return;
    }
    let Some(python) = torch_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // The experts ask for their own resources (two CPUs for two processes, memory, a time
    // limit); the merge and evaluations keep the engine's one CPU.
    let file = pipeline(tmp.path(), "slurm-external", "{kind: slurm, api: cli, cpus_per_task: 1, mem_per_cpu_mb: 400, retries: 1}", 6);
    let phase = format!(
        "checkpoint_interval: 5, trainer: {}, resources: {{cpus_per_task: 2, memory_mb: 3000, time_limit_min: 20}}}}",
        torchrun_trainer()
    );
    let yaml = std::fs::read_to_string(&file).unwrap().replace("checkpoint_interval: 5}", &phase);
    std::fs::write(&file, yaml).unwrap();
    // sbatch hands the submitting environment (PATH with torchrun) to the tasks.
    let out = ok(btm().env("PATH", path_with(&python)).arg("run").arg(&file).output().unwrap());
    assert!(out.contains("| merged |") && out.contains("| expert-code |"), "{out}");
    let run = tmp.path().join("runs/slurm-external");
    assert_experts_in_one_array(&run);
    let log = std::fs::read_to_string(run.join("logs/expert-code.log")).unwrap();
    assert!(log.contains("external trainer: exec torchrun"), "{log}");
    assert!(run.join("experts/code/model/MANIFEST.json").is_file());
    // Slurm's own record of what the expert tasks were given (kept for MinJobAge after they end).
    let show = slurm("scontrol").args(["-o", "show", "job"]).output().unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    let experts: Vec<&str> = show.lines().filter(|l| l.contains("JobName=btm-expert") && l.contains(&run.display().to_string())).collect();
    assert!(!experts.is_empty(), "no expert tasks in scontrol:\n{show}");
    for l in experts {
        assert!(l.contains("NumCPUs=2") && l.contains("MinMemoryNode=3000M") && l.contains("TimeLimit=00:20:00"), "{l}");
    }
}

#[test]
fn rest_api_runs_the_pipeline() {
    if !slurm_available(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let engine = "{kind: slurm, api: rest, cpus_per_task: 1, mem_per_cpu_mb: 400, rest: {url: \"${SLURMRESTD_URL}\", user: root, token_env: SLURM_JWT}}";
    let file = pipeline(tmp.path(), "slurm-rest", engine, 10);
    let out = ok(btm().arg("run").arg(&file).output().unwrap());
    assert!(out.contains("| merged |"), "{out}");
    let again = ok(btm().arg("run").arg(&file).output().unwrap());
    assert!(again.contains("nothing to do"), "{again}");
}

#[test]
fn a_bad_or_missing_token_is_named_and_never_printed() {
    if !slurm_available(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let engine = "{kind: slurm, api: rest, rest: {url: \"${SLURMRESTD_URL}\", user: root, token_env: BTM_TEST_BAD_JWT}}";
    let file = pipeline(tmp.path(), "bad-token", engine, 2);
    let secret = "not-a-real-token-7f3a9";
    let out = btm().arg("run").arg(&file).env("BTM_TEST_BAD_JWT", secret).output().unwrap();
    assert!(!out.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("slurmrestd rejected the token in `BTM_TEST_BAD_JWT`"), "{text}");
    assert!(!text.contains(secret), "the token was printed:\n{text}");
    let logs = tmp.path().join("runs/bad-token");
    for entry in walk(&logs) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&bytes).contains(secret), "the token was written to {}", entry.display());
    }

    let out = btm().arg("run").arg(&file).env_remove("BTM_TEST_BAD_JWT").output().unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("environment variable `BTM_TEST_BAD_JWT` is not set"), "{text}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The pipeline on Slurm with its run in S3: workers fetch their inputs from the bucket and
/// publish there; nothing of the run is written to a local run folder.
fn runs_with_s3(api: &str, engine: &str) {
    let Some(s3) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let name = format!("s3-{api}");
    let file = pipeline_in(tmp.path(), &name, engine, 10, &format!("s3://{BUCKET}/runs"));
    let mut cmd = btm();
    s3.env(&mut cmd).current_dir(tmp.path()).env("BTM_CACHE", tmp.path().join("cache"));
    let out = ok(cmd.arg("run").arg(&file).output().unwrap());
    assert!(out.contains("| merged |"), "{out}");
    let objects = s3.objects(&format!("runs/{name}"));
    for o in [
        "plan.json",
        "report.md",
        "experts/code/model/MANIFEST.json",
        "experts/scripture/checkpoints/step-00000010/MANIFEST.json",
        "merged/MANIFEST.json",
        "eval/merged/code.json",
        "jobs/expert-code/done.json",
        "logs/expert-code.log",
    ] {
        assert!(objects.contains(&format!("runs/{name}/{o}")), "{o} is not in the bucket: {objects:#?}");
    }
    let merged = s3.dir(&format!("runs/{name}/merged"));
    btm_model::Manifest::read(&merged).unwrap().verify(&merged).unwrap();
    let mut here: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    here.sort();
    assert_eq!(here, vec!["cache".to_string(), format!("{name}.yaml")], "only the pipeline and the cache are local");
    // The experts were one array, submitted from the local folder that holds scripts and logs.
    let scripts: Vec<String> = walk(&tmp.path().join("cache/runs-local"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        scripts.iter().any(|s| s.contains("expert-scripture") && s.contains("expert-code") && s.contains("  1) mkdir -p")),
        "{scripts:?}"
    );
}

#[test]
fn cli_runs_the_pipeline_with_its_run_in_s3() {
    if slurm_available(false) {
        runs_with_s3("cli", "{kind: slurm, api: cli, cpus_per_task: 1, mem_per_cpu_mb: 400}");
    }
}

#[test]
fn rest_api_runs_the_pipeline_with_its_run_in_s3() {
    if slurm_available(true) {
        runs_with_s3("rest", "{kind: slurm, api: rest, cpus_per_task: 1, mem_per_cpu_mb: 400, rest: {url: \"${SLURMRESTD_URL}\", user: root, token_env: SLURM_JWT}}");
    }
}

/// Multi-process phases on Slurm: each job an allocation of `--ntasks=2` whose ranks `srun`
/// starts over PMIx; the experts data-parallel, the merged MoE continued expert-parallel.
#[cfg(feature = "mpi")]
#[test]
fn cli_runs_multi_rank_phases_with_srun() {
    if !slurm_available(false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let file = fixture_pipeline(
        tmp.path(),
        "srun",
        &runs.to_string_lossy(),
        "{kind: slurm, api: cli, cpus_per_task: 1, mpi: pmix, retries: 0}",
        "steps: 4, batch_size: 2, seq_len: 32, grad_accum: 2, data_parallel: 2",
        "continue: {steps: 4, expert_parallel: 2}\n",
    );
    let out = ok(btm().arg("run").arg(&file).arg("--quiet").output().unwrap());
    assert!(out.contains("| continued |"), "{out}");
    let run = runs.join("srun");
    let scripts: Vec<String> =
        std::fs::read_dir(run.join("jobs/slurm")).unwrap().flatten().map(|e| std::fs::read_to_string(e.path()).unwrap()).collect();
    assert!(
        scripts.iter().any(|s| s.contains("continue-merged") && s.contains("exec srun --kill-on-bad-exit=1 --mpi='pmix' ")),
        "{scripts:?}"
    );
    let log = std::fs::read_to_string(run.join("logs/continue-merged.log")).unwrap();
    assert!(log.contains("2 ranks: data_parallel 1 × expert_parallel 2"), "{log}");
}
