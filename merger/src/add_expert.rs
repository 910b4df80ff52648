//! Add an expert to an existing MoE: the new dense model's FFN becomes expert E (0-based) of
//! every MoE layer, and each router gets one new row; the existing experts and router rows are
//! copied bit for bit. With `topk_then_softmax`, a token whose top-k does not include the new
//! expert therefore gets exactly the output it got before (its k logits, their softmax and the
//! experts it visits are unchanged).
//!
//! The new row comes from calibration text of the new domain, measured on the *new* model
//! layer by layer (as in [`crate::merge`]), against the existing router:
//! - centroid: direction = mean router input of the new domain minus that of background text
//!   (text of the existing domains: `--background`, or the calibration files recorded in the
//!   MoE's `btm.json`), scaled so the new domain's tokens give the new expert a target
//!   probability against the existing logits ([`crate::router_init::centroid_new_row`]);
//! - fit: softmax regression of the new row only, with the new domain labelled E and background
//!   tokens labelled with the existing router's own top-1 choice ("against the existing
//!   experts' routing"), started from the centroid row;
//! - then the margin guard ([`crate::router_init::guard_new_row`], on by default whenever
//!   background text is there): the row is refitted under the constraint that on every
//!   background token its logit stays δ below the token's k-th largest old logit, so old
//!   tokens keep their top-k and with it their exact outputs. The lineage reports, per layer,
//!   the share of held-out background tokens for which the guard fails (`background_new_in_top_k`)
//!   and the share of held-out new-domain tokens that reach the new expert (`accuracy`: top-1,
//!   `new_in_top_k`).

use crate::calib::{calibrate_layerwise, load_domain, CalibDomain};
use crate::merge::{in_memory_model, MergeReport};
use crate::names::{classify, dense_ffn, router, Proj, Slot};
use crate::router_init::{
    centroid_new_row, fit_softmax_regression, guard_new_row, share_in_topk, share_routed_to, top1, GuardOptions, RouterInit, RouterOptions,
};
use crate::{parent_of, tokenizer_file, OutputOptions};
use anyhow::{bail, Context, Result};
use btm_kernels::Routing;
use btm_model::{Checkpoint, Extras, Lineage, ModelConfig};
use candle_core::{DType, Tensor};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;

/// What `btm add-expert` adds to which MoE, how the new router row is made, and where the result
/// goes; [`AddExpertOptions::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct AddExpertOptions {
    /// The existing MoE checkpoint directory.
    pub moe: PathBuf,
    /// The dense checkpoint whose FFN becomes the new expert (same trunk, tokenizer and FFN width as the
    /// MoE's experts).
    pub expert: PathBuf,
    /// Output checkpoint directory.
    pub out: PathBuf,
    /// Calibration text of the new expert's domain.
    pub calib: Option<PathBuf>,
    /// The new domain's name (default: the expert's `btm.json` domain).
    pub name: Option<String>,
    /// Text of the existing domains (default: the calibration files in the MoE's `btm.json`).
    pub background: Vec<PathBuf>,
    /// How the new router row is made (default: centroid, which needs `calib`).
    pub router: RouterOptions,
    /// The margin guard ([`crate::router_init::guard_new_row`]): after centroid or fit, the new
    /// row is adjusted to stay `margin` below the k-th old logit on the old domains' tokens
    /// (its `top_k` is the MoE's). `None` turns the guard off.
    pub guard: Option<GuardOptions>,
    /// Keep or re-average the non-expert weights (default: [`NonExpertOnAdd::Keep`]).
    pub non_expert: NonExpertOnAdd,
    /// Dtype, shard size and overwrite policy of the written checkpoint.
    pub output: OutputOptions,
}

impl AddExpertOptions {
    /// Defaults: centroid router row (set `calib`: it is required), margin guard on
    /// ([`GuardOptions::default`]), non-expert weights kept, background from the MoE's `btm.json`.
    pub fn new(moe: impl Into<PathBuf>, expert: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            moe: moe.into(),
            expert: expert.into(),
            out: out.into(),
            calib: None,
            name: None,
            background: vec![],
            router: RouterOptions { init: RouterInit::Centroid, ..RouterOptions::default() },
            guard: Some(GuardOptions::default()),
            non_expert: NonExpertOnAdd::Keep,
            output: OutputOptions::default(),
        }
    }
}

/// The non-expert weights of the extended MoE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum NonExpertOnAdd {
    #[default]
    /// The MoE's, unchanged (the old domains keep their function exactly where they route).
    Keep,
    /// Re-averaged with the new expert's: (E·θ_moe + θ_new)/(E+1).
    Average,
}

/// Calibration files recorded in an MoE's `btm.json` by `btm merge` / `btm add-expert`.
fn recorded_calibration(lineage: &Option<Lineage>) -> Vec<PathBuf> {
    let Some(l) = lineage else { return vec![] };
    let Some(list) = l.extra.get("calibration").and_then(Value::as_array) else { return vec![] };
    list.iter().filter_map(|c| c.get("file")?.as_str().map(PathBuf::from)).filter(|p| p.is_file()).collect()
}

/// Append `o.expert` to `o.moe` as expert E with a new router row per MoE layer and write the
/// result to `o.out` (see the module docs). Nothing is written if a check fails: a dense `--moe`,
/// an expert of another trunk, FFN width or tokenizer, centroid/fit without `calib`, an existing
/// `out` without `overwrite`.
pub fn add_expert(o: &AddExpertOptions) -> Result<MergeReport> {
    o.output.check_destination(&o.out)?;
    let mut inputs = open_inputs(o)?;
    let cfg = extended_config(&inputs)?;
    let calibrated = calibrate_new_rows(o, &cfg, &mut inputs)?;
    let lineage = extended_lineage(o, &inputs, &calibrated)?;
    let hidden = cfg.hidden_size;
    let mut get = |t: &str| -> btm_model::Result<Tensor> {
        let invalid = |e: anyhow::Error| btm_model::Error::InvalidConfig(e.to_string());
        match classify(t) {
            Slot::Router { layer } => {
                let row = match calibrated.rows.get(&layer) {
                    Some(r) => r.clone(),
                    None => o.router.uncalibrated(1, hidden, layer).map_err(invalid)?,
                };
                inputs.router_with(layer, &row).map_err(invalid)
            }
            _ => inputs.tensor(t, o.non_expert == NonExpertOnAdd::Average),
        }
    };
    let extras = Extras { tokenizer: tokenizer_file(inputs.moe.dir()), lineage: Some(lineage.clone()) };
    btm_model::write_checkpoint(&o.out, &cfg, &mut get, &extras, &o.output.write_options(inputs.moe.dtype()))
        .with_context(|| format!("writing {}", o.out.display()))?;
    Ok(MergeReport { config: cfg, lineage, warnings: inputs.warnings })
}

/// The MoE and the expert to add, checked against each other, with what the addition needs
/// from them: the new expert's index and name, the output scale its down projection takes, the
/// lineages, and the warnings so far.
struct Inputs {
    moe: Checkpoint,
    expert: Checkpoint,
    /// The MoE's experts before the addition (the new one's index).
    e_old: usize,
    moe_lineage: Option<Lineage>,
    new_seed: Option<String>,
    /// The MoE's expert output scale, applied to the new expert's down projection.
    scale: f64,
    name: String,
    warnings: Vec<String>,
}

impl Inputs {
    /// Tensor `t` of the extended model (routers aside): the new expert's FFN (scaled) in the
    /// last slot, the non-expert weights kept or re-averaged with the expert's, the rest the MoE's.
    fn tensor(&self, t: &str, reaverage: bool) -> btm_model::Result<Tensor> {
        let e_old = self.e_old;
        match classify(t) {
            Slot::Expert { layer, expert: e, proj } if e == e_old => {
                let w = self.expert.tensor_streamed(&dense_ffn(layer, proj))?;
                if proj == Proj::Down && self.scale != 1.0 {
                    return Ok((w.to_dtype(DType::F32)? * self.scale)?);
                }
                Ok(w)
            }
            Slot::Other if reaverage => {
                let a = (self.moe.tensor_streamed(t)?.to_dtype(DType::F32)? * (e_old as f64 / (e_old + 1) as f64))?;
                let b = (self.expert.tensor_streamed(t)?.to_dtype(DType::F32)? * (1.0 / (e_old + 1) as f64))?;
                Ok((a + b)?)
            }
            _ => self.moe.tensor_streamed(t),
        }
    }

    /// Layer `layer`'s router: the MoE's rows, bit for bit, then the new expert's `row`.
    fn router_with(&self, layer: usize, row: &Tensor) -> Result<Tensor> {
        let existing = self.moe.tensor(&router(layer))?.to_dtype(DType::F32)?;
        Ok(Tensor::cat(&[&existing, row], 0)?)
    }
}

/// Open and check the inputs: an MoE, a dense expert of its trunk, FFN width and tokenizer;
/// warn when the expert does not branch from the MoE's seed or the MoE records no scale.
fn open_inputs(o: &AddExpertOptions) -> Result<Inputs> {
    let moe = Checkpoint::open(&o.moe).with_context(|| format!("opening --moe {}", o.moe.display()))?;
    let Some(old) = moe.config.moe.clone() else {
        bail!("--moe {} is a dense model; use `btm merge` or `btm upcycle` to make an MoE first", o.moe.display());
    };
    let expert = Checkpoint::open(&o.expert).with_context(|| format!("opening --expert {}", o.expert.display()))?;
    crate::checks::require_dense(&expert, "--expert")?;
    crate::checks::same_trunk(&moe, &expert)?;
    if expert.config.intermediate_size != old.expert_ffn {
        bail!(
            "--expert {} has FFN width {} but the MoE's experts have width {}",
            o.expert.display(),
            expert.config.intermediate_size,
            old.expert_ffn
        );
    }
    crate::checks::same_tokenizer(&[&moe, &expert])?;
    if o.router.init.needs_calibration() && o.calib.is_none() {
        bail!("--router-init {} needs --calib FILE.jsonl (text of the new expert's domain)", o.router.init.as_str());
    }
    let mut warnings = vec![];
    let moe_lineage = moe.lineage()?;
    let expert_lineage = expert.lineage()?;
    let e_old = old.experts;
    // Lineage: the new expert should branch from the seed the MoE's experts came from.
    let seeds: Vec<String> = moe_lineage
        .as_ref()
        .and_then(|l| l.extra.get("experts"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|e| e.get("seed")?.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let new_seed = crate::checks::seed_of(&expert);
    if !seeds.is_empty() && !new_seed.as_ref().is_some_and(|s| seeds.contains(s)) {
        warnings.push(format!(
            "lineage mismatch: {} does not branch from the seed the MoE's experts came from ({}); adding anyway",
            o.expert.display(),
            seeds[0]
        ));
    }
    let scale = match moe_lineage.as_ref().and_then(|l| l.extra.get("expert_output_scale")).and_then(Value::as_f64) {
        Some(a) => a,
        None => {
            if old.routing == Routing::SoftmaxThenTopk {
                warnings.push("the MoE's btm.json records no expert output scale; the new expert is added unscaled".into());
            }
            1.0
        }
    };
    let name =
        o.name.clone().or_else(|| expert_lineage.as_ref().and_then(|l| l.domain.clone())).unwrap_or_else(|| format!("expert{e_old}"));
    Ok(Inputs { moe, expert, e_old, moe_lineage, new_seed, scale, name, warnings })
}

/// The MoE's config with one more expert.
fn extended_config(inputs: &Inputs) -> Result<ModelConfig> {
    let mut cfg = inputs.moe.config.clone();
    cfg.moe.as_mut().expect("checked: an MoE").experts = inputs.e_old + 1;
    cfg.validate()?;
    cfg.to_hf()?;
    Ok(cfg)
}

/// The new expert's router rows from calibration text (its domain first, then the background
/// the existing rows are centred against), and the report of what they route.
#[derive(Default)]
struct NewRows {
    rows: HashMap<usize, Tensor>,
    /// The `added_expert` record of the lineage.
    added: Map<String, Value>,
    domains: Vec<CalibDomain>,
}

/// Initialise the new router row of every MoE layer on the extended model's own FFN inputs,
/// one layer at a time; the existing rows stay bit-identical (only the new row is fitted).
fn calibrate_new_rows(o: &AddExpertOptions, cfg: &ModelConfig, inputs: &mut Inputs) -> Result<NewRows> {
    let (e_old, hidden) = (inputs.e_old, cfg.hidden_size);
    let top_k = cfg.moe.as_ref().expect("checked: an MoE").top_k;
    let mut out = NewRows::default();
    let added = &mut out.added;
    added.insert("index".into(), json!(e_old));
    added.insert("domain".into(), json!(inputs.name));
    added.insert("uri".into(), json!(o.expert.display().to_string()));
    added.insert("router_init".into(), json!(o.router.init.as_str()));
    added.insert("scale".into(), json!(inputs.scale));
    let Some(calib) = &o.calib else { return Ok(out) };
    let fixed_row = |layer: usize| o.router.uncalibrated(1, hidden, layer);
    let tok = inputs.moe.tokenizer().context("calibration needs the MoE's tokenizer.json")?;
    out.domains.push(load_domain(&inputs.name, calib, &tok, &o.router.calib)?);
    let background = if o.background.is_empty() { recorded_calibration(&inputs.moe_lineage) } else { o.background.clone() };
    if background.is_empty() {
        inputs.warnings.push(
            "no background text (--background, or calibration files recorded in the MoE's btm.json): the new router row is not centred against the existing domains and may attract their tokens".into(),
        );
    }
    for (i, p) in background.iter().enumerate() {
        out.domains.push(load_domain(&format!("background{i}"), p, &tok, &o.router.calib)?);
    }
    let inputs = &*inputs;
    let mut model = in_memory_model(cfg, &mut |t| match classify(t) {
        Slot::Router { layer } => inputs.router_with(layer, &fixed_row(layer)?),
        _ => Ok(inputs.tensor(t, o.non_expert == NonExpertOnAdd::Average)?),
    })?;
    let mut layers = vec![];
    let rows = &mut out.rows;
    calibrate_layerwise(&mut model, &out.domains, &o.router.calib, |f| {
        if !cfg.is_moe_layer(f.layer) {
            return Ok(None);
        }
        let existing = inputs.moe.tensor(&router(f.layer))?.to_dtype(DType::F32)?;
        let new_train = &f.train[0];
        let bg_train = if f.train.len() > 1 { Some(Tensor::cat(&f.train[1..], 0)?) } else { None };
        let mut report = Map::new();
        let row = match o.router.init {
            RouterInit::Random | RouterInit::Zero => fixed_row(f.layer)?,
            RouterInit::Centroid | RouterInit::Fit => calibrated_row(o, &existing, new_train, bg_train.as_ref(), top_k, &mut report)?,
        };
        let full = Tensor::cat(&[&existing, &row], 0)?;
        report.insert("layer".into(), json!(f.layer));
        report.insert("accuracy".into(), json!(share_routed_to(&full, &f.heldout[0], e_old)?));
        report.insert("new_in_top_k".into(), json!(share_in_topk(&full, &f.heldout[0], e_old, top_k)?));
        if f.heldout.len() > 1 {
            let bg = Tensor::cat(&f.heldout[1..], 0)?;
            report.insert("background_routed_to_new".into(), json!(share_routed_to(&full, &bg, e_old)?));
            // The guard's failures: held-out old tokens whose top-k now includes the new expert.
            report.insert("background_new_in_top_k".into(), json!(share_in_topk(&full, &bg, e_old, top_k)?));
            let per_domain = f.heldout[1..].iter().map(|x| share_in_topk(&full, x, e_old, top_k)).collect::<Result<Vec<_>>>()?;
            report.insert("background_new_in_top_k_per_file".into(), json!(per_domain));
        }
        layers.push(Value::Object(report));
        rows.insert(f.layer, row);
        Ok(Some(full))
    })?;
    let added = &mut out.added;
    added.insert("routing_accuracy".into(), Value::Array(layers));
    added.insert("calibration".into(), json!({"file": calib.display().to_string(), "tokens": out.domains[0].tokens()}));
    added.insert("background".into(), json!(out.domains[1..].iter().map(|d| d.path.display().to_string()).collect::<Vec<_>>()));
    added.insert("target_probability".into(), json!(o.router.target_prob));
    added.insert("margin".into(), json!(o.guard.map(|g| g.margin)));
    Ok(out)
}

/// The new expert's router row of one layer from calibration features: the centroid row
/// ([`centroid_new_row`]), refined by softmax regression for `fit` (the existing rows held
/// fixed), then kept out of the old domains' top-k by the margin guard when there is
/// background text; `report` gets the temperature, own probability and guard record.
fn calibrated_row(
    o: &AddExpertOptions,
    existing: &Tensor,
    new_train: &Tensor,
    bg_train: Option<&Tensor>,
    top_k: usize,
    report: &mut Map<String, Value>,
) -> Result<Tensor> {
    let e_old = existing.dim(0)?;
    let c = centroid_new_row(existing, new_train, bg_train, o.router.target_prob)?;
    report.insert("temperature".into(), json!(c.temperature));
    report.insert("own_probability".into(), json!(c.own_probability));
    let row = if o.router.init == RouterInit::Centroid {
        c.weight
    } else {
        let n_new = new_train.dim(0)?;
        let mut xs = vec![new_train.clone()];
        let mut labels = vec![e_old as u32; n_new];
        let mut sw = vec![1.0 / n_new as f32; n_new];
        if let Some(bg) = bg_train {
            let own = top1(existing, bg)?;
            sw.extend(std::iter::repeat_n(1.0 / own.len() as f32, own.len()));
            labels.extend(own);
            xs.push((*bg).clone());
        }
        let init = Tensor::cat(&[existing, &c.weight], 0)?;
        let mut trainable = vec![false; e_old + 1];
        trainable[e_old] = true;
        let fitted = fit_softmax_regression(&Tensor::cat(&xs, 0)?, &labels, &sw, &init, &trainable, &o.router.fit)?;
        // Only the new row is taken: the existing rows stay bit-identical.
        fitted.narrow(0, e_old, 1)?
    };
    Ok(match (bg_train, o.guard) {
        (Some(bg), Some(guard)) => {
            let guard = GuardOptions { top_k, ..guard };
            let g = guard_new_row(existing, new_train, bg, &row, &guard)?;
            report.insert(
                "guard".into(),
                json!({"margin": guard.margin, "tolerance": guard.tolerance, "penalty": g.penalty, "calibration_violations": g.violations}),
            );
            g.weight
        }
        _ => row,
    })
}

/// The extended model's lineage: the MoE's, with the new expert, its calibration file and the
/// addition's record and warnings.
fn extended_lineage(o: &AddExpertOptions, inputs: &Inputs, calibrated: &NewRows) -> Result<Lineage> {
    let name = &inputs.name;
    let mut lineage = inputs.moe_lineage.clone().unwrap_or_else(|| Lineage::new("add_expert"));
    lineage.tool = Lineage::new("add_expert").tool;
    lineage.kind = "add_expert".into();
    lineage.parents = vec![parent_of(&inputs.moe, None)?, parent_of(&inputs.expert, Some(name.clone()))?];
    let x = &mut lineage.extra;
    let mut experts = x.get("experts").and_then(Value::as_array).cloned().unwrap_or_default();
    experts.push(json!({"index": inputs.e_old, "uri": o.expert.display().to_string(), "domain": name, "seed": inputs.new_seed}));
    x.insert("experts".into(), Value::Array(experts));
    if let Some(calib) = &o.calib {
        let mut list = x.get("calibration").and_then(Value::as_array).cloned().unwrap_or_default();
        list.push(json!({"domain": name, "file": calib.display().to_string(), "tokens": calibrated.domains[0].tokens()}));
        x.insert("calibration".into(), Value::Array(list));
    }
    x.insert("non_expert_on_add".into(), json!(if o.non_expert == NonExpertOnAdd::Average { "reaverage" } else { "keep" }));
    x.insert("added_expert".into(), Value::Object(calibrated.added.clone()));
    if !inputs.warnings.is_empty() {
        x.insert("warnings".into(), json!(inputs.warnings));
    }
    Ok(lineage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{merge, MergeOptions};
    use crate::testutil::{domain_texts, fixture, perturbed, write_jsonl};
    use btm_model::model::{MoeBlock, Trace};
    use candle_core::Device;
    use std::path::Path;

    /// An MoE of two experts (prose, code) merged with centroid routers, and a third expert
    /// (digits) with its own calibration text.
    fn setup(tmp: &Path, top_k: usize) -> (PathBuf, PathBuf, PathBuf) {
        let a = perturbed(&fixture("llama"), &tmp.join("prose"), 1, 0.5, false, "prose");
        let b = perturbed(&fixture("llama"), &tmp.join("code"), 2, 0.5, false, "code");
        let c = perturbed(&fixture("llama"), &tmp.join("digits"), 3, 0.5, false, "digits");
        let moe = tmp.join("moe");
        let mut o = MergeOptions::new(vec![a, b], &moe);
        o.top_k = top_k;
        o.router.init = RouterInit::Centroid;
        o.calib = ["prose", "code"]
            .iter()
            .map(|d| (d.to_string(), write_jsonl(&tmp.join(format!("{d}.jsonl")), &domain_texts(d, 40, 0))))
            .collect();
        o.router.calib.seq_len = 32;
        merge(&o).unwrap();
        let calib = write_jsonl(&tmp.join("digits.jsonl"), &domain_texts("digits", 40, 0));
        (moe, c, calib)
    }

    fn ids(texts: &[String], tok: &tokenizers::Tokenizer) -> Tensor {
        let docs: Vec<Vec<u32>> = texts.iter().map(|t| btm_model::tokenizer::encode(tok, t).unwrap()).collect();
        let t = docs.iter().map(Vec::len).min().unwrap();
        let flat: Vec<u32> = docs.iter().flat_map(|d| d[..t].to_vec()).collect();
        Tensor::from_vec(flat, (docs.len(), t), &Device::Cpu).unwrap()
    }

    #[test]
    fn tokens_not_routed_to_the_new_expert_are_bit_identical_and_the_new_domain_finds_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (moe, expert, calib) = setup(tmp.path(), 1);
        let out = tmp.path().join("moe3");
        let mut o = AddExpertOptions::new(&moe, &expert, &out);
        o.calib = Some(calib);
        o.router.calib.seq_len = 32;
        // Unguarded: the centroid row alone (the guard is tested below).
        o.guard = None;
        let report = add_expert(&o).unwrap();
        assert!(report.warnings.is_empty(), "background text comes from the MoE's btm.json: {:?}", report.warnings);

        let (old, new) = (Checkpoint::open(&moe).unwrap(), Checkpoint::open(&out).unwrap());
        assert_eq!(new.config.moe.as_ref().unwrap().experts, 3);
        // Held-out tokens of the new domain mostly pick the new expert, per btm.json …
        let added = &report.lineage.extra["added_expert"];
        for layer in added["routing_accuracy"].as_array().unwrap() {
            assert!(layer["accuracy"].as_f64().unwrap() > 0.5, "{layer}");
            assert!(layer["background_routed_to_new"].as_f64().unwrap() < 0.5, "{layer}");
        }

        // … and on fresh text, through the written checkpoint.
        let tok = new.tokenizer().unwrap();
        let fresh = ids(&domain_texts("digits", 8, 1000), &tok);
        let model = new.load_model(DType::F32, &Device::Cpu).unwrap();
        let mut trace = Trace::default();
        model.forward_traced(&fresh, &mut trace).unwrap();
        for r in &trace.router {
            let top: Vec<u32> = r.routed.experts.flatten_all().unwrap().to_vec1().unwrap();
            let share = top.iter().filter(|&&e| e == 2).count() as f64 / top.len() as f64;
            assert!(share > 0.5, "fresh digits routed to the new expert: {share}");
        }

        // Same MoE-layer input, old vs new block: every token whose top-k excludes the new
        // expert gets bit-identical output.
        let mixed = ids(&[domain_texts("prose", 4, 500), domain_texts("code", 4, 500), domain_texts("digits", 4, 500)].concat(), &tok);
        let mut trace = Trace { collect_ffn_inputs: true, ..Default::default() };
        model.forward_traced(&mixed, &mut trace).unwrap();
        let (mut same, mut moved) = (0, 0);
        for layer in 0..2 {
            let block = |ck: &Checkpoint| {
                let m = ck.config.moe.clone().unwrap();
                MoeBlock::new(32, &m, ck.var_builder(DType::F32, &Device::Cpu).pp(format!("model.layers.{layer}.mlp"))).unwrap()
            };
            let x = trace.ffn_inputs[layer].reshape(((), 32)).unwrap();
            let before = block(&old).forward(&x, None).unwrap().to_vec2::<f32>().unwrap();
            let mut rec = vec![];
            let after = block(&new).forward(&x, Some(&mut rec)).unwrap().to_vec2::<f32>().unwrap();
            let experts = rec[0].routed.experts.to_vec2::<u32>().unwrap();
            for (t, chosen) in experts.iter().enumerate() {
                if chosen.contains(&2) {
                    moved += 1;
                    continue;
                }
                same += 1;
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&before[t]), bits(&after[t]), "layer {layer} token {t}");
            }
        }
        assert!(same > 0 && moved > 0, "both kinds of token occur: {same} unchanged, {moved} moved");
    }

    /// The margin guard: on held-out text of the old domains, the new expert enters (almost) no
    /// token's top-k, fewer than without the guard; the lineage reports the guard per layer.
    #[test]
    fn the_guard_keeps_old_tokens_out_of_the_new_expert() {
        let tmp = tempfile::tempdir().unwrap();
        let (moe, expert, calib) = setup(tmp.path(), 1);
        let leak = |margin: Option<f64>, out: &str| {
            let mut o = AddExpertOptions::new(&moe, &expert, tmp.path().join(out));
            o.calib = Some(calib.clone());
            o.router.calib.seq_len = 32;
            o.router.init = RouterInit::Fit;
            o.guard = margin.map(|margin| GuardOptions { margin, ..Default::default() });
            let report = add_expert(&o).unwrap();
            let layers = report.lineage.extra["added_expert"]["routing_accuracy"].as_array().unwrap().clone();
            assert_eq!(layers.len(), 2);
            for l in &layers {
                assert_eq!(l.get("guard").is_some(), margin.is_some(), "{l}");
            }
            layers.iter().map(|l| l["background_new_in_top_k"].as_f64().unwrap()).collect::<Vec<_>>()
        };
        let (free, guarded) = (leak(None, "free"), leak(Some(0.5), "guarded"));
        for (f, g) in free.iter().zip(&guarded) {
            assert!(*g <= 0.02 && g <= f, "held-out old tokens routed to the new expert: {g} guarded, {f} without");
        }
        assert!(free.iter().any(|&f| f > 0.02), "without the guard some old tokens route to the new expert: {free:?}");
    }

    #[test]
    fn fit_and_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let (moe, expert, calib) = setup(tmp.path(), 1);
        let out = tmp.path().join("fit");
        let mut o = AddExpertOptions::new(&moe, &expert, &out);
        o.calib = Some(calib.clone());
        o.router.init = RouterInit::Fit;
        o.guard = None;
        o.router.calib.seq_len = 32;
        o.name = Some("numbers".into());
        let report = add_expert(&o).unwrap();
        let added = &report.lineage.extra["added_expert"];
        assert_eq!(added["domain"], "numbers");
        for layer in added["routing_accuracy"].as_array().unwrap() {
            assert!(layer["accuracy"].as_f64().unwrap() > 0.5, "{layer}");
        }
        // The existing router rows are copied bit for bit.
        let (old, new) = (Checkpoint::open(&moe).unwrap(), Checkpoint::open(&out).unwrap());
        let r_old = old.tensor("model.layers.1.mlp.gate.weight").unwrap().to_vec2::<f32>().unwrap();
        let r_new = new.tensor("model.layers.1.mlp.gate.weight").unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(r_old[..], r_new[..2]);

        // An expert from another seed: a warning, not an error.
        let stranger = tmp.path().join("stranger");
        std::fs::create_dir(&stranger).unwrap();
        for f in std::fs::read_dir(&expert).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, stranger.join(f.file_name().unwrap())).unwrap();
        }
        std::fs::remove_file(stranger.join("MANIFEST.json")).unwrap();
        let mut l: Value = serde_json::from_slice(&std::fs::read(stranger.join("btm.json")).unwrap()).unwrap();
        l["parents"][0]["manifest_sha256"] = json!("another-seed");
        std::fs::write(stranger.join("btm.json"), l.to_string()).unwrap();
        let mut o = AddExpertOptions::new(&moe, &stranger, tmp.path().join("stranger-moe"));
        o.router.init = RouterInit::Zero;
        let report = add_expert(&o).unwrap();
        assert!(report.warnings.iter().any(|w| w.contains("lineage mismatch")), "{:?}", report.warnings);

        let never = tmp.path().join("never");
        let err = |o: AddExpertOptions| format!("{:#}", add_expert(&o).unwrap_err());
        let mut o = AddExpertOptions::new(&moe, &expert, &never);
        assert!(err(o.clone()).contains("needs --calib"));
        o.calib = Some(tmp.path().join("missing.jsonl"));
        assert!(err(o.clone()).contains("not found"));
        o.calib = Some(write_jsonl(&tmp.path().join("empty.jsonl"), &[]));
        assert!(err(o.clone()).contains("is empty"));
        assert!(err(AddExpertOptions::new(fixture("llama"), &expert, &never)).contains("is a dense model"));
        assert!(err(AddExpertOptions::new(&moe, fixture("qwen2"), &never)).contains("architecture mismatch"));
        assert!(!never.exists());
    }
}
