//! The test server through object_store's S3 client, as btm uses it: authenticated requests
//! succeed and wrong keys are refused; a multipart upload interrupted by `--exit-after-parts`
//! finishes against the restarted server, because uploads in progress live on disk.

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

mod common;
use common::start;

fn store(port: u16, secret: &str) -> impl ObjectStore {
    AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{port}"))
        .with_allow_http(true)
        .with_bucket_name("btm-test")
        .with_region("us-east-1")
        .with_access_key_id("ak")
        .with_secret_access_key(secret)
        .with_retry(object_store::RetryConfig { max_retries: 8, retry_timeout: std::time::Duration::from_secs(20), ..Default::default() })
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("btm-test")).unwrap();
    let (mut server, port) = start(tmp.path(), 0, &["--exit-after-parts", "2"]);
    let s = store(port, "sk");
    s.put(&StorePath::from("small.txt"), PutPayload::from_static(b"hello")).await.unwrap();
    assert_eq!(s.get(&StorePath::from("small.txt")).await.unwrap().bytes().await.unwrap().as_ref(), b"hello");
    let e = store(port, "wrong").get(&StorePath::from("small.txt")).await.unwrap_err().to_string();
    assert!(e.contains("403") || e.contains("SignatureDoesNotMatch") || e.contains("denied"), "{e}");

    // Three parts (S3 wants parts of 5 MiB but the last); the server dies storing the second.
    let part = |i: u8| vec![i; 5 << 20];
    let mut upload = s.put_multipart(&StorePath::from("big.bin")).await.unwrap();
    upload.put_part(PutPayload::from(part(1))).await.unwrap();
    let second = upload.put_part(PutPayload::from(part(2)));
    let root = tmp.path().to_path_buf();
    let restart = tokio::task::spawn_blocking(move || {
        let status = server.0.wait().unwrap();
        assert_eq!(status.code(), Some(3), "the fault should have fired");
        start(&root, port, &[]).0
    });
    // The client retries the interrupted part until the restarted server answers.
    second.await.unwrap();
    let _server = restart.await.unwrap();
    upload.put_part(PutPayload::from(vec![3u8; 1000])).await.unwrap();
    upload.complete().await.unwrap();
    let got = s.get(&StorePath::from("big.bin")).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), (10 << 20) + 1000);
    assert!(got[..5 << 20].iter().all(|&b| b == 1) && got[5 << 20..10 << 20].iter().all(|&b| b == 2));
}
