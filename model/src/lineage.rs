//! `btm.json`: where a checkpoint came from. Written beside every checkpoint btm produces;
//! never required to read a plain Hugging Face directory.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

pub const LINEAGE: &str = "btm.json";

/// A checkpoint this one was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parent {
    /// Where the parent was read from.
    pub uri: String,
    /// SHA-256 of the parent's `MANIFEST.json`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// The btm version that wrote the checkpoint.
    pub tool: String,
    /// What made it: `import`, `seed`, `expert`, `merge`, `upcycle`, `add_expert`, `continue`, ...
    pub kind: String,
    #[serde(default)]
    pub parents: Vec<Parent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_seen: Option<u64>,
    /// Anything else the producer records (router init, routing accuracy, scale, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Lineage {
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

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("lineage serialises")
    }
}
