//! The Slurm engine: jobs are Slurm batch jobs, and jobs that become ready together (the
//! per-domain trainers of a stage) are one job array. Two ways to talk to Slurm:
//! - `api: cli`: `sbatch --array`, `squeue` / `scontrol show job` to poll, `scancel`;
//! - `api: rest`: slurmrestd (`POST /slurm/<v>/job/submit`, `GET …/job/{id}`,
//!   `DELETE …/job/{id}`) with a JWT read from the environment variable the pipeline names,
//!   sent in `X-SLURM-USER-TOKEN` and never logged.
//!
//! A job array may not be wider than the cluster's `MaxArraySize` (task indices run below it),
//! so more ready jobs than that go in as several arrays; the size is read once from
//! `scontrol show config` (Slurm's default, 1001, when it cannot be read: slurmrestd serves no
//! configuration).
//!
//! Slurm forgets finished jobs after `MinJobAge`, so terminal states are remembered here.
//! Jobs are submitted with `--requeue`, so Slurm requeues a task whose node fails; a task that
//! fails anyway (preempted, cancelled, node lost) is resubmitted by the executor's retries and
//! the trainer resumes from its last checkpoint.

use super::{array_script, Engine, JobHandle, JobState, Submission, POLL_GIVE_UP};
use crate::pipeline::spec::{EngineSpec, SlurmApi, SlurmRest};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub struct SlurmEngine {
    api: SlurmApi,
    partition: Option<String>,
    slots: usize,
    mem_per_cpu_mb: Option<u64>,
    time_limit_min: Option<u64>,
    rest: Option<Rest>,
    /// srun's `--mpi` plugin for multi-rank jobs.
    mpi: Option<String>,
    exe: PathBuf,
    run: PathBuf,
    /// States Slurm may forget (finished jobs), and when each handle was last polled.
    known: Mutex<HashMap<JobHandle, (JobState, Instant)>>,
    /// Since when polls about a handle have found Slurm unreachable.
    unreachable_since: Mutex<HashMap<JobHandle, Instant>>,
    /// The cluster's `MaxArraySize`, read at the first submission.
    max_array_size: OnceLock<usize>,
}

/// Slurm's default `MaxArraySize`, assumed when the cluster's cannot be read.
pub const DEFAULT_MAX_ARRAY_SIZE: usize = 1001;

/// How long `scontrol show config` may take (it retries an unreachable controller for ~10 s).
const SCONTROL_CONFIG_TIMEOUT: Duration = Duration::from_secs(20);

/// `MaxArraySize` from `scontrol show config`'s output (`MaxArraySize            = 1001`).
pub fn parse_max_array_size(config: &str) -> Option<usize> {
    config.lines().find_map(|l| {
        let (key, value) = l.split_once('=')?;
        (key.trim() == "MaxArraySize").then(|| value.trim().parse().ok())?
    })
}

/// The ranges of `n` jobs submitted as one array each, none wider than `max_array_size` (task
/// indices are below it). A `MaxArraySize` of 0 disables arrays: every job goes alone.
fn array_chunks(n: usize, max_array_size: usize) -> Vec<std::ops::Range<usize>> {
    let width = max_array_size.max(1);
    (0..n).step_by(width).map(|start| start..(start + width).min(n)).collect()
}

struct Rest {
    client: reqwest::Client,
    base: String,
    user: String,
    token: String,
    token_env: String,
    /// The API version in use (`v0.0.38`, `v0.0.40`, …).
    version: String,
    /// The server's OpenAPI document, when it serves one: each submission is checked against
    /// its schema before it is sent.
    openapi: Option<Value>,
}

/// The slurmrestd API versions btm speaks, oldest first: v0.0.38's shapes (Slurm 22.05–23.02:
/// the environment a map, limits plain numbers, nodes `[min, max]`, GPUs as `gres`) and the
/// v0.0.40 family's (Slurm 23.11 on: the environment a list of `KEY=VALUE`, limits and memory
/// `{set, infinite, number}`, `minimum_nodes`/`maximum_nodes`, GPUs as `tres_per_node`; job
/// states lists).
pub const REST_VERSIONS: [&str; 4] = ["v0.0.38", "v0.0.40", "v0.0.41", "v0.0.42"];

/// Whether `version` takes the v0.0.40 family's shapes.
fn no_val_shapes(version: &str) -> bool {
    version != "v0.0.38"
}

/// A number as the v0.0.40 family sends a limit.
fn no_val(n: u64) -> Value {
    json!({"set": true, "infinite": false, "number": n})
}

/// A number as either family answers it: plain, or `{set, number}`.
fn answered_number(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| if v["set"].as_bool() == Some(true) { v["number"].as_u64() } else { None })
}

/// A job state as either family answers it: a string, or a list whose first entry is the base
/// state (the rest are flags such as `REQUEUED`).
fn answered_state(v: &Value) -> String {
    v.as_str().or_else(|| v.as_array().and_then(|a| a.first()).and_then(Value::as_str)).unwrap_or("UNKNOWN").to_string()
}

/// The newest of [`REST_VERSIONS`] the server's OpenAPI document offers job submission in.
pub fn newest_version(openapi: &Value) -> Option<&'static str> {
    let paths = openapi["paths"].as_object()?;
    REST_VERSIONS.iter().rev().find(|v| paths.contains_key(&format!("/slurm/{v}/job/submit"))).copied()
}

/// Check a job submission body against the server's OpenAPI schema for `POST /slurm/{version}
/// /job/submit`: every field of `job` must exist there, with the JSON type the schema gives.
/// The mismatches, each naming the field.
pub fn schema_mismatches(openapi: &Value, version: &str, job: &Value) -> Vec<String> {
    let resolve = |v: &Value| -> Value {
        match v["$ref"].as_str().and_then(|r| r.strip_prefix("#/components/schemas/")) {
            Some(name) => openapi["components"]["schemas"][name].clone(),
            None => v.clone(),
        }
    };
    let submit = &openapi["paths"][format!("/slurm/{version}/job/submit")]["post"]["requestBody"]["content"]["application/json"]["schema"];
    let fields = resolve(&resolve(submit)["properties"]["job"]);
    let Some(properties) = fields["properties"].as_object() else {
        return vec![format!("the server's OpenAPI document has no job schema for {version}")];
    };
    let mut out = vec![];
    for (key, value) in job.as_object().into_iter().flatten() {
        let Some(schema) = properties.get(key) else {
            out.push(format!("`{key}` is not a field of {version}'s job"));
            continue;
        };
        let schema = resolve(schema);
        let want = schema["type"].as_str().unwrap_or(if schema["properties"].is_object() { "object" } else { "" });
        let fits = match want {
            "string" => value.is_string(),
            "integer" | "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => true,
        };
        if !fits {
            out.push(format!("`{key}` is {value} but {version} wants {want}"));
        }
    }
    out
}

/// Why a poll gave no state.
#[derive(Debug)]
enum Poll {
    /// Slurm could not be asked (controller or slurmrestd down, a timeout): the job's state is
    /// unknown, not failed.
    Unreachable(String),
    /// An error that must stop the run (a rejected token).
    Fatal(anyhow::Error),
}

impl Poll {
    fn unreachable(e: impl std::fmt::Display) -> Self {
        Poll::Unreachable(e.to_string())
    }
}

/// Whether Slurm's answer says it does not know the job (purged after `MinJobAge`), as opposed
/// to not answering at all.
fn unknown_job(message: &str) -> bool {
    message.contains("Invalid job id")
}

/// Slurm job states that mean "not finished yet".
fn unfinished(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "REQUEUED"
            | "REQUEUE_HOLD"
            | "REQUEUE_FED"
            | "RESIZING"
            | "SUSPENDED"
            | "SIGNALING"
            | "STAGE_OUT"
    )
}

fn to_state(slurm_state: &str) -> JobState {
    if unfinished(slurm_state) {
        JobState::Running
    } else if slurm_state == "COMPLETED" {
        JobState::Succeeded
    } else {
        JobState::Failed(format!("Slurm state {slurm_state}"))
    }
}

/// A Slurm command-line tool. `SLURM_JWT` is removed from its environment: with it set, the
/// tools switch to JWT authentication (meant for slurmrestd) and fail, and sbatch would copy
/// the secret into every job's environment.
fn slurm_tool(name: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(name);
    cmd.env_remove("SLURM_JWT");
    cmd
}

impl SlurmEngine {
    pub fn new(spec: &EngineSpec, run: &Path) -> Result<Self> {
        let EngineSpec::Slurm { api, partition, slots, mem_per_cpu_mb, time_limit_min, rest, mpi, .. } = spec else {
            bail!("not a Slurm engine");
        };
        let rest = match (api, rest) {
            (SlurmApi::Rest, None) => bail!("engine.rest: `api: rest` needs `rest: {{url: …}}`"),
            (SlurmApi::Rest, Some(r)) => Some(Rest::new(r)?),
            (SlurmApi::Cli, _) => None,
        };
        Ok(Self {
            api: *api,
            partition: partition.clone(),
            slots: *slots,
            mem_per_cpu_mb: *mem_per_cpu_mb,
            time_limit_min: *time_limit_min,
            rest,
            mpi: mpi.clone(),
            exe: std::env::current_exe().context("locating the btm binary")?,
            run: run.to_path_buf(),
            known: Mutex::new(HashMap::new()),
            unreachable_since: Mutex::new(HashMap::new()),
            max_array_size: OnceLock::new(),
        })
    }

    /// The cluster's `MaxArraySize`, asked of `scontrol show config` once;
    /// [`DEFAULT_MAX_ARRAY_SIZE`] when it cannot be read (no scontrol, no controller, a REST-only
    /// setup: slurmrestd serves no configuration).
    async fn max_array_size(&self) -> usize {
        if let Some(n) = self.max_array_size.get() {
            return *n;
        }
        let asked = tokio::time::timeout(SCONTROL_CONFIG_TIMEOUT, slurm_tool("scontrol").args(["show", "config"]).output()).await;
        let n = match asked {
            Ok(Ok(out)) if out.status.success() => parse_max_array_size(&String::from_utf8_lossy(&out.stdout)),
            _ => None,
        };
        let n = n.unwrap_or_else(|| {
            eprintln!("btm: could not read Slurm's MaxArraySize from `scontrol show config`; assuming {DEFAULT_MAX_ARRAY_SIZE}");
            DEFAULT_MAX_ARRAY_SIZE
        });
        *self.max_array_size.get_or_init(|| n)
    }

    /// Submit `jobs` as one array (or one job).
    async fn submit_array(&self, jobs: &[Submission]) -> Result<Vec<JobHandle>> {
        match (&self.api, &self.rest) {
            (SlurmApi::Rest, Some(rest)) => self.submit_rest(rest, jobs).await,
            _ => self.submit_cli(jobs).await,
        }
    }

    /// Write the array script into the run (kept for inspection).
    fn script(&self, jobs: &[Submission]) -> Result<(PathBuf, String)> {
        let dir = self.run.join("jobs").join("slurm");
        std::fs::create_dir_all(&dir)?;
        // Slurm fails a job whose output file cannot be opened.
        std::fs::create_dir_all(self.run.join("logs"))?;
        let text = array_script(&self.exe, jobs, self.mpi.as_deref());
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
        let path = dir.join(format!("{}-{stamp}.sh", jobs[0].name.replace('/', "-")));
        std::fs::write(&path, &text)?;
        Ok((path, text))
    }

    fn handles(id: &str, n: usize) -> Vec<JobHandle> {
        if n == 1 {
            vec![JobHandle(id.to_string())]
        } else {
            (0..n).map(|i| JobHandle(format!("{id}_{i}"))).collect()
        }
    }

    fn job_name(jobs: &[Submission]) -> String {
        let stage = jobs[0].stage();
        format!("btm-{stage}")
    }

    async fn submit_cli(&self, jobs: &[Submission]) -> Result<Vec<JobHandle>> {
        let (script, _) = self.script(jobs)?;
        let mut cmd = slurm_tool("sbatch");
        cmd.arg("--parsable")
            .arg(format!("--job-name={}", Self::job_name(jobs)))
            .arg(format!("--output={}", self.run.join("logs").join("slurm-%A_%a.out").display()))
            .arg(format!("--cpus-per-task={}", jobs[0].cpus.max(1)))
            .arg("--requeue");
        if jobs[0].ranks > 1 {
            // One task per rank; the script starts them with srun.
            cmd.arg(format!("--ntasks={}", jobs[0].ranks));
        }
        if jobs[0].nodes > 1 {
            // One task per node (a torchrun each, which starts the node's processes).
            cmd.arg(format!("--nodes={}", jobs[0].nodes)).arg("--ntasks-per-node=1");
        }
        if jobs.len() > 1 {
            cmd.arg(format!("--array=0-{}", jobs.len() - 1));
        }
        if let Some(p) = &self.partition {
            cmd.arg(format!("--partition={p}"));
        }
        // A phase's own memory (per task) replaces the engine's per-CPU figure.
        match (jobs[0].memory_mb, self.mem_per_cpu_mb) {
            (Some(m), _) => cmd.arg(format!("--mem={m}")),
            (None, Some(m)) => cmd.arg(format!("--mem-per-cpu={m}")),
            (None, None) => &mut cmd,
        };
        if jobs[0].gpus > 0 {
            cmd.arg(format!("--gres=gpu:{}", jobs[0].gpus));
        }
        if let Some(t) = jobs[0].time_limit_min.or(self.time_limit_min) {
            cmd.arg(format!("--time={t}"));
        }
        let out = cmd.arg(&script).output().await.context("running sbatch (is Slurm installed?)")?;
        if !out.status.success() {
            bail!("sbatch failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let id = sbatch_job_id(&String::from_utf8_lossy(&out.stdout))?;
        Ok(Self::handles(&id, jobs.len()))
    }

    /// The task's state from `squeue`, else `scontrol` (which remembers finished jobs for a
    /// while); `Err(Poll::Unreachable)` when Slurm could not be asked.
    async fn state_cli(&self, handle: &JobHandle) -> Result<JobState, Poll> {
        let out = slurm_tool("squeue").args(["-h", "-o", "%T", "-j", &handle.0]).output().await.map_err(Poll::unreachable)?;
        if let Some(state) = squeue_state(&String::from_utf8_lossy(&out.stdout)) {
            return Ok(state);
        }
        let squeue_err = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() && !unknown_job(&squeue_err) {
            return Err(Poll::Unreachable(format!("squeue: {}", squeue_err.trim())));
        }
        let out = slurm_tool("scontrol").args(["show", "job", "-o", &handle.0]).output().await.map_err(Poll::unreachable)?;
        match scontrol_state(&String::from_utf8_lossy(&out.stdout)) {
            Some(state) => Ok(state),
            None => {
                let err = String::from_utf8_lossy(&out.stderr);
                if out.status.success() || unknown_job(&err) {
                    Ok(JobState::Failed("unknown to Slurm".into()))
                } else {
                    Err(Poll::Unreachable(format!("scontrol: {}", err.trim())))
                }
            }
        }
    }

    async fn cancel_cli(&self, handle: &JobHandle) -> Result<()> {
        let out = slurm_tool("scancel").args(["--signal=TERM", "--full", &handle.0]).output().await?;
        if !out.status.success() {
            bail!("scancel {}: {}", handle.0, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

/// slurmrestd's OpenAPI document (`GET /openapi/v3`), fetched once when the engine starts.
/// The most of slurmrestd's OpenAPI document btm reads (Slurm 24.05's is about 1 MiB).
const MAX_OPENAPI_BYTES: usize = 64 << 20;

fn openapi_document(client: &reqwest::Client, url: &str, user: &str, token: &str) -> Result<Value> {
    let request = client
        .get(format!("{}/openapi/v3", url.trim_end_matches('/')))
        .header("X-SLURM-USER-NAME", user)
        .header("X-SLURM-USER-TOKEN", token);
    // The engine starts before the executor's runtime runs; a thread of its own keeps this
    // blocking call out of any runtime the caller is in.
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let resp = request.send().await?;
                let status = resp.status();
                ensure!(status.is_success(), "HTTP {status}");
                let text = super::answer_text(resp, MAX_OPENAPI_BYTES).await?;
                Ok(serde_json::from_str::<Value>(&text)?)
            })
        })
        .join()
        .expect("the OpenAPI thread panicked")
    })
}

impl Rest {
    /// The client, and the API version: the pipeline's, or (`auto`) the newest btm speaks of
    /// those the server's OpenAPI document (`/openapi/v3`) offers.
    fn new(r: &SlurmRest) -> Result<Self> {
        let token = std::env::var(&r.token_env).map_err(|_| {
            anyhow::anyhow!(
                "engine.rest.token_env: environment variable `{}` is not set (it must hold a Slurm JWT, e.g. from `scontrol token`)",
                r.token_env
            )
        })?;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let openapi = openapi_document(&client, &r.url, &r.user, &token);
        let version = match (r.api_version.as_str(), &openapi) {
            ("auto", Ok(doc)) => newest_version(doc)
                .with_context(|| {
                    let offered: Vec<&String> =
                        doc["paths"].as_object().map(|p| p.keys().filter(|k| k.ends_with("/job/submit")).collect()).unwrap_or_default();
                    format!(
                        "slurmrestd at {} offers none of the API versions btm speaks ({}); it offers {offered:?}",
                        r.url,
                        REST_VERSIONS.join(", ")
                    )
                })?
                .to_string(),
            ("auto", Err(e)) => bail!(
                "engine.rest.api_version auto: slurmrestd at {} serves no OpenAPI document ({e:#}); name the version (e.g. v0.0.40)",
                r.url
            ),
            (v, _) => {
                ensure!(
                    REST_VERSIONS.contains(&v),
                    "engine.rest.api_version: `{v}` is not one btm speaks ({}, or auto)",
                    REST_VERSIONS.join(", ")
                );
                v.to_string()
            }
        };
        Ok(Self {
            client,
            base: format!("{}/slurm/{version}", r.url.trim_end_matches('/')),
            user: r.user.clone(),
            token,
            token_env: r.token_env.clone(),
            version,
            openapi: openapi.ok(),
        })
    }

    /// Send a request; Slurm reports errors in the body's `errors` (often with HTTP 500).
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .header("X-SLURM-USER-NAME", &self.user)
            .header("X-SLURM-USER-TOKEN", &self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("slurmrestd {method} {path}"))?;
        let status = resp.status();
        let text = super::answer_text(resp, MAX_REST_ANSWER_BYTES).await.with_context(|| format!("slurmrestd {method} {path}"))?;
        if status == reqwest::StatusCode::UNAUTHORIZED
            || status == reqwest::StatusCode::FORBIDDEN
            || text.contains("Authentication failure")
        {
            bail!("slurmrestd rejected the token in `{}` (expired or wrong?) for user `{}`: HTTP {status}", self.token_env, self.user);
        }
        let (v, errors) = rest_answer(&text).with_context(|| format!("slurmrestd {method} {path}: HTTP {status}"))?;
        if !errors.is_empty() {
            let joined = errors.join("; ");
            // slurmrestd 22.05 answers a bad token with unhelpful errors ("Zero Bytes were
            // transmitted or received"); if even a ping fails, the token is the problem.
            if path == "/ping" || !self.ping_ok().await {
                bail!("slurmrestd rejected the token in `{}` (expired or wrong?): {joined}", self.token_env);
            }
            bail!("slurmrestd {method} {path}: {joined}");
        }
        if !status.is_success() {
            bail!("slurmrestd {method} {path}: HTTP {status}");
        }
        Ok(v)
    }

    async fn ping_ok(&self) -> bool {
        let resp = self
            .client
            .get(format!("{}/ping", self.base))
            .header("X-SLURM-USER-NAME", &self.user)
            .header("X-SLURM-USER-TOKEN", &self.token)
            .send()
            .await;
        match resp {
            Ok(r) => match super::answer_text(r, MAX_REST_ANSWER_BYTES).await {
                Ok(text) => rest_answer(&text).is_ok_and(|(_, errors)| errors.is_empty()),
                Err(_) => false,
            },
            Err(_) => false,
        }
    }
}

impl SlurmEngine {
    async fn submit_rest(&self, rest: &Rest, jobs: &[Submission]) -> Result<Vec<JobHandle>> {
        let (_, script) = self.script(jobs)?;
        let new_shapes = no_val_shapes(&rest.version);
        let mut env = vec![];
        for key in [
            "PATH",
            "HOME",
            "BTM_CACHE",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT",
            "AWS_REGION",
            "AWS_ALLOW_HTTP",
            "BTM_UPLOAD_PART_BYTES",
        ] {
            if let Ok(v) = std::env::var(key) {
                env.push((key, v));
            }
        }
        let environment = if new_shapes {
            json!(env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>())
        } else {
            json!(env.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>())
        };
        let limit = |n: u64| if new_shapes { no_val(n) } else { json!(n) };
        let mut job = json!({
            "name": Self::job_name(jobs),
            "current_working_directory": self.run,
            "standard_output": self.run.join("logs").join("slurm-%A_%a.out"),
            "environment": environment,
            "cpus_per_task": jobs[0].cpus.max(1),
            "tasks": jobs[0].ranks.max(jobs[0].nodes).max(1),
            "requeue": true,
        });
        if jobs[0].nodes > 1 {
            let n = jobs[0].nodes;
            if new_shapes {
                job["minimum_nodes"] = json!(n);
                job["maximum_nodes"] = json!(n);
            } else {
                job["nodes"] = json!([n, n]);
            }
            job["tasks_per_node"] = json!(1);
        }
        if jobs.len() > 1 {
            job["array"] = json!(format!("0-{}", jobs.len() - 1));
        }
        if let Some(p) = &self.partition {
            job["partition"] = json!(p);
        }
        match (jobs[0].memory_mb, self.mem_per_cpu_mb) {
            (Some(m), _) => job["memory_per_node"] = limit(m),
            (None, Some(m)) => job["memory_per_cpu"] = limit(m),
            (None, None) => {}
        }
        if let Some(t) = jobs[0].time_limit_min.or(self.time_limit_min) {
            job["time_limit"] = limit(t);
        }
        if jobs[0].gpus > 0 {
            let gpus = format!("gpu:{}", jobs[0].gpus);
            if new_shapes {
                job["tres_per_node"] = json!(format!("gres/{gpus}"));
            } else {
                job["gres"] = json!(gpus);
            }
        }
        if let Some(doc) = &rest.openapi {
            let problems = schema_mismatches(doc, &rest.version, &job);
            ensure!(
                problems.is_empty(),
                "slurmrestd {}: the job btm would submit does not fit the server's schema: {}",
                rest.version,
                problems.join("; ")
            );
        }
        let v = rest.call(reqwest::Method::POST, "/job/submit", Some(json!({"script": script, "job": job}))).await?;
        let id = rest_submitted_id(&v)?;
        Ok(Self::handles(&id.to_string(), jobs.len()))
    }

    async fn state_rest(&self, rest: &Rest, handle: &JobHandle) -> Result<JobState, Poll> {
        let (job_id, task) = array_task(&handle.0).map_err(Poll::Fatal)?;
        let v = match rest.call(reqwest::Method::GET, &format!("/job/{job_id}"), None).await {
            Ok(v) => v,
            Err(e) if e.to_string().contains("token") => return Err(Poll::Fatal(e)),
            // Slurm's word that it does not know the job (purged after MinJobAge).
            Err(e) if unknown_job(&format!("{e:#}")) => return Ok(JobState::Failed("unknown to Slurm".into())),
            // No answer (slurmrestd or the controller down, a timeout): unknown, not failed.
            Err(e) => return Err(Poll::Unreachable(format!("{e:#}"))),
        };
        Ok(rest_job_state(&v, task))
    }
}

/// The job id `sbatch --parsable` prints (`ID` or `ID;CLUSTER`).
pub fn sbatch_job_id(stdout: &str) -> Result<String> {
    let id = stdout.trim().split(';').next().unwrap_or("").to_string();
    if id.parse::<u64>().is_err() {
        bail!("sbatch printed no job id: `{}`", stdout.trim());
    }
    Ok(id)
}

/// The state `squeue -h -o %T` prints (its first non-empty line); `None` when it printed none.
pub fn squeue_state(stdout: &str) -> Option<JobState> {
    stdout.lines().map(str::trim).find(|l| !l.is_empty()).map(to_state)
}

/// The `JobState=` of `scontrol show job -o`'s output; `None` when it has none.
pub fn scontrol_state(stdout: &str) -> Option<JobState> {
    stdout.split_whitespace().find_map(|kv| kv.strip_prefix("JobState=")).map(to_state)
}

/// The most of a slurmrestd answer btm reads: a job's record or a submission's answer is a
/// few KiB; the OpenAPI document, read separately, is larger.
pub const MAX_REST_ANSWER_BYTES: usize = 16 << 20;

/// A slurmrestd answer's JSON and the errors it reports in `errors` (often with HTTP 500).
pub fn rest_answer(text: &str) -> Result<(Value, Vec<String>)> {
    ensure!(text.len() <= MAX_REST_ANSWER_BYTES, "answer of {} bytes, over btm's limit of {MAX_REST_ANSWER_BYTES}", text.len());
    let v: Value = serde_json::from_str(text).context("not JSON")?;
    let errors: Vec<String> = v["errors"]
        .as_array()
        .map(|a| a.iter().map(|e| e["description"].as_str().or(e["error"].as_str()).unwrap_or("error").to_string()).collect())
        .unwrap_or_default();
    Ok((v, errors))
}

/// The job id of a slurmrestd `POST /job/submit` answer.
pub fn rest_submitted_id(answer: &Value) -> Result<u64> {
    answer["job_id"].as_u64().context("slurmrestd: the submit answer has no job_id")
}

/// A Slurm handle's job id and array task (`123_4`), or the job alone (`123`).
pub fn array_task(handle: &str) -> Result<(&str, Option<u64>)> {
    Ok(match handle.split_once('_') {
        Some((j, t)) => (j, Some(t.parse::<u64>().with_context(|| format!("Slurm job handle `{handle}`"))?)),
        None => (handle, None),
    })
}

/// The state of array task `task` (or of the job, `None`) from slurmrestd's `GET /job/{id}`
/// answer.
pub fn rest_job_state(answer: &Value, task: Option<u64>) -> JobState {
    let jobs = answer["jobs"].as_array().map(Vec::as_slice).unwrap_or_default();
    let state = |j: &Value| answered_state(&j["job_state"]);
    let mine = jobs.iter().find(|j| match task {
        None => true,
        Some(t) => answered_number(&j["array_task_id"]) == Some(t),
    });
    match mine {
        Some(j) => to_state(&state(j)),
        // A pending array keeps its unstarted tasks in one record.
        None if jobs.iter().any(|j| unfinished(&state(j))) => JobState::Running,
        None => JobState::Failed("unknown to Slurm".into()),
    }
}

#[async_trait::async_trait]
impl Engine for SlurmEngine {
    fn slots(&self) -> usize {
        self.slots
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(500)
    }

    async fn submit(&self, jobs: &[Submission]) -> Result<Vec<JobHandle>> {
        let chunks = array_chunks(jobs.len(), self.max_array_size().await);
        let mut handles = Vec::with_capacity(jobs.len());
        // The Slurm job id of each array submitted, to cancel if a later one fails: the
        // executor knows none of them unless all are in.
        let mut submitted = vec![];
        for range in chunks {
            match self.submit_array(&jobs[range]).await {
                Ok(h) => {
                    submitted.push(JobHandle(h[0].0.split('_').next().unwrap_or(&h[0].0).to_string()));
                    handles.extend(h);
                }
                Err(e) => {
                    for id in &submitted {
                        if let Err(c) = self.cancel(id).await {
                            eprintln!("btm: cancelling Slurm job {} after a failed submission: {c:#}", id.0);
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(handles)
    }

    async fn state(&self, handle: &JobHandle) -> Result<JobState> {
        if let Some((s, _)) = self.known.lock().expect("lock").get(handle) {
            if *s != JobState::Running {
                return Ok(s.clone());
            }
        }
        let polled = match &self.rest {
            Some(rest) => self.state_rest(rest, handle).await,
            None => self.state_cli(handle).await,
        };
        let state = match polled {
            Ok(state) => {
                self.unreachable_since.lock().expect("lock").remove(handle);
                state
            }
            Err(Poll::Fatal(e)) => return Err(e),
            Err(Poll::Unreachable(why)) => {
                let since = *self.unreachable_since.lock().expect("lock").entry(handle.clone()).or_insert_with(Instant::now);
                if since.elapsed() > POLL_GIVE_UP {
                    bail!(
                        "Slurm has not answered for {} minutes about {} ({why}); its jobs are left to Slurm, run again to continue",
                        POLL_GIVE_UP.as_secs() / 60,
                        handle.0
                    );
                }
                // Unknown, not failed: ask again at the next poll.
                return Ok(JobState::Running);
            }
        };
        self.known.lock().expect("lock").insert(handle.clone(), (state.clone(), Instant::now()));
        Ok(state)
    }

    async fn cancel(&self, handle: &JobHandle) -> Result<()> {
        match &self.rest {
            Some(rest) => rest.call(reqwest::Method::DELETE, &format!("/job/{}?signal=SIGTERM", handle.0), None).await.map(|_| ()),
            None => self.cancel_cli(handle).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake_http::fake_api;
    use serde_json::json;

    /// The OpenAPI document of a real slurmrestd (Slurm 22.05, Debian's, `GET /openapi/v3`,
    /// as `scripts/slurm-local.sh` starts it): it offers v0.0.38 only.
    fn real_openapi_v0038() -> Value {
        serde_json::from_str(include_str!("testdata/slurmrestd-22.05-openapi-v3.json")).unwrap()
    }

    /// A slurmrestd of the v0.0.40 family: its OpenAPI document offers v0.0.38 and v0.0.40, the
    /// job fields btm sends typed as Slurm 23.11 documents `v0.0.40_job_desc_msg` (limits and
    /// memory as `v0.0.40_uint*_no_val` objects, the environment a list of strings).
    fn openapi_v0040() -> Value {
        let no_val = json!({"$ref": "#/components/schemas/v0.0.40_uint64_no_val"});
        let t = |ty: &str| json!({"type": ty});
        json!({
            "paths": {
                "/slurm/v0.0.38/job/submit": {"post": {}},
                "/slurm/v0.0.40/job/submit": {"post": {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/v0.0.40_job_submit_req"}}}}}},
            },
            "components": {"schemas": {
                "v0.0.40_job_submit_req": {"type": "object", "properties": {"script": t("string"), "job": {"$ref": "#/components/schemas/v0.0.40_job_desc_msg"}}},
                "v0.0.40_uint64_no_val": {"type": "object", "properties": {"set": t("boolean"), "infinite": t("boolean"), "number": t("integer")}},
                "v0.0.40_job_desc_msg": {"type": "object", "properties": {
                    "name": t("string"), "current_working_directory": t("string"), "standard_output": t("string"),
                    "environment": {"type": "array", "items": t("string")}, "cpus_per_task": t("integer"), "tasks": t("integer"),
                    "requeue": t("boolean"), "minimum_nodes": t("integer"), "maximum_nodes": t("integer"), "tasks_per_node": t("integer"),
                    "array": t("string"), "partition": t("string"), "memory_per_node": no_val, "memory_per_cpu": no_val,
                    "time_limit": no_val, "tres_per_node": t("string"),
                }},
            }},
        })
    }

    /// A GPU job array of two-node jobs with memory and a time limit, submitted to `openapi`'s
    /// server (api_version auto); the POST body and the states of tasks 0 and 1.
    fn submit_array(openapi: fn() -> Value, reply_job: fn() -> Value) -> (Value, String, JobState, JobState) {
        let (url, server) = fake_api(4, move |method, path| match (method, path) {
            (_, "/openapi/v3") => (200, openapi()),
            ("POST", _) => (200, json!({"job_id": 12})),
            _ => (200, reply_job()),
        });
        std::env::set_var("BTM_TEST_SLURM_JWT", "t");
        let spec: EngineSpec = serde_yaml::from_str(&format!(
            "{{kind: slurm, api: rest, mem_per_cpu_mb: 512, time_limit_min: 90, rest: {{url: '{url}', token_env: BTM_TEST_SLURM_JWT}}}}"
        ))
        .unwrap();
        let run = tempfile::tempdir().unwrap();
        let engine = SlurmEngine::new(&spec, run.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let jobs: Vec<Submission> = ["expert/a", "expert/b"]
            .iter()
            .map(|n| Submission {
                id: format!("id-{n}"),
                name: n.to_string(),
                args: vec!["train".into()],
                log: run.path().join("a.log"),
                cpus: 2,
                gpus: 1,
                memory_mb: None,
                time_limit_min: None,
                ranks: 1,
                nodes: 2,
            })
            .collect();
        let handles = rt.block_on(engine.submit(&jobs)).unwrap();
        let (a, b) = (rt.block_on(engine.state(&handles[0])).unwrap(), rt.block_on(engine.state(&handles[1])).unwrap());
        let seen = server.join().unwrap();
        (seen[1].3.clone(), seen[1].1.clone(), a, b)
    }

    #[test]
    fn max_array_size_is_read_from_scontrol_show_config() {
        let config = "Configuration data as of 2026-12-07T08:00:00\nMaxArraySize            = 4\nMaxArraySizeX = 9\nMaxJobCount             = 10000\n";
        assert_eq!(parse_max_array_size(config), Some(4));
        assert_eq!(parse_max_array_size("MaxJobCount             = 10000\n"), None);
        assert_eq!(parse_max_array_size("MaxArraySize = (null)\n"), None);
    }

    #[test]
    fn arrays_are_never_wider_than_max_array_size() {
        assert_eq!(array_chunks(2500, 1001), vec![0..1001, 1001..2002, 2002..2500]);
        assert_eq!(array_chunks(1001, 1001), vec![0..1001]);
        assert_eq!(array_chunks(1002, 1001), vec![0..1001, 1001..1002]);
        assert_eq!(array_chunks(3, 0), vec![0..1, 1..2, 2..3], "MaxArraySize 0: no arrays");
        assert!(array_chunks(0, 1001).is_empty());
    }

    /// Five jobs on a cluster whose MaxArraySize is 2 go in as arrays 0-1, 0-1 and a lone job,
    /// and the handles follow the jobs' order.
    #[test]
    fn a_stage_wider_than_max_array_size_goes_in_as_several_arrays() {
        let next_id = std::sync::atomic::AtomicU64::new(12);
        let (url, server) = fake_api(4, move |method, path| match (method, path) {
            (_, "/openapi/v3") => (200, real_openapi_v0038()),
            _ => (200, json!({"job_id": next_id.fetch_add(1, std::sync::atomic::Ordering::SeqCst)})),
        });
        std::env::set_var("BTM_TEST_SLURM_JWT", "t");
        let spec: EngineSpec =
            serde_yaml::from_str(&format!("{{kind: slurm, api: rest, rest: {{url: '{url}', token_env: BTM_TEST_SLURM_JWT}}}}")).unwrap();
        let run = tempfile::tempdir().unwrap();
        let engine = SlurmEngine::new(&spec, run.path()).unwrap();
        engine.max_array_size.set(2).unwrap();
        let jobs: Vec<Submission> = (0..5)
            .map(|i| Submission {
                id: format!("id-{i}"),
                name: format!("expert/{i}"),
                args: vec!["train".into()],
                log: run.path().join(format!("{i}.log")),
                cpus: 1,
                gpus: 0,
                memory_mb: None,
                time_limit_min: None,
                ranks: 1,
                nodes: 1,
            })
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let handles = rt.block_on(engine.submit(&jobs)).unwrap();
        let names: Vec<&str> = handles.iter().map(|h| h.0.as_str()).collect();
        assert_eq!(names, ["12_0", "12_1", "13_0", "13_1", "14"]);
        let seen = server.join().unwrap();
        let posts: Vec<&Value> = seen.iter().filter(|r| r.0 == "POST").map(|r| &r.3).collect();
        let arrays: Vec<&Value> = posts.iter().map(|b| &b["job"]["array"]).collect();
        assert_eq!(arrays, [&json!("0-1"), &json!("0-1"), &Value::Null]);
        // Each array's script runs its own jobs by task index.
        let script = posts[1]["script"].as_str().unwrap();
        assert!(script.contains("  0) ") && script.contains("2.log") && script.contains("3.log") && !script.contains("4.log"), "{script}");
    }

    /// Against a real slurmrestd's own OpenAPI document (v0.0.38): the submission fits its
    /// schema field for field (nodes as `[min, max]`, the environment a map, GPUs as `gres`),
    /// and its answers are read.
    #[test]
    fn v0038_submissions_fit_a_real_slurmrestd_schema() {
        let (body, path, a, b) = submit_array(
            real_openapi_v0038,
            || json!({"jobs": [{"job_id": 12, "array_task_id": 0, "job_state": "RUNNING"}, {"job_id": 13, "array_task_id": 1, "job_state": "COMPLETED"}]}),
        );
        assert_eq!(path, "/slurm/v0.0.38/job/submit");
        let job = &body["job"];
        assert!(schema_mismatches(&real_openapi_v0038(), "v0.0.38", job).is_empty(), "{job}");
        assert_eq!((job["nodes"].clone(), job["time_limit"].clone(), job["gres"].clone()), (json!([2, 2]), json!(90), json!("gpu:1")));
        assert!(job["environment"].is_object());
        assert_eq!((a, b), (JobState::Running, JobState::Succeeded));
        // What btm sent before this check: `minimum_nodes` is a boolean in v0.0.38.
        let old = json!({"minimum_nodes": 2, "maximum_nodes": 2});
        let problems = schema_mismatches(&real_openapi_v0038(), "v0.0.38", &old);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    /// The v0.0.40 family, chosen from the server's document: the environment a list, limits as
    /// `{set, infinite, number}`, GPUs as `tres_per_node`; job states as lists and task ids as
    /// numbers-with-flags in the answers.
    #[test]
    fn v0040_submissions_take_the_new_shapes() {
        let (body, path, a, b) = submit_array(openapi_v0040, || {
            let id = |n: u64| json!({"set": true, "infinite": false, "number": n});
            json!({"jobs": [
                {"job_id": 12, "array_task_id": id(0), "job_state": ["RUNNING"]},
                {"job_id": 13, "array_task_id": id(1), "job_state": ["COMPLETED", "REQUEUED"]},
            ]})
        });
        assert_eq!(path, "/slurm/v0.0.40/job/submit");
        let job = &body["job"];
        assert!(schema_mismatches(&openapi_v0040(), "v0.0.40", job).is_empty(), "{job}");
        assert_eq!(job["time_limit"], json!({"set": true, "infinite": false, "number": 90}));
        assert_eq!(job["memory_per_cpu"]["number"], 512);
        assert_eq!((job["minimum_nodes"].as_u64(), job["tres_per_node"].as_str()), (Some(2), Some("gres/gpu:1")));
        assert!(job["environment"].as_array().unwrap().iter().all(|e| e.as_str().unwrap().contains('=')), "{job}");
        assert_eq!((a, b), (JobState::Running, JobState::Succeeded));
    }

    /// A poll slurmrestd does not answer leaves the job running (asked again later); only
    /// Slurm's own "Invalid job id" makes it unknown, and a state it reports is taken.
    #[test]
    fn a_failed_poll_is_not_a_failed_job() {
        let (url, server) = fake_api(5, |_, path| match path {
            "/openapi/v3" => (200, real_openapi_v0038()),
            p if p.ends_with("/job/7") => (503, json!({"message": "controller busy"})),
            p if p.ends_with("/job/8") => (500, json!({"errors": [{"error": "Invalid job id specified"}]})),
            p if p.ends_with("/ping") => (200, json!({"pings": [{"ping": "UP"}]})),
            _ => (200, json!({"jobs": [{"job_state": "RUNNING"}]})),
        });
        std::env::set_var("BTM_TEST_SLURM_JWT", "t");
        let spec: EngineSpec =
            serde_yaml::from_str(&format!("{{kind: slurm, api: rest, rest: {{url: '{url}', token_env: BTM_TEST_SLURM_JWT}}}}")).unwrap();
        let run = tempfile::tempdir().unwrap();
        let engine = SlurmEngine::new(&spec, run.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert_eq!(rt.block_on(engine.state(&JobHandle("7".into()))).unwrap(), JobState::Running);
        assert_eq!(rt.block_on(engine.state(&JobHandle("8".into()))).unwrap(), JobState::Failed("unknown to Slurm".into()));
        assert_eq!(rt.block_on(engine.state(&JobHandle("9".into()))).unwrap(), JobState::Running);
        server.join().unwrap();
        // The unanswered handle is remembered as unreachable since its first failed poll.
        assert!(engine.unreachable_since.lock().unwrap().contains_key(&JobHandle("7".into())));
    }
}
