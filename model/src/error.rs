//! Errors that name what is wrong: the file, the tensor, the shape, the key.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown architecture `{0}` (btm reads LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM)")]
    UnknownArchitecture(String),
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("{}: file not found", .0.display())]
    MissingFile(PathBuf),
    #[error("{}: truncated or corrupt safetensors file: {reason}", path.display())]
    CorruptSafetensors { path: PathBuf, reason: String },
    #[error("tensor `{name}` is missing from the checkpoint at {}", dir.display())]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor `{name}` has shape {found:?} but config.json implies {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor `{name}` has dtype {dtype}, which btm does not read (float32, bfloat16, float16, float64)")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("the tokenizer has {tokenizer} tokens but the model's embedding has only {embedding} rows (vocab_size)")]
    TokenizerVocab { tokenizer: usize, embedding: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
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
