//! Training behaviour: bad job specs fail early and say where; only the selected tensors
//! train; gradient accumulation equals a bigger batch; a seed trains from scratch; and on
//! real text (the shipped scripture sample) validation perplexity falls well below the start.

mod common;

use btm_model::Checkpoint;
use btm_trainer::{JobSpec, Options, Outcome};
use common::*;
use std::path::Path;

fn quiet() -> Options {
    Options { quiet: true, ..Default::default() }
}

fn spec_error(yaml: &str, base: &Path) -> String {
    match JobSpec::parse(yaml, base) {
        Err(e) => format!("{e:#}"),
        Ok(spec) => format!("{:#}", spec.validate().expect_err("the spec should be rejected")),
    }
}

#[test]
fn bad_specs_name_the_key_and_the_reason() {
    let (dir, train, valid) = data_dir();
    let cache = dir.path().join("cache");
    let out = dir.path().join("out");
    let good = job_yaml("llama", &train, &valid, &out, &cache, "steps: 3\n");
    JobSpec::parse(&good, dir.path()).unwrap().validate().unwrap();

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let cases: Vec<(String, &str)> = vec![
        (good.replace("lr: 0.003", "lr: -0.1"), "optimizer.lr: must be positive, got -0.1"),
        (good.replace("seq_len: 16", "seq_len: 4096"), "seq_len: 4096 is longer than the model's max_position_embeddings (512)"),
        (good.replace(&train.display().to_string(), "nowhere.jsonl"), "data.train[0].path:"),
        (good.replace(&valid.display().to_string(), &empty.display().to_string()), "data.valid[0]:"),
        (format!("{good}learning_rate: 0.1\n"), "unknown field `learning_rate`"),
        (good.replace("schedule: {", "schedule: {decay: linear, "), "schedule.decay: unknown variant `linear`"),
        (
            good.replace("steps: 3\n", "steps: 3\ntrainable: {include: ['*.mlp.gate.weight']}\n"),
            "trainable.include[0]: `*.mlp.gate.weight` matches no tensor",
        ),
        (good.replace("steps: 3\n", ""), "steps: missing"),
        (good.replace("steps: 3\n", "steps: 3\ndtype: float16\n"), "dtype: `float16`: training in float16 needs loss scaling"),
        (good.replace("steps: 3\n", "steps: 3\nmoe: {capacity_factor: -1}\n"), "moe.capacity_factor: must be a positive number, got -1"),
        (
            good.replace("steps: 3\n", "steps: 3\nmoe: {capacity_factor: 1.0, drop_policy: random}\n"),
            "moe.drop_policy: unknown variant `random`, expected `probs` or `position`",
        ),
    ];
    for (yaml, want) in cases {
        let err = spec_error(&yaml, dir.path());
        assert!(err.contains(want), "want `{want}` in: {err}");
    }
    let err = spec_error(&good.replace(&train.display().to_string(), "nowhere.jsonl"), dir.path());
    assert!(err.ends_with("nowhere.jsonl: file not found"), "{err}");
    let err = spec_error(&good.replace(&valid.display().to_string(), &empty.display().to_string()), dir.path());
    assert!(err.ends_with("file is empty"), "{err}");
    // Nothing was created: validation happens before any work.
    assert!(!out.exists() && !cache.exists());
}

#[test]
fn a_capacity_limit_drops_tokens_and_says_how_many() {
    let (dir, train, valid) = data_dir();
    let out = dir.path().join("out");
    let yaml = job_yaml(
        "mixtral",
        &train,
        &valid,
        &out,
        &dir.path().join("cache"),
        "steps: 2\nmoe: {capacity_factor: 0.5, drop_policy: position}\n",
    );
    let spec = JobSpec::parse(&yaml, dir.path()).unwrap();
    btm_trainer::run(&spec, quiet()).unwrap();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let line: serde_json::Value = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .find(|v: &serde_json::Value| v.get("dropped").is_some())
        .expect("a training line");
    let dropped: Vec<f64> = serde_json::from_value(line["dropped"].clone()).unwrap();
    assert_eq!(dropped.len(), 2, "one entry per MoE layer");
    assert!(dropped.iter().all(|&d| d >= 0.5), "capacity factor 0.5 keeps at most half: {dropped:?}");
}

/// A trained model keeps what its parent is made of (experts, the routers' calibration text,
/// the expert output scale), which `btm add-expert` reads later; not what produced the parent.
#[test]
fn training_an_moe_keeps_its_makeup_in_the_lineage() {
    let (dir, train, valid) = data_dir();
    let moe = dir.path().join("moe");
    std::fs::create_dir(&moe).unwrap();
    for f in std::fs::read_dir(fixtures().join("mixtral")).unwrap().flatten() {
        std::fs::copy(f.path(), moe.join(f.file_name())).unwrap();
    }
    let parent = serde_json::json!({
        "tool": "btm test", "kind": "merge", "parents": [],
        "calibration": [{"domain": "a", "file": "/data/a.jsonl"}], "expert_output_scale": 0.5,
        "experts": [{"index": 0, "domain": "a"}], "routing_accuracy": [0.9],
    });
    std::fs::write(moe.join("btm.json"), serde_json::to_vec(&parent).unwrap()).unwrap();
    let out = dir.path().join("out");
    let yaml = job_yaml("mixtral", &train, &valid, &out, &dir.path().join("cache"), "steps: 1\n")
        .replace(&fixtures().join("mixtral").display().to_string(), &moe.display().to_string());
    btm_trainer::run(&JobSpec::parse(&yaml, dir.path()).unwrap(), quiet()).unwrap();
    let l: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("model/btm.json")).unwrap()).unwrap();
    assert_eq!(l["calibration"], parent["calibration"], "{l}");
    assert_eq!((l["expert_output_scale"].as_f64(), &l["experts"]), (Some(0.5), &parent["experts"]));
    assert!(l.get("routing_accuracy").is_none() && l["kind"] == "expert", "{l}");
}

#[test]
fn only_selected_tensors_change() {
    let (dir, train, valid) = data_dir();
    let out = dir.path().join("out");
    let extra = "steps: 3\ntrainable: {include: ['*.mlp.gate.weight', '*.mlp.experts.2.*'], exclude: ['model.layers.1.*']}\n";
    let yaml = job_yaml("mixtral", &train, &valid, &out, &dir.path().join("cache"), extra);
    let spec = JobSpec::parse(&yaml, dir.path()).unwrap();
    let outcome = btm_trainer::run(&spec, quiet()).unwrap();
    let Outcome::Finished { model_dir, .. } = outcome else { panic!("{outcome:?}") };
    let before = Checkpoint::open(fixtures().join("mixtral")).unwrap();
    let after = Checkpoint::open(&model_dir).unwrap();
    let mut changed = Vec::new();
    for spec in before.tensor_specs() {
        let a = before.tensor(&spec.name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = after.tensor(&spec.name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if a != b {
            changed.push(spec.name);
        }
    }
    changed.sort();
    assert_eq!(
        changed,
        vec![
            "model.layers.0.mlp.experts.2.down_proj.weight",
            "model.layers.0.mlp.experts.2.gate_proj.weight",
            "model.layers.0.mlp.experts.2.up_proj.weight",
            "model.layers.0.mlp.gate.weight",
        ]
    );
    let lineage = after.lineage().unwrap().unwrap();
    assert_eq!((lineage.kind.as_str(), lineage.steps), ("expert", Some(3)));
    assert!(lineage.parents[0].uri.ends_with("mixtral"));
}

/// Mixed precision: bfloat16 forward and backward passes update float32 master weights. The
/// training losses stay within bfloat16's precision of the float32 run's (and are not the same
/// numbers), on a dense and an MoE model; the weights move and are written in float32.
#[test]
fn bfloat16_mixed_precision_tracks_float32() {
    let (dir, train, valid) = data_dir();
    let cache = dir.path().join("cache");
    for (model, tensor) in [("llama", "model.layers.1.self_attn.q_proj.weight"), ("mixtral", "model.layers.0.mlp.experts.1.up_proj.weight")]
    {
        let run = |dtype: &str| {
            let out = dir.path().join(format!("{model}-{dtype}"));
            let yaml = job_yaml(model, &train, &valid, &out, &cache, &format!("steps: 4\ndtype: {dtype}\n"));
            let spec = JobSpec::parse(&yaml, dir.path()).unwrap();
            btm_trainer::run(&spec, quiet()).unwrap();
            let t = Checkpoint::open(out.join("model")).unwrap().tensor(tensor).unwrap();
            assert_eq!(t.dtype(), candle_core::DType::F32, "master weights are written in float32");
            (t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), losses(&out))
        };
        let start =
            Checkpoint::open(fixtures().join(model)).unwrap().tensor(tensor).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ((_, l32), (w16, l16)) = (run("float32"), run("bfloat16"));
        assert_eq!(l32.len(), 4, "{model}: one loss per step");
        assert_eq!(l16.len(), 4);
        assert_ne!(l32, l16, "{model}: bfloat16 is a different computation");
        for (a, b) in l32.iter().zip(&l16) {
            assert!((a - b).abs() < 0.02 * a, "{model}: losses {l32:?} (float32) vs {l16:?} (bfloat16)");
        }
        let moved = w16.iter().zip(&start).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-3, "{model}: bfloat16 training moves the master weights ({moved})");
    }
}

/// Dense model: the MoE load-balancing loss is not linear in the batch, so there the two differ.
#[test]
fn gradient_accumulation_equals_a_bigger_batch() {
    let (dir, train, valid) = data_dir();
    let cache = dir.path().join("cache");
    let weights = |name: &str, extra: &str| {
        let yaml = job_yaml("llama", &train, &valid, &dir.path().join(name), &cache, "");
        let yaml = yaml.replace("batch_size: 2\n", "") + extra;
        let spec = JobSpec::parse(&yaml, dir.path()).unwrap();
        btm_trainer::run(&spec, quiet()).unwrap();
        let ckpt = Checkpoint::open(dir.path().join(name).join("model")).unwrap();
        ckpt.tensor("model.layers.1.self_attn.q_proj.weight").unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let big = weights("big", "steps: 2\nbatch_size: 4\ngrad_accum: 1\n");
    let accum = weights("accum", "steps: 2\nbatch_size: 2\ngrad_accum: 2\n");
    let smaller = weights("small", "steps: 2\nbatch_size: 2\ngrad_accum: 1\n");
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(max_diff(&big, &accum) < 1e-5, "accumulated vs big batch: {}", max_diff(&big, &accum));
    assert!(max_diff(&big, &smaller) > 1e-4, "a different batch does change the result");
}

#[test]
fn a_seed_trains_from_scratch() {
    let (dir, train, valid) = data_dir();
    let out = dir.path().join("out");
    let config = fixtures().join("llama/config.json");
    let tokenizer = fixtures().join("tokenizer.json");
    let yaml = job_yaml("llama", &train, &valid, &out, &dir.path().join("cache"), "steps: 2\ndomain: toy\n").replace(
        &format!("init: {{checkpoint: {}}}", fixtures().join("llama").display()),
        &format!("init: {{config: {}, tokenizer: {}}}", config.display(), tokenizer.display()),
    );
    let spec = JobSpec::parse(&yaml, dir.path()).unwrap();
    btm_trainer::run(&spec, quiet()).unwrap();
    let ckpt = Checkpoint::open(out.join("model")).unwrap();
    let lineage = ckpt.lineage().unwrap().unwrap();
    assert_eq!((lineage.kind.as_str(), lineage.domain.as_deref()), ("seed", Some("toy")));
    assert!(lineage.parents.is_empty());
    assert!(ckpt.dir().join("tokenizer.json").exists());
}

/// ~200 steps of a small Llama from scratch on the scripture sample shipped in `data/sample`.
#[test]
fn validation_perplexity_falls_on_real_text() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/sample/scripture");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let mut hf: serde_json::Value = serde_json::from_slice(&read(&fixtures().join("llama/config.json"))).unwrap();
    hf["hidden_size"] = 64.into();
    hf["intermediate_size"] = 172.into();
    hf["head_dim"] = 16.into();
    hf["num_attention_heads"] = 4.into();
    hf["num_key_value_heads"] = 4.into();
    std::fs::write(&config, serde_json::to_vec(&hf).unwrap()).unwrap();
    let out = dir.path().join("out");
    let yaml = format!(
        "init: {{config: {config}, tokenizer: {tok}}}\nout: {out}\n\
         data: {{train: [{{path: {train}}}], valid: [{valid}]}}\n\
         steps: 200\nbatch_size: 8\nseq_len: 64\nthreads: 2\nseed: 1\nlog_interval: 50\n\
         optimizer: {{lr: 0.01, weight_decay: 0.01}}\nschedule: {{warmup_steps: 10, min_lr: 0.001}}\n\
         eval: {{interval: 0, sequences: 64}}\ntoken_cache: {cache}\n",
        config = config.display(),
        tok = fixtures().join("tokenizer.json").display(),
        out = out.display(),
        train = corpus.join("train.jsonl").display(),
        valid = corpus.join("valid.jsonl").display(),
        cache = dir.path().join("cache").display(),
    );
    let spec = JobSpec::parse(&yaml, dir.path()).unwrap();
    spec.validate().unwrap();
    btm_trainer::run(&spec, quiet()).unwrap();
    let ppl: Vec<(u64, f64)> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("val_ppl")?.as_f64()?)))
        .collect();
    assert_eq!(ppl.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 200]);
    let (start, end) = (ppl[0].1, ppl[1].1);
    eprintln!("validation perplexity: {start:.1} at step 0, {end:.1} at step 200");
    assert!(start > 200.0, "a random model is near uniform over 320 tokens: {start}");
    assert!(end < start / 4.0, "perplexity should fall well below the start: {start} -> {end}");
}

#[test]
fn the_example_job_validates() {
    let job = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/train-tiny.yaml");
    let spec = JobSpec::load(&job).unwrap();
    assert_eq!(spec.total_steps(), 20);
    assert!(spec.init.checkpoint.as_deref().unwrap().ends_with("fixtures/llama"));
}

/// The same documents as JSONL (tokenized by btm: each document then EOS), as zstd-compressed
/// JSONL under another key, as parquet shards (the Hugging Face datasets layout, text in a named
/// column) and as a Megatron indexed dataset holding those ids (as `preprocess_data.py
/// --append-eod` writes them) train to the same losses and the same weights.
#[test]
fn every_source_format_trains_like_the_same_documents_in_jsonl() {
    let (dir, train, valid) = data_dir();
    let cache = dir.path().join("cache");
    let fixture = fixtures().join("llama");
    let config = btm_model::Checkpoint::open(&fixture).unwrap().config;
    let tok = btm_trainer::data::TokenizerInfo::load(&fixture.join("tokenizer.json"), config.eos_token_id).unwrap();
    let docs: Vec<Vec<u32>> = btm_model::jsonl::read_texts(&train, None)
        .unwrap()
        .iter()
        .map(|t| {
            let mut ids = tok.tokenizer.encode(t.as_str(), true).unwrap().get_ids().to_vec();
            ids.push(tok.eos);
            ids
        })
        .collect();
    let prefix = dir.path().join("train_text_document");
    btm_trainer::indexed::write(&prefix, &docs).unwrap();
    let run = |name: &str, source: &Path| {
        let yaml = job_yaml("llama", source, &valid, &dir.path().join(name), &cache, "steps: 10\nseed: 4\n");
        btm_trainer::run(&JobSpec::parse(&yaml, dir.path()).unwrap(), quiet()).unwrap();
        (losses(&dir.path().join(name)), read(&dir.path().join(name).join("model/model.safetensors")))
    };
    let texts = btm_model::jsonl::read_texts(&train, None).unwrap();
    let zst = dir.path().join("train.jsonl.zst");
    let lines: String = texts.iter().map(|t| serde_json::json!({ "body": t }).to_string() + "\n").collect();
    std::fs::write(&zst, zstd::encode_all(lines.as_bytes(), 3).unwrap()).unwrap();
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    let half = texts.len() / 2;
    btm_trainer::sources::write_parquet(&shards.join("train-00000-of-00002.parquet"), &texts[..half], "content", 7).unwrap();
    btm_trainer::sources::write_parquet(&shards.join("train-00001-of-00002.parquet"), &texts[half..], "content", 7).unwrap();
    let run_keyed = |name: &str, source: &Path, key: &str| {
        let yaml = job_yaml("llama", source, &valid, &dir.path().join(name), &cache, "steps: 10\nseed: 4\n").replacen(
            "}]\n  valid",
            &format!(", text_key: {key}}}]\n  valid"),
            1,
        );
        assert!(yaml.contains("text_key"), "{yaml}");
        btm_trainer::run(&JobSpec::parse(&yaml, dir.path()).unwrap(), quiet()).unwrap();
        (losses(&dir.path().join(name)), read(&dir.path().join(name).join("model/model.safetensors")))
    };
    let (jsonl_losses, jsonl_weights) = run("jsonl", &train);
    assert_eq!(jsonl_losses.len(), 10);
    for (name, (l, w)) in [
        ("indexed", run("indexed", &prefix.with_extension("idx"))),
        ("zstd", run_keyed("zstd", &zst, "body")),
        ("parquet", run_keyed("parquet", &shards, "content")),
    ] {
        assert_eq!(jsonl_losses, l, "{name}");
        assert!(jsonl_weights == w, "the JSONL and {name} runs' weights differ");
    }
    // Ids beyond the model's vocabulary are refused before training, naming the file.
    let bad = dir.path().join("bad");
    btm_trainer::indexed::write(&bad, &[vec![1, 2, config.vocab_size as u32 + 5]]).unwrap();
    let yaml = job_yaml("llama", &bad.with_extension("idx"), &valid, &dir.path().join("bad-run"), &cache, "steps: 1\n");
    let err = format!("{:#}", btm_trainer::run(&JobSpec::parse(&yaml, dir.path()).unwrap(), quiet()).unwrap_err());
    assert!(err.contains("bad.bin") && err.contains("beyond the model's vocabulary"), "{err}");
}

/// Training an added expert in place with the router guard: on the tokens of the `guarded`
/// source (the old domains' replay) the new expert (3) leaves the top-2, while without the
/// guard's push (`coef: 0`, the same run otherwise) it keeps them.
#[test]
fn the_router_guard_keeps_guarded_tokens_out_of_the_new_expert() {
    let (dir, train, valid) = data_dir();
    let old = dir.path().join("old.jsonl");
    write_docs(&old, 120, 11);
    let leak = |coef: f64| -> Vec<f64> {
        let out = dir.path().join(format!("out-{coef}"));
        let extra = format!(
            "steps: 30\nmoe: {{aux_loss_coef: 0.0, router_guard: {{experts: [3], coef: {coef}}}}}\n\
             trainable: {{include: ['*.mlp.experts.3.*', '*.mlp.gate.weight[3]']}}\n"
        );
        let yaml = job_yaml("mixtral", &train, &valid, &out, &dir.path().join("cache"), &extra)
            .replace("batch_size: 2", "batch_size: 8")
            .replace("lr: 0.003", "lr: 0.05")
            .replace(
                &format!("train: [{{path: {}}}]", train.display()),
                &format!("train: [{{path: {}}}, {{path: {}, guarded: true}}]", train.display(), old.display()),
            );
        let spec = JobSpec::parse(&yaml, dir.path()).unwrap();
        assert!(spec.data.train[1].guarded);
        btm_trainer::run(&spec, quiet()).unwrap();
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap().get("guard_leak").and_then(|x| x.as_f64()))
            .collect()
    };
    let (pushed, free) = (leak(10.0), leak(0.0));
    // Steps that drew no guarded sequence have no figure.
    assert!(pushed.len() > 25 && free.len() > 25, "{pushed:?} {free:?}");
    let last = |v: &[f64]| v[v.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(free[0] > 0.2 && last(&free) > 0.2, "without the push the row keeps its guarded tokens: {free:?}");
    // A bias-free row cannot clear every token of this fixture (as at a real MoE's first layer):
    // the guard leaves a fraction of what the unguarded row keeps.
    assert!(last(&pushed) < 0.5 * last(&free), "the guard moves guarded tokens out of the new expert: {pushed:?} against {free:?}");
}
