//! What a canonical tensor name (see `btm_model::weights`) means to the merger: a router, a
//! routed expert's projection, the shared expert, a dense FFN projection, or anything else
//! (embeddings, attention, norms, LM head: the "non-expert" weights).

/// One of the three SwiGLU projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    /// `gate_proj` [F, H]: the input of silu.
    Gate,
    /// `up_proj` [F, H]: multiplied elementwise with silu(gate·x).
    Up,
    /// `down_proj` [H, F]: back to the hidden size.
    Down,
}

impl Proj {
    /// The three projections, in (gate, up, down) order.
    pub const ALL: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];

    /// The projection's part of a tensor name: `gate_proj`, `up_proj` or `down_proj`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| s == format!("{}.weight", p.as_str()))
    }
}

/// The role of a tensor in an (MoE or dense) checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// `model.layers.{layer}.mlp.gate.weight`, the router [E, H].
    Router {
        /// 0-based layer index.
        layer: usize,
    },
    /// `model.layers.{layer}.mlp.experts.{expert}.{proj}.weight`.
    Expert {
        /// 0-based layer index.
        layer: usize,
        /// 0-based index of the routed expert.
        expert: usize,
        /// Which of the three projections.
        proj: Proj,
    },
    /// `model.layers.{layer}.mlp.shared_expert.{proj}.weight`.
    SharedExpert {
        /// 0-based layer index.
        layer: usize,
        /// Which of the three projections.
        proj: Proj,
    },
    /// `model.layers.{layer}.mlp.shared_expert_gate.weight`.
    SharedExpertGate {
        /// 0-based layer index.
        layer: usize,
    },
    /// `model.layers.{layer}.mlp.{proj}.weight` of a dense layer.
    DenseFfn {
        /// 0-based layer index.
        layer: usize,
        /// Which of the three projections.
        proj: Proj,
    },
    /// Everything else: embeddings, attention, norms, LM head.
    Other,
}

/// The role of tensor `name`; any name it does not recognise is [`Slot::Other`].
pub fn classify(name: &str) -> Slot {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return Slot::Other;
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return Slot::Other;
    };
    let Ok(layer) = layer.parse::<usize>() else {
        return Slot::Other;
    };
    let Some(mlp) = rest.strip_prefix("mlp.") else {
        return Slot::Other;
    };
    if mlp == "gate.weight" {
        return Slot::Router { layer };
    }
    if mlp == "shared_expert_gate.weight" {
        return Slot::SharedExpertGate { layer };
    }
    if let Some(p) = mlp.strip_prefix("shared_expert.").and_then(Proj::parse) {
        return Slot::SharedExpert { layer, proj: p };
    }
    if let Some(e) = mlp.strip_prefix("experts.") {
        if let Some((e, p)) = e.split_once('.') {
            if let (Ok(expert), Some(proj)) = (e.parse(), Proj::parse(p)) {
                return Slot::Expert { layer, expert, proj };
            }
        }
        return Slot::Other;
    }
    match Proj::parse(mlp) {
        Some(proj) => Slot::DenseFfn { layer, proj },
        None => Slot::Other,
    }
}

/// Name of a dense layer's FFN projection.
pub fn dense_ffn(layer: usize, proj: Proj) -> String {
    format!("model.layers.{layer}.mlp.{}.weight", proj.as_str())
}

/// Name of routed expert `expert`'s projection in an MoE layer.
pub fn expert(layer: usize, expert: usize, proj: Proj) -> String {
    format!("model.layers.{layer}.mlp.experts.{expert}.{}.weight", proj.as_str())
}

/// Name of an MoE layer's router.
pub fn router(layer: usize) -> String {
    format!("model.layers.{layer}.mlp.gate.weight")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_every_kind_of_name() {
        assert_eq!(classify("model.layers.3.mlp.gate.weight"), Slot::Router { layer: 3 });
        assert_eq!(classify("model.layers.0.mlp.experts.12.down_proj.weight"), Slot::Expert { layer: 0, expert: 12, proj: Proj::Down });
        assert_eq!(classify("model.layers.1.mlp.up_proj.weight"), Slot::DenseFfn { layer: 1, proj: Proj::Up });
        assert_eq!(classify("model.layers.1.mlp.shared_expert.gate_proj.weight"), Slot::SharedExpert { layer: 1, proj: Proj::Gate });
        assert_eq!(classify("model.layers.1.mlp.shared_expert_gate.weight"), Slot::SharedExpertGate { layer: 1 });
        for other in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "model.norm.weight"] {
            assert_eq!(classify(other), Slot::Other, "{other}");
        }
        assert_eq!(classify(&expert(2, 5, Proj::Gate)), Slot::Expert { layer: 2, expert: 5, proj: Proj::Gate });
        assert_eq!(classify(&dense_ffn(4, Proj::Down)), Slot::DenseFfn { layer: 4, proj: Proj::Down });
        assert_eq!(classify(&router(7)), Slot::Router { layer: 7 });
    }
}
