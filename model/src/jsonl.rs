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

/// Largest zstd window btm decodes, as log2: 2^27 = 128 MiB, zstd's own default for decoders
/// (a frame that asks for more, written with `zstd --long=28` or above, is an error rather
/// than an allocation its header chooses).
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// `reader`, decompressed as the extension of `name` (a path or URL) says: `.gz` (gzip),
/// `.zst`/`.zstd` (zstandard, windows up to 2^[`ZSTD_WINDOW_LOG_MAX`]), else as it is.
pub fn decoded(name: &str, reader: Box<dyn Read + Send>) -> Result<Box<dyn Read + Send>> {
    let lower = name.to_ascii_lowercase();
    Ok(if lower.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(reader)))
    } else if lower.ends_with(".zst") || lower.ends_with(".zstd") {
        let mut decoder = zstd::stream::read::Decoder::new(reader).map_err(|e| Error::io(Path::new(name), e))?;
        decoder.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(|e| Error::io(Path::new(name), e))?;
        Box::new(decoder)
    } else {
        reader
    })
}

/// Longest JSONL line [`Texts`] reads by default, in bytes (without its newline): a document
/// that large is far beyond any training sequence, and the bound keeps a file without newlines
/// (or a decompression bomb) from being read into memory whole.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// How a bounded line read ended.
enum Line {
    /// A line is in the buffer (its newline, and a `\r` before it, removed).
    Read,
    /// The end of the input.
    End,
    /// The line has more than the limit's bytes; the buffer holds a part of it.
    TooLong,
}

/// Read one line of `reader` into `buf` (cleared first), holding at most `limit + 2` bytes of
/// it whatever the line's length, unlike `BufRead::read_line`, which grows its buffer until a
/// newline comes. `limit` bounds the line without its ending, which is stripped as
/// `BufRead::lines` strips it (`\n`, or `\r\n`).
fn read_line_bounded(reader: &mut impl BufRead, buf: &mut Vec<u8>, limit: usize) -> std::io::Result<Line> {
    buf.clear();
    // A line of `limit` bytes and its `\r\n` fit in `limit + 2`; a longer one fills them.
    let n = reader.by_ref().take(limit as u64 + 2).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(Line::End);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    Ok(if buf.len() > limit { Line::TooLong } else { Line::Read })
}

/// The text field of each line of a JSONL source, in order, read as a stream; lines are read
/// with a bounded buffer ([`MAX_LINE_BYTES`] unless [`Texts::with_max_line_bytes`] says
/// otherwise). After a read error or an over-long line the iterator ends: a corrupt stream has
/// no next line to resynchronise on.
pub struct Texts {
    name: String,
    key: String,
    reader: BufReader<Box<dyn Read + Send>>,
    buf: Vec<u8>,
    line: usize,
    max_line: usize,
    done: bool,
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
        Self {
            name: name.to_string(),
            key: key.to_string(),
            reader: BufReader::with_capacity(1 << 20, reader),
            buf: Vec::new(),
            line: 0,
            max_line: MAX_LINE_BYTES,
            done: false,
        }
    }

    /// The same, with lines of at most `limit` bytes (an [`Error::TooLarge`] naming the file,
    /// the line and the limit beyond that).
    pub fn with_max_line_bytes(mut self, limit: usize) -> Self {
        self.max_line = limit;
        self
    }

    /// Read the next line into `buf`, or `None` at the end; errors name the file and line, and
    /// end the iterator.
    fn read_line(&mut self) -> Option<Result<()>> {
        self.line += 1;
        let err = match read_line_bounded(&mut self.reader, &mut self.buf, self.max_line) {
            Ok(Line::End) => return None,
            Ok(Line::Read) => return Some(Ok(())),
            Ok(Line::TooLong) => {
                Error::TooLarge { path: self.name.clone().into(), what: format!("line {}", self.line), limit: self.max_line as u64 }
            }
            // A truncated or corrupt compressed stream, or a read error: name where.
            Err(e) => Error::InvalidConfig(format!("{}:{}: reading: {e}", self.name, self.line)),
        };
        self.done = true;
        Some(Err(err))
    }
}

impl Iterator for Texts {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        loop {
            if self.done {
                return None;
            }
            if let Err(e) = self.read_line()? {
                return Some(Err(e));
            }
            // Captures the fields `name` and `line` only, so `done` can still be set.
            let bad = |msg: &str| Error::InvalidConfig(format!("{}:{}: {msg}", self.name, self.line));
            let Ok(text) = std::str::from_utf8(&self.buf) else {
                self.done = true;
                return Some(Err(bad("reading: stream did not contain valid UTF-8")));
            };
            if text.trim().is_empty() {
                continue;
            }
            let v: Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => return Some(Err(bad(&format!("invalid JSON: {e}")))),
            };
            let key = &self.key;
            return Some(match v.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(bad(&format!("`{key}` must be a string, got {other}"))),
                None => Err(bad(&format!("no `{key}` field"))),
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

    /// `{"text": "aaa…` with `n` bytes of text and no end: made as it is read, never stored.
    struct EndlessLine {
        at: usize,
        len: usize,
    }

    impl Read for EndlessLine {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            const HEAD: &[u8] = b"{\"text\": \"";
            let mut n = 0;
            while n < buf.len() && self.at < self.len {
                buf[n] = HEAD.get(self.at).copied().unwrap_or(b'a');
                (n, self.at) = (n + 1, self.at + 1);
            }
            Ok(n)
        }
    }

    fn endless(len: usize) -> Box<dyn Read + Send> {
        Box::new(EndlessLine { at: 0, len })
    }

    /// A 70 MiB line ends in an error naming the file, the line and the default limit; the
    /// reader holds at most the limit, and the iterator ends after it.
    #[test]
    fn a_line_beyond_the_default_limit_is_named() {
        let mut texts = Texts::from_reader("big.jsonl", endless(70 << 20), "text");
        let err = texts.next().unwrap().unwrap_err().to_string();
        assert_eq!(err, "big.jsonl: line 1 exceeds the limit of 64 MiB (67108864 bytes)");
        assert!(texts.next().is_none());
    }

    /// The limit is exact: a line of `limit` bytes (before its newline, `\r\n` included) reads;
    /// one more byte does not, and the error names its line.
    #[test]
    fn the_line_limit_is_exact_and_configurable() {
        let line = |n: usize| format!("{{\"text\": \"{}\"}}", "b".repeat(n - 12));
        let text = format!("{}\r\n\n{}\n{}", line(40), line(40), line(41));
        let reader = || Box::new(std::io::Cursor::new(text.clone().into_bytes())) as Box<dyn Read + Send>;
        let got: Vec<_> = Texts::from_reader("d.jsonl", reader(), "text").with_max_line_bytes(40).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].as_ref().unwrap(), &"b".repeat(28));
        assert_eq!(got[2].as_ref().unwrap_err().to_string(), "d.jsonl: line 4 exceeds the limit of 40 bytes");
        let all: Vec<String> = Texts::from_reader("d.jsonl", reader(), "text").with_max_line_bytes(41).collect::<Result<_>>().unwrap();
        assert_eq!(all.len(), 3);
        // The last line needs no newline, as before.
        let last: Vec<String> = Texts::from_reader("d.jsonl", reader(), "text").collect::<Result<_>>().unwrap();
        assert_eq!(last, all);
    }

    /// A gzip or zstd bomb (a 70 MiB line in ~70 KB) is bounded like a plain file.
    #[test]
    fn decompression_bombs_are_bounded_by_the_line_limit() {
        let mut gz = vec![];
        flate2::read::GzEncoder::new(EndlessLine { at: 0, len: 70 << 20 }, flate2::Compression::fast()).read_to_end(&mut gz).unwrap();
        let mut zst = vec![];
        zstd::stream::read::Encoder::new(EndlessLine { at: 0, len: 70 << 20 }, 1).unwrap().read_to_end(&mut zst).unwrap();
        for (name, bytes) in [("bomb.jsonl.gz", gz), ("bomb.jsonl.zst", zst)] {
            assert!(bytes.len() < 1 << 20, "{name}: {} bytes", bytes.len());
            let decoded = decoded(name, Box::new(std::io::Cursor::new(bytes))).unwrap();
            let err = Texts::from_reader(name, decoded, "text").next().unwrap().unwrap_err().to_string();
            assert_eq!(err, format!("{name}: line 1 exceeds the limit of 64 MiB (67108864 bytes)"));
        }
    }

    /// Garbage where a compressed stream or UTF-8 should be: a named error, then the end.
    #[test]
    fn garbage_is_named() {
        for name in ["g.jsonl.gz", "g.jsonl.zst"] {
            let decoded = decoded(name, Box::new(std::io::Cursor::new(b"garbage, not compressed\n".to_vec()))).unwrap();
            let mut texts = Texts::from_reader(name, decoded, "text");
            let err = texts.next().unwrap().unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid model config: {name}:1: reading: ")), "{err}");
            assert!(texts.next().is_none());
        }
        let mut texts = Texts::from_reader("g.jsonl", Box::new(std::io::Cursor::new(b"{\"text\": \"\xff\"}\n".to_vec())), "text");
        assert!(texts.next().unwrap().unwrap_err().to_string().ends_with("g.jsonl:1: reading: stream did not contain valid UTF-8"));
    }

    /// A zstd frame that asks for a window beyond 2^27 bytes is refused, not allocated.
    #[test]
    fn zstd_windows_beyond_the_bound_are_refused() {
        let mut enc = zstd::stream::write::Encoder::new(vec![], 1).unwrap();
        enc.window_log(ZSTD_WINDOW_LOG_MAX + 3).unwrap();
        enc.long_distance_matching(true).unwrap();
        enc.write_all(b"{\"text\": \"a\"}\n").unwrap();
        let bytes = enc.finish().unwrap();
        let decoded = decoded("w.jsonl.zst", Box::new(std::io::Cursor::new(bytes))).unwrap();
        let err = Texts::from_reader("w.jsonl.zst", decoded, "text").next().unwrap().unwrap_err().to_string();
        assert!(err.contains("w.jsonl.zst:1: reading: ") && err.contains("too much memory"), "{err}");
    }
}
