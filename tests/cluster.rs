//! `btm cluster` end to end: documents of four clearly different made-up sources, shuffled
//! into one unlabelled file, come back as four clusters of purity ≥ 0.9; `btm cluster assign`
//! reproduces the assignments; bad input is a named error; `btm eval --ensemble --clusters`
//! weighs experts by their clusters (c-BTM's ensemble).

mod common;

use common::{btm, ok, repo, sample, trained_expert};
use std::path::Path;

/// Words of each source: scripture-like, Python-like, dictionary-like and computing-like text.
const SOURCES: [&[&str]; 4] = [
    &["lord", "god", "israel", "thee", "thou", "hath", "unto", "king", "spake", "saith", "begat", "jerusalem", "altar", "prophet"],
    &["def", "return", "self", "import", "lambda", "none", "raise", "elif", "kwargs", "isinstance", "yield", "assert", "args", "dict"],
    &["noun", "verb", "adjective", "plural", "obsolete", "etymology", "synonym", "archaic", "pronunciation", "adverb", "webster", "usage"],
    &["kernel", "compiler", "protocol", "unix", "packet", "bytes", "hacker", "jargon", "ethernet", "bsd", "assembler", "firmware"],
];
/// Words every source uses.
const COMMON: &[&str] = &["time", "people", "make", "good", "new", "used", "way", "day", "long", "great", "small", "work"];

/// A tiny generator, so the documents are the same on every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// 120 documents per source, each of 20–80 words, about a third of them common words;
/// shuffled. Returns (text, source) pairs.
fn documents() -> Vec<(String, usize)> {
    let mut rng = Lcg(42);
    let mut docs = vec![];
    for (s, words) in SOURCES.iter().enumerate() {
        for _ in 0..120 {
            let len = 20 + rng.below(61);
            let text: Vec<&str> =
                (0..len).map(|_| if rng.below(3) == 0 { COMMON[rng.below(COMMON.len())] } else { words[rng.below(words.len())] }).collect();
            docs.push((text.join(" "), s));
        }
    }
    for i in (1..docs.len()).rev() {
        docs.swap(i, rng.below(i + 1));
    }
    docs
}

fn write_jsonl(path: &Path, docs: &[(String, usize)]) {
    let lines: String = docs.iter().enumerate().map(|(i, (t, _))| format!("{}\n", serde_json::json!({"id": i, "text": t}))).collect();
    std::fs::write(path, lines).unwrap();
}

fn clusters(path: &Path) -> Vec<usize> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["cluster"].as_u64().unwrap() as usize).collect()
}

/// Σ over clusters of its most common source's documents, over all documents.
fn purity(assigned: &[usize], sources: &[usize], k: usize) -> f64 {
    let mut counts = vec![[0usize; 4]; k];
    for (&c, &s) in assigned.iter().zip(sources) {
        counts[c][s] += 1;
    }
    counts.iter().map(|c| *c.iter().max().unwrap()).sum::<usize>() as f64 / assigned.len() as f64
}

#[test]
fn four_sources_shuffled_together_come_back_as_four_pure_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let docs = documents();
    let data = dir.path().join("mixed.jsonl");
    write_jsonl(&data, &docs);
    let out = dir.path().join("clusters");
    let printed = ok(btm().args(["cluster", "--data"]).arg(&data).args(["--k", "4", "--seed", "1", "--out"]).arg(&out).output().unwrap());
    assert!(printed.contains("top terms") && printed.contains("clustered 480 documents"), "{printed}");

    let assigned = clusters(&out.join("assignments.jsonl"));
    assert_eq!(assigned.len(), docs.len());
    let sources: Vec<usize> = docs.iter().map(|d| d.1).collect();
    let p = purity(&assigned, &sources, 4);
    eprintln!("purity {p:.4}");
    assert!(p >= 0.9, "purity {p}");
    // Every document is in exactly one split of its cluster.
    let mut in_splits = 0;
    for i in 0..4 {
        for split in ["train", "valid", "test"] {
            in_splits += std::fs::read_to_string(out.join(format!("cluster-{i}/{split}.jsonl"))).unwrap().lines().count();
        }
    }
    assert_eq!(in_splits, docs.len());
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["clusters"].as_array().unwrap().len(), 4);

    // The saved clusterer places the same documents in the same clusters.
    let again = dir.path().join("again.jsonl");
    ok(btm().args(["cluster", "assign", "--clusters"]).arg(&out).arg("--data").arg(&data).arg("--out").arg(&again).output().unwrap());
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(out.join("assignments.jsonl")).unwrap());
    let weighted = ok(btm()
        .args(["cluster", "assign", "--weights", "--top-k", "2", "--clusters"])
        .arg(&out)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap());
    let first: serde_json::Value = serde_json::from_str(weighted.lines().next().unwrap()).unwrap();
    let w: Vec<f64> = first["weights"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(w.len(), 4);
    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-5 && w.iter().filter(|&&x| x > 0.0).count() <= 2, "{w:?}");
}

#[test]
fn bad_input_is_a_named_error_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("few.jsonl");
    write_jsonl(&data, &documents()[..3]);
    let out = dir.path().join("clusters");
    let run = |args: &[&str]| {
        let o = btm().arg("cluster").arg("--data").arg(&data).arg("--out").arg(&out).args(args).output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = run(&["--k", "4"]);
    assert!(err.contains("4 clusters asked for but only 3 documents"), "{err}");
    let err = run(&["--k", "2", "--text-key", "body"]);
    assert!(err.contains("no text under `body`") && err.contains("few.jsonl:1: no `body` field"), "{err}");
    assert!(!out.exists());
}

fn eval(args: &[&str]) -> serde_json::Value {
    let out = ok(btm().arg("eval").args(args).args(["--seq-len", "32", "--max-docs", "3", "--json"]).output().unwrap());
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn nll(v: &serde_json::Value) -> f64 {
    v["nll"].as_f64().unwrap()
}

/// c-BTM's ensemble: each token weighted by the clusters of its context. With one cluster the
/// ensemble of one member is that member; with clusters of the scripture and code samples, the
/// code expert as the code cluster's member carries the code test text, far better than the
/// untrained fixture alone or the two mixed evenly.
#[test]
fn eval_weighs_the_ensemble_by_the_context_clusters() {
    let tmp = tempfile::tempdir().unwrap();
    let base = repo().join("model/tests/fixtures/llama").display().to_string();
    let code = trained_expert(tmp.path(), "code").display().to_string();
    let test = sample("code", "test");
    let clusters = |k: &str| {
        let out = tmp.path().join(format!("clusters-{k}"));
        let (scripture, code) = (sample("scripture", "train"), sample("code", "train"));
        ok(btm().args(["cluster", "--data", &scripture, &code, "--k", k, "--min-df", "1", "--out"]).arg(&out).output().unwrap());
        out.display().to_string()
    };

    let one = clusters("1");
    let alone = eval(&["--model", &code, "--data", &test]);
    let ensemble = eval(&["--ensemble", &code, "--clusters", &one, "--data", &test]);
    assert!((nll(&ensemble) - nll(&alone)).abs() <= 1e-6 * nll(&alone), "{ensemble} vs {alone}");
    assert_eq!(ensemble["tokens"], alone["tokens"]);

    let two = clusters("2");
    let placed = ok(btm().args(["cluster", "assign", "--clusters", &two, "--data", &test]).output().unwrap());
    let votes = placed.lines().filter(|l| l.contains("\"cluster\":1")).count();
    let code_cluster = usize::from(2 * votes > placed.lines().count());
    let mut members = [base.as_str(); 2];
    members[code_cluster] = &code;
    let mixed = eval(&["--ensemble", members[0], members[1], "--clusters", &two, "--data", &test]);
    let base_alone = eval(&["--model", &base, "--data", &test]);
    assert!(nll(&mixed) < (nll(&alone) + nll(&base_alone)) / 2.0, "{mixed}: code {alone}, base {base_alone}");
    let w: Vec<f64> = mixed["weights"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert!(w[code_cluster] > 0.8, "{mixed}");
    let top1 = eval(&["--ensemble", members[0], members[1], "--clusters", &two, "--top-k", "1", "--temperature", "0.05", "--data", &test]);
    assert!(nll(&top1) < (nll(&alone) + nll(&base_alone)) / 2.0 && top1["top_k"] == 1, "{top1}");

    let out = btm().args(["eval", "--ensemble", &code, "--clusters", &two, "--data", &test]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("2 clusters but 1 ensemble members"), "{err}");
}
