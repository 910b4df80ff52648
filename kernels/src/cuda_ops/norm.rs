//! RMSNorm on CUDA, forward and backward (`norm.rs`'s op).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{DType, Layout, Result};
use cudarc::driver::LaunchConfig;

use super::launch::{address, element, f32_arg, launch, launch_with, output, u32_of, Arg, THREADS, WARPS};

/// RMSNorm of rows x [.., h] with weight w [h].
pub(crate) fn rms_norm(x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout, eps: f64) -> Result<CudaStorage> {
    let n = xl.shape().elem_count();
    let h = wl.shape().elem_count();
    let rows = n / h.max(1);
    let dev = &x.device;
    let (out, out_at) = output(dev, x.dtype(), n)?;
    let args = [
        Arg::Ptr(address(x, xl, "rms norm")?),
        Arg::Ptr(address(w, wl, "rms norm")?),
        u32_of(rows, "rms norm")?,
        u32_of(h, "rms norm")?,
        f32_arg(eps),
        Arg::Ptr(out_at),
    ];
    launch(dev, "btm_rms_norm", x.dtype(), rows.div_ceil(WARPS), &args)?;
    Ok(out)
}

/// RMSNorm's backward: dx (x's shape) then dw ([h]) in one buffer, as the CPU op returns them.
/// dw's sum over rows runs in two fixed-order stages (deterministic).
pub(crate) fn rms_norm_grad(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    eps: f64,
) -> Result<CudaStorage> {
    const CHUNK: usize = 256;
    let n = xl.shape().elem_count();
    let h = wl.shape().elem_count();
    let rows = n / h.max(1);
    let dev = &x.device;
    let (out, out_at) = output(dev, x.dtype(), n + h)?;
    let (suffix, size) = element(x.dtype(), "rms norm grad")?;
    let (_gxr, gxr_at) = output(dev, DType::F32, n)?;
    let args = [
        Arg::Ptr(address(x, xl, "rms norm grad")?),
        Arg::Ptr(address(w, wl, "rms norm grad")?),
        Arg::Ptr(address(g, gl, "rms norm grad")?),
        u32_of(rows, "rms norm grad")?,
        u32_of(h, "rms norm grad")?,
        f32_arg(eps),
        Arg::Ptr(out_at),
        Arg::Ptr(gxr_at),
    ];
    launch(dev, "btm_rms_norm_bwd", x.dtype(), rows.div_ceil(WARPS), &args)?;
    // dw: column sums of gxr, partial sums over CHUNK rows, then their totals after dx.
    let parts = rows.div_ceil(CHUNK).max(1);
    let (_partial, partial_at) = output(dev, DType::F32, parts * h)?;
    let column_blocks = (h as u32).div_ceil(THREADS);
    let grid = |y: usize| LaunchConfig { grid_dim: (column_blocks, y as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let (h32, parts32) = (u32_of(h, "rms norm grad")?, u32_of(parts, "rms norm grad")?);
    let partial_args =
        [Arg::Ptr(gxr_at), u32_of(rows, "rms norm grad")?, u32_of(h, "rms norm grad")?, Arg::U32(CHUNK as u32), Arg::Ptr(partial_at)];
    launch_with(dev, "btm_column_partials", grid(parts), &partial_args)?;
    let dw_at = out_at + (n * size) as u64;
    launch_with(dev, &format!("btm_column_totals_{suffix}"), grid(1), &[Arg::Ptr(partial_at), parts32, h32, Arg::Ptr(dw_at)])?;
    Ok(out)
}
