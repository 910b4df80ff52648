//! A real S3-compatible server on loopback for btm's tests: the S3 API of `s3s` (SigV4
//! authentication, multipart uploads, listings) over `s3s-fs`, which keeps buckets, objects and
//! multipart uploads in progress as files under a root directory — so a server killed and
//! started again on the same root carries on where it stopped. Not part of btm itself.
//!
//! ```text
//! btm-s3-server --root DIR [--port P] [--access-key K --secret-key S] [--exit-after-parts N [--fault-path TEXT]]
//! ```
//! Binds 127.0.0.1 only (port 0: any free one) and prints `listening on http://127.0.0.1:PORT`
//! once it accepts connections. A bucket is a directory under the root. `--exit-after-parts N`
//! injects a fault: the server exits right after storing the N-th UploadPart, without
//! answering it, the way a crash mid-upload looks to a client; with `--fault-path TEXT` only
//! parts of objects whose path contains TEXT count.

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

struct Opts {
    root: PathBuf,
    port: u16,
    keys: Option<(String, String)>,
    exit_after_parts: Option<usize>,
    fault_path: String,
}

fn usage(why: &str) -> ! {
    eprintln!("btm-s3-server: {why}\nusage: btm-s3-server --root DIR [--port P] [--access-key K --secret-key S] [--exit-after-parts N [--fault-path TEXT]]");
    std::process::exit(2);
}

fn parse() -> Opts {
    let mut args = std::env::args().skip(1);
    let (mut root, mut port, mut ak, mut sk, mut exit_after_parts, mut fault_path) = (None, 0u16, None, None, None, String::new());
    while let Some(flag) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--root" => root = Some(PathBuf::from(value())),
            "--port" => port = value().parse().unwrap_or_else(|_| usage("--port: not a port number")),
            "--access-key" => ak = Some(value()),
            "--secret-key" => sk = Some(value()),
            "--fault-path" => fault_path = value(),
            "--exit-after-parts" => exit_after_parts = Some(value().parse().unwrap_or_else(|_| usage("--exit-after-parts: not a number"))),
            other => usage(&format!("unknown argument `{other}`")),
        }
    }
    let keys = match (ak, sk) {
        (Some(a), Some(s)) => Some((a, s)),
        (None, None) => None,
        _ => usage("--access-key and --secret-key go together"),
    };
    Opts { root: root.unwrap_or_else(|| usage("--root is required")), port, keys, exit_after_parts, fault_path }
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
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let Ok((socket, _)) = listener.accept().await else { continue };
        let service = service.clone();
        let parts = parts.clone();
        let limit = opts.exit_after_parts;
        let within = opts.fault_path.clone();
        let root = opts.root.clone();
        let handler = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let service = service.clone();
            let root = root.clone();
            let parts = parts.clone();
            let part = is_upload_part(&req, &within);
            let dir = directory_answer(&root, &req);
            async move {
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
