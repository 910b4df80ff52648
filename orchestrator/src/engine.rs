//! Engines run jobs. The orchestrator only submits, polls, cancels and reads logs; an engine
//! is an adapter to something that runs processes (this machine; Slurm and Kubernetes behind
//! the same trait in the engines work).

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

/// What to run: `btm <args>` with its output appended to `log`.
#[derive(Debug, Clone)]
pub struct Submission {
    pub name: String,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub cpus: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Running,
    Succeeded,
    /// Exit code or signal, as text.
    Failed(String),
}

/// An engine's own id for a submitted job.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobHandle(pub String);

pub trait Engine: Send + Sync {
    /// How many jobs may run at once.
    fn slots(&self) -> usize;
    fn submit(&self, job: &Submission) -> Result<JobHandle>;
    fn state(&self, handle: &JobHandle) -> Result<JobState>;
    /// Ask the job to stop gracefully (trainers checkpoint first).
    fn cancel(&self, handle: &JobHandle) -> Result<()>;
}

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

impl Engine for LocalEngine {
    fn slots(&self) -> usize {
        self.slots
    }

    fn submit(&self, job: &Submission) -> Result<JobHandle> {
        if let Some(dir) = job.log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&job.log)
            .with_context(|| format!("opening {}", job.log.display()))?;
        let mut command = Command::new(&self.exe);
        command
            .args(&job.args)
            .env("RAYON_NUM_THREADS", job.cpus.max(1).to_string())
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
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", job.name))?;
        let handle = JobHandle(child.id().to_string());
        self.children.lock().expect("lock").insert(handle.clone(), child);
        Ok(handle)
    }

    fn state(&self, handle: &JobHandle) -> Result<JobState> {
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

    fn cancel(&self, handle: &JobHandle) -> Result<()> {
        let pid: i32 = handle.0.parse().context("local job handle")?;
        // SAFETY: sending a signal to a child process we started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        Ok(())
    }
}
