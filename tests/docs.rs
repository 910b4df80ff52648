//! docs/pipeline.md is the reference of the pipeline file: every key `btm schema` knows must be
//! documented there, so a key added to the pipeline types without docs fails here.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the orchestrator crate sits in the workspace root")
}

fn pipeline_doc() -> String {
    let path = repo_root().join("docs/pipeline.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn pipeline_schema() -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_btm")).arg("schema").output().expect("run btm schema");
    assert!(out.status.success(), "btm schema failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("btm schema prints JSON")
}

/// Every property name reachable from `node`, following `$ref`s into `$defs`, with the schema
/// paths it was found at (for the failure message).
fn collect_keys(root: &Value, node: &Value, at: &str, seen_refs: &mut BTreeSet<String>, keys: &mut BTreeMap<String, Vec<String>>) {
    let Value::Object(obj) = node else { return };
    if let Some(Value::String(r)) = obj.get("$ref") {
        if seen_refs.insert(r.clone()) {
            let target = r.strip_prefix('#').and_then(|p| root.pointer(p)).unwrap_or_else(|| panic!("unresolved $ref `{r}`"));
            collect_keys(root, target, r, seen_refs, keys);
        }
    }
    if let Some(Value::Object(props)) = obj.get("properties") {
        for (name, sub) in props {
            keys.entry(name.clone()).or_default().push(at.to_string());
            collect_keys(root, sub, &format!("{at}.{name}"), seen_refs, keys);
        }
    }
    // Subschemas of every other shape: variants, list items, maps' values.
    for combinator in ["anyOf", "oneOf", "allOf", "prefixItems"] {
        if let Some(Value::Array(subs)) = obj.get(combinator) {
            for (i, sub) in subs.iter().enumerate() {
                collect_keys(root, sub, &format!("{at}/{combinator}[{i}]"), seen_refs, keys);
            }
        }
    }
    for single in ["items", "additionalProperties", "not"] {
        if let Some(sub) = obj.get(single) {
            collect_keys(root, sub, &format!("{at}/{single}"), seen_refs, keys);
        }
    }
}

#[test]
fn every_pipeline_key_in_the_schema_is_documented() {
    let schema = pipeline_schema();
    let mut keys = BTreeMap::new();
    collect_keys(&schema, &schema, "", &mut BTreeSet::new(), &mut keys);
    // The walk must reach the nested blocks, or an empty result would pass: keys from the
    // top level, an engine variant, the seed's model, `train`, `merge`, `upcycle` and `eval`.
    for expected in ["name", "engine", "kind", "token_env", "hidden_size", "grad_accum", "calib_tokens", "granularity", "full_table"] {
        assert!(keys.contains_key(expected), "the schema walk did not reach `{expected}`; found {:?}", keys.keys());
    }
    let doc = pipeline_doc();
    let missing: Vec<String> = keys
        .iter()
        .filter(|(key, _)| !doc.contains(&format!("`{key}`")))
        .map(|(key, at)| {
            format!("`{key}` (at {})", at.iter().map(|a| if a.is_empty() { "the top level" } else { a }).collect::<Vec<_>>().join(", "))
        })
        .collect();
    assert!(missing.is_empty(), "docs/pipeline.md does not document these pipeline keys:\n  {}", missing.join("\n  "));
}

/// The configs the reference points to as examples exist.
#[test]
fn the_configs_docs_pipeline_md_names_exist() {
    let doc = pipeline_doc();
    let named: BTreeSet<&str> = doc
        .match_indices("configs/")
        .filter_map(|(i, _)| {
            let rest = &doc[i..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || "/-_.".contains(c)))?;
            rest[..end].strip_suffix('.').or(Some(&rest[..end])).filter(|p| p.ends_with(".yaml"))
        })
        .collect();
    assert!(named.contains("configs/quickstart.yaml"), "docs/pipeline.md should point to configs/quickstart.yaml");
    for path in named {
        assert!(repo_root().join(path).is_file(), "docs/pipeline.md names {path}, which does not exist");
    }
}

/// The complete pipelines the reference shows (YAML blocks that start with `name:`) validate,
/// their `../data/` paths pointed at the repository's data.
#[test]
fn the_complete_pipelines_in_docs_pipeline_md_validate() {
    let doc = pipeline_doc();
    let data = repo_root().join("data");
    let pipelines: Vec<&str> =
        doc.split("```yaml\n").skip(1).filter_map(|block| block.split("```").next()).filter(|b| b.starts_with("name:")).collect();
    assert!(!pipelines.is_empty(), "docs/pipeline.md shows no complete pipeline");
    let dir = tempfile::tempdir().unwrap();
    for (i, yaml) in pipelines.iter().enumerate() {
        let file = dir.path().join(format!("pipeline-{i}.yaml"));
        std::fs::write(&file, yaml.replace("../data/", &format!("{}/", data.display()))).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_btm")).arg("validate").arg(&file).output().expect("run btm validate");
        assert!(
            out.status.success(),
            "docs/pipeline.md's pipeline {i} does not validate:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).expect("README.md")
}

/// The first code block after `heading` (its language tag and the block's text).
fn first_block_after<'a>(doc: &'a str, heading: &str) -> &'a str {
    let at = doc.find(heading).unwrap_or_else(|| panic!("README.md has no `{heading}`"));
    let block = doc[at..].split("```").nth(1).unwrap_or_else(|| panic!("no code block after `{heading}`"));
    block.split_once('\n').map_or(block, |(_, body)| body)
}

/// The README's pipeline is the quickstart's, so it runs as written.
#[test]
fn the_readme_pipeline_is_the_quickstart() {
    let shown: serde_yaml::Value = serde_yaml::from_str(first_block_after(&readme(), "## A pipeline")).expect("README's pipeline parses");
    let file = std::fs::read_to_string(repo_root().join("configs/quickstart.yaml")).unwrap();
    let quickstart: serde_yaml::Value = serde_yaml::from_str(&file).unwrap();
    assert_eq!(shown, quickstart, "README.md's pipeline differs from configs/quickstart.yaml");
}

/// The README shows two commands, the second of them short and exactly what CI runs.
#[test]
fn the_readme_test_command_is_what_ci_runs() {
    let commands: Vec<String> = first_block_after(&readme(), "## The two commands")
        .lines()
        .map(|l| l.split(" #").next().unwrap_or(l).trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(commands.len(), 2, "README.md's two commands: {commands:?}");
    let test_command = &commands[1];
    assert!(test_command.len() <= 80, "the test command is {} characters: {test_command}", test_command.len());
    let ci = std::fs::read_to_string(repo_root().join(".ci/run")).unwrap();
    let ci_last = ci.lines().rev().find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')).unwrap().trim();
    assert_eq!(ci_last, test_command, ".ci/run must end with the README's test command");
}
