//! Mirroring to an object store (a `file://` URL through `object_store`, as s3:// would go):
//! checkpoints, metrics and the model arrive with their manifests, pruning reaches the store,
//! and a run whose local working directory is lost resumes from the store exactly.

mod common;

use btm_model::manifest::Manifest;
use btm_trainer::signals::StopFlag;
use btm_trainer::{JobSpec, Options, Outcome};
use common::*;
use std::path::Path;

fn job(dir: &Path, name: &str, train: &Path, valid: &Path) -> JobSpec {
    let remote = dir.join(format!("{name}-store"));
    std::fs::create_dir_all(&remote).unwrap();
    let url = url::Url::from_directory_path(&remote).unwrap();
    let yaml =
        job_yaml("mixtral", train, valid, Path::new("placeholder"), &dir.join("cache"), "steps: 8\ncheckpoint: {interval: 2, keep: 2}\n")
            .replace("out: placeholder", &format!("out: {url}\nwork_dir: {}", dir.join(format!("{name}-work")).display()));
    JobSpec::parse(&yaml, dir).unwrap()
}

#[test]
fn runs_mirror_to_the_store_and_resume_from_it() {
    let (dir, train, valid) = data_dir();
    let d = dir.path();

    // A: straight through.
    let a = job(d, "a", &train, &valid);
    a.validate().unwrap();
    let quiet = || Options { quiet: true, ..Default::default() };
    assert!(matches!(btm_trainer::run(&a, quiet()).unwrap(), Outcome::Finished { step: 8, .. }));
    let store = d.join("a-store");
    // Objects, not directories: a local store may leave empty directories behind.
    let mut listed: Vec<String> = std::fs::read_dir(store.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::read_dir(p).unwrap().next().is_some())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, vec!["step-00000006", "step-00000008"], "pruning reaches the store");
    for artefact in ["checkpoints/step-00000008", "model"] {
        let p = store.join(artefact);
        Manifest::read(&p).unwrap().verify(&p).unwrap();
    }
    let metrics = std::fs::read_to_string(store.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("{\"step\":8,")), "{metrics}");

    // B: stopped after step 4, its working directory lost, then resumed from the store.
    let b = job(d, "b", &train, &valid);
    let stop = StopFlag::new();
    let flag = stop.clone();
    let options = Options {
        stop,
        quiet: true,
        on_checkpoint: Some(Box::new(move |step, _| {
            if step == 4 {
                flag.request(15);
            }
        })),
    };
    let outcome = btm_trainer::run(&b, options).unwrap();
    assert!(matches!(outcome, Outcome::Interrupted { step: 4, signal: 15, .. }), "{outcome:?}");
    std::fs::remove_dir_all(d.join("b-work")).unwrap();
    let checkpoints = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = checkpoints.clone();
    let options =
        Options { quiet: true, on_checkpoint: Some(Box::new(move |step, _| seen.lock().unwrap().push(step))), ..Default::default() };
    assert!(matches!(btm_trainer::run(&b, options).unwrap(), Outcome::Finished { step: 8, .. }));
    assert_eq!(*checkpoints.lock().unwrap(), vec![6, 8], "continued after step 4, not from scratch");
    // The history came back from the store: the same losses, step for step, as run A.
    let losses = |text: &str| -> Vec<(u64, String)> {
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("loss").is_some())
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].to_string()))
            .collect()
    };
    let metrics_b = std::fs::read_to_string(d.join("b-store/metrics.jsonl")).unwrap();
    assert_eq!(losses(&metrics_b), losses(&metrics));
    assert_eq!(losses(&metrics).len(), 8);
    assert!(
        read(&store.join("model/model.safetensors")) == read(&d.join("b-store/model/model.safetensors")),
        "resumed from the store: bit-identical to the uninterrupted run"
    );
}
