//! btm's merger: the "merge" of Branch-Train-Merge.
//!
//! - [`merge`]: N dense experts → one MoE (expert i's FFN becomes expert i of every layer;
//!   embeddings, attention and norms averaged, weighted or copied; optional shared expert).
//! - [`upcycle`]: one dense model → an MoE that computes exactly the dense function
//!   (He et al. 2024, "Upcycling Large Language Models into Mixture of Experts").
//! - [`add_expert`]: append a dense model's FFN to an existing MoE without touching its experts.
//!
//! Router initialisation (random, zero, calibration centroids, softmax regression) lives in
//! [`router_init`]; the calibration forward passes that feed it in [`calib`]; output scaling
//! rules in [`scaling`]. All three commands stream: every output tensor is built on demand
//! inside the writer's callback from memory-mapped inputs, so peak memory does not grow with
//! the number of experts (see [`bench`]).

#![warn(missing_docs)]

pub mod add_expert;
pub mod bench;
pub mod calib;
pub mod checks;
pub mod merge;
pub mod names;
pub mod remove_expert;
pub mod router_init;
pub mod scaling;
pub mod spec;
pub mod upcycle;

#[cfg(test)]
mod testutil;

pub use add_expert::{add_expert, AddExpertOptions, NonExpertOnAdd};
pub use merge::{merge, MergeOptions, MergeReport, NonExpert};
pub use router_init::{RouterInit, RouterOptions};
pub use scaling::ScalingMode;
pub use spec::{AddExpertSpec, MergeSpec, OutputSpec, RemoveExpertSpec, RouterSpec, UpcycleSpec};
pub use upcycle::{upcycle, UpcycleOptions};

use anyhow::{bail, Result};
use candle_core::DType;
use std::path::Path;

/// Where and how the merged checkpoint is written.
#[derive(Debug, Clone)]
pub struct OutputOptions {
    /// Dtype on disk (default: that of the first input).
    pub dtype: Option<DType>,
    /// Largest shard in bytes.
    pub max_shard_bytes: u64,
    /// Replace an existing output directory.
    pub overwrite: bool,
}

impl Default for OutputOptions {
    fn default() -> Self {
        Self { dtype: None, max_shard_bytes: 2 << 30, overwrite: false }
    }
}

impl OutputOptions {
    /// Fail early (before any calibration work) if `out` exists and may not be replaced.
    pub fn check_destination(&self, out: &Path) -> Result<()> {
        if out.exists() && !self.overwrite {
            bail!("{} already exists (refusing to overwrite)", out.display());
        }
        Ok(())
    }

    /// The writer's options, with `default_dtype` (the first input's dtype) where no dtype was asked for.
    pub fn write_options(&self, default_dtype: DType) -> btm_model::WriteOptions {
        btm_model::WriteOptions {
            dtype: self.dtype.unwrap_or(default_dtype),
            max_shard_bytes: self.max_shard_bytes,
            overwrite: self.overwrite,
        }
    }
}

/// `tokenizer.json` of a checkpoint directory, if it has one (copied into the output).
pub fn tokenizer_file(dir: &Path) -> Option<std::path::PathBuf> {
    let p = dir.join(btm_model::checkpoint::TOKENIZER);
    p.exists().then_some(p)
}

/// The lineage entry for an input checkpoint. The manifest hash is recorded when the input has
/// a `MANIFEST.json` (as everything btm writes does); a plain Hugging Face directory is not
/// hashed, which would cost a full read of its weights.
pub fn parent_of(ckpt: &btm_model::Checkpoint, domain: Option<String>) -> Result<btm_model::lineage::Parent> {
    let has_manifest = ckpt.dir().join(btm_model::manifest::MANIFEST).exists();
    Ok(btm_model::lineage::Parent {
        uri: ckpt.dir().display().to_string(),
        manifest_sha256: if has_manifest { Some(ckpt.id()?) } else { None },
        domain,
    })
}
