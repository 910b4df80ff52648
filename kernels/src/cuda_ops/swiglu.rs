//! The packed SwiGLU on CUDA, forward and backward (`swiglu.rs`'s op).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{Layout, Result};

use super::launch::{address, launch, output, u32_of, Arg, THREADS};

/// `silu(a) ⊙ b` of rows `[a | b]`: [N, 2F] → [N, F].
pub(crate) fn swiglu_packed(x: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
    let (n, two_f) = xl.shape().dims2()?;
    let f = two_f / 2;
    let dev = &x.device;
    let (out, out_at) = output(dev, x.dtype(), n * f)?;
    let args = [Arg::Ptr(address(x, xl, "swiglu")?), Arg::Size(n * f), u32_of(f, "swiglu")?, Arg::Ptr(out_at)];
    launch(dev, "btm_swiglu_packed_fwd", x.dtype(), (n * f).div_ceil(THREADS as usize), &args)?;
    Ok(out)
}

/// `[dA | dB]` rows of the packed SwiGLU for input x [N, 2F] and output gradient g [N, F].
pub(crate) fn swiglu_packed_grad(x: &CudaStorage, xl: &Layout, g: &CudaStorage, gl: &Layout) -> Result<CudaStorage> {
    let (n, two_f) = xl.shape().dims2()?;
    let f = two_f / 2;
    let dev = &x.device;
    let (out, out_at) = output(dev, x.dtype(), n * two_f)?;
    let args = [
        Arg::Ptr(address(x, xl, "swiglu grad")?),
        Arg::Ptr(address(g, gl, "swiglu grad")?),
        Arg::Size(n * f),
        u32_of(f, "swiglu grad")?,
        Arg::Ptr(out_at),
    ];
    launch(dev, "btm_swiglu_packed_bwd", x.dtype(), (n * f).div_ceil(THREADS as usize), &args)?;
    Ok(out)
}
