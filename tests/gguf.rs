//! `btm export gguf` end to end: a merged MoE btm made from trained experts, an upcycled Qwen3-MoE
//! and the Qwen2-MoE fixture are exported, and gguf-py (llama.cpp's own GGUF library, the `gguf`
//! package pinned in scripts/test.sh) reads every tensor back: in f32 bit-identical to the
//! safetensors (the llama q/k row permutation undone independently, experts unstacked), in f16 and
//! bf16 bit-identical to the safetensors rounded to nearest; and no safetensors tensor is missing.
//!
//! Skipped without a Python that has torch, transformers and gguf; `BTM_REQUIRE_TORCH=1` (set by
//! scripts/test.sh) makes a missing one a failure. llama.cpp itself (its perplexity on these
//! files against transformers') is measured by scripts/gguf_ppl.py, recorded in
//! docs/performance.md ("GGUF export and llama.cpp").

mod common;

use common::{btm, ok, repo, trained_expert};
use std::path::Path;
use std::process::Command;

/// Reads a GGUF with gguf-py and checks it against the HF folder's safetensors. Written apart
/// from btm's writer: its own name table, its own unpermutation, its own rounding (torch's).
const CHECK: &str = r#"
import json, sys, glob
import numpy as np, torch, gguf
from safetensors.torch import load_file

folder, path, outtype = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = json.load(open(f"{folder}/config.json"))
st = {}
for f in sorted(glob.glob(f"{folder}/model*.safetensors")):
    st.update(load_file(f))
r = gguf.GGUFReader(path)
field = lambda k: r.fields[k].contents()
arch = field("general.architecture")
heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

def hf_names(gname):
    """The safetensors tensors a GGUF tensor holds (several: an expert stack)."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gname in top:
        n = top[gname]
        return [n if n in st else "model.embed_tokens.weight"]
    _, l, part = gname.split(".", 2)
    p = f"model.layers.{l}"
    if part.endswith("_exps.weight"):
        proj = part[len("ffn_"):-len("_exps.weight")]
        mixtral = {"gate": "w1", "down": "w2", "up": "w3"}[proj]
        names = [f"{p}.mlp.experts.{{e}}.{proj}_proj.weight", f"{p}.block_sparse_moe.experts.{{e}}.{mixtral}.weight"]
        for pattern in names:
            found = []
            while pattern.format(e=len(found)) in st:
                found.append(pattern.format(e=len(found)))
            if found:
                return found
        raise KeyError(gname)
    table = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
             "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
             "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
             "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
             "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
    stem, kind = part.rsplit(".", 1)
    if stem == "ffn_gate_inp" and f"{p}.block_sparse_moe.gate.{kind}" in st:
        return [f"{p}.block_sparse_moe.gate.{kind}"]
    return [f"{p}.{table[stem]}.{kind}"]

def unpermute(x, n_head):
    # llama.cpp's converter pairs rows (i, i + d/2) of each head as rows (2i, 2i + 1).
    d = x.shape[0] // n_head
    return x.reshape(n_head, d // 2, 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)

seen = set()
for t in r.tensors:
    if t.name == "rope_freqs.weight":
        continue
    names = hf_names(t.name)
    seen.update(names)
    want = torch.stack([st[n] for n in names]) if len(names) > 1 else st[names[0]]
    shape = tuple(int(d) for d in reversed(t.shape))
    assert shape == tuple(want.shape), (t.name, shape, tuple(want.shape))
    ty = t.tensor_type.name
    if ty == "F32":
        got = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
        want = want.to(torch.float32)
    elif ty == "F16":
        got = torch.from_numpy(np.array(t.data, dtype=np.float16).reshape(shape)).view(torch.int16)
        want = want.to(torch.float16).view(torch.int16)
    elif ty == "BF16":
        got = torch.from_numpy(np.array(t.data).view(np.int16).reshape(shape))
        want = want.to(torch.bfloat16).view(torch.int16)
    else:
        raise AssertionError(f"{t.name}: type {ty}")
    expected_ty = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[outtype]
    if t.data.ndim >= 2 and not t.name.endswith("_norm.weight") and "ffn_gate_inp" not in t.name:
        assert ty == expected_ty, (t.name, ty)
    else:
        assert ty == "F32", (t.name, ty)
    if arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
        n = heads if t.name.split(".")[-2] == "attn_q" else kv_heads
        got = unpermute(got, n)
    assert torch.equal(got, want), f"{t.name} differs from {names}"
# Every safetensors tensor is in the file (a zero shared expert btm writes as a Qwen2-MoE
# placeholder aside: it is in the file too, under its own name).
missing = sorted(set(st) - seen)
assert not missing, missing
print(json.dumps({"arch": arch, "tensors": len(r.tensors), "pre": field("tokenizer.ggml.pre"),
                  "tokens": len(field("tokenizer.ggml.tokens")), "vocab_size": cfg["vocab_size"]}))
"#;

fn python_with_gguf() -> Option<std::path::PathBuf> {
    let python = common::torch_python()?;
    let has_gguf = Command::new(&python).args(["-c", "import gguf"]).status().is_ok_and(|s| s.success());
    if !has_gguf {
        assert!(
            std::env::var("BTM_REQUIRE_TORCH").as_deref() != Ok("1"),
            "BTM_REQUIRE_TORCH=1 but {python:?} has no `gguf` (pip install gguf==0.19.0, as scripts/test.sh does)"
        );
        eprintln!("skipped: {python:?} has no `gguf` package");
        return None;
    }
    Some(python)
}

fn export_and_check(python: &Path, model: &Path, out: &Path, outtype: &str, arch: &str) {
    ok(btm().args(["export", "gguf", "--model"]).arg(model).arg("--out").arg(out).args(["--outtype", outtype]).output().unwrap());
    let check = Command::new(python).args(["-c", CHECK]).arg(model).arg(out).arg(outtype).output().unwrap();
    let stdout = ok(check);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["arch"], arch, "{summary}");
    assert_eq!(summary["pre"], "gpt-2", "{summary}");
    assert_eq!(summary["tokens"], summary["vocab_size"], "{summary}");
}

#[test]
fn gguf_py_reads_every_tensor_back_bit_identical() {
    let Some(python) = python_with_gguf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // A merged MoE of two trained experts: Mixtral, written as llama.cpp's `llama` with
    // stacked experts and permuted q/k rows.
    let (code, scripture) = (trained_expert(tmp.path(), "code"), trained_expert(tmp.path(), "scripture"));
    let merged = tmp.path().join("merged");
    ok(btm().args(["merge", "--top-k", "1", "--experts"]).arg(&code).arg(&scripture).arg("--out").arg(&merged).output().unwrap());
    // An upcycled Qwen3-MoE (per-head q/k norms, NEOX RoPE, no permutation).
    let qwen3_moe = tmp.path().join("qwen3-moe");
    let qwen3 = repo().join("model/tests/fixtures/qwen3");
    ok(btm().args(["upcycle", "--model"]).arg(&qwen3).args(["--experts", "4", "--top-k", "2", "--out"]).arg(&qwen3_moe).output().unwrap());
    let qwen2_moe = repo().join("model/tests/fixtures/qwen2_moe");
    for outtype in ["f32", "f16", "bf16"] {
        export_and_check(&python, &merged, &tmp.path().join(format!("merged.{outtype}.gguf")), outtype, "llama");
        export_and_check(&python, &qwen3_moe, &tmp.path().join(format!("qwen3-moe.{outtype}.gguf")), outtype, "qwen3moe");
        export_and_check(&python, &qwen2_moe, &tmp.path().join(format!("qwen2-moe.{outtype}.gguf")), outtype, "qwen2moe");
    }
}

#[test]
fn export_refuses_what_llama_cpp_cannot_run_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("flex.gguf");
    let run = btm()
        .args(["export", "gguf", "--model"])
        .arg(repo().join("model/tests/fixtures/flex_olmo"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("FlexOlmoForCausalLM: llama.cpp has no architecture"), "{err}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "a refused export left a file");
}

/// llama.cpp itself, opt-in (building llama-cpp-python takes tens of minutes on 2 cores): with
/// `BTM_LLAMA_PYTHON` naming a Python that has it (docs/performance.md, "GGUF export and
/// llama.cpp", gives the build command), each exportable family's fixture is exported in f32 and
/// llama.cpp's perplexity must equal transformers' within 1e-6 relative, with the same token ids
/// from llama.cpp's tokenizer. Skipped when the variable is unset.
#[test]
fn llama_cpp_scores_every_family_as_transformers_does() {
    let Some(llama_python) = std::env::var_os("BTM_LLAMA_PYTHON") else {
        eprintln!("skipped: set BTM_LLAMA_PYTHON to a Python with llama-cpp-python");
        return;
    };
    let Some(python) = common::torch_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for fixture in ["llama", "mixtral", "qwen2", "qwen2_moe", "qwen3", "olmo2"] {
        let model = repo().join("model/tests/fixtures").join(fixture);
        let out = tmp.path().join(format!("{fixture}.gguf"));
        ok(btm().args(["export", "gguf", "--outtype", "f32", "--model"]).arg(&model).arg("--out").arg(&out).output().unwrap());
        let run = Command::new(&python)
            .arg(repo().join("scripts/gguf_ppl.py"))
            .arg("--model")
            .arg(&model)
            .arg("--gguf")
            .arg(&out)
            .arg("--data")
            .arg(repo().join("model/tests/fixtures/eval.jsonl"))
            .args(["--seq-len", "64", "--tolerance", "1e-6", "--llama-python"])
            .arg(&llama_python)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success(), "{fixture}: {stdout}\n{}", String::from_utf8_lossy(&run.stderr));
        let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(result["tokenizer_same_ids_docs"], "7/7", "{fixture}: {result}");
    }
}
