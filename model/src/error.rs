//! Errors that name what is wrong: the file, the tensor, the shape, the key.

use std::io::Read;
use std::path::{Path, PathBuf};

/// This crate's result type, with [`Error`] by default.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading, running or writing a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `config.json` names a class (or `model_type`) btm does not read; holds that name.
    #[error("unknown architecture `{0}` (btm reads LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, Olmo2ForCausalLM, OlmoeForCausalLM, FlexOlmoForCausalLM)")]
    UnknownArchitecture(String),
    /// A config value is missing, malformed or inconsistent (e.g. heads not a multiple of KV heads).
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// A valid request btm does not implement (a RoPE type, FFN biases, a dtype, a layout).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A file or directory that should exist does not.
    #[error("{}: file not found", .0.display())]
    MissingFile(PathBuf),
    /// A safetensors file that does not parse, or a tensor whose bytes do not fit its header.
    #[error("{}: truncated or corrupt safetensors file: {reason}", path.display())]
    CorruptSafetensors {
        /// The file (or checkpoint directory) being read.
        path: PathBuf,
        /// What the safetensors parser reported.
        reason: String,
    },
    /// A tensor the config implies is not in any of the checkpoint's files.
    #[error("tensor `{name}` is missing from the checkpoint at {}", dir.display())]
    MissingTensor {
        /// Its name (canonical, or as the checkpoint's architecture names it).
        name: String,
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// A tensor's shape disagrees with the one the model config implies (reading or writing).
    #[error("tensor `{name}` has shape {found:?} but config.json implies {expected:?}")]
    ShapeMismatch {
        /// The tensor's name.
        name: String,
        /// Shape implied by the config.
        expected: Vec<usize>,
        /// Its actual shape.
        found: Vec<usize>,
    },
    /// A tensor stored in a dtype other than float32, bfloat16, float16 or float64.
    #[error("tensor `{name}` has dtype {dtype}, which btm does not read (float32, bfloat16, float16, float64)")]
    UnsupportedDtype {
        /// The tensor's name.
        name: String,
        /// The dtype as safetensors names it (e.g. `I64`).
        dtype: String,
    },
    /// The tokenizer has ids beyond the embedding's rows.
    #[error("the tokenizer has {tokenizer} tokens but the model's embedding has only {embedding} rows (vocab_size)")]
    TokenizerVocab {
        /// Embedding rows the tokenizer needs: its largest id + 1.
        tokenizer: usize,
        /// The model's `vocab_size`.
        embedding: usize,
    },
    /// Loading, training, saving or running a tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An I/O error other than not-found (which is [`Error::MissingFile`]); see [`Error::io`].
    #[error("{}: {source}", path.display())]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file that does not parse, or does not match the expected structure.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A `MANIFEST.json` that is unreadable or of an unknown format, or a file that does not
    /// match its entry (size or SHA-256).
    #[error("manifest: {0}")]
    Manifest(String),
    /// An object-store URL, request or transfer failed, or a location lies outside its folder.
    #[error("storage: {0}")]
    Storage(String),
    /// A file, header or line larger than the bound btm sets on what it reads, so that a
    /// corrupt or hostile file ends in this error instead of an unbounded allocation.
    #[error("{}: {what} exceeds the limit of {}", path.display(), describe_limit(*limit))]
    TooLarge {
        /// The file (or source) being read.
        path: PathBuf,
        /// What is too large, with its size where known (`file of 70000000 bytes`, `line 3`).
        what: String,
        /// The bound, in bytes.
        limit: u64,
    },
    /// An error from a candle tensor operation (shapes, dtypes, devices).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// An I/O error on `path`: [`Error::MissingFile`] for not-found, else [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile(path)
        } else {
            Error::Io { path, source }
        }
    }
}

/// Largest JSON metadata file btm reads whole (`config.json`, `btm.json`, `MANIFEST.json`, the
/// shard index, the tokenizer's side files): real ones are kilobytes, so 64 MiB only stops a
/// corrupt or hostile file from being read into memory.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// Largest `tokenizer.json` btm reads: big vocabularies with their merges reach tens of MiB.
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// `limit` bytes as errors show it: `64 MiB (67108864 bytes)`.
pub fn describe_limit(limit: u64) -> String {
    if limit >= 1 << 20 && limit.is_multiple_of(1 << 20) {
        format!("{} MiB ({limit} bytes)", limit >> 20)
    } else {
        format!("{limit} bytes")
    }
}

/// The bytes of `path`, or [`Error::TooLarge`] if it holds more than `limit` bytes; `what`
/// names the kind of file for the error (`JSON file`, `tokenizer.json`). The size is checked
/// before reading, and the read itself stops after `limit + 1` bytes, so a file that grows
/// meanwhile (or a special file whose size the metadata does not tell) is bounded too.
pub fn read_capped(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let too_large = |size: String| Error::TooLarge { path: path.to_path_buf(), what: format!("{what} of {size}"), limit };
    if size > limit {
        return Err(too_large(format!("{size} bytes")));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(format!("more than {limit} bytes")));
    }
    Ok(bytes)
}

/// Read a JSON file (at most [`MAX_JSON_BYTES`]) with errors that name it.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    parse_json(path, &read_capped(path, MAX_JSON_BYTES, "JSON file")?)
}

/// Parse `bytes` as JSON; errors name `path`.
pub fn parse_json(path: &Path, bytes: &[u8]) -> Result<serde_json::Value> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stop_at_the_limit_whatever_the_size_says() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        std::fs::write(&p, b"[1, 2]").unwrap();
        assert_eq!(read_capped(&p, 6, "JSON file").unwrap(), b"[1, 2]");
        assert_eq!(
            read_capped(&p, 5, "JSON file").unwrap_err().to_string(),
            format!("{}: JSON file of 6 bytes exceeds the limit of 5 bytes", p.display())
        );
        assert!(matches!(read_capped(&dir.path().join("none"), 5, "x"), Err(Error::MissingFile(_))));
        // A file whose metadata says 0 bytes but which holds more is stopped by the read.
        let proc = Path::new("/proc/self/status");
        if proc.exists() {
            let err = read_capped(proc, 8, "status file").unwrap_err().to_string();
            assert!(err.ends_with("status file of more than 8 bytes exceeds the limit of 8 bytes"), "{err}");
        }
    }
}
