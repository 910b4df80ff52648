//! Output scaling of routed experts, baked into their weights so the written Hugging Face
//! model needs no extra flag.
//!
//! **Merge** (Komatsuzaki et al. 2023, "Sparse Upcycling"; Megatron-LM): with
//! `softmax_then_topk` a token's k selected weights sum to about k/E under a near-uniform
//! router, so expert outputs are multiplied by a = E/k to keep the dense output magnitude;
//! with `topk_then_softmax` the k weights sum to 1 and a = 1. The merger multiplies each
//! expert's `down_proj` by a.
//!
//! **Upcycle** (He et al. 2024, "Upcycling Large Language Models into Mixture of Experts"):
//! with granularity G each expert is 1/G of the dense FFN, so
//! a = G for `topk_then_softmax` and a = E·G/k for `softmax_then_topk`.
//! SwiGLU is `down(silu(gate·x) ⊙ (up·x))`: it is linear in `up` and in `down` but not in
//! `gate`, so multiplying up and down by √a each scales the expert's output by exactly a
//! ([`ScalingMode::Exact`]). Megatron-LM's `upcycling_utils.py` multiplies all three by
//! a^(1/3) ([`ScalingMode::Megatron`]), which changes silu's input and therefore does not
//! reproduce the dense function.

use btm_kernels::Routing;

/// How the upcycling scale a is spread over the three SwiGLU projections (one definition: the
/// pipeline's `upcycle.scaling` and the CLI's `--scaling` read this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum), value(rename_all = "snake_case"))]
#[serde(rename_all = "snake_case")]
pub enum ScalingMode {
    /// up and down × √a, gate untouched: the expert's output is exactly a × its shard's.
    Exact,
    /// gate, up and down × a^(1/3), as Megatron-LM does.
    Megatron,
}

impl std::str::FromStr for ScalingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" => Ok(ScalingMode::Exact),
            "megatron" => Ok(ScalingMode::Megatron),
            other => Err(format!("unknown scaling `{other}` (expected exact or megatron)")),
        }
    }
}

impl ScalingMode {
    /// The snake_case name, as serde, the CLI and the lineage write it.
    pub fn as_str(self) -> &'static str {
        match self {
            ScalingMode::Exact => "exact",
            ScalingMode::Megatron => "megatron",
        }
    }

    /// Multipliers for (gate, up, down) that realise the scale `a`.
    pub fn factors(self, a: f64) -> ProjectionScales {
        match self {
            ScalingMode::Exact => ProjectionScales { gate: 1.0, up: a.sqrt(), down: a.sqrt() },
            ScalingMode::Megatron => {
                let c = a.cbrt();
                ProjectionScales { gate: c, up: c, down: c }
            }
        }
    }
}

/// Multipliers for the three projections of one expert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProjectionScales {
    /// Multiplier of `gate_proj`.
    pub gate: f64,
    /// Multiplier of `up_proj`.
    pub up: f64,
    /// Multiplier of `down_proj`.
    pub down: f64,
}

impl ProjectionScales {
    /// The multiplier of projection `proj`.
    pub fn get(&self, proj: crate::names::Proj) -> f64 {
        match proj {
            crate::names::Proj::Gate => self.gate,
            crate::names::Proj::Up => self.up,
            crate::names::Proj::Down => self.down,
        }
    }
}

/// The upcycling scale: a = G (`topk_then_softmax`) or a = E·G/k (`softmax_then_topk`).
pub fn upcycle_scale(routing: Routing, experts: usize, granularity: usize, top_k: usize) -> f64 {
    match routing {
        Routing::TopkThenSoftmax => granularity as f64,
        Routing::SoftmaxThenTopk => (experts * granularity) as f64 / top_k as f64,
    }
}

/// The merge scale baked into each expert's `down_proj`: a = E/k (`softmax_then_topk`) or 1.
pub fn merge_scale(routing: Routing, experts: usize, top_k: usize) -> f64 {
    match routing {
        Routing::TopkThenSoftmax => 1.0,
        Routing::SoftmaxThenTopk => experts as f64 / top_k as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_follow_the_papers() {
        assert_eq!(upcycle_scale(Routing::TopkThenSoftmax, 8, 2, 2), 2.0);
        assert_eq!(upcycle_scale(Routing::SoftmaxThenTopk, 8, 2, 4), 4.0);
        assert_eq!(merge_scale(Routing::SoftmaxThenTopk, 8, 2), 4.0);
        assert_eq!(merge_scale(Routing::TopkThenSoftmax, 8, 2), 1.0);
    }

    #[test]
    fn exact_factors_scale_output_by_a_and_leave_gate_alone() {
        let f = ScalingMode::Exact.factors(6.0);
        assert_eq!(f.gate, 1.0);
        assert!((f.up * f.down - 6.0).abs() < 1e-12);
        let m = ScalingMode::Megatron.factors(8.0);
        assert!((m.gate - 2.0).abs() < 1e-12 && (m.up - 2.0).abs() < 1e-12 && (m.down - 2.0).abs() < 1e-12);
    }
}
