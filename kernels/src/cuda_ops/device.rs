//! What the process can learn of CUDA before and after opening a device: the libraries it
//! lacks, and the GPU's name.

use candle_core::cuda_backend::CudaDevice;

/// The CUDA libraries a CUDA device needs that cannot be loaded here (cudarc panics on a
/// missing one, so they are probed first): the driver, cuBLAS and cuBLASLt, cuRAND (candle's
/// device makes a handle of each) and NVRTC (btm's kernels).
pub fn missing_libraries() -> Vec<&'static str> {
    // SAFETY: each probe only tries to dlopen the library by its candidate names.
    let present = unsafe {
        [
            ("libcuda (the NVIDIA driver)", cudarc::driver::sys::is_culib_present()),
            ("libcublas", cudarc::cublas::sys::is_culib_present()),
            ("libcublasLt", cudarc::cublaslt::sys::is_culib_present()),
            ("libcurand", cudarc::curand::sys::is_culib_present()),
            ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
        ]
    };
    present.into_iter().filter(|(_, ok)| !ok).map(|(name, _)| name).collect()
}

/// The GPU's name as the driver reports it.
pub fn device_name(dev: &CudaDevice) -> String {
    dev.cuda_stream().context().name().unwrap_or_else(|e| format!("unknown ({e:?})"))
}
