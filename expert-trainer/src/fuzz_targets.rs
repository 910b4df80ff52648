//! Entry points for fuzzing the trainer's readers of files other tools write (training sources,
//! Megatron indexed datasets, the token cache): each takes arbitrary bytes and returns a
//! [`Result`]. Whatever the bytes, each must end in `Ok` or a named error, never a panic, a
//! hang, an abort or an allocation the input's size does not bound; a harness (cargo-fuzz, AFL,
//! bolero) calls one per input and treats anything else as a finding. The model's own readers
//! have theirs in [`btm_model::fuzz_targets`].
//!
//! The readers take paths, so each target writes its input into a temporary directory first.
//! Nothing here is used by btm itself.

use crate::data::Tokens;
use crate::sources::{Documents, Format, DEFAULT_TEXT_KEY};
use anyhow::{Context, Result};
use btm_model::fuzz_targets::split_input;
use std::path::{Path, PathBuf};

/// Text the source targets read at most: a decompression bomb (or a parquet file of many
/// small pages) is read a document at a time, bounded in memory but not in time, so a target
/// stops where a fuzzer's patience would.
const FUZZ_TEXT_BYTES: usize = 64 << 20;

/// Vocabulary the indexed-dataset target checks ids against (any u16 id and some i32 ones).
const FUZZ_VOCAB: usize = 1 << 20;

/// `data` written as `name` in a fresh temporary directory (kept alive by the returned guard).
fn written(name: &str, data: &[u8]) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let path = dir.path().join(name);
    std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    Ok((dir, path))
}

/// Read a source's documents until its end, an error, or [`FUZZ_TEXT_BYTES`] of text.
fn drain(path: &Path, format: Format) -> Result<()> {
    let mut text = 0;
    for doc in Documents::open(&path.to_string_lossy(), format, DEFAULT_TEXT_KEY)? {
        text += doc?.len();
        if text > FUZZ_TEXT_BYTES {
            break;
        }
    }
    Ok(())
}

/// A JSONL training source named `name` (`d.jsonl`, `d.jsonl.gz` or `d.jsonl.zst`: the
/// extension picks the decompression), read through [`Documents`].
pub fn jsonl_source(data: &[u8], name: &str) -> Result<()> {
    let (_dir, path) = written(name, data)?;
    drain(&path, Format::Jsonl)
}

/// [`jsonl_source`] on an input whose first byte picks the decompression
/// ([`btm_model::fuzz_targets::jsonl_name`]): the form the fuzz target and its corpus use.
pub fn jsonl_source_input(data: &[u8]) -> Result<()> {
    match data.split_first() {
        Some((&kind, rest)) => jsonl_source(rest, btm_model::fuzz_targets::jsonl_name(kind)),
        None => Ok(()),
    }
}

/// A parquet training source with a `text` column, read through [`Documents`].
pub fn parquet_source(data: &[u8]) -> Result<()> {
    let (_dir, path) = written("d.parquet", data)?;
    drain(&path, Format::Parquet)
}

/// The bytes of a Megatron `.idx` file, checked by [`crate::indexed::parse_index`] alone.
pub fn megatron_index(data: &[u8]) -> Result<()> {
    crate::indexed::parse_index(Path::new("fuzz-input.idx"), data).map(drop)
}

/// A Megatron indexed dataset, opened by [`crate::indexed::open`] and every id read: `data` is a
/// little-endian u32 `n`, the `.idx` (`n` bytes), then the `.bin` (the rest), as
/// [`btm_model::fuzz_targets::join_input`] joins them.
pub fn megatron_dataset(data: &[u8]) -> Result<()> {
    let (idx, bin) = split_input(data);
    let (dir, idx_path) = written("d.idx", idx)?;
    let bin_path = dir.path().join("d.bin");
    std::fs::write(&bin_path, bin).with_context(|| format!("writing {}", bin_path.display()))?;
    let tokens = crate::indexed::open(&idx_path, FUZZ_VOCAB)?;
    let sum: u64 = (0..tokens.len).map(|i| tokens.get(i) as u64).sum();
    std::hint::black_box(sum);
    Ok(())
}

/// A token cache file (`BTMTOK01`), opened as the trainer reopens its cache, and every id read
/// when it is accepted (a file that does not match its header is rebuilt, not an error).
pub fn token_cache(data: &[u8]) -> Result<()> {
    let (_dir, path) = written("d.tokens", data)?;
    if let Some(tokens) = Tokens::open(&path)? {
        let sum: u64 = (0..tokens.len()).map(|i| tokens.get(i) as u64).sum();
        std::hint::black_box(sum);
    }
    Ok(())
}
