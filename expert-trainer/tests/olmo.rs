//! Training the OLMo families: gradients reach the full-width q/k norms and OLMo2's post-norms
//! (the trainer uses the model's differentiable RMSNorm), and the result keeps its family.

mod common;

use btm_model::Checkpoint;
use btm_trainer::{JobSpec, Options, Outcome};
use common::*;

#[test]
fn a_training_step_moves_the_qk_norms_and_post_norms() {
    for model in ["olmo2", "olmoe", "flex_olmo"] {
        let (dir, train, valid) = data_dir();
        let out = dir.path().join("out");
        // OLMoE is pre-norm: its post_attention_layernorm sits before the FFN, which the
        // gradient reaches just the same.
        let norms: &[&str] = if model == "olmoe" {
            &["self_attn.k_norm", "self_attn.q_norm", "post_attention_layernorm"]
        } else {
            &["self_attn.k_norm", "self_attn.q_norm", "post_attention_layernorm", "post_feedforward_layernorm"]
        };
        let include: Vec<String> = norms.iter().map(|n| format!("'*.{n}.weight'")).collect();
        let extra = format!("steps: 2\ntrainable: {{include: [{}]}}\n", include.join(", "));
        // No weight decay: only a gradient can move the norms.
        let yaml =
            job_yaml(model, &train, &valid, &out, &dir.path().join("cache"), &extra).replace("weight_decay: 0.1", "weight_decay: 0.0");
        assert!(yaml.contains("weight_decay: 0.0"));
        let outcome = btm_trainer::run(&JobSpec::parse(&yaml, dir.path()).unwrap(), Options { quiet: true, ..Default::default() }).unwrap();
        let Outcome::Finished { model_dir, .. } = outcome else { panic!("{outcome:?}") };
        let before = Checkpoint::open(fixtures().join(model)).unwrap();
        let after = Checkpoint::open(&model_dir).unwrap();
        assert_eq!(after.architecture, before.architecture, "{model}");
        assert_eq!(after.config, before.config, "{model}");
        let mut changed = Vec::new();
        for spec in before.tensor_specs() {
            let a = before.tensor(&spec.name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = after.tensor(&spec.name).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if a != b {
                changed.push(spec.name);
            }
        }
        changed.sort();
        let layers = before.config.num_layers;
        let mut want: Vec<String> = (0..layers).flat_map(|l| norms.iter().map(move |n| format!("model.layers.{l}.{n}.weight"))).collect();
        want.sort();
        assert_eq!(changed, want, "{model}");
    }
}
