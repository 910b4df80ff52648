//! Small helpers shared by the CPU kernels: typed access to candle's CPU storage and a
//! pointer wrapper for writing disjoint parts of one buffer from several rayon tasks.

use candle_core::{CpuStorage, DType, Layout, Result, WithDType};

/// The element types the CPU kernels are written for: `f32` (training) and `f64` (gradient
/// checks by finite differences).
pub(crate) trait Real: WithDType + std::ops::Neg<Output = Self> {
    fn exp(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn exp(self) -> Self {
        crate::math::exp_f32(self)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// The elements of a contiguous tensor, as a slice.
pub(crate) fn slice<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: the kernel needs a contiguous tensor");
    };
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// Fail unless `dtype` is one the CPU kernels implement.
pub(crate) fn check_float(dtype: DType, what: &str) -> Result<()> {
    match dtype {
        DType::F32 | DType::F64 => Ok(()),
        other => candle_core::bail!("{what}: CPU kernel supports f32 and f64, got {other:?}"),
    }
}

/// Run `$body` with `$t` = `f32` or `f64` by `$dtype`, wrapping the resulting `Vec` as
/// CPU storage; other dtypes are an error.
macro_rules! by_dtype {
    ($dtype:expr, $what:expr, |$t:ident| $body:expr) => {{
        $crate::cpu::check_float($dtype, $what)?;
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                candle_core::CpuStorage::F32($body)
            }
            _ => {
                type $t = f64;
                candle_core::CpuStorage::F64($body)
            }
        }
    }};
}
pub(crate) use by_dtype;

/// Lanes of the running sums in [`dot`] and [`dot3`]: one AVX-512 register of float32,
/// two of AVX2, four of SSE2. The count is fixed (not the machine's width), so every
/// instruction set adds in the same order and gives the same bits.
const LANES: usize = 16;

/// `Σ aᵢ·bᵢ` over [`LANES`] running sums; vectorises when inlined.
#[inline(always)]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ca.remainder().iter().zip(cb.remainder()).fold(T::zero(), |acc, (&x, &y)| acc + x * y);
    for (ca, cb) in ca.zip(cb) {
        for ((acc, &x), &y) in lanes.iter_mut().zip(ca).zip(cb) {
            *acc += x * y;
        }
    }
    lanes.iter().fold(tail, |acc, &x| acc + x)
}

/// `Σ aᵢ·bᵢ·cᵢ` over [`LANES`] running sums; vectorises when inlined.
#[inline(always)]
pub(crate) fn dot3<T: Real>(a: &[T], b: &[T], c: &[T]) -> T {
    let mut lanes = [T::zero(); LANES];
    let (ca, cb, cc) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
    let tail = ca.remainder().iter().zip(cb.remainder()).zip(cc.remainder()).fold(T::zero(), |acc, ((&x, &y), &z)| acc + x * y * z);
    for ((ca, cb), cc) in ca.zip(cb).zip(cc) {
        for (((acc, &x), &y), &z) in lanes.iter_mut().zip(ca).zip(cb).zip(cc) {
            *acc += x * y * z;
        }
    }
    lanes.iter().fold(tail, |acc, &x| acc + x)
}

/// A raw pointer that rayon tasks may share because each task writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);

// SAFETY: users only write through the pointer to regions no other task touches, while the
// buffer it points into outlives the parallel section.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer, taken through a method so closures capture the whole (Send) wrapper.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Rows per rayon task for row-parallel kernels over rows of `width` elements: big enough
/// that a task has ~64 K elements of work, so scheduling stays cheap.
pub(crate) fn rows_per_task(width: usize) -> usize {
    (65_536 / width.max(1)).max(1)
}
