//! Walks the job DAG: a job whose `done.json` matches its id is skipped; the others start once
//! their dependencies are done, up to the engine's slots; failures retry with backoff; Ctrl-C
//! (or SIGTERM) stops the children gracefully so a later `btm run` continues where it stopped.

use crate::engine::{Engine, JobHandle, JobState, Submission};
use crate::plan::{Job, Plan};
use anyhow::{anyhow, bail, Result};
use btm_model::folder::Folder;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
enum Status {
    Waiting,
    /// Failed attempts so far; the next attempt may start at `not_before`.
    Backoff {
        attempts: u32,
        not_before: Instant,
    },
    Running {
        handle: JobHandle,
        attempts: u32,
        started: Instant,
    },
    Done,
    Failed(String),
}

/// The most a job's small records (`done.json`, `started.json`, `engine.json`) may hold: a
/// larger one is not btm's, and is refused rather than read whole.
pub const MARKER_LIMIT: u64 = 1 << 20;
/// The most `plan.json` may hold (a run of 1,024 domains writes a few MB).
pub const PLAN_LIMIT: u64 = 256 << 20;

/// The record that a job finished: written after its outputs were checked.
pub fn done_marker(run: &Path, job: &Job) -> std::path::PathBuf {
    job.dir(run).join("done.json")
}

/// The run folder at `run` (a path, or an object-store URL), shared by every caller.
pub fn folder(run: &Path) -> Result<std::sync::Arc<Folder>> {
    Ok(Folder::shared(&run.to_string_lossy())?)
}

/// Where this machine keeps a run's job logs and engine scripts: the run folder itself, or,
/// for a run in an object store, a folder in the local cache named after its URL (the logs
/// are copied into the run when their jobs end).
pub fn local_root(run: &Path) -> PathBuf {
    let location = run.to_string_lossy();
    if !btm_model::folder::is_remote(&location) {
        return run.to_path_buf();
    }
    use sha2::Digest;
    let key = hex::encode(sha2::Sha256::digest(location.trim_end_matches('/').as_bytes()));
    btm_model::folder::cache_root().join("runs-local").join(&key[..24])
}

/// How long a finished job ran, from its `done.json`.
pub fn job_seconds(run: &Path, job: &Job) -> Option<f64> {
    let bytes = folder(run).ok()?.read_capped(done_marker(run, job), MARKER_LIMIT).ok()??;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["seconds"].as_f64()
}

/// Whether `job` finished with exactly this id (config and inputs unchanged).
pub fn is_done(run: &Path, job: &Job) -> bool {
    let Ok(Some(bytes)) = folder(run).and_then(|f| Ok(f.read_capped(done_marker(run, job), MARKER_LIMIT)?)) else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return false;
    };
    v["id"] == job.id.as_str() && outputs_complete(run, job).unwrap_or(false)
}

/// Outputs exist, and a model output has its manifest (it was published whole).
fn outputs_complete(run: &Path, job: &Job) -> Result<bool> {
    let f = folder(run)?;
    if let Some(m) = &job.produces {
        if !f.exists(m.dir.join(btm_model::manifest::MANIFEST))? {
            return Ok(false);
        }
    }
    for o in &job.outputs {
        if !f.exists(o)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Get a job's folder ready: a job that did not start with this id before loses its old
/// outputs (a trainer with the same id keeps them and resumes from its checkpoints).
fn prepare(run: &Path, job: &Job) -> Result<()> {
    let f = folder(run)?;
    let dir = job.dir(run);
    f.ensure_dir(&dir)?;
    let started = dir.join("started.json");
    let same_id = f
        .read_capped(&started, MARKER_LIMIT)?
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["id"] == job.id.as_str());
    if !(job.resumable && same_id) {
        for o in &job.outputs {
            f.remove(o)?;
        }
    }
    f.remove(done_marker(run, job))?;
    for (path, contents) in &job.files {
        f.write(path, contents.as_bytes())?;
    }
    for o in &job.outputs {
        if let Some(parent) = o.parent() {
            f.ensure_dir(parent)?;
        }
    }
    f.write(&started, &serde_json::to_vec(&json!({"id": job.id}))?)?;
    Ok(())
}

/// Copy a finished job's log from this machine into an object-store run (best effort: the
/// log is only a copy of what the job printed).
fn keep_log(run: &Path, logs: &Path, job: &Job) {
    let local = job.log(logs);
    if btm_model::folder::is_remote(&run.to_string_lossy()) && local.exists() {
        if let Ok(f) = folder(run) {
            let _ = f.upload_file(&local, job.log(run));
        }
    }
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub ran: Vec<String>,
    pub skipped: Vec<String>,
}

/// Run every job of `plan` on `engine`; `retries` failed attempts are retried per job.
pub async fn execute(plan: &Plan, engine: &dyn Engine, retries: u32, quiet: bool) -> Result<Summary> {
    let mut walk = Walk::new(plan, engine, retries, quiet);
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let ready = walk.ready_jobs();
        walk.start(&ready).await?;
        walk.poll().await?;
        if walk.finished()? {
            return Ok(walk.summary);
        }
        tokio::select! {
            _ = tokio::time::sleep(engine.poll_interval()) => {}
            _ = &mut ctrl_c, if !walk.interrupted => {
                walk.interrupted = true;
                walk.say("stopping: asking running jobs to checkpoint and exit…".into());
                cancel_all(engine, &walk.status).await?;
            }
            _ = sigterm.recv(), if !walk.interrupted => {
                walk.interrupted = true;
                cancel_all(engine, &walk.status).await?;
            }
        }
    }
}

/// The state of one [`execute`]: every job's status and what the run did so far.
struct Walk<'a> {
    plan: &'a Plan,
    engine: &'a dyn Engine,
    run: &'a Path,
    /// Where job logs are written: on this machine (see `local_root`).
    logs: PathBuf,
    /// A job's position in the plan, by name.
    index: HashMap<&'a str, usize>,
    /// Per job, in plan order.
    status: Vec<Status>,
    summary: Summary,
    retries: u32,
    quiet: bool,
    /// Ctrl-C or SIGTERM came: nothing new starts, and failures are not retried.
    interrupted: bool,
}

impl<'a> Walk<'a> {
    /// Jobs already done (same id, outputs complete) are skipped.
    fn new(plan: &'a Plan, engine: &'a dyn Engine, retries: u32, quiet: bool) -> Self {
        let run = &plan.run_dir;
        let index = plan.jobs.iter().enumerate().map(|(i, j)| (j.name.as_str(), i)).collect();
        let status: Vec<Status> = plan.jobs.iter().map(|j| if is_done(run, j) { Status::Done } else { Status::Waiting }).collect();
        let summary = Summary {
            skipped: plan.jobs.iter().zip(&status).filter(|(_, s)| **s == Status::Done).map(|(j, _)| j.name.clone()).collect(),
            ..Default::default()
        };
        let walk = Walk { plan, engine, run, logs: local_root(run), index, status, summary, retries, quiet, interrupted: false };
        if !walk.summary.skipped.is_empty() {
            walk.say(format!("{} of {} jobs already done", walk.summary.skipped.len(), walk.total()));
        }
        walk
    }

    fn total(&self) -> usize {
        self.plan.jobs.len()
    }

    fn say(&self, msg: String) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    /// The jobs to start now, with their failed attempts so far: those whose dependencies are
    /// done, up to the engine's slots. A job that needs more GPUs than the engine has fails.
    fn ready_jobs(&mut self) -> Vec<(usize, u32)> {
        let (plan, engine) = (self.plan, self.engine);
        let running = self.status.iter().filter(|s| matches!(s, Status::Running { .. })).count();
        let free = engine.slots().saturating_sub(running);
        // GPUs the engine places itself: a job starts when enough are free, and a later job
        // that fits starts before an earlier one that does not (no GPU idles while one fits).
        let gpus_in_use: usize = (0..self.total())
            .filter(|&i| matches!(self.status[i], Status::Running { .. }))
            .map(|i| plan.jobs[i].resources.gpus_held())
            .sum();
        let mut gpus_free = engine.gpus().map(|n| n.saturating_sub(gpus_in_use));
        // A failed job stops only what depends on it: the others still run, so a re-run has
        // less left to do.
        let mut ready: Vec<(usize, u32)> = vec![];
        for i in 0..self.total() {
            if ready.len() >= free || self.interrupted {
                break;
            }
            let attempts = match &self.status[i] {
                Status::Waiting => 0,
                Status::Backoff { attempts, not_before } if Instant::now() >= *not_before => *attempts,
                _ => continue,
            };
            let job = &plan.jobs[i];
            if !job.deps.iter().all(|d| self.index.get(d.as_str()).is_some_and(|&k| self.status[k] == Status::Done)) {
                continue;
            }
            if let (Some(total_gpus), Some(left)) = (engine.gpus(), gpus_free.as_mut()) {
                let need = job.resources.gpus_held();
                if need > total_gpus {
                    self.say(format!("job {} needs {need} GPUs; the engine has {total_gpus}", job.name));
                    self.status[i] = Status::Failed(format!("needs {need} GPUs; the engine has {total_gpus}"));
                    continue;
                }
                if need > *left {
                    continue;
                }
                *left -= need;
            }
            ready.push((i, attempts));
        }
        ready
    }

    /// Start `ready`: jobs of one kind that become ready together (the per-domain trainers) go
    /// to the engine as one batch (a Slurm array).
    async fn start(&mut self, ready: &[(usize, u32)]) -> Result<()> {
        let plan = self.plan;
        for batch in batches_by_kind(plan, ready) {
            let mut subs = vec![];
            for &(i, _) in &batch {
                let job = &plan.jobs[i];
                prepare(self.run, job)?;
                subs.push(Submission::for_job(job, job.log(&self.logs)));
            }
            let handles = self.engine.submit(&subs).await?;
            for (&(i, attempts), handle) in batch.iter().zip(handles) {
                self.say(format!(
                    "[{:>3}/{}] start {}{}",
                    done_count(&self.status) + 1,
                    self.total(),
                    plan.jobs[i].name,
                    if attempts > 0 { format!(" (retry {attempts})") } else { String::new() }
                ));
                self.status[i] = Status::Running { handle, attempts, started: Instant::now() };
            }
        }
        Ok(())
    }

    /// Ask the engine about every running job, and record those that ended.
    async fn poll(&mut self) -> Result<()> {
        for i in 0..self.total() {
            let Status::Running { handle, attempts, started } = &self.status[i] else { continue };
            let (attempts, started) = (*attempts, *started);
            match self.engine.state(handle).await? {
                JobState::Running => {}
                JobState::Succeeded if outputs_complete(self.run, &self.plan.jobs[i])? => self.succeeded(i, started)?,
                state => self.failed(i, attempts, state),
            }
        }
        Ok(())
    }

    /// Job `i` ended with its outputs: its log is kept and its `done.json` written.
    fn succeeded(&mut self, i: usize, started: Instant) -> Result<()> {
        let job = &self.plan.jobs[i];
        let secs = started.elapsed().as_secs_f64();
        keep_log(self.run, &self.logs, job);
        folder(self.run)?
            .write(done_marker(self.run, job), &serde_json::to_vec_pretty(&json!({"id": job.id, "name": job.name, "seconds": secs}))?)?;
        self.status[i] = Status::Done;
        self.summary.ran.push(job.name.clone());
        self.say(format!("[{:>3}/{}] done  {} ({secs:.1}s)", done_count(&self.status), self.total(), job.name));
        Ok(())
    }

    /// Job `i` failed, or ended without its outputs, after `attempts` earlier failed attempts:
    /// it waits again (interrupted), backs off for a retry, or fails for good.
    fn failed(&mut self, i: usize, attempts: u32, state: JobState) {
        let job = &self.plan.jobs[i];
        keep_log(self.run, &self.logs, job);
        let why = match state {
            JobState::Failed(why) => why,
            _ => "finished without its outputs".into(),
        };
        let attempts = attempts + 1;
        if self.interrupted {
            self.status[i] = Status::Waiting;
        } else if attempts <= self.retries {
            let wait = Duration::from_secs(2u64.pow(attempts.min(6)));
            self.say(format!("job {} failed ({why}); retrying in {}s — log: {}", job.name, wait.as_secs(), job.log(&self.logs).display()));
            self.status[i] = Status::Backoff { attempts, not_before: Instant::now() + wait };
        } else {
            self.say(format!("job {} failed ({why}) — log: {}", job.name, job.log(&self.logs).display()));
            self.status[i] = Status::Failed(why);
        }
    }

    /// Whether every job is done; an error when nothing runs and the run cannot go on
    /// (interrupted, or the jobs left wait on failed ones).
    fn finished(&self) -> Result<bool> {
        if self.status.iter().any(|s| matches!(s, Status::Running { .. })) {
            return Ok(false);
        }
        if self.interrupted {
            bail!("interrupted; run `btm run` again to continue where it stopped");
        }
        if self.status.iter().all(|s| *s == Status::Done) {
            return Ok(true);
        }
        let waiting_on_backoff = self.status.iter().any(|s| matches!(s, Status::Backoff { .. }));
        if !waiting_on_backoff && free_jobs_blocked(self.plan, &self.status, &self.index) {
            return Err(self.blocked_error());
        }
        Ok(false)
    }

    /// Why no job can start: the first failed job (and how many others failed), or a
    /// dependency nothing produces.
    fn blocked_error(&self) -> anyhow::Error {
        let plan = self.plan;
        let failed: Vec<(usize, &String)> =
            self.status.iter().enumerate().filter_map(|(i, s)| if let Status::Failed(why) = s { Some((i, why)) } else { None }).collect();
        let Some(&(i, why)) = failed.first() else {
            return anyhow!("no job can start: the plan has a dependency that is never produced");
        };
        let more = match failed.len() {
            1 => String::new(),
            n => format!(
                "; {} other failed jobs: {}",
                n - 1,
                failed[1..].iter().map(|&(k, _)| plan.jobs[k].name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
        let blocked = self.status.iter().filter(|s| **s == Status::Waiting).count();
        anyhow!(
            "job {} failed: {why} (see {}){more}; {blocked} jobs that depend on failed ones did not start, the rest finished (run `btm run` again after fixing it)",
            plan.jobs[i].name,
            plan.jobs[i].log(&self.logs).display()
        )
    }
}

async fn cancel_all(engine: &dyn Engine, status: &[Status]) -> Result<()> {
    for s in status {
        if let Status::Running { handle, .. } = s {
            engine.cancel(handle).await?;
        }
    }
    Ok(())
}

/// `items` grouped by `key`, each group in the order of `items`, groups in order of first
/// appearance: every item lands in exactly one group, however the keys interleave (the
/// experts and baselines of several arm seeds do). Both the executor's batches and the
/// Kubernetes dry run's manifests group with this, on keys built from [`batch_key`].
pub(crate) fn group_by_key<T, K: PartialEq>(items: impl IntoIterator<Item = T>, key: impl Fn(&T) -> K) -> Vec<Vec<T>> {
    let mut groups: Vec<(K, Vec<T>)> = vec![];
    for item in items {
        let k = key(&item);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, group)) => group.push(item),
            None => groups.push((k, vec![item])),
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

/// What jobs submitted together as one array must share: the kind, and the resources (jobs
/// of one kind with a domain's `overrides` ask for others and cannot share one array).
pub(crate) fn batch_key(job: &Job) -> (crate::plan::JobKind, &crate::plan::Resources) {
    (job.kind, &job.resources)
}

/// Ready jobs grouped by [`batch_key`] (see [`group_by_key`]).
fn batches_by_kind(plan: &Plan, ready: &[(usize, u32)]) -> Vec<Vec<(usize, u32)>> {
    group_by_key(ready.iter().copied(), |&(i, _)| batch_key(&plan.jobs[i]))
}

fn done_count(status: &[Status]) -> usize {
    status.iter().filter(|s| **s == Status::Done).count()
}

/// True when nothing runs and every waiting job has a dependency that can never finish.
fn free_jobs_blocked(plan: &Plan, status: &[Status], index: &HashMap<&str, usize>) -> bool {
    plan.jobs
        .iter()
        .zip(status)
        .filter(|(_, s)| **s == Status::Waiting)
        .all(|(j, _)| j.deps.iter().any(|d| index.get(d.as_str()).is_none_or(|&k| status[k] != Status::Done)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Job, JobKind};

    fn job(name: &str, kind: JobKind) -> Job {
        Job::named(name, kind, vec![])
    }

    #[test]
    fn interleaved_kinds_give_each_job_one_batch() {
        use JobKind::*;
        let kinds = [TrainExpert, TrainExpert, Baseline, TrainExpert, Baseline, Eval];
        let plan = Plan {
            run_dir: "run".into(),
            jobs: kinds.iter().enumerate().map(|(i, &k)| job(&format!("j{i}"), k)).collect(),
            format: crate::plan::PLAN_FORMAT,
        };
        let ready: Vec<(usize, u32)> = (0..kinds.len()).map(|i| (i, 0)).collect();
        let batches = batches_by_kind(&plan, &ready);
        let names: Vec<Vec<usize>> = batches.iter().map(|b| b.iter().map(|&(i, _)| i).collect()).collect();
        assert_eq!(names, vec![vec![0, 1, 3], vec![2, 4], vec![5]]);
    }

    #[test]
    fn jobs_of_one_kind_asking_for_other_resources_go_in_their_own_batch() {
        let mut jobs: Vec<Job> = (0..3).map(|i| job(&format!("expert/{i}"), JobKind::TrainExpert)).collect();
        jobs[1].resources.cpus = 8;
        let plan = Plan { run_dir: "run".into(), jobs, format: crate::plan::PLAN_FORMAT };
        let ready: Vec<(usize, u32)> = (0..3).map(|i| (i, 0)).collect();
        let names: Vec<Vec<usize>> = batches_by_kind(&plan, &ready).iter().map(|b| b.iter().map(|&(i, _)| i).collect()).collect();
        assert_eq!(names, vec![vec![0, 2], vec![1]]);
    }

    /// Run `jobs` (each `sh -c` a script that records its GPUs and times) on a local engine
    /// with `gpus` GPUs; each job's line: name, CUDA_VISIBLE_DEVICES, start, end (seconds).
    fn run_on_gpus(jobs: Vec<(&str, usize)>, gpus: usize) -> Vec<(String, Vec<String>, f64, f64)> {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("record.tsv");
        let jobs = jobs
            .into_iter()
            .map(|(name, need)| {
                let mut j = job(name, JobKind::TrainExpert);
                j.resources.gpus = need;
                let script = format!(
                    "s=$(date +%s.%N); sleep 0.4; echo \"{name}\t$CUDA_VISIBLE_DEVICES\t$s\t$(date +%s.%N)\" >> '{}'",
                    record.display()
                );
                j.args = vec!["-c".into(), script];
                j
            })
            .collect();
        let plan = Plan { run_dir: dir.path().join("run"), jobs, format: crate::plan::PLAN_FORMAT };
        let ids = (0..gpus).map(|i| i.to_string()).collect();
        let engine = crate::engine::LocalEngine::new(8, ids).unwrap().with_exe("/bin/sh".into());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(execute(&plan, &engine, 0, true)).unwrap();
        let text = std::fs::read_to_string(&record).unwrap();
        text.lines()
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f[0].to_string(), f[1].split(',').map(String::from).collect(), f[2].parse().unwrap(), f[3].parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn one_gpu_jobs_never_share_a_gpu_and_never_wait_while_one_is_free() {
        let runs = run_on_gpus((0..5).map(|i| (["a", "b", "c", "d", "e"][i], 1)).collect(), 2);
        assert_eq!(runs.len(), 5);
        for (i, a) in runs.iter().enumerate() {
            assert_eq!(a.1.len(), 1, "{} holds one GPU: {:?}", a.0, a.1);
            for b in &runs[i + 1..] {
                let overlap = a.2 < b.3 && b.2 < a.3;
                assert!(!(overlap && a.1 == b.1), "{} and {} shared GPU {:?} at once", a.0, b.0, a.1);
            }
        }
        // Every job started at once, or as soon as another ended (the poll is 50 ms).
        let first = runs.iter().map(|r| r.2).fold(f64::MAX, f64::min);
        for r in &runs {
            let freed = runs.iter().filter(|o| o.3 <= r.2 + 0.01).map(|o| r.2 - o.3).fold(f64::MAX, f64::min);
            assert!(r.2 - first < 0.3 || freed < 0.3, "{} waited {:.2}s with a GPU free", r.0, freed);
        }
        let concurrent_at_start = runs.iter().filter(|r| r.2 - first < 0.3).count();
        assert_eq!(concurrent_at_start, 2, "two GPUs run two jobs at once");
    }

    #[test]
    fn a_two_gpu_job_gets_two_distinct_gpus_and_a_one_gpu_job_takes_the_third() {
        let runs = run_on_gpus(vec![("pair", 2), ("single", 1)], 3);
        let pair = runs.iter().find(|r| r.0 == "pair").unwrap();
        let single = runs.iter().find(|r| r.0 == "single").unwrap();
        assert_eq!(pair.1.len(), 2);
        assert_ne!(pair.1[0], pair.1[1]);
        assert!(!pair.1.contains(&single.1[0]));
        assert!(single.2 < pair.3, "the one-GPU job ran beside the pair");
    }
}
