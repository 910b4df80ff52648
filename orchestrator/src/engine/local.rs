//! The local engine: jobs are child processes of `btm run`, `slots` at a time, each holding
//! whole GPUs of the engine's pool through `CUDA_VISIBLE_DEVICES`.

use super::gpus::GpuPool;
use super::{Engine, JobHandle, JobState, Submission};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

/// Child processes of this process, `slots` at a time.
pub struct LocalEngine {
    slots: usize,
    exe: PathBuf,
    children: Mutex<HashMap<JobHandle, Child>>,
    gpus: Mutex<GpuPool>,
    /// The GPUs each running job holds.
    held: Mutex<HashMap<JobHandle, Vec<String>>>,
}

impl LocalEngine {
    /// `slots` jobs at a time, sharing the GPUs `gpu_ids` (`CUDA_VISIBLE_DEVICES` ids).
    pub fn new(slots: usize, gpu_ids: Vec<String>) -> Result<Self> {
        Ok(Self {
            slots: slots.max(1),
            exe: std::env::current_exe().context("locating the btm binary")?,
            children: Mutex::new(HashMap::new()),
            gpus: Mutex::new(GpuPool::new(gpu_ids)),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Run `exe` instead of this binary (tests run their own programs as jobs).
    #[cfg(test)]
    pub fn with_exe(mut self, exe: PathBuf) -> Self {
        self.exe = exe;
        self
    }
}

#[async_trait::async_trait]
impl Engine for LocalEngine {
    fn slots(&self) -> usize {
        self.slots
    }

    fn gpus(&self) -> Option<usize> {
        Some(self.gpus.lock().expect("lock").len())
    }

    async fn submit(&self, jobs: &[Submission]) -> Result<Vec<JobHandle>> {
        // Jobs without a thread count share the cores with everything running once these
        // start: the lone seed trainer gets the whole machine, four concurrent experts a
        // quarter each (at least one thread).
        let live = self.children.lock().expect("lock").len() + jobs.len();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let share = (cores / live.max(1)).max(1);
        jobs.iter().map(|j| self.spawn(j, if j.cpus == 0 { share } else { j.cpus })).collect()
    }

    async fn state(&self, handle: &JobHandle) -> Result<JobState> {
        self.poll(handle)
    }

    async fn cancel(&self, handle: &JobHandle) -> Result<()> {
        let pid: i32 = handle.0.parse().context("local job handle")?;
        // SAFETY: sending a signal to a child process we started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        Ok(())
    }
}

/// Set on every local job to its log's path (unique to the job on this machine); the job's
/// processes and whatever they start inherit it.
const JOB_MARK: &str = "BTM_LOCAL_JOB";

/// Processes other than this one carrying `mark` (see [`JOB_MARK`]); zombies and other users'
/// processes are not read.
fn leftovers(mark: &str) -> Vec<i32> {
    let want = format!("{JOB_MARK}={mark}");
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == want.as_bytes())))
        .collect()
}

/// Stop what an earlier attempt of this job left running before the next one starts. The
/// job's own process dies with its parent (`PR_SET_PDEATHSIG`), but the processes it started
/// need not: an external trainer's command under `sh -c` outlives a killed orchestrator and
/// would write into the folders the new attempt uses. SIGTERM first (a trainer may
/// checkpoint), then SIGKILL.
fn stop_leftovers(job: &str, mark: &str) -> Result<()> {
    let gone = |signal: libc::c_int, wait: std::time::Duration| {
        for pid in leftovers(mark) {
            // SAFETY: signalling a process of an earlier attempt of this job (it carries the mark).
            unsafe { libc::kill(pid, signal) };
        }
        let until = std::time::Instant::now() + wait;
        while !leftovers(mark).is_empty() {
            if std::time::Instant::now() > until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        true
    };
    if leftovers(mark).is_empty() {
        return Ok(());
    }
    eprintln!("{job}: stopping processes an earlier attempt left running: {:?}", leftovers(mark));
    if gone(libc::SIGTERM, std::time::Duration::from_secs(10)) || gone(libc::SIGKILL, std::time::Duration::from_secs(5)) {
        return Ok(());
    }
    anyhow::bail!("{job}: processes of an earlier attempt do not exit: {:?}", leftovers(mark))
}

impl LocalEngine {
    fn spawn(&self, job: &Submission, threads: usize) -> Result<JobHandle> {
        if let Some(dir) = job.log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mark = job.log.to_string_lossy().into_owned();
        stop_leftovers(&job.name, &mark)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&job.log)
            .with_context(|| format!("opening {}", job.log.display()))?;
        // A multi-process job: its ranks under mpirun, sharing the job's threads.
        let mut command = if job.ranks > 1 {
            let launch = super::local_mpi_launch(job.ranks);
            let mut c = Command::new(&launch[0]);
            c.args(&launch[1..]).arg(&self.exe);
            c
        } else {
            Command::new(&self.exe)
        };
        let threads = if job.ranks > 1 { (threads / job.ranks).max(1) } else { threads };
        command
            .args(&job.args)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env(JOB_MARK, &mark)
            // Its own process group: a Ctrl-C in the terminal reaches the orchestrator, which
            // then stops the children in order (SIGTERM → checkpoint → exit).
            .process_group(0);
        // SAFETY: prctl is async-signal-safe. If the orchestrator dies (even by SIGKILL), its
        // jobs die with it, so a later `btm run` never races an orphan for the same outputs;
        // trainers resume from their last checkpoint.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let gpus = self.place_on_gpus(job, &mut command)?;
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                self.gpus.lock().expect("lock").give_back(&gpus);
                return Err(e).with_context(|| format!("starting {}", job.name));
            }
        };
        let handle = JobHandle(child.id().to_string());
        self.children.lock().expect("lock").insert(handle.clone(), child);
        self.held.lock().expect("lock").insert(handle.clone(), gpus);
        Ok(handle)
    }

    /// Give `job` the free GPUs it asks for through `CUDA_VISIBLE_DEVICES` (the executor
    /// starts a job only when enough are free). A job that asks for none sees none when the
    /// engine has GPUs, so it cannot take one a GPU job holds.
    fn place_on_gpus(&self, job: &Submission, command: &mut Command) -> Result<Vec<String>> {
        let mut pool = self.gpus.lock().expect("lock");
        if pool.is_empty() {
            anyhow::ensure!(
                job.gpus_held() == 0,
                "{} asks for {} GPUs; the local engine has none (engine.gpus)",
                job.name,
                job.gpus_held()
            );
            return Ok(vec![]);
        }
        let Some(ids) = pool.take(job.gpus_held()) else {
            anyhow::bail!("{} asks for {} GPUs; {} of the engine's {} are free", job.name, job.gpus_held(), pool.free(), pool.len());
        };
        command.env("CUDA_VISIBLE_DEVICES", super::gpus::visible_devices(&ids));
        Ok(ids)
    }

    fn poll(&self, handle: &JobHandle) -> Result<JobState> {
        let mut children = self.children.lock().expect("lock");
        let Some(child) = children.get_mut(handle) else {
            return Ok(JobState::Failed("unknown job".into()));
        };
        Ok(match child.try_wait()? {
            None => JobState::Running,
            Some(status) => {
                children.remove(handle);
                if let Some(ids) = self.held.lock().expect("lock").remove(handle) {
                    self.gpus.lock().expect("lock").give_back(&ids);
                }
                if status.success() {
                    JobState::Succeeded
                } else {
                    use std::os::unix::process::ExitStatusExt;
                    JobState::Failed(match (status.code(), status.signal()) {
                        (Some(c), _) => format!("exit code {c}"),
                        (None, Some(s)) => format!("killed by signal {s}"),
                        _ => "failed".into(),
                    })
                }
            }
        })
    }
}
