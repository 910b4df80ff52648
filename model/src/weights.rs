//! The tensors a model has: canonical names and shapes derived from its config, and their
//! Hugging Face names per architecture.
//!
//! btm's canonical names are Llama's for the dense parts and Qwen2-MoE's for the MoE block
//! (`mlp.gate` is the router, `mlp.experts.{e}.{gate,up,down}_proj` the experts,
//! `mlp.shared_expert*` the shared expert), so most architectures map one-to-one.

use crate::config::{Architecture, ModelConfig};

/// One tensor of a model: its canonical name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Canonical name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape as stored (`nn.Linear` weights are [out, in]).
    pub shape: Vec<usize>,
}

fn spec(name: String, shape: &[usize]) -> TensorSpec {
    TensorSpec { name, shape: shape.to_vec() }
}

/// Every tensor of the model described by `cfg`, in a stable order.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let mut out = vec![spec("model.embed_tokens.weight".into(), &[v, h])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        // OLMo2's post-norm layers have no norm before attention.
        if !cfg.post_norms {
            out.push(spec(format!("{p}.input_layernorm.weight"), &[h]));
        }
        for (name, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            out.push(spec(format!("{p}.self_attn.{name}.weight"), &[rows, h]));
            if cfg.qkv_bias {
                out.push(spec(format!("{p}.self_attn.{name}.bias"), &[rows]));
            }
        }
        if cfg.qk_norm {
            // Qwen3 normalises each head, OLMo the whole projection.
            let (qn, kn) = if cfg.qk_norm_full { (q, kv) } else { (cfg.head_dim, cfg.head_dim) };
            for (name, width) in [("q_norm", qn), ("k_norm", kn)] {
                out.push(spec(format!("{p}.self_attn.{name}.weight"), &[width]));
            }
        }
        out.push(spec(format!("{p}.self_attn.o_proj.weight"), &[h, q]));
        if cfg.o_bias {
            out.push(spec(format!("{p}.self_attn.o_proj.bias"), &[h]));
        }
        out.push(spec(format!("{p}.post_attention_layernorm.weight"), &[h]));
        if cfg.post_norms {
            out.push(spec(format!("{p}.post_feedforward_layernorm.weight"), &[h]));
        }
        match cfg.moe.as_ref().filter(|_| cfg.is_moe_layer(l)) {
            None => push_swiglu(&mut out, &format!("{p}.mlp"), h, cfg.intermediate_size),
            Some(m) => {
                out.push(spec(format!("{p}.mlp.gate.weight"), &[m.experts, h]));
                for e in 0..m.experts {
                    push_swiglu(&mut out, &format!("{p}.mlp.experts.{e}"), h, m.expert_ffn);
                }
                if let Some(s) = &m.shared_expert {
                    push_swiglu(&mut out, &format!("{p}.mlp.shared_expert"), h, s.ffn);
                    if s.gated {
                        out.push(spec(format!("{p}.mlp.shared_expert_gate.weight"), &[1, h]));
                    }
                }
            }
        }
    }
    out.push(spec("model.norm.weight".into(), &[h]));
    if !cfg.tie_word_embeddings {
        out.push(spec("lm_head.weight".into(), &[v, h]));
    }
    out
}

fn push_swiglu(out: &mut Vec<TensorSpec>, prefix: &str, h: usize, f: usize) {
    out.push(spec(format!("{prefix}.gate_proj.weight"), &[f, h]));
    out.push(spec(format!("{prefix}.up_proj.weight"), &[f, h]));
    out.push(spec(format!("{prefix}.down_proj.weight"), &[h, f]));
}

/// The name a canonical tensor has in a Hugging Face checkpoint of `arch` (per-expert layout).
pub fn hf_name(arch: Architecture, canonical: &str) -> String {
    if arch != Architecture::Mixtral {
        return canonical.to_string();
    }
    // Mixtral: `block_sparse_moe.gate` is the router, experts use w1 (gate), w3 (up), w2 (down).
    let Some((layer, rest)) = canonical.split_once(".mlp.") else {
        return canonical.to_string();
    };
    if rest == "gate.weight" {
        return format!("{layer}.block_sparse_moe.gate.weight");
    }
    if let Some(expert) = rest.strip_prefix("experts.") {
        let (e, proj) = expert.split_once('.').unwrap_or((expert, ""));
        let w = match proj {
            "gate_proj.weight" => "w1",
            "down_proj.weight" => "w2",
            "up_proj.weight" => "w3",
            _ => return canonical.to_string(),
        };
        return format!("{layer}.block_sparse_moe.experts.{e}.{w}.weight");
    }
    canonical.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixtral_names() {
        let a = Architecture::Mixtral;
        assert_eq!(hf_name(a, "model.layers.3.mlp.gate.weight"), "model.layers.3.block_sparse_moe.gate.weight");
        assert_eq!(hf_name(a, "model.layers.0.mlp.experts.7.up_proj.weight"), "model.layers.0.block_sparse_moe.experts.7.w3.weight");
        assert_eq!(hf_name(a, "model.layers.0.self_attn.q_proj.weight"), "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(hf_name(Architecture::Qwen2Moe, "model.layers.0.mlp.gate.weight"), "model.layers.0.mlp.gate.weight");
    }
}
