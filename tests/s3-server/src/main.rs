//! A real S3-compatible server on loopback for btm's tests: the S3 API of `s3s` (SigV4
//! authentication, multipart uploads, listings) over `s3s-fs`, which keeps buckets, objects and
//! multipart uploads in progress as files under a root directory — so a server killed and
//! started again on the same root carries on where it stopped. Not part of btm itself.
//!
//! ```text
//! btm-s3-server --root DIR [--port P] [--access-key K --secret-key S] [--exit-after-parts N]
//! ```
//! Binds 127.0.0.1 only (port 0: any free one) and prints `listening on http://127.0.0.1:PORT`
//! once it accepts connections. A bucket is a directory under the root. `--exit-after-parts N`
//! injects a fault: the server exits right after storing the N-th UploadPart, without
//! answering it, the way a crash mid-upload looks to a client.

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
}

fn usage(why: &str) -> ! {
    eprintln!("btm-s3-server: {why}\nusage: btm-s3-server --root DIR [--port P] [--access-key K --secret-key S] [--exit-after-parts N]");
    std::process::exit(2);
}

fn parse() -> Opts {
    let mut args = std::env::args().skip(1);
    let (mut root, mut port, mut ak, mut sk, mut exit_after_parts) = (None, 0u16, None, None, None);
    while let Some(flag) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--root" => root = Some(PathBuf::from(value())),
            "--port" => port = value().parse().unwrap_or_else(|_| usage("--port: not a port number")),
            "--access-key" => ak = Some(value()),
            "--secret-key" => sk = Some(value()),
            "--exit-after-parts" => exit_after_parts = Some(value().parse().unwrap_or_else(|_| usage("--exit-after-parts: not a number"))),
            other => usage(&format!("unknown argument `{other}`")),
        }
    }
    let keys = match (ak, sk) {
        (Some(a), Some(s)) => Some((a, s)),
        (None, None) => None,
        _ => usage("--access-key and --secret-key go together"),
    };
    Opts {
        root: root.unwrap_or_else(|| usage("--root is required")),
        port,
        keys,
        exit_after_parts,
    }
}

/// An UploadPart request: `PUT /bucket/key?partNumber=N&uploadId=…`.
fn is_upload_part<B>(req: &hyper::Request<B>) -> bool {
    req.method() == hyper::Method::PUT && req.uri().query().is_some_and(|q| q.contains("partNumber=") && q.contains("uploadId="))
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
        let handler = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let service = service.clone();
            let parts = parts.clone();
            async move {
                let part = is_upload_part(&req);
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
