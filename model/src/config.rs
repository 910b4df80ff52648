//! The model's shape: [`ModelConfig`] (dense or MoE) and its translation to and from
//! Hugging Face `config.json` for the Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE and
//! Qwen3-MoE families.

use crate::error::{Error, Result};
use btm_kernels::Routing;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Largest width btm reads for any one dimension of a model (vocabulary, hidden, FFN, the
/// attention projections' heads × head_dim): 16 Mi, dozens of times today's largest.
pub const MAX_DIM: usize = 1 << 24;
/// Most transformer layers btm reads (today's largest models have a few hundred).
pub const MAX_LAYERS: usize = 1 << 14;
/// Most experts per MoE layer btm reads (today's largest have a few hundred).
pub const MAX_EXPERTS: usize = 1 << 16;
/// Most tensors a model may have: bounds the tensor list every reader and writer builds.
pub const MAX_TENSORS: usize = 1 << 20;

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Llama 3.1's piecewise frequency scaling: long wavelengths are slowed by `factor`, short
    /// ones kept, those in between interpolated.
    Llama3 {
        /// Divisor of the frequencies whose wavelength exceeds `original / low_freq_factor`.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` positions are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` positions are left unchanged.
        high_freq_factor: f64,
        /// Context length the model was pretrained with, before the extension (`original`).
        original_max_position_embeddings: usize,
    },
}

/// An always-on expert beside the routed ones (Qwen2-MoE, DeepSeek-MoE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedExpertConfig {
    /// Width of the shared expert's SwiGLU.
    pub ffn: usize,
    /// Whether its output is multiplied by `sigmoid(x · w_gate)` (Qwen2-MoE).
    pub gated: bool,
}

/// The Mixture-of-Experts part of a model: the FFN of every MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Routed experts E per MoE layer.
    pub experts: usize,
    /// Experts k each token is routed to (1..=E; `num_experts_per_tok`).
    pub top_k: usize,
    /// The order of top-k and softmax in the router (Mixtral's, or Qwen2-MoE's `norm_topk_prob`).
    pub routing: Routing,
    /// Width of each routed expert's SwiGLU.
    pub expert_ffn: usize,
    /// The always-on expert, if the model has one.
    pub shared_expert: Option<SharedExpertConfig>,
    /// Layers that keep a dense FFN of `intermediate_size` (Qwen2-MoE's `mlp_only_layers`).
    #[serde(default)]
    pub dense_layers: Vec<usize>,
}

/// A decoder-only Llama-family transformer, dense or MoE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Rows V of the token embedding and the LM head.
    pub vocab_size: usize,
    /// Width H of the residual stream.
    pub hidden_size: usize,
    /// Number of decoder layers (`num_hidden_layers`).
    pub num_layers: usize,
    /// Query heads per layer (`num_attention_heads`).
    pub num_heads: usize,
    /// Key/value heads per layer; divides `num_heads` (grouped-query attention when smaller).
    pub num_kv_heads: usize,
    /// Width D of one attention head (usually H / `num_heads`); must be even for RoPE.
    pub head_dim: usize,
    /// Width of the dense SwiGLU FFN (also the dense layers of an MoE).
    pub intermediate_size: usize,
    /// Longest sequence, in tokens, the model accepts (default 2048 when `config.json` omits it).
    pub max_position_embeddings: usize,
    /// RoPE base θ (default 10000).
    pub rope_theta: f64,
    /// RoPE frequency scaling; `None` = plain RoPE.
    pub rope_scaling: Option<RopeScaling>,
    /// ε added to the mean square in RMSNorm (1e-6 when `config.json` omits it).
    pub rms_norm_eps: f64,
    /// The LM head reuses the embedding matrix (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama with `attention_bias: true`).
    pub o_bias: bool,
    /// Mistral's sliding-window attention: a token attends to at most this many positions.
    pub sliding_window: Option<usize>,
    /// Qwen3's per-head RMSNorm of queries and keys (`self_attn.{q,k}_norm`, width `head_dim`),
    /// applied before RoPE.
    #[serde(default)]
    pub qk_norm: bool,
    /// OLMo's q/k norms: each RMSNorm spans the whole projection (all heads, width
    /// `heads × head_dim`) instead of one head; only with `qk_norm`.
    #[serde(default)]
    pub qk_norm_full: bool,
    /// OLMo2's post-norm layers: no norm before attention or the FFN; instead each sublayer's
    /// output is normalised (`post_attention_layernorm`, `post_feedforward_layernorm`) before
    /// the residual add.
    #[serde(default)]
    pub post_norms: bool,
    /// OLMoE's `clip_qkv`: queries, keys and values clamped to [-c, c] after the q/k norms.
    #[serde(default)]
    pub clip_qkv: Option<f64>,
    /// Beginning-of-sequence token id, if `config.json` gives one (the first of a list).
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id, if `config.json` gives one (the first of a list).
    pub eos_token_id: Option<u32>,
    /// The MoE FFN settings; `None` = a dense model.
    pub moe: Option<MoeConfig>,
}

/// The Hugging Face architectures btm reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM`: dense, optional attention biases (`attention_bias`).
    Llama,
    /// `MistralForCausalLM`: dense, optional sliding-window attention.
    Mistral,
    /// `Qwen2ForCausalLM`: dense with q/k/v biases.
    Qwen2,
    /// `MixtralForCausalLM`: MoE with `topk_then_softmax` routing, no shared expert.
    Mixtral,
    /// `Qwen2MoeForCausalLM`: MoE with q/k/v biases, a gated shared expert and optional dense layers.
    Qwen2Moe,
    /// `Qwen3ForCausalLM`: dense with per-head q/k RMSNorms, optional attention biases.
    Qwen3,
    /// `Qwen3MoeForCausalLM`: Qwen3's attention, MoE without a shared expert, optional dense layers.
    Qwen3Moe,
    /// `Olmo2ForCausalLM`: dense, post-sublayer norms, q/k norms over the full projection width.
    Olmo2,
    /// `OlmoeForCausalLM`: pre-norm MoE (every layer) with full-width q/k norms, optional `clip_qkv`.
    Olmoe,
    /// `FlexOlmoForCausalLM`: OLMo2's layers with an MoE (every layer) for the FFN.
    FlexOlmo,
}

impl Architecture {
    /// Every architecture, in the order [`Self::detect`] tries them.
    pub const ALL: [Architecture; 10] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
        Architecture::Mixtral,
        Architecture::Qwen2Moe,
        Architecture::Qwen3,
        Architecture::Qwen3Moe,
        Architecture::Olmo2,
        Architecture::Olmoe,
        Architecture::FlexOlmo,
    ];

    /// The class name in `config.json`'s `architectures`, e.g. `LlamaForCausalLM`.
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Mixtral => "MixtralForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
            Architecture::Olmo2 => "Olmo2ForCausalLM",
            Architecture::Olmoe => "OlmoeForCausalLM",
            Architecture::FlexOlmo => "FlexOlmoForCausalLM",
        }
    }

    /// The `model_type` in `config.json`, e.g. `qwen2_moe`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Mixtral => "mixtral",
            Architecture::Qwen2Moe => "qwen2_moe",
            Architecture::Qwen3 => "qwen3",
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Olmo2 => "olmo2",
            Architecture::Olmoe => "olmoe",
            Architecture::FlexOlmo => "flex_olmo",
        }
    }

    /// Identify the architecture from `architectures[0]`, falling back to `model_type`.
    pub fn detect(cfg: &Value) -> Result<Self> {
        let class = cfg.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str);
        let model_type = cfg.get("model_type").and_then(Value::as_str);
        for arch in Self::ALL {
            if class == Some(arch.class_name()) || (class.is_none() && model_type == Some(arch.model_type())) {
                return Ok(arch);
            }
        }
        let name = class.or(model_type).unwrap_or("<none given>").to_string();
        Err(Error::UnknownArchitecture(name))
    }
}

impl ModelConfig {
    /// A dense Llama-style model with the usual defaults (RoPE θ = 10000, RMSNorm ε = 1e-5,
    /// untied embeddings, no biases, `<s>` = 0 and `</s>` = 1), for seeds trained from scratch,
    /// benchmarks and tests. Change fields after construction for anything else.
    pub fn llama(vocab_size: usize, hidden_size: usize, num_layers: usize, num_heads: usize, num_kv_heads: usize, ffn: usize) -> Self {
        Self {
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim: hidden_size / num_heads.max(1),
            intermediate_size: ffn,
            max_position_embeddings: 2048,
            rope_theta: 10000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            sliding_window: None,
            qk_norm: false,
            qk_norm_full: false,
            post_norms: false,
            clip_qkv: None,
            bos_token_id: Some(0),
            eos_token_id: Some(1),
            moe: None,
        }
    }

    /// Whether layer `layer` (0-based) has an MoE FFN: false for a dense model and for the
    /// MoE's `dense_layers`.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| !m.dense_layers.contains(&layer))
    }

    /// Total parameter count.
    pub fn num_parameters(&self) -> usize {
        crate::weights::expected_tensors(self).iter().map(|t| t.shape.iter().product::<usize>()).sum()
    }

    /// Parameters one token passes through (the MoE's routed experts counted k times, not E).
    pub fn num_active_parameters(&self) -> usize {
        let total = self.num_parameters();
        match &self.moe {
            None => total,
            Some(m) => {
                let per_expert = 3 * self.hidden_size * m.expert_ffn;
                let moe_layers = (0..self.num_layers).filter(|&l| self.is_moe_layer(l)).count();
                total - moe_layers * (m.experts - m.top_k) * per_expert
            }
        }
    }

    /// The bounds of [`MAX_DIM`], [`MAX_LAYERS`], [`MAX_EXPERTS`] and [`MAX_TENSORS`], and a
    /// parameter count that fits 64 bits: a mutated `config.json` ends here, in a named error,
    /// instead of in a tensor list or shape product that does not fit memory or a `usize`.
    fn check_bounds(&self) -> Result<()> {
        let over = |name: &str, v: usize, limit: usize| Err(Error::InvalidConfig(format!("{name} = {v} exceeds btm's limit of {limit}")));
        let moe = self.moe.as_ref();
        let shared = moe.and_then(|m| m.shared_expert.as_ref()).map_or(0, |s| s.ffn);
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads × head_dim", self.num_heads.saturating_mul(self.head_dim)),
            ("num_key_value_heads × head_dim", self.num_kv_heads.saturating_mul(self.head_dim)),
            ("moe_intermediate_size", moe.map_or(0, |m| m.expert_ffn)),
            ("shared_expert_intermediate_size", shared),
        ] {
            if v > MAX_DIM {
                return over(name, v, MAX_DIM);
            }
        }
        if self.num_layers > MAX_LAYERS {
            return over("num_hidden_layers", self.num_layers, MAX_LAYERS);
        }
        let experts = moe.map_or(0, |m| m.experts);
        if experts > MAX_EXPERTS {
            return over("the number of experts", experts, MAX_EXPERTS);
        }
        // At most 16 tensors per layer (18 with q/k norms) besides 3 per expert, 3 outside the
        // layers. Within the bounds above this is below 2^33: no overflow in u64.
        let per_layer = if self.qk_norm { 18 } else { 16 };
        let tensors = self.num_layers as u64 * (per_layer + 3 * experts as u64) + 3;
        if tensors > MAX_TENSORS as u64 {
            return over("the number of tensors", tensors as usize, MAX_TENSORS);
        }
        let params = crate::weights::expected_tensors(self)
            .iter()
            .try_fold(0u64, |sum, t| t.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64))?.checked_add(sum));
        if params.is_none_or(|p| usize::try_from(p).is_err()) {
            return Err(Error::InvalidConfig("the model has more parameters than 64 bits count".into()));
        }
        Ok(())
    }

    /// Check internal consistency and btm's bounds ([`MAX_DIM`] and the rest); every reader and
    /// builder calls this.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.qk_norm_full && !self.qk_norm {
            return bad("qk_norm_full needs qk_norm".into());
        }
        if let Some(c) = self.clip_qkv {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("clip_qkv {c} must be positive and finite"));
            }
        }
        if let Some(m) = &self.moe {
            if m.experts == 0 || m.expert_ffn == 0 {
                return bad("an MoE needs at least one expert of positive width".into());
            }
            if m.top_k == 0 || m.top_k > m.experts {
                return bad(format!(
                    "num_experts_per_tok (top-k) = {} must be between 1 and the number of experts ({})",
                    m.top_k, m.experts
                ));
            }
            if let Some(l) = m.dense_layers.iter().find(|&&l| l >= self.num_layers) {
                return bad(format!("dense layer {l} is out of range (the model has {} layers)", self.num_layers));
            }
        }
        self.check_bounds()
    }

    /// Parse a Hugging Face `config.json`.
    pub fn from_hf(cfg: &Value) -> Result<(Self, Architecture)> {
        let arch = Architecture::detect(cfg)?;
        let hf = HfFields(cfg);
        let hidden_size = hf.need("hidden_size")?;
        let num_heads = hf.need("num_attention_heads")?;
        let num_kv_heads = hf.usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads == 0 {
            return Err(Error::InvalidConfig("num_attention_heads must be positive".into()));
        }
        // Qwen3's config class defaults head_dim to 128, not hidden / heads.
        let default_head_dim = if arch == Architecture::Qwen3 { 128 } else { hidden_size / num_heads };
        let head_dim = hf.usize("head_dim")?.unwrap_or(default_head_dim);
        let (rope_theta, rope_scaling) = rope_from_hf(cfg)?;
        let (qkv_bias, o_bias, sliding_window) = attention_from_hf(arch, hf)?;
        let intermediate_size = hf.need("intermediate_size")?;
        let moe = match arch {
            Architecture::Mixtral => Some(mixtral_moe_from_hf(hf, intermediate_size)?),
            Architecture::Qwen2Moe => Some(qwen_moe_from_hf(hf, true)?),
            Architecture::Qwen3Moe => Some(qwen_moe_from_hf(hf, false)?),
            Architecture::Olmoe | Architecture::FlexOlmo => Some(olmo_moe_from_hf(hf, intermediate_size)?),
            Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Olmo2 => None,
        };
        let olmo = matches!(arch, Architecture::Olmo2 | Architecture::Olmoe | Architecture::FlexOlmo);
        // OLMoE's q norm is as wide as the residual stream (transformers sizes it hidden_size),
        // which is the projection's width only when head_dim is hidden / heads.
        if arch == Architecture::Olmoe && num_heads * head_dim != hidden_size {
            return Err(Error::Unsupported(format!(
                "OlmoeForCausalLM with head_dim {head_dim} != hidden_size / num_attention_heads (its q_norm is hidden_size wide)"
            )));
        }
        let clip_qkv = if arch == Architecture::Olmoe { f64_field(cfg, "clip_qkv")? } else { None };
        // The OLMo config classes default ε to 1e-5 (FlexOlmo to 1e-6, as the others).
        let default_eps = if matches!(arch, Architecture::Olmo2 | Architecture::Olmoe) { 1e-5 } else { 1e-6 };
        let config = ModelConfig {
            vocab_size: hf.need("vocab_size")?,
            hidden_size,
            num_layers: hf.need("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            max_position_embeddings: hf.usize("max_position_embeddings")?.unwrap_or(2048),
            rope_theta,
            rope_scaling,
            rms_norm_eps: f64_field(cfg, "rms_norm_eps")?.unwrap_or(default_eps),
            tie_word_embeddings: hf.bool("tie_word_embeddings").unwrap_or(false),
            qkv_bias,
            o_bias,
            sliding_window,
            qk_norm: olmo || matches!(arch, Architecture::Qwen3 | Architecture::Qwen3Moe),
            qk_norm_full: olmo,
            post_norms: matches!(arch, Architecture::Olmo2 | Architecture::FlexOlmo),
            clip_qkv,
            bos_token_id: hf.token_id("bos_token_id"),
            eos_token_id: hf.token_id("eos_token_id"),
            moe,
        };
        config.validate()?;
        Ok((config, arch))
    }

    /// The architecture btm writes this model as: with q/k norms, Qwen3 (dense) or Qwen3-MoE;
    /// otherwise dense → Llama (Mistral with sliding-window attention); `topk_then_softmax`
    /// MoE → Mixtral (or Qwen2-MoE with `norm_topk_prob: true` when Mixtral cannot hold it:
    /// attention biases, a shared expert, dense layers); `softmax_then_topk` MoE → Qwen2-MoE
    /// with `norm_topk_prob: false`.
    ///
    /// OLMo layouts come first: post-norms → OLMo2 (dense) or FlexOlmo (MoE); full-width q/k
    /// norms with pre-norms → OLMoE (a dense such model has no class, and [`Self::to_hf`]
    /// refuses it).
    pub fn output_architecture(&self) -> Architecture {
        if self.post_norms {
            return if self.moe.is_some() { Architecture::FlexOlmo } else { Architecture::Olmo2 };
        }
        if self.qk_norm_full {
            return Architecture::Olmoe;
        }
        if self.qk_norm {
            return if self.moe.is_some() { Architecture::Qwen3Moe } else { Architecture::Qwen3 };
        }
        match &self.moe {
            None if self.sliding_window.is_some() => Architecture::Mistral,
            None => Architecture::Llama,
            Some(m) => {
                let mixtral_fits = m.routing == Routing::TopkThenSoftmax
                    && !self.qkv_bias
                    && !self.o_bias
                    && m.shared_expert.is_none()
                    && m.dense_layers.is_empty();
                if mixtral_fits {
                    Architecture::Mixtral
                } else {
                    Architecture::Qwen2Moe
                }
            }
        }
    }

    /// Width of the shared expert as written to disk: Qwen2-MoE always has one, so a model
    /// without one gets a width-1 placeholder whose output is exactly zero.
    pub fn written_shared_ffn(&self) -> Option<usize> {
        match (self.output_architecture(), &self.moe) {
            (Architecture::Qwen2Moe, Some(m)) => Some(m.shared_expert.as_ref().map_or(1, |s| s.ffn)),
            _ => None,
        }
    }

    /// A Hugging Face `config.json` for [`Self::output_architecture`].
    pub fn to_hf(&self) -> Result<Value> {
        let arch = self.output_architecture();
        if arch == Architecture::Qwen2Moe && self.o_bias {
            return Err(Error::Unsupported("an MoE with an output-projection bias has no Hugging Face layout btm can write".into()));
        }
        let mut c = self.hf_common_fields(arch);
        let obj = c.as_object_mut().expect("object");
        // What the architecture cannot say itself, for btm's reader (and the curious).
        let mut btm = Map::new();
        match (arch, &self.moe) {
            (Architecture::Llama, _) => self.llama_hf_fields(obj, &mut btm),
            (Architecture::Mistral, None) => self.mistral_hf_fields(obj)?,
            (Architecture::Mixtral, Some(m)) => self.mixtral_hf_fields(m, obj),
            (Architecture::Qwen2Moe, Some(m)) => self.qwen2_moe_hf_fields(m, obj, &mut btm)?,
            (Architecture::Qwen3, None) => self.qwen3_hf_fields(obj, &mut btm)?,
            (Architecture::Qwen3Moe, Some(m)) => {
                self.qwen3_hf_fields(obj, &mut btm)?;
                self.qwen3_moe_hf_fields(m, obj)?;
            }
            (Architecture::Olmo2, None) => self.olmo_hf_fields(arch, obj, &mut btm)?,
            (Architecture::Olmoe | Architecture::FlexOlmo, Some(m)) => {
                self.olmo_hf_fields(arch, obj, &mut btm)?;
                self.olmo_moe_hf_fields(arch, m, obj)?;
            }
            (Architecture::Olmoe, None) => {
                return Err(Error::Unsupported(
                    "a dense model with full-width q/k norms and pre-norms (OLMoE's attention has no dense class)".into(),
                ))
            }
            _ => unreachable!("output_architecture matches the MoE config"),
        }
        if let Some(m) = &self.moe {
            btm.insert("routing".into(), json!(m.routing.as_str()));
        }
        if !btm.is_empty() {
            obj.insert("btm".into(), Value::Object(btm));
        }
        Ok(c)
    }

    /// The `config.json` fields every architecture shares: shape, norms, RoPE, special tokens.
    fn hf_common_fields(&self, arch: Architecture) -> Value {
        let mut c = json!({
            "architectures": [arch.class_name()],
            "model_type": arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
            "torch_dtype": "float32",
        });
        let obj = c.as_object_mut().expect("object");
        if let Some(id) = self.bos_token_id {
            obj.insert("bos_token_id".into(), json!(id));
        }
        if let Some(id) = self.eos_token_id {
            obj.insert("eos_token_id".into(), json!(id));
        }
        // Legacy RoPE keys: both transformers 4.x and 5.x (which converts them to
        // `rope_parameters`), vLLM and llama.cpp's converter read them.
        if let Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) =
            &self.rope_scaling
        {
            obj.insert(
                "rope_scaling".into(),
                json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                       "high_freq_factor": high_freq_factor,
                       "original_max_position_embeddings": original_max_position_embeddings}),
            );
        }
        c
    }

    /// Llama's attention and FFN bias switches.
    fn llama_hf_fields(&self, obj: &mut Map<String, Value>, btm: &mut Map<String, Value>) {
        if self.qkv_bias != self.o_bias {
            // Llama's `attention_bias` covers q, k, v and o alike; a zero o bias is exact.
            btm.insert("o_bias".into(), json!("zero"));
        }
        obj.insert("attention_bias".into(), json!(self.qkv_bias || self.o_bias));
        obj.insert("mlp_bias".into(), json!(false));
    }

    /// Mistral's sliding window; it has no attention biases.
    fn mistral_hf_fields(&self, obj: &mut Map<String, Value>) -> Result<()> {
        if self.qkv_bias || self.o_bias {
            return Err(Error::Unsupported("attention biases together with sliding-window attention".into()));
        }
        obj.insert("sliding_window".into(), json!(self.sliding_window));
        Ok(())
    }

    /// Mixtral's experts; its `intermediate_size` is the experts' width.
    fn mixtral_hf_fields(&self, m: &MoeConfig, obj: &mut Map<String, Value>) {
        obj.insert("num_local_experts".into(), json!(m.experts));
        obj.insert("num_experts_per_tok".into(), json!(m.top_k));
        obj.insert("intermediate_size".into(), json!(m.expert_ffn));
        obj.insert("sliding_window".into(), json!(self.sliding_window));
        obj.insert("router_aux_loss_coef".into(), json!(0.0));
        obj.insert("output_router_logits".into(), json!(false));
    }

    /// Qwen2-MoE's experts, shared expert and dense layers, with notes in `btm` for the shared
    /// expert and q/k/v biases it always has but this model may not.
    fn qwen2_moe_hf_fields(&self, m: &MoeConfig, obj: &mut Map<String, Value>, btm: &mut Map<String, Value>) -> Result<()> {
        if self.sliding_window.is_some() {
            return Err(Error::Unsupported("sliding-window attention in a Qwen2-MoE".into()));
        }
        obj.insert("num_experts".into(), json!(m.experts));
        obj.insert("num_experts_per_tok".into(), json!(m.top_k));
        obj.insert("moe_intermediate_size".into(), json!(m.expert_ffn));
        obj.insert("shared_expert_intermediate_size".into(), json!(self.written_shared_ffn()));
        obj.insert("norm_topk_prob".into(), json!(m.routing == Routing::TopkThenSoftmax));
        obj.insert("decoder_sparse_step".into(), json!(1));
        obj.insert("mlp_only_layers".into(), json!(m.dense_layers));
        obj.insert("use_sliding_window".into(), json!(false));
        obj.insert("qkv_bias".into(), json!(true));
        obj.insert("router_aux_loss_coef".into(), json!(0.0));
        obj.insert("output_router_logits".into(), json!(false));
        match &m.shared_expert {
            None => {
                btm.insert("shared_expert".into(), json!("none"));
                btm.insert(
                    "note".into(),
                    json!("Qwen2-MoE always has a shared expert; this one's down_proj is zero, so its output is exactly zero"),
                );
            }
            Some(s) if !s.gated => {
                btm.insert("shared_expert".into(), json!("ungated"));
                btm.insert(
                    "note".into(),
                    json!("the shared expert is ungated: its gate weight is zero (sigmoid = 1/2) and its down_proj is doubled"),
                );
            }
            Some(_) => {}
        }
        if !self.qkv_bias {
            btm.insert("qkv_bias".into(), json!("zero"));
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Qwen3's attention: one `attention_bias` for q, k, v and o (as Llama's), no sliding window.
    fn qwen3_hf_fields(&self, obj: &mut Map<String, Value>, btm: &mut Map<String, Value>) -> Result<()> {
        if self.sliding_window.is_some() {
            return Err(Error::Unsupported("sliding-window attention in a Qwen3 model".into()));
        }
        self.llama_hf_fields(obj, btm);
        obj.remove("mlp_bias");
        obj.insert("use_sliding_window".into(), json!(false));
        obj.insert("sliding_window".into(), Value::Null);
        Ok(())
    }

    /// Qwen3-MoE's experts and dense layers; it has no shared expert.
    fn qwen3_moe_hf_fields(&self, m: &MoeConfig, obj: &mut Map<String, Value>) -> Result<()> {
        if m.shared_expert.is_some() {
            return Err(Error::Unsupported("a shared expert in a Qwen3-MoE (Qwen3MoeForCausalLM has none)".into()));
        }
        obj.insert("num_experts".into(), json!(m.experts));
        obj.insert("num_experts_per_tok".into(), json!(m.top_k));
        obj.insert("moe_intermediate_size".into(), json!(m.expert_ffn));
        obj.insert("norm_topk_prob".into(), json!(m.routing == Routing::TopkThenSoftmax));
        obj.insert("decoder_sparse_step".into(), json!(1));
        obj.insert("mlp_only_layers".into(), json!(m.dense_layers));
        obj.insert("router_aux_loss_coef".into(), json!(0.0));
        obj.insert("output_router_logits".into(), json!(false));
        Ok(())
    }
}

impl ModelConfig {
    /// The OLMo families' attention: full-width q/k norms, one `attention_bias` for q, k, v
    /// and o (as Llama's), no sliding window; `clip_qkv` only in OLMoE, post-norms everywhere
    /// but OLMoE.
    fn olmo_hf_fields(&self, arch: Architecture, obj: &mut Map<String, Value>, btm: &mut Map<String, Value>) -> Result<()> {
        let name = arch.class_name();
        if !(self.qk_norm && self.qk_norm_full) {
            return Err(Error::Unsupported(format!("{name} without full-width q/k norms")));
        }
        if self.sliding_window.is_some() {
            return Err(Error::Unsupported(format!("sliding-window attention in a model written as {name}")));
        }
        if arch == Architecture::Olmoe {
            if self.num_heads * self.head_dim != self.hidden_size {
                return Err(Error::Unsupported(format!(
                    "{name} with num_attention_heads × head_dim != hidden_size (its q_norm is hidden_size wide)"
                )));
            }
            obj.insert("clip_qkv".into(), json!(self.clip_qkv));
        } else if self.clip_qkv.is_some() {
            return Err(Error::Unsupported(format!("clip_qkv in a model written as {name}")));
        }
        self.llama_hf_fields(obj, btm);
        obj.remove("mlp_bias");
        Ok(())
    }

    /// OLMoE's and FlexOlmo's MoE: every layer routed, experts as wide as `intermediate_size`,
    /// no shared expert.
    fn olmo_moe_hf_fields(&self, arch: Architecture, m: &MoeConfig, obj: &mut Map<String, Value>) -> Result<()> {
        let name = arch.class_name();
        if m.shared_expert.is_some() {
            return Err(Error::Unsupported(format!("a shared expert in a model written as {name} (it has none)")));
        }
        if !m.dense_layers.is_empty() {
            return Err(Error::Unsupported(format!("dense layers among MoE ones in a model written as {name}")));
        }
        obj.insert("num_experts".into(), json!(m.experts));
        obj.insert("num_experts_per_tok".into(), json!(m.top_k));
        obj.insert("intermediate_size".into(), json!(m.expert_ffn));
        obj.insert("norm_topk_prob".into(), json!(m.routing == Routing::TopkThenSoftmax));
        obj.insert("router_aux_loss_coef".into(), json!(0.0));
        obj.insert("output_router_logits".into(), json!(false));
        Ok(())
    }
}

/// Typed reads of a `config.json`'s top-level fields, with the errors [`ModelConfig::from_hf`]
/// reports.
#[derive(Clone, Copy)]
struct HfFields<'a>(&'a Value);

impl HfFields<'_> {
    /// A non-negative integer; `None` when absent or null.
    fn usize(self, key: &str) -> Result<Option<usize>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| Error::InvalidConfig(format!("config.json: `{key}` must be a non-negative integer, got {v}"))),
        }
    }

    /// A non-negative integer that must be present.
    fn need(self, key: &str) -> Result<usize> {
        self.usize(key)?.ok_or_else(|| Error::InvalidConfig(format!("config.json: missing `{key}`")))
    }

    /// A boolean; `None` when absent or not a boolean.
    fn bool(self, key: &str) -> Option<bool> {
        self.0.get(key).and_then(Value::as_bool)
    }

    /// A token id, given as a number or as a list whose first element counts.
    fn token_id(self, key: &str) -> Option<u32> {
        match self.0.get(key) {
            Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|x| x as u32),
            _ => None,
        }
    }
}

/// A number in the object `v` (the config itself or its RoPE parameters); `None` when absent or null.
fn f64_field(v: &Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or_else(|| Error::InvalidConfig(format!("config.json: `{key}` must be a number, got {x}"))),
    }
}

/// RoPE θ and scaling. transformers 5 writes `rope_parameters`; older files a top-level
/// `rope_theta` plus an optional `rope_scaling`.
fn rope_from_hf(cfg: &Value) -> Result<(f64, Option<RopeScaling>)> {
    let rope = match cfg.get("rope_parameters") {
        Some(v @ Value::Object(_)) => v.clone(),
        _ => {
            let mut m = match cfg.get("rope_scaling") {
                Some(Value::Object(m)) => m.clone(),
                _ => Map::new(),
            };
            if let Some(t) = cfg.get("rope_theta") {
                m.insert("rope_theta".into(), t.clone());
            }
            Value::Object(m)
        }
    };
    let rope_theta = f64_field(&rope, "rope_theta")?.unwrap_or(10000.0);
    let rope_type = rope.get("rope_type").or_else(|| rope.get("type")).and_then(Value::as_str).unwrap_or("default");
    let rope_scaling = match rope_type {
        "default" => None,
        "llama3" => {
            let f =
                |k: &str| f64_field(&rope, k)?.ok_or_else(|| Error::InvalidConfig(format!("config.json: llama3 rope scaling needs `{k}`")));
            Some(RopeScaling::Llama3 {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
            })
        }
        other => return Err(Error::Unsupported(format!("rope type `{other}` (btm supports default and llama3)"))),
    };
    Ok((rope_theta, rope_scaling))
}

/// The attention variant each architecture implies: `(qkv_bias, o_bias, sliding_window)`; also
/// rejects FFN biases, which no supported architecture has.
fn attention_from_hf(arch: Architecture, hf: HfFields) -> Result<(bool, bool, Option<usize>)> {
    if hf.bool("mlp_bias") == Some(true) {
        return Err(Error::Unsupported("mlp_bias: true (biases in the FFN)".into()));
    }
    let (qkv_bias, o_bias) = match arch {
        Architecture::Llama
        | Architecture::Qwen3
        | Architecture::Qwen3Moe
        | Architecture::Olmo2
        | Architecture::Olmoe
        | Architecture::FlexOlmo => {
            let b = hf.bool("attention_bias").unwrap_or(false);
            (b, b)
        }
        Architecture::Qwen2 | Architecture::Qwen2Moe => (true, false),
        Architecture::Mistral | Architecture::Mixtral => (false, false),
    };
    let sliding_window = match arch {
        Architecture::Mistral | Architecture::Mixtral => hf.usize("sliding_window")?,
        Architecture::Qwen2 | Architecture::Qwen2Moe | Architecture::Qwen3 | Architecture::Qwen3Moe => {
            if hf.bool("use_sliding_window") == Some(true) {
                return Err(Error::Unsupported(format!("{} use_sliding_window: true", arch.class_name())));
            }
            None
        }
        Architecture::Llama | Architecture::Olmo2 | Architecture::Olmoe | Architecture::FlexOlmo => None,
    };
    Ok((qkv_bias, o_bias, sliding_window))
}

/// Mixtral's MoE: one FFN width for every expert, no shared expert, no dense layers.
fn mixtral_moe_from_hf(hf: HfFields, intermediate_size: usize) -> Result<MoeConfig> {
    Ok(MoeConfig {
        experts: hf.need("num_local_experts")?,
        top_k: hf.need("num_experts_per_tok")?,
        routing: Routing::TopkThenSoftmax,
        expert_ffn: intermediate_size,
        shared_expert: None,
        dense_layers: vec![],
    })
}

/// OLMoE's and FlexOlmo's MoE: every layer routed, the experts `intermediate_size` wide,
/// softmax then top-k (`norm_topk_prob: true` renormalises the top-k, i.e. a softmax over the
/// top-k logits), no shared expert.
fn olmo_moe_from_hf(hf: HfFields, intermediate_size: usize) -> Result<MoeConfig> {
    // transformers 5 saves `num_experts` under its attribute-map name.
    let experts = match hf.usize("num_experts")? {
        Some(e) => e,
        None => hf.usize("num_local_experts")?.ok_or_else(|| Error::InvalidConfig("config.json: missing `num_experts`".into()))?,
    };
    Ok(MoeConfig {
        experts,
        top_k: hf.need("num_experts_per_tok")?,
        routing: if hf.bool("norm_topk_prob").unwrap_or(false) { Routing::TopkThenSoftmax } else { Routing::SoftmaxThenTopk },
        expert_ffn: intermediate_size,
        shared_expert: None,
        dense_layers: vec![],
    })
}

/// Qwen2-MoE's and Qwen3-MoE's MoE: routing from `norm_topk_prob` (true: the top-k
/// probabilities renormalised, which is a softmax over the top-k logits), the dense layers
/// `mlp_only_layers` and `decoder_sparse_step` leave, and (Qwen2-MoE only, `shared`) a gated
/// shared expert.
fn qwen_moe_from_hf(hf: HfFields, shared: bool) -> Result<MoeConfig> {
    let num_layers = hf.need("num_hidden_layers")?;
    // Bounded before the walk over the layers below, which validate() comes after.
    if num_layers > MAX_LAYERS {
        return Err(Error::InvalidConfig(format!("num_hidden_layers = {num_layers} exceeds btm's limit of {MAX_LAYERS}")));
    }
    let step = hf.usize("decoder_sparse_step")?.unwrap_or(1).max(1);
    // A set: the list's length is the file's to choose, and each layer looks it up.
    let mlp_only: std::collections::HashSet<usize> = match hf.0.get("mlp_only_layers") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect(),
        _ => Default::default(),
    };
    let dense_layers = (0..num_layers).filter(|l| mlp_only.contains(l) || (l + 1) % step != 0).collect();
    // btm's zero-output placeholder (`btm.shared_expert: "none"`) is dropped by the
    // checkpoint reader once it has checked the weights really are zero.
    let shared_ffn = if shared { hf.usize("shared_expert_intermediate_size")?.unwrap_or(0) } else { 0 };
    let shared_expert = (shared_ffn > 0).then_some(SharedExpertConfig { ffn: shared_ffn, gated: true });
    // transformers 5 saves Qwen3-MoE's `num_experts` under its attribute-map name.
    let experts = match hf.usize("num_experts")? {
        Some(e) => e,
        None => hf.usize("num_local_experts")?.ok_or_else(|| Error::InvalidConfig("config.json: missing `num_experts`".into()))?,
    };
    Ok(MoeConfig {
        experts,
        top_k: hf.need("num_experts_per_tok")?,
        routing: if hf.bool("norm_topk_prob").unwrap_or(false) { Routing::TopkThenSoftmax } else { Routing::SoftmaxThenTopk },
        expert_ffn: hf.need("moe_intermediate_size")?,
        shared_expert,
        dense_layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig { max_position_embeddings: 64, ..ModelConfig::llama(64, 16, 2, 4, 2, 32) }
    }

    #[test]
    fn hf_round_trip_for_every_written_architecture() {
        let dense = tiny();
        let mut mixtral = tiny();
        mixtral.moe = Some(MoeConfig {
            experts: 4,
            top_k: 2,
            routing: Routing::TopkThenSoftmax,
            expert_ffn: 8,
            shared_expert: None,
            dense_layers: vec![],
        });
        let mut qwen = mixtral.clone();
        qwen.qkv_bias = true;
        qwen.moe.as_mut().unwrap().routing = Routing::SoftmaxThenTopk;
        let mut qwen_shared = qwen.clone();
        qwen_shared.moe.as_mut().unwrap().shared_expert = Some(SharedExpertConfig { ffn: 12, gated: true });
        let mut llama3 = tiny();
        llama3.rope_scaling =
            Some(RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 16 });
        let qwen3 = ModelConfig { qk_norm: true, head_dim: 6, qkv_bias: true, o_bias: true, ..tiny() };
        let mut qwen3_moe = ModelConfig { qk_norm: true, head_dim: 6, ..mixtral.clone() };
        qwen3_moe.moe.as_mut().unwrap().dense_layers = vec![1];
        let mut qwen3_moe_softmax = qwen3_moe.clone();
        qwen3_moe_softmax.moe.as_mut().unwrap().routing = Routing::SoftmaxThenTopk;
        for (cfg, arch) in [
            (qwen3, Architecture::Qwen3),
            (qwen3_moe, Architecture::Qwen3Moe),
            (qwen3_moe_softmax, Architecture::Qwen3Moe),
            (dense, Architecture::Llama),
            (mixtral, Architecture::Mixtral),
            (qwen, Architecture::Qwen2Moe),
            (qwen_shared, Architecture::Qwen2Moe),
            (llama3, Architecture::Llama),
        ] {
            let hf = cfg.to_hf().unwrap();
            let (back, got) = ModelConfig::from_hf(&hf).unwrap();
            assert_eq!(got, arch);
            // Qwen2-MoE always has q/k/v biases and a shared expert: btm writes zero ones, which
            // the checkpoint reader (not the config parser) drops again after checking them.
            let mut want = cfg.clone();
            if arch == Architecture::Mixtral {
                // Mixtral has one FFN width; the dense width is unused without dense layers.
                want.intermediate_size = want.moe.as_ref().unwrap().expert_ffn;
            }
            if arch == Architecture::Qwen2Moe {
                want.qkv_bias = true;
                let m = want.moe.as_mut().unwrap();
                m.shared_expert.get_or_insert(SharedExpertConfig { ffn: 1, gated: true });
            }
            assert_eq!(back, want);
        }
    }

    /// transformers' Qwen3 config defaults: head_dim 128 when absent, `num_local_experts` as
    /// transformers 5 saves `num_experts`; what Qwen3-MoE cannot hold is refused by name.
    #[test]
    fn qwen3_config_defaults_and_limits() {
        let mut hf = ModelConfig { qk_norm: true, ..ModelConfig::llama(64, 256, 2, 4, 2, 32) }.to_hf().unwrap();
        hf.as_object_mut().unwrap().remove("head_dim");
        assert_eq!(ModelConfig::from_hf(&hf).unwrap().0.head_dim, 128);
        hf["use_sliding_window"] = json!(true);
        assert_eq!(ModelConfig::from_hf(&hf).unwrap_err().to_string(), "unsupported: Qwen3ForCausalLM use_sliding_window: true");
        let mut moe = ModelConfig { qk_norm: true, ..tiny() };
        moe.moe = Some(MoeConfig {
            experts: 4,
            top_k: 2,
            routing: Routing::TopkThenSoftmax,
            expert_ffn: 8,
            shared_expert: None,
            dense_layers: vec![],
        });
        let mut hf = moe.to_hf().unwrap();
        let experts = hf.as_object_mut().unwrap().remove("num_experts").unwrap();
        hf["num_local_experts"] = experts;
        assert_eq!(ModelConfig::from_hf(&hf).unwrap().0, moe);
        moe.moe.as_mut().unwrap().shared_expert = Some(SharedExpertConfig { ffn: 8, gated: true });
        assert_eq!(moe.to_hf().unwrap_err().to_string(), "unsupported: a shared expert in a Qwen3-MoE (Qwen3MoeForCausalLM has none)");
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = ModelConfig::from_hf(&json!({"architectures": ["GPT2LMHeadModel"]})).unwrap_err();
        assert_eq!(err.to_string(), "unknown architecture `GPT2LMHeadModel` (btm reads LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, Olmo2ForCausalLM, OlmoeForCausalLM, FlexOlmoForCausalLM)");
    }

    #[test]
    fn top_k_larger_than_experts_is_rejected() {
        let mut cfg = tiny();
        cfg.moe = Some(MoeConfig {
            experts: 2,
            top_k: 3,
            routing: Routing::TopkThenSoftmax,
            expert_ffn: 8,
            shared_expert: None,
            dense_layers: vec![],
        });
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("top-k) = 3 must be between 1 and the number of experts (2)"), "{err}");
    }

    /// Dimensions a mutated config.json makes huge end in named errors, quickly: before a
    /// per-layer walk, a tensor list or a shape product that does not fit.
    #[test]
    fn configs_beyond_the_bounds_are_named() {
        let mut hf = tiny().to_hf().unwrap();
        hf["hidden_size"] = json!(1u64 << 40);
        let err = ModelConfig::from_hf(&hf).unwrap_err().to_string();
        assert_eq!(err, "invalid model config: hidden_size = 1099511627776 exceeds btm's limit of 16777216");
        let mut moe = tiny();
        moe.moe = Some(MoeConfig {
            experts: 4,
            top_k: 2,
            routing: Routing::SoftmaxThenTopk,
            expert_ffn: 8,
            shared_expert: None,
            dense_layers: vec![],
        });
        let mut hf = moe.to_hf().unwrap();
        assert_eq!(hf["architectures"][0], "Qwen2MoeForCausalLM");
        hf["num_hidden_layers"] = json!(1u64 << 62);
        hf["mlp_only_layers"] = json!((0..100_000).collect::<Vec<u64>>());
        let err = ModelConfig::from_hf(&hf).unwrap_err().to_string();
        assert_eq!(err, "invalid model config: num_hidden_layers = 4611686018427387904 exceeds btm's limit of 16384");
        hf["num_hidden_layers"] = json!(16384);
        hf["num_experts"] = json!(65536);
        let err = ModelConfig::from_hf(&hf).unwrap_err().to_string();
        assert!(err.ends_with("the number of tensors = 3221487619 exceeds btm's limit of 1048576"), "{err}");
        // Every dimension within its bound, but the parameters overflow 64 bits.
        let huge = ModelConfig::llama(1 << 24, 1 << 24, 1 << 14, 1 << 10, 1 << 10, 1 << 24);
        assert_eq!(huge.validate().unwrap_err().to_string(), "invalid model config: the model has more parameters than 64 bits count");
    }
}
