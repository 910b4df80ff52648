//! Parity with `transformers`, checkpoint round trips, and named errors for bad input.
//!
//! The fixtures in `tests/fixtures/` come from `scripts/make_fixtures.py`: tiny random
//! checkpoints of every architecture btm reads, with the logits and perplexity `transformers`
//! computes for them in float32.

use btm_model::checkpoint::{rewrite, write_checkpoint, Extras, WriteOptions};
use btm_model::eval::perplexity;
use btm_model::{Checkpoint, Error, Transformer};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

const MODELS: [&str; 14] = [
    "llama",
    "llama_legacy",
    "mistral",
    "qwen2",
    "mixtral",
    "mixtral_fused",
    "qwen2_moe",
    "qwen2_moe_normtopk",
    "qwen3",
    "qwen3_moe",
    "qwen3_moe_softmax",
    "olmo2",
    "olmoe",
    "flex_olmo",
];

fn expected_eval(dir: &Path) -> (u64, f64) {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    (v["eval"]["tokens"].as_u64().unwrap(), v["eval"]["ppl"].as_f64().unwrap())
}

fn eval_texts() -> Vec<String> {
    btm_model::jsonl::read_texts(&fixtures().join("eval.jsonl"), None).unwrap()
}

fn max_logit_diff(model: &Transformer, dir: &Path) -> f32 {
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids).unwrap();
    (logits - &expected["logits"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn ppl(ckpt: &Checkpoint) -> btm_model::eval::Perplexity {
    let model = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
    perplexity(&model, &ckpt.tokenizer().unwrap(), &eval_texts(), 16, &Device::Cpu).unwrap()
}

#[test]
fn logits_and_perplexity_match_transformers() {
    for name in MODELS {
        let dir = fixtures().join(name);
        let ckpt = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let model = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
        let diff = max_logit_diff(&model, &dir);
        assert!(diff <= 1e-4, "{name}: max |Δlogit| = {diff}");
        let (tokens, want) = expected_eval(&dir);
        let got = ppl(&ckpt);
        assert_eq!(got.tokens, tokens, "{name}");
        let rel = (got.ppl - want).abs() / want;
        assert!(rel <= 1e-5, "{name}: ppl {} vs transformers {want} (rel {rel:e})", got.ppl);
    }
}

#[test]
fn architectures_are_understood() {
    use btm_model::{Architecture, Routing};
    let open = |n: &str| Checkpoint::open(fixtures().join(n)).unwrap();
    let llama = open("llama");
    assert_eq!(llama.architecture, Architecture::Llama);
    assert!(llama.config.rope_scaling.is_some());
    let legacy = open("llama_legacy");
    assert_eq!((legacy.config.rope_theta, legacy.config.head_dim), (500000.0, 16));
    assert!(legacy.config.tie_word_embeddings);
    assert_eq!(open("mistral").config.sliding_window, Some(8));
    let qwen2 = open("qwen2").config;
    assert!(qwen2.qkv_bias && !qwen2.o_bias);
    let mixtral = open("mixtral_fused").config.moe.unwrap();
    assert_eq!((mixtral.experts, mixtral.top_k, mixtral.routing), (4, 2, Routing::TopkThenSoftmax));
    let qwen = open("qwen2_moe").config.moe.unwrap();
    assert_eq!(qwen.routing, Routing::SoftmaxThenTopk);
    assert_eq!(qwen.shared_expert.unwrap().ffn, 40);
    assert_eq!(open("qwen2_moe_normtopk").config.moe.unwrap().routing, Routing::TopkThenSoftmax);
    let qwen3 = open("qwen3");
    assert_eq!(qwen3.architecture, Architecture::Qwen3);
    // head_dim 16 while hidden / heads is 8: q/k/v/o and the q/k norms are shaped by head_dim.
    assert_eq!((qwen3.config.head_dim, qwen3.config.hidden_size / qwen3.config.num_heads), (16, 8));
    assert!(qwen3.config.qk_norm && !qwen3.config.qkv_bias && !qwen3.config.o_bias && qwen3.config.tie_word_embeddings);
    assert_eq!(qwen3.tensor("model.layers.1.self_attn.k_norm.weight").unwrap().dims(), [16]);
    let qwen3_moe = open("qwen3_moe");
    assert_eq!(qwen3_moe.architecture, Architecture::Qwen3Moe);
    assert!(qwen3_moe.config.qk_norm);
    let m = qwen3_moe.config.moe.clone().unwrap();
    assert_eq!((m.experts, m.top_k, m.expert_ffn, m.routing), (4, 2, 24, Routing::TopkThenSoftmax));
    assert!(m.shared_expert.is_none());
    assert_eq!(m.dense_layers, [1]);
    assert_eq!(qwen3_moe.tensor("model.layers.1.mlp.gate_proj.weight").unwrap().dims(), [64, 32]);
    assert_eq!(open("qwen3_moe_softmax").config.moe.unwrap().routing, Routing::SoftmaxThenTopk);
}

/// The q/k norms through the primitive chains (what CUDA in other dtypes and the reference
/// path run) match transformers too, not only through the fused CPU kernels.
#[test]
fn qwen3_primitive_chains_match_transformers() {
    for name in ["qwen3", "qwen3_moe", "qwen3_moe_softmax"] {
        let dir = fixtures().join(name);
        let mut model = Checkpoint::open(&dir).unwrap().load_model(DType::F32, &Device::Cpu).unwrap();
        model.set_fused_kernels(false);
        model.set_fused_moe(false);
        let diff = max_logit_diff(&model, &dir);
        assert!(diff <= 1e-4, "{name}: max |Δlogit| = {diff} through the primitive chains");
    }
}

/// What btm writes for a Qwen3 family model is that family's config.json, with the q/k norms
/// under transformers' names, and no sliding window or shared expert it cannot hold.
#[test]
fn qwen3_is_written_as_qwen3() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, class) in [("qwen3", "Qwen3ForCausalLM"), ("qwen3_moe", "Qwen3MoeForCausalLM")] {
        let src = Checkpoint::open(fixtures().join(name)).unwrap();
        let out = tmp.path().join(name);
        rewrite(&src, &out, &WriteOptions::default(), None).unwrap();
        let hf: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(hf["architectures"][0], class);
        assert_eq!(hf["head_dim"], 16);
        assert_eq!(hf["attention_bias"], false);
        let st = out.join("model.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        let names: Vec<String> =
            btm_model::checkpoint::parse_safetensors(&st, &bytes).unwrap().names().into_iter().map(String::from).collect();
        assert!(names.iter().any(|n| n == "model.layers.0.self_attn.q_norm.weight"), "{names:?}");
        if name == "qwen3_moe" {
            assert_eq!((hf["norm_topk_prob"].as_bool(), hf["mlp_only_layers"].clone()), (Some(true), serde_json::json!([1])));
            assert!(hf.get("shared_expert_intermediate_size").is_none());
        }
    }
    let mut cfg = Checkpoint::open(fixtures().join("qwen3")).unwrap().config;
    cfg.sliding_window = Some(8);
    assert_eq!(cfg.to_hf().unwrap_err().to_string(), "unsupported: sliding-window attention in a Qwen3 model");
}

/// The OLMo families: OLMo2's post-norms and full-width q/k norms, OLMoE's pre-norm MoE with
/// clip_qkv, FlexOlmo's post-norm MoE.
#[test]
fn olmo_architectures_are_understood() {
    use btm_model::{Architecture, Routing};
    let open = |name: &str| Checkpoint::open(fixtures().join(name)).unwrap();
    let olmo2 = open("olmo2");
    assert_eq!(olmo2.architecture, Architecture::Olmo2);
    let c = &olmo2.config;
    assert!(c.qk_norm && c.qk_norm_full && c.post_norms && c.clip_qkv.is_none() && c.moe.is_none());
    // The norms span all heads: 4 query heads and 2 key heads of 8.
    assert_eq!(olmo2.tensor("model.layers.1.self_attn.q_norm.weight").unwrap().dims(), [32]);
    assert_eq!(olmo2.tensor("model.layers.1.self_attn.k_norm.weight").unwrap().dims(), [16]);
    assert!(olmo2.tensor_specs().iter().all(|s| !s.name.contains("input_layernorm")));
    let olmoe = open("olmoe");
    assert_eq!(olmoe.architecture, Architecture::Olmoe);
    let c = &olmoe.config;
    assert!(c.qk_norm && c.qk_norm_full && !c.post_norms && c.clip_qkv == Some(2.0));
    let m = c.moe.clone().unwrap();
    assert_eq!((m.experts, m.top_k, m.expert_ffn, m.routing), (4, 2, 24, Routing::SoftmaxThenTopk));
    assert!(m.shared_expert.is_none() && m.dense_layers.is_empty());
    let flex = open("flex_olmo");
    assert_eq!(flex.architecture, Architecture::FlexOlmo);
    assert!(flex.config.post_norms && flex.config.qk_norm_full && flex.config.clip_qkv.is_none());
    assert_eq!(flex.config.moe.unwrap().routing, Routing::TopkThenSoftmax);
}

/// OLMo's norms and clip through the primitive chains too, not only the fused CPU kernels.
#[test]
fn olmo_primitive_chains_match_transformers() {
    for name in ["olmo2", "olmoe", "flex_olmo"] {
        let dir = fixtures().join(name);
        let mut model = Checkpoint::open(&dir).unwrap().load_model(DType::F32, &Device::Cpu).unwrap();
        model.set_fused_kernels(false);
        model.set_fused_moe(false);
        let diff = max_logit_diff(&model, &dir);
        assert!(diff <= 1e-4, "{name}: max |Δlogit| = {diff} through the primitive chains");
    }
    // The fixture's clip_qkv bites: without it the logits move.
    let dir = fixtures().join("olmoe");
    let mut ckpt = Checkpoint::open(&dir).unwrap();
    ckpt.config.clip_qkv = None;
    let diff = max_logit_diff(&ckpt.load_model(DType::F32, &Device::Cpu).unwrap(), &dir);
    assert!(diff > 1e-3, "olmoe without clip_qkv: max |Δlogit| = {diff}");
}

/// Each OLMo family is written as itself, and what its class cannot hold is refused by name.
#[test]
fn olmo_is_written_as_its_family() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, class) in [("olmo2", "Olmo2ForCausalLM"), ("olmoe", "OlmoeForCausalLM"), ("flex_olmo", "FlexOlmoForCausalLM")] {
        let src = Checkpoint::open(fixtures().join(name)).unwrap();
        let out = tmp.path().join(name);
        rewrite(&src, &out, &WriteOptions::default(), None).unwrap();
        let hf: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(hf["architectures"][0], class);
        assert_eq!(hf["attention_bias"], false);
        assert_eq!(hf.get("clip_qkv").and_then(|v| v.as_f64()), (name == "olmoe").then_some(2.0));
        if name != "olmo2" {
            assert_eq!(hf["num_experts"], 4);
            assert_eq!(hf["intermediate_size"], 24);
            assert_eq!(hf["norm_topk_prob"], name == "flex_olmo");
        }
    }
    let cfg = Checkpoint::open(fixtures().join("olmo2")).unwrap().config;
    let refused = |f: &dyn Fn(&mut btm_model::ModelConfig)| {
        let mut c = cfg.clone();
        f(&mut c);
        c.to_hf().unwrap_err().to_string()
    };
    assert_eq!(refused(&|c| c.clip_qkv = Some(1.0)), "unsupported: clip_qkv in a model written as Olmo2ForCausalLM");
    assert_eq!(refused(&|c| c.qk_norm_full = false), "unsupported: Olmo2ForCausalLM without full-width q/k norms");
    assert!(refused(&|c| c.post_norms = false).contains("OLMoE's attention has no dense class"));
    let mut olmoe = Checkpoint::open(fixtures().join("olmoe")).unwrap().config;
    olmoe.moe.as_mut().unwrap().dense_layers = vec![0];
    assert_eq!(olmoe.to_hf().unwrap_err().to_string(), "unsupported: dense layers among MoE ones in a model written as OlmoeForCausalLM");
}

fn assert_same_tensors(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.config, b.config);
    for spec in a.tensor_specs() {
        let (x, y) = (a.tensor(&spec.name).unwrap(), b.tensor(&spec.name).unwrap());
        assert_eq!(x.dtype(), y.dtype(), "{}", spec.name);
        let (x, y) = (x.to_dtype(DType::F64).unwrap(), y.to_dtype(DType::F64).unwrap());
        let x: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
        // Bitwise: compare the bit patterns, not approximate values.
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{} differs after the round trip", spec.name);
    }
}

#[test]
fn read_write_read_is_bit_identical_in_every_dtype_and_sharding() {
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let src = Checkpoint::open(fixtures().join(name)).unwrap();
        // float32, one file.
        let out = tmp.path().join(format!("{name}-f32"));
        rewrite(&src, &out, &WriteOptions::default(), None).unwrap();
        let back = Checkpoint::open(&out).unwrap();
        assert_same_tensors(&src, &back);
        assert!(out.join("MANIFEST.json").exists());
        btm_model::Manifest::read(&out).unwrap().verify(&out).unwrap();

        // Sharded: every shard at most 64 KB, with an index.
        let sharded = tmp.path().join(format!("{name}-sharded"));
        let opts = WriteOptions { max_shard_bytes: 64 << 10, ..Default::default() };
        rewrite(&src, &sharded, &opts, None).unwrap();
        assert!(sharded.join("model.safetensors.index.json").exists(), "{name}");
        assert!(!sharded.join("model.safetensors").exists());
        assert_same_tensors(&src, &Checkpoint::open(&sharded).unwrap());

        // bfloat16 and float16: converting once, then read → write → read is exact.
        for dtype in ["bfloat16", "float16"] {
            let opts = WriteOptions { dtype: dtype.parse::<btm_model::DType>().unwrap().candle(), ..Default::default() };
            let first = tmp.path().join(format!("{name}-{dtype}-1"));
            rewrite(&src, &first, &opts, None).unwrap();
            let first = Checkpoint::open(&first).unwrap();
            assert_eq!(first.dtype(), opts.dtype);
            let second = tmp.path().join(format!("{name}-{dtype}-2"));
            rewrite(&first, &second, &opts, None).unwrap();
            assert_same_tensors(&first, &Checkpoint::open(&second).unwrap());
        }
    }
}

#[test]
fn written_models_keep_their_outputs() {
    // What btm writes computes what it read: logits of the rewritten model equal transformers'.
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let src = Checkpoint::open(fixtures().join(name)).unwrap();
        let out = tmp.path().join(name);
        rewrite(&src, &out, &WriteOptions::default(), None).unwrap();
        let back = Checkpoint::open(&out).unwrap();
        let model = back.load_model(DType::F32, &Device::Cpu).unwrap();
        let diff = max_logit_diff(&model, &fixtures().join(name));
        assert!(diff <= 1e-4, "{name}: max |Δlogit| = {diff} after rewrite");
    }
}

/// A copy of a fixture in a temporary directory, to damage.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn bad_checkpoints_get_named_errors() {
    // Missing weights.
    let d = copy_fixture("llama");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let err = Checkpoint::open(d.path()).unwrap_err();
    assert!(matches!(err, Error::MissingFile(_)), "{err}");
    assert!(err.to_string().ends_with("model.safetensors: file not found"), "{err}");

    // Truncated weights.
    let d = copy_fixture("llama");
    let p = d.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 100).unwrap();
    let err = Checkpoint::open(d.path()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors: truncated or corrupt safetensors file"), "{err}");

    // A shape that disagrees with config.json.
    let d = copy_fixture("llama");
    edit_config(d.path(), |c| c["intermediate_size"] = 72.into());
    let err = Checkpoint::open(d.path()).unwrap_err().to_string();
    assert_eq!(err, "tensor `model.layers.0.mlp.gate_proj.weight` has shape [64, 32] but config.json implies [72, 32]");

    // An MoE whose expert count disagrees with the fused tensors.
    let d = copy_fixture("mixtral_fused");
    edit_config(d.path(), |c| c["intermediate_size"] = 40.into());
    let err = Checkpoint::open(d.path()).unwrap_err().to_string();
    assert!(err.starts_with("tensor `model.layers.0.mlp.experts.gate_up_proj` has shape [4, 96, 32]"), "{err}");

    // Unknown architecture.
    let d = copy_fixture("llama");
    edit_config(d.path(), |c| c["architectures"] = serde_json::json!(["FalconForCausalLM"]));
    let err = Checkpoint::open(d.path()).unwrap_err().to_string();
    assert!(err.starts_with("unknown architecture `FalconForCausalLM`"), "{err}");

    // A missing tensor.
    let d = copy_fixture("qwen2");
    edit_config(d.path(), |c| c["tie_word_embeddings"] = false.into());
    let err = Checkpoint::open(d.path()).unwrap_err().to_string();
    assert!(err.starts_with("tensor `lm_head.weight` is missing from the checkpoint"), "{err}");
}

/// A random dense model of the fixtures' shape but with a smaller vocabulary.
fn small_vocab_model(dir: &Path, vocab: usize) {
    let src = Checkpoint::open(fixtures().join("llama")).unwrap();
    let mut cfg = src.config.clone();
    cfg.vocab_size = vocab;
    let mut get = |name: &str| -> btm_model::Result<Tensor> {
        let t = src.tensor(name)?;
        Ok(if name == "model.embed_tokens.weight" || name == "lm_head.weight" { t.narrow(0, 0, vocab)? } else { t })
    };
    let extras = Extras { tokenizer: Some(fixtures().join("tokenizer.json")), lineage: None };
    write_checkpoint(dir, &cfg, &mut get, &extras, &WriteOptions::default()).unwrap();
}

#[test]
fn tokenizer_larger_than_the_embedding_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    small_vocab_model(&dir, 300);
    let err = Checkpoint::open(&dir).unwrap_err().to_string();
    assert_eq!(err, "the tokenizer has 320 tokens but the model's embedding has only 300 rows (vocab_size)");
}

#[test]
fn failed_write_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Checkpoint::open(fixtures().join("llama")).unwrap();
    let dest = tmp.path().join("out");
    let mut calls = 0;
    let mut get = |name: &str| -> btm_model::Result<Tensor> {
        calls += 1;
        if calls == 5 {
            return Err(Error::Storage("simulated failure".into()));
        }
        src.tensor(name)
    };
    let err = write_checkpoint(&dest, &src.config, &mut get, &Extras::default(), &WriteOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "storage: simulated failure");
    assert!(!dest.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "no temporary directory is left");

    // A tensor of the wrong shape is named and nothing is written either.
    let mut get = |name: &str| -> btm_model::Result<Tensor> {
        let t = src.tensor(name)?;
        Ok(if name == "model.norm.weight" { t.narrow(0, 0, 4)? } else { t })
    };
    let err = write_checkpoint(&dest, &src.config, &mut get, &Extras::default(), &WriteOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "tensor `model.norm.weight` has shape [4] but config.json implies [32]");
    assert!(!dest.exists());

    // An existing destination is not overwritten unless asked.
    std::fs::create_dir(&dest).unwrap();
    let err = rewrite(&src, &dest, &WriteOptions::default(), None).unwrap_err().to_string();
    assert!(err.ends_with("already exists (refusing to overwrite)"), "{err}");
}

#[test]
fn moe_placeholders_are_exact_and_dropped_on_read() {
    // A softmax_then_topk MoE without biases or shared expert is written as Qwen2-MoE with
    // zero biases and a zero-output shared expert; reading it back recovers the original.
    let src = Checkpoint::open(fixtures().join("mixtral")).unwrap();
    let mut cfg = src.config.clone();
    cfg.moe.as_mut().unwrap().routing = btm_model::Routing::SoftmaxThenTopk;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qwen");
    write_checkpoint(&dir, &cfg, &mut |n| src.tensor(n), &Extras::default(), &WriteOptions::default()).unwrap();
    let back = Checkpoint::open(&dir).unwrap();
    assert_eq!(back.architecture, btm_model::Architecture::Qwen2Moe);
    assert_eq!(back.config, cfg);
    let hf: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(hf["norm_topk_prob"], false);
    assert_eq!(hf["btm"]["shared_expert"], "none");
}

#[test]
fn fused_moe_kernels_match_the_reference_loop() {
    for name in ["mixtral", "qwen2_moe", "qwen2_moe_normtopk", "qwen3_moe", "qwen3_moe_softmax", "olmoe", "flex_olmo"] {
        let ckpt = Checkpoint::open(fixtures().join(name)).unwrap();
        let fused = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
        let mut reference = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
        reference.set_fused_moe(false);
        let expected = candle_core::safetensors::load(fixtures().join(name).join("expected.safetensors"), &Device::Cpu).unwrap();
        let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
        let (a, b) = (fused.forward(&ids).unwrap(), reference.forward(&ids).unwrap());
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-5, "{name}: fused vs reference max |Δlogit| = {diff}");
    }
    // A tight capacity drops assignments, and the trace says how many.
    let ckpt = Checkpoint::open(fixtures().join("mixtral")).unwrap();
    let mut model = ckpt.load_model(DType::F32, &Device::Cpu).unwrap();
    model.set_moe_capacity(Some(btm_kernels::Capacity { factor: 0.5, policy: btm_kernels::DropPolicy::Probs }));
    let ids = Tensor::new(&[[3u32, 17, 42, 99, 5, 8, 13, 21]], &Device::Cpu).unwrap();
    let mut trace = btm_model::model::Trace::default();
    model.forward_traced(&ids, &mut trace).unwrap();
    let dropped = trace.router[0].dropped_fraction().unwrap();
    assert!(dropped >= 0.5, "capacity factor 0.5 keeps at most half the assignments, dropped {dropped}");
}
