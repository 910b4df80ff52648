//! The routing plan's row kernels on CUDA: the `cuda_fwd` bodies of `permute.rs`'s ops and the
//! gathers and combines of `grouped_gemm.rs`'s fused products.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{Layout, Result};

use super::launch::{address, launch, output, u32_of, upload, Arg};
use crate::plan::RoutePlan;

/// `out[r] = x[token(r)] · (scale[slot(r)] or 1)`: x [T, width] → [N, width].
pub(crate) fn gather(x: &CudaStorage, xl: &Layout, scale: Option<(&CudaStorage, &Layout)>, plan: &RoutePlan) -> Result<CudaStorage> {
    let (_, width) = xl.shape().dims2()?;
    let dev = &x.device;
    let (_rows, rows_at) = upload(dev, plan.rows())?;
    let (out, out_at) = output(dev, x.dtype(), plan.kept() * width)?;
    let scale_at = match scale {
        Some((s, l)) => address(s, l, "gather scale")?,
        None => 0,
    };
    let args = [
        Arg::Ptr(address(x, xl, "gather")?),
        Arg::Ptr(scale_at),
        Arg::Ptr(rows_at),
        u32_of(plan.kept(), "gather")?,
        u32_of(plan.top_k(), "gather")?,
        u32_of(width, "gather")?,
        Arg::Ptr(out_at),
    ];
    launch(dev, "btm_gather", x.dtype(), plan.kept(), &args)?;
    Ok(out)
}

/// `out[t] = Σ_j (w[t,j] or 1) · p[row(t,j)]`: p [N, width] → [T, width].
pub(crate) fn combine(p: &CudaStorage, pl: &Layout, weights: Option<(&CudaStorage, &Layout)>, plan: &RoutePlan) -> Result<CudaStorage> {
    let (_, width) = pl.shape().dims2()?;
    let dev = &p.device;
    let (_slots, slots_at) = upload(dev, plan.slot_rows())?;
    let (out, out_at) = output(dev, p.dtype(), plan.tokens() * width)?;
    let w_at = match weights {
        Some((w, l)) => address(w, l, "combine weights")?,
        None => 0,
    };
    let args = [
        Arg::Ptr(address(p, pl, "combine")?),
        Arg::Ptr(w_at),
        Arg::Ptr(slots_at),
        u32_of(plan.tokens(), "combine")?,
        u32_of(plan.top_k(), "combine")?,
        u32_of(width, "combine")?,
        Arg::Ptr(out_at),
    ];
    launch(dev, "btm_combine", p.dtype(), plan.tokens(), &args)?;
    Ok(out)
}

/// `out[s] = ⟨p[row(s)], g[token(s)]⟩` (or `g[row(s)]` when `g_by_row`): [T, k].
pub(crate) fn slot_dots(
    p: &CudaStorage,
    pl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    plan: &RoutePlan,
    g_by_row: bool,
) -> Result<CudaStorage> {
    let (_, width) = pl.shape().dims2()?;
    let dev = &p.device;
    let slots = plan.tokens() * plan.top_k();
    let (_slots, slots_at) = upload(dev, plan.slot_rows())?;
    let (out, out_at) = output(dev, p.dtype(), slots)?;
    let args = [
        Arg::Ptr(address(p, pl, "slot dots")?),
        Arg::Ptr(address(g, gl, "slot dots")?),
        Arg::Ptr(slots_at),
        u32_of(slots, "slot dots")?,
        u32_of(plan.top_k(), "slot dots")?,
        u32_of(width, "slot dots")?,
        Arg::U32(g_by_row as u32),
        Arg::Ptr(out_at),
    ];
    launch(dev, "btm_slot_dots", p.dtype(), slots, &args)?;
    Ok(out)
}

/// `out[r] = h[r] · w[slot(r)]`: [N, width].
pub(crate) fn scale_rows(h: &CudaStorage, hl: &Layout, w: &CudaStorage, wl: &Layout, plan: &RoutePlan) -> Result<CudaStorage> {
    let (n, width) = hl.shape().dims2()?;
    let dev = &h.device;
    let (_rows, rows_at) = upload(dev, plan.rows())?;
    let (out, out_at) = output(dev, h.dtype(), n * width)?;
    let args = [
        Arg::Ptr(address(h, hl, "scale rows")?),
        Arg::Ptr(address(w, wl, "scale rows")?),
        Arg::Ptr(rows_at),
        u32_of(n, "scale rows")?,
        u32_of(width, "scale rows")?,
        Arg::Ptr(out_at),
    ];
    launch(dev, "btm_scale_rows", h.dtype(), n, &args)?;
    Ok(out)
}
