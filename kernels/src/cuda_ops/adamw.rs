//! AdamW's updates on CUDA, in place on float32 parameters and moments (the trainer's
//! optimiser).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{DType, Layout, Result};

use super::launch::{address, f32_arg, launch_with, rows_config, Arg, THREADS};

fn float32(s: &CudaStorage, what: &str) -> Result<()> {
    if s.dtype() != DType::F32 {
        candle_core::bail!("{what}: float32 on CUDA, got {:?}", s.dtype());
    }
    Ok(())
}

/// AdamW's moment update in place: `m ← β·m + (1−β)·(s·g)`, or `(s·g)²` when `square`.
pub fn adamw_moment(m: &mut CudaStorage, ml: &Layout, g: &CudaStorage, gl: &Layout, beta: f64, scale: f64, square: bool) -> Result<()> {
    let what = "AdamW moment";
    float32(m, what)?;
    float32(g, what)?;
    let n = ml.shape().elem_count();
    if gl.shape().elem_count() != n {
        candle_core::bail!("{what}: moment of {n} elements, gradient of {}", gl.shape().elem_count());
    }
    let args = [
        Arg::Ptr(address(m, ml, what)?),
        Arg::Ptr(address(g, gl, what)?),
        Arg::Size(n),
        f32_arg(beta),
        f32_arg(1.0 - beta),
        f32_arg(scale),
        Arg::U32(square as u32),
    ];
    launch_with(&m.device, "btm_adamw_moment", rows_config(n.div_ceil(THREADS as usize)), &args)
}

/// AdamW's weight update in place: `w ← w·keep − lr · (m·inv_bc1) / (√(v·inv_bc2) + ε)`;
/// `k` = [inv_bc1, inv_bc2, lr, eps, keep].
pub fn adamw_update(
    w: &mut CudaStorage,
    wl: &Layout,
    m: &CudaStorage,
    ml: &Layout,
    v: &CudaStorage,
    vl: &Layout,
    k: [f64; 5],
) -> Result<()> {
    let what = "AdamW update";
    for s in [&*w, m, v] {
        float32(s, what)?;
    }
    let n = wl.shape().elem_count();
    if ml.shape().elem_count() != n || vl.shape().elem_count() != n {
        candle_core::bail!("{what}: parameter and moments differ in size");
    }
    let mut args = vec![Arg::Ptr(address(w, wl, what)?), Arg::Ptr(address(m, ml, what)?), Arg::Ptr(address(v, vl, what)?), Arg::Size(n)];
    args.extend(k.map(f32_arg));
    launch_with(&w.device, "btm_adamw_update", rows_config(n.div_ceil(THREADS as usize)), &args)
}
