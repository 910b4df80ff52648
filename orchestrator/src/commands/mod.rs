//! One module per subcommand.

pub mod add_expert;
pub mod average;
pub mod bench;
pub mod convert;
pub mod eval;
pub mod inspect;
pub mod merge;
pub mod pipeline;
pub mod remove_expert;
pub mod run;
pub mod tokenizer;
pub mod train;
pub mod upcycle;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// The compute device: the CPU, or CUDA when built with the `cuda` feature.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        other => bail!("unknown device `{other}` (expected cpu or cuda)"),
    }
}

pub fn dtype(name: &str) -> Result<DType> {
    Ok(btm_model::checkpoint::parse_dtype(name)?)
}

/// `NAME=FILE` calibration data, the file fetched into the local cache when it is an
/// object-store URL.
pub fn fetch_named(arg: &str) -> Result<(String, std::path::PathBuf)> {
    let (name, path) = btm_merger::calib::parse_named(arg)?;
    Ok((name, btm_model::folder::fetch_file(&path.to_string_lossy())?))
}
