//! Errors that name what is wrong: the file, the tensor, the shape, the key.

use std::path::PathBuf;

/// This crate's result type, with [`Error`] by default.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading, running or writing a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `config.json` names a class (or `model_type`) btm does not read; holds that name.
    #[error("unknown architecture `{0}` (btm reads LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM)")]
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

/// Read a JSON file with errors that name it.
pub fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}
