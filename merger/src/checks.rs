//! Compatibility checks before anything is written: same architecture (every shared tensor's
//! shape and the rest of the config), same tokenizer (hash of `tokenizer.json`), and — only a
//! warning — the same lineage (experts branched from the same seed).

use anyhow::{bail, Result};
use btm_model::{Checkpoint, ModelConfig};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// SHA-256 of the checkpoint's `tokenizer.json`, re-serialised so formatting does not matter;
/// `None` if it has none.
pub fn tokenizer_hash(ckpt: &Checkpoint) -> Result<Option<String>> {
    let path = ckpt.dir().join(btm_model::checkpoint::TOKENIZER);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = btm_model::error::read_capped(&path, btm_model::error::MAX_TOKENIZER_BYTES, "tokenizer file")?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", path.display()))?;
    Ok(Some(hex::encode(Sha256::digest(serde_json::to_vec(&value)?))))
}

/// Every checkpoint must have the same tokenizer (or none has one).
pub fn same_tokenizer(ckpts: &[&Checkpoint]) -> Result<()> {
    let hashes = ckpts.iter().map(|c| tokenizer_hash(c)).collect::<Result<Vec<_>>>()?;
    for (c, h) in ckpts.iter().zip(&hashes).skip(1) {
        if *h != hashes[0] {
            let show =
                |h: &Option<String>| h.as_ref().map_or("no tokenizer.json".to_string(), |h| format!("tokenizer sha256 {}", &h[..12]));
            bail!(
                "tokenizer mismatch: {} has {}, but {} has {}; experts must share one tokenizer",
                ckpts[0].dir().display(),
                show(&hashes[0]),
                c.dir().display(),
                show(h)
            );
        }
    }
    Ok(())
}

/// The config without its FFN: what must agree for non-expert weights to be interchangeable.
fn trunk(cfg: &ModelConfig) -> Value {
    let mut v = serde_json::to_value(cfg).expect("config serialises");
    let obj = v.as_object_mut().expect("object");
    for key in ["intermediate_size", "moe", "bos_token_id", "eos_token_id"] {
        obj.remove(key);
    }
    v
}

/// Check that `b`'s non-FFN architecture equals `a`'s, naming the first difference.
pub fn same_trunk(a: &Checkpoint, b: &Checkpoint) -> Result<()> {
    let (ta, tb) = (trunk(&a.config), trunk(&b.config));
    if ta != tb {
        let (oa, ob) = (ta.as_object().expect("object"), tb.as_object().expect("object"));
        let diffs: Vec<String> = oa
            .iter()
            .filter(|(k, v)| ob.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {v} vs {}", ob.get(k).unwrap_or(&Value::Null)))
            .collect();
        // Name the families too: a Qwen3 expert beside a Llama one differs in more than a field.
        let (fa, fb) = (a.config.output_architecture(), b.config.output_architecture());
        let families = if fa == fb { String::new() } else { format!(" ({} vs {})", fa.class_name(), fb.class_name()) };
        bail!("architecture mismatch between {} and {}{families}: {}", a.dir().display(), b.dir().display(), diffs.join(", "));
    }
    Ok(())
}

/// A dense checkpoint (no MoE layers), or a named error.
pub fn require_dense(ckpt: &Checkpoint, role: &str) -> Result<()> {
    if ckpt.config.moe.is_some() {
        bail!("{role} {} is already a Mixture of Experts; expected a dense model", ckpt.dir().display());
    }
    Ok(())
}

/// The seed a checkpoint was branched from, per its `btm.json`: its first parent's manifest hash.
pub fn seed_of(ckpt: &Checkpoint) -> Option<String> {
    let lineage = ckpt.lineage().ok().flatten()?;
    lineage.parents.first().and_then(|p| p.manifest_sha256.clone())
}

/// Warnings (not errors) when the checkpoints do not all descend from the same seed.
pub fn lineage_warnings(ckpts: &[&Checkpoint]) -> Vec<String> {
    let seeds: Vec<Option<String>> = ckpts.iter().map(|c| seed_of(c)).collect();
    if seeds.iter().all(|s| *s == seeds[0]) {
        return vec![];
    }
    let describe: Vec<String> = ckpts
        .iter()
        .zip(&seeds)
        .map(|(c, s)| format!("{} ← {}", c.dir().display(), s.as_deref().map_or("unknown", |s| &s[..s.len().min(12)])))
        .collect();
    vec![format!(
        "lineage mismatch: the experts do not all branch from the same parent in btm.json ({}); merging anyway",
        describe.join("; ")
    )]
}
