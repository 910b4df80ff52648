//! The device a job computes on: `cpu`, or `cuda` (GPU 0, in builds with the `cuda` feature),
//! its name for reports, and the GPU memory pool's peak.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// The device named `cpu` or `cuda`. A CUDA device keeps freed memory in its pool (as
/// PyTorch's caching allocator does) rather than returning it at every synchronisation.
pub fn open(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
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
            let device = Device::new_cuda(0).context("device: cuda (build btm with `--features cuda`)")?;
            #[cfg(feature = "cuda")]
            if let Device::Cuda(d) = &device {
                btm_kernels::cuda_ops::keep_freed_memory(d)?;
            }
            Ok(device)
        }
        other => bail!("device: unknown device `{other}` (expected cpu or cuda)"),
    }
}

/// `cpu`, or `cuda (<GPU name>)`.
pub fn describe(device: &Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => format!("cuda ({})", btm_kernels::cuda_ops::device_name(d)),
        Device::Cpu => "cpu".into(),
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
    pub fn of(device: &Device) -> Result<Option<Self>> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Ok(Some(Self { device: d.clone() })),
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
