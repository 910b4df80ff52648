//! The server's random faults through object_store's S3 client, as btm uses it: with a share
//! of requests failed (503 SlowDown, 500 InternalError) and delayed, every request still
//! succeeds through the client's bounded retries; with all of them failed, a request ends in
//! an error naming the S3 error and the retries, in bounded time.

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::time::{Duration, Instant};

mod common;
use common::start;

fn store(port: u16, max_retries: usize) -> impl ObjectStore {
    let backoff =
        object_store::BackoffConfig { init_backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(200), base: 2.0 };
    AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{port}"))
        .with_allow_http(true)
        .with_bucket_name("btm-test")
        .with_region("us-east-1")
        .with_access_key_id("ak")
        .with_secret_access_key("sk")
        .with_retry(object_store::RetryConfig { backoff, max_retries, retry_timeout: Duration::from_secs(20) })
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_of_failed_and_slow_requests_is_retried_through() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("btm-test")).unwrap();
    let log = tmp.path().join("faults.log");
    let log_arg = log.to_str().unwrap();
    let (_server, port) = start(
        tmp.path(),
        0,
        &["--fail-rate", "0.3", "--delay-rate", "0.3", "--delay-ms", "20", "--fault-seed", "38", "--fault-log", log_arg],
    );
    let s = store(port, 10);
    for i in 0..40u32 {
        let key = StorePath::from(format!("k/{i}"));
        s.put(&key, PutPayload::from(i.to_le_bytes().to_vec())).await.unwrap();
        assert_eq!(s.get(&key).await.unwrap().bytes().await.unwrap().as_ref(), i.to_le_bytes());
    }
    let faults = std::fs::read_to_string(&log).unwrap();
    let failed = faults.lines().filter(|l| l.starts_with("failed ")).count();
    let delayed = faults.lines().filter(|l| l.starts_with("delayed ")).count();
    // 80 requests and their retries at 0.3: about 34 failures and 34 delays.
    assert!(failed >= 10 && delayed >= 10, "{failed} failed, {delayed} delayed:\n{faults}");
    assert!(faults.contains("503 SlowDown") && faults.contains("500 InternalError"), "{faults}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_failed_ends_in_a_named_error_after_the_retries() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("btm-test")).unwrap();
    let (_server, port) = start(tmp.path(), 0, &["--fail-rate", "1"]);
    let start = Instant::now();
    let e = store(port, 3).put(&StorePath::from("x"), PutPayload::from_static(b"x")).await.unwrap_err().to_string();
    assert!(e.contains("after 3 retries") && (e.contains("SlowDown") || e.contains("InternalError")), "{e}");
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    assert!(!tmp.path().join("btm-test/x").exists(), "a failed request was carried out");
}
