//! Random faults: trials of a small pipeline (one expert trained by btm, one by a command
//! trainer, a merge, evals), each disturbed once at a random moment by SIGKILL of either the
//! orchestrator alone (its jobs die through their parent-death signal; the command trainer's
//! own children are left to run out) or one running job process, then `btm run` again. Every
//! trial must end with the reference run's weights and eval values; no job may run twice at
//! once; a job that finished (`done.json`) must already hold the reference's outputs, and a job
//! killed while running is redone.
//!
//! `BTM_FAULT_TRIALS` sets the number of trials (default 6), `BTM_FAULT_SEED` the first trial's
//! seed (default: from the clock; each trial prints its own, trial `i` uses `seed + i`). A seed
//! picks the fault and its moment; process timing still varies between replays.

mod common;

use common::{btm, ok, repo, sample};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// splitmix64: a seeded stream, so a failing trial's fault can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The command trainer: copies its input in three steps, the middle one leaving a torn
/// `model.safetensors`. It appends `start`/`end` lines with its pid to a log (`>>` opens with
/// O_APPEND) and, through fd 9, which every process it starts inherits, holds a lock that a
/// second attempt of the job cannot take while any process of the first still runs. SIGTERM
/// (its parent-death signal) is trapped, so the `end` line comes once the command it was
/// running has finished: the attempt's real end.
const TRAINER: &str = r#"log=$1; lock=$2; in=$3; out=$4
exec 9>>"$lock"
flock -n 9 || echo "overlap $$ $(date +%s.%N)" >> "$log"
echo "start $$ $(date +%s.%N)" >> "$log"
trap 'echo "end $$ $(date +%s.%N) terminated" >> "$log"; exit 143' TERM
cp "$in/config.json" "$out/config.json"
sleep 0.2
head -c 4096 "$in/model.safetensors" > "$out/model.safetensors"
sleep 0.2
cat "$in/model.safetensors" > "$out/model.safetensors"
sleep 0.2
echo "end $$ $(date +%s.%N)" >> "$log"
"#;

/// The pipeline of one trial (or of the reference) with its run in `dir/runs/faults`.
fn pipeline(dir: &Path, trainer: &Path) -> PathBuf {
    let log = dir.join("trainer.log");
    let lock = dir.join("trainer.lock");
    let command = format!("sh {} {} {} {{model_in}} {{model_out}}", trainer.display(), log.display(), lock.display());
    let domain = |name: &str, extra: &str| {
        format!(
            "  - {{{extra}name: {name}, train: {}, valid: {}, test: {}}}\n",
            sample(name, "train"),
            sample(name, "valid"),
            sample(name, "test")
        )
    };
    let yaml = format!(
        "name: faults\nstorage: {}\nengine: {{kind: local, slots: 2, threads_per_job: 1, retries: 2}}\nseed: {{checkpoint: {}}}\n\
         domains:\n{}{}\
         experts: {{steps: 30, batch_size: 4, seq_len: 32, checkpoint_interval: 3}}\n\
         merge: {{top_k: 1, router_init: centroid, calib_tokens: 512}}\n\
         eval: {{split: test, seq_len: 32, max_docs: 1}}\n",
        dir.join("runs").display(),
        repo().join("model/tests/fixtures/llama").display(),
        domain("code", &format!("overrides: {{trainer: {{kind: command, command: \"{command}\"}}}}, ")),
        domain("scripture", ""),
    );
    let file = dir.join("faults.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

/// What a job leaves: a model's weights (bytes) or an eval's values (JSON), by job name.
#[derive(Debug, PartialEq)]
enum Output {
    Weights(Vec<u8>),
    Values(serde_json::Value),
    Missing,
}

/// Each job of the run's plan: its name, its folder under `jobs/`, and its output; none
/// before the plan is written.
fn outputs(run: &Path) -> Vec<(String, PathBuf, Output)> {
    let Ok(plan) = std::fs::read(run.join("plan.json")) else { return vec![] };
    let plan: serde_json::Value = serde_json::from_slice(&plan).unwrap();
    plan["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            let name = j["name"].as_str().unwrap().to_string();
            let dir = run.join("jobs").join(name.replace('/', "-"));
            let out = if let Some(model) = j["produces"]["dir"].as_str() {
                std::fs::read(Path::new(model).join("model.safetensors")).map_or(Output::Missing, Output::Weights)
            } else {
                let file = j["outputs"][0].as_str().unwrap();
                std::fs::read(file).ok().and_then(|b| serde_json::from_slice(&b).ok()).map_or(Output::Missing, Output::Values)
            };
            (name, dir, out)
        })
        .collect()
}

/// The `btm` job processes (not `btm run`) of the run whose jobs are under `jobs`: job folder
/// name and pid. A job's child between fork and exec shows its parent's command line: only
/// the topmost process of a job counts.
fn job_processes(jobs: &str) -> Vec<(String, i32)> {
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmd.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if !args.first().is_some_and(|a| a.ends_with("/btm")) {
            continue;
        }
        let Some(job) = args.iter().find_map(|a| a.strip_prefix(jobs)) else { continue };
        // The parent pid: the first field after the command name's closing parenthesis.
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<i32>().ok()).unwrap_or(0);
        found.push((job.split('/').next().unwrap_or("").to_string(), pid, ppid));
    }
    let pids: Vec<i32> = found.iter().map(|f| f.1).collect();
    found.into_iter().filter(|(_, _, ppid)| !pids.contains(ppid)).map(|(job, pid, _)| (job, pid)).collect()
}

/// Samples the run's job processes every 10 ms until dropped, noting any moment two
/// processes of one job were alive together.
struct Monitor {
    stop: Arc<AtomicBool>,
    overlaps: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    fn start(jobs: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let overlaps = Arc::new(Mutex::new(vec![]));
        let (s, o) = (stop.clone(), overlaps.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut by_job: BTreeMap<String, Vec<i32>> = BTreeMap::new();
                for (job, pid) in job_processes(&jobs) {
                    by_job.entry(job).or_default().push(pid);
                }
                for (job, pids) in by_job.into_iter().filter(|(_, p)| p.len() > 1) {
                    o.lock().unwrap().push(format!("{job} ran twice at once: pids {pids:?}"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Monitor { stop, overlaps, thread: Some(thread) }
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.overlaps.lock().unwrap())
    }
}

/// The command trainer's attempts from its log: every one ended, none overlapped another, no
/// attempt found the lock of an earlier one still held.
fn trainer_attempts(log: &Path) -> Result<usize, String> {
    let text = std::fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut open: BTreeMap<&str, f64> = BTreeMap::new();
    let mut spans: Vec<(f64, f64, &str)> = vec![];
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let t: f64 = f[2].parse().unwrap();
        match f[0] {
            "start" => _ = open.insert(f[1], t),
            "end" => spans.push((open.remove(f[1]).ok_or(format!("end without start: {line}"))?, t, f[1])),
            _ => return Err(format!("the command trainer ran twice at once (its lock was held): {line}\n{text}")),
        }
    }
    if !open.is_empty() {
        return Err(format!("attempts without an end: {open:?}\n{text}"));
    }
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!("the command trainer ran twice at once: pid {} started before pid {} ended\n{text}", w[1].2, w[0].2));
        }
    }
    Ok(spans.len())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Orchestrator,
    Job,
}

#[derive(Default)]
struct Tally {
    orchestrator_kills: usize,
    job_kills: BTreeMap<String, usize>,
    /// The run ended before the moment drawn: nothing to kill.
    missed: usize,
    reruns: usize,
    /// Re-runs (and retries) that found processes of a killed attempt still running and
    /// stopped them first.
    leftovers_stopped: usize,
    failures: Vec<String>,
}

/// `btm run` of `file`, its output into `out`.
fn spawn_run(file: &Path, out: &Path) -> Child {
    let log = std::fs::File::create(out).unwrap();
    btm().arg("run").arg(file).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap()
}

/// One trial; `Err` says what went wrong.
fn trial(
    dir: &Path,
    trainer: &Path,
    seed: u64,
    reference: &[(String, PathBuf, Output)],
    ref_secs: f64,
    tally: &mut Tally,
) -> Result<(), String> {
    let mut rng = Rng(seed);
    let fault = if rng.below(2) == 0 { Fault::Orchestrator } else { Fault::Job };
    let at = Duration::from_secs_f64(rng.unit() * ref_secs);
    let file = pipeline(dir, trainer);
    let run = dir.join("runs/faults");
    let jobs = format!("{}/", run.join("jobs").display());
    let monitor = Monitor::start(jobs.clone());
    let first_out = dir.join("run-1.out");
    let mut child = spawn_run(&file, &first_out);
    let start = Instant::now();
    let mut rerun = false;
    let mut killed: Vec<String> = vec![];
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            if status.success() {
                tally.missed += 1;
                eprintln!("  the run ended before {at:.2?}: nothing killed");
                break;
            }
            return Err(format!("btm run failed before any fault:\n{}", std::fs::read_to_string(&first_out).unwrap_or_default()));
        }
        if start.elapsed() < at {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let running = job_processes(&jobs);
        match fault {
            Fault::Orchestrator => {
                child.kill().unwrap(); // SIGKILL, to the orchestrator alone
                child.wait().unwrap();
                killed = running.into_iter().map(|(job, _)| job).collect();
                tally.orchestrator_kills += 1;
                eprintln!("  killed the orchestrator at {:.2?}, jobs running: {killed:?}", start.elapsed());
                rerun = true;
            }
            Fault::Job if running.is_empty() => {
                // Between jobs: wait for the next one to start.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Fault::Job => {
                let (job, pid) = running[rng.below(running.len())].clone();
                // SAFETY: killing a job process this trial's run started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                eprintln!("  killed job {job} (pid {pid}) at {:.2?}", start.elapsed());
                *tally.job_kills.entry(job.clone()).or_default() += 1;
                killed.push(job);
                let status = child.wait().unwrap();
                if !status.success() {
                    return Err(format!(
                        "btm run did not recover from a killed job:\n{}",
                        std::fs::read_to_string(&first_out).unwrap_or_default()
                    ));
                }
            }
        }
        break;
    }

    if rerun {
        // What a killed orchestrator left: a job with `done.json` already holds the reference's
        // output; a job that was running is not marked done.
        for ((name, job_dir, out), (_, _, want)) in outputs(&run).iter().zip(reference) {
            if job_dir.join("done.json").exists() && out != want {
                return Err(format!("{name} has done.json but not the reference's output after the kill"));
            }
        }
        let rerun_out = dir.join("run-2.out");
        // At once, without waiting for what the killed orchestrator's jobs left running.
        let status = spawn_run(&file, &rerun_out).wait().unwrap();
        tally.reruns += 1;
        let text = std::fs::read_to_string(&rerun_out).unwrap_or_default();
        if !status.success() {
            return Err(format!("the re-run after the kill failed:\n{text}"));
        }
        tally.leftovers_stopped += text.matches("stopping processes an earlier attempt left running").count();
        // A job killed mid-way was started again, not taken as complete.
        for job in &killed {
            let name = outputs(&run).into_iter().find(|(_, d, _)| d.ends_with(job)).map(|(n, _, _)| n).unwrap();
            if !text.contains(&format!("start {name}")) {
                return Err(format!("{name} was running when the orchestrator was killed, and the re-run did not redo it:\n{text}"));
            }
        }
    } else if fault == Fault::Job && !killed.is_empty() {
        let text = std::fs::read_to_string(&first_out).unwrap_or_default();
        tally.leftovers_stopped += text.matches("stopping processes an earlier attempt left running").count();
        let name = outputs(&run).into_iter().find(|(_, d, _)| d.ends_with(&killed[0])).map(|(n, _, _)| n).unwrap();
        // Unless it ended on its own just before the signal, the killed job was retried.
        if !text.contains(&format!("start {name} (retry 1)")) && !text.contains(&format!("done  {name}")) {
            return Err(format!("{name} was killed and neither retried nor done:\n{text}"));
        }
    }
    let overlaps = monitor.finish();
    if !overlaps.is_empty() {
        return Err(overlaps.join("\n"));
    }
    trainer_attempts(&dir.join("trainer.log"))?;
    let last = outputs(&run);
    if last.len() != reference.len() {
        return Err(format!("{} jobs in the plan, the reference has {}", last.len(), reference.len()));
    }
    for ((name, _, got), (_, _, want)) in last.iter().zip(reference) {
        if got != want {
            return Err(format!("{name}: the output differs from the undisturbed run's"));
        }
    }
    Ok(())
}

#[test]
fn random_kills_of_the_orchestrator_or_a_job_end_with_the_reference_outputs() {
    let trials: u64 = std::env::var("BTM_FAULT_TRIALS").ok().and_then(|n| n.parse().ok()).unwrap_or(6);
    let base: u64 = std::env::var("BTM_FAULT_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs());
    let tmp = tempfile::tempdir().unwrap();
    let trainer = tmp.path().join("trainer.sh");
    std::fs::write(&trainer, TRAINER).unwrap();

    let ref_dir = tmp.path().join("reference");
    std::fs::create_dir(&ref_dir).unwrap();
    let started = Instant::now();
    ok(btm().arg("run").arg(pipeline(&ref_dir, &trainer)).arg("--quiet").output().unwrap());
    let ref_secs = started.elapsed().as_secs_f64();
    let reference = outputs(&ref_dir.join("runs/faults"));
    assert!(reference.iter().all(|(_, _, o)| *o != Output::Missing), "the reference run left outputs missing");
    assert_eq!(trainer_attempts(&ref_dir.join("trainer.log")), Ok(1));

    let mut tally = Tally::default();
    let wall = Instant::now();
    for i in 0..trials {
        let seed = base.wrapping_add(i);
        eprintln!("trial {i}: seed {seed}");
        let dir = tmp.path().join(format!("trial-{i}"));
        std::fs::create_dir(&dir).unwrap();
        match trial(&dir, &trainer, seed, &reference, ref_secs, &mut tally) {
            Ok(()) => std::fs::remove_dir_all(&dir).unwrap(),
            Err(e) => {
                eprintln!("  FAILED: {e}");
                tally.failures.push(format!("trial {i} (BTM_FAULT_SEED={seed} BTM_FAULT_TRIALS=1): {e}"));
            }
        }
    }
    eprintln!(
        "{trials} trials in {:.0?} (reference run {ref_secs:.1}s): {} orchestrator kills, job kills {:?}, {} missed (the run ended first), {} re-runs, {} times leftovers of a killed attempt stopped, {} failures",
        wall.elapsed(),
        tally.orchestrator_kills,
        tally.job_kills,
        tally.missed,
        tally.reruns,
        tally.leftovers_stopped,
        tally.failures.len()
    );
    assert!(tally.failures.is_empty(), "{}", tally.failures.join("\n\n"));
}
