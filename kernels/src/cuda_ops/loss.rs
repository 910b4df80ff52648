//! The next-token cross-entropy on CUDA (the trainer's loss), forward and backward.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{DType, Layout, Result};

use super::launch::{address, launch, output, u32_of, Arg};

/// Per-row nll (float32) of logits [rows, v] (float32 or bfloat16) and u32 targets [rows].
pub fn nll(logits: &CudaStorage, ll: &Layout, targets: &CudaStorage, tl: &Layout) -> Result<CudaStorage> {
    let (rows, v) = ll.shape().dims2()?;
    let dev = &logits.device;
    let (out, out_at) = output(dev, DType::F32, rows)?;
    let args = [
        Arg::Ptr(address(logits, ll, "cross-entropy")?),
        Arg::Ptr(address(targets, tl, "cross-entropy targets")?),
        u32_of(rows, "cross-entropy")?,
        u32_of(v, "cross-entropy")?,
        Arg::Ptr(out_at),
    ];
    launch(dev, "btm_nll", logits.dtype(), rows, &args)?;
    Ok(out)
}

/// d logits (logits' dtype) from logits, targets and `[g; nll]` (float32, 2·rows).
pub fn nll_grad(
    logits: &CudaStorage,
    ll: &Layout,
    targets: &CudaStorage,
    tl: &Layout,
    grad_nll: &CudaStorage,
    gl: &Layout,
) -> Result<CudaStorage> {
    let (rows, v) = ll.shape().dims2()?;
    let dev = &logits.device;
    let (out, out_at) = output(dev, logits.dtype(), rows * v)?;
    let args = [
        Arg::Ptr(address(logits, ll, "cross-entropy grad")?),
        Arg::Ptr(address(targets, tl, "cross-entropy targets")?),
        Arg::Ptr(address(grad_nll, gl, "cross-entropy grad")?),
        u32_of(rows, "cross-entropy grad")?,
        u32_of(v, "cross-entropy grad")?,
        Arg::Ptr(out_at),
    ];
    launch(dev, "btm_nll_bwd", logits.dtype(), rows, &args)?;
    Ok(out)
}
