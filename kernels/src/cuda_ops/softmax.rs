//! The causal softmax of attention scores on CUDA, forward and backward (`softmax.rs`'s op).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{Layout, Result};

use super::launch::{address, f32_arg, launch, output, u32_of, Arg, WARPS};

/// Causal softmax of scores [rows, t] (row r is query `r % t`), scaled, keys within `window`.
pub(crate) fn causal_softmax(s: &CudaStorage, l: &Layout, t: usize, scale: f64, window: Option<usize>) -> Result<CudaStorage> {
    let n = l.shape().elem_count();
    let rows = n / t.max(1);
    let dev = &s.device;
    let (out, out_at) = output(dev, s.dtype(), n)?;
    let window = window.map_or(u32::MAX, |w| u32::try_from(w).unwrap_or(u32::MAX));
    let args = [
        Arg::Ptr(address(s, l, "causal softmax")?),
        u32_of(rows, "causal softmax")?,
        u32_of(t, "causal softmax")?,
        f32_arg(scale),
        Arg::U32(window),
        Arg::Ptr(out_at),
    ];
    launch(dev, "btm_causal_softmax", s.dtype(), rows.div_ceil(WARPS), &args)?;
    Ok(out)
}

/// The causal softmax's input gradient from its output p and output gradient dp.
pub(crate) fn causal_softmax_grad(
    p: &CudaStorage,
    pl: &Layout,
    dp: &CudaStorage,
    dpl: &Layout,
    t: usize,
    scale: f64,
) -> Result<CudaStorage> {
    let n = pl.shape().elem_count();
    let rows = n / t.max(1);
    let dev = &p.device;
    let (out, out_at) = output(dev, p.dtype(), n)?;
    let args = [
        Arg::Ptr(address(p, pl, "causal softmax grad")?),
        Arg::Ptr(address(dp, dpl, "causal softmax grad")?),
        u32_of(rows, "causal softmax grad")?,
        u32_of(t, "causal softmax grad")?,
        f32_arg(scale),
        Arg::Ptr(out_at),
    ];
    launch(dev, "btm_causal_softmax_bwd", p.dtype(), rows.div_ceil(WARPS), &args)?;
    Ok(out)
}
