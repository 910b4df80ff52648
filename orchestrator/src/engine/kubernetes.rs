//! The Kubernetes engine: each batch of jobs that become ready together (the per-domain
//! trainers of a stage) is one Indexed Job (`completionMode: Indexed`); `JOB_COMPLETION_INDEX`
//! picks the task. Jobs are created, polled and deleted through the API server's REST
//! interface (`/apis/batch/v1/namespaces/{ns}/jobs`) with credentials from a kubeconfig or the
//! in-cluster service account.
//!
//! A job of several processes gets several consecutive indices, one pod each, and a headless
//! Service that names the pods: the nodes of an external torchrun (told `BTM_NODE_RANK` and the
//! rendezvous), or the ranks of btm's own trainer, which meet over the TCP collective
//! (`RANK`, `WORLD_SIZE`, `MASTER_ADDR` = the job's first pod, `MASTER_PORT`).
//!
//! The pods see the run folder at the same path as `btm run` (mount a ReadWriteMany volume
//! there, `volume` in the pipeline), or the run lives in an object store and the pods read
//! the store's credentials from a Secret (`env_from_secret`). Not yet run against a live cluster: the manifests are
//! checked against the official schema and the REST calls against a fake API server in tests.

use super::{Engine, JobHandle, JobState, Submission};
use crate::pipeline::spec::KubernetesSpec;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Object-store settings that are not secrets, passed to the pods when set here.
const FORWARDED_ENV: [&str; 5] = ["AWS_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP", "BTM_UPLOAD_PART_BYTES"];

/// The Indexed Job manifest for `jobs`, run by `spec.image` with the run folder mounted.
pub fn manifest(spec: &KubernetesSpec, run: &Path, name: &str, jobs: &[Submission]) -> Value {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    // A job of several pods (nodes of a torchrun, ranks of btm's trainer) takes that many
    // consecutive indices: index i is pod i % pods of job i / pods, and the job's rendezvous is
    // on its first pod, reached by its stable name through the headless Service of the same
    // name ([`headless_service`]).
    let pods = pods_per_job(&jobs[0]);
    let first_pod = format!("{name}-$((J * {pods})).{name}");
    let mut script = if jobs[0].nodes > 1 {
        use btm_trainer::external::{NODE_RANK, RDZV_ENDPOINT, RDZV_ID};
        format!(
            "J=$((JOB_COMPLETION_INDEX / {pods}))\nexport {NODE_RANK}=$((JOB_COMPLETION_INDEX % {pods})) {RDZV_ID}=\"{name}-$J\" \
             {RDZV_ENDPOINT}=\"{first_pod}:{RDZV_PORT}\"\ncase \"$J\" in\n"
        )
    } else if pods > 1 {
        // btm's own ranks meet over the TCP collective (`collective: tcp`), PyTorch-style.
        format!(
            "J=$((JOB_COMPLETION_INDEX / {pods}))\nexport RANK=$((JOB_COMPLETION_INDEX % {pods})) WORLD_SIZE={pods} \
             MASTER_ADDR=\"{first_pod}\" MASTER_PORT={RDZV_PORT}\ncase \"$J\" in\n"
        )
    } else {
        String::from("case \"$JOB_COMPLETION_INDEX\" in\n")
    };
    for (i, j) in jobs.iter().enumerate() {
        let args: Vec<String> = j.args.iter().map(|a| quote(a)).collect();
        // With the run folder mounted the log goes next to it; a run in an object store has no
        // shared folder, so the pod's output is the log.
        let redirect = match spec.volume {
            Some(_) => format!(" >> {} 2>&1", quote(&j.log.to_string_lossy())),
            None => " 2>&1".into(),
        };
        script.push_str(&format!("  {i}) exec {} {}{redirect} ;;\n", quote(&spec.btm), args.join(" ")));
    }
    script.push_str("  *) echo \"btm: no task for index $JOB_COMPLETION_INDEX\" >&2; exit 2 ;;\nesac\n");
    let cpus = jobs[0].cpus.max(1);
    let mut requests = json!({"cpu": cpus.to_string()});
    let mut limits = json!({});
    if let Some(m) = jobs[0].memory_mb.or(spec.memory_mb) {
        requests["memory"] = json!(format!("{m}Mi"));
        limits["memory"] = json!(format!("{m}Mi"));
    }
    if jobs[0].gpus > 0 {
        limits["nvidia.com/gpu"] = json!(jobs[0].gpus.to_string());
    }
    // The object store's non-secret settings follow the submitting environment; credentials
    // come from `env_from_secret`, never from here.
    let mut env = vec![json!({"name": "RAYON_NUM_THREADS", "value": cpus.to_string()})];
    for key in FORWARDED_ENV {
        if let Ok(value) = std::env::var(key) {
            env.push(json!({"name": key, "value": value}));
        }
    }
    let mut container = json!({
        "name": "btm",
        "image": spec.image,
        "command": ["/bin/sh", "-c", script],
        "env": env,
        "resources": {"requests": requests, "limits": limits},
    });
    if let Some(secret) = &spec.env_from_secret {
        container["envFrom"] = json!([{"secretRef": {"name": secret}}]);
    }
    let mut pod = json!({"restartPolicy": "Never", "containers": []});
    if let Some(v) = &spec.volume {
        container["workingDir"] = json!(run.to_string_lossy());
        container["volumeMounts"] = json!([{"name": "runs", "mountPath": v.mount_path}]);
        pod["volumes"] = json!([{"name": "runs", "persistentVolumeClaim": {"claimName": v.claim}}]);
    }
    if let Some(sa) = &spec.service_account {
        pod["serviceAccountName"] = json!(sa);
    }
    if pods > 1 {
        // Pod i is `<name>-i.<name>`: its hostname, under the headless Service's domain.
        pod["subdomain"] = json!(name);
    }
    pod["containers"] = json!([container]);
    let indices = jobs.len() * pods;
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": spec.namespace, "labels": {"app.kubernetes.io/managed-by": "btm"}},
        "spec": {
            "completionMode": "Indexed",
            "completions": indices,
            // Every pod of a multi-pod job must run at once to meet at the rendezvous.
            "parallelism": indices,
            // Retries per index: a failed trainer restarts and resumes from its checkpoint.
            "backoffLimitPerIndex": spec.backoff_limit,
            "maxFailedIndexes": indices,
            "ttlSecondsAfterFinished": 86400,
            "template": {"metadata": {"labels": {"app.kubernetes.io/managed-by": "btm"}}, "spec": pod},
        },
    })
}

/// The pods of one job: its nodes (an external torchrun), or its ranks (btm's trainer over the
/// TCP collective, one process per pod), else one.
pub fn pods_per_job(job: &Submission) -> usize {
    job.nodes.max(job.ranks).max(1)
}

/// The port of a multi-pod job's rendezvous on its first pod (torchrun's default).
pub const RDZV_PORT: u16 = 29500;

/// The headless Service that gives a multi-node Indexed Job's pods stable names
/// (`<job>-<index>.<job>`), so every node finds the rendezvous on the first. Owned by the Job
/// (`job_uid`), so it goes when the Job does.
pub fn headless_service(spec: &KubernetesSpec, name: &str, job_uid: Option<&str>) -> Value {
    let mut metadata = json!({"name": name, "namespace": spec.namespace, "labels": {"app.kubernetes.io/managed-by": "btm"}});
    if let Some(uid) = job_uid {
        metadata["ownerReferences"] = json!([{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid}]);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "clusterIP": "None",
            "selector": {"batch.kubernetes.io/job-name": name},
            // Names resolve while the pods start, before any readiness.
            "publishNotReadyAddresses": true,
            "ports": [{"name": "rendezvous", "port": RDZV_PORT, "protocol": "TCP"}],
        },
    })
}

/// A Kubernetes object name: lowercase letters, digits and `-`, at most 63 characters.
pub fn object_name(run: &str, batch: &str) -> String {
    let clean = |s: &str| -> String { s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect() };
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() % 1_000_000);
    let mut name = format!("btm-{}-{}", clean(run), clean(batch));
    name.truncate(63 - 7);
    format!("{}-{stamp:06}", name.trim_end_matches('-'))
}

/// Where and how to reach the API server.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub server: String,
    pub token: Option<String>,
    pub ca_pem: Option<Vec<u8>>,
}

impl Credentials {
    /// From the in-cluster service account, else `$KUBECONFIG` or `~/.kube/config` (its current
    /// context's server, bearer token and CA).
    pub fn discover() -> Result<Self> {
        let sa = Path::new("/var/run/secrets/kubernetes.io/serviceaccount");
        if let (Ok(host), Ok(port)) = (std::env::var("KUBERNETES_SERVICE_HOST"), std::env::var("KUBERNETES_SERVICE_PORT")) {
            return Ok(Self {
                server: format!("https://{host}:{port}"),
                token: Some(std::fs::read_to_string(sa.join("token")).context("reading the service-account token")?.trim().into()),
                ca_pem: std::fs::read(sa.join("ca.crt")).ok(),
            });
        }
        let path = std::env::var_os("KUBECONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")))
            .context("no kubeconfig: set KUBECONFIG")?;
        Self::from_kubeconfig(&std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?)
    }

    pub fn from_kubeconfig(text: &str) -> Result<Self> {
        let cfg: serde_yaml::Value = serde_yaml::from_str(text).context("kubeconfig is not YAML")?;
        let current = cfg["current-context"].as_str().context("kubeconfig: no current-context")?;
        let find = |list: &str, name: &str| -> Option<serde_yaml::Value> {
            cfg[list].as_sequence()?.iter().find(|e| e["name"].as_str() == Some(name)).cloned()
        };
        let ctx = find("contexts", current).with_context(|| format!("kubeconfig: no context `{current}`"))?;
        let cluster_name = ctx["context"]["cluster"].as_str().unwrap_or_default().to_string();
        let user_name = ctx["context"]["user"].as_str().unwrap_or_default().to_string();
        let cluster = find("clusters", &cluster_name).with_context(|| format!("kubeconfig: no cluster `{cluster_name}`"))?;
        let server = cluster["cluster"]["server"].as_str().context("kubeconfig: the cluster has no server")?.to_string();
        use base64_decode as b64;
        let ca_pem = match cluster["cluster"]["certificate-authority-data"].as_str() {
            Some(d) => Some(b64(d)?),
            None => cluster["cluster"]["certificate-authority"].as_str().and_then(|p| std::fs::read(p).ok()),
        };
        let token = find("users", &user_name).and_then(|u| u["user"]["token"].as_str().map(String::from));
        Ok(Self { server, token, ca_pem })
    }
}

/// Standard base64 (kubeconfig's `*-data` fields).
fn base64_decode(s: &str) -> Result<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut buf, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c).context("invalid base64 in kubeconfig")? as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

pub struct KubernetesEngine {
    spec: KubernetesSpec,
    run: PathBuf,
    run_name: String,
    client: reqwest::Client,
    creds: Credentials,
    /// Since when polls of each Job have found the API server unreachable.
    unreachable_since: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl KubernetesEngine {
    pub fn new(spec: &KubernetesSpec, run: &Path, creds: Credentials) -> Result<Self> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(pem) = &creds.ca_pem {
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem).context("the cluster CA certificate")?);
        }
        Ok(Self {
            spec: spec.clone(),
            run: run.to_path_buf(),
            run_name: run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into()),
            client: builder.build()?,
            creds,
            unreachable_since: Default::default(),
        })
    }

    fn jobs_url(&self) -> String {
        format!("{}/apis/batch/v1/namespaces/{}/jobs", self.creds.server.trim_end_matches('/'), self.spec.namespace)
    }

    fn services_url(&self) -> String {
        format!("{}/api/v1/namespaces/{}/services", self.creds.server.trim_end_matches('/'), self.spec.namespace)
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let req = match &self.creds.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.context("Kubernetes API server")?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            bail!("the Kubernetes API server refused the credentials: HTTP {status}: {}", body["message"].as_str().unwrap_or(""));
        }
        if !status.is_success() {
            bail!("Kubernetes API: HTTP {status}: {}", body["message"].as_str().unwrap_or("no message"));
        }
        Ok(body)
    }
}

#[async_trait::async_trait]
impl Engine for KubernetesEngine {
    fn slots(&self) -> usize {
        self.spec.slots
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_secs(2)
    }

    async fn submit(&self, jobs: &[Submission]) -> Result<Vec<JobHandle>> {
        if self.spec.volume.is_some() {
            std::fs::create_dir_all(self.run.join("logs"))?;
        }
        let batch = jobs[0].name.split('/').next().unwrap_or("job");
        let name = object_name(&self.run_name, batch);
        let m = manifest(&self.spec, &self.run, &name, jobs);
        let created = self.call(self.client.post(self.jobs_url()).json(&m)).await?;
        let pods = pods_per_job(&jobs[0]);
        if pods > 1 {
            let svc = headless_service(&self.spec, &name, created["metadata"]["uid"].as_str());
            self.call(self.client.post(self.services_url()).json(&svc)).await?;
        }
        // A job's handle names its indices: `name/i`, or `name/first-last` across its pods.
        Ok((0..jobs.len())
            .map(|j| match pods {
                1 => JobHandle(format!("{name}/{j}")),
                n => JobHandle(format!("{name}/{}-{}", j * n, j * n + n - 1)),
            })
            .collect())
    }

    async fn state(&self, handle: &JobHandle) -> Result<JobState> {
        let (name, indices) = handle.0.rsplit_once('/').context("kubernetes job handle")?;
        let (first, last) = match indices.split_once('-') {
            Some((a, b)) => (a.parse::<u64>()?, b.parse::<u64>()?),
            None => (indices.parse::<u64>()?, indices.parse::<u64>()?),
        };
        let job = match self.call(self.client.get(format!("{}/{name}", self.jobs_url()))).await {
            Ok(job) => {
                self.unreachable_since.lock().expect("lock").remove(name);
                job
            }
            Err(e) if e.to_string().contains("refused the credentials") => return Err(e),
            Err(e) if e.to_string().contains("HTTP 404") => return Ok(JobState::Failed(format!("the Job {name} is gone (deleted?)"))),
            // No answer or a transient error (5xx, 429, a timeout): unknown, not failed; ask again.
            Err(e) => {
                let since = *self.unreachable_since.lock().expect("lock").entry(name.to_string()).or_insert_with(std::time::Instant::now);
                if since.elapsed() > super::POLL_GIVE_UP {
                    bail!("the Kubernetes API server has not answered about Job {name} for {} minutes ({e:#}); its pods are left running, run again to continue", super::POLL_GIVE_UP.as_secs() / 60);
                }
                return Ok(JobState::Running);
            }
        };
        let states: Vec<JobState> = (first..=last).map(|i| index_state(&job["status"], i)).collect();
        // A job is done when every node is; it failed when any node gave up.
        Ok(match states.iter().find(|s| matches!(s, JobState::Failed(_))) {
            Some(failed) => failed.clone(),
            None if states.iter().all(|s| *s == JobState::Succeeded) => JobState::Succeeded,
            None => JobState::Running,
        })
    }

    async fn cancel(&self, handle: &JobHandle) -> Result<()> {
        let (name, _) = handle.0.rsplit_once('/').context("kubernetes job handle")?;
        // Deleting the Job sends SIGTERM to its pods (trainers checkpoint), then SIGKILL after
        // the grace period.
        let url = format!("{}/{name}?propagationPolicy=Background", self.jobs_url());
        match self.call(self.client.delete(url)).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("404") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Whether `index` is in a Job status interval list like "0,2-4".
fn in_ranges(list: &str, index: u64) -> bool {
    list.split(',').filter(|p| !p.is_empty()).any(|part| match part.split_once('-') {
        Some((a, b)) => a.parse::<u64>().is_ok_and(|a| a <= index) && b.parse::<u64>().is_ok_and(|b| index <= b),
        None => part.parse::<u64>() == Ok(index),
    })
}

/// The state of one index of an Indexed Job from its `status`.
pub fn index_state(status: &Value, index: u64) -> JobState {
    if in_ranges(status["completedIndexes"].as_str().unwrap_or(""), index) {
        JobState::Succeeded
    } else if in_ranges(status["failedIndexes"].as_str().unwrap_or(""), index) {
        JobState::Failed("the Kubernetes Job gave up on this index (backoffLimitPerIndex)".into())
    } else {
        JobState::Running
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake_http::{fake_api, Recorded};

    #[test]
    fn index_ranges() {
        let s = json!({"completedIndexes": "0,2-3", "failedIndexes": "5"});
        assert_eq!(index_state(&s, 0), JobState::Succeeded);
        assert_eq!(index_state(&s, 1), JobState::Running);
        assert_eq!(index_state(&s, 3), JobState::Succeeded);
        assert!(matches!(index_state(&s, 5), JobState::Failed(_)));
    }

    #[test]
    fn names_are_dns_labels() {
        let n = object_name("My_Run", "expert/scripture");
        assert!(n.len() <= 63 && n.starts_with("btm-my-run-expert-scripture-"), "{n}");
        assert!(n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }

    fn spec() -> KubernetesSpec {
        serde_yaml::from_str(
            "{image: 'registry.example/btm:1', namespace: research, gpus_per_task: 1, volume: {claim: runs, mount_path: /runs}}",
        )
        .unwrap()
    }

    /// Training submissions named `names` (2 CPUs and 1 GPU each), of `nodes` nodes each.
    fn submissions(names: &[&str], nodes: usize) -> Vec<Submission> {
        names
            .iter()
            .map(|n| Submission {
                name: n.to_string(),
                args: vec!["train".into(), "--job".into(), format!("/runs/r/jobs/{n}.yaml")],
                log: PathBuf::from("/tmp/btm-k8s-test.log"),
                cpus: 2,
                gpus: 1,
                memory_mb: None,
                time_limit_min: None,
                ranks: 1,
                nodes,
            })
            .collect()
    }

    #[test]
    fn rest_calls_create_poll_and_delete_indexed_jobs() {
        let (url, server) = fake_api(4, |method, path| match (method, path) {
            ("POST", _) => (201, json!({"kind": "Job"})),
            ("GET", p) if p.ends_with("/jobs/x-1") => (200, json!({"status": {"completedIndexes": "0", "failedIndexes": "1"}})),
            ("DELETE", _) => (200, json!({"kind": "Status"})),
            _ => (404, json!({"message": "not found"})),
        });
        let creds = Credentials { server: url, token: Some("secret-token".into()), ca_pem: None };
        let engine = KubernetesEngine::new(&spec(), Path::new("/runs/r"), creds).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let subs = submissions(&["expert/a", "expert/b"], 1);
        let handles = rt.block_on(engine.submit(&subs)).unwrap();
        assert_eq!(handles.len(), 2);
        assert!(handles[1].0.ends_with("/1"));
        assert_eq!(rt.block_on(engine.state(&JobHandle("x-1/0".into()))).unwrap(), JobState::Succeeded);
        assert!(matches!(rt.block_on(engine.state(&JobHandle("x-1/1".into()))).unwrap(), JobState::Failed(_)));
        rt.block_on(engine.cancel(&JobHandle("x-1/0".into()))).unwrap();
        let seen = server.join().unwrap();
        let (method, path, auth, body) = &seen[0];
        assert_eq!(
            (method.as_str(), path.as_str(), auth.as_str()),
            ("POST", "/apis/batch/v1/namespaces/research/jobs", "Bearer secret-token")
        );
        assert_eq!(body["spec"]["completionMode"], "Indexed");
        assert_eq!(body["spec"]["completions"], 2);
        let c = &body["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
        assert!(c["command"][2].as_str().unwrap().contains("JOB_COMPLETION_INDEX"));
        assert_eq!(body["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"], "runs");
        assert_eq!((seen[1].0.as_str(), seen[1].1.as_str()), ("GET", "/apis/batch/v1/namespaces/research/jobs/x-1"));
        assert_eq!(seen[3].0, "DELETE");
        assert!(seen[3].1.ends_with("/jobs/x-1?propagationPolicy=Background"));
    }

    /// A poll the API server does not answer (a 503) leaves the job running; a Job that is gone
    /// (404) has failed; credentials it refuses stop the run.
    #[test]
    fn a_failed_poll_is_not_a_failed_job() {
        let (url, server) = fake_api(3, |_, path| match path {
            p if p.ends_with("/busy") => (503, json!({"message": "etcd timeout"})),
            p if p.ends_with("/gone") => (404, json!({"message": "not found"})),
            _ => (403, json!({"message": "forbidden"})),
        });
        let engine = KubernetesEngine::new(&spec(), Path::new("/runs/r"), Credentials { server: url, token: None, ca_pem: None }).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert_eq!(rt.block_on(engine.state(&JobHandle("busy/0".into()))).unwrap(), JobState::Running);
        assert!(matches!(rt.block_on(engine.state(&JobHandle("gone/0".into()))).unwrap(), JobState::Failed(_)));
        assert!(rt.block_on(engine.state(&JobHandle("denied/0".into()))).is_err());
        server.join().unwrap();
        assert!(engine.unreachable_since.lock().unwrap().contains_key("busy"));
    }

    /// Submit multi-pod `subs` to an engine on a fake API server (the Job created with uid
    /// `uid-1`, the Service, then `status` for every poll), ask the first job's state, and return
    /// the handles, that state and the requests the server saw.
    fn submit_and_poll(subs: &[Submission], reply: fn(&str, &str) -> (u16, Value)) -> (Vec<JobHandle>, JobState, Vec<Recorded>) {
        let (url, server) = fake_api(3, reply);
        let engine = KubernetesEngine::new(&spec(), Path::new("/runs/r"), Credentials { server: url, token: None, ca_pem: None }).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let handles = rt.block_on(engine.submit(subs)).unwrap();
        let state = rt.block_on(engine.state(&handles[0])).unwrap();
        (handles, state, server.join().unwrap())
    }

    /// The fake API server's answers for a multi-pod job: created, its Service created, and a
    /// status of indices 0, 1 and 3 done.
    fn pods_0_1_3_done(method: &str, path: &str) -> (u16, Value) {
        match (method, path) {
            ("POST", p) if p.ends_with("/jobs") => (201, json!({"kind": "Job", "metadata": {"uid": "uid-1"}})),
            ("POST", p) if p.ends_with("/services") => (201, json!({"kind": "Service"})),
            ("GET", _) => (200, json!({"status": {"completedIndexes": "0-1,3", "failedIndexes": ""}})),
            _ => (404, json!({"message": "not found"})),
        }
    }

    /// A two-node job: four indices for two jobs, a headless Service owned by the Job, and a
    /// job's state from both of its indices.
    #[test]
    fn multi_node_jobs_take_consecutive_indices_and_a_headless_service() {
        let (handles, state, seen) = submit_and_poll(&submissions(&["expert/a", "expert/b"], 2), pods_0_1_3_done);
        assert!(handles[0].0.ends_with("/0-1") && handles[1].0.ends_with("/2-3"), "{handles:?}");
        // Job a's two nodes are done; job b's node 2 is still running.
        assert_eq!(state, JobState::Succeeded);
        let job = &seen[0].3;
        assert_eq!((job["spec"]["completions"].as_u64(), job["spec"]["parallelism"].as_u64()), (Some(4), Some(4)));
        assert!(job["spec"]["template"]["spec"]["subdomain"].is_string());
        let script = job["spec"]["template"]["spec"]["containers"][0]["command"][2].as_str().unwrap();
        assert!(script.contains("BTM_NODE_RANK=$((JOB_COMPLETION_INDEX % 2))") && script.contains(":29500"), "{script}");
        let svc = &seen[1].3;
        assert_eq!((seen[1].1.as_str(), svc["spec"]["clusterIP"].as_str()), ("/api/v1/namespaces/research/services", Some("None")));
        assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    }

    /// btm's own two-rank jobs: two pods each, pod i rank i % 2 of job i / 2, the first pod its
    /// rank 0 (MASTER_ADDR), named by the headless Service; a job's state from both pods.
    #[test]
    fn multi_rank_jobs_take_a_pod_per_rank_and_meet_on_the_first() {
        let mut subs = submissions(&["continue/merged", "continue/merged-s1"], 1);
        subs.iter_mut().for_each(|s| s.ranks = 2);
        let (handles, state, seen) = submit_and_poll(&subs, |method, path| match (method, path) {
            ("GET", _) => (200, json!({"status": {"completedIndexes": "0", "failedIndexes": "1"}})),
            _ => pods_0_1_3_done(method, path),
        });
        assert!(handles[0].0.ends_with("/0-1") && handles[1].0.ends_with("/2-3"), "{handles:?}");
        // Rank 1 of the first job failed: the job failed.
        assert!(matches!(state, JobState::Failed(_)), "{state:?}");
        let job = &seen[0].3;
        assert_eq!((job["spec"]["completions"].as_u64(), job["spec"]["parallelism"].as_u64()), (Some(4), Some(4)));
        let script = job["spec"]["template"]["spec"]["containers"][0]["command"][2].as_str().unwrap();
        for needle in ["J=$((JOB_COMPLETION_INDEX / 2))", "RANK=$((JOB_COMPLETION_INDEX % 2)) WORLD_SIZE=2", "MASTER_PORT=29500"] {
            assert!(script.contains(needle), "`{needle}` missing from {script}");
        }
        assert!(script.contains(&format!("MASTER_ADDR=\"{0}-$((J * 2)).{0}\"", job["metadata"]["name"].as_str().unwrap())), "{script}");
        assert!(!script.contains("BTM_NODE_RANK"), "{script}");
        assert_eq!(seen[1].1, "/api/v1/namespaces/research/services");
    }

    #[test]
    fn a_run_in_a_bucket_needs_no_volume_and_reads_credentials_from_a_secret() {
        let spec: KubernetesSpec = serde_yaml::from_str("{image: 'registry.example/btm:1', env_from_secret: btm-s3}").unwrap();
        let sub = Submission {
            name: "expert/a".into(),
            args: vec!["train".into()],
            log: PathBuf::from("/cache/runs-local/r/logs/a.log"),
            cpus: 2,
            gpus: 0,
            memory_mb: None,
            time_limit_min: None,
            ranks: 1,
            nodes: 1,
        };
        let m = manifest(&spec, Path::new("/unused"), "r-expert", &[sub]);
        let pod = &m["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(c["envFrom"][0]["secretRef"]["name"], "btm-s3");
        assert!(pod.get("volumes").is_none() && c.get("workingDir").is_none() && c.get("volumeMounts").is_none(), "{m}");
        let script = c["command"][2].as_str().unwrap();
        assert!(script.contains("exec 'btm' 'train' 2>&1 ;;") && !script.contains(">>"), "{script}");
        // Only the non-secret store settings travel in the manifest itself.
        let env: Vec<&str> = c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert!(env.iter().all(|n| !n.contains("SECRET") && !n.contains("TOKEN") && *n != "AWS_ACCESS_KEY_ID"), "{env:?}");
    }

    #[test]
    fn refused_credentials_are_named() {
        let (url, _server) = fake_api(1, |_, _| (401, json!({"message": "Unauthorized"})));
        let creds = Credentials { server: url, token: Some("t".into()), ca_pem: None };
        let engine = KubernetesEngine::new(&spec(), Path::new("/runs/r"), creds).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let err = rt.block_on(engine.state(&JobHandle("x/0".into()))).unwrap_err().to_string();
        assert!(err.contains("refused the credentials: HTTP 401"), "{err}");
    }

    #[test]
    fn kubeconfig_current_context() {
        let text = "apiVersion: v1\ncurrent-context: b\nclusters:\n- name: cb\n  cluster: {server: 'https://10.0.0.1:6443', certificate-authority-data: aGVsbG8=}\n\
                    contexts:\n- name: a\n  context: {cluster: ca, user: ua}\n- name: b\n  context: {cluster: cb, user: ub}\nusers:\n- name: ub\n  user: {token: tok}\n";
        let c = Credentials::from_kubeconfig(text).unwrap();
        assert_eq!(c.server, "https://10.0.0.1:6443");
        assert_eq!(c.token.as_deref(), Some("tok"));
        assert_eq!(c.ca_pem.as_deref(), Some(&b"hello"[..]));
    }
}
