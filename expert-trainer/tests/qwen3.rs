//! Training a Qwen3-family model: gradients reach the per-head q/k norms (the trainer uses the
//! model's differentiable RMSNorm, not candle's detached one), and the result is still Qwen3.

mod common;

use btm_model::{Architecture, Checkpoint};
use btm_trainer::{JobSpec, Options, Outcome};
use common::*;

#[test]
fn a_training_step_moves_the_qk_norms() {
    for model in ["qwen3", "qwen3_moe"] {
        let (dir, train, valid) = data_dir();
        let out = dir.path().join("out");
        let extra = "steps: 2\ntrainable: {include: ['*.self_attn.q_norm.weight', '*.self_attn.k_norm.weight']}\n";
        // No weight decay: only a gradient can move the norms.
        let yaml =
            job_yaml(model, &train, &valid, &out, &dir.path().join("cache"), extra).replace("weight_decay: 0.1", "weight_decay: 0.0");
        assert!(yaml.contains("weight_decay: 0.0"));
        let outcome = btm_trainer::run(&JobSpec::parse(&yaml, dir.path()).unwrap(), Options { quiet: true, ..Default::default() }).unwrap();
        let Outcome::Finished { model_dir, .. } = outcome else { panic!("{outcome:?}") };
        let before = Checkpoint::open(fixtures().join(model)).unwrap();
        let after = Checkpoint::open(&model_dir).unwrap();
        assert_eq!(after.architecture, before.architecture);
        assert!(matches!(after.architecture, Architecture::Qwen3 | Architecture::Qwen3Moe));
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
        let mut want: Vec<String> =
            (0..layers).flat_map(|l| ["k_norm", "q_norm"].map(|n| format!("model.layers.{l}.self_attn.{n}.weight"))).collect();
        want.sort();
        assert_eq!(changed, want, "{model}");
    }
}
