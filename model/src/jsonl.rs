//! JSONL text files: one JSON object per line with a `text` field (or another key), read as a stream (a
//! document at a time, whatever the file's size), plain or compressed by its extension:
//! `.gz` (gzip) or `.zst` (zstandard). Errors name the file and the line.

use crate::error::{Error, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// The bytes of a source, decompressed as its extension says.
pub fn open_decoded(path: &Path) -> Result<Box<dyn Read + Send>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    decoded(&path.to_string_lossy(), Box::new(file))
}

/// `reader`, decompressed as the extension of `name` (a path or URL) says: `.gz` (gzip),
/// `.zst`/`.zstd` (zstandard), else as it is.
pub fn decoded(name: &str, reader: Box<dyn Read + Send>) -> Result<Box<dyn Read + Send>> {
    let lower = name.to_ascii_lowercase();
    Ok(if lower.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(reader)))
    } else if lower.ends_with(".zst") || lower.ends_with(".zstd") {
        Box::new(zstd::stream::read::Decoder::new(reader).map_err(|e| Error::io(Path::new(name), e))?)
    } else {
        reader
    })
}

/// The text field of each line of a JSONL source, in order, read as a stream.
pub struct Texts {
    name: String,
    key: String,
    lines: std::io::Lines<BufReader<Box<dyn Read + Send>>>,
    line: usize,
}

impl Texts {
    /// Open `path` (decompressed as its extension says) for its `text` fields; nothing is
    /// read until iterated.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_key(path, "text")
    }

    /// Open `path` for the field `key` of each line.
    pub fn open_with_key(path: &Path, key: &str) -> Result<Self> {
        Ok(Self::from_reader(&path.to_string_lossy(), open_decoded(path)?, key))
    }

    /// The field `key` of each line of the (already decompressed) `reader`; `name` (a path or
    /// URL) is what errors name.
    pub fn from_reader(name: &str, reader: Box<dyn Read + Send>, key: &str) -> Self {
        Self { name: name.to_string(), key: key.to_string(), lines: BufReader::with_capacity(1 << 20, reader).lines(), line: 0 }
    }
}

impl Iterator for Texts {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        loop {
            self.line += 1;
            let line = match self.lines.next()? {
                Ok(l) => l,
                // A truncated or corrupt compressed stream, or a read error: name where.
                Err(e) => return Some(Err(Error::InvalidConfig(format!("{}:{}: reading: {e}", self.name, self.line)))),
            };
            if line.trim().is_empty() {
                continue;
            }
            let bad = |msg: String| Error::InvalidConfig(format!("{}:{}: {msg}", self.name, self.line));
            let v: Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(e) => return Some(Err(bad(format!("invalid JSON: {e}")))),
            };
            let key = &self.key;
            return Some(match v.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(bad(format!("`{key}` must be a string, got {other}"))),
                None => Err(bad(format!("no `{key}` field"))),
            });
        }
    }
}

/// Read the `text` field of every line (the first `max_docs`); errors name the file and line.
pub fn read_texts(path: &Path, max_docs: Option<usize>) -> Result<Vec<String>> {
    Texts::open(path)?.take(max_docs.unwrap_or(usize::MAX)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\": \"a\"}\n\n{\"id\": 3}\n").unwrap();
        let err = read_texts(&p, None).unwrap_err().to_string();
        assert!(err.ends_with("d.jsonl:3: no `text` field"), "{err}");
        assert_eq!(read_texts(&p, Some(1)).unwrap(), vec!["a".to_string()]);
    }

    /// The same documents plain, gzip- and zstd-compressed read the same; a truncated
    /// compressed stream is an error naming the file.
    #[test]
    fn compressed_sources_read_like_plain_ones_and_truncation_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..300).map(|i| format!("{{\"text\": \"document {i} of a compressed source\"}}\n")).collect();
        let plain = dir.path().join("d.jsonl");
        std::fs::write(&plain, &text).unwrap();
        let gz = dir.path().join("d.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::default());
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap();
        let zst = dir.path().join("d.jsonl.zst");
        std::fs::write(&zst, zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
        let want = read_texts(&plain, None).unwrap();
        assert_eq!(want.len(), 300);
        assert_eq!(read_texts(&gz, None).unwrap(), want);
        assert_eq!(read_texts(&zst, None).unwrap(), want);
        for (p, name) in [(&gz, "cut.jsonl.gz"), (&zst, "cut.jsonl.zst")] {
            let bytes = std::fs::read(p).unwrap();
            let cut = dir.path().join(name);
            std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
            let err = read_texts(&cut, None).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains("reading"), "{err}");
        }
    }
}
