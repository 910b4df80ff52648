//! Training the OLMo families: gradients reach the full-width q/k norms and OLMo2's post-norms
//! (the trainer uses the model's differentiable RMSNorm), and the result keeps its family.

mod common;

use common::*;

#[test]
fn a_training_step_moves_the_qk_norms_and_post_norms() {
    for model in ["olmo2", "olmoe", "flex_olmo"] {
        // OLMoE is pre-norm: its post_attention_layernorm sits before the FFN, which the
        // gradient reaches just the same.
        let norms: &[&str] = if model == "olmoe" {
            &["self_attn.k_norm", "self_attn.q_norm", "post_attention_layernorm"]
        } else {
            &["self_attn.k_norm", "self_attn.q_norm", "post_attention_layernorm", "post_feedforward_layernorm"]
        };
        let (before, after, changed, want) = train_layer_tensors(model, norms);
        assert_eq!(after.architecture, before.architecture, "{model}");
        assert_eq!(after.config, before.config, "{model}");
        assert_eq!(changed, want, "{model}");
    }
}
