//! The pipeline on a real Ray cluster, through the Jobs REST API of its dashboard.
//!
//! Needs a Ray head with token auth: `eval "$(bash scripts/ray-local.sh start)"` (which CI
//! runs) exports its `BTM_RAY_ADDRESS` and `RAY_AUTH_TOKEN`. Without them the tests say so and
//! pass, unless `BTM_REQUIRE_RAY=1` (CI), which makes a missing head a failure. The tests share
//! the head (2 CPUs) and one restarts it, so they take turns.

mod common;

use common::{btm, fixture_pipeline, has_checkpoint, ok, repo, torchrun_trainer, S3Server, BUCKET};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

static TURN: Mutex<()> = Mutex::new(());

/// The head the tests use, held for one test at a time.
struct Head {
    address: String,
    token: String,
    _turn: MutexGuard<'static, ()>,
}

/// The head from the environment, or `None` (saying why; a failure under BTM_REQUIRE_RAY=1).
fn head() -> Option<Head> {
    let (Ok(address), Ok(token)) = (std::env::var("BTM_RAY_ADDRESS"), std::env::var("RAY_AUTH_TOKEN")) else {
        assert!(
            std::env::var("BTM_REQUIRE_RAY").as_deref() != Ok("1"),
            "BTM_REQUIRE_RAY=1 but BTM_RAY_ADDRESS or RAY_AUTH_TOKEN is not set (eval \"$(bash scripts/ray-local.sh start)\")"
        );
        eprintln!("skipping: no Ray head (BTM_RAY_ADDRESS and RAY_AUTH_TOKEN unset; run scripts/ray-local.sh start)");
        return None;
    };
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    Some(Head { address, token, _turn: turn })
}

impl Head {
    /// A Jobs API request through curl (`body`: a POST); the answer's body.
    fn call(&self, path: &str, body: Option<&Value>) -> String {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-H", &format!("Authorization: Bearer {}", self.token), &format!("{}{path}", self.address)]);
        if let Some(b) = body {
            cmd.args(["-X", "POST", "-H", "Content-Type: application/json", "-d", &b.to_string()]);
        }
        let out = cmd.output().expect("running curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn job(&self, submission_id: &str) -> Value {
        serde_json::from_str(&self.call(&format!("/api/jobs/{submission_id}"), None)).unwrap()
    }

    /// The resources Ray reserved for a job's entrypoint: its supervisor actor's, from the
    /// state API (the jobs API does not report them).
    fn reserved(&self, submission_id: &str) -> Value {
        let answer: Value = serde_json::from_str(&self.call("/api/v0/actors?detail=1&limit=10000", None)).unwrap();
        let name = format!("_ray_internal_job_actor_{submission_id}");
        let actors = answer["data"]["result"]["result"].as_array().cloned().unwrap_or_default();
        actors.into_iter().find(|a| a["name"] == name.as_str()).map(|a| a["required_resources"].clone()).unwrap_or(Value::Null)
    }

    /// Ray's own list of the jobs btm submitted for `run`.
    fn jobs_of(&self, run: &Path) -> Vec<Value> {
        let all: Vec<Value> = serde_json::from_str(&self.call("/api/jobs/", None)).unwrap();
        all.into_iter().filter(|j| j["metadata"]["btm_run"].as_str() == Some(&run.to_string_lossy())).collect()
    }
}

fn engine(retries: u32) -> String {
    format!("{{kind: ray, address: \"${{BTM_RAY_ADDRESS}}\", cpus_per_task: 1, memory_mb: 400, retries: {retries}}}")
}

/// Two experts from the llama fixture on the samples, merged and evaluated; in `dir/runs`.
fn pipeline(dir: &Path, name: &str, engine: &str, steps: u64) -> PathBuf {
    let train = format!("steps: {steps}, batch_size: 4, seq_len: 32, checkpoint_interval: 5");
    fixture_pipeline(dir, name, &dir.join("runs").display().to_string(), engine, &train, "")
}

/// The code expert trained by `code` and the scripture expert by `scripture` (command trainers).
fn with_trainers(file: &Path, scripture: &str, code: &str) {
    let mut yaml = std::fs::read_to_string(file).unwrap();
    for (domain, command) in [("scripture", scripture), ("code", code)] {
        let entry = format!("  - {{overrides: {{trainer: {{kind: command, command: \"{command}\"}}}}, name: {domain},");
        yaml = yaml.replacen(&format!("  - {{name: {domain},"), &entry, 1);
    }
    std::fs::write(file, yaml).unwrap();
}

fn plan_jobs(run: &Path) -> Vec<(String, String)> {
    let plan: Value = serde_json::from_slice(&std::fs::read(run.join("plan.json")).unwrap()).unwrap();
    plan["jobs"].as_array().unwrap().iter().map(|j| (j["name"].as_str().unwrap().into(), j["id"].as_str().unwrap().into())).collect()
}

/// [`common::wait_for`], polling every 200 ms.
fn wait_for(what: &str, deadline: Duration, f: impl FnMut() -> bool) {
    common::wait_for(what, deadline, Duration::from_millis(200), f)
}

#[test]
fn the_pipeline_runs_on_ray_and_every_job_succeeds_there() {
    let Some(head) = head() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline(tmp.path(), "ray-run", &engine(1), 10);
    let out = ok(btm().arg("run").arg(&file).output().unwrap());
    assert!(out.contains("| merged |"), "{out}");
    let run = tmp.path().join("runs/ray-run");
    assert!(run.join("report.md").is_file());
    // Ray's own record: one job per btm job, under btm's job id, every one SUCCEEDED.
    let ray = head.jobs_of(&run);
    let jobs = plan_jobs(&run);
    assert_eq!(ray.len(), jobs.len(), "{ray:#?}");
    for (name, id) in &jobs {
        let want = format!("btm-{}-{id}", name.replace('/', "-"));
        let job = ray.iter().find(|j| j["submission_id"] == want.as_str()).unwrap_or_else(|| panic!("{name}: no Ray job {want}"));
        assert_eq!(job["status"], "SUCCEEDED", "{job:#}");
        assert_eq!(job["metadata"]["btm_job"], name.as_str());
    }
    // What Ray reserved for the expert's entrypoint (its supervisor actor): the CPU and the
    // memory asked for.
    let (name, id) = jobs.iter().find(|(n, _)| n == "expert/code").unwrap();
    let resources = head.reserved(&format!("btm-{}-{id}", name.replace('/', "-")));
    assert_eq!(resources, json!({"CPU": 1.0, "memory": 400.0 * 1024.0 * 1024.0}));
    // Ray's log of each job went into the job's log, and `btm status` names the Ray jobs.
    let log = std::fs::read_to_string(run.join("logs/expert-code.log")).unwrap();
    assert!(log.contains("Running entrypoint for job btm-expert-code-"), "{log}");
    let status = ok(btm().arg("status").arg(&run).output().unwrap());
    assert!(status.contains("[ray job btm-expert-code-"), "{status}");
    let again = ok(btm().arg("run").arg(&file).output().unwrap());
    assert!(again.contains("nothing to do"), "{again}");
}

#[test]
fn a_wrong_token_or_address_is_a_named_error() {
    let Some(_head) = head() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let secret = "not-the-token-5c1e";
    let file = pipeline(tmp.path(), "bad-token", "{kind: ray, address: \"${BTM_RAY_ADDRESS}\", token_env: BTM_TEST_RAY_TOKEN}", 2);
    let out = btm().arg("run").arg(&file).env("BTM_TEST_RAY_TOKEN", secret).output().unwrap();
    assert!(!out.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("refused the token in `BTM_TEST_RAY_TOKEN`") && text.contains("HTTP 403"), "{text}");
    assert!(!text.contains(secret), "the token was printed:\n{text}");
    for entry in walk(&tmp.path().join("runs")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&bytes).contains(secret), "the token was written to {}", entry.display());
    }
    // No token at all: the head wants one, and the variable to set is named.
    let out = btm().arg("run").arg(&file).env_remove("BTM_TEST_RAY_TOKEN").output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("wants an auth token") && text.contains("`BTM_TEST_RAY_TOKEN`"), "{text}");

    // Nothing listens there.
    let file = pipeline(tmp.path(), "bad-address", "{kind: ray, address: \"http://127.0.0.1:9\"}", 2);
    let out = btm().arg("run").arg(&file).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("engine.address: no Ray dashboard answers at http://127.0.0.1:9"), "{text}");
}

/// Refused before anything runs: btm's multi-rank phases and multi-node torchruns; a one-node
/// torchrun of several processes is fine. (No head needed.)
#[test]
fn what_ray_cannot_run_is_refused_at_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let ray = "{kind: ray, address: \"http://127.0.0.1:8265\"}";
    let validate = |train: &str| {
        let file = fixture_pipeline(tmp.path(), "v", "runs", ray, &format!("steps: 4, batch_size: 4, seq_len: 32, {train}"), "");
        let out = btm().arg("validate").arg(&file).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (passed, err) = validate("grad_accum: 2, data_parallel: 2");
    assert!(!passed && err.contains("experts.data_parallel: 2 ranks: the Ray engine runs one process per job"), "{err}");
    let (passed, err) = validate(&format!("trainer: {}", torchrun_trainer()));
    assert!(passed, "{err}");
    let (passed, err) = validate(&format!("trainer: {}", torchrun_trainer().replace("nproc_per_node: 2", "nproc_per_node: 2, nnodes: 2")));
    assert!(!passed && err.contains("experts.trainer.nnodes: 2 nodes: the Ray engine runs each job on one node"), "{err}");
}

/// One expert's entrypoint exits 1: that job fails with Ray's word for it, what depends on it
/// does not start, and the rest (the other expert, trained by a command too) finishes.
#[test]
fn a_failing_entrypoint_fails_its_dependants_and_the_rest_finish() {
    let Some(head) = head() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline(tmp.path(), "ray-fail", &engine(0), 4);
    with_trainers(&file, "cp -r {model_in}/. {model_out}/", "echo trainer-says-boom; exit 1");
    let out = btm().arg("run").arg(&file).arg("--quiet").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("job expert/code failed: Ray job btm-expert-code-") && err.contains(" FAILED (exit 1)"), "{err}");
    assert!(err.contains("depend on failed ones did not start"), "{err}");
    let run = tmp.path().join("runs/ray-fail");
    assert!(run.join("jobs/expert-scripture/done.json").exists(), "the scripture expert did not finish");
    assert!(run.join("experts/scripture/model/MANIFEST.json").is_file());
    let log = std::fs::read_to_string(run.join("logs/expert-code.log")).unwrap();
    assert!(log.contains("trainer-says-boom"), "{log}");
    let ray = head.jobs_of(&run);
    let state = |name: &str| ray.iter().find(|j| j["metadata"]["btm_job"] == name).map(|j| j["status"].as_str().unwrap().to_string());
    assert_eq!(state("expert/code").as_deref(), Some("FAILED"), "{ray:#?}");
    assert_eq!(state("expert/scripture").as_deref(), Some("SUCCEEDED"), "{ray:#?}");
    assert_eq!(state("merge"), None, "the merge started: {ray:#?}");
}

/// SIGKILL of `btm run` leaves its Ray jobs running; the next `btm run` follows them instead of
/// submitting them again. A job under btm's submission id that is not this run's is refused.
#[test]
fn a_rerun_follows_the_ray_jobs_it_submitted_and_refuses_foreign_ones() {
    let Some(head) = head() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // Long enough that the expert still runs on Ray when btm is killed after its first checkpoint
    // (step 5), on a fast CPU too.
    let file = pipeline(tmp.path(), "ray-follow", &engine(0), 600);
    let run = tmp.path().join("runs/ray-follow");
    let mut child = btm().arg("run").arg(&file).arg("--quiet").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for("an expert checkpoint", Duration::from_secs(300), || has_checkpoint(&run.join("experts/code")));
    child.kill().unwrap();
    child.wait().unwrap();
    let record: Value = serde_json::from_slice(&std::fs::read(run.join("jobs/expert-code/engine.json")).unwrap()).unwrap();
    let sid = record["job"].as_str().unwrap().to_string();
    assert_eq!(head.job(&sid)["status"], "RUNNING", "the kill came too late to test following");
    let out = ok(btm().arg("run").arg(&file).output().unwrap());
    assert!(out.contains("| merged |"), "{out}");
    // The expert was followed, not resubmitted: one Ray job each, no second attempt.
    let ray = head.jobs_of(&run);
    let code: Vec<&Value> = ray.iter().filter(|j| j["metadata"]["btm_job"] == "expert/code").collect();
    assert_eq!(code.len(), 1, "{ray:#?}");
    assert_eq!((code[0]["submission_id"].as_str(), code[0]["status"].as_str()), (Some(sid.as_str()), Some("SUCCEEDED")));
    let log = std::fs::read_to_string(run.join("logs/expert-code.log")).unwrap();
    assert!(!log.contains("resuming from"), "the expert was started again:\n{log}");

    // Something else holds the submission id btm would give the scripture expert.
    let file = pipeline(tmp.path(), "ray-foreign", &engine(0), 4);
    let dry = ok(btm().arg("run").arg(&file).arg("--dry-run").output().unwrap());
    let line = dry.lines().find(|l| l.starts_with("expert/scripture [")).unwrap();
    let id = &line["expert/scripture [".len()..line.find(']').unwrap()];
    let sid = format!("btm-expert-scripture-{id}");
    let answer = head.call("/api/jobs/", Some(&json!({"entrypoint": "echo not-btm", "submission_id": sid})));
    assert!(answer.contains(&sid), "{answer}");
    let out = btm().arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("Ray job `{sid}` already exists with another entrypoint")) && err.contains("echo not-btm"), "{err}");
}

/// The head stops while the experts train and comes back empty (Ray keeps no job table across
/// a restart of a head without external storage): btm waits, finds its jobs gone, resubmits
/// them, the trainers resume from their checkpoints, and the final model is the one an
/// uninterrupted run makes, byte for byte.
#[test]
fn a_head_restarted_mid_run_gives_the_same_model() {
    let Some(head) = head() else { return };
    let script = repo().join("scripts/ray-local.sh");
    let tmp = tempfile::tempdir().unwrap();
    // Long enough (about 15 s an expert on a 2-vCPU Zen 3) that the experts still train when
    // the head stops, soon after their first checkpoint.
    let long = |name: &str, engine: &str| {
        let train = "steps: 3000, batch_size: 4, seq_len: 32, checkpoint_interval: 100";
        fixture_pipeline(tmp.path(), name, &tmp.path().join("runs").display().to_string(), engine, train, "")
    };
    let reference = long("reference", "{kind: local, slots: 2, threads_per_job: 1}");
    ok(btm().arg("run").arg(&reference).arg("--quiet").output().unwrap());
    let want = std::fs::read(tmp.path().join("runs/reference/merged/model.safetensors")).unwrap();

    let file = long("restarted", &engine(2));
    let run = tmp.path().join("runs/restarted");
    let child = btm().arg("run").arg(&file).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("an expert checkpoint", Duration::from_secs(300), || has_checkpoint(&run.join("experts/code")));
    let stop = Command::new("bash").arg(&script).arg("stop").output().unwrap();
    let late = run.join("jobs/expert-code/done.json").exists();
    std::thread::sleep(Duration::from_secs(3));
    // The head comes back before anything is asserted: the other tests share it.
    let start = Command::new("bash").arg(&script).arg("start").output().unwrap();
    let exports = String::from_utf8_lossy(&start.stdout);
    assert!(stop.status.success(), "{}", String::from_utf8_lossy(&stop.stderr));
    assert!(start.status.success(), "{}", String::from_utf8_lossy(&start.stderr));
    assert!(!late, "the restart came too late to test resume");
    // The script keeps its token across a restart, so btm's token still holds.
    assert!(exports.contains(&head.token), "the restarted head has another token: {exports}");
    let out = ok(child.wait_with_output().unwrap());
    assert!(out.contains("no longer knows job btm-expert-code-"), "{out}");
    assert_eq!(std::fs::read(run.join("merged/model.safetensors")).unwrap(), want, "the restarted run's model differs");
    let log = std::fs::read_to_string(run.join("logs/expert-code.log")).unwrap();
    assert!(log.contains("resuming from"), "{log}");
}

/// A run kept in S3 (the test's own server on 127.0.0.1) with its jobs on Ray: the jobs' runtime
/// environment carries the store's endpoint and, with `forward_credentials: true`, its keys
/// (the head's workers have none of their own); never the Ray token.
#[test]
fn runs_kept_in_s3_work_with_ray_workers() {
    let Some(head) = head() else { return };
    let Some(s3) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let engine = "{kind: ray, address: \"${BTM_RAY_ADDRESS}\", cpus_per_task: 1, memory_mb: 400, retries: 0, forward_credentials: true}";
    let train = "steps: 4, batch_size: 4, seq_len: 32, checkpoint_interval: 2";
    let file = fixture_pipeline(tmp.path(), "ray-s3", &format!("s3://{BUCKET}/runs"), engine, train, "");
    let mut cmd = btm();
    s3.env(&mut cmd).env("BTM_CACHE", tmp.path().join("cache")).arg("run").arg(&file);
    let out = ok(cmd.output().unwrap());
    assert!(out.contains("| merged |") && out.contains(&format!("report: s3://{BUCKET}/runs/ray-s3/report.md")), "{out}");
    let objects = s3.objects("runs/ray-s3");
    for o in ["report.md", "merged/MANIFEST.json", "experts/code/model/MANIFEST.json", "jobs/merge/done.json"] {
        assert!(objects.contains(&format!("runs/ray-s3/{o}")), "{o} is not in the bucket: {objects:#?}");
    }
    assert!(!tmp.path().join("runs").exists(), "the run went to the local disk");
    let plan: Value = serde_json::from_slice(&std::fs::read(s3.dir("runs/ray-s3/plan.json")).unwrap()).unwrap();
    let ray = head.jobs_of(Path::new(&format!("s3://{BUCKET}/runs/ray-s3")));
    let jobs = plan["jobs"].as_array().unwrap();
    assert_eq!(ray.len(), jobs.len(), "{ray:#?}");
    for job in &ray {
        assert_eq!(job["status"], "SUCCEEDED", "{job:#}");
        let env = &job["runtime_env"]["env_vars"];
        assert_eq!(env["AWS_ENDPOINT"], format!("http://127.0.0.1:{}", s3.port), "{job:#}");
        assert_eq!((env["AWS_ALLOW_HTTP"].as_str(), env["AWS_SECRET_ACCESS_KEY"].as_str()), (Some("true"), Some("btm-test-secret")));
        assert!(env.get("RAY_AUTH_TOKEN").is_none() && !job.to_string().contains(&head.token), "the Ray token went to a job: {job:#}");
    }
}

/// A TLS-terminating proxy (python's ssl, a thread per connection) on a free loopback port in
/// front of the head's plain-HTTP dashboard; killed when dropped.
struct TlsProxy {
    child: std::process::Child,
    port: u16,
}

const PROXY: &str = r#"
import select, socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
upstream = ("127.0.0.1", int(sys.argv[3]))
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print(srv.getsockname()[1], flush=True)
def serve(c):
    try:
        t = ctx.wrap_socket(c, server_side=True)
    except (ssl.SSLError, OSError):
        c.close()
        return
    u = socket.create_connection(upstream)
    try:
        while True:
            ready = [t] if t.pending() else select.select([t, u], [], [])[0]
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                (u if s is t else t).sendall(data)
    except (ssl.SSLError, OSError):
        pass
    finally:
        t.close()
        u.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

impl TlsProxy {
    fn start(dir: &Path, cert: &Path, key: &Path, upstream: u16) -> Self {
        use std::io::BufRead;
        let script = dir.join("tls-proxy.py");
        std::fs::write(&script, PROXY).unwrap();
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(cert)
            .arg(key)
            .arg(upstream.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (for the TLS proxy)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("the TLS proxy said `{line}`"));
        TlsProxy { child, port }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `openssl` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (for the test certificates)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA `NAME.pem` (key `NAME.key`) in `dir`.
fn ca(dir: &Path, name: &str) {
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    let subject = format!("/CN=btm test {name}");
    openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &pem, "-subj", &subject, "-days", "1"]);
}

/// The engine behind an `https://` address (a TLS proxy whose certificate a CA made at test
/// time signed): trusted through `ca_cert` or `SSL_CERT_FILE`, the pipeline runs and every job
/// succeeds; a certificate nothing here trusts is a named error.
#[test]
fn https_addresses_work_and_an_untrusted_certificate_is_a_named_error() {
    let Some(head) = head() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ca(dir, "ca");
    ca(dir, "other-ca");
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=127.0.0.1"]);
    std::fs::write(dir.join("leaf.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    let sign = "x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem -days 1 -extfile leaf.ext";
    openssl(dir, &sign.split(' ').collect::<Vec<_>>());
    let upstream = head.address.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).expect("a port in BTM_RAY_ADDRESS");
    let proxy = TlsProxy::start(dir, &dir.join("leaf.pem"), &dir.join("leaf.key"), upstream);
    let address = format!("https://127.0.0.1:{}", proxy.port);
    let engine = |ca_cert: &str| format!("{{kind: ray, address: \"{address}\", cpus_per_task: 1, memory_mb: 400, retries: 0{ca_cert}}}");
    let run = |file: &Path| btm().arg("run").arg(file).env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR").output().unwrap();

    // Neither the system nor a wrong CA file trusts the proxy's certificate.
    for (name, ca_cert) in [("untrusted", String::new()), ("wrong-ca", format!(", ca_cert: {}", dir.join("other-ca.pem").display()))] {
        let file = pipeline(dir, name, &engine(&ca_cert), 2);
        let out = run(&file);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&format!("engine.address: the TLS certificate of {address} is not trusted")) && err.contains("ca_cert"),
            "{err}"
        );
    }

    let file = pipeline(dir, "https-run", &engine(&format!(", ca_cert: {}", dir.join("ca.pem").display())), 2);
    let out = run(&file);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("| merged |"), "{text}");
    let runs = dir.join("runs/https-run");
    let ray = head.jobs_of(&runs);
    assert_eq!(ray.len(), plan_jobs(&runs).len(), "{ray:#?}");
    assert!(ray.iter().all(|j| j["status"] == "SUCCEEDED"), "{ray:#?}");
    let record: Value = serde_json::from_slice(&std::fs::read(runs.join("jobs/merge/engine.json")).unwrap()).unwrap();
    assert_eq!(record["address"], address.as_str());

    // The standard SSL_CERT_FILE is trusted too: the same run, without ca_cert, reaches Ray.
    let file = pipeline(dir, "https-run", &engine(""), 2);
    let again = ok(btm().arg("run").arg(&file).env("SSL_CERT_FILE", dir.join("ca.pem")).output().unwrap());
    assert!(again.contains("nothing to do"), "{again}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
