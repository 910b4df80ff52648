//! The local engine: jobs are child processes of `btm run`, `slots` at a time.

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
}

impl LocalEngine {
    pub fn new(slots: usize) -> Result<Self> {
        Ok(Self {
            slots: slots.max(1),
            exe: std::env::current_exe().context("locating the btm binary")?,
            children: Mutex::new(HashMap::new()),
        })
    }
}

#[async_trait::async_trait]
impl Engine for LocalEngine {
    fn slots(&self) -> usize {
        self.slots
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

impl LocalEngine {
    fn spawn(&self, job: &Submission, threads: usize) -> Result<JobHandle> {
        if let Some(dir) = job.log.parent() {
            std::fs::create_dir_all(dir)?;
        }
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
        let child = command.spawn().with_context(|| format!("starting {}", job.name))?;
        let handle = JobHandle(child.id().to_string());
        self.children.lock().expect("lock").insert(handle.clone(), child);
        Ok(handle)
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
