//! mergekit-moe's YAML (`btm merge --mergekit-config moe.yml`) read as the equivalent btm merge.
//!
//! | mergekit-moe | btm merge |
//! |---|---|
//! | `base_model` | `--non-expert from:BASE` (embeddings, attention and norms from the base) |
//! | `experts[].source_model` | `--experts`, in order |
//! | `gate_mode: hidden` + `positive_prompts` | `--router-init centroid`, each expert's prompts its calibration text |
//! | `gate_mode: random` | `--router-init random` |
//! | `experts_per_token` (default 2) | `--top-k` |
//! | `dtype` | `--dtype` |
//! | `shared_experts` (one, no prompts, no `residual_scale`) | `--shared-expert` |
//! | `architecture: mixtral` / `qwen` | `topk_then_softmax` (Mixtral) / `softmax_then_topk` (Qwen2-MoE) |
//!
//! What btm cannot honour is a named error, never silently dropped: `gate_mode: cheap_embed`
//! (btm has no embedding-only router), `negative_prompts` (btm centres each expert's router row
//! against the other experts' prompts instead), a shared expert's prompts or `residual_scale`,
//! other architectures, models named by Hub id instead of a folder or URL, and any other key.

use anyhow::{bail, ensure, Context, Result};
use btm_merger::merge::{MergeOptions, NonExpert};
use btm_merger::RouterInit;
use btm_model::{DType, Routing};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// mergekit-moe's configuration (the keys it documents; any other is an error).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergekitMoe {
    base_model: String,
    #[serde(default = "default_gate_mode")]
    gate_mode: GateMode,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default = "default_experts_per_token")]
    experts_per_token: usize,
    experts: Vec<Expert>,
    #[serde(default)]
    shared_experts: Vec<SharedExpert>,
    #[serde(default)]
    architecture: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum GateMode {
    Hidden,
    CheapEmbed,
    Random,
}

fn default_gate_mode() -> GateMode {
    GateMode::Hidden
}

fn default_experts_per_token() -> usize {
    2
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expert {
    source_model: String,
    #[serde(default)]
    positive_prompts: Vec<String>,
    #[serde(default)]
    negative_prompts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SharedExpert {
    source_model: String,
    #[serde(default)]
    positive_prompts: Vec<String>,
    #[serde(default)]
    residual_scale: Option<f64>,
}

/// Read `file` (errors name the key path, line and column).
pub fn read(file: &Path) -> Result<MergekitMoe> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&text)).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!("{}: {}{}", file.display(), if path == "." { String::new() } else { format!("{path}: ") }, e.into_inner())
    })
}

/// A model mergekit names: a local folder or an object-store URL (btm does not download from
/// the Hugging Face Hub).
fn model_dir(key: &str, location: &str) -> Result<PathBuf> {
    let dir = btm_model::storage::local_dir(location).with_context(|| format!("{key}: {location}"))?;
    ensure!(
        dir.is_dir(),
        "{key}: `{location}` is not a folder or URL (btm does not download from the Hugging Face Hub: `huggingface-cli download {location} --local-dir DIR` first)"
    );
    Ok(dir)
}

impl MergekitMoe {
    /// The btm merge options this configuration asks for, writing `out`; calibration files for
    /// the `hidden` gate mode are written into `calib_dir`.
    pub fn options(&self, out: &Path, calib_dir: &Path) -> Result<MergeOptions> {
        let experts = self
            .experts
            .iter()
            .enumerate()
            .map(|(i, e)| model_dir(&format!("experts[{i}].source_model"), &e.source_model))
            .collect::<Result<_>>()?;
        let mut o = MergeOptions::new(experts, out);
        o.top_k = self.experts_per_token;
        o.non_expert = NonExpert::From(model_dir("base_model", &self.base_model)?);
        o.routing = match self.architecture.as_deref() {
            None | Some("mixtral") => Routing::TopkThenSoftmax,
            Some("qwen") => Routing::SoftmaxThenTopk,
            Some(other) => bail!("architecture: `{other}` is not one btm writes (mixtral or qwen)"),
        };
        for (i, e) in self.experts.iter().enumerate() {
            ensure!(
                e.negative_prompts.is_empty(),
                "experts[{i}].negative_prompts: not supported (btm's centroid router centres each expert against the other experts' prompts instead); remove them"
            );
        }
        o.router.init = match self.gate_mode {
            GateMode::Random => RouterInit::Random,
            GateMode::CheapEmbed => {
                bail!("gate_mode: cheap_embed is not supported (btm has no embedding-only router); use hidden (btm's centroid router) or random")
            }
            GateMode::Hidden => {
                std::fs::create_dir_all(calib_dir)?;
                for (i, e) in self.experts.iter().enumerate() {
                    ensure!(
                        !e.positive_prompts.is_empty(),
                        "experts[{i}].positive_prompts: gate_mode hidden needs at least one prompt per expert"
                    );
                    let file = calib_dir.join(format!("expert{i}.jsonl"));
                    let lines: String = e.positive_prompts.iter().map(|p| serde_json::json!({ "text": p }).to_string() + "\n").collect();
                    std::fs::write(&file, lines).with_context(|| format!("writing {}", file.display()))?;
                    o.calib.push((format!("expert{i}"), file));
                }
                RouterInit::Centroid
            }
        };
        match self.shared_experts.as_slice() {
            [] => {}
            [s] => {
                ensure!(
                    s.positive_prompts.is_empty(),
                    "shared_experts[0].positive_prompts: btm's shared expert is always on, with no gate to fit; remove them"
                );
                ensure!(
                    s.residual_scale.is_none_or(|r| r == 1.0),
                    "shared_experts[0].residual_scale: btm does not scale the shared expert's output; remove it (or set 1.0)"
                );
                o.shared_expert = Some(model_dir("shared_experts[0].source_model", &s.source_model)?);
            }
            _ => bail!("shared_experts: at most one (as in mergekit)"),
        }
        if let Some(d) = &self.dtype {
            o.output.dtype = Some(d.parse::<DType>().context("dtype")?.candle());
        }
        Ok(o)
    }
}
