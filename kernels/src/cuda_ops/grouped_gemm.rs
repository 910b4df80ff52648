//! `grouped_gemm.rs`'s products on cuBLAS: each group's row-major product laid out as one
//! column-major [`Gemm`] of the library's.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{Layout, Result, Shape};

use super::cublas::{run_gemms, Gemm};
use super::launch::{address, element, output, zeros};
use crate::plan::Kind;

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
