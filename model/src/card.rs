//! The files beside the weights that make a folder whole for the Hugging Face ecosystem: the
//! tokenizer's side files (kept from the source, or a `tokenizer_config.json` written for a
//! tokenizer btm trained) and a `README.md` model card.
//!
//! Tools such as mergekit and `AutoTokenizer` read `tokenizer_config.json` for the special tokens
//! and the chat template; a folder with `tokenizer.json` alone loads without a pad token, and
//! mergekit-moe then stops ("the tokenizer does not have a padding token").

use crate::config::ModelConfig;
use crate::error::{read_capped, Error, Result, MAX_JSON_BYTES};
use crate::lineage::Lineage;
use serde_json::{json, Map, Value};
use std::path::Path;

/// Tokenizer files besides `tokenizer.json` that travel with it, as transformers names them.
pub const TOKENIZER_SIDE_FILES: [&str; 5] =
    ["tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "added_tokens.json"];

/// The model card's file name.
pub const CARD: &str = "README.md";

/// The side files to write beside a copy of `tokenizer_json` (whose contents are `tokenizer`,
/// already read by the caller): those in its folder, byte for byte
/// (a seed's chat template and special tokens kept as they are); where the folder has no
/// `tokenizer_config.json` (a tokenizer btm trained), one made from the tokenizer's special tokens
/// and the model's bos/eos ids, with the end-of-sequence token as padding when the tokenizer has
/// no pad token of its own (the Llama convention).
pub fn tokenizer_side_files(tokenizer_json: &Path, tokenizer: &[u8], cfg: &ModelConfig) -> Result<Vec<(String, Vec<u8>)>> {
    let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
    let mut out = vec![];
    for name in TOKENIZER_SIDE_FILES {
        let p = dir.join(name);
        if p.is_file() {
            // Side files are JSON or a Jinja template: kilobytes, read whole under the JSON bound.
            out.push((name.to_string(), read_capped(&p, MAX_JSON_BYTES, "tokenizer side file")?));
        }
    }
    if !out.iter().any(|(n, _)| n == "tokenizer_config.json") {
        let tok: Value = serde_json::from_slice(tokenizer).map_err(|source| Error::Json { path: tokenizer_json.to_path_buf(), source })?;
        let config = tokenizer_config(&tok, cfg);
        out.push(("tokenizer_config.json".into(), serde_json::to_vec_pretty(&config).expect("json")));
    }
    Ok(out)
}

/// A `tokenizer_config.json` for a fast tokenizer: its special tokens, bos and eos from the
/// model's config (else `<s>` / `</s>` when present), pad = a `<pad>` token or else eos.
pub fn tokenizer_config(tokenizer_json: &Value, cfg: &ModelConfig) -> Value {
    let added: Vec<&Value> = tokenizer_json.get("added_tokens").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
    let content_of = |id: Option<u32>| {
        let id = id? as u64;
        added.iter().find(|t| t["id"].as_u64() == Some(id)).and_then(|t| t["content"].as_str()).map(String::from)
    };
    let named = |s: &str| added.iter().any(|t| t["content"] == s).then(|| s.to_string());
    let bos = content_of(cfg.bos_token_id).or_else(|| named("<s>"));
    let eos = content_of(cfg.eos_token_id).or_else(|| named("</s>"));
    let pad = named("<pad>").or_else(|| eos.clone());
    let mut decoder = Map::new();
    for t in &added {
        let flag = |k: &str| t.get(k).and_then(Value::as_bool).unwrap_or(false);
        decoder.insert(
            t["id"].to_string(),
            json!({
                "content": t["content"],
                "lstrip": flag("lstrip"),
                "normalized": flag("normalized"),
                "rstrip": flag("rstrip"),
                "single_word": flag("single_word"),
                "special": flag("special"),
            }),
        );
    }
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": named("<unk>"),
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    })
}

/// A model card: YAML front matter (`library_name`, `tags`, `base_model` from the lineage's
/// parents) that the Hub's card parser reads, then what the model is and where it came from.
pub fn model_card(cfg: &ModelConfig, lineage: Option<&Lineage>) -> String {
    let mut tags = vec!["btm".to_string()];
    if cfg.moe.is_some() {
        tags.push("moe".into());
    }
    let kind = lineage.map_or("model", |l| l.kind.as_str());
    if matches!(kind, "merge" | "add_expert" | "remove_expert" | "upcycle" | "average") {
        tags.push("merge".into());
    }
    // JSON strings are YAML strings: paths and URLs need no further quoting.
    let q = |s: &str| Value::String(s.to_string()).to_string();
    let mut card = String::from("---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n");
    for t in &tags {
        card.push_str(&format!("- {}\n", q(t)));
    }
    let parents: Vec<&str> = lineage.map(|l| l.parents.iter().map(|p| p.uri.as_str()).collect()).unwrap_or_default();
    if !parents.is_empty() {
        card.push_str("base_model:\n");
        for p in &parents {
            card.push_str(&format!("- {}\n", q(p)));
        }
    }
    let scores = lineage.map(validation_scores).unwrap_or_default();
    // The Hub's structured results (`model-index`): one per validation file, so tools that read
    // cards (huggingface_hub's `EvalResult`) find the perplexities.
    if !scores.is_empty() {
        card.push_str(&format!("model-index:\n- name: {}\n  results:\n", q(&title(kind, cfg))));
        for (name, ppl, _) in &scores {
            card.push_str(&format!(
                "  - task: {{type: text-generation}}\n    dataset: {{name: {}, type: text}}\n    metrics:\n    - {{type: perplexity, value: {ppl}, name: validation perplexity}}\n",
                q(name)
            ));
        }
    }
    card.push_str("---\n\n");
    card.push_str(&format!("# {}\n\n", title(kind, cfg)));
    card.push_str(&format!(
        "A {} checkpoint written by {} ({} parameters, {} active per token; {} layers, hidden size {}, vocabulary {}).\n",
        cfg.output_architecture().class_name(),
        lineage.map_or(format!("btm {}", env!("CARGO_PKG_VERSION")), |l| l.tool.clone()),
        cfg.num_parameters(),
        cfg.num_active_parameters(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.vocab_size,
    ));
    if let Some(m) = &cfg.moe {
        card.push_str(&format!("It routes each token to {} of {} experts ({}).\n", m.top_k, m.experts, m.routing.as_str()));
    }
    let Some(l) = lineage else { return card };
    if let Some(d) = &l.domain {
        card.push_str(&format!("Domain: {d}.\n"));
    }
    if let (Some(s), Some(t)) = (l.steps, l.tokens_seen) {
        card.push_str(&format!("Trained for {s} steps on {t} tokens.\n"));
    }
    if !l.parents.is_empty() {
        card.push_str("\n## Made from\n\n");
        for p in &l.parents {
            let domain = p.domain.as_ref().map(|d| format!(" ({d})")).unwrap_or_default();
            card.push_str(&format!("- `{}`{domain}\n", p.uri));
        }
    }
    if !scores.is_empty() {
        let step = l.extra[crate::lineage::VALIDATION]["step"].as_u64().unwrap_or_default();
        card.push_str(&format!(
            "\n## Evaluation\n\nValidation perplexity per data file, measured by the trainer at step {step}:\n\n| data | perplexity | tokens |\n|---|---:|---:|\n"
        ));
        for (name, ppl, tokens) in &scores {
            card.push_str(&format!("| {name} | {ppl:.3} | {tokens} |\n"));
        }
    }
    let settings: Map<String, Value> =
        l.extra.iter().filter(|(k, _)| *k != crate::lineage::VALIDATION).map(|(k, v)| (k.clone(), v.clone())).collect();
    if !settings.is_empty() {
        card.push_str("\n## Settings and measurements\n\nAs recorded in `btm.json`:\n\n```json\n");
        card.push_str(&serde_json::to_string_pretty(&settings).expect("json"));
        card.push_str("\n```\n");
    }
    card
}

/// The validation perplexities a lineage records ([`crate::lineage::VALIDATION`]): name,
/// perplexity and tokens per data file.
fn validation_scores(l: &Lineage) -> Vec<(String, f64, u64)> {
    let Some(Value::Array(data)) = l.extra.get(crate::lineage::VALIDATION).map(|v| &v["data"]) else { return vec![] };
    data.iter()
        .filter_map(|d| Some((d["name"].as_str()?.to_string(), d["perplexity"].as_f64()?, d["tokens"].as_u64().unwrap_or_default())))
        .collect()
}

fn title(kind: &str, cfg: &ModelConfig) -> String {
    let what = match kind {
        "merge" => "Branch-Train-Merge mixture of experts",
        "add_expert" => "Mixture of experts with an added expert",
        "remove_expert" => "Mixture of experts with an expert removed",
        "upcycle" => "Upcycled mixture of experts",
        "average" => "Parameter-averaged model",
        "expert" => "Domain expert",
        "seed" => "Seed model",
        _ if cfg.moe.is_some() => "Mixture of experts",
        _ => "Language model",
    };
    format!("{what} (btm)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> (ModelConfig, std::path::PathBuf) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
        let json = crate::error::read_json(&dir.join("config.json")).unwrap();
        (ModelConfig::from_hf(&json).unwrap().0, dir.join("tokenizer.json"))
    }

    #[test]
    fn a_trained_tokenizer_gets_special_tokens_and_a_pad_token() {
        let (cfg, tok) = llama();
        let files = tokenizer_side_files(&tok, &std::fs::read(&tok).unwrap(), &cfg).unwrap();
        assert_eq!(files.len(), 1, "the fixture has tokenizer.json only");
        let c: Value = serde_json::from_slice(&files[0].1).unwrap();
        assert_eq!((c["bos_token"].as_str(), c["eos_token"].as_str(), c["pad_token"].as_str()), (Some("<s>"), Some("</s>"), Some("</s>")));
        assert_eq!(c["added_tokens_decoder"]["1"]["content"], "</s>");
        assert_eq!(c["model_max_length"], cfg.max_position_embeddings);
    }

    #[test]
    fn side_files_are_kept_byte_for_byte() {
        let (cfg, tok) = llama();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(&tok, tmp.path().join("tokenizer.json")).unwrap();
        let seed_config = br#"{"chat_template": "{{ messages }}", "pad_token": "<s>"}"#;
        std::fs::write(tmp.path().join("tokenizer_config.json"), seed_config).unwrap();
        std::fs::write(tmp.path().join("chat_template.jinja"), b"{{ x }}").unwrap();
        let files = tokenizer_side_files(&tmp.path().join("tokenizer.json"), &std::fs::read(&tok).unwrap(), &cfg).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["tokenizer_config.json", "chat_template.jinja"]);
        assert_eq!(files[0].1, seed_config);
    }

    #[test]
    fn the_card_front_matter_parses() {
        let (cfg, _) = llama();
        let mut l = Lineage::new("merge");
        l.parents.push(crate::lineage::Parent {
            uri: "s3://bucket/run: experts/a".into(),
            manifest_sha256: None,
            domain: Some("a".into()),
        });
        l.extra.insert("router_init".into(), json!("centroid"));
        let card = model_card(&cfg, Some(&l));
        let front = card.strip_prefix("---\n").unwrap().split("\n---\n").next().unwrap();
        let meta: serde_yaml::Value = serde_yaml::from_str(front).unwrap();
        assert_eq!(meta["tags"], serde_yaml::from_str::<serde_yaml::Value>("[btm, merge]").unwrap());
        assert_eq!(meta["base_model"][0].as_str(), Some("s3://bucket/run: experts/a"));
        assert!(card.contains("\"router_init\": \"centroid\""), "{card}");
        assert!(meta.get("model-index").is_none(), "a merge has no validation of its own");
    }

    #[test]
    fn a_trained_models_validation_perplexities_are_in_the_card_and_its_model_index() {
        let (cfg, _) = llama();
        let mut l = Lineage::new("expert");
        let data = json!([{"name": "code/valid.jsonl", "perplexity": 31.25, "tokens": 2048}, {"name": "a: b/valid.jsonl", "perplexity": 9.5, "tokens": 512}]);
        l.extra.insert(crate::lineage::VALIDATION.into(), json!({"step": 120, "data": data}));
        let card = model_card(&cfg, Some(&l));
        let front = card.strip_prefix("---\n").unwrap().split("\n---\n").next().unwrap();
        let meta: serde_yaml::Value = serde_yaml::from_str(front).unwrap();
        let results = meta["model-index"][0]["results"].as_sequence().unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(results[1]["dataset"]["name"].as_str(), Some("a: b/valid.jsonl"));
        assert_eq!(results[0]["metrics"][0]["type"].as_str(), Some("perplexity"));
        assert_eq!(results[0]["metrics"][0]["value"].as_f64(), Some(31.25));
        assert!(card.contains("measured by the trainer at step 120") && card.contains("| code/valid.jsonl | 31.250 | 2048 |"), "{card}");
        assert!(!card.contains("Settings and measurements"), "the scores are not repeated as settings: {card}");
    }
}
