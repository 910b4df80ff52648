//! BTM's ensemble (`btm eval --ensemble`) and parameter average (`btm average`) through the
//! binary, on the llama fixture and an expert trained from it on the code sample.

mod common;

use common::{btm, fixture_pipeline, ok, repo, sample, trained_expert as expert};

fn eval(args: &[&str]) -> serde_json::Value {
    let out = ok(btm().arg("eval").args(args).args(["--seq-len", "32", "--max-docs", "3", "--json"]).output().unwrap());
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn nll(v: &serde_json::Value) -> f64 {
    v["nll"].as_f64().unwrap()
}

#[test]
fn the_ensemble_mixes_by_the_domain_posterior_and_the_average_is_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    let base = repo().join("model/tests/fixtures/llama").display().to_string();
    let code = expert(tmp.path(), "code").display().to_string();
    let test = sample("code", "test");
    let valid = sample("code", "valid");

    // One member is that member.
    let alone = eval(&["--model", &code, "--data", &test]);
    let one = eval(&["--ensemble", &code, "--data", &test]);
    assert!((nll(&one) - nll(&alone)).abs() <= 1e-6 * nll(&alone), "{one} vs {alone}");
    assert_eq!(one["tokens"], alone["tokens"]);

    // Bayesian model averaging within each window: with a uniform prior over two members, a
    // window's mixture likelihood is ½ p_a + ½ p_b, so its NLL lies between the better
    // member's and the better member's + ln 2. Over the whole set (W windows of ≤ 32 tokens,
    // 31 predicted each when full): below the better member's total + W ln 2.
    let base_alone = eval(&["--model", &base, "--data", &test]);
    let both = eval(&["--ensemble", &base, &code, "--data", &test]);
    let best = nll(&alone).min(nll(&base_alone));
    let windows_at_most = both["tokens"].as_f64().unwrap() / 1.0;
    assert!(nll(&both) <= best + windows_at_most * std::f64::consts::LN_2, "{both}");
    // The code expert is far better on code than the untrained fixture: the posterior moves to
    // it within each window, so the ensemble lands near it, not near the average of the two.
    let mean = (nll(&alone) + nll(&base_alone)) / 2.0;
    assert!(nll(&both) < mean && nll(&both) < nll(&base_alone), "{both}: code {alone}, base {base_alone}");
    assert_eq!(both["weights"], serde_json::json!([0.5, 0.5]));

    // A prior from the code domain's held-out text favours the code expert; top-1 mixing works.
    let fitted = eval(&["--ensemble", &base, &code, "--prior-from", &valid, "--top-k", "1", "--data", &test]);
    let w: Vec<f64> = fitted["weights"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9 && w[1] > w[0], "{fitted}");
    assert_eq!(fitted["top_k"], 1);

    // A batch (a run's one eval job per model over its domains) loads the members once and
    // scores each domain exactly as the single evaluation does, each with its own prior.
    let (on_test, on_valid) = (tmp.path().join("on-test.json"), tmp.path().join("on-valid.json"));
    let batch = serde_json::json!({
        "base": {"ensemble": [&base, &code], "top_k": 1, "data": "unused", "seq_len": 32, "max_docs": 3},
        "domains": [
            {"data": &test, "out": &on_test, "prior_from": &valid},
            {"data": &valid, "out": &on_valid},
        ],
    });
    let spec = tmp.path().join("eval-batch.json");
    std::fs::write(&spec, batch.to_string()).unwrap();
    ok(btm().args(["eval", "--spec"]).arg(&spec).output().unwrap());
    let read = |p: &std::path::Path| serde_json::from_slice::<serde_json::Value>(&std::fs::read(p).unwrap()).unwrap();
    assert_eq!(read(&on_test), fitted);
    let uniform = eval(&["--ensemble", &base, &code, "--top-k", "1", "--data", &valid]);
    assert_eq!(read(&on_valid), uniform);

    // The average with weights (1, 0) is the first model; with the fitted prior it is a model
    // that evaluates.
    let avg = tmp.path().join("avg");
    ok(btm().args(["average", "--experts", &code, &base, "--weights", "1", "0", "--out"]).arg(&avg).output().unwrap());
    let again = eval(&["--model", &avg.to_string_lossy(), "--data", &test]);
    assert!((nll(&again) - nll(&alone)).abs() <= 1e-6 * nll(&alone), "{again} vs {alone}");
    assert!(
        avg.join("MANIFEST.json").is_file() && std::fs::read_to_string(avg.join("btm.json")).unwrap().contains("\"kind\": \"average\"")
    );
    let fitted_avg = tmp.path().join("avg-fitted");
    let out = ok(btm().args(["average", "--experts", &base, &code, "--weights-from", &valid, "--out"]).arg(&fitted_avg).output().unwrap());
    assert!(out.contains("\"weights\""), "{out}");
    eval(&["--model", &fitted_avg.to_string_lossy(), "--data", &test]);

    // Members of another shape or tokenizer are named errors, and nothing is written.
    let mixtral = repo().join("model/tests/fixtures/mixtral").display().to_string();
    let bad = tmp.path().join("bad");
    let out = btm().args(["average", "--experts", &base, &mixtral, "--weights", "1", "1", "--out"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("does not have model 0's architecture and shapes"), "{err}");
    assert!(!bad.exists());
    let out = btm().args(["eval", "--ensemble", &base, &code, "--top-k", "3", "--data", &test]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--top-k 3: must be between 1 and the 2 members"));
}

/// `eval: {ensemble: true}` scores the run's experts as BTM's ensemble, all and top-1, with
/// the experts' training cost, in the table and the Arms comparison.
#[test]
fn a_pipeline_scores_its_experts_as_an_ensemble() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = "{kind: local, slots: 2, threads_per_job: 1}";
    let add = format!("add_experts:\n  domains:\n{}", common::domain("computing").replace("  - ", "    - "));
    let storage = tmp.path().join("runs").display().to_string();
    let file = fixture_pipeline(tmp.path(), "ens", &storage, engine, "steps: 6, batch_size: 4, seq_len: 32", &add);
    let yaml =
        std::fs::read_to_string(&file).unwrap().replace("max_docs: 1}", "max_docs: 1, baseline: true, ensemble: true, averaged: true}");
    std::fs::write(&file, yaml).unwrap();
    let out = ok(btm().arg("run").arg(&file).arg("--quiet").output().unwrap());
    let row = |label: &str| {
        out.lines().find(|l| l.starts_with(&format!("| {label} |"))).unwrap_or_else(|| panic!("no {label} row:\n{out}")).to_string()
    };
    let (ens, top1, expert) = (row("ensemble"), row("ensemble-top1"), row("expert-code"));
    // Its training tokens are the two experts' together.
    let tokens = |r: &str| r.split('|').map(str::trim).filter(|c| !c.is_empty()).nth_back(1).unwrap().parse::<u64>().unwrap();
    assert_eq!(tokens(&ens), 2 * tokens(&expert), "{ens} / {expert}");
    assert_eq!(tokens(&top1), tokens(&ens));
    // With add_experts, the extended ensemble adds the new domain's expert and is scored on
    // the new domain too.
    let extended = row("ensemble-extended");
    assert_eq!(tokens(&extended), 3 * tokens(&expert), "{extended}");
    let header = out.lines().find(|l| l.starts_with("| model |")).unwrap();
    let col = header.split('|').map(str::trim).position(|c| c == "computing").expect("a computing column");
    assert!(extended.split('|').map(str::trim).nth(col).unwrap().parse::<f64>().is_ok(), "{header}\n{extended}");
    // The parameter average, one model per domain, costs what the experts cost.
    let averaged = row("averaged");
    assert_eq!(tokens(&averaged), tokens(&ens), "{averaged}");
    for d in ["scripture", "code"] {
        assert!(tmp.path().join(format!("runs/ens/averaged/{d}/MANIFEST.json")).exists(), "{d}");
    }
    let report = std::fs::read_to_string(tmp.path().join("runs/ens/report.md")).unwrap();
    assert!(report.contains("| ensemble (all experts, posterior-weighted) |") && report.contains("| ensemble top-1 |"), "{report}");
    assert!(report.contains("| averaged (each domain's posterior-weighted parameter average) | averaged: "), "{report}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("runs/ens/eval/ensemble/code.json")).unwrap()).unwrap();
    assert_eq!(json["members"].as_array().unwrap().len(), 2, "{json}");
}
