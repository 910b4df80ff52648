#![cfg_attr(not(feature = "std"), no_std)]

use core::sync::atomic::{AtomicBool, Ordering::Relaxed};

#[cfg(feature = "wasm-simd128-enable")]
pub const DEFAULT_WASM_SIMD128: bool = true;

#[cfg(not(feature = "wasm-simd128-enable"))]
pub const DEFAULT_WASM_SIMD128: bool = false;

static WASM_SIMD128: AtomicBool = AtomicBool::new(DEFAULT_WASM_SIMD128);

#[inline]
pub fn get_wasm_simd128() -> bool {
    WASM_SIMD128.load(Relaxed)
}
#[inline]
pub fn set_wasm_simd128(enable: bool) {
    WASM_SIMD128.store(enable, Relaxed)
}

extern crate alloc;

pub mod cache;

pub mod gemm;
pub mod gemv;
pub mod gevv;

pub mod horizontal_microkernel;
pub mod microkernel;

pub mod pack_operands;
pub mod simd;

pub use pulp;

#[derive(Copy, Clone, Debug)]
pub enum Parallelism {
    None,
    #[cfg(feature = "rayon")]
    Rayon(usize),
}

pub struct Ptr<T: ?Sized>(pub *mut T);

impl<T: ?Sized> Clone for Ptr<T> {
    #[inline]
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized> Copy for Ptr<T> {}

unsafe impl<T: ?Sized> Send for Ptr<T> {}
unsafe impl<T: ?Sized> Sync for Ptr<T> {}

impl<T> Ptr<T> {
    #[inline(always)]
    pub fn wrapping_offset(self, offset: isize) -> Self {
        Ptr::<T>(self.0.wrapping_offset(offset))
    }
    #[inline(always)]
    pub fn wrapping_add(self, offset: usize) -> Self {
        Ptr::<T>(self.0.wrapping_add(offset))
    }
}

#[cfg(not(feature = "std"))]
#[macro_export]
macro_rules! feature_detected {
    ($tt: tt) => {
        cfg!(feature = $tt)
    };
}

#[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
#[macro_export]
macro_rules! feature_detected {
    ($tt: tt) => {
        ::std::arch::is_x86_feature_detected!($tt)
    };
}
#[cfg(all(feature = "std", target_arch = "aarch64"))]
#[macro_export]
macro_rules! feature_detected {
    ($tt: tt) => {
        ::std::arch::is_aarch64_feature_detected!($tt)
    };
}
#[cfg(all(feature = "std", target_family = "wasm"))]
#[macro_export]
macro_rules! feature_detected {
    ("simd128") => {
        $crate::get_wasm_simd128()
    };
}

/// btm patch: the highest x86 kernel family the dispatchers may pick — 0 scalar, 1 FMA
/// (AVX2), 2 AVX-512 — read once from `BTM_CPU_ISA` (`baseline`, `avx2`, `avx512`; unset or
/// unknown: no cap), so that one process can be run on each instruction set.
#[cfg(feature = "std")]
pub fn x86_isa_cap() -> u8 {
    static CAP: ::std::sync::OnceLock<u8> = ::std::sync::OnceLock::new();
    *CAP.get_or_init(|| match ::std::env::var("BTM_CPU_ISA").unwrap_or_default().trim().to_ascii_lowercase().as_str() {
        "baseline" => 0,
        "avx2" => 1,
        _ => 2,
    })
}

/// btm patch: without `std` there is no environment to read: no cap.
#[cfg(not(feature = "std"))]
pub fn x86_isa_cap() -> u8 {
    2
}

/// btm patch: the micro-kernel family the dispatchers pick on this machine (`avx512f`, `fma`,
/// `scalar` on x86; `neon` or `scalar` on aarch64; `simd128` or `scalar` on wasm), by the same
/// tests they make.
pub fn x86_kernel_name() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        #[cfg(feature = "x86-v4")]
        if feature_detected!("avx512f") && x86_isa_cap() >= 2 {
            return "avx512f";
        }
        if feature_detected!("fma") && x86_isa_cap() >= 1 {
            return "fma";
        }
    }
    #[cfg(target_arch = "aarch64")]
    if feature_detected!("neon") {
        return "neon";
    }
    "scalar"
}
