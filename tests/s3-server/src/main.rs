//! A real S3-compatible server on loopback for btm's tests: the S3 API of `s3s` (SigV4
//! authentication, multipart uploads, listings) over `s3s-fs`, which keeps buckets, objects and
//! multipart uploads in progress as files under a root directory — so a server killed and
//! started again on the same root carries on where it stopped. Not part of btm itself.
//!
//! ```text
//! btm-s3-server --root DIR [--port P] [--access-key K --secret-key S]
//!               [--exit-after-parts N] [--fail-rate R] [--delay-rate R --delay-ms MS]
//!               [--fault-seed S] [--fault-path TEXT] [--fault-log FILE]
//! ```
//! Binds 127.0.0.1 only (port 0: any free one) and prints `listening on http://127.0.0.1:PORT`
//! once it accepts connections. A bucket is a directory under the root.
//!
//! Faults to inject (`--help` lists them too):
//! - `--exit-after-parts N`: the server exits (status 3) right after storing the N-th
//!   UploadPart, without answering it, the way a crash mid-upload looks to a client.
//! - `--fail-rate R` (0 to 1): a random share R of requests is answered, without being carried
//!   out, with one of the errors S3 itself sends under load or on a fault of its own, which
//!   clients are meant to retry: `503 SlowDown` or `500 InternalError`, half and half
//!   (<https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html>). The request body
//!   is read first, as a server that took the request and then refused it would.
//! - `--delay-rate R --delay-ms MS`: a random share R of requests is held MS milliseconds
//!   before it is carried out (a slow server; a request can be both delayed and failed).
//! - `--fault-seed S` (default 0): seeds the draws, one per request in the order requests
//!   arrive, so a sequential client meets the same faults on every run.
//! - `--fault-path TEXT`: only requests on paths containing TEXT are subject to the faults
//!   (and count as parts for `--exit-after-parts`).
//!
//! Every injected failure and delay is logged on stderr, and appended as a line to
//! `--fault-log FILE` when given (for tests to count them).

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

const USAGE: &str = "usage: btm-s3-server --root DIR [--port P] [--access-key K --secret-key S] [--exit-after-parts N] \
[--fail-rate R] [--delay-rate R --delay-ms MS] [--fault-seed S] [--fault-path TEXT] [--fault-log FILE]

  --root DIR             where buckets (directories) and objects (files) are kept
  --port P               the loopback port to bind (0, the default: any free one)
  --access-key K         SigV4 credentials to require (with --secret-key; none: anonymous)
  --secret-key S
  --exit-after-parts N   exit (status 3) right after storing the N-th UploadPart, unanswered
  --fail-rate R          answer a random share R (0 to 1) of requests with 503 SlowDown or
                         500 InternalError (half and half) instead of carrying them out
  --delay-rate R         hold a random share R (0 to 1) of requests --delay-ms before serving
  --delay-ms MS          how long a delayed request is held (default 0)
  --fault-seed S         seed of the per-request draws, in arrival order (default 0)
  --fault-path TEXT      only requests on paths containing TEXT meet the faults above
  --fault-log FILE       append a line to FILE for every request failed or delayed";

struct Opts {
    root: PathBuf,
    port: u16,
    keys: Option<(String, String)>,
    exit_after_parts: Option<usize>,
    faults: Faults,
}

/// The random faults: which share of requests fails or is delayed, drawn from a seeded stream.
struct Faults {
    fail_rate: f64,
    delay_rate: f64,
    delay: std::time::Duration,
    seed: u64,
    /// Only requests on paths containing this meet faults (empty: every request).
    within: String,
    /// Requests drawn for so far: the position in the seeded stream.
    drawn: AtomicU64,
    /// Where each injected fault is also recorded, one line each.
    log: Option<PathBuf>,
}

/// What happens to one request.
#[derive(Debug, Default, Clone, PartialEq)]
struct Fate {
    delay: Option<std::time::Duration>,
    /// The error it is answered with instead of being carried out.
    fail: Option<(hyper::StatusCode, &'static str, &'static str)>,
}

/// The errors S3 answers when it is overloaded or has a fault of its own; clients retry both.
const SLOW_DOWN: (hyper::StatusCode, &str, &str) = (hyper::StatusCode::SERVICE_UNAVAILABLE, "SlowDown", "Please reduce your request rate.");
const INTERNAL_ERROR: (hyper::StatusCode, &str, &str) =
    (hyper::StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "We encountered an internal error. Please try again.");

/// splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014):
/// the `i`-th value of the stream seeded with `seed`, so concurrent requests need no shared state
/// beyond a counter.
fn splitmix64(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Faults {
    fn active(&self) -> bool {
        self.fail_rate > 0.0 || (self.delay_rate > 0.0 && !self.delay.is_zero())
    }

    /// Say what fault was injected, on stderr and in the fault log.
    fn record(&self, line: &str) {
        eprintln!("btm-s3-server: {line}");
        if let Some(log) = &self.log {
            // One write per line in append mode: lines of concurrent requests do not interleave.
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
            if let Err(e) = written {
                eprintln!("btm-s3-server: --fault-log {}: {e}", log.display());
            }
        }
    }

    /// The fate of the next request on `path`: three draws (delay?, fail?, which error).
    fn draw(&self, path: &str) -> Fate {
        if !self.active() || !path.contains(&self.within) {
            return Fate::default();
        }
        let i = self.drawn.fetch_add(1, Ordering::SeqCst);
        let unit = |k: u64| (splitmix64(self.seed, 3 * i + k) >> 11) as f64 / (1u64 << 53) as f64;
        Fate {
            delay: (unit(0) < self.delay_rate && !self.delay.is_zero()).then_some(self.delay),
            fail: (unit(1) < self.fail_rate).then(|| if unit(2) < 0.5 { SLOW_DOWN } else { INTERNAL_ERROR }),
        }
    }
}

fn usage(why: &str) -> ! {
    eprintln!("btm-s3-server: {why}\n{USAGE}");
    std::process::exit(2);
}

fn parse() -> Opts {
    let mut args = std::env::args().skip(1);
    let (mut root, mut port, mut ak, mut sk, mut exit_after_parts) = (None, 0u16, None, None, None);
    let mut faults = Faults {
        fail_rate: 0.0,
        delay_rate: 0.0,
        delay: std::time::Duration::ZERO,
        seed: 0,
        within: String::new(),
        drawn: AtomicU64::new(0),
        log: None,
    };
    let rate = |flag: &str, v: String| -> f64 {
        v.parse()
            .ok()
            .filter(|r: &f64| (0.0..=1.0).contains(r))
            .unwrap_or_else(|| usage(&format!("{flag}: `{v}` is not a share from 0 to 1")))
    };
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let mut value = || args.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--root" => root = Some(PathBuf::from(value())),
            "--port" => port = value().parse().unwrap_or_else(|_| usage("--port: not a port number")),
            "--access-key" => ak = Some(value()),
            "--secret-key" => sk = Some(value()),
            "--fault-path" => faults.within = value(),
            "--exit-after-parts" => exit_after_parts = Some(value().parse().unwrap_or_else(|_| usage("--exit-after-parts: not a number"))),
            "--fail-rate" => faults.fail_rate = rate("--fail-rate", value()),
            "--delay-rate" => faults.delay_rate = rate("--delay-rate", value()),
            "--delay-ms" => {
                faults.delay = std::time::Duration::from_millis(value().parse().unwrap_or_else(|_| usage("--delay-ms: not a number")))
            }
            "--fault-log" => faults.log = Some(PathBuf::from(value())),
            "--fault-seed" => faults.seed = value().parse().unwrap_or_else(|_| usage("--fault-seed: not a number")),
            other => usage(&format!("unknown argument `{other}`")),
        }
    }
    let keys = match (ak, sk) {
        (Some(a), Some(s)) => Some((a, s)),
        (None, None) => None,
        _ => usage("--access-key and --secret-key go together"),
    };
    Opts { root: root.unwrap_or_else(|| usage("--root is required")), port, keys, exit_after_parts, faults }
}

/// S3's XML error answer (`<Error><Code>…`), which object_store reads the code from.
fn error_answer((status, code, message): (hyper::StatusCode, &str, &str), resource: &str) -> hyper::Response<s3s::Body> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource></Error>"
    );
    let mut r = hyper::Response::new(s3s::Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/xml"));
    r
}

/// Read a request's body to its end, as a server that took the request before failing it does
/// (answering early would look like a dropped connection to the client instead).
async fn drain(mut body: hyper::body::Incoming) {
    use hyper::body::Body as _;
    while let Some(Ok(_)) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {}
}

/// The on-disk path of an object request (`/bucket/key…`, path-style), `None` for requests
/// on a bucket itself.
fn object_path(root: &std::path::Path, uri_path: &str) -> Option<PathBuf> {
    let mut bytes = vec![];
    let raw = uri_path.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let Ok(b) = u8::from_str_radix(std::str::from_utf8(&raw[i + 1..i + 3]).ok()?, 16) {
                bytes.push(b);
                i += 3;
                continue;
            }
        }
        bytes.push(raw[i]);
        i += 1;
    }
    let decoded = String::from_utf8(bytes).ok()?;
    let (bucket, key) = decoded.trim_start_matches('/').split_once('/')?;
    if key.is_empty() || key.split('/').any(|p| p == "..") {
        return None;
    }
    Some(root.join(bucket).join(key))
}

/// S3 has no directories, s3s-fs keeps prefixes as ones: a HEAD, GET or DELETE of a key that
/// is a directory on disk answers as S3 does for a missing key (404, and 204 for DELETE)
/// instead of s3s-fs's 500.
fn directory_answer<B>(root: &std::path::Path, req: &hyper::Request<B>) -> Option<hyper::Response<s3s::Body>> {
    let method = req.method();
    if !(method == hyper::Method::HEAD || method == hyper::Method::GET || method == hyper::Method::DELETE) || req.uri().query().is_some() {
        return None;
    }
    if !object_path(root, req.uri().path())?.is_dir() {
        return None;
    }
    let mut r = hyper::Response::new(s3s::Body::empty());
    *r.status_mut() = if method == hyper::Method::DELETE { hyper::StatusCode::NO_CONTENT } else { hyper::StatusCode::NOT_FOUND };
    if method == hyper::Method::GET {
        *r.body_mut() = s3s::Body::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NoSuchKey</Code></Error>".to_string());
    }
    Some(r)
}

/// An UploadPart request (`PUT /bucket/key?partNumber=N&uploadId=…`) to a path containing `within`.
fn is_upload_part<B>(req: &hyper::Request<B>, within: &str) -> bool {
    req.method() == hyper::Method::PUT
        && req.uri().query().is_some_and(|q| q.contains("partNumber=") && q.contains("uploadId="))
        && req.uri().path().contains(within)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let opts = parse();
    std::fs::create_dir_all(&opts.root).unwrap_or_else(|e| usage(&format!("--root {}: {e}", opts.root.display())));
    let fs = s3s_fs::FileSystem::new(&opts.root).unwrap_or_else(|e| usage(&format!("--root {}: {e:?}", opts.root.display())));
    let mut builder = S3ServiceBuilder::new(fs);
    if let Some((ak, sk)) = opts.keys {
        builder.set_auth(SimpleAuth::from_single(ak, sk));
    }
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", opts.port))
        .await
        .unwrap_or_else(|e| usage(&format!("binding 127.0.0.1:{}: {e}", opts.port)));
    let addr = listener.local_addr().expect("bound address");
    println!("listening on http://{addr}");
    std::io::stdout().flush().expect("stdout");

    let parts = Arc::new(AtomicUsize::new(0));
    let faults = Arc::new(opts.faults);
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let Ok((socket, _)) = listener.accept().await else { continue };
        let service = service.clone();
        let parts = parts.clone();
        let faults = faults.clone();
        let limit = opts.exit_after_parts;
        let root = opts.root.clone();
        let handler = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let service = service.clone();
            let root = root.clone();
            let parts = parts.clone();
            let part = is_upload_part(&req, &faults.within);
            let dir = directory_answer(&root, &req);
            let fate = faults.draw(req.uri().path());
            let faults = faults.clone();
            async move {
                let what = format!("{} {}", req.method(), req.uri());
                if let Some(delay) = fate.delay {
                    faults.record(&format!("delayed {} ms: {what}", delay.as_millis()));
                    tokio::time::sleep(delay).await;
                }
                if let Some(error) = fate.fail {
                    faults.record(&format!("failed {} {}: {what}", error.0.as_u16(), error.1));
                    let resource = req.uri().path().to_string();
                    drain(req.into_body()).await;
                    return Ok(error_answer(error, &resource));
                }
                if let Some(r) = dir {
                    return Ok(r);
                }
                let response = hyper::service::Service::call(&service, req).await;
                if part && limit.is_some_and(|n| parts.fetch_add(1, Ordering::SeqCst) + 1 >= n) {
                    eprintln!("btm-s3-server: exiting after UploadPart {} (--exit-after-parts)", parts.load(Ordering::SeqCst));
                    std::process::exit(3);
                }
                response
            }
        });
        let http = http.clone();
        tokio::spawn(async move {
            let _ = http.serve_connection(TokioIo::new(socket), handler).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(fail_rate: f64, delay_rate: f64, seed: u64, within: &str) -> Faults {
        Faults {
            fail_rate,
            delay_rate,
            delay: std::time::Duration::from_millis(5),
            seed,
            within: within.into(),
            drawn: AtomicU64::new(0),
            log: None,
        }
    }

    #[test]
    fn faults_hit_their_share_of_requests_the_same_way_for_a_seed() {
        let f = faults(0.3, 0.2, 7, "");
        let fates: Vec<Fate> = (0..10_000).map(|_| f.draw("/b/k")).collect();
        let failed = fates.iter().filter(|x| x.fail.is_some()).count();
        let delayed = fates.iter().filter(|x| x.delay.is_some()).count();
        let slow_down = fates.iter().filter(|x| x.fail == Some(SLOW_DOWN)).count();
        // Binomial(10 000, p): three standard deviations are under 1.5 points.
        assert!((2_850..=3_150).contains(&failed), "{failed} of 10 000 failed at 0.3");
        assert!((1_850..=2_150).contains(&delayed), "{delayed} of 10 000 delayed at 0.2");
        assert!(slow_down > failed / 3 && slow_down < failed * 2 / 3, "{slow_down} SlowDown of {failed}");
        let again = faults(0.3, 0.2, 7, "");
        assert!((0..10_000).map(|_| again.draw("/b/k")).eq(fates.iter().cloned()), "the same seed gave other faults");
        let other = faults(0.3, 0.2, 8, "");
        assert!(!(0..100).map(|_| other.draw("/b/k")).eq(fates.into_iter().take(100)), "another seed gave the same faults");
    }

    #[test]
    fn faults_keep_to_their_path_and_rates_zero_and_one_are_exact() {
        let f = faults(1.0, 0.0, 1, "MANIFEST.json");
        assert_eq!(f.draw("/b/run/model.safetensors"), Fate::default());
        assert!((0..1000).all(|_| f.draw("/b/run/MANIFEST.json").fail.is_some()));
        let none = faults(0.0, 0.0, 1, "");
        assert!((0..1000).all(|_| none.draw("/b/k") == Fate::default()));
    }
}
