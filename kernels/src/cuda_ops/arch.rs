//! The PTX of `cuda/ops.cu`, compiled by NVRTC once per process for the architecture of the
//! first device that asks.

use std::sync::OnceLock;

use candle_core::cuda_backend::CudaDevice;
use candle_core::Result;

/// The PTX of `cuda/ops.cu`, compiled once per process for the first device's architecture.
pub(super) fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let compiled = PTX.get_or_init(|| {
        let arch = architecture(dev);
        crate::cuda::compile(&crate::cuda::OPS, arch).map(|p| p.to_src())
    });
    match compiled {
        Ok(src) => Ok(src.as_str()),
        Err(e) => candle_core::bail!("compiling the CUDA MoE kernels: {e}"),
    }
}

/// NVRTC's `compute_XY` for the device, among the architectures CUDA 13's NVRTC knows.
fn architecture(dev: &CudaDevice) -> &'static str {
    const KNOWN: [(i32, i32, &str); 10] = [
        (12, 1, "compute_121"),
        (12, 0, "compute_120"),
        (11, 0, "compute_110"),
        (10, 3, "compute_103"),
        (10, 0, "compute_100"),
        (9, 0, "compute_90"),
        (8, 9, "compute_89"),
        (8, 7, "compute_87"),
        (8, 6, "compute_86"),
        (8, 0, "compute_80"),
    ];
    let cc = dev.cuda_stream().context().compute_capability().unwrap_or((7, 5));
    KNOWN.iter().find(|&&(ma, mi, _)| (ma, mi) <= cc).map_or("compute_75", |&(_, _, a)| a)
}
