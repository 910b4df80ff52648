//! JSONL text files: one JSON object per line with a `text` field.

use crate::error::{Error, Result};
use serde_json::Value;
use std::io::BufRead;
use std::path::Path;

/// Read the `text` field of every line; errors name the file and line.
pub fn read_texts(path: &Path, max_docs: Option<usize>) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        if max_docs.is_some_and(|m| out.len() >= m) {
            break;
        }
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::InvalidConfig(format!("{}:{}: {msg}", path.display(), i + 1));
        let v: Value = serde_json::from_str(&line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        match v.get("text") {
            Some(Value::String(s)) => out.push(s.clone()),
            Some(other) => return Err(bad(format!("`text` must be a string, got {other}"))),
            None => return Err(bad("no `text` field".into())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\": \"a\"}\n\n{\"id\": 3}\n").unwrap();
        let err = read_texts(&p, None).unwrap_err().to_string();
        assert!(err.ends_with("d.jsonl:3: no `text` field"), "{err}");
        assert_eq!(read_texts(&p, Some(1)).unwrap(), vec!["a".to_string()]);
    }
}
