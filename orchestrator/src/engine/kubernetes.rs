//! The Kubernetes engine: each batch of jobs that become ready together (the per-domain
//! trainers of a stage) is one Indexed Job (`completionMode: Indexed`); `JOB_COMPLETION_INDEX`
//! picks the task. Jobs are created, polled and deleted through the API server with the `kube`
//! client and `k8s-openapi`'s typed objects, configured as `kubectl` is: the in-cluster service
//! account, or `$KUBECONFIG` / `~/.kube/config` with every auth kind it allows (client
//! certificates, bearer tokens and token files, exec plugins such as EKS, GKE and AKS use), and
//! the context's namespace unless the pipeline names one.
//!
//! A job of several processes gets several consecutive indices, one pod each, and a headless
//! Service that names the pods: the nodes of an external torchrun (told `BTM_NODE_RANK` and the
//! rendezvous), or the ranks of btm's own trainer, which meet over the TCP collective
//! (`RANK`, `WORLD_SIZE`, `MASTER_ADDR` = the job's first pod, `MASTER_PORT`).
//!
//! The pods see the run folder at the same path as `btm run` (mount a ReadWriteMany volume
//! there, `volume` in the pipeline), or the run lives in an object store and the pods read
//! the store's credentials from a Secret (`env_from_secret`). Not yet run against a live cluster: the manifests are
//! checked against the official schema, and the calls and kubeconfig auth against a fake API
//! server in tests.

use super::{Engine, JobHandle, JobState, Submission};
use crate::pipeline::spec::KubernetesSpec;
use anyhow::{bail, Context, Result};
use k8s_openapi::api::batch::v1::{Job, JobStatus};
use k8s_openapi::api::core::v1::Service;
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
        "metadata": metadata(spec, name),
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
    let mut metadata = metadata(spec, name);
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

/// An object's metadata: its name, btm's label, and the namespace when the pipeline names one
/// (otherwise the engine's, from the kubeconfig context, through the request's URL).
fn metadata(spec: &KubernetesSpec, name: &str) -> Value {
    let mut m = json!({"name": name, "labels": {"app.kubernetes.io/managed-by": "btm"}});
    if let Some(ns) = &spec.namespace {
        m["namespace"] = json!(ns);
    }
    m
}

/// The cluster as `kubectl` would reach it: in a pod, its service account; else `$KUBECONFIG`
/// or `~/.kube/config` (its current context: server, CA, client certificate, token, exec
/// plugin, namespace).
pub async fn discover() -> Result<kube::Config> {
    kube::Config::infer().await.context("no Kubernetes cluster configured (in-cluster service account, $KUBECONFIG or ~/.kube/config)")
}

pub struct KubernetesEngine {
    spec: KubernetesSpec,
    run: PathBuf,
    run_name: String,
    jobs: kube::Api<Job>,
    services: kube::Api<Service>,
    /// Since when polls of each Job have found the API server unreachable.
    unreachable_since: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// What an API call's failure means for the run.
enum ApiFailure {
    /// 401/403: the credentials are wrong; stop.
    Refused(String),
    /// 404: the object is not there.
    Gone,
    /// Anything else (no answer, 5xx, 429, a timeout): ask again later.
    Transient(String),
}

fn classify(e: kube::Error) -> ApiFailure {
    match &e {
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => {
            ApiFailure::Refused(format!("the Kubernetes API server refused the credentials: HTTP {}: {}", s.code, s.message))
        }
        kube::Error::Api(s) if s.code == 404 => ApiFailure::Gone,
        _ => ApiFailure::Transient(format!("Kubernetes API: {e}")),
    }
}

/// The largest answer read from the API server. btm reads one Job or Service at a time (a few
/// KiB); a longer answer fails as the body passes this, instead of being read into memory.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

fn capped_answer<B>(answer: http::Response<B>) -> http::Response<http_body_util::Limited<B>> {
    answer.map(|body| http_body_util::Limited::new(body, MAX_ANSWER_BYTES))
}

impl KubernetesEngine {
    /// The engine on the cluster `config` reaches. Call inside a Tokio runtime (the client's
    /// connection pool runs on it).
    pub fn new(spec: &KubernetesSpec, run: &Path, config: kube::Config) -> Result<Self> {
        let namespace = spec.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::client::ClientBuilder::try_from(config)
            .context("the Kubernetes client")?
            .with_layer(&tower::util::MapResponseLayer::new(capped_answer))
            .build();
        Ok(Self {
            spec: spec.clone(),
            run: run.to_path_buf(),
            run_name: run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into()),
            jobs: kube::Api::namespaced(client.clone(), &namespace),
            services: kube::Api::namespaced(client, &namespace),
            unreachable_since: Default::default(),
        })
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
        let batch = jobs[0].stage();
        let name = object_name(&self.run_name, batch);
        let job: Job = serde_json::from_value(manifest(&self.spec, &self.run, &name, jobs)).context("the Job manifest")?;
        let refused = |e: kube::Error| match classify(e) {
            ApiFailure::Refused(m) | ApiFailure::Transient(m) => anyhow::anyhow!(m),
            ApiFailure::Gone => anyhow::anyhow!("Kubernetes API: the namespace or API is not there (HTTP 404)"),
        };
        let created = self.jobs.create(&kube::api::PostParams::default(), &job).await.map_err(refused)?;
        let pods = pods_per_job(&jobs[0]);
        if pods > 1 {
            let svc: Service = serde_json::from_value(headless_service(&self.spec, &name, created.metadata.uid.as_deref()))
                .context("the Service manifest")?;
            self.services.create(&kube::api::PostParams::default(), &svc).await.map_err(refused)?;
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
        let (name, first, last) = job_indices(&handle.0)?;
        let job = match self.jobs.get(name).await {
            Ok(job) => {
                self.unreachable_since.lock().expect("lock").remove(name);
                job
            }
            Err(e) => match classify(e) {
                ApiFailure::Refused(m) => bail!(m),
                ApiFailure::Gone => return Ok(JobState::Failed(format!("the Job {name} is gone (deleted?)"))),
                // No answer or a transient error (5xx, 429, a timeout): unknown, not failed; ask again.
                ApiFailure::Transient(e) => {
                    let since =
                        *self.unreachable_since.lock().expect("lock").entry(name.to_string()).or_insert_with(std::time::Instant::now);
                    if since.elapsed() > super::POLL_GIVE_UP {
                        bail!("the Kubernetes API server has not answered about Job {name} for {} minutes ({e}); its pods are left running, run again to continue", super::POLL_GIVE_UP.as_secs() / 60);
                    }
                    return Ok(JobState::Running);
                }
            },
        };
        Ok(indices_state(job.status.as_ref(), first, last))
    }

    async fn cancel(&self, handle: &JobHandle) -> Result<()> {
        let (name, _) = handle.0.rsplit_once('/').context("kubernetes job handle")?;
        // Deleting the Job sends SIGTERM to its pods (trainers checkpoint), then SIGKILL after
        // the grace period.
        match self.jobs.delete(name, &kube::api::DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(e) => match classify(e) {
                ApiFailure::Gone => Ok(()),
                ApiFailure::Refused(m) | ApiFailure::Transient(m) => bail!(m),
            },
        }
    }
}

/// The most indices one handle names: the nodes of one job (a pod each).
const MAX_HANDLE_INDICES: u64 = 1 << 16;

/// A handle's Job name and its first and last index (`NAME/3` or `NAME/3-5`, a multi-node job).
pub fn job_indices(handle: &str) -> Result<(&str, u64, u64)> {
    let (name, indices) = handle.rsplit_once('/').context("kubernetes job handle")?;
    let (first, last) = match indices.split_once('-') {
        Some((a, b)) => (a.parse::<u64>()?, b.parse::<u64>()?),
        None => (indices.parse::<u64>()?, indices.parse::<u64>()?),
    };
    anyhow::ensure!(
        first <= last && last - first < MAX_HANDLE_INDICES,
        "kubernetes job handle `{handle}`: indices {first}-{last} are not a job's nodes"
    );
    Ok((name, first, last))
}

/// The state of a job that holds indices `first..=last` of an Indexed Job, from its `status`.
pub fn indices_state(status: Option<&JobStatus>, first: u64, last: u64) -> JobState {
    let states: Vec<JobState> = (first..=last).map(|i| index_state(status, i)).collect();
    // A job is done when every node is; it failed when any node gave up.
    match states.iter().find(|s| matches!(s, JobState::Failed(_))) {
        Some(failed) => failed.clone(),
        None if states.iter().all(|s| *s == JobState::Succeeded) => JobState::Succeeded,
        None => JobState::Running,
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
pub fn index_state(status: Option<&JobStatus>, index: u64) -> JobState {
    let ranges = |list: Option<&String>| list.is_some_and(|l| in_ranges(l, index));
    if ranges(status.and_then(|s| s.completed_indexes.as_ref())) {
        JobState::Succeeded
    } else if ranges(status.and_then(|s| s.failed_indexes.as_ref())) {
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
        let s = JobStatus { completed_indexes: Some("0,2-3".into()), failed_indexes: Some("5".into()), ..Default::default() };
        let s = Some(&s);
        assert_eq!(index_state(s, 0), JobState::Succeeded);
        assert_eq!(index_state(s, 1), JobState::Running);
        assert_eq!(index_state(s, 3), JobState::Succeeded);
        assert!(matches!(index_state(s, 5), JobState::Failed(_)));
    }

    #[test]
    fn names_are_dns_labels() {
        let n = object_name("My_Run", "expert/scripture");
        assert!(n.len() <= 63 && n.starts_with("btm-my-run-expert-scripture-"), "{n}");
        assert!(n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }

    /// A kubeconfig for the fake API server at `url`: its context's namespace and user `user`
    /// (YAML), loaded as kube loads `~/.kube/config`.
    fn kubeconfig(url: &str, namespace: Option<&str>, user: &str) -> kube::Config {
        let ns = namespace.map_or(String::new(), |n| format!(", namespace: {n}"));
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster: {{server: '{url}'}}\n\
             contexts:\n- name: c\n  context: {{cluster: k, user: u{ns}}}\nusers:\n- name: u\n  user: {user}\n"
        );
        let kc = kube::config::Kubeconfig::from_yaml(&text).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(kube::Config::from_custom_kubeconfig(kc, &Default::default())).unwrap()
    }

    /// An engine on `config` with its runtime (the client's connection pool runs on it).
    fn engine(spec: &KubernetesSpec, config: kube::Config) -> (KubernetesEngine, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let engine = {
            let _in_runtime = rt.enter();
            KubernetesEngine::new(spec, Path::new("/runs/r"), config).unwrap()
        };
        (engine, rt)
    }

    /// The API server's answers, as Kubernetes gives them (typed objects, `Status` errors).
    fn job_json(name: &str, status: Value) -> Value {
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "uid": "uid-1"}, "status": status})
    }
    fn status_json(code: u16, message: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "message": message})
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
                id: format!("id-{n}"),
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
            ("POST", _) => (201, job_json("x-1", Value::Null)),
            ("GET", p) if p.ends_with("/jobs/x-1") => (200, job_json("x-1", json!({"completedIndexes": "0", "failedIndexes": "1"}))),
            ("DELETE", _) => (200, json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 200})),
            _ => (404, status_json(404, "not found")),
        });
        let (engine, rt) = engine(&spec(), kubeconfig(&url, None, "{token: secret-token}"));
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
        // Deleting the Job takes its pods with it, in the background.
        assert!(seen[3].1.ends_with("/jobs/x-1"), "{}", seen[3].1);
        assert_eq!(seen[3].3["propagationPolicy"], "Background");
    }

    /// An answer past MAX_ANSWER_BYTES fails by name as its body passes the cap; it is never
    /// read whole. (The fake server's write then fails too: its thread is left to end.)
    #[test]
    fn an_oversized_answer_is_refused_by_name() {
        let (url, _server) = fake_api(1, |_, _| (201, job_json("x", json!({"pad": "x".repeat(MAX_ANSWER_BYTES)}))));
        let (engine, rt) = engine(&spec(), kubeconfig(&url, None, "{}"));
        let err = rt.block_on(engine.submit(&submissions(&["expert/a"], 1))).unwrap_err();
        assert!(format!("{err:#}").contains("length limit exceeded"), "{err:#}");
    }

    /// A poll the API server fails (a 500) leaves the job running; a Job that is gone (404) has
    /// failed; credentials it refuses stop the run. (A 503, 504 or 429 the client itself retries
    /// with backoff first: `a_busy_api_server_is_asked_again`.)
    #[test]
    fn a_failed_poll_is_not_a_failed_job() {
        let (url, server) = fake_api(3, |_, path| match path {
            p if p.ends_with("/busy") => (500, status_json(500, "etcd timeout")),
            p if p.ends_with("/gone") => (404, status_json(404, "not found")),
            _ => (403, status_json(403, "forbidden")),
        });
        let (engine, rt) = engine(&spec(), kubeconfig(&url, None, "{}"));
        assert_eq!(rt.block_on(engine.state(&JobHandle("busy/0".into()))).unwrap(), JobState::Running);
        assert!(matches!(rt.block_on(engine.state(&JobHandle("gone/0".into()))).unwrap(), JobState::Failed(_)));
        assert!(rt.block_on(engine.state(&JobHandle("denied/0".into()))).is_err());
        server.join().unwrap();
        assert!(engine.unreachable_since.lock().unwrap().contains_key("busy"));
    }

    /// A 503 (an API server restarting, etcd busy) is retried with backoff by the client before
    /// the poll sees an answer.
    #[test]
    fn a_busy_api_server_is_asked_again() {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let (url, server) = fake_api(2, |_, _| match CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => (503, status_json(503, "the server is currently unable to handle the request")),
            _ => (200, job_json("x", json!({"completedIndexes": "0"}))),
        });
        let (engine, rt) = engine(&spec(), kubeconfig(&url, None, "{}"));
        assert_eq!(rt.block_on(engine.state(&JobHandle("x/0".into()))).unwrap(), JobState::Succeeded);
        assert_eq!(server.join().unwrap().len(), 2);
    }

    /// Submit multi-pod `subs` to an engine on a fake API server (the Job created with uid
    /// `uid-1`, the Service, then `status` for every poll), ask the first job's state, and return
    /// the handles, that state and the requests the server saw.
    fn submit_and_poll(subs: &[Submission], reply: fn(&str, &str) -> (u16, Value)) -> (Vec<JobHandle>, JobState, Vec<Recorded>) {
        let (url, server) = fake_api(3, reply);
        let (engine, rt) = engine(&spec(), kubeconfig(&url, None, "{}"));
        let handles = rt.block_on(engine.submit(subs)).unwrap();
        let state = rt.block_on(engine.state(&handles[0])).unwrap();
        (handles, state, server.join().unwrap())
    }

    /// The fake API server's answers for a multi-pod job: created, its Service created, and a
    /// status of indices 0, 1 and 3 done.
    fn pods_0_1_3_done(method: &str, path: &str) -> (u16, Value) {
        match (method, path) {
            ("POST", p) if p.ends_with("/jobs") => (201, job_json("x", Value::Null)),
            ("POST", p) if p.ends_with("/services") => (201, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}})),
            ("GET", _) => (200, job_json("x", json!({"completedIndexes": "0-1,3", "failedIndexes": ""}))),
            _ => (404, status_json(404, "not found")),
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
            ("GET", _) => (200, job_json("x", json!({"completedIndexes": "0", "failedIndexes": "1"}))),
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
            id: "id-a".into(),
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
        let (url, _server) = fake_api(1, |_, _| (401, status_json(401, "Unauthorized")));
        let (engine, rt) = engine(&spec(), kubeconfig(&url, None, "{token: t}"));
        let err = rt.block_on(engine.state(&JobHandle("x/0".into()))).unwrap_err().to_string();
        assert!(err.contains("refused the credentials: HTTP 401"), "{err}");
    }

    /// kubeconfig auth as the managed clusters use it: an exec plugin (EKS's `aws eks
    /// get-token`, GKE's and AKS's plugins) whose ExecCredential token is sent as the bearer
    /// token, and the context's namespace when the pipeline names none.
    #[test]
    fn kubeconfig_exec_plugins_and_the_context_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("get-token");
        std::fs::write(
            &plugin,
            "#!/bin/sh\necho '{\"apiVersion\": \"client.authentication.k8s.io/v1\", \"kind\": \"ExecCredential\", \"status\": {\"token\": \"from-the-plugin\"}}'\n",
        )
        .unwrap();
        std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let (url, server) = fake_api(1, |_, _| (200, job_json("x", json!({"completedIndexes": "0"}))));
        let user =
            format!("{{exec: {{apiVersion: client.authentication.k8s.io/v1, command: '{}', interactiveMode: Never}}}}", plugin.display());
        let mut spec = spec();
        spec.namespace = None;
        let (engine, rt) = engine(&spec, kubeconfig(&url, Some("team-a"), &user));
        assert_eq!(rt.block_on(engine.state(&JobHandle("x/0".into()))).unwrap(), JobState::Succeeded);
        let seen = server.join().unwrap();
        assert_eq!((seen[0].1.as_str(), seen[0].2.as_str()), ("/apis/batch/v1/namespaces/team-a/jobs/x", "Bearer from-the-plugin"));
    }
}
