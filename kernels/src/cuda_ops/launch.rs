//! What every launcher of `cuda/ops.cu` needs: operand addresses, output buffers, index
//! uploads and one kernel launch with its arguments.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{DType, Layout, Result};
use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};

use super::arch::ptx;

/// Threads per block of the row kernels.
pub(super) const THREADS: u32 = 256;
/// Grid cap of the grid-stride kernels.
const MAX_BLOCKS: u32 = 65_535;
/// The name under which candle caches the loaded module.
const MODULE: &str = "btm_ops";

/// Rows per block of the one-warp-per-row kernels (256 threads).
pub(super) const WARPS: usize = (THREADS / 32) as usize;

/// The kernel-name suffix and element size of a dtype the CUDA ops implement.
pub(super) fn element(dtype: DType, what: &str) -> Result<(&'static str, usize)> {
    match dtype {
        DType::F32 => Ok(("f32", 4)),
        DType::BF16 => Ok(("bf16", 2)),
        other => candle_core::bail!("{what}: the CUDA kernels take float32 or bfloat16, got {other:?}"),
    }
}

/// The device address of a contiguous operand's first element.
pub(super) fn address(s: &CudaStorage, l: &Layout, what: &str) -> Result<u64> {
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
pub(super) fn output(dev: &CudaDevice, dtype: DType, n: usize) -> Result<(CudaStorage, u64)> {
    buffer(dev, dtype, n, false)
}

/// A zeroed `dtype` buffer of `n` elements, for an output some of which no kernel writes.
pub(super) fn zeros(dev: &CudaDevice, dtype: DType, n: usize) -> Result<(CudaStorage, u64)> {
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
pub(super) fn upload(dev: &CudaDevice, data: &[u32]) -> Result<(CudaStorage, u64)> {
    let data = if data.is_empty() { &[0u32][..] } else { data };
    let storage = CudaStorage::wrap_cuda_slice(dev.clone_htod(data)?, dev.clone());
    let at = address(&storage, &Layout::contiguous(data.len()), "indices")?;
    Ok((storage, at))
}

pub(super) fn driver(e: cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA MoE kernel launch: {e:?}"))
}

pub(super) fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((rows as u32).clamp(1, MAX_BLOCKS), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One launch of `name_{suffix}` from `cuda/ops.cu` for `dtype`, over `rows` rows.
pub(super) fn launch(dev: &CudaDevice, name: &str, dtype: DType, rows: usize, args: &[Arg]) -> Result<()> {
    let (suffix, _) = element(dtype, name)?;
    launch_with(dev, &format!("{name}_{suffix}"), rows_config(rows), args)
}

/// One launch of the kernel `name` from `cuda/ops.cu` with `cfg`, `args` pushed in order
/// (addresses as u64, sizes as u32 or usize, scalars as f32).
pub(super) fn launch_with(dev: &CudaDevice, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
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

pub(super) enum Arg {
    Ptr(u64),
    U32(u32),
    Size(usize),
    F32(f32),
}

pub(super) fn u32_of(n: usize, what: &str) -> Result<Arg> {
    match u32::try_from(n) {
        Ok(v) => Ok(Arg::U32(v)),
        Err(_) => candle_core::bail!("{what}: {n} exceeds the kernels' 32-bit sizes"),
    }
}

pub(super) fn f32_arg(v: f64) -> Arg {
    Arg::F32(v as f32)
}
