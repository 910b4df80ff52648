//! Training a Qwen3-family model: gradients reach the per-head q/k norms (the trainer uses the
//! model's differentiable RMSNorm, not candle's detached one), and the result is still Qwen3.

mod common;

use btm_model::Architecture;
use common::*;

#[test]
fn a_training_step_moves_the_qk_norms() {
    for model in ["qwen3", "qwen3_moe"] {
        let (before, after, changed, want) = train_layer_tensors(model, &["self_attn.k_norm", "self_attn.q_norm"]);
        assert_eq!(after.architecture, before.architecture);
        assert!(matches!(after.architecture, Architecture::Qwen3 | Architecture::Qwen3Moe));
        assert_eq!(changed, want, "{model}");
    }
}
