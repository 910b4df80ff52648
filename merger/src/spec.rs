//! The job specs of the merger's commands: `btm merge`, `btm upcycle`, `btm add-expert` and
//! `btm remove-expert`.
//!
//! Each is one definition of the job: serde for the job file a pipeline's plan writes
//! (`btm <kind> --spec FILE`), JSON Schema for `btm schema`, and (with the `clap` feature) the
//! command's flags, which flatten into the same struct. A default is written once, in the
//! struct's `Default`, and the flags read it from there. The shared parts, [`RouterSpec`] and
//! [`OutputSpec`], are flattened by the command beside the spec.

use crate::add_expert::{AddExpertOptions, NonExpertOnAdd};
use crate::merge::{MergeOptions, NonExpert};
use crate::remove_expert::RemoveExpertOptions;
use crate::router_init::{FitOptions, GuardOptions, RouterInit, RouterOptions, DEFAULT_ROUTER_STD, DEFAULT_TARGET_PROB};
use crate::upcycle::UpcycleOptions;
use crate::{calib::CalibOptions, OutputOptions, ScalingMode};
use btm_kernels::Routing;
use btm_model::DType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How a command writes its checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct OutputSpec {
    /// Dtype on disk (default: the input's).
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub dtype: Option<DType>,
    /// Largest shard in MiB.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = OutputSpec::default().shard_mb))]
    pub shard_mb: u64,
    /// Replace --out if it exists.
    #[cfg_attr(feature = "clap", arg(long))]
    pub overwrite: bool,
}

impl Default for OutputSpec {
    fn default() -> Self {
        Self { dtype: None, shard_mb: OutputOptions::default().max_shard_bytes >> 20, overwrite: false }
    }
}

impl OutputSpec {
    /// The merger's output options.
    pub fn options(&self) -> OutputOptions {
        OutputOptions { dtype: self.dtype.map(DType::candle), max_shard_bytes: self.shard_mb << 20, overwrite: self.overwrite }
    }
}

/// How the router is initialised, for `btm merge` and `btm add-expert`; defaults are
/// [`RouterOptions::default`]'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct RouterSpec {
    /// How the router is initialised (default: centroid with calibration text, else random).
    #[cfg_attr(feature = "clap", arg(long = "router-init"))]
    pub init: Option<RouterInit>,
    /// Std of a random router.
    #[cfg_attr(feature = "clap", arg(long = "router-std", default_value_t = RouterSpec::default().std))]
    pub std: f64,
    /// Seed of a random router.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = RouterSpec::default().seed))]
    pub seed: u64,
    /// Centroid: mean probability a calibration token gives its own domain's expert.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = RouterSpec::default().target_prob))]
    pub target_prob: f64,
    /// Fit: gradient steps of softmax regression per layer.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = RouterSpec::default().fit_steps))]
    pub fit_steps: usize,
    /// Calibration window length in tokens.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = RouterSpec::default().calib_seq_len))]
    pub calib_seq_len: usize,
    /// Calibration tokens per domain (the last 20 % are held out for routing accuracy).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = RouterSpec::default().calib_tokens))]
    pub calib_tokens: usize,
}

impl Default for RouterSpec {
    fn default() -> Self {
        let o = RouterOptions::default();
        Self {
            init: None,
            std: DEFAULT_ROUTER_STD,
            seed: o.seed,
            target_prob: DEFAULT_TARGET_PROB,
            fit_steps: o.fit.steps,
            calib_seq_len: o.calib.seq_len,
            calib_tokens: o.calib.max_tokens,
        }
    }
}

impl RouterSpec {
    /// The merger's router options; `calibrated`: whether calibration text was given.
    pub fn options(&self, calibrated: bool) -> RouterOptions {
        let defaults = RouterOptions::default();
        RouterOptions {
            init: self.init.unwrap_or(RouterInit::default_for(calibrated)),
            std: self.std,
            seed: self.seed,
            target_prob: self.target_prob,
            fit: FitOptions { steps: self.fit_steps, ..defaults.fit },
            calib: CalibOptions { seq_len: self.calib_seq_len, max_tokens: self.calib_tokens, ..defaults.calib },
        }
    }
}

/// `btm merge`: trained dense experts into one MoE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct MergeSpec {
    /// Dense expert checkpoints (directories or URLs); expert i's FFN becomes expert i.
    #[cfg_attr(feature = "clap", arg(long, num_args = 1.., required_unless_present = "mergekit_config"))]
    pub experts: Vec<String>,
    /// The merged MoE's folder (or object-store URL).
    #[cfg_attr(feature = "clap", arg(long))]
    pub out: String,
    /// Experts per token.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = default_top_k()))]
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// topk_then_softmax (Mixtral) or softmax_then_topk (Qwen2-MoE, norm_topk_prob false).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = default_routing()))]
    #[serde(default = "default_routing")]
    pub routing: Routing,
    /// How the router is initialised. (Its flags are the command's own: clap's `Option` of a
    /// flattened struct cannot hold a flattened struct.)
    #[cfg_attr(feature = "clap", arg(skip))]
    #[serde(default)]
    pub router: RouterSpec,
    /// Calibration text per expert, in expert order: NAME=FILE.jsonl …
    #[cfg_attr(feature = "clap", arg(long, num_args = 1..))]
    #[serde(default)]
    pub calib: Vec<String>,
    /// Non-expert weights: average (BTX) | weighted (with --weights) | from:CKPT.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = NonExpert::Average))]
    #[serde(default)]
    pub non_expert: NonExpert,
    /// One weight per expert for --non-expert weighted.
    #[cfg_attr(feature = "clap", arg(long, num_args = 1..))]
    #[serde(default)]
    pub weights: Option<Vec<f64>>,
    /// Keep this dense model's FFN as an always-on shared expert.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub shared_expert: Option<String>,
    /// How the checkpoint is written (flags: as for `router`).
    #[cfg_attr(feature = "clap", arg(skip))]
    #[serde(default)]
    pub output: OutputSpec,
}

fn default_top_k() -> usize {
    MergeOptions::new(vec![], "").top_k
}
fn default_routing() -> Routing {
    MergeOptions::new(vec![], "").routing
}

/// `btm upcycle`: a dense model into an MoE that computes the same function (He et al. 2024).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct UpcycleSpec {
    /// The dense model (directory or URL).
    #[cfg_attr(feature = "clap", arg(long))]
    pub model: String,
    /// Number of experts E (a multiple of the granularity).
    #[cfg_attr(feature = "clap", arg(long))]
    pub experts: usize,
    /// Experts per token k (a multiple of the granularity).
    #[cfg_attr(feature = "clap", arg(long))]
    pub top_k: usize,
    /// G = dense FFN width / expert width.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = upcycle_defaults().granularity))]
    #[serde(default = "default_granularity")]
    pub granularity: usize,
    /// topk_then_softmax (Mixtral) or softmax_then_topk (Qwen2-MoE, norm_topk_prob false).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = upcycle_defaults().routing))]
    #[serde(default = "default_upcycle_routing")]
    pub routing: Routing,
    /// exact (√a on up and down) or megatron (a^(1/3) on gate, up and down).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = upcycle_defaults().scaling))]
    #[serde(default = "default_scaling")]
    pub scaling: ScalingMode,
    /// Std of the router's random rows (0: zero router).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = upcycle_defaults().router_std))]
    #[serde(default = "default_router_std")]
    pub router_std: f64,
    /// Seed of the router's random rows.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = upcycle_defaults().seed))]
    #[serde(default)]
    pub seed: u64,
    /// The upcycled MoE's folder (or object-store URL).
    #[cfg_attr(feature = "clap", arg(long))]
    pub out: String,
    /// How the checkpoint is written (flags: as for `router`).
    #[cfg_attr(feature = "clap", arg(skip))]
    #[serde(default)]
    pub output: OutputSpec,
}

/// [`UpcycleOptions::new`]: where the upcycle's defaults are written.
fn upcycle_defaults() -> UpcycleOptions {
    UpcycleOptions::new("", "", 1, 1)
}
fn default_upcycle_routing() -> Routing {
    upcycle_defaults().routing
}
fn default_granularity() -> usize {
    upcycle_defaults().granularity
}
fn default_scaling() -> ScalingMode {
    upcycle_defaults().scaling
}
fn default_router_std() -> f64 {
    upcycle_defaults().router_std
}

/// `btm add-expert`: a dense model's FFN appended to an MoE as a new expert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct AddExpertSpec {
    /// The existing MoE (directory or URL).
    #[cfg_attr(feature = "clap", arg(long))]
    pub moe: String,
    /// The dense model whose FFN becomes the new expert.
    #[cfg_attr(feature = "clap", arg(long))]
    pub expert: String,
    /// The extended MoE's folder (or object-store URL).
    #[cfg_attr(feature = "clap", arg(long))]
    pub out: String,
    /// Calibration text of the new expert's domain (JSONL).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub calib: Option<String>,
    /// The new domain's name (default: the expert's btm.json domain).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub name: Option<String>,
    /// Text of the existing domains to centre against (default: the calibration files recorded
    /// in the MoE's btm.json).
    #[cfg_attr(feature = "clap", arg(long, num_args = 1..))]
    #[serde(default)]
    pub background: Vec<String>,
    /// How the router is initialised. (Its flags are the command's own: clap's `Option` of a
    /// flattened struct cannot hold a flattened struct.)
    #[cfg_attr(feature = "clap", arg(skip))]
    #[serde(default)]
    pub router: RouterSpec,
    /// The margin guard's δ in logits: on the old domains' calibration tokens, the new row stays
    /// this far below each token's k-th largest old logit, so old tokens keep their top-k.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = GuardOptions::default().margin))]
    #[serde(default = "default_margin")]
    pub margin: f64,
    /// Keep the centroid or fitted row as it is (old tokens may then route to the new expert).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub no_guard: bool,
    /// Share of the old domains' calibration tokens the guard may leave above the bound: 0
    /// holds every one (old domains first); more lets the new expert take tokens the old domains
    /// share with the new one (the report gives the measured leak on held-out text).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = GuardOptions::default().tolerance))]
    #[serde(default)]
    pub guard_tolerance: f64,
    /// Gradient steps per penalty weight of the guard.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = GuardOptions::default().steps))]
    #[serde(default = "default_guard_steps")]
    pub guard_steps: usize,
    /// The extended MoE's non-expert weights.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = NonExpertOnAdd::default()))]
    #[serde(default)]
    pub non_expert: NonExpertOnAdd,
    /// How the checkpoint is written (flags: as for `router`).
    #[cfg_attr(feature = "clap", arg(skip))]
    #[serde(default)]
    pub output: OutputSpec,
}

fn default_margin() -> f64 {
    GuardOptions::default().margin
}
fn default_guard_steps() -> usize {
    GuardOptions::default().steps
}

/// `btm remove-expert`: one expert (and its router rows) dropped from an MoE; the inverse of
/// `btm add-expert`, bit for bit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct RemoveExpertSpec {
    /// The MoE (directory or URL).
    #[cfg_attr(feature = "clap", arg(long))]
    pub moe: String,
    /// 0-based index of the expert to remove (`btm inspect` lists them; an added expert is the last).
    #[cfg_attr(feature = "clap", arg(long))]
    pub expert: usize,
    /// Output folder (written atomically, manifest last).
    #[cfg_attr(feature = "clap", arg(long))]
    pub out: String,
    /// Replace an existing output folder.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub overwrite: bool,
}

/// Local folders of the spec's locations: object-store URLs are fetched into the cache (an
/// input) or written locally and published by the caller (the output).
type Local = fn(&str) -> anyhow::Result<PathBuf>;

impl MergeSpec {
    /// The merge this spec asks for, writing `out`; `local` makes an input location local and
    /// `fetch` a calibration file.
    pub fn options(&self, out: &Path, local: Local, fetch: Local) -> anyhow::Result<MergeOptions> {
        let experts = self.experts.iter().map(|e| local(e)).collect::<anyhow::Result<Vec<_>>>()?;
        let mut o = MergeOptions::new(experts, out);
        o.top_k = self.top_k;
        o.routing = self.routing;
        o.router = self.router.options(!self.calib.is_empty());
        o.calib = self
            .calib
            .iter()
            .map(|c| {
                let (name, path) = crate::calib::parse_named(c)?;
                Ok((name, fetch(&path.to_string_lossy())?))
            })
            .collect::<anyhow::Result<_>>()?;
        o.non_expert = match (&self.non_expert, &self.weights) {
            (NonExpert::From(ckpt), None) => NonExpert::From(local(&ckpt.to_string_lossy())?),
            (NonExpert::Weighted(_), Some(w)) => NonExpert::Weighted(w.clone()),
            (NonExpert::Weighted(_), None) => anyhow::bail!("--non-expert weighted needs --weights W1 W2 … (one per expert)"),
            (_, Some(_)) => anyhow::bail!("--weights only goes with --non-expert weighted"),
            (other, None) => other.clone(),
        };
        o.shared_expert = self.shared_expert.as_deref().map(local).transpose()?;
        o.output = self.output.options();
        Ok(o)
    }
}

impl UpcycleSpec {
    /// Upcycle `model` into `experts` experts, `top_k` per token, written to `out`; the rest
    /// at its defaults.
    pub fn new(model: String, experts: usize, top_k: usize, out: String) -> Self {
        let d = upcycle_defaults();
        Self {
            model,
            experts,
            top_k,
            granularity: d.granularity,
            routing: d.routing,
            scaling: d.scaling,
            router_std: d.router_std,
            seed: d.seed,
            out,
            output: OutputSpec::default(),
        }
    }

    /// The upcycle this spec asks for, writing `out`.
    pub fn options(&self, out: &Path, local: Local) -> anyhow::Result<UpcycleOptions> {
        let mut o = UpcycleOptions::new(local(&self.model)?, out, self.experts, self.top_k);
        o.granularity = self.granularity;
        o.routing = self.routing;
        o.scaling = self.scaling;
        o.router_std = self.router_std;
        o.seed = self.seed;
        o.output = self.output.options();
        Ok(o)
    }
}

impl AddExpertSpec {
    /// Append `expert` to `moe`, written to `out`; the rest at its defaults.
    pub fn new(moe: String, expert: String, out: String) -> Self {
        let guard = GuardOptions::default();
        Self {
            moe,
            expert,
            out,
            calib: None,
            name: None,
            background: vec![],
            router: RouterSpec::default(),
            margin: guard.margin,
            no_guard: false,
            guard_tolerance: guard.tolerance,
            guard_steps: guard.steps,
            non_expert: NonExpertOnAdd::default(),
            output: OutputSpec::default(),
        }
    }

    /// The addition this spec asks for, writing `out`.
    pub fn options(&self, out: &Path, local: Local, fetch: Local) -> anyhow::Result<AddExpertOptions> {
        let mut o = AddExpertOptions::new(local(&self.moe)?, local(&self.expert)?, out);
        o.router = self.router.options(self.calib.is_some());
        o.calib = self.calib.as_deref().map(fetch).transpose()?;
        o.name = self.name.clone();
        o.background = self.background.iter().map(|b| fetch(b)).collect::<anyhow::Result<_>>()?;
        o.guard = (!self.no_guard).then_some(GuardOptions {
            margin: self.margin,
            tolerance: self.guard_tolerance,
            steps: self.guard_steps,
            ..GuardOptions::default()
        });
        o.non_expert = self.non_expert;
        o.output = self.output.options();
        Ok(o)
    }
}

impl RemoveExpertSpec {
    /// The removal this spec asks for.
    pub fn options(&self, local: Local) -> anyhow::Result<RemoveExpertOptions> {
        let output = OutputOptions { overwrite: self.overwrite, ..OutputOptions::default() };
        Ok(RemoveExpertOptions { moe: local(&self.moe)?, expert: self.expert, out: PathBuf::from(&self.out), output })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_file_needs_only_what_has_no_default() {
        let m: MergeSpec = serde_json::from_str(r#"{"experts": ["a", "b"], "out": "o"}"#).unwrap();
        assert_eq!(
            (m.top_k, m.routing, m.non_expert.clone(), m.output.clone()),
            (2, Routing::TopkThenSoftmax, NonExpert::Average, OutputSpec::default())
        );
        assert_eq!(m.router, RouterSpec::default());
        let u: UpcycleSpec = serde_json::from_str(r#"{"model": "d", "experts": 4, "top_k": 2, "out": "o"}"#).unwrap();
        assert_eq!((u.granularity, u.scaling, u.router_std), (1, ScalingMode::Exact, DEFAULT_ROUTER_STD));
        let a: AddExpertSpec = serde_json::from_str(r#"{"moe": "m", "expert": "e", "out": "o"}"#).unwrap();
        assert_eq!(
            (a.margin, a.guard_steps, a.non_expert),
            (GuardOptions::default().margin, GuardOptions::default().steps, NonExpertOnAdd::Keep)
        );
        let err = serde_json::from_str::<MergeSpec>(r#"{"experts": [], "out": "o", "topk": 3}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `topk`"), "{err}");
    }

    #[test]
    fn constructors_give_the_spec_files_defaults() {
        let u: UpcycleSpec = serde_json::from_str(r#"{"model": "d", "experts": 4, "top_k": 2, "out": "o"}"#).unwrap();
        assert_eq!(u, UpcycleSpec::new("d".into(), 4, 2, "o".into()));
        let a: AddExpertSpec = serde_json::from_str(r#"{"moe": "m", "expert": "e", "out": "o"}"#).unwrap();
        assert_eq!(a, AddExpertSpec::new("m".into(), "e".into(), "o".into()));
    }

    #[test]
    fn non_expert_weights_go_with_weighted_only() {
        let local: Local = |s| Ok(PathBuf::from(s));
        let mut m: MergeSpec = serde_json::from_str(r#"{"experts": ["a", "b"], "out": "o", "non_expert": "weighted"}"#).unwrap();
        assert!(m.options(Path::new("o"), local, local).unwrap_err().to_string().contains("needs --weights"));
        m.weights = Some(vec![0.25, 0.75]);
        assert_eq!(m.options(Path::new("o"), local, local).unwrap().non_expert, NonExpert::Weighted(vec![0.25, 0.75]));
        m.non_expert = NonExpert::Average;
        assert!(m.options(Path::new("o"), local, local).unwrap_err().to_string().contains("only goes with"));
    }
}
