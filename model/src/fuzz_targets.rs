//! Entry points for fuzzing the readers of files other tools write: each takes arbitrary bytes
//! and returns a [`Result`]. Whatever the bytes, each must end in `Ok` or a named error, never
//! a panic, a hang, an abort or an allocation the input's size does not bound; a harness
//! (cargo-fuzz, AFL, bolero) calls one per input and treats anything else as a finding.
//!
//! The readers that take a path are driven through a temporary directory, as they run in btm.
//! Nothing here is used by btm itself.

use crate::checkpoint::{parse_safetensors, Checkpoint, CONFIG, SINGLE_FILE};
use crate::config::ModelConfig;
use crate::error::{parse_json, Error, Result, MAX_JSON_BYTES};
use crate::lineage::Lineage;
use crate::manifest::Manifest;
use candle_core::safetensors::Load;
use std::io::Read;
use std::path::Path;

/// The name errors give the fuzzer's input.
const INPUT: &str = "fuzz-input";

/// Line bound of the JSONL target, smaller than the default so that a run stays fast.
const FUZZ_LINE_BYTES: usize = 1 << 20;

/// Decoded bytes the JSONL target reads at most: a decompression bomb is a stream btm reads a
/// line at a time, bounded in memory but not in time, so the target stops where a fuzzer's
/// patience would.
const FUZZ_DECODED_BYTES: u64 = 64 << 20;

fn tempdir() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// A safetensors file: parsed and checked ([`parse_safetensors`]), then every tensor of a dtype
/// btm reads loaded onto the CPU.
pub fn safetensors(data: &[u8]) -> Result<()> {
    let st = parse_safetensors(Path::new(INPUT), data)?;
    for (_, view) in st.tensors() {
        if matches!(view.dtype(), safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16 | safetensors::Dtype::F64) {
            view.load(&candle_core::Device::Cpu)?;
        }
    }
    Ok(())
}

/// A Hugging Face `config.json`: parsed, checked, and the model's tensor list built from it.
pub fn config_json(data: &[u8]) -> Result<()> {
    if data.len() as u64 > MAX_JSON_BYTES {
        return Err(Error::TooLarge { path: INPUT.into(), what: "JSON file".into(), limit: MAX_JSON_BYTES });
    }
    let (config, _) = ModelConfig::from_hf(&parse_json(Path::new(INPUT), data)?)?;
    crate::weights::expected_tensors(&config);
    config.to_hf()?;
    Ok(())
}

/// A `tokenizer.json`, loaded through [`crate::tokenizer::load`] and used on a short text.
pub fn tokenizer_json(data: &[u8]) -> Result<()> {
    let dir = tempdir()?;
    let path = dir.path().join("tokenizer.json");
    write(&path, data)?;
    let tok = crate::tokenizer::load(&path)?;
    crate::tokenizer::encode(&tok, "The quick brown fox, 1234 ünïcode.")?;
    Ok(())
}

/// A `MANIFEST.json` and a `btm.json`, read by [`Manifest::read`] and [`Lineage::read`].
pub fn manifest_and_lineage(data: &[u8]) -> Result<()> {
    let dir = tempdir()?;
    write(&dir.path().join(crate::manifest::MANIFEST), data)?;
    write(&dir.path().join(crate::lineage::LINEAGE), data)?;
    let manifest = Manifest::read(dir.path());
    let lineage = Lineage::read(dir.path());
    manifest?;
    lineage?;
    Ok(())
}

/// A JSONL source named `name` (its extension picks the decompression: `.gz`, `.zst` or none):
/// every line's `text` read, with lines of at most 1 MiB and at most 64 MiB decoded.
pub fn jsonl(data: &[u8], name: &str) -> Result<()> {
    let decoded = crate::jsonl::decoded(name, Box::new(std::io::Cursor::new(data.to_vec())))?;
    let bounded: Box<dyn Read + Send> = Box::new(decoded.take(FUZZ_DECODED_BYTES));
    for text in crate::jsonl::Texts::from_reader(name, bounded, "text").with_max_line_bytes(FUZZ_LINE_BYTES) {
        text?;
    }
    Ok(())
}

/// [`jsonl`] on an input whose first byte picks the decompression, as a source's extension
/// would: the form the fuzz target and its corpus use.
pub fn jsonl_input(data: &[u8]) -> Result<()> {
    match data.split_first() {
        Some((&kind, rest)) => jsonl(rest, jsonl_name(kind)),
        None => Ok(()),
    }
}

/// The JSONL source name an input's first byte picks (see [`jsonl_input`]).
pub fn jsonl_name(kind: u8) -> &'static str {
    ["d.jsonl", "d.jsonl.gz", "d.jsonl.zst"][kind as usize % 3]
}

/// A checkpoint directory, opened by [`Checkpoint::open`] and every tensor read. `data` is a
/// little-endian u32 `n`, then `config.json` (`n` bytes), then `model.safetensors` (the rest);
/// seed it with a fixture's two files so mutations reach the tensor checks.
pub fn checkpoint(data: &[u8]) -> Result<()> {
    let (config, weights) = split_input(data);
    let dir = tempdir()?;
    write(&dir.path().join(CONFIG), config)?;
    write(&dir.path().join(SINGLE_FILE), weights)?;
    let ckpt = Checkpoint::open(dir.path())?;
    for spec in ckpt.tensor_specs() {
        ckpt.tensor(&spec.name)?;
    }
    Ok(())
}

/// Split an input for [`checkpoint`]: the length-prefixed first part and the rest (a prefix
/// beyond the input takes all of it).
pub fn split_input(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((prefix, rest)) = data.split_first_chunk::<4>() else {
        return (data, &[]);
    };
    rest.split_at((u32::from_le_bytes(*prefix) as usize).min(rest.len()))
}

/// The input [`checkpoint`] reads as `config` and `weights`: the seed a corpus starts from.
pub fn join_input(config: &[u8], weights: &[u8]) -> Vec<u8> {
    let mut out = (config.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(config);
    out.extend_from_slice(weights);
    out
}
