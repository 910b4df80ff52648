//! cuBLAS's matrix products: a list of independent products in one grouped call, or one call
//! each, and which of the two ran.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Result};
use cudarc::cublas::sys as cublas;
use cudarc::driver::DevicePtr;

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

/// The type of every product's accumulation: float32, for float32 and bfloat16 operands.
const COMPUTE: cublas::cublasComputeType_t = cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F;

fn op(transpose: bool) -> cublas::cublasOperation_t {
    if transpose {
        cublas::cublasOperation_t::CUBLAS_OP_T
    } else {
        cublas::cublasOperation_t::CUBLAS_OP_N
    }
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
    // `blas` owns the handle: it lives until both paths are done with it.
    let blas = dev.cublas_handle();
    let handle = *blas.handle();
    let force_loop = std::env::var("BTM_GROUPED_GEMM").is_ok_and(|v| v == "loop");
    if !force_loop && grouped(dev, handle, data_type, problems)? {
        PATH.store(1, Ordering::Relaxed);
        return Ok(());
    }
    looped(handle, data_type, problems)?;
    PATH.store(2, Ordering::Relaxed);
    Ok(())
}

/// All of `problems` in one `cublasGemmGroupedBatchedEx`; `false` when the library refuses the
/// call up front (nothing was queued), so the caller can take the loop.
fn grouped(dev: &CudaDevice, handle: cublas::cublasHandle_t, data_type: cublas::cudaDataType_t, problems: &[Gemm]) -> Result<bool> {
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
    let (alphas, betas, sizes) = (vec![1f32; count], vec![0f32; count], vec![1i32; count]);
    // The pointer arrays live on the device ([A…, B…, C…] in one buffer); the dimensions
    // and scalars on the host.
    let pointers: Vec<u64> = problems.iter().map(|p| p.a).chain(problems.iter().map(|p| p.b)).chain(problems.iter().map(|p| p.c)).collect();
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
            COMPUTE,
        )
    };
    match status {
        cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(true),
        // Refused up front (nothing was queued).
        cublas::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED | cublas::cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE => Ok(false),
        other => Err(cublas_error("cublasGemmGroupedBatchedEx", other)),
    }
}

/// `problems` as one `cublasGemmEx` each.
fn looped(handle: cublas::cublasHandle_t, data_type: cublas::cudaDataType_t, problems: &[Gemm]) -> Result<()> {
    let (one, zero) = (1f32, 0f32);
    for p in problems {
        // SAFETY: the operands' addresses point at live buffers sized by the dimensions given;
        // the call is queued on candle's stream, which the handle is bound to.
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
                COMPUTE,
                cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if status != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(cublas_error("cublasGemmEx", status));
        }
    }
    Ok(())
}
