//! The device a job computes on ([`Device`]: `cpu`, or `cuda` in builds with the `cuda`
//! feature), the dtypes it computes and stores in ([`DType`]), the GPU a rank binds, the
//! device's name for reports, and the GPU memory pool's peak.
//!
//! [`Device`] and [`DType`] are the one vocabulary of job files, pipelines and command-line
//! flags alike.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Where a job computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The CPU.
    #[default]
    Cpu,
    /// A GPU (the local rank's among the visible ones), in a build with the `cuda` feature.
    Cuda,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }

    /// The candle device; on CUDA the GPU of this process's local rank
    /// ([`btm_collective::local_gpu`]).
    pub fn open(self) -> Result<candle_core::Device> {
        open(self)
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub use btm_model::DType;

/// The candle device for `device`. A CUDA device keeps freed memory in its pool (as
/// PyTorch's caching allocator does) rather than returning it at every synchronisation.
pub fn open(device: Device) -> Result<candle_core::Device> {
    match device {
        Device::Cpu => Ok(candle_core::Device::Cpu),
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            {
                let missing = btm_kernels::cuda_ops::missing_libraries();
                if !missing.is_empty() {
                    bail!(
                        "device: cuda: cannot load {} (a GPU machine with the NVIDIA driver; CUDA 13's libraries on LD_LIBRARY_PATH, e.g. the nvidia-* wheels PyTorch installs)",
                        missing.join(", ")
                    );
                }
            }
            #[cfg(not(feature = "cuda"))]
            bail!("device: cuda: this btm was built without CUDA (build it with `--features cuda`)");
            #[cfg(feature = "cuda")]
            {
                use anyhow::Context as _;
                let ordinal = btm_collective::local_gpu();
                let device = candle_core::Device::new_cuda(ordinal).with_context(|| format!("device: cuda (GPU {ordinal})"))?;
                if let candle_core::Device::Cuda(d) = &device {
                    btm_kernels::cuda_ops::keep_freed_memory(d)?;
                }
                Ok(device)
            }
        }
    }
}

/// `cpu`, or `cuda (<GPU name>)`.
pub fn describe(device: &candle_core::Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => format!("cuda ({})", btm_kernels::cuda_ops::device_name(d)),
        candle_core::Device::Cpu => "cpu".into(),
        other => format!("{:?}", other.location()),
    }
}

/// A GPU's memory pool high-water mark.
pub struct Memory {
    #[cfg(feature = "cuda")]
    device: candle_core::CudaDevice,
}

impl Memory {
    /// The pool of `device`, or `None` on the CPU.
    pub fn of(device: &candle_core::Device) -> Result<Option<Self>> {
        match device {
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(d) => Ok(Some(Self { device: d.clone() })),
            _ => Ok(None),
        }
    }

    /// Count the peak from the memory in use now.
    pub fn reset_peak(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        btm_kernels::cuda_ops::reset_peak_memory(&self.device)?;
        Ok(())
    }

    /// The most memory in use at once since [`Self::reset_peak`], in bytes.
    pub fn peak_bytes(&self) -> Result<u64> {
        #[cfg(feature = "cuda")]
        return Ok(btm_kernels::cuda_ops::peak_memory(&self.device)?);
        #[cfg(not(feature = "cuda"))]
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_are_one_vocabulary() {
        let d: DType = serde_yaml::from_str("bf16").unwrap();
        assert_eq!(d, DType::Bfloat16);
        assert_eq!(serde_yaml::to_string(&DType::Float32).unwrap().trim(), "float32");
        assert_eq!(serde_yaml::to_string(&Device::Cuda).unwrap().trim(), "cuda");
        assert!(serde_yaml::from_str::<Device>("tpu").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        let e = Device::Cuda.open().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
