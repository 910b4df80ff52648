//! `btm run`, `btm status`, `btm report`: carry out a pipeline, show where a run stands, and
//! (re)write its report.

use crate::engine::kubernetes::KubernetesEngine;
use crate::engine::slurm::SlurmEngine;
use crate::engine::{Engine, LocalEngine};
use crate::pipeline::spec::EngineSpec;
use crate::plan::{Job, Plan};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct RunArgs {
    /// The pipeline YAML.
    pub pipeline: PathBuf,
    /// Where the run lives (default: `<storage>/<name>` from the pipeline).
    #[arg(long)]
    pub run_dir: Option<String>,
    /// Override a value: `--set experts.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print the job plan (every job, its inputs, outputs and resources) and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
}

/// A run's location: a local folder (from a path or `file://` URL), or an object-store URL
/// kept as it is (`s3://bucket/runs`, joined like a path).
fn run_location(location: &str) -> Result<PathBuf> {
    if let Some(p) = location.strip_prefix("file://") {
        return Ok(PathBuf::from(p));
    }
    if location.contains("://") && !btm_model::folder::is_remote(location) {
        bail!("run storage `{location}`: not a path or an object-store URL");
    }
    Ok(PathBuf::from(location.trim_end_matches('/')))
}

fn print_plan(plan: &Plan, engine: &EngineSpec) {
    println!("run folder: {}", plan.run_dir.display());
    let placed = match engine {
        EngineSpec::Local { slots, gpus, .. } => Some(simulate_gpu_placement(plan, *slots, &local_gpu_ids(plan, *gpus))),
        _ => None,
    };
    for (i, j) in plan.jobs.iter().enumerate() {
        println!("{} [{}] ({:?})", j.name, j.id, j.kind);
        if let Some(t) = &j.train {
            let visible = match placed.as_ref().and_then(|p| p[i].as_ref()) {
                Some(ids) => format!(", CUDA_VISIBLE_DEVICES={}", crate::engine::gpus::visible_devices(ids)),
                None if j.resources.gpus > 0 => format!(", {} GPU(s) per task, placed by the cluster", j.resources.gpus),
                None => String::new(),
            };
            println!("  device:  {} {}{visible}", t.device, t.dtype);
        }
        if !j.deps.is_empty() {
            println!("  after:   {}", j.deps.join(", "));
        }
        match j.resources.ranks {
            0 | 1 => println!("  command: btm {}", j.args.join(" ")),
            n => println!("  command: {} btm {}", launch_line(engine, n), j.args.join(" ")),
        }
        if j.resources.nodes > 1 {
            println!("  nodes:   {} (one task per node, each a torchrun meeting at the rendezvous on the first)", j.resources.nodes);
        }
        if let Some(external) = j.train.as_ref().and_then(|t| t.external.as_ref()) {
            println!("  trainer: {external}");
        }
        for o in &j.outputs {
            println!("  output:  {}", o.display());
        }
        let cpus = match j.resources.cpus {
            0 => "the machine's cores shared with the running jobs".to_string(),
            n => format!("{n} cpu(s)"),
        };
        let memory = j.resources.memory_mb.map_or(String::new(), |m| format!(", {m} MiB"));
        let time = j.resources.time_limit_min.map_or(String::new(), |t| format!(", {t} min"));
        println!("  resources: {cpus}, {} gpu(s){memory}{time}", j.resources.gpus);
    }
}

/// The local engine's GPU ids for `plan`: none when no job asks for a GPU, so a CPU-only run
/// never looks for GPUs.
fn local_gpu_ids(plan: &Plan, gpus: crate::pipeline::spec::Gpus) -> Vec<String> {
    if plan.jobs.iter().all(|j| j.resources.gpus == 0) {
        return vec![];
    }
    crate::engine::gpus::pool_ids(gpus, std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(), crate::engine::gpus::machine_gpus)
}

/// The GPUs each job would hold on the local engine (`None`: none), if jobs that start
/// together also end together: the executor's rule (plan order, `slots` jobs at a time, a
/// job only when enough GPUs are free, the lowest free ones) stepped one wave at a time.
fn simulate_gpu_placement(plan: &Plan, slots: usize, ids: &[String]) -> Vec<Option<Vec<String>>> {
    let mut placed: Vec<Option<Vec<String>>> = vec![None; plan.jobs.len()];
    let mut done = vec![false; plan.jobs.len()];
    let index: std::collections::HashMap<&str, usize> = plan.jobs.iter().enumerate().map(|(i, j)| (j.name.as_str(), i)).collect();
    while done.iter().any(|d| !d) {
        let mut pool = crate::engine::gpus::GpuPool::new(ids.to_vec());
        let mut wave = vec![];
        for (i, j) in plan.jobs.iter().enumerate() {
            let ready = !done[i] && j.deps.iter().all(|d| index.get(d.as_str()).is_none_or(|&k| done[k]));
            if !ready || wave.len() >= slots.max(1) {
                continue;
            }
            let need = j.resources.gpus_held();
            if need == 0 {
                wave.push(i);
            } else if let Some(taken) = pool.take(need) {
                placed[i] = Some(taken);
                wave.push(i);
            } else if need > ids.len() {
                // It can never start; `btm run` refuses the run before any job does.
                wave.push(i);
            }
        }
        if wave.is_empty() {
            break;
        }
        for i in wave {
            done[i] = true;
        }
    }
    placed
}

/// Stop before any job starts when jobs train on CUDA and this machine cannot: the error
/// names what is missing (the driver, libcuda, a GPU, CUDA in this btm).
fn check_local_gpus(plan: &Plan, gpus: crate::pipeline::spec::Gpus, ids: &[String]) -> Result<()> {
    let on_cuda: Vec<&Job> =
        plan.jobs.iter().filter(|j| j.train.as_ref().is_some_and(|t| t.device == btm_trainer::device::Device::Cuda)).collect();
    if on_cuda.is_empty() {
        return Ok(());
    }
    let most = plan.jobs.iter().map(|j| j.resources.gpus_held()).max().unwrap_or(0);
    let btm_trains = on_cuda.iter().any(|j| j.train.as_ref().is_some_and(|t| t.external.is_none()));
    let asked = match gpus {
        crate::pipeline::spec::Gpus::Count(n) => Some(n),
        crate::pipeline::spec::Gpus::Auto => None,
    };
    let missing = crate::engine::gpus::Probe::of_this_machine().missing(ids, asked, most, btm_trains);
    if !missing.is_empty() {
        bail!(
            "{} jobs train on CUDA ({}…), but this machine cannot run them; missing:\n  - {}",
            on_cuda.len(),
            on_cuda[0].name,
            missing.join("\n  - ")
        );
    }
    Ok(())
}

/// How the engine starts the `ranks` processes of a multi-process job.
fn launch_line(engine: &EngineSpec, ranks: usize) -> String {
    match engine {
        EngineSpec::Local { .. } => crate::engine::local_mpi_launch(ranks).join(" "),
        EngineSpec::Slurm { mpi, .. } => {
            format!("sbatch --ntasks={ranks} … srun --kill-on-bad-exit=1{}", mpi.as_ref().map_or(String::new(), |m| format!(" --mpi={m}")))
        }
        EngineSpec::Kubernetes(_) => format!("{ranks} pods of the Indexed Job, meeting over the TCP collective"),
        // Refused at validation: a Ray job is one process.
        EngineSpec::Ray(_) => format!("{ranks} ranks (not on Ray)"),
    }
}

/// The Indexed Jobs `btm run` would create: one per batch of jobs of one kind with the same
/// dependencies (the executor submits such jobs together when they become ready).
fn print_manifests(k: &crate::pipeline::spec::KubernetesSpec, plan: &Plan) -> Result<()> {
    // The executor batches the jobs that are ready at one moment by `batch_key` alone; the dry
    // run sees the whole plan at once, so it adds the dependencies: only jobs with the same
    // dependencies become ready together, and so share one array.
    let batches = crate::executor::group_by_key(&plan.jobs, |j| (crate::executor::batch_key(j), &j.deps));
    let run_name = plan.run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for batch in batches {
        let subs: Vec<crate::engine::Submission> =
            batch.iter().map(|j| crate::engine::Submission::for_job(j, j.log(&plan.run_dir))).collect();
        let stage = batch[0].stage();
        let name = crate::engine::kubernetes::object_name(&run_name, stage);
        let m = crate::engine::kubernetes::manifest(k, &plan.run_dir, &name, &subs);
        println!("---\n{}", serde_yaml::to_string(&m)?);
        if crate::engine::kubernetes::pods_per_job(&subs[0]) > 1 {
            // Its owner reference to the Job is added when the Job exists.
            println!("---\n{}", serde_yaml::to_string(&crate::engine::kubernetes::headless_service(k, &name, None))?);
        }
    }
    Ok(())
}

pub fn run(args: RunArgs) -> Result<()> {
    let loaded = crate::pipeline::load(&args.pipeline, &args.sets).map_err(anyhow::Error::new)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let p = &loaded.pipeline;
    let run_dir = match &args.run_dir {
        Some(d) => run_location(d)?,
        None => run_location(&p.storage)?.join(&p.name),
    };
    let mut plan = crate::plan::plan(p, &loaded.base_dir, &run_dir)?;
    let run = crate::executor::folder(&plan.run_dir)?;
    if !args.dry_run && run.is_remote() {
        // Fail now, naming the URL, if the store cannot be reached or the bucket is missing.
        run.list("jobs").with_context(|| format!("run storage `{}`: cannot use the object store", run.location()))?;
    }
    crate::inputs::upload(&mut plan, !args.dry_run)?;
    if args.dry_run {
        print_plan(&plan, &p.engine);
        if let EngineSpec::Kubernetes(k) = &p.engine {
            print_manifests(k, &plan)?;
        }
        return Ok(());
    }
    // A run that cannot train on this machine's GPUs stops before it writes anything.
    let local_gpus = match &p.engine {
        EngineSpec::Local { gpus, .. } => {
            let ids = local_gpu_ids(&plan, *gpus);
            check_local_gpus(&plan, *gpus, &ids)?;
            ids
        }
        _ => vec![],
    };
    run.ensure_dir("").with_context(|| format!("creating {}", plan.run_dir.display()))?;
    // Logs and engine scripts stay on this machine (in the run folder when it is local); the
    // lock guards against a second `btm run` of this run from this machine.
    let local = crate::executor::local_root(&plan.run_dir);
    std::fs::create_dir_all(&local).with_context(|| format!("creating {}", local.display()))?;
    let _lock = RunLock::take(&local)?;
    let redone = redone_by_an_older_plan(&run, &plan)?;
    if !redone.is_empty() {
        eprintln!(
            "note: {} was planned by an older btm, whose jobs this one writes differently; {} finished job(s) will run again: {}",
            plan.run_dir.display(),
            redone.len(),
            redone.join(", ")
        );
    }
    run.write("pipeline.yaml", loaded.resolved_yaml.as_bytes())?;
    run.write("plan.json", &serde_json::to_vec_pretty(&plan)?)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let engine: Box<dyn Engine> = match &p.engine {
        EngineSpec::Local { slots, .. } => Box::new(LocalEngine::new(*slots, local_gpus)?),
        spec @ EngineSpec::Slurm { .. } => Box::new(SlurmEngine::new(spec, &local)?),
        EngineSpec::Kubernetes(k) => {
            let config = runtime.block_on(crate::engine::kubernetes::discover())?;
            // The client's connection pool runs on the executor's runtime.
            let _in_runtime = runtime.enter();
            Box::new(KubernetesEngine::new(k, &plan.run_dir, config)?)
        }
        // Connected on the executor's runtime, which then runs its client's connections.
        EngineSpec::Ray(r) => Box::new(runtime.block_on(crate::engine::ray::RayEngine::connect(r, &plan.run_dir))?),
    };
    let start = std::time::Instant::now();
    let summary = runtime.block_on(crate::executor::execute(&plan, engine.as_ref(), p.engine.retries(), args.quiet))?;
    let written = crate::report::write(&plan.run_dir)?;
    if summary.ran.is_empty() {
        println!("nothing to do: all {} jobs were already done", plan.jobs.len());
    } else {
        let wall = start.elapsed().as_secs_f64();
        let critical = critical_path_seconds(&plan, &summary.ran);
        println!(
            "ran {} jobs in {wall:.1}s; the longest chain of jobs took {critical:.1}s, the other {:.1}s were jobs \
             waiting for one of the {} slots, and orchestration (`btm bench orchestrate` measures that alone)",
            summary.ran.len(),
            wall - critical,
            engine.slots()
        );
    }
    println!("{}", written.table);
    print_story(&plan, &written);
    println!(
        "report: {} (and report.html, with the plots: loss and validation curves, the arms per domain, routing heatmaps)",
        plan.run_dir.join("report.md").display()
    );
    Ok(())
}

/// After the table: the compute-matched comparison of the arms, and what the run shows at its
/// size: where the seed's parameters sit (what the experts keep apart and what a merge
/// averages) and how the best BTM-family arm did against dense.
fn print_story(plan: &Plan, written: &crate::report::Written) {
    let Some(arms) = &written.arms else { return };
    println!(
        "\nArms: average perplexity over the domains (dense = the baseline trained on as many tokens as the experts \
         and the merged MoE together; negative = better than dense), training FLOPs after the seed, and parameters \
         active per token (an ensemble runs every member):\n{arms}"
    );
    let seed = plan.jobs.iter().filter_map(|j| j.produces.as_ref()).find(|m| m.label == "seed").map(|m| m.dir.clone());
    let Some(cfg) = seed.and_then(|d| btm_model::Checkpoint::open(d).ok()).map(|c| c.config) else { return };
    let n = cfg.num_parameters() as f64;
    let share = |part: &dyn Fn(&str) -> bool| -> f64 {
        let tensors = btm_model::weights::expected_tensors(&cfg);
        tensors.iter().filter(|t| part(&t.name)).map(|t| t.shape.iter().product::<usize>()).sum::<usize>() as f64 / n * 100.0
    };
    let ffn = share(&|name| name.contains(".mlp."));
    let embeddings = share(&|name| name == "model.embed_tokens.weight" || name == "lm_head.weight");
    let mut story = format!(
        "The seed has {:.1}M parameters: {ffn:.0} % in the FFNs, which the experts keep apart in an MoE, {embeddings:.0} % in the \
         embeddings and LM head, which a merge averages.",
        n / 1e6
    );
    if let Some((arm, rel)) = &written.best_btm_arm {
        story.push_str(&format!(" The best BTM arm here is {arm}, at {rel:+.1} % against dense."));
        if embeddings > ffn && *rel > -3.0 {
            story.push_str(
                " With most of each expert's parameters outside the FFNs, merging averages most of what the experts learned away.",
            );
        }
    }
    story.push_str(" docs/experiments.md measures the arms at two sizes and explains what they show.");
    println!("{story}");
}

/// The longest chain of job durations through the DAG (jobs skipped this time count 0): the
/// wall time a perfect orchestrator with enough slots would need.
fn critical_path_seconds(plan: &Plan, ran: &[String]) -> f64 {
    let mut finish: std::collections::HashMap<&str, f64> = Default::default();
    for j in &plan.jobs {
        // Plan order is topological: dependencies come first.
        let secs = Some(j).filter(|j| ran.contains(&j.name)).and_then(|j| crate::executor::job_seconds(&plan.run_dir, j)).unwrap_or(0.0);
        let ready = j.deps.iter().filter_map(|d| finish.get(d.as_str())).fold(0.0f64, |a, &b| a.max(b));
        finish.insert(&j.name, ready + secs);
    }
    finish.values().fold(0.0, |a, &b| a.max(b))
}

/// One orchestrator per run at a time.
struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    fn take(run: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(run.join(".lock"))?;
        // SAFETY: flock on a file descriptor we own; released when the file closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!("{} is in use by another `btm run`", run.display());
        }
        Ok(RunLock { _file: file })
    }
}

#[derive(Args)]
pub struct RunDirArgs {
    /// The run folder (a path or an object-store URL), or the pipeline file, whose run folder
    /// is then the one `btm run` gives it by default (`<storage>/<name>`).
    pub run: PathBuf,
    /// Everything, however wide the run: `btm status` lists every job (by default a run of
    /// more than 40 jobs is summarised: counts per stage, the started jobs, the next pending
    /// ones); `btm report` prints the whole perplexity table (by default summarised above 12
    /// domains; the whole table is always in `perplexity.csv`).
    #[arg(long)]
    pub all: bool,
}

impl RunDirArgs {
    /// The run folder: as given, or a pipeline file's default one.
    fn folder(&self) -> Result<PathBuf> {
        if !self.run.is_file() {
            return Ok(self.run.clone());
        }
        let loaded = crate::pipeline::load(&self.run, &[]).map_err(anyhow::Error::new)?;
        let p = &loaded.pipeline;
        Ok(run_location(&p.storage)?.join(&p.name))
    }
}

fn last_metrics(run: &Path, job: &Job) -> Option<Value> {
    let bytes = crate::executor::folder(run).ok()?.read(&job.train.as_ref()?.metrics).ok()??;
    let text = String::from_utf8_lossy(&bytes);
    text.lines().rev().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|v| v.get("loss").is_some())
}

/// The last `error:` line a job printed (btm's own, or an external trainer's), from its log
/// in the run (a finished job's) or on this machine (a running one's).
fn last_error(run: &Path, job: &Job) -> Option<String> {
    let in_run = crate::executor::folder(run).ok()?.read(job.log(run)).ok().flatten();
    let bytes = in_run.or_else(|| std::fs::read(job.log(&crate::executor::local_root(run))).ok())?;
    let text = String::from_utf8_lossy(&bytes);
    text.lines().rev().map(str::trim).find(|l| l.to_ascii_lowercase().starts_with("error")).map(|l| l.chars().take(300).collect())
}

/// The engine's own id of a job (`ray job btm-…`), from the `engine.json` its engine wrote.
fn engine_job(run: &Path, job: &Job) -> Option<String> {
    let bytes = crate::executor::folder(run).ok()?.read_capped(job.dir(run).join("engine.json"), crate::executor::MARKER_LIMIT).ok()??;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    Some(format!("{} job {}", v["engine"].as_str()?, v["job"].as_str()?))
}

/// Where a job stands, from the markers in its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobState {
    Done,
    /// Started and not done: running, or ended without its outputs.
    Started,
    Pending,
}

impl JobState {
    fn word(self) -> &'static str {
        match self {
            JobState::Done => "done",
            JobState::Started => "started",
            JobState::Pending => "pending",
        }
    }
}

/// Jobs up to which `btm status` lists every one; past it, a summary (see [`status_summary`]).
const STATUS_LIST_JOBS: usize = 40;
/// Started jobs a summary lists (running or failed: the ones to look at) before eliding.
const STATUS_STARTED_SHOWN: usize = 20;
/// Pending jobs a summary lists (those next to start first) before eliding.
const STATUS_PENDING_SHOWN: usize = 10;

/// A job's status line: name, state, training progress, engine id, last error, dependencies.
fn status_line(run: &Path, j: &Job, state: JobState, width: usize) -> String {
    let mut line = format!("{:<width$} {:<8}", j.name, state.word());
    if let (Some(t), Some(m)) = (&j.train, last_metrics(run, j)) {
        let step = m["step"].as_u64().unwrap_or(0);
        line.push_str(&format!(" step {step}/{}", t.steps));
        if let Some(loss) = m["loss"].as_f64() {
            line.push_str(&format!(" loss {loss:.3}"));
        }
        if state != JobState::Done {
            if let Some(tps) = m["tokens_per_s"].as_f64().filter(|t| *t > 0.0) {
                let left = t.tokens.saturating_sub(m["tokens_seen"].as_u64().unwrap_or(0)) as f64 / tps;
                line.push_str(&format!(" ETA {left:.0}s"));
            }
        }
    }
    if let Some(id) = engine_job(run, j) {
        line.push_str(&format!(" [{id}]"));
    }
    if state == JobState::Started {
        if let Some(error) = last_error(run, j) {
            line.push_str(&format!(" — {error}"));
        }
    }
    if !j.deps.is_empty() && state == JobState::Pending {
        line.push_str(&format!(" (after {})", j.deps.join(", ")));
    }
    line
}

/// A job's stage: its name up to the first `/` (`expert/code` → `expert`).
fn stage(name: &str) -> &str {
    name.split('/').next().unwrap_or(name)
}

/// The status of a wide run in a bounded number of lines: a table of jobs per stage and state,
/// every started job (up to [`STATUS_STARTED_SHOWN`]), the pending jobs next to start (those
/// whose dependencies are done first, up to [`STATUS_PENDING_SHOWN`]), each list ending in
/// `… N more` when cut. `line` renders one job (it reads that job's metrics and log, so only
/// the jobs shown are read).
fn status_summary(jobs: &[Job], states: &[JobState], mut line: impl FnMut(&Job, JobState) -> String) -> Vec<String> {
    let mut stages: Vec<(&str, [usize; 3])> = vec![];
    for (j, s) in jobs.iter().zip(states) {
        let at = match stages.iter().position(|(name, _)| *name == stage(&j.name)) {
            Some(i) => i,
            None => {
                stages.push((stage(&j.name), [0; 3]));
                stages.len() - 1
            }
        };
        stages[at].1[*s as usize] += 1;
    }
    let width = stages.iter().map(|(n, _)| n.len()).max().unwrap_or(0).max("stage".len());
    let mut out = vec![
        format!("{} jobs in {} stages (btm status --all lists every job):", jobs.len(), stages.len()),
        format!("  {:<width$} {:>7} {:>7} {:>7} {:>7}", "stage", "jobs", "done", "started", "pending"),
    ];
    for (name, [done, started, pending]) in &stages {
        out.push(format!("  {name:<width$} {:>7} {done:>7} {started:>7} {pending:>7}", done + started + pending));
    }
    let mut list = |title: &str, picked: Vec<usize>, shown: usize, state: JobState| {
        if picked.is_empty() {
            return;
        }
        out.push(format!("{title} ({}):", picked.len()));
        for &i in picked.iter().take(shown) {
            out.push(format!("  {}", line(&jobs[i], state)));
        }
        if picked.len() > shown {
            out.push(format!("  … {} more", picked.len() - shown));
        }
    };
    let of = |want: JobState| (0..jobs.len()).filter(|&i| states[i] == want).collect::<Vec<_>>();
    list("started", of(JobState::Started), STATUS_STARTED_SHOWN, JobState::Started);
    let done: std::collections::HashSet<&str> =
        jobs.iter().zip(states).filter(|(_, s)| **s == JobState::Done).map(|(j, _)| j.name.as_str()).collect();
    let mut pending = of(JobState::Pending);
    // Stable: plan order among the ready ones, then among the waiting ones.
    pending.sort_by_key(|&i| !jobs[i].deps.iter().all(|d| done.contains(d.as_str())));
    list("pending, next to start first", pending, STATUS_PENDING_SHOWN, JobState::Pending);
    out
}

pub fn status(args: RunDirArgs) -> Result<()> {
    let plan = crate::report::read_plan(&args.folder()?)?;
    let run = crate::executor::folder(&plan.run_dir)?;
    let mut states = Vec::with_capacity(plan.jobs.len());
    for j in &plan.jobs {
        states.push(if crate::executor::is_done(&plan.run_dir, j) {
            JobState::Done
        } else if run.exists(j.dir(&plan.run_dir).join("started.json"))? {
            JobState::Started
        } else {
            JobState::Pending
        });
    }
    let done = states.iter().filter(|s| **s == JobState::Done).count();
    if args.all || plan.jobs.len() <= STATUS_LIST_JOBS {
        let width = plan.jobs.iter().map(|j| j.name.len()).max().unwrap_or(0);
        for (j, state) in plan.jobs.iter().zip(&states) {
            println!("{}", status_line(&plan.run_dir, j, *state, width));
        }
    } else {
        // Only the jobs listed are padded to one another.
        let width = plan.jobs.iter().zip(&states).filter(|(_, s)| **s != JobState::Done).map(|(j, _)| j.name.len()).max().unwrap_or(0);
        let width = width.min(40);
        for l in status_summary(&plan.jobs, &states, |j, s| status_line(&plan.run_dir, j, s, width)) {
            println!("{l}");
        }
    }
    println!("{done}/{} jobs done", plan.jobs.len());
    Ok(())
}

pub fn report(args: RunDirArgs) -> Result<()> {
    let run = args.folder()?;
    let written = crate::report::write(&run)?;
    if args.all {
        println!("{}", crate::report::table(&crate::report::rows(&crate::report::read_plan(&run)?)));
    } else {
        println!("{}", written.table);
    }
    println!("report: {}", run.join("report.md").display());
    Ok(())
}

/// The jobs a run folder holds as finished that `plan` will run again because the folder was
/// planned by an older btm (a lower [`crate::plan::PLAN_FORMAT`]): every job's id changed
/// with the format. Empty for a new run or one planned by this btm.
fn redone_by_an_older_plan(run: &btm_model::folder::Folder, plan: &crate::plan::Plan) -> Result<Vec<String>> {
    let Some(bytes) = run.read_capped("plan.json", crate::executor::PLAN_LIMIT)? else { return Ok(vec![]) };
    let format = serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|v| v["format"].as_u64()).unwrap_or(0);
    if format >= crate::plan::PLAN_FORMAT as u64 {
        return Ok(vec![]);
    }
    let finished = |j: &&crate::plan::Job| run.exists(crate::executor::done_marker(&plan.run_dir, j)).unwrap_or(false);
    Ok(plan.jobs.iter().filter(finished).filter(|j| !crate::executor::is_done(&plan.run_dir, j)).map(|j| j.name.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::JobKind;

    /// A run planned before job specs: its finished jobs are named as redone; once this btm
    /// has planned it, nothing is.
    #[test]
    fn a_run_planned_by_an_older_btm_names_the_jobs_it_redoes() {
        let dir = tempfile::tempdir().unwrap();
        let job = |name: &str| crate::plan::Job { id: format!("{name}-new"), ..crate::plan::Job::named(name, JobKind::Eval, vec![]) };
        let plan = crate::plan::Plan {
            run_dir: dir.path().to_path_buf(),
            jobs: vec![job("done"), job("never-ran")],
            format: crate::plan::PLAN_FORMAT,
        };
        let run = crate::executor::folder(dir.path()).unwrap();
        assert!(redone_by_an_older_plan(&run, &plan).unwrap().is_empty(), "a new run");
        run.write("plan.json", br#"{"run_dir": "x", "jobs": []}"#).unwrap();
        run.write("jobs/done/done.json", br#"{"id": "done-old"}"#).unwrap();
        assert_eq!(redone_by_an_older_plan(&run, &plan).unwrap(), vec!["done"]);
        run.write("plan.json", &serde_json::to_vec(&plan).unwrap()).unwrap();
        assert!(redone_by_an_older_plan(&run, &plan).unwrap().is_empty(), "planned by this btm");
    }

    /// The status of a run of 1,024 domains (2,052 jobs) fits in a screen or two whatever the
    /// jobs' states: counts per stage, the started jobs, the next pending ones, `… N more`.
    #[test]
    fn the_status_of_a_wide_run_stays_under_a_line_bound() {
        let job = |name: String, deps: Vec<String>| Job::named(&name, JobKind::Eval, deps);
        let n = 1024;
        let mut jobs = vec![job("tokenizer".into(), vec![]), job("seed".into(), vec!["tokenizer".into()])];
        jobs.extend((0..n).map(|i| job(format!("expert/d{i}"), vec!["seed".into()])));
        jobs.push(job("merge".into(), (0..n).map(|i| format!("expert/d{i}")).collect()));
        jobs.extend((0..n).map(|i| job(format!("eval/expert-d{i}"), vec![format!("expert/d{i}")])));
        jobs.push(job("eval/merged".into(), vec!["merge".into()]));
        let bound = 12 + STATUS_STARTED_SHOWN + STATUS_PENDING_SHOWN;
        // Half the experts done and evaluated, 30 experts started, the rest pending.
        let domain = |name: &str| name.rsplit_once("/d").or_else(|| name.rsplit_once("-d")).and_then(|(_, i)| i.parse::<usize>().ok());
        let states: Vec<JobState> = jobs
            .iter()
            .map(|j| match (j.name.as_str(), domain(&j.name)) {
                ("tokenizer" | "seed", _) => JobState::Done,
                (_, Some(d)) if d < n / 2 => JobState::Done,
                (name, Some(d)) if name.starts_with("expert/") && d < n / 2 + 30 => JobState::Started,
                _ => JobState::Pending,
            })
            .collect();
        let lines = status_summary(&jobs, &states, |j, s| format!("{} {}", j.name, s.word()));
        let text = lines.join("\n");
        assert!(lines.len() <= bound, "{} lines:\n{text}", lines.len());
        assert!(text.contains(&format!("{} jobs in 5 stages", jobs.len())), "{text}");
        let expert = format!("  {:<9} {:>7} {:>7} {:>7} {:>7}", "expert", n, n / 2, 30, n / 2 - 30);
        assert!(lines.contains(&expert), "{text}");
        assert!(text.contains("started (30):") && text.contains("expert/d512 started") && text.contains("  … 10 more"), "{text}");
        // The ready ones first: the experts not started (their seed is done), before the evals
        // and the merge that wait on experts.
        assert!(text.contains("pending, next to start first") && text.contains("  expert/d542 pending"), "{text}");
        assert!(text.contains(&format!("  … {} more", (n / 2 - 30) + (n / 2) + 2 - STATUS_PENDING_SHOWN)), "{text}");
        // Every state alike: still bounded.
        for all in [JobState::Done, JobState::Started, JobState::Pending] {
            let lines = status_summary(&jobs, &vec![all; jobs.len()], |j, s| format!("{} {}", j.name, s.word()));
            assert!(lines.len() <= bound, "{all:?}: {} lines", lines.len());
        }
    }

    #[test]
    fn status_shows_a_jobs_last_error_line() {
        let run = tempfile::tempdir().unwrap();
        let job = Job { id: "x".into(), resumable: true, ..Job::named("expert/a", JobKind::TrainExpert, vec![]) };
        assert_eq!(last_error(run.path(), &job), None);
        std::fs::create_dir_all(run.path().join("logs")).unwrap();
        let log = "step 1 loss 5.0\nerror: device: cuda: cannot load libcuda.so.1 (the NVIDIA driver)\nretrying\n";
        std::fs::write(job.log(run.path()), log).unwrap();
        assert_eq!(last_error(run.path(), &job).as_deref(), Some("error: device: cuda: cannot load libcuda.so.1 (the NVIDIA driver)"));
    }
}
