//! Upcycling (He et al. 2024, "Upcycling Large Language Models into Mixture of Experts"):
//! a dense model becomes an MoE of E experts that, at initialisation, computes the dense
//! function exactly (for `topk_then_softmax`, any granularity G with k a multiple of G).
//!
//! - Granularity G = dense FFN width F / expert width: SwiGLU's gate and up are split
//!   row-wise and down column-wise into G shards; expert e gets shard e mod G, so experts
//!   c·G … c·G+G−1 form copy c of the dense FFN (E/G copies).
//! - Router: virtual groups ([`crate::router_init::virtual_group_router`]): E/G random rows,
//!   each repeated G times, so a copy's G shards are always selected together (k % G == 0).
//! - Scale a = G (`topk_then_softmax`) or E·G/k (`softmax_then_topk`), see [`crate::scaling`].
//!
//! Why it is exact for `topk_then_softmax`: the k selected experts are k/G whole copies; copy c
//! gets total weight p_c (softmax over the selected copies' logits, Σ p_c = 1) split as p_c/G
//! over its shards; each shard's output is scaled by a = G, and the shards of a copy sum to the
//! dense FFN, so the layer outputs Σ_c p_c · FFN(x) = FFN(x).

use crate::names::{classify, dense_ffn, Slot};
use crate::router_init::{layer_seed, virtual_group_router};
use crate::scaling::{upcycle_scale, ScalingMode};
use crate::{parent_of, tokenizer_file, OutputOptions};
use anyhow::{bail, Context, Result};
use btm_kernels::Routing;
use btm_model::{Checkpoint, Extras, Lineage, ModelConfig, MoeConfig};
use candle_core::DType;
use serde_json::json;
use std::path::PathBuf;

/// What `btm upcycle` upcycles and how; [`UpcycleOptions::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct UpcycleOptions {
    /// The dense checkpoint directory to upcycle.
    pub model: PathBuf,
    /// Output checkpoint directory.
    pub out: PathBuf,
    /// Number of experts E (a positive multiple of `granularity`).
    pub experts: usize,
    /// Experts per token k (1 ≤ k ≤ E, a multiple of `granularity`).
    pub top_k: usize,
    /// G: each expert is 1/G of the dense FFN (G divides its width; default 1).
    pub granularity: usize,
    /// How router logits become expert weights (default `topk_then_softmax`, the exact one).
    pub routing: Routing,
    /// How the scale a is spread over gate, up and down (default [`ScalingMode::Exact`]).
    pub scaling: ScalingMode,
    /// Std of the router's random rows (0: a zero router, i.e. uniform routing).
    pub router_std: f64,
    /// Seed of the router's random rows, per layer through [`crate::router_init::layer_seed`] (default 0).
    pub seed: u64,
    /// Dtype, shard size and overwrite policy of the written checkpoint.
    pub output: OutputOptions,
}

impl UpcycleOptions {
    /// Options for E = `experts`, k = `top_k`; defaults: G = 1, `topk_then_softmax`, exact scaling,
    /// router std 0.02, seed 0.
    pub fn new(model: impl Into<PathBuf>, out: impl Into<PathBuf>, experts: usize, top_k: usize) -> Self {
        Self {
            model: model.into(),
            out: out.into(),
            experts,
            top_k,
            granularity: 1,
            routing: Routing::TopkThenSoftmax,
            scaling: ScalingMode::Exact,
            router_std: crate::router_init::DEFAULT_ROUTER_STD,
            seed: 0,
            output: OutputOptions::default(),
        }
    }
}

/// The MoE config of the upcycled model, or a clear error for impossible settings.
pub fn upcycled_config(dense: &ModelConfig, o: &UpcycleOptions) -> Result<ModelConfig> {
    let (e, k, g, f) = (o.experts, o.top_k, o.granularity, dense.intermediate_size);
    if g == 0 || f % g != 0 {
        bail!("granularity G = {g} does not divide the dense FFN width {f} (intermediate_size)");
    }
    if e == 0 || e % g != 0 {
        bail!("--experts {e} must be a positive multiple of the granularity G = {g} (E/G whole copies of the dense FFN)");
    }
    if k == 0 || k > e {
        bail!("--top-k {k} must be between 1 and the number of experts ({e})");
    }
    if k % g != 0 {
        bail!("--top-k {k} is not a multiple of the granularity G = {g}: the router must select the G shards of a dense copy together (virtual groups), so k must be a multiple of G");
    }
    let mut cfg = dense.clone();
    cfg.moe = Some(MoeConfig { experts: e, top_k: k, routing: o.routing, expert_ffn: f / g, shared_expert: None, dense_layers: vec![] });
    cfg.validate()?;
    cfg.to_hf()?;
    Ok(cfg)
}

/// Summary of an upcycle.
#[derive(Debug, Clone)]
pub struct UpcycleReport {
    /// Config of the written MoE.
    pub config: ModelConfig,
    /// The scale a (see [`crate::scaling`]).
    pub scale: f64,
}

/// Upcycle `o.model` into an MoE at `o.out`, streaming one tensor at a time.
pub fn upcycle(o: &UpcycleOptions) -> Result<UpcycleReport> {
    o.output.check_destination(&o.out)?;
    let dense = Checkpoint::open(&o.model).with_context(|| format!("opening {}", o.model.display()))?;
    crate::checks::require_dense(&dense, "--model")?;
    let cfg = upcycled_config(&dense.config, o)?;
    let (e, g, h) = (o.experts, o.granularity, cfg.hidden_size);
    let width = dense.config.intermediate_size / g;
    let a = upcycle_scale(o.routing, e, g, o.top_k);
    let factors = o.scaling.factors(a);

    let mut get = |name: &str| -> btm_model::Result<candle_core::Tensor> {
        match classify(name) {
            Slot::Router { layer } => virtual_group_router(e, g, h, o.router_std, layer_seed(o.seed, layer))
                .map_err(|err| btm_model::Error::InvalidConfig(err.to_string())),
            Slot::Expert { layer, expert, proj } => {
                let full = dense.tensor_streamed(&dense_ffn(layer, proj))?.to_dtype(DType::F32)?;
                // gate/up [F, H] split by rows, down [H, F] by columns.
                let dim = if proj == crate::names::Proj::Down { 1 } else { 0 };
                let shard = full.narrow(dim, (expert % g) * width, width)?;
                let factor = factors.get(proj);
                Ok(if factor == 1.0 { shard.contiguous()? } else { (shard * factor)? })
            }
            _ => dense.tensor_streamed(name),
        }
    };

    let mut lineage = Lineage::new("upcycle");
    lineage.parents = vec![parent_of(&dense, dense.lineage()?.and_then(|l| l.domain))?];
    let x = &mut lineage.extra;
    x.insert("experts".into(), json!(e));
    x.insert("top_k".into(), json!(o.top_k));
    x.insert("granularity".into(), json!(g));
    x.insert("routing".into(), json!(o.routing.as_str()));
    x.insert("scaling".into(), json!(o.scaling.as_str()));
    x.insert("scale".into(), json!(a));
    x.insert("projection_scales".into(), json!({"gate": factors.gate, "up": factors.up, "down": factors.down}));
    // For `add-expert`: the factor each routed expert's output carries.
    x.insert("expert_output_scale".into(), json!(a));
    x.insert(
        "router_init".into(),
        json!({"method": if o.router_std == 0.0 { "zero" } else { "virtual_group_random" }, "std": o.router_std, "seed": o.seed}),
    );
    let extras = Extras { tokenizer: tokenizer_file(dense.dir()), lineage: Some(lineage) };
    btm_model::write_checkpoint(&o.out, &cfg, &mut get, &extras, &o.output.write_options(dense.dtype()))
        .with_context(|| format!("writing {}", o.out.display()))?;
    Ok(UpcycleReport { config: cfg, scale: a })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fixture, logits, ppl, rel_diff};

    fn opts(model: &str, out: &std::path::Path, e: usize, k: usize, g: usize, routing: Routing) -> UpcycleOptions {
        let mut o = UpcycleOptions::new(fixture(model), out, e, k);
        o.granularity = g;
        o.routing = routing;
        o
    }

    #[test]
    fn topk_then_softmax_is_exact_for_any_granularity() {
        let tmp = tempfile::tempdir().unwrap();
        for (model, e, k, g) in [
            ("llama", 4, 2, 1),
            ("llama", 4, 2, 2),
            ("llama", 8, 4, 4),
            ("qwen2", 4, 2, 2),
            ("mistral", 6, 2, 2),
            ("qwen3", 4, 2, 1),
            ("qwen3", 4, 2, 2),
            ("olmo2", 4, 2, 1),
            ("olmo2", 4, 2, 2),
        ] {
            let out = tmp.path().join(format!("{model}-{e}-{k}-{g}"));
            let mut o = opts(model, &out, e, k, g, Routing::TopkThenSoftmax);
            o.router_std = 1.0; // any router: exactness must not depend on it
            upcycle(&o).unwrap();
            let ck = Checkpoint::open(&out).unwrap();
            assert_eq!(ck.config.moe.as_ref().unwrap().expert_ffn, 64 / g);
            // The family is kept: a Qwen3 model upcycles into a Qwen3-MoE.
            if model == "qwen3" {
                assert_eq!(ck.architecture, btm_model::Architecture::Qwen3Moe);
            }
            // OLMo2's post-norms and full-width q/k norms make a FlexOlmo.
            if model == "olmo2" {
                assert_eq!(ck.architecture, btm_model::Architecture::FlexOlmo);
                assert!(ck.config.post_norms && ck.config.qk_norm_full);
            }
            let (dense, moe) = (logits(&fixture(model)), logits(&out));
            let d = rel_diff(&dense, &moe);
            assert!(d <= 1e-5, "{model} E={e} k={k} G={g}: relative logit difference {d}");
            let (p0, p1) = (ppl(&fixture(model)), ppl(&out));
            assert!((p0 - p1).abs() / p0 <= 1e-5, "{model} G={g}: ppl {p0} vs {p1}");
        }
    }

    #[test]
    fn softmax_then_topk_with_zero_router_is_exact() {
        let tmp = tempfile::tempdir().unwrap();
        for (e, k, g) in [(4, 2, 1), (4, 1, 1), (8, 4, 2)] {
            let out = tmp.path().join(format!("s{e}{k}{g}"));
            let mut o = opts("llama", &out, e, k, g, Routing::SoftmaxThenTopk);
            o.router_std = 0.0;
            upcycle(&o).unwrap();
            assert_eq!(Checkpoint::open(&out).unwrap().architecture, btm_model::Architecture::Qwen2Moe);
            let d = rel_diff(&logits(&fixture("llama")), &logits(&out));
            assert!(d <= 1e-5, "E={e} k={k} G={g}: {d}");
        }
        // Qwen3 → Qwen3-MoE with norm_topk_prob false.
        let out = tmp.path().join("qwen3-softmax");
        let mut o = opts("qwen3", &out, 4, 2, 2, Routing::SoftmaxThenTopk);
        o.router_std = 0.0;
        upcycle(&o).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        assert_eq!(ck.architecture, btm_model::Architecture::Qwen3Moe);
        assert_eq!(ck.config.moe.as_ref().unwrap().routing, Routing::SoftmaxThenTopk);
        let d = rel_diff(&logits(&fixture("qwen3")), &logits(&out));
        assert!(d <= 1e-5, "qwen3 softmax_then_topk: {d}");
        // OLMo2 → FlexOlmo with norm_topk_prob false.
        let out = tmp.path().join("olmo2-softmax");
        let mut o = opts("olmo2", &out, 4, 2, 2, Routing::SoftmaxThenTopk);
        o.router_std = 0.0;
        upcycle(&o).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        assert_eq!(ck.architecture, btm_model::Architecture::FlexOlmo);
        assert_eq!(ck.config.moe.as_ref().unwrap().routing, Routing::SoftmaxThenTopk);
        let d = rel_diff(&logits(&fixture("olmo2")), &logits(&out));
        assert!(d <= 1e-5, "olmo2 softmax_then_topk: {d}");
    }

    #[test]
    fn random_router_error_shrinks_with_init_std() {
        let tmp = tempfile::tempdir().unwrap();
        let dense = logits(&fixture("llama"));
        let errors: Vec<f64> = [1.0, 0.1, 0.01, 0.001]
            .iter()
            .map(|&std| {
                let out = tmp.path().join(format!("std{std}"));
                let mut o = opts("llama", &out, 4, 2, 1, Routing::SoftmaxThenTopk);
                o.router_std = std;
                upcycle(&o).unwrap();
                rel_diff(&dense, &logits(&out))
            })
            .collect();
        assert!(errors.windows(2).all(|w| w[1] < w[0]), "errors do not shrink: {errors:?}");
        assert!(errors[3] < errors[0] / 50.0, "{errors:?}");
    }

    #[test]
    fn megatron_scaling_is_not_exact_with_granularity() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        let mut o = opts("llama", &out, 4, 2, 2, Routing::TopkThenSoftmax);
        o.scaling = ScalingMode::Megatron;
        upcycle(&o).unwrap();
        let d = rel_diff(&logits(&fixture("llama")), &logits(&out));
        assert!(d > 1e-3, "a^(1/3) on gate changes silu's input: {d}");
    }

    #[test]
    fn impossible_settings_are_clear_errors_and_write_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("never");
        for (e, k, g, want) in [
            (6, 3, 3, "granularity G = 3 does not divide the dense FFN width 64"),
            (4, 1, 2, "--top-k 1 is not a multiple of the granularity G = 2"),
            (4, 5, 1, "--top-k 5 must be between 1 and the number of experts (4)"),
            (6, 2, 4, "--experts 6 must be a positive multiple of the granularity G = 4"),
        ] {
            let err = upcycle(&opts("llama", &out, e, k, g, Routing::TopkThenSoftmax)).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let err = upcycle(&opts("mixtral", &out, 4, 2, 1, Routing::TopkThenSoftmax)).unwrap_err().to_string();
        assert!(err.contains("already a Mixture of Experts"), "{err}");
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "no temporary directory left behind");
    }
}
