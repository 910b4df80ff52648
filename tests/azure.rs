//! Runs kept in Azure Blob storage (`az://`): Azurite, Microsoft's emulator, on loopback,
//! started here with a temporary workspace. The S3 tests' matrix (tests/s3.rs) on az://: a
//! whole run kept in the container; the emulator restarting, or going away, in the middle of a
//! checkpoint's block upload; training sources read in place by range.
//!
//! The tests look at the container through Azurite's REST API with their own SharedKey
//! requests, not through btm. Azurite comes from npm (`azurite@3.35.0`, installed by
//! scripts/test.sh); without it the tests say so and pass, unless `BTM_REQUIRE_AZURITE=1`
//! (set by CI). `BTM_AZURITE` names its `azurite-blob` script.

mod common;

use btm_model::storage::{AZURITE_ACCOUNT, AZURITE_KEY};
use common::{btm, every_stage_pipeline, fixture_pipeline, multipart_pipeline, ok};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The container the tests use (object_store cannot create one: the tests do, over REST).
const CONTAINER: &str = "btm-test";

/// What the emulator is told to fail: after `blocks` Put Block requests on a path containing
/// `path` have been answered, it is stopped (SIGTERM: Azurite saves its metadata and exits).
#[derive(Clone, Copy)]
struct Fault {
    blocks: usize,
    path: &'static str,
}

/// Azurite's blob service on a free loopback port, its workspace in a temporary folder; killed
/// when dropped.
struct Azurite {
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
    /// The port btm and the tests talk to: Azurite's own, or a [`relay`]'s in front of it.
    front: u16,
    location: PathBuf,
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Azurite {
    /// The `azurite-blob` script: `BTM_AZURITE`, else scripts/test.sh's install, else on PATH.
    fn find() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("BTM_AZURITE") {
            return Some(PathBuf::from(p)).filter(|p| p.exists());
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        let cached = home.join(".cache/btm-ci/azurite/node_modules/.bin/azurite-blob");
        if cached.exists() {
            return Some(cached);
        }
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).map(|d| d.join("azurite-blob")).find(|p| p.exists())
    }

    /// A running emulator with an empty container, or `None` (saying why) when Azurite is not
    /// installed — unless `BTM_REQUIRE_AZURITE=1` (CI), which makes that a failure.
    fn start(fault: Option<Fault>) -> Option<Self> {
        let Some(bin) = Self::find() else {
            let how = "npm install --prefix ~/.cache/btm-ci/azurite azurite@3.35.0, or set BTM_AZURITE";
            assert!(
                std::env::var("BTM_REQUIRE_AZURITE").as_deref() != Ok("1"),
                "BTM_REQUIRE_AZURITE=1 but azurite-blob is not found ({how})"
            );
            eprintln!("skipping: azurite-blob is not found ({how})");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // No pooled connections: one kept from before a restart would be dead.
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(0).build().unwrap();
        let mut a = Azurite { bin, child: None, port: 0, front: 0, location: dir.path().join("azurite"), http, runtime, _dir: dir };
        a.spawn(fault);
        let status = a.request(reqwest::Method::PUT, "", &[("restype", "container")], vec![], &[]).status;
        assert_eq!(status, 201, "creating the container");
        Some(a)
    }

    /// Start the emulator (on the same port and workspace as before, once it has a port).
    fn spawn(&mut self, fault: Option<Fault>) {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &self.port.to_string(), "--location"])
            .arg(&self.location)
            // object_store's x-ms-version may be newer than this Azurite knows.
            .args(["--skipApiVersionCheck", "--loose", "--disableTelemetry"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: prctl in the child before exec; the emulator dies with the test process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("starting azurite-blob");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let listening = "successfully listens on http://127.0.0.1:";
        let port = loop {
            let line = lines.next().unwrap_or_else(|| panic!("azurite-blob exited: {:?}", child.wait())).unwrap();
            if let Some((_, port)) = line.split_once(listening) {
                break port.trim().parse().unwrap_or_else(|_| panic!("azurite-blob said `{line}`"));
            }
        };
        self.port = port;
        if self.front == 0 {
            self.front = port;
        }
        // Drain the access log (one line per request answered), counting the blocks stored on
        // the fault's path.
        let pid = child.id() as libc::pid_t;
        let blocks = Arc::new(AtomicUsize::new(0));
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let Some(f) = fault else { continue };
                if line.contains("comp=block&") && line.contains(f.path) && blocks.fetch_add(1, Ordering::SeqCst) + 1 == f.blocks {
                    eprintln!("stopping Azurite after the block: {line}");
                    // SAFETY: signalling our own child, which has not been waited for yet.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
        });
        self.child = Some(child);
    }

    /// The emulator's exit status once it has exited (a fault it was told to inject).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut().expect("a running emulator").try_wait().unwrap();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// The account's URL, as in an Azurite connection string.
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.front)
    }

    /// Put a [`relay`] in front of the emulator: from now on the endpoint is the relay's.
    fn behind_relay(&mut self) {
        self.front = relay(self.port);
    }

    /// `btm` in `dir` with its cache in `dir/cache`, configured for the emulator the way an
    /// Azurite user would: emulator mode and the endpoint; no other `AZURE_*` variable leaks in.
    fn btm(&self, dir: &Path) -> Command {
        let mut cmd = btm();
        for (k, _) in std::env::vars() {
            if k.starts_with("AZURE_") || k.starts_with("AZURITE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("AZURE_STORAGE_USE_EMULATOR", "true")
            .env("AZURE_STORAGE_ENDPOINT", self.endpoint())
            .current_dir(dir)
            .env("BTM_CACHE", dir.join("cache"));
        cmd
    }

    /// A SharedKey-signed request on the container (`blob` empty) or a blob in it; its status
    /// and body. <https://learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key>
    fn request(&self, method: reqwest::Method, blob: &str, query: &[(&str, &str)], body: Vec<u8>, headers: &[(&str, &str)]) -> Response {
        let mut url = reqwest::Url::parse(&format!("{}/{CONTAINER}", self.endpoint())).unwrap();
        if !blob.is_empty() {
            url.path_segments_mut().unwrap().extend(blob.split('/'));
        }
        url.query_pairs_mut().extend_pairs(query);
        let date = http_date(std::time::SystemTime::now());
        let mut ms: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect();
        ms.push(("x-ms-date".into(), date));
        ms.push(("x-ms-version".into(), "2023-11-03".into()));
        ms.sort();
        let length = if body.is_empty() { String::new() } else { body.len().to_string() };
        let mut to_sign = format!("{method}\n\n\n{length}\n\n\n\n\n\n\n\n\n");
        for (k, v) in &ms {
            to_sign += &format!("{k}:{v}\n");
        }
        // Path-style: the account comes again as the path's first segment.
        to_sign += &format!("/{AZURITE_ACCOUNT}{}", url.path());
        let mut q: Vec<(String, String)> = url.query_pairs().map(|(k, v)| (k.to_ascii_lowercase(), v.into_owned())).collect();
        q.sort();
        for (k, v) in q {
            to_sign += &format!("\n{k}:{v}");
        }
        let signature = base64(&hmac_sha256(&unbase64(AZURITE_KEY), to_sign.as_bytes()));
        let mut req = self.http.request(method, url).header("Authorization", format!("SharedKey {AZURITE_ACCOUNT}:{signature}")).body(body);
        for (k, v) in &ms {
            req = req.header(k, v);
        }
        self.runtime.block_on(async {
            let resp = req.send().await.expect("a request to Azurite");
            Response { status: resp.status().as_u16(), body: resp.bytes().await.unwrap().to_vec() }
        })
    }

    /// The blobs under `prefix` (committed ones: what a reader sees), sorted.
    fn objects(&self, prefix: &str) -> Vec<String> {
        let mut out = vec![];
        let mut marker = String::new();
        loop {
            let query = [("restype", "container"), ("comp", "list"), ("prefix", prefix), ("marker", marker.as_str())];
            let r = self.request(reqwest::Method::GET, "", &query, vec![], &[]).ok();
            let xml = String::from_utf8(r).unwrap();
            out.extend(tags(&xml, "Name"));
            marker = tags(&xml, "NextMarker").pop().unwrap_or_default();
            if marker.is_empty() {
                break;
            }
        }
        out.sort();
        out
    }

    /// The blob `name`'s bytes.
    fn get(&self, name: &str) -> Vec<u8> {
        self.request(reqwest::Method::GET, name, &[], vec![], &[]).ok()
    }

    /// Store `bytes` as the blob `name`.
    fn put(&self, name: &str, bytes: Vec<u8>) {
        let r = self.request(reqwest::Method::PUT, name, &[], bytes, &[("x-ms-blob-type", "BlockBlob")]);
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }

    /// The blobs under `prefix/` copied into a fresh local folder (to verify manifests).
    fn download(&self, prefix: &str) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("copy");
        for o in self.objects(&format!("{prefix}/")) {
            let path = dest.join(o.strip_prefix(&format!("{prefix}/")).unwrap());
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, self.get(&o)).unwrap();
        }
        (tmp, dest)
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Response {
    status: u16,
    body: Vec<u8>,
}

impl Response {
    /// The body of a successful response.
    fn ok(self) -> Vec<u8> {
        assert!((200..300).contains(&self.status), "Azurite answered {}: {}", self.status, String::from_utf8_lossy(&self.body));
        self.body
    }
}

/// A TCP relay on a free loopback port to `backend`'s; its port. A connection made while
/// nothing listens at the backend waits for it (up to a minute), as one made through a load
/// balancer in front of a restarting service would: Azurite takes a second or two to start,
/// longer than object_store's jittered retries of a refused connection may last.
fn relay(backend: u16) -> u16 {
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let start = Instant::now();
                let server = loop {
                    match TcpStream::connect(("127.0.0.1", backend)) {
                        Ok(s) => break s,
                        Err(_) if start.elapsed() < Duration::from_secs(60) => std::thread::sleep(Duration::from_millis(20)),
                        Err(_) => return,
                    }
                };
                // Each direction until its end closes; a closed backend closes the client too.
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                    let _ = from.shutdown(Shutdown::Read);
                };
                let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = std::thread::spawn(move || pipe(c, s));
                pipe(server, client);
                let _ = up.join();
            });
        }
    });
    port
}

/// The text of every `<tag>…</tag>` in `xml` (Azurite's listings; the names here need no unescaping).
fn tags(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(open.as_str()).skip(1).filter_map(|s| s.split_once(close.as_str()).map(|(v, _)| v.to_string())).collect()
}

/// HMAC-SHA-256 (RFC 2104), for SharedKey signatures.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new().chain_update(k.map(|b| b ^ 0x36)).chain_update(msg).finalize();
    Sha256::new().chain_update(k.map(|b| b ^ 0x5c)).chain_update(inner).finalize().into()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() { B64[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

fn unbase64(text: &str) -> Vec<u8> {
    let digits: Vec<u32> = text.bytes().filter(|&b| b != b'=').map(|b| B64.iter().position(|&c| c == b).unwrap() as u32).collect();
    let mut out = vec![];
    for c in digits.chunks(4) {
        let n = c.iter().enumerate().fold(0u32, |n, (i, d)| n | d << (18 - 6 * i));
        out.extend(n.to_be_bytes()[1..c.len()].iter());
    }
    out
}

/// An RFC 1123 date (`Mon, 07 Dec 2026 07:10:00 GMT`), as `x-ms-date` wants.
fn http_date(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Days to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[month as usize - 1],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[test]
fn the_signing_helpers_match_known_answers() {
    // RFC 4231, test case 2; RFC 4648's vectors; a known date.
    assert_eq!(
        hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    for (plain, coded) in
        [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")]
    {
        assert_eq!(base64(plain.as_bytes()), coded);
        assert_eq!(unbase64(coded), plain.as_bytes());
    }
    assert_eq!(unbase64(AZURITE_KEY).len(), 64);
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_796_627_400);
    assert_eq!(http_date(t), "Mon, 07 Dec 2026 07:10:00 GMT");
    assert_eq!(http_date(std::time::UNIX_EPOCH + Duration::from_secs(951_782_400)), "Tue, 29 Feb 2000 00:00:00 GMT");
}

#[test]
fn a_pipeline_keeps_every_artefact_in_the_container() {
    let Some(az) = Azurite::start(None) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = every_stage_pipeline(tmp.path(), &format!("az://{CONTAINER}/runs"), "");
    let start = Instant::now();
    let out = ok(az.btm(tmp.path()).arg("run").arg(&file).arg("--quiet").output().unwrap());
    eprintln!("every stage on Azurite: {:.1}s", start.elapsed().as_secs_f64());
    for model in ["seed", "expert-scripture", "expert-code", "merged", "continued", "upcycled", "upcycled-continued", "baseline"] {
        assert!(out.contains(&format!("| {model} |")), "{model} missing from the table:\n{out}");
    }
    assert!(out.contains(&format!("report: az://{CONTAINER}/runs/mini/report.md")), "{out}");

    let objects = az.objects("runs/mini/");
    for o in [
        "pipeline.yaml",
        "plan.json",
        "report.md",
        "report.html",
        "plots/loss.svg",
        "tokenizer/tokenizer.json",
        "seed/model/MANIFEST.json",
        "experts/code/model/MANIFEST.json",
        "experts/code/checkpoints/step-00000006/MANIFEST.json",
        "merged/MANIFEST.json",
        "upcycled/MANIFEST.json",
        "continued/model/MANIFEST.json",
        "upcycled-continued/model/MANIFEST.json",
        "baseline/model/MANIFEST.json",
        "eval/merged/code.json",
        "jobs/merge/done.json",
        "logs/merge.log",
    ] {
        assert!(objects.contains(&format!("runs/mini/{o}")), "{o} is not in the container: {objects:#?}");
    }
    // The data went up once, by content, and the jobs read it from there.
    assert!(objects.iter().any(|o| o.starts_with("runs/mini/inputs/") && o.ends_with("/train.jsonl")), "{objects:#?}");
    let job = String::from_utf8(az.get("runs/mini/jobs/expert-code/job.yaml")).unwrap();
    assert!(
        job.contains(&format!("az://{CONTAINER}/runs/mini/inputs/"))
            && job.contains(&format!("out: az://{CONTAINER}/runs/mini/experts/code")),
        "{job}"
    );
    // Published artefacts verify, read back over REST.
    for a in ["merged", "experts/code/model", "experts/code/checkpoints/step-00000006", "continued/model"] {
        let (_tmp, d) = az.download(&format!("runs/mini/{a}"));
        btm_model::Manifest::read(&d).unwrap().verify(&d).unwrap_or_else(|e| panic!("{a}: {e}"));
    }

    // Nothing of the run on the local disk: only the pipeline file and the cache are here.
    let mut here: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    here.sort();
    assert_eq!(here, vec!["cache", "mini.yaml"]);

    // The orchestrator reads the run back from the store.
    let again = ok(az.btm(tmp.path()).arg("run").arg(&file).output().unwrap());
    assert!(again.contains("nothing to do: all"), "{again}");
    let url = format!("az://{CONTAINER}/runs/mini");
    let status = ok(az.btm(tmp.path()).args(["status", &url]).output().unwrap());
    assert!(status.contains("expert/code") && status.contains("step 6/6") && status.contains("jobs done"), "{status}");
    let report = ok(az.btm(tmp.path()).args(["report", &url]).output().unwrap());
    assert!(report.contains("| continued |"), "{report}");
}

#[test]
fn a_missing_account_container_or_endpoint_is_a_named_error() {
    let Some(az) = Azurite::start(None) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = fixture_pipeline(tmp.path(), "named", &format!("az://{CONTAINER}/runs"), "{kind: local, slots: 1}", "steps: 2", "");
    let run = |cmd: &mut Command, extra: &[&str]| {
        let out = cmd.arg("run").arg(&file).args(extra).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // Neither an account nor emulator mode.
    let err = run(az.btm(tmp.path()).env_remove("AZURE_STORAGE_USE_EMULATOR"), &[]);
    assert!(
        err.contains(&format!("az://{CONTAINER}/runs/named: no Azure storage account")) && err.contains("AZURE_STORAGE_ACCOUNT_NAME"),
        "{err}"
    );

    // A container that is not there.
    let err = run(&mut az.btm(tmp.path()), &["--run-dir", "az://no-such-container/x"]);
    assert!(err.contains("run storage `az://no-such-container/x`") && err.contains("ContainerNotFound"), "{err}");
    assert!(!err.contains(AZURITE_KEY), "the account key was printed:\n{err}");

    // Nothing listening at the endpoint (object_store's own emulator settings this time): a
    // named error after the retries, in seconds.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let start = Instant::now();
    let err = run(
        az.btm(tmp.path()).env_remove("AZURE_STORAGE_ENDPOINT").env("AZURITE_BLOB_STORAGE_URL", format!("http://127.0.0.1:{port}")),
        &[],
    );
    let secs = start.elapsed().as_secs_f64();
    assert!(
        err.contains(&format!("run storage `az://{CONTAINER}/runs/named`: cannot use the object store"))
            && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(secs < 90.0, "a dead endpoint took {secs:.0}s to report");
}

/// `btm run` on `file` with 5 MiB parts, output captured.
fn spawn_run(az: &Azurite, dir: &Path, file: &Path) -> Child {
    az.btm(dir)
        .env("BTM_UPLOAD_PART_BYTES", (5 << 20).to_string())
        .arg("run")
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The emulator stops after the 3rd block of a checkpoint file: the seed's first checkpoint.
const FAULT: Fault = Fault { blocks: 3, path: "/checkpoints/" };

/// Wait until the emulator has stopped for its fault; fails if `run` (in `dir`) ends first.
fn wait_for_fault(az: &mut Azurite, run: &mut Child, dir: &Path) {
    let start = Instant::now();
    loop {
        if let Some(status) = az.exited() {
            assert!(status.success(), "Azurite should have stopped cleanly on the fault's SIGTERM: {status}");
            return;
        }
        if let Some(status) = run.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(run.stderr.as_mut().unwrap(), &mut err).unwrap();
            // The jobs' logs are kept locally until they go up to the store.
            let logs: String = std::fs::read_dir(dir.join("cache/runs-local"))
                .into_iter()
                .flatten()
                .flatten()
                .flat_map(|run| std::fs::read_dir(run.path().join("logs")).into_iter().flatten().flatten())
                .map(|log| format!("--- {}\n{}", log.path().display(), std::fs::read_to_string(log.path()).unwrap_or_default()))
                .collect();
            panic!("btm run ended ({status}) before the emulator stopped:\n{err}\n{logs}");
        }
        assert!(start.elapsed() < Duration::from_secs(300), "no fault within 5 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every checkpoint under `prefix` that has a manifest verifies against it; their names.
fn published_checkpoints_verify(az: &Azurite, prefix: &str) -> Vec<String> {
    let mut steps: Vec<String> = az
        .objects(&format!("{prefix}/"))
        .iter()
        .filter_map(|o| o.strip_prefix(&format!("{prefix}/"))?.strip_suffix("/MANIFEST.json").map(str::to_string))
        .collect();
    steps.sort();
    for step in &steps {
        let (_tmp, d) = az.download(&format!("{prefix}/{step}"));
        btm_model::Manifest::read(&d).unwrap().verify(&d).unwrap_or_else(|e| panic!("{prefix}/{step} is published but broken: {e}"));
    }
    steps
}

#[test]
fn the_emulator_restarting_during_a_checkpoint_upload_is_survived() {
    let Some(mut az) = Azurite::start(Some(FAULT)) else { return };
    az.behind_relay();
    let tmp = tempfile::tempdir().unwrap();
    let file = multipart_pipeline(tmp.path(), "restart", &format!("az://{CONTAINER}/runs"));
    let mut run = spawn_run(&az, tmp.path(), &file);
    wait_for_fault(&mut az, &mut run, tmp.path());
    // Started again at once on the same workspace and port: the upload retries its blocks (the
    // relay holds the connections made meanwhile).
    az.spawn(None);
    let out = ok(run.wait_with_output().unwrap());
    assert!(out.contains("| expert-scripture |"), "{out}");
    assert_eq!(published_checkpoints_verify(&az, "runs/restart/seed/checkpoints"), vec!["step-00000002"]);
    assert_eq!(published_checkpoints_verify(&az, "runs/restart/experts/scripture/checkpoints"), vec!["step-00000002", "step-00000004"]);
    // The block blobs are whole: the weights are larger than one block.
    let weights = az.get("runs/restart/seed/checkpoints/step-00000002/model.safetensors");
    assert!(weights.len() > 5 << 20, "{} bytes", weights.len());
    let log = String::from_utf8(az.get("runs/restart/logs/seed.log")).unwrap();
    assert!(!log.contains("resuming from") && !log.contains("error"), "the blocks were retried, the job not restarted:\n{log}");
}

#[test]
fn an_emulator_gone_during_a_checkpoint_upload_fails_cleanly_and_a_rerun_completes() {
    let Some(mut az) = Azurite::start(Some(FAULT)) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = multipart_pipeline(tmp.path(), "gone", &format!("az://{CONTAINER}/runs"));
    let mut run = spawn_run(&az, tmp.path(), &file);
    wait_for_fault(&mut az, &mut run, tmp.path());
    let died = Instant::now();
    // Not restarted: the trainer gives up after its retries and the run fails, naming the job.
    let out = run.wait_with_output().unwrap();
    let secs = died.elapsed().as_secs_f64();
    eprintln!("btm run failed {secs:.1}s after the emulator went away");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("job seed failed"), "{err}");
    assert!(secs < 180.0, "a dead store should fail the run within a minute or two, took {secs:.0}s");

    az.spawn(None);
    // The checkpoint being uploaded has some files but no manifest: not published (and its
    // interrupted file's blocks, never committed, are invisible to readers).
    let ckpts = "runs/gone/seed/checkpoints";
    assert!(!az.objects(&format!("{ckpts}/step-00000002/")).is_empty(), "{:#?}", az.objects("runs/gone/"));
    assert!(published_checkpoints_verify(&az, ckpts).is_empty(), "{:#?}", az.objects("runs/gone/"));
    let out = ok(spawn_run(&az, tmp.path(), &file).wait_with_output().unwrap());
    assert!(out.contains("| expert-scripture |"), "{out}");
    assert_eq!(published_checkpoints_verify(&az, ckpts), vec!["step-00000002"]);
    assert_eq!(published_checkpoints_verify(&az, "runs/gone/experts/scripture/checkpoints"), vec!["step-00000002", "step-00000004"]);
    // The partial checkpoint was not resumed from: the rerun trained the seed from step 0.
    let log = String::from_utf8(az.get("runs/gone/logs/seed.log")).unwrap();
    assert!(!log.contains("resuming from"), "{log}");
}

/// A training source in the container is read in place: JSONL streamed once (its bytes fetched
/// exactly once, nothing stored locally), parquet by byte ranges; a second job over the same
/// sources finds its token cache by the blobs' size and ETag without fetching a byte. The store
/// is configured as for a real account this time: account, key, endpoint, plain HTTP allowed.
#[test]
fn training_sources_in_the_container_are_streamed_not_downloaded() {
    let Some(az) = Azurite::start(None) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = std::fs::read(common::sample("code", "train")).unwrap();
    az.put("data/code.jsonl", jsonl.clone());
    let texts = btm_model::jsonl::read_texts(Path::new(&common::sample("scripture", "train")), None).unwrap();
    let parquet = tmp.path().join("scripture.parquet");
    btm_trainer::sources::write_parquet(&parquet, &texts, "text", 64).unwrap();
    let parquet_size = std::fs::metadata(&parquet).unwrap().len();
    az.put("data/scripture.parquet", std::fs::read(&parquet).unwrap());
    std::fs::remove_file(&parquet).unwrap();
    let job = |name: &str| {
        let yaml = format!(
            "init: {{checkpoint: {}}}\nout: {out}\ndata:\n  train:\n    - {{path: az://{CONTAINER}/data/code.jsonl}}\n    - {{path: az://{CONTAINER}/data/scripture.parquet}}\n\
             steps: 2\nseq_len: 16\nbatch_size: 2\nthreads: 1\ntoken_cache: {cache}\n",
            common::repo().join("model/tests/fixtures/llama").display(),
            out = tmp.path().join(name).display(),
            cache = tmp.path().join("tokens").display(),
        );
        let file = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        let mut cmd = az.btm(tmp.path());
        cmd.env_remove("AZURE_STORAGE_USE_EMULATOR")
            .env("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT)
            .env("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY)
            .env("AZURE_ALLOW_HTTP", "true");
        ok(cmd.arg("train").arg("--job").arg(&file).output().unwrap())
    };
    let first = job("first");
    let line = |source: &str| first.lines().find(|l| l.contains(&format!("tokenized az://{CONTAINER}/data/{source}"))).map(str::to_string);
    let fetched = |l: &str| -> u64 { l.split("; ").nth(1).and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok()).unwrap() };
    let streamed = line("code.jsonl").unwrap_or_else(|| panic!("no tokenizing line for code.jsonl:\n{first}"));
    assert_eq!(fetched(&streamed), jsonl.len() as u64, "{streamed}");
    let ranged = line("scripture.parquet").unwrap_or_else(|| panic!("no tokenizing line for scripture.parquet:\n{first}"));
    assert!(fetched(&ranged) > 0 && fetched(&ranged) <= parquet_size, "{ranged} (blob of {parquet_size} bytes)");
    assert!(!tmp.path().join("cache/files").exists(), "a source was downloaded whole into the cache");
    let second = job("second");
    assert!(!second.contains("tokenized az://"), "the second job tokenized again:\n{second}");
}
