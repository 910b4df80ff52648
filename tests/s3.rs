//! Runs kept in an S3-compatible object store: a real S3 server (`tests/s3-server`, s3s over
//! s3s-fs) on loopback, started here. Every artefact of the run lands in the bucket and
//! nothing in a local run folder; the orchestrator reads results back from the store; a server
//! that dies in the middle of a checkpoint's multipart upload either comes back (the parts are
//! retried) or fails the job cleanly, and no partial checkpoint is ever used.
//!
//! Without the server binary (built by `cargo test --workspace`) the tests say so and pass,
//! unless `BTM_REQUIRE_S3=1` (set by CI). The Slurm variants are in tests/slurm.rs.

mod common;

use common::{btm, every_stage_pipeline, fixture_pipeline, ok, S3Server, BUCKET};
use std::path::Path;
use std::process::Command;

/// Every stage but add-expert, small: tokenizer, seed, experts, merge, upcycle, continue,
/// baseline, eval, with the run in the bucket.
fn every_stage(dir: &Path) -> std::path::PathBuf {
    every_stage_pipeline(dir, &format!("s3://{BUCKET}/runs"), "")
}

/// `btm` in `dir`, talking to `s3`, with its cache in `dir/cache`.
fn btm_s3(s3: &S3Server, dir: &Path) -> Command {
    let mut cmd = btm();
    s3.env(&mut cmd).current_dir(dir).env("BTM_CACHE", dir.join("cache"));
    cmd
}

#[test]
fn a_pipeline_keeps_every_artefact_in_the_bucket() {
    let Some(s3) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = every_stage(tmp.path());
    let start = std::time::Instant::now();
    let out = ok(btm_s3(&s3, tmp.path()).arg("run").arg(&file).arg("--quiet").output().unwrap());
    eprintln!("every stage on S3: {:.1}s", start.elapsed().as_secs_f64());
    for model in ["seed", "expert-scripture", "expert-code", "merged", "continued", "upcycled", "upcycled-continued", "baseline"] {
        assert!(out.contains(&format!("| {model} |")), "{model} missing from the table:\n{out}");
    }
    assert!(out.contains(&format!("report: s3://{BUCKET}/runs/mini/report.md")), "{out}");

    let objects = s3.objects("runs/mini");
    for o in [
        "pipeline.yaml",
        "plan.json",
        "report.md",
        "report.html",
        "plots/loss.svg",
        "plots/routing-merged.svg",
        "tokenizer/tokenizer.json",
        "seed/model/MANIFEST.json",
        "seed/metrics.jsonl",
        "experts/code/model/MANIFEST.json",
        "experts/code/model/btm.json",
        "experts/code/metrics.jsonl",
        "experts/code/checkpoints/step-00000006/MANIFEST.json",
        "merged/MANIFEST.json",
        "merged/btm.json",
        "upcycled/MANIFEST.json",
        "continued/model/MANIFEST.json",
        "upcycled-continued/model/MANIFEST.json",
        "baseline/model/MANIFEST.json",
        "eval/merged/code.json",
        "eval/baseline/scripture.json",
        "jobs/merge/done.json",
        "jobs/expert-code/job.yaml",
        "logs/merge.log",
    ] {
        assert!(objects.contains(&format!("runs/mini/{o}")), "{o} is not in the bucket: {objects:#?}");
    }
    // The data went up once, by content, and the jobs read it from there.
    assert!(objects.iter().any(|o| o.starts_with("runs/mini/inputs/") && o.ends_with("/train.jsonl")), "{objects:#?}");
    let job = std::fs::read_to_string(s3.dir("runs/mini/jobs/expert-code/job.yaml")).unwrap();
    assert!(
        job.contains(&format!("s3://{BUCKET}/runs/mini/inputs/")) && job.contains(&format!("out: s3://{BUCKET}/runs/mini/experts/code")),
        "{job}"
    );
    // Published artefacts verify in the bucket.
    for a in ["merged", "experts/code/model", "experts/code/checkpoints/step-00000006", "continued/model"] {
        let d = s3.dir(&format!("runs/mini/{a}"));
        btm_model::Manifest::read(&d).unwrap().verify(&d).unwrap();
    }
    let report = std::fs::read_to_string(s3.dir("runs/mini/report.md")).unwrap();
    assert!(report.contains("| merged |") && report.contains("expert ← ["), "{report}");

    // Nothing of the run on the local disk: only the pipeline file and the cache are here.
    let mut here: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    here.sort();
    assert_eq!(here, vec!["cache", "mini.yaml"]);

    // The orchestrator reads the run back from the store.
    let again = ok(btm_s3(&s3, tmp.path()).arg("run").arg(&file).output().unwrap());
    assert!(again.contains("nothing to do: all"), "{again}");
    let url = format!("s3://{BUCKET}/runs/mini");
    let status = ok(btm_s3(&s3, tmp.path()).args(["status", &url]).output().unwrap());
    assert!(status.contains("expert/code") && status.contains("step 6/6") && status.contains("jobs done"), "{status}");
    assert!(!status.contains("pending") && !status.contains("started"), "{status}");
    let report = ok(btm_s3(&s3, tmp.path()).args(["report", &url]).output().unwrap());
    assert!(report.contains("| continued |"), "{report}");
}

#[test]
fn a_missing_bucket_or_a_dead_endpoint_is_a_named_error() {
    let Some(s3) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = every_stage(tmp.path());
    let out = btm_s3(&s3, tmp.path()).arg("run").arg(&file).args(["--run-dir", "s3://no-such-bucket/x"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run storage `s3://no-such-bucket/x`") && err.contains("NoSuchBucket"), "{err}");
    assert!(!err.contains("btm-test-secret"), "the secret key was printed:\n{err}");

    // Nothing listening at the endpoint: a named error after the retries, in seconds.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let start = std::time::Instant::now();
    let out = btm_s3(&s3, tmp.path()).env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}")).arg("run").arg(&file).output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("run storage `s3://{BUCKET}/runs/mini`: cannot use the object store"))
            && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(secs < 90.0, "a dead endpoint took {secs:.0}s to report");
    assert!(!err.contains("btm-test-secret"), "the secret key was printed:\n{err}");
}

/// [`common::multipart_pipeline`] with its run in the test bucket.
fn multipart(dir: &Path, name: &str) -> std::path::PathBuf {
    common::multipart_pipeline(dir, name, &format!("s3://{BUCKET}/runs"))
}

/// The server dies right after storing the 3rd part of a checkpoint file: the seed's.
const FAULT: [&str; 4] = ["--exit-after-parts", "3", "--fault-path", "/checkpoints/"];

/// `btm run` on `file`, 5 MiB parts, output captured.
fn spawn_run(s3: &S3Server, dir: &Path, file: &Path) -> std::process::Child {
    btm_s3(s3, dir)
        .env("BTM_UPLOAD_PART_BYTES", (5 << 20).to_string())
        .arg("run")
        .arg(file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait until the server has died of its fault; fails if `run` ends first.
fn wait_for_fault(s3: &mut S3Server, run: &mut std::process::Child) {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = s3.exited() {
            assert_eq!(status.code(), Some(3), "the server should have died of its injected fault");
            return;
        }
        if let Some(status) = run.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(run.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("btm run ended ({status}) before the server fault:\n{err}");
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(300), "no fault within 5 minutes");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Every checkpoint in the bucket that has a manifest verifies against it; their names.
fn published_checkpoints_verify(s3: &S3Server, prefix: &str) -> Vec<String> {
    let mut steps = vec![];
    for e in std::fs::read_dir(s3.dir(prefix)).into_iter().flatten().flatten() {
        let d = e.path();
        if d.join("MANIFEST.json").exists() {
            btm_model::Manifest::read(&d).unwrap().verify(&d).unwrap_or_else(|e| panic!("{} is published but broken: {e}", d.display()));
            steps.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    steps.sort();
    steps
}

#[test]
fn the_server_restarting_during_a_checkpoint_upload_is_survived() {
    let Some(mut s3) = S3Server::start_with(&FAULT) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = multipart(tmp.path(), "restart");
    let mut run = spawn_run(&s3, tmp.path(), &file);
    wait_for_fault(&mut s3, &mut run);
    // Started again at once on the same root: the upload retries the interrupted part.
    s3.spawn(&[]);
    let out = ok(run.wait_with_output().unwrap());
    assert!(out.contains("| expert-scripture |"), "{out}");
    assert_eq!(published_checkpoints_verify(&s3, "runs/restart/seed/checkpoints"), vec!["step-00000002"]);
    assert_eq!(published_checkpoints_verify(&s3, "runs/restart/experts/scripture/checkpoints"), vec!["step-00000002", "step-00000004"]);
    // The multipart objects are whole: the weights are larger than one part.
    let weights = s3.dir("runs/restart/seed/checkpoints/step-00000002/model.safetensors");
    assert!(std::fs::metadata(&weights).unwrap().len() > 5 << 20);
    let log = std::fs::read_to_string(s3.dir("runs/restart/logs/seed.log")).unwrap();
    assert!(!log.contains("resuming from") && !log.contains("error"), "the part was retried, the job not restarted:\n{log}");
}

#[test]
fn a_server_gone_during_a_checkpoint_upload_fails_cleanly_and_a_rerun_completes() {
    let Some(mut s3) = S3Server::start_with(&FAULT) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = multipart(tmp.path(), "gone");
    let mut run = spawn_run(&s3, tmp.path(), &file);
    wait_for_fault(&mut s3, &mut run);
    let died = std::time::Instant::now();
    // Not restarted: the trainer gives up after its retries and the run fails, naming the job.
    let out = run.wait_with_output().unwrap();
    let secs = died.elapsed().as_secs_f64();
    eprintln!("btm run failed {secs:.1}s after the store went away");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("job seed failed"), "{err}");
    assert!(secs < 180.0, "a dead store should fail the run within a minute or two, took {secs:.0}s");
    // The checkpoint being uploaded has some files but no manifest: not published.
    let ckpts = "runs/gone/seed/checkpoints";
    assert!(!s3.objects(&format!("{ckpts}/step-00000002")).is_empty(), "{:#?}", s3.objects("runs/gone"));
    assert!(published_checkpoints_verify(&s3, ckpts).is_empty());

    s3.spawn(&[]);
    let out = ok(spawn_run(&s3, tmp.path(), &file).wait_with_output().unwrap());
    assert!(out.contains("| expert-scripture |"), "{out}");
    assert_eq!(published_checkpoints_verify(&s3, ckpts), vec!["step-00000002"]);
    assert_eq!(published_checkpoints_verify(&s3, "runs/gone/experts/scripture/checkpoints"), vec!["step-00000002", "step-00000004"]);
    // The partial checkpoint was not resumed from: the rerun trained the seed from step 0.
    let log = std::fs::read_to_string(s3.dir("runs/gone/logs/seed.log")).unwrap();
    assert!(!log.contains("resuming from"), "{log}");
}

/// An external trainer in a run kept in the bucket: it gets local copies of its input model and
/// data (here it checks they are files and returns its input), and its output is published
/// into the bucket like btm's own.
#[test]
fn an_external_trainer_works_on_a_run_in_the_bucket() {
    let Some(s3) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let trainer =
        "{kind: command, command: \"test -f {model_in}/config.json && test -f {train_files} && cp -r {model_in}/. {model_out}/\"}";
    let train = format!("steps: 2, batch_size: 4, seq_len: 32, trainer: {trainer}");
    let file =
        fixture_pipeline(tmp.path(), "ext", &format!("s3://{BUCKET}/runs"), "{kind: local, slots: 2, threads_per_job: 1}", &train, "");
    let out = ok(btm_s3(&s3, tmp.path()).arg("run").arg(&file).arg("--quiet").output().unwrap());
    assert!(out.contains("| merged |"), "{out}");
    let objects = s3.objects("runs/ext");
    for o in ["experts/code/model/MANIFEST.json", "experts/code/model/btm.json", "experts/scripture/model/model.safetensors"] {
        assert!(objects.iter().any(|k| k.ends_with(o)), "{o} not in the bucket: {objects:?}");
    }
}

/// A training source in the bucket is read in place: JSONL streamed once (its bytes fetched
/// exactly once, nothing stored locally: no whole-file copy in the cache), parquet by byte
/// ranges; and a second job over the same sources finds its token cache by the objects' size
/// and ETag without fetching a byte.
#[test]
fn training_sources_in_the_bucket_are_streamed_not_downloaded() {
    let Some(s3) = S3Server::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = s3.dir("data");
    std::fs::create_dir_all(&data).unwrap();
    let jsonl = std::fs::read(common::sample("code", "train")).unwrap();
    std::fs::write(data.join("code.jsonl"), &jsonl).unwrap();
    let texts = btm_model::jsonl::read_texts(Path::new(&common::sample("scripture", "train")), None).unwrap();
    btm_trainer::sources::write_parquet(&data.join("scripture.parquet"), &texts, "text", 64).unwrap();
    let parquet_size = std::fs::metadata(data.join("scripture.parquet")).unwrap().len();
    let job = |name: &str| {
        let yaml = format!(
            "init: {{checkpoint: {}}}\nout: {out}\ndata:\n  train:\n    - {{path: s3://{BUCKET}/data/code.jsonl}}\n    - {{path: s3://{BUCKET}/data/scripture.parquet}}\n\
             steps: 2\nseq_len: 16\nbatch_size: 2\nthreads: 1\ntoken_cache: {cache}\n",
            common::repo().join("model/tests/fixtures/llama").display(),
            out = tmp.path().join(name).display(),
            cache = tmp.path().join("tokens").display(),
        );
        let file = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        ok(btm_s3(&s3, tmp.path()).arg("train").arg("--job").arg(&file).output().unwrap())
    };
    let first = job("first");
    let line = |source: &str| first.lines().find(|l| l.contains(&format!("tokenized s3://{BUCKET}/data/{source}"))).map(str::to_string);
    let fetched = |l: &str| -> u64 { l.split("; ").nth(1).and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok()).unwrap() };
    let streamed = line("code.jsonl").unwrap_or_else(|| panic!("no tokenizing line for code.jsonl:\n{first}"));
    assert_eq!(fetched(&streamed), jsonl.len() as u64, "{streamed}");
    let ranged = line("scripture.parquet").unwrap_or_else(|| panic!("no tokenizing line for scripture.parquet:\n{first}"));
    assert!(fetched(&ranged) > 0 && fetched(&ranged) <= parquet_size, "{ranged} (object of {parquet_size} bytes)");
    assert!(!tmp.path().join("cache/files").exists(), "a source was downloaded whole into the cache");
    let second = job("second");
    assert!(!second.contains("tokenized s3://"), "the second job tokenized again:\n{second}");
}

/// Two experts made by a command trainer that copies its input, merged and evaluated: a
/// pipeline of real jobs and real publishing with no training time, its run in the bucket
/// under `runs/NAME`.
fn copying_pipeline(dir: &Path, name: &str) -> std::path::PathBuf {
    let train = "steps: 2, batch_size: 4, seq_len: 32, trainer: {kind: command, command: \"cp -r {model_in}/. {model_out}/\"}";
    let engine = "{kind: local, slots: 2, threads_per_job: 1, retries: 0}";
    fixture_pipeline(dir, name, &format!("s3://{BUCKET}/runs"), engine, train, "")
}

/// Every file of the model published at `prefix` in the bucket, by name, after checking it
/// against its manifest.
fn published_model(s3: &S3Server, prefix: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let d = s3.dir(prefix);
    btm_model::Manifest::read(&d).unwrap().verify(&d).unwrap_or_else(|e| panic!("{prefix}: {e}"));
    std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// Two published models hold the same files, and the same weights, config and tokenizer bytes
/// (their `btm.json`, model card and manifest also record where this machine cached the
/// inputs, which differs between runs).
fn same_model(a: &std::collections::BTreeMap<String, Vec<u8>>, b: &std::collections::BTreeMap<String, Vec<u8>>, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: other files");
    for (name, bytes) in a.iter().filter(|(n, _)| !["btm.json", "README.md", "MANIFEST.json"].contains(&n.as_str())) {
        assert!(bytes == &b[name], "{what}: {name} differs");
    }
    assert!(a.contains_key("model.safetensors"), "{what}: {:?}", a.keys());
}

/// The same pipeline against a fault-free server and against one that fails a fifth of all
/// requests (503 SlowDown or 500 InternalError) and slows another fifth: object_store's
/// bounded retries carry the run through, to the same model bytes.
#[test]
fn a_store_failing_and_slowing_a_share_of_requests_is_retried_through() {
    let Some(clean) = S3Server::start() else { return };
    let faults = tempfile::tempdir().unwrap();
    let log = faults.path().join("faults.log");
    let flaky_args =
        ["--fail-rate", "0.2", "--delay-rate", "0.2", "--delay-ms", "30", "--fault-seed", "38", "--fault-log", log.to_str().unwrap()];
    let Some(flaky) = S3Server::start_with(&flaky_args) else { return };
    let run = |s3: &S3Server| {
        let tmp = tempfile::tempdir().unwrap();
        let file = copying_pipeline(tmp.path(), "flaky");
        let start = std::time::Instant::now();
        let out = ok(btm_s3(s3, tmp.path()).arg("run").arg(&file).arg("--quiet").output().unwrap());
        assert!(out.contains("| merged |"), "{out}");
        start.elapsed().as_secs_f64()
    };
    let clean_secs = run(&clean);
    let flaky_secs = run(&flaky);
    let lines = std::fs::read_to_string(&log).unwrap();
    let failed = lines.lines().filter(|l| l.starts_with("failed ")).count();
    let delayed = lines.lines().filter(|l| l.starts_with("delayed ")).count();
    eprintln!("fault-free {clean_secs:.1}s; with {failed} requests failed and {delayed} delayed {flaky_secs:.1}s");
    assert!(failed >= 10 && delayed >= 10, "too few faults to test anything: {failed} failed, {delayed} delayed");
    for model in ["runs/flaky/merged", "runs/flaky/experts/code/model"] {
        same_model(&published_model(&flaky, model), &published_model(&clean, model), model);
    }
    for eval in ["runs/flaky/eval/merged/code.json", "runs/flaky/eval/merged/scripture.json"] {
        let value =
            |s3: &S3Server| serde_json::from_slice::<serde_json::Value>(&std::fs::read(s3.dir(eval)).unwrap()).unwrap()["ppl"].clone();
        assert_eq!(value(&flaky), value(&clean), "{eval}");
    }
}

/// A store that fails every request: the run ends in an error naming the store, the S3 error
/// and the retries, in bounded time (the retry bounds cut to two here; by default ten and 60 s).
#[test]
fn a_store_failing_every_request_is_a_named_error_in_bounded_time() {
    let Some(s3) = S3Server::start_with(&["--fail-rate", "1"]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = copying_pipeline(tmp.path(), "down");
    let start = std::time::Instant::now();
    let out = btm_s3(&s3, tmp.path()).env("BTM_STORE_MAX_RETRIES", "2").arg("run").arg(&file).output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("run storage `s3://{BUCKET}/runs/down`")), "{err}");
    assert!(err.contains("after 2 retries") && (err.contains("SlowDown") || err.contains("InternalError")), "{err}");
    assert!(secs < 30.0, "a failing store took {secs:.0}s to report");
    let out = btm_s3(&s3, tmp.path()).env("BTM_STORE_MAX_RETRIES", "many").arg("run").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("BTM_STORE_MAX_RETRIES=`many`: not a whole number"), "{err}");
}

/// The store refuses the merged model's manifest, the last object of its publishing: the merge
/// job fails with its files in the bucket but no manifest, nothing takes that folder for a
/// model (the job is not done, `btm status` says so), and the re-run against a healthy store
/// redoes the merge, to the bytes of an undisturbed run.
#[test]
fn a_publish_cut_before_its_manifest_is_not_taken_for_complete() {
    let Some(clean) = S3Server::start() else { return };
    let Some(mut s3) = S3Server::start_with(&["--fail-rate", "1", "--fault-path", "/merged/MANIFEST.json"]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = copying_pipeline(tmp.path(), "cut");
    let out = btm_s3(&s3, tmp.path()).env("BTM_STORE_MAX_RETRIES", "2").arg("run").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("job merge failed"), "{err}");
    let merged = s3.objects("runs/cut/merged");
    assert!(merged.iter().any(|o| o.ends_with("/model.safetensors")), "the merge never got to publish: {merged:?}");
    assert!(!merged.iter().any(|o| o.ends_with("/MANIFEST.json")), "{merged:?}");
    assert!(!s3.dir("runs/cut/jobs/merge/done.json").exists());
    let url = format!("s3://{BUCKET}/runs/cut");
    let status = ok(btm_s3(&s3, tmp.path()).args(["status", &url]).output().unwrap());
    let line = status.lines().find(|l| l.starts_with("merge ")).unwrap_or_else(|| panic!("{status}"));
    assert!(!line.contains("done"), "{status}");

    // The same server, healthy, on the same root.
    s3.restart(&[]);
    let out = ok(btm_s3(&s3, tmp.path()).arg("run").arg(&file).output().unwrap());
    assert!(out.contains("| merged |"), "{out}");
    let reference = tempfile::tempdir().unwrap();
    ok(btm_s3(&clean, reference.path()).arg("run").arg(copying_pipeline(reference.path(), "cut")).arg("--quiet").output().unwrap());
    same_model(&published_model(&s3, "runs/cut/merged"), &published_model(&clean, "runs/cut/merged"), "the redone merge");
}
