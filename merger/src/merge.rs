//! Merge N dense experts into one Mixture of Experts (the "M" of Branch-Train-Merge).
//!
//! Expert i's FFN (gate/up/down) becomes routed expert i of every layer. The non-expert
//! weights (embeddings, attention, norms, LM head) are averaged (BTX, Sukhbaatar et al. 2024;
//! the default), averaged with given weights, or copied from one checkpoint. An optional dense
//! FFN (e.g. the seed's) becomes an always-on, ungated shared expert. The router comes from
//! [`crate::router_init`]; with `softmax_then_topk` each expert's `down_proj` carries the scale
//! a = E/k ([`crate::scaling::merge_scale`]).
//!
//! Nothing is held in memory but the tensor being written: each output tensor is made inside the
//! writer's callback from the memory-mapped inputs. Calibration (centroid/fit routers, routing
//! accuracy) is the exception: it runs the merged model, so it builds it in memory first.

use crate::calib::{calibrate_layerwise, load_domain, CalibDomain, CalibOptions};
use crate::names::{classify, dense_ffn, Proj, Slot};
use crate::router_init::{centroid_router, fit_softmax_regression, routing_accuracy, RouterInit, RouterOptions};
use crate::scaling::merge_scale;
use crate::{parent_of, tokenizer_file, OutputOptions};
use anyhow::{bail, ensure, Context, Result};
use btm_kernels::Routing;
use btm_model::{Checkpoint, Extras, Lineage, ModelConfig, MoeConfig, SharedExpertConfig};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;

/// Where the non-expert weights come from. Written `average`, `weighted` (the weights given
/// beside it) or `from:<ref>`: one grammar for the command line, job specs and pipelines, where
/// `<ref>` is a checkpoint in a job and a domain (or `seed`) in a pipeline's `merge`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum NonExpert {
    /// Mean over the experts (BTX).
    #[default]
    Average,
    /// Σ_i w_i θ_i / Σ_i w_i, one weight per expert.
    Weighted(Vec<f64>),
    /// Copied from this checkpoint (an expert or, e.g., the seed).
    From(PathBuf),
}

impl std::str::FromStr for NonExpert {
    type Err = String;
    /// `weighted` parses to empty weights: they are given beside it (`--weights`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "average" => Ok(NonExpert::Average),
            "weighted" => Ok(NonExpert::Weighted(vec![])),
            other => match other.strip_prefix("from:") {
                Some(path) if !path.is_empty() => Ok(NonExpert::From(PathBuf::from(path))),
                _ => Err(format!("unknown non-expert source `{other}` (expected average, weighted or from:CKPT)")),
            },
        }
    }
}

impl TryFrom<String> for NonExpert {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for NonExpert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NonExpert::Average => f.write_str("average"),
            NonExpert::Weighted(_) => f.write_str("weighted"),
            NonExpert::From(p) => write!(f, "from:{}", p.display()),
        }
    }
}

impl From<NonExpert> for String {
    fn from(n: NonExpert) -> String {
        n.to_string()
    }
}

impl schemars::JsonSchema for NonExpert {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "NonExpert".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^(average|weighted|from:.+)$",
            "description": "`average`, `weighted` (with `weights`) or `from:<checkpoint>`"
        })
    }
}

/// What `btm merge` merges and how; [`MergeOptions::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Dense expert checkpoints (at least two); expert i's FFN becomes routed expert i.
    pub experts: Vec<PathBuf>,
    /// Output checkpoint directory.
    pub out: PathBuf,
    /// Experts per token k (1 ≤ k ≤ E; default 2).
    pub top_k: usize,
    /// How router logits become expert weights (default `topk_then_softmax`; `softmax_then_topk`
    /// also scales each `down_proj` by a = E/k).
    pub routing: Routing,
    /// Router initialisation and calibration settings (default: random).
    pub router: RouterOptions,
    /// One `(domain, JSONL file)` per expert, in expert order.
    pub calib: Vec<(String, PathBuf)>,
    /// Where the non-expert weights come from (default: the experts' mean).
    pub non_expert: NonExpert,
    /// Dense checkpoint whose FFN becomes an always-on, ungated shared expert (e.g. the seed).
    pub shared_expert: Option<PathBuf>,
    /// Dtype, shard size and overwrite policy of the written checkpoint.
    pub output: OutputOptions,
}

impl MergeOptions {
    /// Defaults: top-2, `topk_then_softmax`, random router, averaged non-expert weights, no
    /// calibration text, no shared expert.
    pub fn new(experts: Vec<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            experts,
            out: out.into(),
            top_k: 2,
            routing: Routing::TopkThenSoftmax,
            router: RouterOptions::default(),
            calib: vec![],
            non_expert: NonExpert::Average,
            shared_expert: None,
            output: OutputOptions::default(),
        }
    }
}

/// What a merge (or an added expert) wrote: the config, the lineage and the warnings.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// Config of the written model.
    pub config: ModelConfig,
    /// Lineage written to the output's `btm.json`.
    pub lineage: Lineage,
    /// Non-fatal problems (e.g. a lineage mismatch), also recorded in the lineage.
    pub warnings: Vec<String>,
}

/// The opened inputs, and how to make any output tensor from them.
pub(crate) struct Sources {
    pub experts: Vec<Checkpoint>,
    /// Normalised non-expert weights (empty when copying from `from`).
    pub weights: Vec<f64>,
    pub from: Option<Checkpoint>,
    pub shared: Option<Checkpoint>,
    /// Baked into each routed expert's down_proj.
    pub scale: f64,
}

impl Sources {
    /// Σ_i w_i · θ_i in float32, one input tensor at a time.
    pub fn non_expert(&self, name: &str) -> btm_model::Result<Tensor> {
        if let Some(c) = &self.from {
            return c.tensor_streamed(name);
        }
        let mut acc: Option<Tensor> = None;
        for (c, &w) in self.experts.iter().zip(&self.weights) {
            if w == 0.0 {
                continue;
            }
            let t = c.tensor_streamed(name)?.to_dtype(DType::F32)?;
            let t = if w == 1.0 { t } else { (t * w)? };
            acc = Some(match acc {
                None => t,
                Some(a) => (a + t)?,
            });
        }
        Ok(acc.expect("some weight is positive"))
    }

    /// Routed expert `expert`'s projection at `layer`: the expert's dense FFN (× scale on down).
    pub fn expert(&self, layer: usize, expert: usize, proj: Proj) -> btm_model::Result<Tensor> {
        let t = self.experts[expert].tensor_streamed(&dense_ffn(layer, proj))?;
        if proj == Proj::Down && self.scale != 1.0 {
            return Ok((t.to_dtype(DType::F32)? * self.scale)?);
        }
        Ok(t)
    }

    /// Any output tensor but the routers.
    pub fn tensor(&self, name: &str) -> btm_model::Result<Tensor> {
        match classify(name) {
            Slot::Expert { layer, expert, proj } => self.expert(layer, expert, proj),
            Slot::SharedExpert { layer, proj } => {
                let shared = self.shared.as_ref().expect("config has a shared expert only with --shared-expert");
                shared.tensor_streamed(&dense_ffn(layer, proj))
            }
            Slot::Router { .. } | Slot::SharedExpertGate { .. } => {
                Err(btm_model::Error::InvalidConfig(format!("{name} is not read from the inputs")))
            }
            Slot::DenseFfn { .. } | Slot::Other => self.non_expert(name),
        }
    }
}

/// Build a model in memory (float32, CPU) from a tensor source: the merged model that
/// calibration runs.
pub(crate) fn in_memory_model(cfg: &ModelConfig, get: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<btm_model::Transformer> {
    let mut map = HashMap::new();
    for spec in btm_model::weights::expected_tensors(cfg) {
        let t = get(&spec.name)?.to_dtype(DType::F32)?;
        map.insert(spec.name, t);
    }
    let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
    Ok(btm_model::Transformer::new(cfg, vb)?)
}

/// Load every domain's calibration text (errors name the missing or empty file).
pub(crate) fn load_calibration(named: &[(String, PathBuf)], ckpt: &Checkpoint, opts: &CalibOptions) -> Result<Vec<CalibDomain>> {
    let tok = ckpt.tokenizer().context("calibration needs the experts' tokenizer.json")?;
    named.iter().map(|(name, path)| load_domain(name, path, &tok, opts)).collect()
}

fn open(path: &PathBuf, role: &str) -> Result<Checkpoint> {
    Checkpoint::open(path).with_context(|| format!("opening {role} {}", path.display()))
}

/// Merge the experts; writes nothing unless every check passes and calibration succeeds.
pub fn merge(o: &MergeOptions) -> Result<MergeReport> {
    check_options(o)?;
    let (sources, mut warnings) = open_sources(o)?;
    let cfg = merged_config(o, &sources)?;
    let calibrated = calibrate_routers(o, &cfg, &sources)?;
    let lineage = merge_lineage(o, &sources, &calibrated, &mut warnings)?;
    let (n, hidden) = (sources.experts.len(), cfg.hidden_size);
    let mut get = |name: &str| -> btm_model::Result<Tensor> {
        match classify(name) {
            Slot::Router { layer } => match calibrated.routers.get(&layer) {
                Some(r) => Ok(r.clone()),
                None => o.router.uncalibrated(n, hidden, layer).map_err(|e| btm_model::Error::InvalidConfig(e.to_string())),
            },
            _ => sources.tensor(name),
        }
    };
    let extras = Extras { tokenizer: tokenizer_file(sources.experts[0].dir()), lineage: Some(lineage.clone()) };
    btm_model::write_checkpoint(&o.out, &cfg, &mut get, &extras, &o.output.write_options(sources.experts[0].dtype()))
        .with_context(|| format!("writing {}", o.out.display()))?;
    Ok(MergeReport { config: cfg, lineage, warnings })
}

/// The options' own consistency: enough experts, a possible top-k, calibration text for the
/// inits that need it (one file per expert, no domain twice), a writable destination.
fn check_options(o: &MergeOptions) -> Result<()> {
    let n = o.experts.len();
    ensure!(n >= 2, "a merge needs at least two experts (got {n})");
    if o.top_k == 0 || o.top_k > n {
        bail!("--top-k {} must be between 1 and the number of experts ({n})", o.top_k);
    }
    o.output.check_destination(&o.out)?;
    if o.router.init.needs_calibration() && o.calib.is_empty() {
        bail!("--router-init {} needs calibration text: --calib NAME=FILE.jsonl for each expert", o.router.init.as_str());
    }
    if !o.calib.is_empty() && o.calib.len() != n {
        bail!("--calib: got {} files for {n} experts (give one NAME=FILE.jsonl per expert, in expert order)", o.calib.len());
    }
    let mut seen = std::collections::HashSet::new();
    for (name, _) in &o.calib {
        ensure!(seen.insert(name), "--calib: domain `{name}` is given twice");
    }
    Ok(())
}

/// Open the experts (dense, one trunk, one FFN width, one tokenizer) and the optional
/// non-expert source and shared expert; the lineage warnings the inputs raise.
fn open_sources(o: &MergeOptions) -> Result<(Sources, Vec<String>)> {
    let n = o.experts.len();
    let experts = o.experts.iter().map(|p| open(p, "expert")).collect::<Result<Vec<_>>>()?;
    for c in &experts {
        crate::checks::require_dense(c, "expert")?;
    }
    for c in &experts[1..] {
        crate::checks::same_trunk(&experts[0], c)?;
        if c.config.intermediate_size != experts[0].config.intermediate_size {
            bail!(
                "expert FFN width mismatch: {} has intermediate_size {}, {} has {}",
                experts[0].dir().display(),
                experts[0].config.intermediate_size,
                c.dir().display(),
                c.config.intermediate_size
            );
        }
    }
    let refs: Vec<&Checkpoint> = experts.iter().collect();
    crate::checks::same_tokenizer(&refs)?;
    let warnings = crate::checks::lineage_warnings(&refs);
    let weights = match &o.non_expert {
        NonExpert::Average => vec![1.0 / n as f64; n],
        NonExpert::Weighted(w) => {
            ensure!(w.len() == n, "--weights: got {} weights for {n} experts", w.len());
            ensure!(w.iter().all(|x| x.is_finite() && *x >= 0.0), "--weights must be non-negative numbers");
            let total: f64 = w.iter().sum();
            ensure!(total > 0.0, "--weights sum to zero");
            w.iter().map(|x| x / total).collect()
        }
        NonExpert::From(_) => vec![],
    };
    let from = match &o.non_expert {
        NonExpert::From(p) => {
            let c = open(p, "--non-expert from:")?;
            crate::checks::same_trunk(&experts[0], &c)?;
            crate::checks::same_tokenizer(&[&experts[0], &c])?;
            Some(c)
        }
        _ => None,
    };
    let shared = match &o.shared_expert {
        Some(p) => {
            let c = open(p, "--shared-expert")?;
            crate::checks::require_dense(&c, "--shared-expert")?;
            crate::checks::same_trunk(&experts[0], &c)?;
            Some(c)
        }
        None => None,
    };
    let scale = merge_scale(o.routing, n, o.top_k);
    Ok((Sources { experts, weights, from, shared, scale }, warnings))
}

/// The merged model's config: the experts' trunk with an MoE of their FFNs (and the shared
/// expert's, if any).
fn merged_config(o: &MergeOptions, sources: &Sources) -> Result<ModelConfig> {
    let base = &sources.experts[0].config;
    let mut cfg = base.clone();
    cfg.moe = Some(MoeConfig {
        experts: sources.experts.len(),
        top_k: o.top_k,
        routing: o.routing,
        expert_ffn: base.intermediate_size,
        shared_expert: sources.shared.as_ref().map(|c| SharedExpertConfig { ffn: c.config.intermediate_size, gated: false }),
        dense_layers: vec![],
    });
    cfg.validate()?;
    cfg.to_hf()?;
    Ok(cfg)
}

/// Routers computed from calibration text, layer by layer, with what each layer's routing
/// accuracy was; empty without calibration text (the routers are then made when written).
#[derive(Default)]
struct CalibratedRouters {
    routers: HashMap<usize, Tensor>,
    layer_reports: Vec<Value>,
    domains: Vec<CalibDomain>,
}

/// Initialise each MoE layer's router on the merged model's own FFN inputs (centroid, fit;
/// random and zero rows are scored too), one layer at a time ([`calibrate_layerwise`]).
fn calibrate_routers(o: &MergeOptions, cfg: &ModelConfig, sources: &Sources) -> Result<CalibratedRouters> {
    let mut out = CalibratedRouters::default();
    if o.calib.is_empty() {
        return Ok(out);
    }
    let (n, hidden, init) = (sources.experts.len(), cfg.hidden_size, o.router.init);
    out.domains = load_calibration(&o.calib, &sources.experts[0], &o.router.calib)?;
    let fixed_router = |layer: usize| o.router.uncalibrated(n, hidden, layer);
    let mut model = in_memory_model(cfg, &mut |name| match classify(name) {
        Slot::Router { layer } => fixed_router(layer),
        _ => Ok(sources.tensor(name)?),
    })?;
    let names: Vec<String> = out.domains.iter().map(|d| d.name.clone()).collect();
    let (routers, layer_reports) = (&mut out.routers, &mut out.layer_reports);
    calibrate_layerwise(&mut model, &out.domains, &o.router.calib, |f| {
        if !cfg.is_moe_layer(f.layer) {
            return Ok(None);
        }
        let mut report = Map::new();
        let weight = match init {
            RouterInit::Random | RouterInit::Zero => fixed_router(f.layer)?,
            RouterInit::Centroid | RouterInit::Fit => {
                let c =
                    centroid_router(&f.train, o.router.target_prob).with_context(|| format!("centroid router for layer {}", f.layer))?;
                report.insert("temperature".into(), json!(c.temperature));
                report.insert("own_probability".into(), json!(c.own_probability));
                if init == RouterInit::Centroid {
                    c.weight
                } else {
                    let x = Tensor::cat(&f.train, 0)?;
                    let mut labels = vec![];
                    let mut sw = vec![];
                    for (e, t) in f.train.iter().enumerate() {
                        let m = t.dim(0)?;
                        labels.extend(std::iter::repeat_n(e as u32, m));
                        // Every domain counts equally, however many tokens it has.
                        sw.extend(std::iter::repeat_n(1.0 / m as f32, m));
                    }
                    fit_softmax_regression(&x, &labels, &sw, &c.weight, &vec![true; n], &o.router.fit)?
                }
            }
        };
        let acc = routing_accuracy(&weight, &f.heldout)?;
        let mean = acc.iter().sum::<f64>() / acc.len() as f64;
        report.insert("layer".into(), json!(f.layer));
        report.insert("mean".into(), json!(mean));
        report.insert("per_domain".into(), Value::Object(names.iter().zip(&acc).map(|(k, v)| (k.clone(), json!(v))).collect()));
        layer_reports.push(Value::Object(report));
        routers.insert(f.layer, weight.clone());
        Ok(Some(weight))
    })?;
    Ok(out)
}

/// The merged model's lineage: its experts (domains, seeds), routing, scale, non-expert and
/// router settings, calibration and its accuracy, and the warnings (the inputs' and a too-low
/// own-domain probability).
fn merge_lineage(o: &MergeOptions, sources: &Sources, calibrated: &CalibratedRouters, warnings: &mut Vec<String>) -> Result<Lineage> {
    let domains = &calibrated.domains;
    let mut lineage = Lineage::new("merge");
    for (i, c) in sources.experts.iter().enumerate() {
        let domain = match domains.get(i) {
            Some(d) => Some(d.name.clone()),
            None => c.lineage()?.and_then(|l| l.domain),
        };
        lineage.parents.push(parent_of(c, domain)?);
    }
    let x = &mut lineage.extra;
    x.insert(
        "experts".into(),
        json!(lineage
            .parents
            .iter()
            .zip(&sources.experts)
            .enumerate()
            .map(|(i, (p, c))| json!({"index": i, "uri": p.uri, "domain": p.domain, "seed": crate::checks::seed_of(c)}))
            .collect::<Vec<_>>()),
    );
    x.insert("top_k".into(), json!(o.top_k));
    x.insert("routing".into(), json!(o.routing.as_str()));
    x.insert("scale".into(), json!(sources.scale));
    x.insert("expert_output_scale".into(), json!(sources.scale));
    x.insert(
        "non_expert".into(),
        match &o.non_expert {
            NonExpert::Average => json!({"method": "average"}),
            NonExpert::Weighted(_) => json!({"method": "weighted", "weights": sources.weights}),
            NonExpert::From(p) => json!({"method": "from", "uri": p.display().to_string()}),
        },
    );
    x.insert("shared_expert".into(), json!(o.shared_expert.as_ref().map(|p| p.display().to_string())));
    let mut router = json!({"method": o.router.init.as_str()});
    match o.router.init {
        RouterInit::Random => {
            router["std"] = json!(o.router.std);
            router["seed"] = json!(o.router.seed);
        }
        RouterInit::Zero => {}
        RouterInit::Centroid => router["target_probability"] = json!(o.router.target_prob),
        RouterInit::Fit => {
            router["target_probability"] = json!(o.router.target_prob);
            router["fit"] =
                json!({"steps": o.router.fit.steps, "lr": o.router.fit.lr, "momentum": o.router.fit.momentum, "l2": o.router.fit.l2});
        }
    }
    x.insert("router_init".into(), router);
    if !domains.is_empty() {
        x.insert(
            "calibration".into(),
            json!(domains
                .iter()
                .map(|d| json!({"domain": d.name, "file": d.path.display().to_string(), "tokens": d.tokens()}))
                .collect::<Vec<_>>()),
        );
        x.insert(
            "calibration_settings".into(),
            json!({"seq_len": o.router.calib.seq_len, "max_tokens": o.router.calib.max_tokens, "heldout_fraction": o.router.calib.heldout_fraction}),
        );
        x.insert("routing_accuracy".into(), Value::Array(calibrated.layer_reports.clone()));
    }
    if let Some(low) = lowest_own_probability(x, o.router.target_prob) {
        warnings.push(low);
    }
    if !warnings.is_empty() {
        x.insert("warnings".into(), json!(warnings));
    }
    Ok(lineage)
}

/// A warning when some layer's centroid temperature could not reach the target probability.
fn lowest_own_probability(extra: &Map<String, Value>, target: f64) -> Option<String> {
    let layers = extra.get("routing_accuracy")?.as_array()?;
    let short: Vec<String> = layers
        .iter()
        .filter_map(|l| {
            let p = l.get("own_probability")?.as_f64()?;
            (p < target - 1e-3).then(|| format!("layer {}: {p:.3}", l["layer"]))
        })
        .collect();
    (!short.is_empty())
        .then(|| format!("the centroid router could not reach target probability {target} (domains overlap) — {}", short.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{domain_texts, fixture, logits, perturbed, ppl, rel_diff, write_jsonl};
    use std::path::Path;

    /// Three experts of the llama fixture with different FFNs, and a calibration file per domain.
    fn setup(tmp: &Path) -> (Vec<PathBuf>, Vec<(String, PathBuf)>) {
        let domains = ["prose", "code", "digits"];
        let experts = domains
            .iter()
            .enumerate()
            .map(|(i, d)| perturbed(&fixture("llama"), &tmp.join(format!("expert-{d}")), i as u64 + 1, 0.5, false, d))
            .collect();
        let calib =
            domains.iter().map(|d| (d.to_string(), write_jsonl(&tmp.join(format!("{d}.jsonl")), &domain_texts(d, 40, 0)))).collect();
        (experts, calib)
    }

    fn lineage(dir: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(dir.join("btm.json")).unwrap()).unwrap()
    }

    #[test]
    fn merging_copies_of_one_model_is_exact_in_both_routing_modes() {
        // E identical experts: any top-k mixes copies of the same FFN, with weights summing to 1
        // (topk_then_softmax), or to k/E under a zero router times the baked scale E/k.
        let tmp = tempfile::tempdir().unwrap();
        let copies = vec![fixture("llama"); 4];
        for (routing, init, k) in [
            (Routing::TopkThenSoftmax, RouterInit::Random, 2),
            (Routing::SoftmaxThenTopk, RouterInit::Zero, 2),
            (Routing::SoftmaxThenTopk, RouterInit::Zero, 1),
        ] {
            let out = tmp.path().join(format!("{}-{k}", routing.as_str()));
            let mut o = MergeOptions::new(copies.clone(), &out);
            (o.routing, o.router.init, o.top_k, o.router.std) = (routing, init, k, 1.0);
            let report = merge(&o).unwrap();
            assert!(report.warnings.is_empty(), "{:?}", report.warnings);
            let d = rel_diff(&logits(&fixture("llama")), &logits(&out));
            assert!(d <= 1e-5, "{routing:?} k={k}: {d}");
            let scale = lineage(&out)["scale"].as_f64().unwrap();
            assert_eq!(scale, if routing == Routing::SoftmaxThenTopk { 4.0 / k as f64 } else { 1.0 });
        }
    }

    /// Qwen3 experts merge into a Qwen3-MoE (q/k norms kept, averaged like the rest of the
    /// trunk); copies of one model give back its function in both routing modes.
    #[test]
    fn qwen3_experts_merge_into_a_qwen3_moe() {
        let tmp = tempfile::tempdir().unwrap();
        let copies = vec![fixture("qwen3"); 3];
        for (routing, init, k) in [(Routing::TopkThenSoftmax, RouterInit::Random, 2), (Routing::SoftmaxThenTopk, RouterInit::Zero, 1)] {
            let out = tmp.path().join(format!("qwen3-{}", routing.as_str()));
            let mut o = MergeOptions::new(copies.clone(), &out);
            (o.routing, o.router.init, o.top_k, o.router.std) = (routing, init, k, 1.0);
            let report = merge(&o).unwrap();
            assert_eq!(report.config.output_architecture(), btm_model::Architecture::Qwen3Moe);
            let ck = Checkpoint::open(&out).unwrap();
            assert_eq!(ck.architecture, btm_model::Architecture::Qwen3Moe);
            assert!(ck.config.qk_norm && ck.config.head_dim == 16);
            let d = rel_diff(&logits(&fixture("qwen3")), &logits(&out));
            assert!(d <= 1e-5, "{routing:?} k={k}: {d}");
        }
        // Different experts: the q/k norm weights are averaged as non-expert weights.
        let a = perturbed(&fixture("qwen3"), &tmp.path().join("a"), 1, 0.5, true, "a");
        let b = perturbed(&fixture("qwen3"), &tmp.path().join("b"), 2, 0.5, true, "b");
        let out = tmp.path().join("qwen3-ab");
        merge(&MergeOptions::new(vec![a.clone(), b.clone()], &out)).unwrap();
        let name = "model.layers.1.self_attn.k_norm.weight";
        let t = |dir: &Path| Checkpoint::open(dir).unwrap().tensor(name).unwrap();
        let want = ((t(&a) + t(&b)).unwrap() * 0.5).unwrap();
        assert!(rel_diff(&want, &t(&out)) < 1e-6);
        assert!(rel_diff(&t(&a), &t(&out)) > 1e-3, "the experts' k_norm weights should differ");
        assert!(ppl(&out).is_finite());
    }

    /// OLMo2 experts merge into a FlexOlmo (post-norms and full-width q/k norms kept, averaged
    /// like the rest of the trunk); copies of one model give back its function in both routing
    /// modes.
    #[test]
    fn olmo2_experts_merge_into_a_flex_olmo() {
        let tmp = tempfile::tempdir().unwrap();
        let copies = vec![fixture("olmo2"); 3];
        for (routing, init, k) in [(Routing::TopkThenSoftmax, RouterInit::Random, 2), (Routing::SoftmaxThenTopk, RouterInit::Zero, 1)] {
            let out = tmp.path().join(format!("olmo2-{}", routing.as_str()));
            let mut o = MergeOptions::new(copies.clone(), &out);
            (o.routing, o.router.init, o.top_k, o.router.std) = (routing, init, k, 1.0);
            let report = merge(&o).unwrap();
            assert_eq!(report.config.output_architecture(), btm_model::Architecture::FlexOlmo);
            let ck = Checkpoint::open(&out).unwrap();
            assert_eq!(ck.architecture, btm_model::Architecture::FlexOlmo);
            assert!(ck.config.post_norms && ck.config.qk_norm_full);
            let d = rel_diff(&logits(&fixture("olmo2")), &logits(&out));
            assert!(d <= 1e-5, "{routing:?} k={k}: {d}");
        }
        // Different experts: the post-FFN norm and q norm weights are averaged as trunk weights.
        let a = perturbed(&fixture("olmo2"), &tmp.path().join("a"), 1, 0.5, true, "a");
        let b = perturbed(&fixture("olmo2"), &tmp.path().join("b"), 2, 0.5, true, "b");
        let out = tmp.path().join("olmo2-ab");
        merge(&MergeOptions::new(vec![a.clone(), b.clone()], &out)).unwrap();
        for name in ["model.layers.1.self_attn.q_norm.weight", "model.layers.0.post_feedforward_layernorm.weight"] {
            let t = |dir: &Path| Checkpoint::open(dir).unwrap().tensor(name).unwrap();
            let want = ((t(&a) + t(&b)).unwrap() * 0.5).unwrap();
            assert!(rel_diff(&want, &t(&out)) < 1e-6, "{name}");
            assert!(rel_diff(&t(&a), &t(&out)) > 1e-3, "the experts' {name} should differ");
        }
        assert!(ppl(&out).is_finite());
    }

    #[test]
    fn centroid_and_fit_routers_send_domains_to_their_experts() {
        let tmp = tempfile::tempdir().unwrap();
        let (experts, calib) = setup(tmp.path());
        // A tiny random model: tokens such as spaces look alike in every domain, so routing is
        // far from perfect, but well above chance (1/3); the fitted router beats the centroid.
        let mut first_layer = vec![];
        for init in [RouterInit::Centroid, RouterInit::Fit] {
            let out = tmp.path().join(init.as_str());
            let mut o = MergeOptions::new(experts.clone(), &out);
            o.router.init = init;
            o.calib = calib.clone();
            o.router.calib.seq_len = 32;
            merge(&o).unwrap();
            let l = lineage(&out);
            assert_eq!(l["kind"], "merge");
            assert_eq!(l["parents"][2]["domain"], "digits");
            let layers = l["routing_accuracy"].as_array().unwrap();
            assert_eq!(layers.len(), 2);
            for layer in layers {
                let acc = layer["mean"].as_f64().unwrap();
                assert!(acc > 0.55, "{init:?}: held-out routing accuracy {layer}");
            }
            first_layer.push(layers[0]["mean"].as_f64().unwrap());
            let ck = Checkpoint::open(&out).unwrap();
            assert_eq!(ck.architecture, btm_model::Architecture::Mixtral);
            assert!(ppl(&out).is_finite());
        }
        assert!(first_layer[1] > first_layer[0] + 0.05, "fit {} vs centroid {}", first_layer[1], first_layer[0]);
    }

    #[test]
    fn bfloat16_experts_give_a_bfloat16_moe() {
        let tmp = tempfile::tempdir().unwrap();
        let (experts, _) = setup(tmp.path());
        let bf16 = |i: usize| {
            let dest = tmp.path().join(format!("bf16-{i}"));
            let opts = btm_model::WriteOptions { dtype: DType::BF16, ..Default::default() };
            btm_model::checkpoint::rewrite(&Checkpoint::open(&experts[i]).unwrap(), &dest, &opts, None).unwrap();
            dest
        };
        let (a, b) = (bf16(0), bf16(1));
        let out = tmp.path().join("moe-bf16");
        let mut o = MergeOptions::new(vec![a.clone(), b], &out);
        o.routing = Routing::SoftmaxThenTopk;
        merge(&o).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        assert_eq!(ck.dtype(), DType::BF16);
        // The scale E/k = 1 here, so expert FFNs are copied bit for bit.
        let got = ck.tensor("model.layers.1.mlp.experts.0.gate_proj.weight").unwrap();
        let want = Checkpoint::open(&a).unwrap().tensor("model.layers.1.mlp.gate_proj.weight").unwrap();
        assert_eq!(rel_diff(&want.to_dtype(DType::F32).unwrap(), &got.to_dtype(DType::F32).unwrap()), 0.0);
        assert!(ppl(&out).is_finite());
    }

    #[test]
    fn non_expert_weights_average_weighted_or_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let a = perturbed(&fixture("llama"), &tmp.path().join("a"), 1, 0.5, true, "a");
        let b = perturbed(&fixture("llama"), &tmp.path().join("b"), 2, 0.5, true, "b");
        let name = "model.layers.1.self_attn.q_proj.weight";
        let t = |dir: &Path, n: &str| Checkpoint::open(dir).unwrap().tensor(n).unwrap();
        let (ta, tb) = (t(&a, name), t(&b, name));
        for (mode, want) in [
            (NonExpert::Average, ((&ta + &tb).unwrap() * 0.5).unwrap()),
            (NonExpert::Weighted(vec![1.0, 3.0]), ((&ta * 0.25).unwrap() + (&tb * 0.75).unwrap()).unwrap()),
            (NonExpert::From(b.clone()), tb.clone()),
        ] {
            let out = tmp.path().join(format!("{mode:?}").replace(['/', '"', ' '], "_"));
            let mut o = MergeOptions::new(vec![a.clone(), b.clone()], &out);
            o.non_expert = mode.clone();
            merge(&o).unwrap();
            let got = t(&out, name);
            assert!(rel_diff(&want, &got) < 1e-6, "{mode:?}");
            // Expert FFNs are copied as they are.
            let e1 = t(&out, "model.layers.0.mlp.experts.1.up_proj.weight");
            assert_eq!(rel_diff(&t(&b, "model.layers.0.mlp.up_proj.weight"), &e1), 0.0);
        }
        assert_eq!("weighted".parse::<NonExpert>().unwrap(), NonExpert::Weighted(vec![]));
        assert_eq!("from:/x".parse::<NonExpert>().unwrap(), NonExpert::From("/x".into()));
        assert!("from:".parse::<NonExpert>().unwrap_err().contains("expected average"));
        assert_eq!(NonExpert::From("/x".into()).to_string(), "from:/x");
    }

    #[test]
    fn shared_expert_is_kept_always_on() {
        let tmp = tempfile::tempdir().unwrap();
        let (experts, _) = setup(tmp.path());
        let out = tmp.path().join("shared");
        let mut o = MergeOptions::new(experts[..2].to_vec(), &out);
        o.shared_expert = Some(fixture("llama"));
        o.routing = Routing::SoftmaxThenTopk;
        o.top_k = 1;
        merge(&o).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        assert_eq!(ck.architecture, btm_model::Architecture::Qwen2Moe);
        let shared = ck.config.moe.as_ref().unwrap().shared_expert.clone().unwrap();
        assert_eq!(shared.ffn, 64);
        // Written ungated as Qwen2-MoE needs: zero sigmoid gate (σ = ½) and a doubled down_proj.
        let seed = Checkpoint::open(fixture("llama")).unwrap();
        let want = (seed.tensor("model.layers.1.mlp.down_proj.weight").unwrap() * 2.0).unwrap();
        let got = ck.tensor("model.layers.1.mlp.shared_expert.down_proj.weight").unwrap();
        assert_eq!(rel_diff(&want, &got), 0.0);
        // The expert's down_proj carries the scale E/k = 2.
        let e0 = ck.tensor("model.layers.0.mlp.experts.0.down_proj.weight").unwrap();
        let src = Checkpoint::open(&experts[0]).unwrap().tensor("model.layers.0.mlp.down_proj.weight").unwrap();
        assert_eq!(rel_diff(&(src * 2.0).unwrap(), &e0), 0.0);
        assert!(ppl(&out).is_finite());
    }

    #[test]
    fn bad_inputs_are_clear_errors_and_write_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (experts, calib) = setup(tmp.path());
        let out = tmp.path().join("out");
        let run = |f: &dyn Fn(&mut MergeOptions)| {
            let mut o = MergeOptions::new(experts[..2].to_vec(), &out);
            f(&mut o);
            let err = format!("{:#}", merge(&o).unwrap_err());
            assert!(!out.exists(), "{err}");
            err
        };
        assert!(run(&|o| o.top_k = 3).contains("--top-k 3 must be between 1 and the number of experts (2)"));
        assert!(run(&|o| o.experts.push(fixture("qwen2"))).contains("architecture mismatch"));
        assert!(run(&|o| o.experts.push(fixture("mixtral"))).contains("already a Mixture of Experts"));
        // Families do not mix: a Qwen3 expert beside Llama ones is refused by name.
        let err = run(&|o| o.experts[1] = fixture("qwen3"));
        assert!(err.contains("(LlamaForCausalLM vs Qwen3ForCausalLM)") && err.contains("qk_norm: false vs true"), "{err}");
        // Qwen3-MoE has no shared expert.
        let qwen3 = |o: &mut MergeOptions| {
            o.experts = vec![fixture("qwen3"), fixture("qwen3")];
            o.shared_expert = Some(fixture("qwen3"));
        };
        assert!(run(&qwen3).contains("a shared expert in a Qwen3-MoE"));
        // Nor do OLMo2 and Qwen3, though both have q/k norms.
        let err = run(&|o| o.experts = vec![fixture("qwen3"), fixture("olmo2")]);
        assert!(err.contains("(Qwen3ForCausalLM vs Olmo2ForCausalLM)") && err.contains("post_norms: false vs true"), "{err}");
        // FlexOlmo has no shared expert either.
        let olmo2 = |o: &mut MergeOptions| {
            o.experts = vec![fixture("olmo2"), fixture("olmo2")];
            o.shared_expert = Some(fixture("olmo2"));
        };
        assert!(run(&olmo2).contains("a shared expert in a model written as FlexOlmoForCausalLM"));
        let missing = |o: &mut MergeOptions| {
            o.router.init = RouterInit::Centroid;
            o.calib = vec![calib[0].clone(), ("code".into(), "/nonexistent/code.jsonl".into())];
        };
        assert!(run(&missing).contains("calibration file for `code` not found: /nonexistent/code.jsonl"));
        let empty = write_jsonl(&tmp.path().join("empty.jsonl"), &[]);
        let with_empty = |o: &mut MergeOptions| {
            o.router.init = RouterInit::Fit;
            o.calib = vec![calib[0].clone(), ("code".into(), empty.clone())];
        };
        assert!(run(&with_empty).contains("is empty"));
        assert!(run(&|o| o.router.init = RouterInit::Centroid).contains("needs calibration text"));

        // A different tokenizer is an error.
        let other = tmp.path().join("other-tokenizer");
        std::fs::create_dir(&other).unwrap();
        for f in std::fs::read_dir(&experts[1]).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, other.join(f.file_name().unwrap())).unwrap();
        }
        let mut tok: Value = serde_json::from_slice(&std::fs::read(other.join("tokenizer.json")).unwrap()).unwrap();
        tok["model"]["merges"].as_array_mut().unwrap().pop();
        std::fs::write(other.join("tokenizer.json"), tok.to_string()).unwrap();
        std::fs::remove_file(other.join("MANIFEST.json")).unwrap();
        let err = run(&|o| o.experts[1] = other.clone());
        assert!(err.contains("tokenizer mismatch"), "{err}");

        // A lineage mismatch is only a warning.
        let mut l: Value = lineage(&other);
        l["parents"][0]["manifest_sha256"] = json!("another-seed");
        std::fs::write(other.join("btm.json"), l.to_string()).unwrap();
        std::fs::copy(experts[1].join("tokenizer.json"), other.join("tokenizer.json")).unwrap();
        let mut o = MergeOptions::new(vec![experts[0].clone(), other.clone()], &out);
        o.top_k = 1;
        let report = merge(&o).unwrap();
        assert!(report.warnings[0].contains("lineage mismatch"), "{:?}", report.warnings);
        assert!(lineage(&out)["warnings"][0].as_str().unwrap().contains("lineage mismatch"));
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
