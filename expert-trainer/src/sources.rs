//! Training text sources, by format, local or in an object store:
//!
//! - **JSONL** (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`): one JSON object per line, the text under
//!   `text_key` (default `text`);
//! - **parquet** (`.parquet`, a folder of `*.parquet` shards, or a glob such as
//!   `data/train-*.parquet`: the Hugging Face datasets layout), the text in the column
//!   `text_key`; read without Arrow, a row group's column a batch at a time;
//! - **Megatron-LM indexed datasets** (`prefix.idx` + `prefix.bin`), already tokens: read in
//!   place by [`crate::indexed`], not here.
//!
//! A source in an object store is never downloaded whole: JSONL is streamed (a background
//! thread fetches a few chunks ahead of the tokenizer), parquet is read by byte ranges (the
//! footer, then each page). Documents come out one at a time, so memory stays bounded by a
//! batch whatever the source's size. [`Source::identity`] names a source's content for the
//! token cache without reading it when the store can vouch for it (size and ETag).

use anyhow::{bail, ensure, Context, Result};
use btm_model::folder::{is_remote, RemoteObject};
use bytes::Bytes;
use parquet::column::page::{Page, PageMetadata, PageReader};
use parquet::file::reader::{ChunkReader, FileReader, Length, SerializedFileReader};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// The text field or column read when none is named.
pub const DEFAULT_TEXT_KEY: &str = "text";

/// How a source's bytes hold its documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per line (plain, gzip or zstd by extension).
    Jsonl,
    /// Parquet files: one, a folder of them, or a glob.
    Parquet,
    /// A Megatron-LM indexed dataset (`.idx` + `.bin`), already tokenized.
    Indexed,
}

impl Format {
    /// The format a location's name says: `.parquet` or a `*.parquet` glob → parquet; a local
    /// folder → parquet (its shards); `.idx`/`.bin` → indexed; anything else → JSONL.
    pub fn detect(location: &str) -> Format {
        let lower = location.to_ascii_lowercase();
        if lower.ends_with(".parquet") || (!is_remote(location) && Path::new(location).is_dir()) {
            Format::Parquet
        } else if crate::indexed::is_indexed(Path::new(location)) {
            Format::Indexed
        } else {
            Format::Jsonl
        }
    }
}

/// The files of a parquet source, in name order: the file itself, the `*.parquet` files of a
/// folder, or those matching a `*` glob in the last path component. Remote sources name one
/// object.
pub fn parquet_files(location: &str) -> Result<Vec<String>> {
    if is_remote(location) {
        ensure!(!location.contains('*'), "{location}: globs are not supported in object-store URLs; name the shard");
        return Ok(vec![location.to_string()]);
    }
    let path = Path::new(location);
    let (dir, pattern) = if path.is_dir() {
        (path.to_path_buf(), "*.parquet".to_string())
    } else if location.contains('*') {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        (dir, path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
    } else {
        return Ok(vec![location.to_string()]);
    };
    let (prefix, suffix) = pattern.split_once('*').context("a glob has one `*`")?;
    ensure!(!suffix.contains('*'), "{location}: only one `*` is supported");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() >= prefix.len() + suffix.len() && n.starts_with(prefix) && n.ends_with(suffix))
        .map(|n| dir.join(n).to_string_lossy().into_owned())
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "{location}: no parquet files");
    Ok(files)
}

/// A text source, opened: its files in order, each a local path or an object asked once for
/// its size and ETag. The same handles name the source for the token cache ([`Source::identity`])
/// and read it ([`Source::documents`]), so the key and the bytes are of one listing and one
/// version of each object.
pub struct Source {
    location: String,
    format: Format,
    text_key: String,
    files: Vec<SourceFile>,
}

enum SourceFile {
    Local(String),
    Remote(String, Arc<RemoteObject>),
}

impl Source {
    /// Open the source at `location` (a path, a glob or a URL) in `format` (JSONL or parquet).
    pub fn open(location: &str, format: Format, text_key: &str) -> Result<Self> {
        let names = match format {
            Format::Jsonl => vec![location.to_string()],
            Format::Parquet => parquet_files(location)?,
            Format::Indexed => bail!("{location}: an indexed dataset holds tokens, not text"),
        };
        let files = names
            .into_iter()
            .map(|f| {
                Ok(if is_remote(&f) {
                    let o = Arc::new(RemoteObject::open(&f)?);
                    SourceFile::Remote(f, o)
                } else {
                    SourceFile::Local(f.strip_prefix("file://").unwrap_or(&f).to_string())
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { location: location.to_string(), format, text_key: text_key.to_string(), files })
    }

    /// What the token cache keys the source by: local files by the SHA-256 of their bytes
    /// (read as a stream), objects by URL, size and ETag (no byte is fetched), then the format
    /// and text key when not the defaults (so a local JSONL file keeps the key it had before
    /// formats were added: its digest alone).
    pub fn identity(&self) -> Result<Vec<u8>> {
        let mut id = vec![];
        for f in &self.files {
            match f {
                SourceFile::Remote(url, o) => id.extend(format!("{url}\0{}\0{}\0", o.size(), o.etag().unwrap_or("")).bytes()),
                SourceFile::Local(path) => id.extend(hex::decode(btm_model::manifest::hash_file(Path::new(path))?.1)?),
            }
        }
        if self.format != Format::Jsonl || self.text_key != DEFAULT_TEXT_KEY {
            id.extend(format!("\0{:?}\0{}", self.format, self.text_key).bytes());
        }
        Ok(id)
    }

    /// The source's documents, streamed.
    pub fn documents(&self) -> Result<Documents> {
        let remote: Vec<Arc<RemoteObject>> = self
            .files
            .iter()
            .filter_map(|f| match f {
                SourceFile::Remote(_, o) => Some(o.clone()),
                SourceFile::Local(_) => None,
            })
            .collect();
        let inner: Box<dyn Iterator<Item = Result<String>> + Send> = match self.format {
            Format::Jsonl => {
                let reader: Box<dyn Read + Send> = match &self.files[0] {
                    SourceFile::Remote(_, o) => o.stream_from(0),
                    SourceFile::Local(path) => Box::new(std::fs::File::open(path).with_context(|| format!("opening {path}"))?),
                };
                let location = &self.location;
                let texts = btm_model::jsonl::Texts::from_reader(location, btm_model::jsonl::decoded(location, reader)?, &self.text_key);
                Box::new(texts.map(|t| t.map_err(anyhow::Error::from)))
            }
            _ => {
                let chunks = self
                    .files
                    .iter()
                    .map(|f| {
                        Ok(match f {
                            SourceFile::Remote(url, o) => (url.clone(), Chunks::Remote(o.clone(), Default::default())),
                            SourceFile::Local(path) => (
                                path.clone(),
                                Chunks::Local(Arc::new(std::fs::File::open(path).with_context(|| format!("opening {path}"))?)),
                            ),
                        })
                    })
                    .collect::<Result<VecDeque<_>>>()?;
                Box::new(ParquetTexts {
                    files: chunks,
                    key: self.text_key.clone(),
                    current: None,
                    batch: VecDeque::new(),
                    reading: String::new(),
                })
            }
        };
        Ok(Documents { inner, remote })
    }
}

/// The documents of a source, streamed, and the bytes fetched from object stores so far.
pub struct Documents {
    inner: Box<dyn Iterator<Item = Result<String>> + Send>,
    remote: Vec<Arc<RemoteObject>>,
}

impl Documents {
    /// Open the source at `location` (a path, a glob or a URL) in `format` and stream it.
    pub fn open(location: &str, format: Format, text_key: &str) -> Result<Self> {
        Source::open(location, format, text_key)?.documents()
    }

    /// Bytes fetched from object stores so far (0 for local files).
    pub fn fetched(&self) -> u64 {
        self.remote.iter().map(|o| o.fetched()).sum()
    }
}

impl Iterator for Documents {
    type Item = Result<String>;
    fn next(&mut self) -> Option<Result<String>> {
        self.inner.next()
    }
}

/// A parquet file's bytes: a local file, or an object read by ranges. A remote file keeps one
/// window of bytes: the text column's chunk of the row group being read, fetched with one
/// range request when the row group is opened, so its pages (headers and data) are served
/// from memory; anything outside the window is fetched as asked.
#[derive(Clone)]
enum Chunks {
    Local(Arc<std::fs::File>),
    Remote(Arc<RemoteObject>, Arc<std::sync::Mutex<Option<(u64, Bytes)>>>),
}

/// Bytes a page-header read takes at once outside the window (headers are a few dozen bytes).
const HEADER_READ: u64 = 4 << 10;

impl Chunks {
    /// Fetch `range` of a remote file into its window (replacing the last one).
    fn prefetch(&self, range: std::ops::Range<u64>) -> Result<()> {
        if let Chunks::Remote(o, window) = self {
            let bytes = o.read_range(range.clone())?;
            *window.lock().expect("window") = Some((range.start, bytes));
        }
        Ok(())
    }

    /// Bytes from `start`: up to `max`, or what the window holds from there.
    fn read_some(&self, start: u64, max: u64) -> parquet::errors::Result<Bytes> {
        if let Chunks::Remote(_, window) = self {
            if let Some((at, bytes)) = window.lock().expect("window").as_ref() {
                if start >= *at && start < at + bytes.len() as u64 {
                    return Ok(bytes.slice((start - at) as usize..));
                }
            }
        }
        let end = start.saturating_add(max).min(self.len());
        self.get_bytes(start, end.saturating_sub(start) as usize)
    }

    /// `length` bytes from `start`, if the file holds them: a range the file's metadata names
    /// is checked before anything of its size is allocated or fetched.
    fn checked_range(&self, start: u64, length: u64) -> std::result::Result<std::ops::Range<u64>, String> {
        let len = self.len();
        match start.checked_add(length) {
            Some(end) if end <= len => Ok(start..end),
            _ => Err(format!("bytes {start}..{start}+{length} lie beyond the end of the file ({len} bytes)")),
        }
    }
}

impl Length for Chunks {
    fn len(&self) -> u64 {
        match self {
            Chunks::Local(f) => f.metadata().map(|m| m.len()).unwrap_or(0),
            Chunks::Remote(o, _) => o.size(),
        }
    }
}

impl ChunkReader for Chunks {
    type T = Box<dyn Read + Send>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(Box::new(RangeReader { chunks: self.clone(), pos: start, buf: Bytes::new() }))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let fail = |e: String| parquet::errors::ParquetError::External(e.into());
        self.checked_range(start, length as u64).map_err(fail)?;
        match self {
            Chunks::Local(f) => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; length];
                f.read_exact_at(&mut buf, start).map_err(|e| fail(e.to_string()))?;
                Ok(buf.into())
            }
            Chunks::Remote(o, window) => {
                if let Some((at, bytes)) = window.lock().expect("window").as_ref() {
                    if start >= *at && start + length as u64 <= at + bytes.len() as u64 {
                        let from = (start - at) as usize;
                        return Ok(bytes.slice(from..from + length));
                    }
                }
                o.read_range(start..start + length as u64).map_err(|e| fail(e.to_string()))
            }
        }
    }
}

/// Sequential reads from `pos`: from the window, or fetched [`HEADER_READ`] bytes at a time.
struct RangeReader {
    chunks: Chunks,
    pos: u64,
    buf: Bytes,
}

impl Read for RangeReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            if self.pos >= self.chunks.len() {
                // The parquet crate reads only page headers through this reader, and a header
                // never runs past the file's end. A read there is a corrupt header's, and an
                // error, not an end: the crate's thrift skip ignores a short read and goes on
                // skipping the rest of what the corrupt header claims (found by fuzzing: a
                // read that did not end).
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "a page header runs past the end of the file"));
            }
            self.buf = self.chunks.read_some(self.pos, HEADER_READ).map_err(std::io::Error::other)?;
            self.pos += self.buf.len() as u64;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

/// The bytes of a column chunk, from its metadata, once they are checked to lie in the file.
/// Checked here because the parquet crate's own `byte_range` (which its column readers call)
/// panics on a negative offset or size, which a corrupt footer can hold.
fn column_chunk(
    column: &parquet::file::metadata::ColumnChunkMetaData,
    chunks: &Chunks,
) -> std::result::Result<std::ops::Range<u64>, String> {
    let start = column.dictionary_page_offset().unwrap_or(column.data_page_offset());
    let len = column.compressed_size();
    match (u64::try_from(start), u64::try_from(len)) {
        (Ok(start), Ok(len)) => chunks.checked_range(start, len),
        _ => Err(format!("offset {start} or size {len} is negative")),
    }
}

/// The pages of a text column chunk, each dictionary page checked before the parquet crate
/// decodes it. The crate (60.1) sizes a dictionary by the count in its page header before it
/// reads a value, so a corrupt count allocates without bound and aborts the process (found by
/// fuzzing: 1.2 billion values claimed in a 574-byte file). A plain-encoded text value takes at
/// least its 4-byte length, so a dictionary page holds at most a quarter of its bytes in values.
struct CheckedPages(Box<dyn PageReader>);

impl CheckedPages {
    fn check(page: Option<Page>) -> parquet::errors::Result<Option<Page>> {
        if let Some(Page::DictionaryPage { buf, num_values, .. }) = &page {
            if u64::from(*num_values) * 4 > buf.len() as u64 {
                return Err(parquet::errors::ParquetError::General(format!(
                    "a dictionary page claims {num_values} text values in {} bytes (each takes at least 4)",
                    buf.len()
                )));
            }
        }
        Ok(page)
    }
}

impl Iterator for CheckedPages {
    type Item = parquet::errors::Result<Page>;
    fn next(&mut self) -> Option<Self::Item> {
        self.get_next_page().transpose()
    }
}

impl PageReader for CheckedPages {
    fn get_next_page(&mut self) -> parquet::errors::Result<Option<Page>> {
        Self::check(self.0.get_next_page()?)
    }
    fn peek_next_page(&mut self) -> parquet::errors::Result<Option<PageMetadata>> {
        self.0.peek_next_page()
    }
    fn skip_next_page(&mut self) -> parquet::errors::Result<()> {
        self.0.skip_next_page()
    }
    fn supports_deferred_dictionary(&self) -> bool {
        self.0.supports_deferred_dictionary()
    }
    fn take_deferred_dictionary(&mut self) -> parquet::errors::Result<Option<Page>> {
        Self::check(self.0.take_deferred_dictionary()?)
    }
    fn at_record_boundary(&mut self) -> parquet::errors::Result<bool> {
        self.0.at_record_boundary()
    }
}

/// Documents per batch read from a parquet column.
const PARQUET_BATCH: usize = 1024;

/// The text column of parquet files, in file, row-group and row order.
struct ParquetTexts {
    files: VecDeque<(String, Chunks)>,
    key: String,
    /// The open file: its name, reader, the column's index, the next row group, the column
    /// reader of the current row group, and the rows read before it.
    current: Option<OpenParquet>,
    batch: VecDeque<String>,
    /// The file being read (or opened), for an error no reader can name it in.
    reading: String,
}

struct OpenParquet {
    name: String,
    chunks: Chunks,
    reader: SerializedFileReader<Chunks>,
    column: usize,
    next_row_group: usize,
    values: Option<parquet::column::reader::ColumnReaderImpl<parquet::data_type::ByteArrayType>>,
    row: u64,
}

impl ParquetTexts {
    /// Open the next file and find its text column.
    fn open_next(&mut self) -> Result<bool> {
        let Some((name, chunks)) = self.files.pop_front() else { return Ok(false) };
        self.reading.clone_from(&name);
        let reader = SerializedFileReader::new(chunks.clone()).with_context(|| format!("{name}: not a parquet file"))?;
        let schema = reader.metadata().file_metadata().schema_descr_ptr();
        let columns: Vec<String> = (0..schema.num_columns()).map(|i| schema.column(i).path().string()).collect();
        let Some(column) = columns.iter().position(|c| *c == self.key) else {
            bail!("{name}: no column `{}` (columns: {}); set text_key", self.key, columns.join(", "));
        };
        let ty = schema.column(column).physical_type();
        ensure!(ty == parquet::basic::Type::BYTE_ARRAY, "{name}: column `{}` holds {ty:?}, not text", self.key);
        self.current = Some(OpenParquet { name, chunks, reader, column, next_row_group: 0, values: None, row: 0 });
        Ok(true)
    }

    /// Fill `batch` with the next texts; false at the end of every file.
    fn fill(&mut self) -> Result<bool> {
        use parquet::column::reader::ColumnReader;
        loop {
            if self.current.is_none() && !self.open_next()? {
                return Ok(false);
            }
            let f = self.current.as_mut().expect("an open file");
            if f.values.is_none() {
                if f.next_row_group == f.reader.num_row_groups() {
                    self.current = None;
                    continue;
                }
                let column = f.reader.metadata().row_group(f.next_row_group).column(f.column);
                let at = || format!("{}: row group {}", f.name, f.next_row_group);
                let range = column_chunk(column, &f.chunks).map_err(|e| anyhow::anyhow!("{}: column chunk {e}", at()))?;
                f.chunks.prefetch(range).with_context(at)?;
                let rg = f.reader.get_row_group(f.next_row_group).with_context(|| format!("{}: row group {}", f.name, f.next_row_group))?;
                f.next_row_group += 1;
                let pages = rg.get_column_page_reader(f.column).with_context(|| format!("{}: reading column `{}`", f.name, self.key))?;
                let descr = f.reader.metadata().file_metadata().schema_descr().column(f.column);
                match parquet::column::reader::get_column_reader(descr, Box::new(CheckedPages(pages))) {
                    ColumnReader::ByteArrayColumnReader(r) => f.values = Some(r),
                    _ => bail!("{}: column `{}` is not text", f.name, self.key),
                }
            }
            let reader = f.values.as_mut().expect("a column reader");
            let (mut defs, mut values) = (Vec::new(), Vec::new());
            let (records, _, _) = reader
                .read_records(PARQUET_BATCH, Some(&mut defs), None, &mut values)
                .with_context(|| format!("{}: reading column `{}` at row {}", f.name, self.key, f.row))?;
            if records == 0 {
                f.values = None;
                continue;
            }
            let max_def = f.reader.metadata().file_metadata().schema_descr().column(f.column).max_def_level();
            let mut values = values.into_iter();
            for i in 0..records {
                let row = f.row + i as u64;
                if max_def > 0 && defs.get(i).is_some_and(|&d| d < max_def) {
                    bail!("{}: row {row}: `{}` is null", f.name, self.key);
                }
                let v = values.next().with_context(|| format!("{}: row {row}: no value", f.name))?;
                let text = String::from_utf8(v.data().to_vec())
                    .map_err(|_| anyhow::anyhow!("{}: row {row}: `{}` is not UTF-8", f.name, self.key))?;
                self.batch.push_back(text);
            }
            f.row += records as u64;
            return Ok(true);
        }
    }
}

impl Iterator for ParquetTexts {
    type Item = Result<String>;
    fn next(&mut self) -> Option<Result<String>> {
        if self.batch.is_empty() {
            // The parquet crate (60.1) panics on some corrupt files instead of failing (found by
            // fuzzing: a dictionary-encoded page without a dictionary page reaches an `expect`).
            // Such a panic is caught and named as the file's error, which ends the source as any
            // error does, so no state it left half-updated is read again. The panic hook still
            // prints its message.
            let filled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.fill())).unwrap_or_else(|panic| {
                let msg = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                Err(anyhow::anyhow!("{}: the parquet reader panicked on it: {}", self.reading, msg.unwrap_or_default()))
            });
            match filled {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    // An error ends the source.
                    self.files.clear();
                    self.current = None;
                    return Some(Err(e));
                }
            }
        }
        self.batch.pop_front().map(Ok)
    }
}

/// Write `texts` as a parquet file with one optional UTF-8 column `column` (as the Hugging
/// Face datasets library writes a text column), in row groups of `rows_per_group`, snappy
/// compressed: the reference writer of the tests and `btm bench data`.
pub fn write_parquet(path: &Path, texts: &[String], column: &str, rows_per_group: usize) -> Result<()> {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema =
        Arc::new(parquet::schema::parser::parse_message_type(&format!("message schema {{ OPTIONAL BYTE_ARRAY {column} (UTF8); }}"))?);
    let props = Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = SerializedFileWriter::new(file, schema, props)?;
    for group in texts.chunks(rows_per_group.max(1)) {
        let mut rg = w.next_row_group()?;
        let mut col = rg.next_column()?.context("one column")?;
        let values: Vec<ByteArray> = group.iter().map(|t| ByteArray::from(t.as_str())).collect();
        col.typed::<ByteArrayType>().write_batch(&values, Some(&vec![1; values.len()]), None)?;
        col.close()?;
        rg.close()?;
    }
    w.close()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("document {i}: ünïcode and \"quotes\" {}", "x".repeat(i % 7))).collect()
    }

    #[test]
    fn parquet_shards_read_like_jsonl_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let all = texts(2500);
        std::fs::create_dir(dir.path().join("shards")).unwrap();
        write_parquet(&dir.path().join("shards/train-00001.parquet"), &all[1200..], "text", 500).unwrap();
        write_parquet(&dir.path().join("shards/train-00000.parquet"), &all[..1200], "text", 700).unwrap();
        let jsonl = dir.path().join("all.jsonl");
        std::fs::write(&jsonl, all.iter().map(|t| serde_json::json!({ "text": t }).to_string() + "\n").collect::<String>()).unwrap();
        let folder = dir.path().join("shards").to_string_lossy().into_owned();
        let glob = dir.path().join("shards/train-*.parquet").to_string_lossy().into_owned();
        for loc in [&folder, &glob] {
            assert_eq!(Format::detect(loc), Format::Parquet);
            let got: Vec<String> = Documents::open(loc, Format::Parquet, "text").unwrap().collect::<Result<_>>().unwrap();
            assert_eq!(got, all);
        }
        let from_jsonl: Vec<String> =
            Documents::open(&jsonl.to_string_lossy(), Format::Jsonl, "text").unwrap().collect::<Result<_>>().unwrap();
        assert_eq!(from_jsonl, all);
        // The key names the format and text key only when they are not the defaults.
        let id = |key: &str| Source::open(&folder, Format::Parquet, key).unwrap().identity().unwrap();
        assert_ne!(id("text"), id("body"));
    }

    #[test]
    fn a_missing_column_or_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.parquet");
        write_parquet(&p, &texts(10), "content", 4).unwrap();
        let err = format!("{:#}", Documents::open(&p.to_string_lossy(), Format::Parquet, "text").unwrap().next().unwrap().unwrap_err());
        assert!(err.contains("d.parquet: no column `text` (columns: content)"), "{err}");
        let got: Vec<String> = Documents::open(&p.to_string_lossy(), Format::Parquet, "content").unwrap().collect::<Result<_>>().unwrap();
        assert_eq!(got, texts(10));
        let j = dir.path().join("d.jsonl");
        std::fs::write(&j, "{\"body\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
        let err = format!("{:#}", Documents::open(&j.to_string_lossy(), Format::Jsonl, "body").unwrap().nth(1).unwrap().unwrap_err());
        assert!(err.ends_with("d.jsonl:2: no `body` field"), "{err}");
        let bad = dir.path().join("bad.parquet");
        std::fs::write(&bad, b"not parquet at all").unwrap();
        let err = format!("{:#}", Documents::open(&bad.to_string_lossy(), Format::Parquet, "text").unwrap().next().unwrap().unwrap_err());
        assert!(err.contains("bad.parquet: not a parquet file"), "{err}");
    }

    fn first_error(path: &Path, format: Format) -> String {
        let docs = Documents::open(&path.to_string_lossy(), format, "text").unwrap();
        format!("{:#}", docs.filter_map(|d| d.err()).next().expect("an error"))
    }

    /// The first error of a parquet file of `hex` bytes, its path written as `<file>`.
    fn parquet_error(hex: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.parquet");
        std::fs::write(&p, hex::decode(hex).unwrap()).unwrap();
        first_error(&p, Format::Parquet).replace(&p.display().to_string(), "<file>")
    }

    /// A parquet file (found by fuzzing, minimised) whose data page is dictionary-encoded
    /// without a dictionary page: the parquet crate panics on it; btm names the file instead.
    #[test]
    fn a_panic_in_the_parquet_crate_is_a_named_error() {
        let err = parquet_error(concat!(
            "504152311500151015142c15021510150615060000081c020000001502192c4806736368656d61150200150c250218047465787425000016",
            "04192c191c26001c150c19350006101918047465787415021602168001168801265a26081c36002815646f63feffffff74203020c3bc6ec3",
            "af20227122201815646f63756d656e74203020c3bc6ec3af2022712220111100192c15041500150200150015101502003c162a2926000200",
            "00169204151a169a02157a0016800116022608168801140000191c26001c150c19350006101918047465787415021602168201168a0126e4",
            "012695011c36001628646f63756d656e74203120c3bc6ec3af2022712220781816646f63756d656e74203120c3bc6ec3af20227122207811",
            "1100192c15041500150200150015101502003c162c29260002000016ac04151c169403157e001682011602269001168a0114020028197061",
            "72717565742d72732076657273696f6e2036302e312e30191c1c0000005201000050415231",
        ));
        assert!(err.starts_with("<file>: the parquet reader panicked on it: "), "{err}");
    }

    /// A parquet file (found by fuzzing, minimised) whose dictionary page claims 1.2 billion
    /// values: the parquet crate would size the dictionary by that count and abort on the
    /// allocation; btm names the page instead, before anything is allocated.
    #[test]
    fn a_dictionary_larger_than_its_page_is_a_named_error() {
        let err = parquet_error(concat!(
            "504152311504159c0115704c15fefffff80615001200004e6415000000646f63756d656e74203020c3bc6ec3af2022712220162e19000032",
            "1d190478172e1a0034201502192c4806736368656d61150200150c2502180474657874250000160e193c191c26001c150c19350006101918",
            "04746578741502160616f00116c80126960126081c36002817646f63756d656e740000000000000000202271222078781815646f63756d65",
            "6e74203020c3bc6ec3af2022712220111100192c15041500150200150015101502003c16840129260006000016bef4eae1e9a404157e0016",
            "f0011606260816c801140000191c26001c150c1935000610191804746578741502160616820216c00126d60226d0011c3700281a646f6375",
            "6d656e74203520c3bc6ec3af202271222078787878781818646f63756d656e74203320c3bc6ec3af2022712220787878111100192c150415",
            "00150200150015101502003c16960129260006000016dc07151e16a205158a0100168202160626d00116c001140200191c26001c150c1935",
            "0006101918047465787415021602168c0116940126ee032690031c3600281b646f63756d656e742036206e2220c3afc3bc71222078787878",
            "7878181b646f63756d656e74203620c3bc6ec3af2022712220787878787878111100192c15041500150200150015101502003c1637292600",
            "02000016faf9eae3e7ac0615920100168c0116022690031694011404002819706172717565742d72732076657273696f6e3d36302e312e30",
            "191c1c000000f401000050415231",
        ));
        assert!(err.starts_with("<file>: reading column `text` at row 0: "), "{err}");
        assert!(err.contains("a dictionary page claims"), "{err}");
    }

    /// A JSONL source with a 70 MiB line (gzip-compressed to kilobytes: a decompression bomb)
    /// ends in an error naming the file, the line and the limit; memory stays at the limit.
    #[test]
    fn jsonl_lines_beyond_the_limit_are_named() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bomb.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&p).unwrap(), flate2::Compression::fast());
        enc.write_all(b"{\"text\": \"short\"}\n{\"text\": \"").unwrap();
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..70 {
            enc.write_all(&chunk).unwrap();
        }
        enc.finish().unwrap();
        let err = first_error(&p, Format::Jsonl);
        assert_eq!(err, format!("{}: line 2 exceeds the limit of 64 MiB (67108864 bytes)", p.display()));
    }

    /// Truncated and garbage compressed JSONL end in errors naming the file and line.
    #[test]
    fn truncated_or_garbage_compressed_jsonl_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..200).map(|i| format!("{{\"text\": \"document {i}\"}}\n")).collect();
        let gz = {
            let mut enc = flate2::write::GzEncoder::new(vec![], flate2::Compression::default());
            std::io::Write::write_all(&mut enc, text.as_bytes()).unwrap();
            enc.finish().unwrap()
        };
        let zst = zstd::encode_all(text.as_bytes(), 3).unwrap();
        for (name, bytes) in [("cut.jsonl.gz", &gz[..gz.len() / 2]), ("cut.jsonl.zst", &zst[..zst.len() / 2])] {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            let err = first_error(&p, Format::Jsonl);
            assert!(err.starts_with(&format!("invalid model config: {}:", p.display())) && err.contains(": reading: "), "{err}");
        }
        for name in ["junk.jsonl.gz", "junk.jsonl.zst"] {
            let p = dir.path().join(name);
            std::fs::write(&p, b"\x1f\x8b garbage \x28\xb5\x2f\xfd garbage").unwrap();
            let err = first_error(&p, Format::Jsonl);
            assert!(err.starts_with(&format!("invalid model config: {}:1: reading: ", p.display())), "{err}");
        }
    }

    /// A byte range a parquet file's metadata names beyond the file is refused before its
    /// buffer is allocated; truncated files and garbage are named.
    #[test]
    fn parquet_ranges_beyond_the_file_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.parquet");
        std::fs::write(&p, [0u8; 10]).unwrap();
        let chunks = Chunks::Local(Arc::new(std::fs::File::open(&p).unwrap()));
        let err = chunks.get_bytes(5, 1 << 40).unwrap_err().to_string();
        assert!(err.contains("bytes 5..5+1099511627776 lie beyond the end of the file (10 bytes)"), "{err}");
        assert!(chunks.get_bytes(u64::MAX, 2).is_err());
        assert_eq!(chunks.get_bytes(2, 8).unwrap().len(), 8);
        // A page header read that reaches the end of the file is an error, not an end the
        // parquet crate's skip would ignore (found by fuzzing: a read that did not end).
        let mut header = [0u8; 8];
        let mut at_end = chunks.get_read(10).unwrap();
        assert_eq!(at_end.read(&mut header).unwrap_err().to_string(), "a page header runs past the end of the file");
        let mut near_end = chunks.get_read(6).unwrap();
        assert_eq!(near_end.read(&mut header).unwrap(), 4);
        assert_eq!(near_end.read(&mut header).unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        write_parquet(&p, &texts(300), "text", 100).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        for cut in [bytes.len() - 1, bytes.len() / 2, 7] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let err = first_error(&p, Format::Parquet);
            assert!(err.starts_with(&format!("{}: ", p.display())), "{err}");
        }
        // Column chunk offsets and sizes from the footer: negative ones (on which the parquet
        // crate's own byte_range panics; found by fuzzing) and ones past the end are named.
        let schema = parquet::schema::parser::parse_message_type("message m { OPTIONAL BYTE_ARRAY text (UTF8); }").unwrap();
        let column = parquet::schema::types::SchemaDescriptor::new(Arc::new(schema)).column(0);
        let chunk = |start: i64, dict: Option<i64>, size: i64| {
            let meta = parquet::file::metadata::ColumnChunkMetaData::builder(column.clone())
                .set_data_page_offset(start)
                .set_dictionary_page_offset(dict)
                .set_total_compressed_size(size)
                .build()
                .unwrap();
            column_chunk(&meta, &Chunks::Local(Arc::new(std::fs::File::open(&p).unwrap())))
        };
        std::fs::write(&p, &bytes).unwrap();
        let len = bytes.len() as u64;
        assert_eq!(chunk(-5, None, 10).unwrap_err(), "offset -5 or size 10 is negative");
        assert_eq!(chunk(4, Some(-1), 10).unwrap_err(), "offset -1 or size 10 is negative");
        assert_eq!(chunk(4, None, -10).unwrap_err(), "offset 4 or size -10 is negative");
        assert_eq!(chunk(4, None, i64::MAX).unwrap_err(), format!("bytes 4..4+{} lie beyond the end of the file ({len} bytes)", i64::MAX));
        assert_eq!(chunk(4, Some(2), 10).unwrap(), 2..12);
        // The footer's metadata length, mutated to claim more than the file.
        let mut bad = bytes.clone();
        let at = bad.len() - 8;
        bad[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        assert!(first_error(&p, Format::Parquet).starts_with(&format!("{}: not a parquet file", p.display())));
    }
}
