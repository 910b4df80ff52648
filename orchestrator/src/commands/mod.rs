//! One module per subcommand.

pub mod add_expert;
pub mod average;
pub mod bench;
pub mod cluster;
pub mod convert;
pub mod device_check;
pub mod eval;
pub mod export;
pub mod inspect;
pub mod merge;
pub mod mergekit;
pub mod pipeline;
pub mod remove_expert;
pub mod run;
pub mod tokenizer;
pub mod train;
pub mod upcycle;

use anyhow::Result;

// `--device` and `--dtype` take the job files' vocabulary.
pub use btm_trainer::device::{DType, Device};

/// A job's spec: read from `--spec FILE` (the job file a pipeline's plan writes, JSON or
/// YAML), else the command's flags, which clap has already parsed into the same struct.
pub fn spec_or_flags<T: serde::de::DeserializeOwned>(file: Option<&std::path::Path>, flags: Option<T>) -> Result<T> {
    match (file, flags) {
        (Some(path), _) => read_spec(path),
        (None, Some(flags)) => Ok(flags),
        (None, None) => anyhow::bail!("give the job's flags or --spec FILE"),
    }
}

/// Parse the job spec file at `path`; errors name the file, the line and column.
pub fn read_spec<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    use anyhow::Context as _;
    // A run in an object store keeps its specs there: fetched like `btm train --job`'s file.
    let local = btm_model::folder::fetch_file(&path.to_string_lossy())?;
    let text = crate::yaml::read_to_string(&local).with_context(|| format!("reading job spec {}", path.display()))?;
    crate::yaml::from_str(&text).map_err(|e| anyhow::anyhow!("job spec {}: {e}", path.display()))
}

/// A local folder for an input location (an object-store URL is fetched into the cache).
pub fn local_dir(location: &str) -> Result<std::path::PathBuf> {
    Ok(btm_model::storage::local_dir(location)?)
}

/// A local file for an input location (an object-store URL is fetched into the cache).
pub fn fetch_file(location: &str) -> Result<std::path::PathBuf> {
    Ok(btm_model::folder::fetch_file(location)?)
}
