//! The fused MoE layer's candle custom ops on CUDA: the `cuda_fwd` bodies of the ops in
//! `permute.rs`, `grouped_gemm.rs` and `swiglu.rs`, so that [`crate::fused_moe`] and its
//! backward pass run on a GPU as they do on the CPU (same graph, same formulas).
//!
//! - Grouped GEMMs go to cuBLAS (`cublasGemmGroupedBatchedEx`: one call for every expert's
//!   product, bfloat16 or float32 operands, float32 accumulation, tensor cores for bfloat16).
//!   Group sizes are host-known (the routing plan is built on the host), which is what that call
//!   takes. Where the library refuses it (cuBLAS before 12.5, or a combination it does not
//!   support) the same products run as one `cublasGemmEx` per non-empty group; [`gemm_path`]
//!   says which one ran.
//! - Gathers, the per-token combine, row scaling, the routing weights' dot products and the
//!   packed SwiGLU are the kernels of `cuda/ops.cu`, compiled once per process by NVRTC.
//! - The same file holds the row kernels of the model's other fused ops on CUDA: the causal
//!   softmax of attention scores ([`crate::softmax`]), RMSNorm ([`crate::norm`]) and the
//!   next-token cross-entropy (the trainer's loss), each with its backward pass.
//! - Unlike the CPU, where the permutation is fused into the GEMM tiles, the gathered operand
//!   is materialised ([N, K]) before the library call: cuBLAS takes dense operands.
//!
//! Operands are float32 or bfloat16 (the CPU ops are float32/float64); the routing weights have
//! the activations' dtype, as on the CPU.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{DType, Layout, Result, Shape};
use cudarc::cublas::sys as cublas;
use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};

use crate::grouped_gemm::Kind;
use crate::permute::RoutePlan;

/// Threads per block of the row kernels.
const THREADS: u32 = 256;
/// Grid cap of the grid-stride kernels.
const MAX_BLOCKS: u32 = 65_535;
/// The name under which candle caches the loaded module.
const MODULE: &str = "btm_ops";

/// The PTX of `cuda/ops.cu`, compiled once per process for the first device's architecture.
fn ptx(dev: &CudaDevice) -> Result<&'static str> {
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

/// The kernel-name suffix and element size of a dtype the CUDA ops implement.
fn element(dtype: DType, what: &str) -> Result<(&'static str, usize)> {
    match dtype {
        DType::F32 => Ok(("f32", 4)),
        DType::BF16 => Ok(("bf16", 2)),
        other => candle_core::bail!("{what}: the CUDA kernels take float32 or bfloat16, got {other:?}"),
    }
}

/// The device address of a contiguous operand's first element.
fn address(s: &CudaStorage, l: &Layout, what: &str) -> Result<u64> {
    let Some((start, _)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: the CUDA kernel needs a contiguous tensor");
    };
    let stream = s.device.cuda_stream();
    // The guards device_ptr returns order other streams' uses; all of btm's work is on the
    // device's one stream, so they are dropped at once.
    let (base, size) = match &s.slice {
        CudaStorageSlice::F32(v) => (v.device_ptr(&stream).0, 4),
        CudaStorageSlice::BF16(v) => (v.device_ptr(&stream).0, 2),
        CudaStorageSlice::U32(v) => (v.device_ptr(&stream).0, 4),
        _ => candle_core::bail!("{what}: float32, bfloat16 or u32 operands on CUDA, got {:?}", s.dtype()),
    };
    Ok(base + (start * size) as u64)
}

/// A `dtype` buffer of `n` elements for a kernel's output, and its address.
fn output(dev: &CudaDevice, dtype: DType, n: usize) -> Result<(CudaStorage, u64)> {
    buffer(dev, dtype, n, false)
}

/// A zeroed `dtype` buffer of `n` elements, for an output some of which no kernel writes.
fn zeros(dev: &CudaDevice, dtype: DType, n: usize) -> Result<(CudaStorage, u64)> {
    buffer(dev, dtype, n, true)
}

fn buffer(dev: &CudaDevice, dtype: DType, n: usize, zeroed: bool) -> Result<(CudaStorage, u64)> {
    let n = n.max(1);
    // SAFETY (`alloc`): an uninitialised buffer goes only to kernels that write every element
    // before anything reads it ([`output`]); the memset of a zeroed one would be a pass of its own.
    let storage = match (dtype, zeroed) {
        (DType::F32, true) => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<f32>(n)?, dev.clone()),
        (DType::F32, false) => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n) }?, dev.clone()),
        (DType::BF16, true) => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<half::bf16>(n)?, dev.clone()),
        (DType::BF16, false) => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(n) }?, dev.clone()),
        (other, _) => candle_core::bail!("CUDA MoE kernels: no {other:?} buffers"),
    };
    let at = address(&storage, &Layout::contiguous(n), "buffer")?;
    Ok((storage, at))
}

/// A host index array on the device (kept alive by the returned storage), and its address.
fn upload(dev: &CudaDevice, data: &[u32]) -> Result<(CudaStorage, u64)> {
    let data = if data.is_empty() { &[0u32][..] } else { data };
    let storage = CudaStorage::wrap_cuda_slice(dev.clone_htod(data)?, dev.clone());
    let at = address(&storage, &Layout::contiguous(data.len()), "indices")?;
    Ok((storage, at))
}

fn driver(e: cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA MoE kernel launch: {e:?}"))
}

fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((rows as u32).clamp(1, MAX_BLOCKS), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One launch of `name_{suffix}` from `cuda/ops.cu` for `dtype`, over `rows` rows.
fn launch(dev: &CudaDevice, name: &str, dtype: DType, rows: usize, args: &[Arg]) -> Result<()> {
    let (suffix, _) = element(dtype, name)?;
    launch_with(dev, &format!("{name}_{suffix}"), rows_config(rows), args)
}

/// One launch of the kernel `name` from `cuda/ops.cu` with `cfg`, `args` pushed in order
/// (addresses as u64, sizes as u32 or usize, scalars as f32).
fn launch_with(dev: &CudaDevice, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    let func = dev.get_or_load_custom_func(name, MODULE, ptx(dev)?)?;
    let mut builder = func.builder();
    for arg in args {
        match arg {
            Arg::Ptr(p) => builder.arg(p),
            Arg::U32(v) => builder.arg(v),
            Arg::Size(v) => builder.arg(v),
            Arg::F32(v) => builder.arg(v),
        };
    }
    // SAFETY: the argument list matches the kernel's signature in ops.cu, every address points
    // at a live buffer of the sizes the kernel reads and writes, and all of it is queued on the
    // device's stream.
    unsafe { builder.launch(cfg) }.map_err(driver)?;
    Ok(())
}

enum Arg {
    Ptr(u64),
    U32(u32),
    Size(usize),
    F32(f32),
}

fn u32_of(n: usize, what: &str) -> Result<Arg> {
    match u32::try_from(n) {
        Ok(v) => Ok(Arg::U32(v)),
        Err(_) => candle_core::bail!("{what}: {n} exceeds the kernels' 32-bit sizes"),
    }
}

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

/// Rows per block of the one-warp-per-row kernels (256 threads).
const WARPS: usize = (THREADS / 32) as usize;

fn f32_arg(v: f64) -> Arg {
    Arg::F32(v as f32)
}

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

/// The grouped product `product` (see `grouped_gemm.rs`; rows `offsets[e]..offsets[e+1]` are
/// group e) on cuBLAS: returns the output and its shape. `offsets` are the host's.
pub(crate) fn grouped_gemm(
    product: Kind,
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    offsets: &[usize],
) -> Result<(CudaStorage, Shape)> {
    let what = "grouped GEMM";
    if a.dtype() != b.dtype() {
        candle_core::bail!("{what}: dtypes differ ({:?} vs {:?})", a.dtype(), b.dtype());
    }
    let (_, size) = element(a.dtype(), what)?;
    let (n, a_cols) = al.shape().dims2()?;
    let b_dims = bl.shape().dims().to_vec();
    let groups = offsets.len().saturating_sub(1);
    let (out_len, shape) = match product {
        Kind::Forward => (n * b_dims[1], Shape::from((n, b_dims[1]))),
        Kind::InputGrad => (n * b_dims[2], Shape::from((n, b_dims[2]))),
        Kind::WeightGrad => (groups * a_cols * b_dims[1], Shape::from((groups, a_cols, b_dims[1]))),
    };
    let dev = &a.device;
    // Every output row belongs to a group, but an empty group's dW_e is written by no product.
    let (out, c) = if product == Kind::WeightGrad { zeros(dev, a.dtype(), out_len)? } else { output(dev, a.dtype(), out_len)? };
    let (a_at, b_at) = (address(a, al, what)?, address(b, bl, what)?);
    let at = |base: u64, elements: usize| base + (elements * size) as u64;

    // Row-major products as cuBLAS's column-major ones: a row-major [r, c] matrix is a
    // column-major [c, r] one with leading dimension c, so C = A·B is computed as Cᵀ = Bᵀ·Aᵀ.
    let mut problems = Vec::with_capacity(groups);
    for g in 0..groups {
        let (start, rows) = (offsets[g], offsets[g + 1] - offsets[g]);
        if rows == 0 {
            continue; // its output rows (or dW_e) stay zero
        }
        problems.push(match product {
            Kind::Forward => {
                let (m, k) = (b_dims[1], b_dims[2]);
                Gemm {
                    trans_a: true,
                    trans_b: false,
                    m,
                    n: rows,
                    k,
                    a: at(b_at, g * m * k),
                    lda: k,
                    b: at(a_at, start * k),
                    ldb: k,
                    c: at(c, start * m),
                    ldc: m,
                }
            }
            Kind::InputGrad => {
                let (m, k) = (b_dims[1], b_dims[2]);
                Gemm {
                    trans_a: false,
                    trans_b: false,
                    m: k,
                    n: rows,
                    k: m,
                    a: at(b_at, g * m * k),
                    lda: k,
                    b: at(a_at, start * m),
                    ldb: m,
                    c: at(c, start * k),
                    ldc: k,
                }
            }
            Kind::WeightGrad => {
                let (m, k) = (a_cols, b_dims[1]);
                Gemm {
                    trans_a: false,
                    trans_b: true,
                    m: k,
                    n: m,
                    k: rows,
                    a: at(b_at, start * k),
                    lda: k,
                    b: at(a_at, start * m),
                    ldb: m,
                    c: at(c, g * m * k),
                    ldc: k,
                }
            }
        });
    }
    run_gemms(dev, a.dtype(), &problems)?;
    Ok((out, shape))
}

/// One column-major product `C = op(A)·op(B)` of cuBLAS's: C [m, n], inner dimension k.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub c: u64,
    pub ldc: usize,
}

/// Which cuBLAS path the grouped products took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GemmPath {
    /// No grouped product has run yet.
    None,
    /// One `cublasGemmGroupedBatchedEx` per grouped product.
    Grouped,
    /// One `cublasGemmEx` per non-empty group (the library refused the grouped call).
    Looped,
}

static PATH: AtomicU8 = AtomicU8::new(0);

/// The cuBLAS path the last grouped product took.
pub fn gemm_path() -> GemmPath {
    match PATH.load(Ordering::Relaxed) {
        1 => GemmPath::Grouped,
        2 => GemmPath::Looped,
        _ => GemmPath::None,
    }
}

fn cublas_error(call: &str, status: cublas::cublasStatus_t) -> candle_core::Error {
    candle_core::Error::Msg(format!("{call}: {status:?}"))
}

fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("grouped GEMM: dimension {v} exceeds cuBLAS's 32-bit sizes")))
}

/// Run `problems` (each its own group of one) with float32 accumulation: one grouped call, or
/// one `cublasGemmEx` each when the grouped call is refused. Set `BTM_GROUPED_GEMM=loop` to
/// take the loop (the comparison `btm bench moe` draws).
pub(crate) fn run_gemms(dev: &CudaDevice, dtype: DType, problems: &[Gemm]) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let data_type = match dtype {
        DType::F32 => cublas::cudaDataType_t::CUDA_R_32F,
        DType::BF16 => cublas::cudaDataType_t::CUDA_R_16BF,
        other => candle_core::bail!("grouped GEMM: float32 or bfloat16 on CUDA, got {other:?}"),
    };
    let compute = cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    let op = |t: bool| if t { cublas::cublasOperation_t::CUBLAS_OP_T } else { cublas::cublasOperation_t::CUBLAS_OP_N };
    let blas = dev.cublas_handle();
    let handle = *blas.handle();
    let (one, zero) = (1f32, 0f32);
    let force_loop = std::env::var("BTM_GROUPED_GEMM").is_ok_and(|v| v == "loop");

    if !force_loop {
        let count = problems.len();
        let mut dims: [Vec<i32>; 6] = Default::default();
        for p in problems {
            for (d, v) in dims.iter_mut().zip([p.m, p.n, p.k, p.lda, p.ldb, p.ldc]) {
                d.push(int(v)?);
            }
        }
        let [m, n, k, lda, ldb, ldc] = &dims;
        let trans_a: Vec<_> = problems.iter().map(|p| op(p.trans_a)).collect();
        let trans_b: Vec<_> = problems.iter().map(|p| op(p.trans_b)).collect();
        let (alphas, betas, sizes) = (vec![one; count], vec![zero; count], vec![1i32; count]);
        // The pointer arrays live on the device ([A…, B…, C…] in one buffer); the dimensions
        // and scalars on the host.
        let pointers: Vec<u64> =
            problems.iter().map(|p| p.a).chain(problems.iter().map(|p| p.b)).chain(problems.iter().map(|p| p.c)).collect();
        let arrays = dev.clone_htod(&pointers)?;
        let stream = dev.cuda_stream();
        let (base, _guard) = arrays.device_ptr(&stream);
        let a_array = base as *const *const c_void;
        let b_array = (base + 8 * count as u64) as *const *const c_void;
        let c_array = (base + 16 * count as u64) as *mut *mut c_void;
        // SAFETY: every array has `count` entries; the device pointer arrays hold addresses of
        // live operands sized by the dimensions given; the call is queued on candle's stream,
        // which the handle is bound to, and the arrays are freed in stream order after it.
        let status = unsafe {
            cublas::cublasGemmGroupedBatchedEx(
                handle,
                trans_a.as_ptr(),
                trans_b.as_ptr(),
                m.as_ptr(),
                n.as_ptr(),
                k.as_ptr(),
                alphas.as_ptr() as *const c_void,
                a_array,
                data_type,
                lda.as_ptr(),
                b_array,
                data_type,
                ldb.as_ptr(),
                betas.as_ptr() as *const c_void,
                c_array,
                data_type,
                ldc.as_ptr(),
                int(count)?,
                sizes.as_ptr(),
                compute,
            )
        };
        match status {
            cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS => {
                PATH.store(1, Ordering::Relaxed);
                return Ok(());
            }
            // Refused up front (nothing was queued): fall through to the loop.
            cublas::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED | cublas::cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE => {}
            other => return Err(cublas_error("cublasGemmGroupedBatchedEx", other)),
        }
    }
    for p in problems {
        // SAFETY: as above, for one product.
        let status = unsafe {
            cublas::cublasGemmEx(
                handle,
                op(p.trans_a),
                op(p.trans_b),
                int(p.m)?,
                int(p.n)?,
                int(p.k)?,
                &one as *const f32 as *const c_void,
                p.a as *const c_void,
                data_type,
                int(p.lda)?,
                p.b as *const c_void,
                data_type,
                int(p.ldb)?,
                &zero as *const f32 as *const c_void,
                p.c as *mut c_void,
                data_type,
                int(p.ldc)?,
                compute,
                cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if status != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(cublas_error("cublasGemmEx", status));
        }
    }
    PATH.store(2, Ordering::Relaxed);
    Ok(())
}

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

/// The default memory pool of a device, from which cudarc's stream-ordered allocations come.
fn default_pool(dev: &CudaDevice) -> Result<cudarc::driver::sys::CUmemoryPool> {
    use cudarc::driver::sys;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().map_err(driver)?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes one handle for a valid device.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result().map_err(driver)?;
    Ok(pool)
}

fn pool_attribute(dev: &CudaDevice, attr: cudarc::driver::sys::CUmemPool_attribute, set: Option<u64>) -> Result<u64> {
    let pool = default_pool(dev)?;
    let mut value: u64 = set.unwrap_or(0);
    let at = &mut value as *mut u64 as *mut c_void;
    // SAFETY: the attributes used here are 64-bit values.
    let status = unsafe {
        match set {
            Some(_) => cudarc::driver::sys::cuMemPoolSetAttribute(pool, attr, at),
            None => cudarc::driver::sys::cuMemPoolGetAttribute(pool, attr, at),
        }
    };
    status.result().map_err(driver)?;
    Ok(value)
}

/// Keep freed device memory in the pool instead of returning it to the driver at every
/// synchronisation (the pool's default release threshold is 0), as a caching allocator does.
pub fn keep_freed_memory(dev: &CudaDevice) -> Result<()> {
    pool_attribute(dev, cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, Some(u64::MAX)).map(|_| ())
}

/// The most device memory in use at once since the last [`reset_peak_memory`], in bytes.
pub fn peak_memory(dev: &CudaDevice) -> Result<u64> {
    pool_attribute(dev, cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)
}

/// Start [`peak_memory`]'s count again from the memory in use now.
pub fn reset_peak_memory(dev: &CudaDevice) -> Result<()> {
    pool_attribute(dev, cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0)).map(|_| ())
}

/// The GPU's name as the driver reports it.
pub fn device_name(dev: &CudaDevice) -> String {
    dev.cuda_stream().context().name().unwrap_or_else(|e| format!("unknown ({e:?})"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Device, Result, Tensor, Var};

    use crate::permute::RoutePlan;
    use crate::router::{Capacity, DropPolicy, Routing};
    use crate::testing::random;
    use crate::{ExpertWeights, MoeOptions};

    fn gpu() -> Option<Device> {
        if !crate::cuda::driver_available() {
            eprintln!("skipping: no libcuda here (a GPU machine runs this: scripts/gpu-check.sh)");
            return None;
        }
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("skipping: no CUDA device ({e})");
                None
            }
        }
    }

    /// `f` on the CPU in float32 and on the GPU in `dtype`, from the same values (rounded to
    /// `dtype` for both): output and every input's gradient within `tol` of the largest CPU value.
    fn compare(what: &str, gpu: &Device, dtype: DType, tol: f64, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) {
        let rounded: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()).collect();
        let run = |dev: &Device, dt: DType| -> (Tensor, Vec<Tensor>) {
            let vars: Vec<Var> =
                rounded.iter().map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap().to_device(dev).unwrap()).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            let probe = random(y.dims(), 99, DType::F32).to_dtype(dt).unwrap().to_device(dev).unwrap();
            let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = vars.iter().map(|v| grads.get(v).map_or_else(|| v.zeros_like().unwrap(), |g| g.clone())).collect();
            (y, gs)
        };
        let (want_y, want_g) = run(&Device::Cpu, DType::F32);
        let (got_y, got_g) = run(gpu, dtype);
        let pairs = std::iter::once((got_y, want_y)).chain(got_g.into_iter().zip(want_g));
        for (i, (got, want)) in pairs.enumerate() {
            let got = got.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30) as f64;
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
            let part = if i == 0 { "output".to_string() } else { format!("gradient {}", i - 1) };
            assert!(diff <= tol * scale, "{what} {dtype:?} {part}: max |Δ| {diff:e} > {tol:e} · {scale:e}");
        }
    }

    #[test]
    fn gpu_ops_match_the_cpu_ops() {
        let Some(dev) = gpu() else { return };
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            compare("rms_norm", &dev, dtype, tol, &[random(&[300, 96], 1, DType::F32), random(&[96], 2, DType::F32)], &|v| {
                crate::rms_norm(&v[0], &v[1], 1e-5)
            });
            compare("swiglu_packed", &dev, dtype, tol, &[random(&[77, 2 * 40], 3, DType::F32)], &|v| crate::swiglu_packed(&v[0]));
            for window in [None, Some(5)] {
                compare("causal_softmax", &dev, dtype, tol, &[random(&[2, 3, 33, 33], 4, DType::F32)], &|v| {
                    crate::causal_softmax(&(&v[0] * 4.0)?, 0.3, window)
                });
            }
            let offsets = [0u32, 10, 10, 45, 64];
            compare("grouped_matmul", &dev, dtype, tol, &[random(&[64, 24], 5, DType::F32), random(&[4, 40, 24], 6, DType::F32)], &|v| {
                let o = Tensor::new(&offsets, v[0].device())?;
                crate::grouped_matmul(&v[0], &v[1], &o)
            });
            // The plan's operations: a routing with idle experts and a capacity drop.
            let experts: Vec<u32> = (0..50u32).flat_map(|t| [t % 3, (t * 7 + 1) % 5]).collect();
            let keep: Vec<bool> = (0..100).map(|s| s % 9 != 4).collect();
            let plan = Arc::new(RoutePlan::new(&experts, 2, 6, Some(&keep)).unwrap());
            let n = plan.kept();
            compare("permute", &dev, dtype, tol, &[random(&[50, 16], 7, DType::F32)], &|v| crate::permute(&v[0], &plan));
            compare("unpermute", &dev, dtype, tol, &[random(&[n, 16], 8, DType::F32), random(&[50, 2], 9, DType::F32)], &|v| {
                crate::unpermute(&v[0], &v[1], &plan)
            });
            compare("scale_rows", &dev, dtype, tol, &[random(&[n, 16], 10, DType::F32), random(&[50, 2], 11, DType::F32)], &|v| {
                crate::scale_rows(&v[0], &v[1], &plan)
            });
            compare("gather_matmul", &dev, dtype, tol, &[random(&[50, 16], 12, DType::F32), random(&[6, 20, 16], 13, DType::F32)], &|v| {
                crate::gather_matmul(&v[0], &v[1], &plan)
            });
            compare("matmul_combine", &dev, dtype, tol, &[random(&[n, 20], 14, DType::F32), random(&[6, 16, 20], 15, DType::F32)], &|v| {
                crate::matmul_combine(&v[0], &v[1], &plan)
            });
            // The whole layer through the router (x, router, gate_up, down).
            for capacity in [None, Some(Capacity { factor: 0.7, policy: DropPolicy::Probs })] {
                let opts = MoeOptions { top_k: 2, routing: Routing::SoftmaxThenTopk, capacity };
                compare(
                    "fused_moe",
                    &dev,
                    dtype,
                    tol * 2.0,
                    &[
                        random(&[64, 32], 16, DType::F32),
                        (random(&[8, 32], 17, DType::F32) * 3.0).unwrap(),
                        random(&[8, 2 * 24, 32], 18, DType::F32),
                        random(&[8, 32, 24], 19, DType::F32),
                    ],
                    &|v| Ok(crate::fused_moe(&v[0], &v[1], &ExpertWeights { gate_up: v[2].clone(), down: v[3].clone() }, &opts)?.0),
                );
            }
        }
        assert_ne!(super::gemm_path(), super::GemmPath::None);
        eprintln!("grouped GEMM path on this GPU: {:?}", super::gemm_path());
    }
}
