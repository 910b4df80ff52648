//! The Ray engine: each job is a Ray job, submitted, followed and stopped through the Jobs REST
//! API of the cluster's dashboard (`POST /api/jobs/`, `GET /api/jobs/{id}`, `GET …/logs`,
//! `POST …/stop`), with the token from the environment variable the pipeline names sent as
//! `Authorization: Bearer` (Ray's `RAY_AUTH_MODE=token`) and never logged or written.
//!
//! A job's entrypoint is `btm <args>` on whichever node Ray picks: the nodes must see the run
//! folder at the path this machine does (a shared filesystem), or the run lives in an object
//! store, and `btm` must be where the pipeline's `btm` says. Ray runs one process per job, so
//! multi-rank phases and multi-node torchruns are refused at validation.
//!
//! Submissions are idempotent: a job's submission id is btm's job id (an attempt number after
//! it from the second attempt on), so a `btm run` started again finds the Ray job its
//! predecessor submitted and follows it, rather than starting a second trainer on the same
//! outputs. A job's output is Ray's log of it, appended to the job's log when it ends.

use super::{Engine, JobHandle, JobState, Submission, POLL_GIVE_UP};
use crate::pipeline::spec::RaySpec;
use anyhow::{anyhow, bail, Context, Result};
use btm_trainer::external::shell_quote;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Object-store and cache settings that are not secrets, passed to the jobs when set here;
/// credentials come from the nodes' own environment unless `forward_credentials` says
/// otherwise (Ray shows a job's runtime environment to anyone who can read its job list).
const FORWARDED_ENV: [&str; 6] =
    ["BTM_CACHE", "AWS_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP", "BTM_UPLOAD_PART_BYTES"];

/// Prefixes of the variables the object stores read (object_store's `from_env`), credentials
/// among them: passed to the jobs only with `forward_credentials: true`.
const STORE_ENV_PREFIXES: [&str; 3] = ["AWS_", "AZURE_", "GOOGLE_"];

/// Attempts of one job btm looks through for one it may follow before it gives up.
const MAX_ATTEMPTS: u32 = 100;

/// Seconds Ray waits after SIGTERM before it kills a stopped job: trainers checkpoint first.
const STOP_WAIT_S: &str = "60";

pub struct RayEngine {
    api: Api,
    /// `btm` on the nodes, shell-quoted.
    btm: String,
    /// The run folder (a path or an object-store URL): each job's `engine.json`.
    run: PathBuf,
    slots: usize,
    memory_mb: Option<u64>,
    forward_credentials: bool,
    jobs: Mutex<HashMap<JobHandle, Followed>>,
    /// Submission ids of attempts that had succeeded when this run found them, and were
    /// followed for their outputs: a second submission of the job moves past them.
    adopted: Mutex<std::collections::HashSet<String>>,
}

/// What btm keeps about a Ray job it follows.
#[derive(Default)]
struct Followed {
    log: PathBuf,
    time_limit_min: Option<u64>,
    /// Since when polls have found Ray unreachable.
    unreachable_since: Option<Instant>,
    /// The terminal state, once seen (its log is appended then, once).
    finished: Option<JobState>,
}

/// Why a request gave no usable answer.
#[derive(Debug)]
enum Failure {
    /// No answer (connection refused, a timeout) or a server error: the state is unknown.
    Unreachable(String),
    /// 401/403, or an answer that must stop the run.
    Fatal(anyhow::Error),
}

struct Api {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
    token_env: String,
}

impl Api {
    /// One request: the HTTP status and body; 401/403 are a named error that stops the run.
    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<(u16, String), Failure> {
        let mut req = self.client.request(method.clone(), format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let unreachable = |e: reqwest::Error| Failure::Unreachable(format!("{method} {path}: {:#}", anyhow::Error::from(e)));
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        let text = super::answer_text(resp, MAX_ANSWER_BYTES).await.map_err(|e| Failure::Unreachable(format!("{method} {path}: {e:#}")))?;
        if status == 401 || status == 403 {
            return Err(Failure::Fatal(self.refused(status, &text)));
        }
        Ok((status, text))
    }

    fn refused(&self, status: u16, text: &str) -> anyhow::Error {
        let said = ray_error(text);
        match &self.token {
            None => anyhow!(
                "Ray at {} wants an auth token (HTTP {status}: {said}): set the environment variable `{}` (engine.token_env) to the cluster's token",
                self.base,
                self.token_env
            ),
            Some(_) => anyhow!("Ray at {} refused the token in `{}` (HTTP {status}: {said}); wrong or expired?", self.base, self.token_env),
        }
    }

    /// [`Api::send`], asked again while Ray does not answer (a server error that is Ray's own
    /// refusal is an answer), for up to [`POLL_GIVE_UP`].
    async fn send_patiently(&self, method: Method, path: &str, body: Option<&Value>) -> Result<(u16, String)> {
        let start = Instant::now();
        let mut wait = Duration::from_secs(1);
        loop {
            let why = match self.send(method.clone(), path, body).await {
                Ok((status, text)) if status < 500 || refusal(&text) => return Ok((status, text)),
                Ok((status, text)) => format!("HTTP {status}: {}", ray_error(&text)),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Unreachable(why)) => why,
            };
            if start.elapsed() > POLL_GIVE_UP {
                bail!(
                    "Ray at {} has not answered for {} minutes ({why}); its jobs are left to Ray, run again to continue",
                    self.base,
                    POLL_GIVE_UP.as_secs() / 60
                );
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }
}

/// Whether a server error is Ray's refusal of the request: the dashboard answers its job
/// agent's 400 (a duplicate submission id, a bad field) with a 500 whose traceback says so.
pub fn refusal(text: &str) -> bool {
    text.contains("already exists") || text.contains("status code 4")
}

/// What Ray said, in one line: the last line of a traceback (`ValueError: …`), or the text.
pub fn ray_error(text: &str) -> String {
    let line = text.lines().map(str::trim).rfind(|l| !l.is_empty() && *l != ".").unwrap_or("");
    line.chars().take(300).collect()
}

/// Ray's submission id for attempt `attempt` (from 1) of the job `name` with btm's id `id`:
/// letters, digits and `-` only (Ray names files and actors after it).
pub fn submission_id(name: &str, id: &str, attempt: u32) -> String {
    let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).collect();
    match attempt {
        1 => format!("btm-{clean}-{id}"),
        n => format!("btm-{clean}-{id}-{n}"),
    }
}

/// The most of an answer btm reads from Ray: a job's record is a few KiB, its log (`GET
/// /api/jobs/{id}/logs`, appended to the job's log) can be long.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

/// A Ray job's record, from its `GET /api/jobs/{id}` answer.
pub fn job_answer(text: &str) -> Result<Value> {
    Ok(serde_json::from_str(text)?)
}

/// A Ray job's state from its `GET /api/jobs/{id}` answer.
pub fn to_state(v: &Value) -> JobState {
    let status = v["status"].as_str().unwrap_or("");
    match status {
        "SUCCEEDED" => JobState::Succeeded,
        "FAILED" | "STOPPED" => {
            // Ray's message goes on with the log's tail, which the job's log has in full.
            let message = v["message"].as_str().and_then(|m| m.lines().next()).unwrap_or("");
            let message = message.split(", last available logs").next().unwrap_or("");
            let code = v["driver_exit_code"].as_i64().map_or(String::new(), |c| format!(" (exit {c})"));
            JobState::Failed(format!("Ray job {} {status}{code}: {message}", v["submission_id"].as_str().unwrap_or("?")))
        }
        // PENDING, RUNNING, and any state a newer Ray adds: unfinished, asked again (failing a
        // job that runs would start a second trainer on its outputs).
        _ => JobState::Running,
    }
}

impl RayEngine {
    /// The engine for `spec`, its jobs' files in `run`; the address and token are checked now
    /// (`GET /api/version`), so a wrong one is a named error before any job starts.
    pub async fn connect(spec: &RaySpec, run: &Path) -> Result<Self> {
        let token = std::env::var(&spec.token_env).ok().filter(|t| !t.is_empty());
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30)).connect_timeout(Duration::from_secs(10));
        if let Some(file) = &spec.ca_cert {
            let pem = std::fs::read(file).with_context(|| format!("engine.ca_cert: reading {file}"))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("engine.ca_cert: {file} is not PEM certificates"))?;
            builder = builder.tls_certs_merge(certs);
        }
        let api = Api {
            client: builder.build()?,
            base: spec.address.trim_end_matches('/').to_string(),
            token,
            token_env: spec.token_env.clone(),
        };
        match api.send(Method::GET, "/api/version", None).await {
            Err(Failure::Unreachable(why)) if why.contains("certificate") => bail!(
                "engine.address: the TLS certificate of {} is not trusted ({why}); name its CA in engine.ca_cert (or SSL_CERT_FILE)",
                api.base
            ),
            Err(Failure::Unreachable(why)) => bail!("engine.address: no Ray dashboard answers at {} ({why})", api.base),
            Err(Failure::Fatal(e)) => return Err(e),
            Ok((200, text)) if serde_json::from_str::<Value>(&text).is_ok_and(|v| v["ray_version"].is_string()) => {}
            Ok((status, text)) => {
                bail!("engine.address: {} is not a Ray dashboard (GET /api/version: HTTP {status}: {})", api.base, ray_error(&text))
            }
        }
        let btm = match &spec.btm {
            Some(b) => b.clone(),
            None => std::env::current_exe().context("locating the btm binary")?.to_string_lossy().into_owned(),
        };
        Ok(Self {
            api,
            btm: shell_quote(&btm),
            run: run.to_path_buf(),
            slots: spec.slots.max(1),
            memory_mb: spec.memory_mb,
            forward_credentials: spec.forward_credentials,
            jobs: Mutex::new(HashMap::new()),
            adopted: Default::default(),
        })
    }

    /// The job's folder in the run (as [`crate::plan::Job::dir`] names it).
    fn job_dir(&self, job: &Submission) -> PathBuf {
        self.run.join("jobs").join(job.name.replace('/', "-"))
    }

    /// The `POST /api/jobs/` body for `job` (all but its submission id).
    fn request(&self, job: &Submission, id: &str) -> Result<Value> {
        let mut entrypoint = std::iter::once(self.btm.clone()).chain(job.args.iter().map(|a| shell_quote(a))).collect::<Vec<_>>().join(" ");
        // A run in a relative folder is named relative to where `btm run` started, in the
        // jobs' arguments too; Ray starts entrypoints in a folder of its own.
        if self.run.is_relative() && !btm_model::folder::is_remote(&self.run.to_string_lossy()) {
            let here = std::env::current_dir()?;
            entrypoint = format!("cd {} && {entrypoint}", shell_quote(&here.to_string_lossy()));
        }
        let cpus = job.cpus.max(1);
        let mut env = json!({"RAYON_NUM_THREADS": cpus.to_string(), "RAY_JOB_STOP_WAIT_TIME_S": STOP_WAIT_S});
        for key in FORWARDED_ENV {
            if let Ok(value) = std::env::var(key) {
                env[key] = json!(value);
            }
        }
        if self.forward_credentials {
            for (key, value) in std::env::vars() {
                // Never the Ray token, whatever variable holds it.
                if STORE_ENV_PREFIXES.iter().any(|p| key.starts_with(p)) && key != self.api.token_env {
                    env[key] = json!(value);
                }
            }
        }
        let mut body = json!({
            "entrypoint": entrypoint,
            "metadata": {"btm_job": job.name, "btm_job_id": id, "btm_run": self.run.to_string_lossy()},
            "runtime_env": {"env_vars": env},
            "entrypoint_num_cpus": cpus,
        });
        if job.gpus > 0 {
            body["entrypoint_num_gpus"] = json!(job.gpus);
        }
        if let Some(mb) = job.memory_mb.or(self.memory_mb) {
            body["entrypoint_memory"] = json!(mb * 1024 * 1024);
        }
        Ok(body)
    }

    /// Submit `job`, or follow the Ray job an earlier `btm run` submitted for it.
    async fn submit_one(&self, job: &Submission) -> Result<JobHandle> {
        let id = job.id.clone();
        let mut body = self.request(job, &id)?;
        for attempt in 1..=MAX_ATTEMPTS {
            let sid = submission_id(&job.name, &id, attempt);
            body["submission_id"] = json!(sid);
            if self.submit_or_follow(&body, &sid).await? {
                let handle = JobHandle(sid);
                let record = json!({"engine": "ray", "address": self.api.base, "job": handle.0});
                crate::executor::folder(&self.run)?.write(self.job_dir(job).join("engine.json"), &serde_json::to_vec_pretty(&record)?)?;
                let followed = Followed { log: job.log.clone(), time_limit_min: job.time_limit_min, ..Default::default() };
                self.jobs.lock().expect("lock").insert(handle.clone(), followed);
                return Ok(handle);
            }
        }
        bail!(
            "job {}: {MAX_ATTEMPTS} attempts of it have ended on Ray already ({}…); delete them to try again",
            job.name,
            submission_id(&job.name, &id, 1)
        )
    }

    /// Submit `body` as Ray job `sid`: true when submitted now, or already submitted with the
    /// same entrypoint and metadata and unfinished, or succeeded and not followed before
    /// (followed); false when an earlier attempt of this job holds the id and has failed, or
    /// was followed already.
    async fn submit_or_follow(&self, body: &Value, sid: &str) -> Result<bool> {
        let (status, text) = self.api.send_patiently(Method::POST, "/api/jobs/", Some(body)).await?;
        if (200..300).contains(&status) {
            return Ok(true);
        }
        if !text.contains("already exists") {
            bail!("Ray refused job {sid} (HTTP {status}): {}", ray_error(&text));
        }
        let (status, text) = self.api.send_patiently(Method::GET, &format!("/api/jobs/{sid}"), None).await?;
        let existing: Value = match status {
            200 => job_answer(&text).with_context(|| format!("Ray's answer about job {sid} is not JSON"))?,
            // Deleted between the two requests: the id is free again.
            404 => return Box::pin(self.submit_or_follow(body, sid)).await,
            _ => bail!("Ray job {sid} exists but cannot be read (HTTP {status}): {}", ray_error(&text)),
        };
        if existing["entrypoint"] != body["entrypoint"] || existing["metadata"] != body["metadata"] {
            bail!(
                "Ray job `{sid}` already exists with another entrypoint or metadata, so it is not this run's job: \
                 refusing to follow it (its entrypoint: `{}`); delete it (`ray job delete {sid}`) to run this one",
                existing["entrypoint"].as_str().unwrap_or("?")
            );
        }
        match to_state(&existing) {
            JobState::Running => Ok(true),
            // It ended well after its `btm run` stopped: follow it once, so that its outputs are
            // taken without training again. If they are incomplete, the retry moves on.
            JobState::Succeeded => Ok(self.adopted.lock().expect("lock").insert(sid.to_string())),
            JobState::Failed(_) => Ok(false),
        }
    }

    /// The job's state from Ray; `Failure::Unreachable` when Ray could not be asked.
    async fn poll(&self, handle: &JobHandle) -> Result<JobState, Failure> {
        let (status, text) = self.api.send(Method::GET, &format!("/api/jobs/{}", handle.0), None).await?;
        match status {
            200 => {}
            // Ray's word that it does not know the job: a head restarted without its job table,
            // or the job deleted. It will not finish; a retry submits it again.
            404 => return Ok(JobState::Failed(format!("Ray no longer knows job {} (the head restarted, or it was deleted)", handle.0))),
            s if s >= 500 => return Err(Failure::Unreachable(format!("HTTP {s}: {}", ray_error(&text)))),
            s => return Err(Failure::Fatal(anyhow!("Ray job {}: HTTP {s}: {}", handle.0, ray_error(&text)))),
        }
        // Not JSON: a proxy's error page in front of the dashboard; ask again.
        let v: Value = job_answer(&text).map_err(|e| Failure::Unreachable(format!("answer not JSON: {e}")))?;
        let state = to_state(&v);
        let limit = self.jobs.lock().expect("lock").get(handle).and_then(|f| f.time_limit_min);
        if let (JobState::Running, Some(min), Some(started)) = (&state, limit, v["start_time"].as_u64()) {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            if now.saturating_sub(started) > min * 60_000 {
                self.cancel(handle).await.map_err(Failure::Fatal)?;
                return Ok(JobState::Failed(format!("Ray job {} ran past its time limit of {min} min and was stopped", handle.0)));
            }
        }
        Ok(state)
    }

    /// Append Ray's log of a finished job to the job's log (best effort: a note when Ray
    /// cannot give it).
    async fn append_log(&self, handle: &JobHandle, log: &Path) {
        let text = match self.api.send(Method::GET, &format!("/api/jobs/{}/logs", handle.0), None).await {
            Ok((200, body)) => serde_json::from_str::<Value>(&body).ok().and_then(|v| v["logs"].as_str().map(str::to_string)),
            _ => None,
        };
        let text = text.unwrap_or_else(|| format!("btm: Ray could not give the log of job {}\n", handle.0));
        if let Some(dir) = log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = f.write_all(text.as_bytes());
        }
    }
}

#[async_trait::async_trait]
impl Engine for RayEngine {
    fn slots(&self) -> usize {
        self.slots
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(500)
    }

    async fn submit(&self, jobs: &[Submission]) -> Result<Vec<JobHandle>> {
        let mut handles = vec![];
        for job in jobs {
            handles.push(self.submit_one(job).await?);
        }
        Ok(handles)
    }

    async fn state(&self, handle: &JobHandle) -> Result<JobState> {
        if let Some(done) = self.jobs.lock().expect("lock").get(handle).and_then(|f| f.finished.clone()) {
            return Ok(done);
        }
        let state = match self.poll(handle).await {
            Ok(state) => state,
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Unreachable(why)) => {
                let since =
                    *self.jobs.lock().expect("lock").entry(handle.clone()).or_default().unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > POLL_GIVE_UP {
                    bail!(
                        "Ray at {} has not answered for {} minutes about job {} ({why}); its jobs are left to Ray, run again to continue",
                        self.api.base,
                        POLL_GIVE_UP.as_secs() / 60,
                        handle.0
                    );
                }
                // Unknown, not failed: ask again at the next poll.
                return Ok(JobState::Running);
            }
        };
        let log = {
            let mut jobs = self.jobs.lock().expect("lock");
            let followed = jobs.entry(handle.clone()).or_default();
            followed.unreachable_since = None;
            if state != JobState::Running {
                followed.finished = Some(state.clone());
            }
            followed.log.clone()
        };
        if state != JobState::Running && !log.as_os_str().is_empty() {
            self.append_log(handle, &log).await;
        }
        Ok(state)
    }

    async fn cancel(&self, handle: &JobHandle) -> Result<()> {
        let (status, text) = match self.api.send(Method::POST, &format!("/api/jobs/{}/stop", handle.0), None).await {
            Ok(answer) => answer,
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Unreachable(why)) => bail!("stopping Ray job {}: {why}", handle.0),
        };
        // 404: gone already.
        if !(200..300).contains(&status) && status != 404 {
            bail!("stopping Ray job {}: HTTP {status}: {}", handle.0, ray_error(&text));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake_http::fake_api;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A real answer of Ray 2.60's dashboard to a second `POST /api/jobs/` with the same
    /// submission id: its job agent's 400, wrapped in a 500 with the traceback.
    const DUPLICATE: &str = "Traceback (most recent call last):\n  File \"job_head.py\", line 419, in submit_job\nRuntimeError: Request failed with status code 400: Traceback (most recent call last):\n  File \"job_manager.py\", line 553, in submit_job\n    raise ValueError(\nValueError: Job with submission_id t1 already exists. Please use a different submission_id.\n.\n";

    #[test]
    fn ray_answers_are_read() {
        assert!(refusal(DUPLICATE));
        assert!(!refusal("No available agent to submit job, please try again later."));
        assert_eq!(ray_error(DUPLICATE), "ValueError: Job with submission_id t1 already exists. Please use a different submission_id.");
        assert_eq!(submission_id("expert/code", "0123abcd", 1), "btm-expert-code-0123abcd");
        assert_eq!(submission_id("eval/merged/code", "0123abcd", 3), "btm-eval-merged-code-0123abcd-3");
        let answer = |status: &str| json!({"submission_id": "s", "status": status, "message": "Job entrypoint command failed with exit code 1, last available logs:\nboom", "driver_exit_code": 1});
        assert_eq!(to_state(&answer("PENDING")), JobState::Running);
        assert_eq!(to_state(&answer("RUNNING")), JobState::Running);
        assert_eq!(to_state(&answer("SUCCEEDED")), JobState::Succeeded);
        assert_eq!(
            to_state(&answer("FAILED")),
            JobState::Failed("Ray job s FAILED (exit 1): Job entrypoint command failed with exit code 1".into())
        );
        assert!(matches!(to_state(&answer("STOPPED")), JobState::Failed(m) if m.starts_with("Ray job s STOPPED")));
    }

    fn submission(run: &Path) -> Submission {
        Submission {
            id: "abc".into(),
            name: "expert/code".into(),
            args: vec!["train".into(), "--job".into(), "/r/it's.yaml".into()],
            log: run.join("logs/expert-code.log"),
            cpus: 2,
            gpus: 1,
            memory_mb: Some(3),
            time_limit_min: None,
            ranks: 1,
            nodes: 1,
        }
    }

    /// A resubmission finds its id taken: an ended attempt of the same job moves on to the
    /// next id; a job under that id with another entrypoint is refused by name. The body
    /// carries the shell-quoted command and the resources.
    #[test]
    fn resubmissions_skip_ended_attempts_and_refuse_foreign_jobs() {
        let run = tempfile::tempdir().unwrap();
        let metadata = json!({"btm_job": "expert/code", "btm_job_id": "abc", "btm_run": run.path().to_string_lossy()});
        let entrypoint = "/opt/btm train --job '/r/it'\\''s.yaml'";
        let gets = AtomicUsize::new(0);
        let (url, server) = fake_api(5, move |method, path| match (method, path) {
            ("GET", "/api/version") => (200, json!({"ray_version": "2.60.0"})),
            ("POST", _) => (500, json!(DUPLICATE)),
            // The first attempt (this job's: same entrypoint and metadata) has failed.
            ("GET", _) if gets.fetch_add(1, Ordering::SeqCst) == 0 => {
                (200, json!({"status": "FAILED", "entrypoint": entrypoint, "metadata": metadata}))
            }
            _ => (200, json!({"status": "RUNNING", "entrypoint": "python other.py", "metadata": {}})),
        });
        let spec: RaySpec = serde_yaml::from_str(&format!("{{address: '{url}', token_env: BTM_TEST_RAY_TOKEN, btm: /opt/btm}}")).unwrap();
        std::env::set_var("BTM_TEST_RAY_TOKEN", "secret");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let engine = rt.block_on(RayEngine::connect(&spec, run.path())).unwrap();
        let err = rt.block_on(engine.submit(&[submission(run.path())])).unwrap_err().to_string();
        let seen = server.join().unwrap();
        assert!(err.contains("Ray job `btm-expert-code-abc-2` already exists with another entrypoint"), "{err}");
        assert!(err.contains("python other.py"), "{err}");
        let posts: Vec<&Value> = seen.iter().filter(|r| r.0 == "POST").map(|r| &r.3).collect();
        let ids: Vec<&str> = posts.iter().map(|p| p["submission_id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["btm-expert-code-abc", "btm-expert-code-abc-2"]);
        assert_eq!(posts[0]["entrypoint"], entrypoint);
        assert_eq!((posts[0]["entrypoint_num_cpus"].as_u64(), posts[0]["entrypoint_num_gpus"].as_u64()), (Some(2), Some(1)));
        assert_eq!(posts[0]["entrypoint_memory"].as_u64(), Some(3 * 1024 * 1024));
        assert_eq!(posts[0]["runtime_env"]["env_vars"]["RAYON_NUM_THREADS"], "2");
        assert!(seen.iter().all(|r| r.2 == "Bearer secret"), "{seen:?}");
    }

    /// An attempt that succeeded after its `btm run` was killed is followed (its outputs are
    /// taken as they are), once: if the job is submitted again (its outputs were incomplete),
    /// the next attempt is submitted.
    #[test]
    fn a_succeeded_attempt_is_followed_once() {
        let run = tempfile::tempdir().unwrap();
        let metadata = json!({"btm_job": "expert/code", "btm_job_id": "abc", "btm_run": run.path().to_string_lossy()});
        let entrypoint = "/opt/btm train --job '/r/it'\\''s.yaml'";
        let (url, server) = fake_api(7, move |method, path| match (method, path) {
            ("GET", "/api/version") => (200, json!({"ray_version": "2.60.0"})),
            ("POST", _) => (500, json!(DUPLICATE)),
            _ => (200, json!({"status": "SUCCEEDED", "entrypoint": entrypoint, "metadata": metadata})),
        });
        let spec: RaySpec = serde_yaml::from_str(&format!("{{address: '{url}', token_env: BTM_TEST_RAY_TOKEN, btm: /opt/btm}}")).unwrap();
        std::env::set_var("BTM_TEST_RAY_TOKEN", "secret");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let engine = rt.block_on(RayEngine::connect(&spec, run.path())).unwrap();
        let first = rt.block_on(engine.submit(&[submission(run.path())])).unwrap();
        assert_eq!(first[0].0, "btm-expert-code-abc");
        let second = rt.block_on(engine.submit(&[submission(run.path())])).unwrap();
        assert_eq!(second[0].0, "btm-expert-code-abc-2");
        server.join().unwrap();
    }

    /// Object-store variables go to the jobs only with `forward_credentials`, and the Ray token
    /// never, even in a variable with a store's prefix.
    #[test]
    fn credentials_are_forwarded_only_when_asked() {
        std::env::set_var("AWS_BTM_TEST_FORWARDED_KEY", "key-1");
        std::env::set_var("AWS_BTM_TEST_RAY_TOKEN", "token-1");
        let run = tempfile::tempdir().unwrap();
        let engine = |forward_credentials| RayEngine {
            api: Api { client: reqwest::Client::new(), base: "http://ray".into(), token: None, token_env: "AWS_BTM_TEST_RAY_TOKEN".into() },
            btm: "btm".into(),
            run: run.path().to_path_buf(),
            slots: 1,
            memory_mb: None,
            forward_credentials,
            jobs: Mutex::new(HashMap::new()),
            adopted: Default::default(),
        };
        let env = |forward| engine(forward).request(&submission(run.path()), "abc").unwrap()["runtime_env"]["env_vars"].clone();
        assert!(env(false).get("AWS_BTM_TEST_FORWARDED_KEY").is_none(), "{}", env(false));
        let forwarded = env(true);
        assert_eq!(forwarded["AWS_BTM_TEST_FORWARDED_KEY"], "key-1");
        assert!(!forwarded.to_string().contains("token-1"), "{forwarded}");
    }

    /// A poll Ray does not answer leaves the job running; Ray's 404 fails it; 401 stops the
    /// run with the token's variable named and the token itself nowhere.
    #[test]
    fn failed_polls_are_not_failed_jobs() {
        let (url, server) = fake_api(4, |_, path| match path {
            "/api/version" => (200, json!({"ray_version": "2.60.0"})),
            "/api/jobs/a" => (503, json!("busy")),
            "/api/jobs/b" => (404, json!("Job b does not exist")),
            _ => (403, json!("Forbidden: Invalid authentication token")),
        });
        std::env::set_var("BTM_TEST_RAY_TOKEN_2", "secret-2");
        let spec: RaySpec = serde_yaml::from_str(&format!("{{address: '{url}/', token_env: BTM_TEST_RAY_TOKEN_2}}")).unwrap();
        let run = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let engine = rt.block_on(RayEngine::connect(&spec, run.path())).unwrap();
        assert_eq!(rt.block_on(engine.state(&JobHandle("a".into()))).unwrap(), JobState::Running);
        assert!(matches!(rt.block_on(engine.state(&JobHandle("b".into()))).unwrap(), JobState::Failed(m) if m.contains("no longer knows")));
        let err = rt.block_on(engine.state(&JobHandle("c".into()))).unwrap_err().to_string();
        assert!(err.contains("refused the token in `BTM_TEST_RAY_TOKEN_2`") && !err.contains("secret-2"), "{err}");
        server.join().unwrap();
        assert!(engine.jobs.lock().unwrap()[&JobHandle("a".into())].unreachable_since.is_some());
    }
}
