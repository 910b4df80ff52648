//! Remove an expert from an MoE: expert `I` of every MoE layer and row `I` of every router
//! are dropped, the experts after it move down one index, and every other tensor is copied
//! bit for bit. Since [`crate::add_expert`] appends and copies the same way, removing the
//! expert it appended gives back the MoE before the addition, every tensor bit-identical —
//! unless that addition re-averaged the non-expert weights (`--non-expert average`), which the
//! lineage records and the report warns about.
//!
//! The lineage's per-expert records (`experts`, `calibration`) follow: the removed expert's
//! entries go, later indices move down.

use crate::names::{classify, Slot};
use crate::{parent_of, tokenizer_file, OutputOptions};
use anyhow::{bail, Context, Result};
use btm_model::{Checkpoint, Extras, Lineage};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::path::PathBuf;

/// What to remove and where to write the result.
#[derive(Debug, Clone)]
pub struct RemoveExpertOptions {
    /// The MoE checkpoint directory to remove the expert from.
    pub moe: PathBuf,
    /// 0-based index of the expert to remove.
    pub expert: usize,
    /// Output checkpoint directory.
    pub out: PathBuf,
    /// Dtype, shard size and overwrite policy of the written checkpoint.
    pub output: OutputOptions,
}

/// The written model's lineage and any warnings.
#[derive(Debug, Clone)]
pub struct RemoveExpertReport {
    /// Lineage written to the output's `btm.json`: the MoE's, without the removed expert's records
    /// and with `removed_expert`.
    pub lineage: Lineage,
    /// Non-fatal problems (re-averaged non-expert weights that removal cannot undo), also in the lineage.
    pub warnings: Vec<String>,
}

/// Remove `o.expert` from `o.moe` into `o.out` (see the module docs). Bad input — a dense
/// model, an index out of range, the last expert, a `top_k` the remaining experts cannot
/// serve — is a named error and nothing is written.
pub fn remove_expert(o: &RemoveExpertOptions) -> Result<RemoveExpertReport> {
    o.output.check_destination(&o.out)?;
    let moe = Checkpoint::open(&o.moe).with_context(|| format!("opening --moe {}", o.moe.display()))?;
    let Some(m) = moe.config.moe.clone() else {
        bail!("--moe {} is a dense model: it has no expert to remove", o.moe.display());
    };
    let (e, i) = (m.experts, o.expert);
    if i >= e {
        bail!("--expert {i}: the MoE has {e} experts (indices 0 to {})", e - 1);
    }
    if e == 1 {
        bail!("--expert {i}: it is the MoE's only expert; an MoE needs at least one");
    }
    if m.top_k > e - 1 {
        bail!("--expert {i}: the MoE routes each token to {} experts, more than the {} that would remain", m.top_k, e - 1);
    }
    let mut cfg = moe.config.clone();
    cfg.moe.as_mut().expect("an MoE").experts = e - 1;

    let mut warnings = vec![];
    let mut lineage = moe.lineage()?.unwrap_or_else(|| Lineage::new("remove_expert"));
    lineage.tool = Lineage::new("remove_expert").tool;
    lineage.kind = "remove_expert".into();
    lineage.parents = vec![parent_of(&moe, None)?];
    let x = &mut lineage.extra;
    let removed_domain = x
        .get("experts")
        .and_then(Value::as_array)
        .and_then(|list| list.iter().find(|v| v["index"].as_u64() == Some(i as u64)))
        .and_then(|v| v["domain"].as_str().map(str::to_string));
    if let Some(list) = x.get("experts").and_then(Value::as_array).cloned() {
        let kept: Vec<Value> = list
            .into_iter()
            .filter(|v| v["index"].as_u64() != Some(i as u64))
            .map(|mut v| {
                if let Some(k) = v["index"].as_u64().filter(|&k| k > i as u64) {
                    v["index"] = json!(k - 1);
                }
                v
            })
            .collect();
        x.insert("experts".into(), Value::Array(kept));
    }
    if let (Some(domain), Some(list)) = (&removed_domain, x.get("calibration").and_then(Value::as_array).cloned()) {
        let kept: Vec<Value> = list.into_iter().filter(|v| v["domain"].as_str() != Some(domain)).collect();
        x.insert("calibration".into(), Value::Array(kept));
    }
    if i == e - 1 && x.get("non_expert_on_add").and_then(Value::as_str) == Some("reaverage") {
        warnings.push(
            "the addition of this expert re-averaged the non-expert weights; removing it does not undo that (they stay averaged)".into(),
        );
    }
    x.insert("removed_expert".into(), json!({"index": i, "domain": removed_domain}));
    if !warnings.is_empty() {
        x.insert("warnings".into(), json!(warnings));
    }

    let mut get = |name: &str| -> btm_model::Result<Tensor> {
        match classify(name) {
            Slot::Router { .. } => {
                let r = moe.tensor(name)?;
                let mut parts = vec![];
                if i > 0 {
                    parts.push(r.narrow(0, 0, i)?);
                }
                if i + 1 < e {
                    parts.push(r.narrow(0, i + 1, e - i - 1)?);
                }
                Ok(Tensor::cat(&parts, 0)?)
            }
            Slot::Expert { layer, expert, proj } => {
                let source = if expert >= i { expert + 1 } else { expert };
                moe.tensor(&name.replace(
                    &format!("model.layers.{layer}.mlp.experts.{expert}."),
                    &format!("model.layers.{layer}.mlp.experts.{source}."),
                ))
                .map_err(|err| btm_model::Error::InvalidConfig(format!("expert {source} {proj:?}: {err}")))
            }
            _ => moe.tensor(name),
        }
    };
    let extras = Extras { tokenizer: tokenizer_file(moe.dir()), lineage: Some(lineage.clone()) };
    btm_model::write_checkpoint(&o.out, &cfg, &mut get, &extras, &o.output.write_options(moe.dtype()))
        .with_context(|| format!("writing {}", o.out.display()))?;
    Ok(RemoveExpertReport { lineage, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::add_expert::{add_expert, AddExpertOptions};
    use crate::merge::{merge, MergeOptions};
    use crate::router_init::RouterInit;
    use crate::testutil::{domain_texts, fixture, perturbed, write_jsonl};

    fn bits(ck: &Checkpoint, name: &str) -> Vec<u8> {
        let t = ck.tensor(name).unwrap();
        let v: Vec<f32> = t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn removing_the_added_expert_gives_back_every_tensor_and_bad_input_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let a = perturbed(&fixture("llama"), &t.join("prose"), 1, 0.5, false, "prose");
        let b = perturbed(&fixture("llama"), &t.join("code"), 2, 0.5, false, "code");
        let c = perturbed(&fixture("llama"), &t.join("digits"), 3, 0.5, false, "digits");
        let moe = t.join("moe");
        let mut o = MergeOptions::new(vec![a, b], &moe);
        o.top_k = 1;
        o.router.init = RouterInit::Centroid;
        o.calib = ["prose", "code"]
            .iter()
            .map(|d| (d.to_string(), write_jsonl(&t.join(format!("{d}.jsonl")), &domain_texts(d, 40, 0))))
            .collect();
        o.router.calib.seq_len = 32;
        merge(&o).unwrap();
        let bigger = t.join("moe3");
        let mut add = AddExpertOptions::new(&moe, &c, &bigger);
        add.calib = Some(write_jsonl(&t.join("digits.jsonl"), &domain_texts("digits", 40, 0)));
        add.router.calib.seq_len = 32;
        add_expert(&add).unwrap();

        let back = t.join("back");
        let report =
            remove_expert(&RemoveExpertOptions { moe: bigger.clone(), expert: 2, out: back.clone(), output: OutputOptions::default() })
                .unwrap();
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        let (before, after) = (Checkpoint::open(&moe).unwrap(), Checkpoint::open(&back).unwrap());
        assert_eq!(before.config, after.config);
        let names: Vec<String> = before.tensor_specs().into_iter().map(|s| s.name).collect();
        assert_eq!(names, after.tensor_specs().into_iter().map(|s| s.name).collect::<Vec<_>>());
        for name in &names {
            assert!(bits(&before, name) == bits(&after, name), "{name} differs after the round trip");
        }
        // The lineage forgets the removed domain's calibration.
        let calib = report.lineage.extra["calibration"].as_array().unwrap();
        assert!(calib.iter().all(|v| v["domain"] != "digits"), "{calib:?}");

        // Removing a middle expert moves the later one down.
        let middle = t.join("middle");
        remove_expert(&RemoveExpertOptions { moe: bigger.clone(), expert: 0, out: middle.clone(), output: OutputOptions::default() })
            .unwrap();
        let (three, two) = (Checkpoint::open(&bigger).unwrap(), Checkpoint::open(&middle).unwrap());
        let w = "model.layers.1.mlp.experts.1.down_proj.weight";
        assert!(bits(&three, "model.layers.1.mlp.experts.2.down_proj.weight") == bits(&two, w));

        // Named errors; nothing written.
        for (expert, moe_dir, want) in [(3, &bigger, "the MoE has 3 experts (indices 0 to 2)"), (0, &c, "is a dense model")] {
            let out = t.join(format!("bad-{expert}"));
            let err =
                remove_expert(&RemoveExpertOptions { moe: moe_dir.clone(), expert, out: out.clone(), output: OutputOptions::default() })
                    .unwrap_err();
            assert!(format!("{err:#}").contains(want), "{err:#}");
            assert!(!out.exists());
        }
    }
}
