//! One module per subcommand.

pub mod add_expert;
pub mod average;
pub mod bench;
pub mod cluster;
pub mod convert;
pub mod device_check;
pub mod eval;
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

pub fn dtype(name: &str) -> Result<candle_core::DType> {
    Ok(btm_model::checkpoint::parse_dtype(name)?)
}

/// `NAME=FILE` calibration data, the file fetched into the local cache when it is an
/// object-store URL.
pub fn fetch_named(arg: &str) -> Result<(String, std::path::PathBuf)> {
    let (name, path) = btm_merger::calib::parse_named(arg)?;
    Ok((name, btm_model::folder::fetch_file(&path.to_string_lossy())?))
}

/// The router flags `btm merge` and `btm add-expert` share; their defaults are the merger's
/// ([`btm_merger::RouterOptions::default`]).
#[derive(clap::Args)]
pub struct RouterArgs {
    /// How the router is initialised (default: centroid with calibration text, else random).
    #[arg(long)]
    router_init: Option<btm_merger::RouterInit>,
    /// Std of a random router.
    #[arg(long, default_value_t = btm_merger::router_init::DEFAULT_ROUTER_STD)]
    router_std: f64,
    /// Seed of a random router.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Centroid: mean probability a calibration token gives its own domain's expert.
    #[arg(long, default_value_t = btm_merger::router_init::DEFAULT_TARGET_PROB)]
    target_prob: f64,
    /// Fit: gradient steps of softmax regression per layer.
    #[arg(long, default_value_t = btm_merger::router_init::FitOptions::default().steps)]
    fit_steps: usize,
    /// Calibration window length in tokens.
    #[arg(long, default_value_t = btm_merger::calib::CalibOptions::default().seq_len)]
    calib_seq_len: usize,
    /// Calibration tokens per domain (the last 20 % are held out for routing accuracy).
    #[arg(long, default_value_t = btm_merger::calib::CalibOptions::default().max_tokens)]
    calib_tokens: usize,
}

impl RouterArgs {
    /// The merger's router options; `calibrated`: whether calibration text was given.
    pub fn options(&self, calibrated: bool) -> btm_merger::RouterOptions {
        let defaults = btm_merger::RouterOptions::default();
        btm_merger::RouterOptions {
            init: self.router_init.unwrap_or(btm_merger::RouterInit::default_for(calibrated)),
            std: self.router_std,
            seed: self.seed,
            target_prob: self.target_prob,
            fit: btm_merger::router_init::FitOptions { steps: self.fit_steps, ..defaults.fit },
            calib: btm_merger::calib::CalibOptions { seq_len: self.calib_seq_len, max_tokens: self.calib_tokens, ..defaults.calib },
        }
    }
}

/// How a command writes its checkpoint: `--dtype`, `--shard-mb`, `--overwrite`.
#[derive(clap::Args)]
pub struct OutputArgs {
    /// Dtype on disk (default: the input's).
    #[arg(long, value_enum)]
    dtype: Option<DType>,
    /// Largest shard in MiB.
    #[arg(long, default_value_t = btm_merger::OutputOptions::default().max_shard_bytes >> 20)]
    shard_mb: u64,
    /// Replace --out if it exists.
    #[arg(long)]
    overwrite: bool,
}

impl OutputArgs {
    pub fn options(&self) -> Result<btm_merger::OutputOptions> {
        Ok(btm_merger::OutputOptions {
            dtype: self.dtype.map(DType::candle),
            max_shard_bytes: self.shard_mb << 20,
            overwrite: self.overwrite,
        })
    }
}
