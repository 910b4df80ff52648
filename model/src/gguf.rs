//! GGUF export: a btm (Hugging Face layout) checkpoint as one `.gguf` file that llama.cpp loads.
//!
//! The file follows the conventions of llama.cpp's own converter (`convert_hf_to_gguf.py` and
//! gguf-py's `constants.py` / `tensor_mapping.py`): the architecture names, tensor names, metadata
//! keys and per-tensor types it writes, so that llama.cpp's loader (`src/models/<arch>.cpp`)
//! finds every tensor it asks for with the shape it expects, and computes the function the
//! checkpoint computes in transformers. Where llama.cpp's graph for an architecture cannot
//! compute that function (a routing it does not implement, a bias it does not load, a layout it
//! has no architecture for), the export is refused by name instead of written wrong.
//!
//! | btm / Hugging Face                         | GGUF `general.architecture` |
//! |--------------------------------------------|-----------------------------|
//! | Llama, Mistral, Mixtral                    | `llama` (q/k rows permuted)  |
//! | Qwen2 / Qwen2-MoE                          | `qwen2` / `qwen2moe`         |
//! | Qwen3 / Qwen3-MoE                          | `qwen3` / `qwen3moe`         |
//! | OLMo2 / OLMoE                              | `olmo2` / `olmoe`            |
//! | FlexOlmo                                   | refused: llama.cpp has none  |
//!
//! Tensors are streamed: the header (metadata and every tensor's name, shape, type and offset,
//! all known from the config) is written first, then each tensor is read, converted and written
//! in turn, so exporting needs memory for one tensor (one layer's stacked experts), not the
//! model. The file is written under a temporary name and renamed when complete
//! ([`crate::publish::StagingFile`]).
//!
//! candle-core's `gguf_file::write` is not used for the container because it takes every tensor
//! in memory at once (a 7B model's whole f16 copy) and writes GGUF version 2; its `QTensor`
//! does the Q8_0 quantisation here, and its reader (`gguf_file::Content::read`) checks the
//! files in the tests.

use crate::checkpoint::{Checkpoint, TOKENIZER};
use crate::config::{Architecture, ModelConfig, MoeConfig, RopeScaling};
use crate::error::{read_json, Error, Result};
use crate::publish::StagingFile;
use crate::weights::expected_tensors;
use btm_kernels::Routing;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;
use std::io::Write;
use std::path::Path;

/// GGUF format version written (the current one; llama.cpp reads 2 and 3).
pub const GGUF_VERSION: u32 = 3;
/// Alignment of the tensor data section and of every tensor in it (GGUF's default).
pub const ALIGNMENT: usize = 32;
/// ggml's quantisation format version (`GGML_QNT_VERSION`), which llama.cpp's converter writes.
const QUANTIZATION_VERSION: u32 = 2;

/// The type of the bulk of the weights (`--outtype`), as llama.cpp's converter names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutType {
    /// Everything float32 (llama.cpp's `LlamaFileType.ALL_F32`).
    F32,
    /// Matrices float16, norms, biases and routers float32 (`MOSTLY_F16`).
    F16,
    /// Matrices bfloat16, norms, biases and routers float32 (`MOSTLY_BF16`).
    Bf16,
    /// Matrices in ggml's Q8_0 blocks (32 int8 values and one f16 scale), falling back to f16
    /// for a matrix whose rows are not a multiple of 32 wide, as llama.cpp's converter does.
    Q8_0,
}

impl OutType {
    /// Every output type, in the CLI's order.
    pub const ALL: [OutType; 4] = [OutType::F32, OutType::F16, OutType::Bf16, OutType::Q8_0];

    /// The name `--outtype` takes (llama.cpp's converter's).
    pub fn as_str(self) -> &'static str {
        match self {
            OutType::F32 => "f32",
            OutType::F16 => "f16",
            OutType::Bf16 => "bf16",
            OutType::Q8_0 => "q8_0",
        }
    }

    /// What llama.cpp's converter picks when `--outtype` is not given (its `auto`): the
    /// highest-fidelity 16-bit type, bf16 for a bfloat16 checkpoint and f16 otherwise.
    pub fn auto(checkpoint_dtype: DType) -> Self {
        if checkpoint_dtype == DType::BF16 {
            OutType::Bf16
        } else {
            OutType::F16
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            OutType::F32 => 0,
            OutType::F16 => 1,
            OutType::Q8_0 => 7,
            OutType::Bf16 => 32,
        }
    }

    fn tensor_type(self) -> TensorType {
        match self {
            OutType::F32 => TensorType::F32,
            OutType::F16 => TensorType::F16,
            OutType::Bf16 => TensorType::Bf16,
            OutType::Q8_0 => TensorType::Q8_0,
        }
    }
}

impl std::str::FromStr for OutType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        OutType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| Error::Unsupported(format!("GGUF output type `{s}` (btm writes f32, f16, bf16, q8_0)")))
    }
}

/// The ggml type of one tensor in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    /// `GGML_TYPE_F32`.
    F32,
    /// `GGML_TYPE_F16`.
    F16,
    /// `GGML_TYPE_BF16`.
    Bf16,
    /// `GGML_TYPE_Q8_0`.
    Q8_0,
}

impl TensorType {
    /// The id in ggml's `ggml_type` enum.
    fn ggml_id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q8_0 => 8,
            TensorType::Bf16 => 30,
        }
    }

    /// Bytes of a tensor with `elements` values (a multiple of 32 for Q8_0).
    fn bytes(self, elements: usize) -> usize {
        match self {
            TensorType::F32 => elements * 4,
            TensorType::F16 | TensorType::Bf16 => elements * 2,
            TensorType::Q8_0 => elements / GgmlDType::Q8_0.block_size() * GgmlDType::Q8_0.type_size(),
        }
    }
}

/// How `btm export gguf` writes a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Type of the weight matrices; `None` = llama.cpp's `auto` ([`OutType::auto`]).
    pub outtype: Option<OutType>,
    /// `general.name`; `None` = the checkpoint folder's name.
    pub name: Option<String>,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// `general.architecture`.
    pub architecture: &'static str,
    /// The weight matrices' type.
    pub outtype: OutType,
    /// `tokenizer.ggml.pre`.
    pub pre_tokenizer: &'static str,
    /// Number of tensors in the file.
    pub tensors: usize,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// Things a user should know about the file (what llama.cpp will do differently).
    pub notes: Vec<String>,
}

/// The llama.cpp architecture a checkpoint is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    /// `llama`: Llama, Mistral and Mixtral (its MoE as stacked `ffn_*_exps`).
    Llama,
    /// `qwen2`.
    Qwen2,
    /// `qwen2moe`: routed experts and a gated shared expert in every layer.
    Qwen2Moe,
    /// `qwen3`.
    Qwen3,
    /// `qwen3moe`.
    Qwen3Moe,
    /// `olmo2`.
    Olmo2,
    /// `olmoe`.
    Olmoe,
}

impl GgufArch {
    /// `general.architecture`, the prefix of the architecture's metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen2 => "qwen2",
            GgufArch::Qwen2Moe => "qwen2moe",
            GgufArch::Qwen3 => "qwen3",
            GgufArch::Qwen3Moe => "qwen3moe",
            GgufArch::Olmo2 => "olmo2",
            GgufArch::Olmoe => "olmoe",
        }
    }

    /// llama.cpp's architecture for a checkpoint's Hugging Face one.
    pub fn of(arch: Architecture) -> Result<Self> {
        Ok(match arch {
            Architecture::Llama | Architecture::Mistral | Architecture::Mixtral => GgufArch::Llama,
            Architecture::Qwen2 => GgufArch::Qwen2,
            Architecture::Qwen2Moe => GgufArch::Qwen2Moe,
            Architecture::Qwen3 => GgufArch::Qwen3,
            Architecture::Qwen3Moe => GgufArch::Qwen3Moe,
            Architecture::Olmo2 => GgufArch::Olmo2,
            Architecture::Olmoe => GgufArch::Olmoe,
            Architecture::FlexOlmo => {
                return Err(Error::Unsupported(
                    "GGUF export of FlexOlmoForCausalLM: llama.cpp has no architecture for it (OLMo2's post-norm layers \
                     with an MoE FFN); export the dense OLMo2 experts, or merge them as OLMoE (--architecture olmoe)"
                        .into(),
                ))
            }
        })
    }

    fn is_moe(self) -> bool {
        matches!(self, GgufArch::Qwen2Moe | GgufArch::Qwen3Moe | GgufArch::Olmoe)
    }

    /// llama.cpp's graph applies RoPE to consecutive pairs (`LLAMA_ROPE_TYPE_NORM`), where
    /// transformers rotates the two halves of each head: the q/k rows are permuted on export,
    /// as llama.cpp's converter does. The other architectures use NEOX RoPE, the halves.
    fn permutes_qk(self) -> bool {
        self == GgufArch::Llama
    }

    /// Whether llama.cpp's loader requires `output.weight` (no fallback to the embedding).
    fn needs_output(self) -> bool {
        matches!(self, GgufArch::Qwen2Moe | GgufArch::Olmo2 | GgufArch::Olmoe)
    }

    /// Whether llama.cpp's MoE layer renormalises the top-k weights (`norm_w` of
    /// `build_moe_ffn`): Mixtral's and Qwen3-MoE's graphs do, Qwen2-MoE's and OLMoE's do not,
    /// and none of them reads `norm_topk_prob` from the file.
    fn renormalises_topk(self) -> bool {
        matches!(self, GgufArch::Llama | GgufArch::Qwen3Moe)
    }
}

/// Check that llama.cpp's graph for `arch` computes the model `cfg` describes; the error names
/// what it cannot compute.
fn check_supported(arch: GgufArch, cfg: &ModelConfig) -> Result<Vec<String>> {
    let name = arch.name();
    let refuse = |what: String| Err(Error::Unsupported(format!("GGUF export as llama.cpp's `{name}`: {what}")));
    let mut notes = Vec::new();
    let square_attention = cfg.num_heads * cfg.head_dim == cfg.hidden_size;
    match arch {
        GgufArch::Llama if cfg.qk_norm || cfg.post_norms => {
            return refuse("q/k norms or post-norms, which its graph does not have".into());
        }
        GgufArch::Qwen2 | GgufArch::Qwen2Moe | GgufArch::Olmo2 | GgufArch::Olmoe if !square_attention => {
            return refuse(format!(
                "num_attention_heads × head_dim = {} != hidden_size = {} (its loader sizes the attention hidden_size wide)",
                cfg.num_heads * cfg.head_dim,
                cfg.hidden_size
            ));
        }
        _ => {}
    }
    if cfg.o_bias && arch != GgufArch::Llama {
        return refuse("an output-projection bias, which its loader does not read".into());
    }
    if cfg.rope_scaling.is_some() && arch != GgufArch::Llama {
        return refuse("Llama-3 RoPE scaling, which only the `llama` graph applies (through rope_freqs)".into());
    }
    if matches!(arch, GgufArch::Qwen3 | GgufArch::Qwen3Moe) && (!cfg.qk_norm || cfg.qk_norm_full) {
        return refuse("Qwen3 layers need per-head q/k norms".into());
    }
    if matches!(arch, GgufArch::Olmo2 | GgufArch::Olmoe) && !(cfg.qk_norm && cfg.qk_norm_full) {
        return refuse("OLMo layers need full-width q/k norms".into());
    }
    if arch == GgufArch::Olmoe {
        if cfg.num_kv_heads != cfg.num_heads {
            return refuse("grouped-query attention (its loader sizes the k norm hidden_size wide)".into());
        }
        if cfg.clip_qkv.is_some() {
            return refuse("clip_qkv, which its graph does not apply".into());
        }
    }
    if let Some(window) = cfg.sliding_window.filter(|&w| w < cfg.max_position_embeddings) {
        // llama.cpp's converter writes Mistral's and Qwen2's windows nowhere either.
        notes.push(format!(
            "sliding_window = {window}: llama.cpp's `{name}` attends to every earlier position, so beyond {window} tokens it \
             differs from transformers"
        ));
    }
    match (&cfg.moe, arch) {
        (None, _) if arch.is_moe() => return refuse("a dense model".into()),
        (None, _) => {}
        (Some(_), GgufArch::Qwen2 | GgufArch::Qwen3 | GgufArch::Olmo2) => return refuse("an MoE".into()),
        (Some(m), _) => check_moe(arch, m, &refuse)?,
    }
    Ok(notes)
}

fn check_moe(arch: GgufArch, m: &MoeConfig, refuse: &dyn Fn(String) -> Result<Vec<String>>) -> Result<()> {
    if !m.dense_layers.is_empty() {
        refuse(format!("dense layers {:?} among MoE ones (its graph routes every layer)", m.dense_layers))?;
    }
    // With k = E both routings weight the experts by the full softmax, which sums to 1.
    let renormalised = m.routing == Routing::TopkThenSoftmax || m.top_k == m.experts;
    let plain = m.routing == Routing::SoftmaxThenTopk || m.top_k == m.experts;
    if arch.renormalises_topk() && !renormalised {
        refuse("routing softmax_then_topk (norm_topk_prob: false): its graph always renormalises the top-k weights".into())?;
    }
    if !arch.renormalises_topk() && !plain {
        refuse("routing topk_then_softmax (norm_topk_prob: true): its graph never renormalises the top-k weights".into())?;
    }
    match (&m.shared_expert, arch) {
        (Some(_), GgufArch::Llama | GgufArch::Qwen3Moe | GgufArch::Olmoe) => {
            refuse("a shared expert".into())?;
        }
        (Some(s), GgufArch::Qwen2Moe) if !s.gated => {
            // llama.cpp computes the gate's sigmoid as silu(x) / x: the zero gate that stands
            // for "ungated" in btm's Qwen2-MoE layout gives 0 / 0 there.
            refuse("an ungated shared expert (llama.cpp's sigmoid of a zero gate is NaN)".into())?;
        }
        _ => {}
    }
    Ok(())
}

/// Where one tensor's values come from.
#[derive(Debug, Clone)]
enum Source {
    /// A checkpoint tensor by canonical name; `permute_heads` = the llama q/k row permutation
    /// over that many heads.
    Canonical { name: String, permute_heads: Option<usize> },
    /// Per-expert tensors stacked into one [E, rows, cols] tensor.
    Stack(Vec<String>),
    /// A constant-filled placeholder.
    Fill(f32),
    /// Given values (float32).
    Values(Vec<f32>),
}

/// One tensor of the file: its GGUF name, its shape in PyTorch order (GGUF stores the reverse),
/// its ggml type and where its values come from.
#[derive(Debug, Clone)]
struct Planned {
    name: String,
    shape: Vec<usize>,
    ty: TensorType,
    source: Source,
}

/// The type llama.cpp's converter gives a tensor: float32 for 1-D tensors, norms, biases,
/// routers (`ffn_gate_inp*`) and rope factors; the output type for the other matrices, Q8_0
/// falling back to f16 where a row is not a whole number of blocks.
fn tensor_type(name: &str, shape: &[usize], outtype: OutType) -> TensorType {
    let keep_f32 = shape.len() <= 1
        || name.ends_with("_norm.weight")
        || !name.ends_with(".weight")
        || name.contains(".ffn_gate_inp")
        || name == "rope_freqs.weight";
    if keep_f32 {
        return TensorType::F32;
    }
    let row = *shape.last().expect("non-empty shape");
    match outtype.tensor_type() {
        TensorType::Q8_0 if !row.is_multiple_of(GgmlDType::Q8_0.block_size()) => TensorType::F16,
        t => t,
    }
}

/// The GGUF name of a canonical tensor outside the MoE experts.
fn gguf_name(arch: GgufArch, canonical: &str) -> Option<String> {
    let top = match canonical {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = canonical.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let post_norm_layers = arch == GgufArch::Olmo2;
    let mapped = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        // OLMo2 normalises each sublayer's output; the others normalise the FFN's input.
        "post_attention_layernorm.weight" if post_norm_layers => "post_attention_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "mlp.gate.weight" => "ffn_gate_inp.weight",
        "mlp.shared_expert.gate_proj.weight" => "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight" => "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight" => "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight" => "ffn_gate_inp_shexp.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

/// Llama 3.1's RoPE frequency factors as llama.cpp applies them (`rope_freqs.weight`, one
/// divisor per frequency; Meta's `apply_scaling` in llama3's reference code).
fn llama3_rope_factors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } = cfg.rope_scaling.as_ref()?;
    let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
    let old = *original_max_position_embeddings as f32;
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    let dim = cfg.head_dim;
    let factors = (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect();
    Some(factors)
}

/// Every tensor of the file, in order.
fn plan_tensors(arch: GgufArch, cfg: &ModelConfig, outtype: OutType) -> Vec<Planned> {
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, source: Source| {
        let ty = tensor_type(&name, &shape, outtype);
        out.push(Planned { name, shape, ty, source });
    };
    if arch == GgufArch::Llama {
        if let Some(factors) = llama3_rope_factors(cfg) {
            push("rope_freqs.weight".into(), vec![factors.len()], Source::Values(factors));
        }
    }
    let specs = expected_tensors(cfg);
    for spec in &specs {
        let canonical = &spec.name;
        // Experts: stacked per layer when the layer's router comes by.
        if canonical.contains(".mlp.experts.") {
            continue;
        }
        let name = gguf_name(arch, canonical).unwrap_or_else(|| panic!("no GGUF name for `{canonical}`"));
        let permute_heads = match canonical.rsplit('.').nth(1) {
            Some("q_proj") if arch.permutes_qk() => Some(cfg.num_heads),
            Some("k_proj") if arch.permutes_qk() => Some(cfg.num_kv_heads),
            _ => None,
        };
        push(name, spec.shape.clone(), Source::Canonical { name: canonical.clone(), permute_heads });
        if let (Some(m), Some(layer_prefix)) = (&cfg.moe, canonical.strip_suffix(".mlp.gate.weight")) {
            let layer = layer_prefix.trim_start_matches("model.layers.");
            for (proj, ggml) in [("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")] {
                let names: Vec<String> = (0..m.experts).map(|e| format!("{layer_prefix}.mlp.experts.{e}.{proj}.weight")).collect();
                let per_expert =
                    if proj == "down_proj" { vec![cfg.hidden_size, m.expert_ffn] } else { vec![m.expert_ffn, cfg.hidden_size] };
                push(format!("blk.{layer}.{ggml}.weight"), [vec![m.experts], per_expert].concat(), Source::Stack(names));
            }
            if arch == GgufArch::Qwen2Moe && m.shared_expert.is_none() {
                // llama.cpp's qwen2moe always has a shared expert: a width-1 one whose down_proj
                // is zero adds exactly zero. Its gate is not zero: llama.cpp's sigmoid is
                // silu(x) / x, which is NaN at exactly 0 (and NaN × 0 is NaN).
                let h = cfg.hidden_size;
                push(format!("blk.{layer}.ffn_gate_inp_shexp.weight"), vec![1, h], Source::Fill(1.0));
                push(format!("blk.{layer}.ffn_gate_shexp.weight"), vec![1, h], Source::Fill(0.0));
                push(format!("blk.{layer}.ffn_up_shexp.weight"), vec![1, h], Source::Fill(0.0));
                push(format!("blk.{layer}.ffn_down_shexp.weight"), vec![h, 1], Source::Fill(0.0));
            }
        }
    }
    if cfg.tie_word_embeddings && arch.needs_output() {
        let embed = "model.embed_tokens.weight".to_string();
        push("output.weight".into(), vec![cfg.vocab_size, cfg.hidden_size], Source::Canonical { name: embed, permute_heads: None });
    }
    out
}

/// Metadata that does not depend on the tokenizer: `general.*` and the architecture's keys.
fn model_metadata(arch: GgufArch, cfg: &ModelConfig, outtype: OutType, name: &str) -> Vec<(String, Value)> {
    let a = arch.name();
    let u = |v: usize| Value::U32(v as u32);
    let mut kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(outtype.file_type())),
        ("general.quantization_version".into(), Value::U32(QUANTIZATION_VERSION)),
        ("general.alignment".into(), Value::U32(ALIGNMENT as u32)),
    ];
    let mut arch_kv = |key: &str, v: Value| kv.push((format!("{a}.{key}"), v));
    if arch == GgufArch::Llama {
        arch_kv("vocab_size", u(cfg.vocab_size));
    }
    arch_kv("context_length", u(cfg.max_position_embeddings));
    arch_kv("embedding_length", u(cfg.hidden_size));
    arch_kv("block_count", u(cfg.num_layers));
    // Mixtral's and OLMoE's graphs size their experts by feed_forward_length; the Qwen MoEs
    // read the experts' width from expert_feed_forward_length.
    let ffn = match (&cfg.moe, arch) {
        (Some(m), GgufArch::Llama | GgufArch::Olmoe) => m.expert_ffn,
        _ => cfg.intermediate_size,
    };
    arch_kv("feed_forward_length", u(ffn));
    arch_kv("attention.head_count", u(cfg.num_heads));
    arch_kv("attention.head_count_kv", u(cfg.num_kv_heads));
    arch_kv("attention.key_length", u(cfg.head_dim));
    arch_kv("attention.value_length", u(cfg.head_dim));
    arch_kv("rope.freq_base", Value::F32(cfg.rope_theta as f32));
    if arch == GgufArch::Llama {
        arch_kv("rope.dimension_count", u(cfg.head_dim));
    }
    arch_kv("attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps as f32));
    if let Some(m) = &cfg.moe {
        arch_kv("expert_count", u(m.experts));
        arch_kv("expert_used_count", u(m.top_k));
        if matches!(arch, GgufArch::Qwen2Moe | GgufArch::Qwen3Moe) {
            arch_kv("expert_feed_forward_length", u(m.expert_ffn));
        }
        if arch == GgufArch::Qwen2Moe {
            arch_kv("expert_shared_feed_forward_length", u(m.shared_expert.as_ref().map_or(1, |s| s.ffn)));
        }
    }
    kv
}

/// Qwen2's pre-tokenizer split (its `tokenizer.json`), which llama.cpp names `qwen2`.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer split, which llama.cpp names `llama-bpe`.
const LLAMA3_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's name (`tokenizer.ggml.pre`) for a `tokenizer.json`'s pre-tokenizer whose split
/// it implements the same way: btm's own (GPT-2's byte-level regex), Qwen2's and Llama 3's.
pub fn pre_tokenizer_name(pre: &Json) -> Result<&'static str> {
    let kind = |v: &Json| v.get("type").and_then(Json::as_str).unwrap_or("").to_string();
    let flag = |v: &Json, key: &str, default: bool| v.get(key).and_then(Json::as_bool).unwrap_or(default);
    let byte_level =
        |v: &Json, regex: bool| kind(v) == "ByteLevel" && flag(v, "use_regex", true) == regex && !flag(v, "add_prefix_space", true);
    if byte_level(pre, true) {
        return Ok("gpt-2");
    }
    if kind(pre) == "Sequence" {
        if let Some([split, bl]) = pre.get("pretokenizers").and_then(Json::as_array).map(Vec::as_slice) {
            let regex = split.pointer("/pattern/Regex").and_then(Json::as_str);
            let isolated = split.get("behavior").and_then(Json::as_str) == Some("Isolated") && !flag(split, "invert", false);
            if kind(split) == "Split" && isolated && byte_level(bl, false) {
                match regex {
                    Some(QWEN2_REGEX) => return Ok("qwen2"),
                    Some(LLAMA3_REGEX) => return Ok("llama-bpe"),
                    _ => {}
                }
            }
        }
    }
    let shown: String = pre.to_string().chars().take(300).collect();
    Err(Error::Unsupported(format!(
        "GGUF export of this tokenizer: its pre-tokenizer is none llama.cpp implements the same way (btm knows GPT-2's \
         byte-level one, Qwen2's and Llama 3's): {shown}"
    )))
}

/// The tokenizer metadata llama.cpp's BPE (`gpt2`) vocabulary reads, from a byte-level BPE
/// `tokenizer.json`, with `vocab_size` entries (ids the tokenizer leaves free are `[PAD<id>]`,
/// unused, as llama.cpp's converter writes them).
pub fn tokenizer_metadata(dir: &Path, cfg: &ModelConfig) -> Result<(Vec<(String, Value)>, &'static str)> {
    let path = dir.join(TOKENIZER);
    let json = read_json(&path)?;
    let refuse = |what: &str| Error::Unsupported(format!("GGUF export of {}: {what}", path.display()));
    let model = json.get("model").ok_or_else(|| refuse("no `model`"))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err(refuse("not a BPE tokenizer (llama.cpp's `gpt2` vocabulary is byte-level BPE)"));
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if model.get(key).is_some_and(|v| !v.is_null() && v.as_str() != Some("")) {
            return Err(refuse(&format!("BPE `{key}`, which llama.cpp does not apply")));
        }
    }
    if model.get("byte_fallback").and_then(Json::as_bool) == Some(true) {
        return Err(refuse("byte_fallback (a SentencePiece-style vocabulary, not byte-level BPE)"));
    }
    match json.get("normalizer") {
        None | Some(Json::Null) => {}
        Some(n) if n.get("type").and_then(Json::as_str) == Some("NFC") => {}
        Some(n) => return Err(refuse(&format!("a normalizer llama.cpp does not apply: {n}"))),
    }
    let pre = pre_tokenizer_name(json.get("pre_tokenizer").unwrap_or(&Json::Null))?;

    let vocab = model.get("vocab").and_then(Json::as_object).ok_or_else(|| refuse("no `model.vocab`"))?;
    let mut tokens: Vec<Option<String>> = vec![None; cfg.vocab_size];
    let mut types = vec![1i32; cfg.vocab_size]; // NORMAL
    let mut place = |id: u64, text: &str| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| refuse(&format!("token id {id} beyond vocab_size {}", cfg.vocab_size)))?;
        *slot = Some(text.to_string());
        Ok(())
    };
    for (text, id) in vocab {
        place(id.as_u64().ok_or_else(|| refuse(&format!("token `{text}` has no integer id")))?, text)?;
    }
    for added in json.get("added_tokens").and_then(Json::as_array).into_iter().flatten() {
        let (Some(id), Some(text)) = (added.get("id").and_then(Json::as_u64), added.get("content").and_then(Json::as_str)) else {
            return Err(refuse(&format!("malformed added token {added}")));
        };
        place(id, text)?;
        // CONTROL for special tokens, USER_DEFINED for the others (gguf-py's TokenType).
        types[id as usize] = if added.get("special").and_then(Json::as_bool).unwrap_or(false) { 3 } else { 4 };
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[id] = 5; // UNUSED
                format!("[PAD{id}]")
            }))
        })
        .collect();
    let merges: Vec<Value> = model
        .get("merges")
        .and_then(Json::as_array)
        .ok_or_else(|| refuse("no `model.merges`"))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Ok(Value::String(format!("{a} {b}"))),
                _ => Err(refuse(&format!("malformed merge {m}"))),
            },
            _ => Err(refuse(&format!("malformed merge {m}"))),
        })
        .collect::<Result<_>>()?;

    // Whether encoding adds BOS/EOS: what the post-processor puts around a text.
    let tok = crate::tokenizer::load(&path)?;
    let probe = "a";
    let encode = |special: bool| -> Result<Vec<u32>> {
        Ok(tok.encode(probe, special).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec())
    };
    let (plain, with_special) = (encode(false)?, encode(true)?);
    let start = with_special.windows(plain.len().max(1)).position(|w| w == plain.as_slice()).unwrap_or(0);
    let added_bos = with_special[..start].first().copied();
    let added_eos = with_special[start + plain.len()..].last().copied();
    let id_of = |name: &str| tok.token_to_id(name);
    let bos = added_bos.or(cfg.bos_token_id).or_else(|| id_of(crate::tokenizer::BOS));
    let eos = cfg.eos_token_id.or(added_eos).or_else(|| id_of(crate::tokenizer::EOS));
    let unk = model.get("unk_token").and_then(Json::as_str).and_then(id_of);
    let pad = json.pointer("/padding/pad_id").and_then(Json::as_u64).map(|p| p as u32);

    let mut kv: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    for (key, id) in [("bos_token_id", bos), ("eos_token_id", eos), ("unknown_token_id", unk), ("padding_token_id", pad)] {
        if let Some(id) = id {
            kv.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    kv.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(added_bos.is_some())));
    kv.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(added_eos.is_some())));
    Ok((kv, pre))
}

/// Write `ckpt` to `out` as GGUF. Refuses, by name and before writing anything, a model or
/// tokenizer llama.cpp cannot run as transformers does.
pub fn export(ckpt: &Checkpoint, out: &Path, opts: &ExportOptions) -> Result<ExportSummary> {
    let arch = GgufArch::of(ckpt.architecture)?;
    let cfg = &ckpt.config;
    let notes = check_supported(arch, cfg)?;
    let outtype = opts.outtype.unwrap_or_else(|| OutType::auto(ckpt.dtype()));
    let name = opts.name.clone().unwrap_or_else(|| {
        let dir = std::fs::canonicalize(ckpt.dir()).unwrap_or_else(|_| ckpt.dir().to_path_buf());
        dir.file_name().map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
    });
    let mut metadata = model_metadata(arch, cfg, outtype, &name);
    let (tokenizer_kv, pre) = tokenizer_metadata(ckpt.dir(), cfg)?;
    metadata.extend(tokenizer_kv);
    let tensors = plan_tensors(arch, cfg, outtype);

    let staging = StagingFile::new(out)?;
    let file = std::fs::File::create(&staging.path).map_err(|e| Error::io(&staging.path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = |e: std::io::Error| Error::io(&staging.path, e);
    write_header(&mut w, &metadata, &tensors).map_err(io)?;
    for t in &tensors {
        let bytes = tensor_bytes(ckpt, t)?;
        debug_assert_eq!(bytes.len(), t.ty.bytes(t.shape.iter().product()));
        w.write_all(&bytes).map_err(io)?;
        w.write_all(&vec![0u8; padding(bytes.len())]).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let bytes = file.metadata().map_err(io)?.len();
    drop(file);
    staging.publish()?;
    Ok(ExportSummary { architecture: arch.name(), outtype, pre_tokenizer: pre, tensors: tensors.len(), bytes, notes })
}

fn padding(len: usize) -> usize {
    (ALIGNMENT - len % ALIGNMENT) % ALIGNMENT
}

fn write_str<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// GGUF's value type id (`gguf_type`).
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value<W: Write>(w: &mut W, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::String(s) => write_str(w, s),
        Value::Array(items) => {
            // GGUF arrays are homogeneous; an empty one is typed as strings.
            let elem = items.first().map_or(8, value_type);
            w.write_all(&elem.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| write_value(w, item))
        }
    }
}

/// Magic, version, counts, metadata, tensor infos and the padding before the data.
fn write_header<W: Write>(w: &mut W, metadata: &[(String, Value)], tensors: &[Planned]) -> std::io::Result<()> {
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_str(&mut header, key)?;
        header.extend_from_slice(&value_type(value).to_le_bytes());
        write_value(&mut header, value)?;
    }
    let mut offset = 0usize;
    for t in tensors {
        write_str(&mut header, &t.name)?;
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        // ggml's ne[0] is the innermost (PyTorch's last) dimension.
        for &d in t.shape.iter().rev() {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        header.extend_from_slice(&t.ty.ggml_id().to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        let len = t.ty.bytes(t.shape.iter().product());
        offset += len + padding(len);
    }
    header.resize(header.len() + padding(header.len()), 0);
    w.write_all(&header)
}

/// The llama q/k row permutation (`LlamaModel.permute` in llama.cpp's converter): within each
/// head, rows [0, d/2) and [d/2, d) — the halves transformers rotates together — are
/// interleaved, so that ggml's RoPE on consecutive pairs rotates the same pairs.
fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let half = rows / heads / 2;
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((heads, 2, half, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

fn load(ckpt: &Checkpoint, t: &Planned) -> Result<Tensor> {
    let tensor = match &t.source {
        Source::Canonical { name, permute_heads } => {
            let x = ckpt.tensor_streamed(name)?;
            match permute_heads {
                Some(heads) => permute_rows(&x, *heads)?,
                None => x,
            }
        }
        Source::Stack(names) => {
            let parts = names.iter().map(|n| ckpt.tensor_streamed(n)).collect::<Result<Vec<_>>>()?;
            Tensor::stack(&parts, 0)?
        }
        Source::Fill(v) => Tensor::full(*v, t.shape.as_slice(), &Device::Cpu)?,
        Source::Values(v) => Tensor::from_slice(v, t.shape.as_slice(), &Device::Cpu)?,
    };
    if tensor.dims() != t.shape.as_slice() {
        return Err(Error::ShapeMismatch { name: t.name.clone(), expected: t.shape.clone(), found: tensor.dims().to_vec() });
    }
    Ok(tensor)
}

/// The tensor's bytes as the file stores them (little-endian).
fn tensor_bytes(ckpt: &Checkpoint, t: &Planned) -> Result<Vec<u8>> {
    let x = load(ckpt, t)?;
    Ok(match t.ty {
        TensorType::F32 => x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorType::F16 => x.to_dtype(DType::F16)?.flatten_all()?.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorType::Bf16 => x.to_dtype(DType::BF16)?.flatten_all()?.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorType::Q8_0 => QTensor::quantize(&x.to_dtype(DType::F32)?, GgmlDType::Q8_0)?.data()?.into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    /// Export a fixture; the file's metadata, and every tensor dequantised to f32 under its
    /// GGUF name.
    /// Each tensor of a file: its type and its values dequantised to f32.
    type FileTensors = HashMap<String, (TensorType, Tensor)>;

    fn export_and_read(name: &str, outtype: OutType) -> (Checkpoint, HashMap<String, Value>, FileTensors) {
        let ckpt = Checkpoint::open(fixture(name)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m.gguf");
        let summary = export(&ckpt, &out, &ExportOptions { outtype: Some(outtype), name: None }).unwrap();
        let mut file = std::fs::File::open(&out).unwrap();
        let content = Content::read(&mut file).unwrap();
        assert_eq!(summary.tensors, content.tensor_infos.len());
        assert_eq!(summary.bytes, std::fs::metadata(&out).unwrap().len());
        // Nothing but the file is left beside it (the temporary name was renamed).
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        let mut tensors = HashMap::new();
        for (tname, info) in &content.tensor_infos {
            let ty = match info.ggml_dtype {
                GgmlDType::F32 => TensorType::F32,
                GgmlDType::F16 => TensorType::F16,
                GgmlDType::BF16 => TensorType::Bf16,
                GgmlDType::Q8_0 => TensorType::Q8_0,
                other => panic!("{tname}: unexpected type {other:?}"),
            };
            let q = content.tensor(&mut file, tname, &Device::Cpu).unwrap();
            tensors.insert(tname.clone(), (ty, q.dequantize(&Device::Cpu).unwrap()));
        }
        (ckpt, content.metadata, tensors)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        a.to_dtype(DType::F32)
            .unwrap()
            .sub(&b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The inverse of the llama q/k permutation, written out: row `h·d + 2i + j` of the file is
    /// row `h·d + j·d/2 + i` of the checkpoint.
    fn unpermute(t: &Tensor, heads: usize) -> Tensor {
        let rows = t.dims()[0];
        let d = rows / heads;
        let index: Vec<u32> = (0..rows).map(|r| ((r / d) * d + (r % d % 2) * (d / 2) + (r % d) / 2) as u32).collect();
        let inverse = {
            let mut inv = vec![0u32; rows];
            for (file_row, &ckpt_row) in index.iter().enumerate() {
                inv[ckpt_row as usize] = file_row as u32;
            }
            inv
        };
        t.index_select(&Tensor::new(inverse.as_slice(), &Device::Cpu).unwrap(), 0).unwrap()
    }

    /// The checkpoint tensor a GGUF tensor holds (an expert stack rebuilt, a permutation undone),
    /// derived from the GGUF name by a table of its own.
    fn expected(ckpt: &Checkpoint, gguf: &str) -> Option<Tensor> {
        let cfg = &ckpt.config;
        let top = [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight")];
        if let Some((_, c)) = top.iter().find(|(g, _)| *g == gguf) {
            return Some(ckpt.tensor(c).unwrap());
        }
        if gguf == "output.weight" {
            let head = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
            return Some(ckpt.tensor(head).unwrap());
        }
        let rest = gguf.strip_prefix("blk.")?;
        let (l, part) = rest.split_once('.').unwrap();
        let p = format!("model.layers.{l}");
        let olmo2 = ckpt.architecture == Architecture::Olmo2;
        let table = [
            ("attn_norm.weight", "input_layernorm.weight"),
            ("attn_q.weight", "self_attn.q_proj.weight"),
            ("attn_k.weight", "self_attn.k_proj.weight"),
            ("attn_v.weight", "self_attn.v_proj.weight"),
            ("attn_q.bias", "self_attn.q_proj.bias"),
            ("attn_k.bias", "self_attn.k_proj.bias"),
            ("attn_v.bias", "self_attn.v_proj.bias"),
            ("attn_output.weight", "self_attn.o_proj.weight"),
            ("attn_q_norm.weight", "self_attn.q_norm.weight"),
            ("attn_k_norm.weight", "self_attn.k_norm.weight"),
            ("ffn_norm.weight", "post_attention_layernorm.weight"),
            ("post_attention_norm.weight", "post_attention_layernorm.weight"),
            ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
            ("ffn_gate.weight", "mlp.gate_proj.weight"),
            ("ffn_up.weight", "mlp.up_proj.weight"),
            ("ffn_down.weight", "mlp.down_proj.weight"),
            ("ffn_gate_inp.weight", "mlp.gate.weight"),
            ("ffn_gate_shexp.weight", "mlp.shared_expert.gate_proj.weight"),
            ("ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight"),
            ("ffn_down_shexp.weight", "mlp.shared_expert.down_proj.weight"),
            ("ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight"),
        ];
        if let Some(proj) = part.strip_suffix("_exps.weight").and_then(|s| s.strip_prefix("ffn_")) {
            let m = cfg.moe.as_ref().unwrap();
            let parts: Vec<Tensor> =
                (0..m.experts).map(|e| ckpt.tensor(&format!("{p}.mlp.experts.{e}.{proj}_proj.weight")).unwrap()).collect();
            return Some(Tensor::stack(&parts, 0).unwrap());
        }
        let (_, canonical) = table.iter().find(|(g, _)| *g == part)?;
        assert!(!(olmo2 && part == "ffn_norm.weight"), "OLMo2 has no pre-FFN norm");
        assert!(olmo2 || part != "post_attention_norm.weight", "only OLMo2 has post-attention norms");
        Some(ckpt.tensor(&format!("{p}.{canonical}")).unwrap())
    }

    /// Every tensor of the checkpoint is in the file, bit for bit in f32 (q/k rows in llama's
    /// order), with the type llama.cpp's converter gives it; nothing else is, except rope_freqs.
    fn check_f32(name: &str, expected_arch: &str) -> HashMap<String, Value> {
        let (ckpt, meta, tensors) = export_and_read(name, OutType::F32);
        assert_eq!(meta["general.architecture"].to_string().unwrap(), expected_arch);
        let permuted = expected_arch == "llama";
        for (gname, (ty, got)) in &tensors {
            assert_eq!(*ty, TensorType::F32, "{gname}");
            if gname == "rope_freqs.weight" {
                continue;
            }
            let mut want = expected(&ckpt, gname).unwrap_or_else(|| panic!("{name}: unexpected tensor {gname}"));
            if permuted && (gname.ends_with("attn_q.weight") || gname.ends_with("attn_q.bias")) {
                want = permute_rows(&want, ckpt.config.num_heads).unwrap();
                assert_eq!(max_abs_diff(&unpermute(got, ckpt.config.num_heads), &expected(&ckpt, gname).unwrap()), 0.0);
            }
            if permuted && (gname.ends_with("attn_k.weight") || gname.ends_with("attn_k.bias")) {
                want = permute_rows(&want, ckpt.config.num_kv_heads).unwrap();
                assert_eq!(max_abs_diff(&unpermute(got, ckpt.config.num_kv_heads), &expected(&ckpt, gname).unwrap()), 0.0);
            }
            assert_eq!(max_abs_diff(got, &want), 0.0, "{name}: {gname}");
        }
        // Every checkpoint tensor was written: the file has one tensor per canonical one, less
        // the experts (3 stacks per layer instead of 3 × E tensors).
        let cfg = &ckpt.config;
        let canonical = expected_tensors(cfg).len();
        let stacked = cfg.moe.as_ref().map_or(0, |m| cfg.num_layers * 3 * (m.experts - 1));
        let rope = usize::from(tensors.contains_key("rope_freqs.weight"));
        assert_eq!(tensors.len() + stacked, canonical + rope, "{name}: {:?}", tensors.keys().collect::<Vec<_>>());
        meta
    }

    fn u32_of(meta: &HashMap<String, Value>, key: &str) -> u32 {
        meta.get(key).unwrap_or_else(|| panic!("no {key}")).to_u32().unwrap()
    }

    #[test]
    fn llama_round_trips_with_permuted_qk_and_rope_factors() {
        let meta = check_f32("llama", "llama");
        let cfg = Checkpoint::open(fixture("llama")).unwrap().config;
        for (key, v) in [
            ("llama.block_count", cfg.num_layers),
            ("llama.embedding_length", cfg.hidden_size),
            ("llama.feed_forward_length", cfg.intermediate_size),
            ("llama.attention.head_count", cfg.num_heads),
            ("llama.attention.head_count_kv", cfg.num_kv_heads),
            ("llama.attention.key_length", cfg.head_dim),
            ("llama.rope.dimension_count", cfg.head_dim),
            ("llama.context_length", cfg.max_position_embeddings),
            ("llama.vocab_size", cfg.vocab_size),
            ("general.file_type", 0),
            ("general.alignment", ALIGNMENT),
        ] {
            assert_eq!(u32_of(&meta, key) as usize, v, "{key}");
        }
        assert_eq!(meta["llama.attention.layer_norm_rms_epsilon"].to_f32().unwrap(), cfg.rms_norm_eps as f32);
        assert_eq!(meta["llama.rope.freq_base"].to_f32().unwrap(), cfg.rope_theta as f32);
        // The tokenizer: btm's byte-level BPE as llama.cpp's `gpt2` vocabulary with GPT-2's split.
        assert_eq!(meta["tokenizer.ggml.model"].to_string().unwrap(), "gpt2");
        assert_eq!(meta["tokenizer.ggml.pre"].to_string().unwrap(), "gpt-2");
        let tokens = meta["tokenizer.ggml.tokens"].to_vec().unwrap();
        assert_eq!(tokens.len(), cfg.vocab_size);
        assert_eq!(tokens[0].to_string().unwrap(), "<s>");
        let types = meta["tokenizer.ggml.token_type"].to_vec().unwrap();
        assert_eq!(types[0].to_i32().unwrap(), 3, "<s> is a control token");
        assert_eq!(types[2].to_i32().unwrap(), 1);
        let merges = meta["tokenizer.ggml.merges"].to_vec().unwrap();
        assert!(!merges.is_empty() && merges.iter().all(|m| m.to_string().unwrap().split(' ').count() == 2));
        assert_eq!(u32_of(&meta, "tokenizer.ggml.bos_token_id"), 0);
        assert_eq!(u32_of(&meta, "tokenizer.ggml.eos_token_id"), 1);
        assert!(meta["tokenizer.ggml.add_bos_token"].to_bool().unwrap(), "btm's tokenizer prepends <s>");
        assert!(!meta["tokenizer.ggml.add_eos_token"].to_bool().unwrap());
    }

    #[test]
    fn llama3_rope_factors_follow_the_scaling_rule() {
        let cfg = Checkpoint::open(fixture("llama")).unwrap().config;
        let factors = llama3_rope_factors(&cfg).unwrap();
        let Some(RopeScaling::Llama3 { factor, original_max_position_embeddings: old, high_freq_factor, .. }) = cfg.rope_scaling else {
            panic!("the llama fixture has Llama-3 scaling")
        };
        assert_eq!(factors.len(), cfg.head_dim / 2);
        // The highest frequency (wavelength 2π) is never scaled; one slower than the original
        // context is scaled by the full factor.
        assert_eq!(factors[0], 1.0);
        let last_wavelen = 2.0 * std::f64::consts::PI * cfg.rope_theta.powf((cfg.head_dim - 2) as f64 / cfg.head_dim as f64);
        if last_wavelen > old as f64 {
            assert_eq!(factors[factors.len() - 1], factor as f32);
        } else if last_wavelen < old as f64 / high_freq_factor {
            assert_eq!(factors[factors.len() - 1], 1.0);
        }
        assert!(factors.iter().all(|&f| (1.0..=factor as f32).contains(&f)));
    }

    #[test]
    fn mixtral_experts_are_stacked() {
        let meta = check_f32("mixtral", "llama");
        let m = Checkpoint::open(fixture("mixtral")).unwrap().config.moe.unwrap();
        assert_eq!(u32_of(&meta, "llama.expert_count") as usize, m.experts);
        assert_eq!(u32_of(&meta, "llama.expert_used_count") as usize, m.top_k);
        assert_eq!(u32_of(&meta, "llama.feed_forward_length") as usize, m.expert_ffn);
        // transformers 5's fused expert layout gives the same file.
        check_f32("mixtral_fused", "llama");
    }

    #[test]
    fn qwen_and_olmo_families_round_trip() {
        let meta = check_f32("qwen2_moe", "qwen2moe");
        let m = Checkpoint::open(fixture("qwen2_moe")).unwrap().config.moe.unwrap();
        assert_eq!(u32_of(&meta, "qwen2moe.expert_feed_forward_length") as usize, m.expert_ffn);
        assert_eq!(u32_of(&meta, "qwen2moe.expert_shared_feed_forward_length") as usize, m.shared_expert.unwrap().ffn);
        check_f32("qwen2", "qwen2");
        check_f32("qwen3", "qwen3");
        check_f32("olmo2", "olmo2");
        check_f32("mistral", "llama");
    }

    #[test]
    fn q8_0_is_within_the_quantisation_error_and_16_bit_types_round_to_nearest() {
        let (ckpt, meta, tensors) = export_and_read("mixtral", OutType::Q8_0);
        assert_eq!(u32_of(&meta, "general.file_type"), 7);
        for (gname, (ty, got)) in &tensors {
            let Some(mut want) = expected(&ckpt, gname) else { continue };
            if gname.ends_with("attn_q.weight") {
                want = permute_rows(&want, ckpt.config.num_heads).unwrap();
            }
            if gname.ends_with("attn_k.weight") {
                want = permute_rows(&want, ckpt.config.num_kv_heads).unwrap();
            }
            let want = want.to_dtype(DType::F32).unwrap();
            let kept_f32 = want.rank() == 1 || gname.ends_with("_norm.weight") || gname.contains("ffn_gate_inp");
            // Rows that are not whole Q8_0 blocks fall back to f16, as in llama.cpp's converter.
            let whole_blocks = want.dims().last().unwrap() % 32 == 0;
            let want_ty = match (kept_f32, whole_blocks) {
                (true, _) => TensorType::F32,
                (false, true) => TensorType::Q8_0,
                (false, false) => TensorType::F16,
            };
            assert_eq!(*ty, want_ty, "{gname}");
            // Q8_0: each block of 32 is scaled by d = max|x| / 127 and rounded, so no value is
            // off by more than half a step, plus the f16 rounding of d (relative 2^-11) × 127.
            // f16: relative 2^-11.
            let amax: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            let bound = match want_ty {
                TensorType::Q8_0 => amax / 127.0 * (0.5 + 127.0 / 2048.0) + 1e-7,
                TensorType::F16 => amax / 2048.0,
                _ => 0.0,
            };
            assert!(max_abs_diff(got, &want) <= bound, "{gname}: {} > {bound}", max_abs_diff(got, &want));
        }
        for (outtype, dtype) in [(OutType::F16, DType::F16), (OutType::Bf16, DType::BF16)] {
            let (ckpt, _, tensors) = export_and_read("qwen3", outtype);
            for (gname, (ty, got)) in &tensors {
                let want = expected(&ckpt, gname).unwrap();
                if *ty == TensorType::F32 {
                    assert_eq!(max_abs_diff(got, &want), 0.0, "{gname}");
                } else {
                    // Exactly the checkpoint's values rounded to nearest in the 16-bit type.
                    assert_eq!(*ty, outtype.tensor_type());
                    assert_eq!(max_abs_diff(got, &want.to_dtype(dtype).unwrap()), 0.0, "{gname}");
                }
            }
        }
    }

    /// Without `--outtype`, llama.cpp's `auto`: f16 for a float32 checkpoint, bf16 for a
    /// bfloat16 one (here a sharded one: every shard is read), whose bf16 matrices are copied
    /// bit for bit.
    #[test]
    fn the_default_type_follows_the_checkpoint_as_llama_cpp_does() {
        let tmp = tempfile::tempdir().unwrap();
        let f32_ckpt = Checkpoint::open(fixture("qwen3")).unwrap();
        let bf16_dir = tmp.path().join("bf16");
        let opts = crate::checkpoint::WriteOptions { dtype: DType::BF16, max_shard_bytes: 20_000, overwrite: false };
        crate::checkpoint::rewrite(&f32_ckpt, &bf16_dir, &opts, None).unwrap();
        assert!(bf16_dir.join(crate::checkpoint::INDEX_FILE).exists(), "the bf16 copy is sharded");
        for (dir, want) in [(fixture("qwen3"), OutType::F16), (bf16_dir, OutType::Bf16)] {
            let ckpt = Checkpoint::open(&dir).unwrap();
            let out = tmp.path().join("m.gguf");
            let summary = export(&ckpt, &out, &ExportOptions::default()).unwrap();
            assert_eq!(summary.outtype, want);
            let mut file = std::fs::File::open(&out).unwrap();
            let content = Content::read(&mut file).unwrap();
            assert_eq!(content.metadata["general.file_type"].to_u32().unwrap(), want.file_type());
            assert_eq!(content.metadata["general.name"].to_string().unwrap(), dir.file_name().unwrap().to_str().unwrap());
            for (name, info) in &content.tensor_infos {
                let got = content.tensor(&mut file, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
                let source = expected(&ckpt, name).unwrap();
                if info.ggml_dtype == GgmlDType::BF16 {
                    assert_eq!(source.dtype(), DType::BF16);
                }
                assert_eq!(
                    max_abs_diff(&got, &source.to_dtype(DType::F32).unwrap().to_dtype(want_dtype(info.ggml_dtype)).unwrap()),
                    0.0,
                    "{name}"
                );
            }
        }
    }

    fn want_dtype(t: GgmlDType) -> DType {
        match t {
            GgmlDType::F16 => DType::F16,
            GgmlDType::BF16 => DType::BF16,
            _ => DType::F32,
        }
    }

    #[test]
    fn refuses_what_llama_cpp_cannot_compute_by_name() {
        let cases = [
            ("flex_olmo", "FlexOlmoForCausalLM: llama.cpp has no architecture"),
            ("qwen3_moe", "dense layers [1]"),
            ("qwen2_moe_normtopk", "never renormalises"),
            ("olmoe", "grouped-query attention"),
        ];
        for (name, why) in cases {
            let ckpt = Checkpoint::open(fixture(name)).unwrap();
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("m.gguf");
            let err = export(&ckpt, &out, &ExportOptions::default()).unwrap_err().to_string();
            assert!(err.contains(why), "{name}: {err}");
            assert!(!out.exists() && std::fs::read_dir(tmp.path()).unwrap().count() == 0, "{name}: something was written");
        }
    }

    #[test]
    fn pre_tokenizers_llama_cpp_implements_are_named() {
        let gpt2 = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        assert_eq!(pre_tokenizer_name(&gpt2).unwrap(), "gpt-2");
        let split = |regex: &str| {
            serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
        };
        assert_eq!(pre_tokenizer_name(&split(QWEN2_REGEX)).unwrap(), "qwen2");
        assert_eq!(pre_tokenizer_name(&split(LLAMA3_REGEX)).unwrap(), "llama-bpe");
        // A prefix space, or a split llama.cpp does not know, is refused.
        let prefixed = serde_json::json!({"type": "ByteLevel", "add_prefix_space": true, "use_regex": true});
        assert!(pre_tokenizer_name(&prefixed).unwrap_err().to_string().contains("pre-tokenizer"));
        assert!(pre_tokenizer_name(&split(r"\s+|\w+")).is_err());
        assert!(pre_tokenizer_name(&serde_json::json!({"type": "Whitespace"})).is_err());
    }
}
