//! Engines run jobs. The orchestrator only submits, polls and cancels; an engine is an adapter
//! to something that runs processes — this machine ([`local`]) or a Slurm cluster through its
//! CLI or its REST API ([`slurm`]), a Kubernetes cluster ([`kubernetes`]) — never a scheduler
//! of its own.

#[cfg(test)]
mod fake_http;
pub mod gpus;
pub mod kubernetes;
pub mod local;
pub mod ray;
pub mod slurm;

use anyhow::Result;
use std::path::PathBuf;

pub use local::LocalEngine;

/// An HTTP answer's body as text, refused once it passes `limit` bytes: a server (or a proxy in
/// front of it) that streams without end must not take the orchestrator's memory with it.
pub async fn answer_text(mut resp: reqwest::Response, limit: usize) -> Result<String> {
    if let Some(len) = resp.content_length().filter(|&n| n > limit as u64) {
        anyhow::bail!("answer of {len} bytes, over btm's limit of {limit}");
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > limit {
            anyhow::bail!("answer of more than {limit} bytes, over btm's limit");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// How long an engine's polls may keep failing (cluster unreachable) before the run stops,
/// leaving its jobs to the cluster (a re-run picks them up). A failed poll never fails a job by
/// itself: that would start a second trainer on a task that may still be running.
pub const POLL_GIVE_UP: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// What to run: `btm <args>`, its output appended to `log`.
#[derive(Debug, Clone)]
pub struct Submission {
    /// btm's id of the job ([`crate::plan::Job::id`]).
    pub id: String,
    pub name: String,
    pub args: Vec<String>,
    pub log: PathBuf,
    /// CPUs (threads) for the job; 0: the engine decides (the local engine shares its cores).
    pub cpus: usize,
    /// GPUs per task (per rank of a multi-rank job).
    pub gpus: usize,
    /// Memory for the job in MiB, overriding the engine block's; `None`: the engine's.
    pub memory_mb: Option<u64>,
    /// Wall-clock limit in minutes, overriding the engine block's; `None`: the engine's.
    pub time_limit_min: Option<u64>,
    /// Processes of a multi-process (MPI) training job, each with `cpus` threads; 1: one process.
    pub ranks: usize,
    /// Nodes of a multi-node job: one task per node, each told the rendezvous on the first
    /// ([`btm_trainer::external::RDZV_ENDPOINT`]); 1: one node.
    pub nodes: usize,
}

impl Submission {
    /// The stage the job belongs to ([`crate::plan::stage_of`]).
    pub fn stage(&self) -> &str {
        crate::plan::stage_of(&self.name)
    }

    /// GPUs the whole job holds: its tasks' on one node.
    pub fn gpus_held(&self) -> usize {
        self.gpus * self.ranks.max(1)
    }

    /// What `job` asks for, its output appended to `log`.
    pub fn for_job(job: &crate::plan::Job, log: PathBuf) -> Self {
        Submission {
            id: job.id.clone(),
            name: job.name.clone(),
            args: job.args.clone(),
            log,
            cpus: job.resources.cpus,
            gpus: job.resources.gpus,
            memory_mb: job.resources.memory_mb,
            time_limit_min: job.resources.time_limit_min,
            ranks: job.resources.ranks.max(1),
            nodes: job.resources.nodes.max(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Queued or running.
    Running,
    Succeeded,
    /// Why, as text (exit code, signal, the engine's state name).
    Failed(String),
}

/// An engine's own id for a submitted job (a pid, a Slurm job or array-task id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobHandle(pub String);

#[async_trait::async_trait]
pub trait Engine: Send + Sync {
    /// How many jobs may be submitted and unfinished at once.
    fn slots(&self) -> usize;
    /// The GPUs this engine hands out to its jobs itself (the local engine's pool), so the
    /// executor starts a job only when enough of them are free; `None`: the cluster places
    /// GPUs (or there are none to place).
    fn gpus(&self) -> Option<usize> {
        None
    }
    /// How often the executor polls job states.
    fn poll_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(50)
    }
    /// Submit jobs that became ready together; an engine with job arrays submits them as one.
    async fn submit(&self, jobs: &[Submission]) -> Result<Vec<JobHandle>>;
    async fn state(&self, handle: &JobHandle) -> Result<JobState>;
    /// Ask a job to stop gracefully (trainers checkpoint on SIGTERM).
    async fn cancel(&self, handle: &JobHandle) -> Result<()>;
}

/// The shell script that runs task `$SLURM_ARRAY_TASK_ID` (or the only task) of `jobs`.
/// A multi-rank job's line starts its ranks with `srun` (one per task of the allocation, over
/// the `mpi` plugin if given).
pub fn array_script(exe: &std::path::Path, jobs: &[Submission], mpi: Option<&str>) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut s = String::from("#!/bin/bash\n# Written by btm: one case per task of the array.\ncase \"${SLURM_ARRAY_TASK_ID:-0}\" in\n");
    for (i, j) in jobs.iter().enumerate() {
        let args: Vec<String> = j.args.iter().map(|a| quote(a)).collect();
        // The log's folder may not exist on the node (a run kept in an object store logs to
        // a local folder of the submitting machine).
        let log_dir = j.log.parent().map(|d| d.to_string_lossy().into_owned()).unwrap_or_else(|| ".".into());
        let launch = match (j.ranks > 1, mpi) {
            (false, _) => String::new(),
            (true, None) => "srun --kill-on-bad-exit=1 ".to_string(),
            (true, Some(m)) => format!("srun --kill-on-bad-exit=1 --mpi={} ", quote(m)),
        };
        // A multi-node job: one task per node, all told the rendezvous on the allocation's
        // first node (a port from the job id, so jobs sharing a first node do not collide).
        let (rendezvous, launch) = if j.nodes > 1 {
            (
                format!(
                    "export {}=\"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1):$((20000 + SLURM_JOB_ID % 20000))\" {}=\"btm-$SLURM_JOB_ID\" && ",
                    btm_trainer::external::RDZV_ENDPOINT,
                    btm_trainer::external::RDZV_ID
                ),
                "srun --kill-on-bad-exit=1 --ntasks-per-node=1 ".to_string(),
            )
        } else {
            (String::new(), launch)
        };
        s.push_str(&format!(
            "  {i}) mkdir -p {} && {rendezvous}exec {launch}{} {} >> {} 2>&1 ;;\n",
            quote(&log_dir),
            quote(&exe.to_string_lossy()),
            args.join(" "),
            quote(&j.log.to_string_lossy())
        ));
    }
    s.push_str("  *) echo \"btm: no task $SLURM_ARRAY_TASK_ID in this array\" >&2; exit 2 ;;\nesac\n");
    s
}

/// How this machine's MPI starts `ranks` processes of `program args…` on the local host:
/// Open MPI's `mpirun` (allowed to run as root, more ranks than cores allowed, no pinning so
/// the ranks' thread pools are not squeezed onto one core each) or MPICH's.
pub fn local_mpi_launch(ranks: usize) -> Vec<String> {
    // Which MPI this is, asked once per process (every multi-rank submission needs it).
    static OPEN_MPI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let open_mpi = *OPEN_MPI.get_or_init(|| {
        std::process::Command::new("mpirun").arg("--version").output().is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).contains("Open MPI") || String::from_utf8_lossy(&o.stderr).contains("Open MPI")
        })
    });
    let mut line = vec!["mpirun".to_string()];
    if open_mpi {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } == 0 {
            line.push("--allow-run-as-root".into());
        }
        line.extend(["--oversubscribe", "--bind-to", "none"].map(String::from));
    }
    line.extend(["-np".to_string(), ranks.to_string()]);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, ranks: usize, nodes: usize) -> Submission {
        Submission {
            id: format!("id-{name}"),
            name: name.into(),
            args: vec!["train".into(), "--job".into(), format!("/runs/r/jobs/{name}/job.yaml")],
            log: PathBuf::from(format!("/runs/r/logs/{name}.log")),
            cpus: 4,
            gpus: 0,
            memory_mb: None,
            time_limit_min: None,
            ranks,
            nodes,
        }
    }

    /// One case per array task; multi-rank jobs start their ranks with srun, multi-node jobs
    /// one task per node, told the rendezvous on the allocation's first node.
    #[test]
    fn array_scripts_launch_ranks_and_nodes_with_srun() {
        let exe = std::path::Path::new("/opt/btm");
        let one = array_script(exe, &[job("expert-a", 1, 1), job("expert-b", 1, 1)], None);
        assert!(one.contains("  0) mkdir -p '/runs/r/logs' && exec '/opt/btm' 'train' '--job' '/runs/r/jobs/expert-a/job.yaml'"), "{one}");
        assert!(one.contains("  1) ") && !one.contains("srun"), "{one}");
        let ranks = array_script(exe, &[job("continue", 2, 1)], Some("pmix"));
        assert!(ranks.contains("exec srun --kill-on-bad-exit=1 --mpi='pmix' '/opt/btm' 'train'"), "{ranks}");
        let nodes = array_script(exe, &[job("expert-a", 1, 2)], None);
        assert!(
            nodes.contains("export BTM_RDZV_ENDPOINT=\"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1):$((20000 + SLURM_JOB_ID % 20000))\" BTM_RDZV_ID=\"btm-$SLURM_JOB_ID\" && exec srun --kill-on-bad-exit=1 --ntasks-per-node=1 '/opt/btm'"),
            "{nodes}"
        );
    }
}
