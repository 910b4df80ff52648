//! `btm.json`: where a checkpoint came from. Written beside every checkpoint btm produces;
//! never required to read a plain Hugging Face directory.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// The lineage file's name inside a checkpoint directory.
pub const LINEAGE: &str = "btm.json";
/// The lineage key of a trained model's validation perplexities, as the trainer measured them
/// at the step the model was written: `{"step": N, "data": [{"name", "perplexity", "tokens"}]}`.
pub const VALIDATION: &str = "validation";

/// A checkpoint this one was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parent {
    /// Where the parent was read from.
    pub uri: String,
    /// SHA-256 of the parent's `MANIFEST.json`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
    /// The data domain the parent was trained on, where the producer knows it (a merge's experts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// The contents of `btm.json`: what tool made a checkpoint, how, and from what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// The btm version that wrote the checkpoint.
    pub tool: String,
    /// What made it: `import`, `seed`, `expert`, `merge`, `upcycle`, `add_expert`, `continue`, ...
    pub kind: String,
    /// The checkpoints it was made from (none for a seed trained from scratch).
    #[serde(default)]
    pub parents: Vec<Parent>,
    /// The data domain it was trained on (an expert's), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Training steps of the run that produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Tokens that training run consumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_seen: Option<u64>,
    /// Anything else the producer records (router init, routing accuracy, scale, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Lineage {
    /// A lineage of `kind` written by this btm version, with no parents or measurements yet.
    pub fn new(kind: &str) -> Self {
        Self {
            tool: format!("btm {}", env!("CARGO_PKG_VERSION")),
            kind: kind.into(),
            parents: vec![],
            domain: None,
            steps: None,
            tokens_seen: None,
            extra: Map::new(),
        }
    }

    /// Read `dir/btm.json` if there is one.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(LINEAGE);
        if !path.exists() {
            return Ok(None);
        }
        let value = crate::error::read_json(&path)?;
        serde_json::from_value(value).map(Some).map_err(|source| Error::Json { path, source })
    }

    /// The pretty-printed JSON bytes written as `btm.json`.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("lineage serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_or_garbage_lineage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(LINEAGE);
        std::fs::write(&p, b"{\"tool\": 7}").unwrap();
        assert!(Lineage::read(dir.path()).unwrap_err().to_string().starts_with(&format!("{}: invalid JSON", p.display())));
        // Sparse: refused from its size, never read.
        std::fs::File::create(&p).unwrap().set_len(crate::error::MAX_JSON_BYTES + 1).unwrap();
        let err = Lineage::read(dir.path()).unwrap_err().to_string();
        assert_eq!(err, format!("{}: JSON file of 67108865 bytes exceeds the limit of 64 MiB (67108864 bytes)", p.display()));
    }
}
