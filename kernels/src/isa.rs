//! The x86 instruction set the CPU kernels run with, chosen at run time.
//!
//! One `btm` binary serves every x86-64 machine: it is compiled for baseline x86-64 (SSE2),
//! and each hot loop is compiled three times by [`multiversion!`](crate::multiversion) —
//! baseline, x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512 F/BW/DQ/VL) — and picks the best
//! version the processor has at the call. The matrix products (`gemm` crate, also behind
//! candle's CPU matmul) dispatch the same way: btm enables its `x86-v4` feature, without which
//! it never uses AVX-512 (`third_party/README.md`).
//!
//! `BTM_CPU_ISA=baseline|avx2|avx512` caps the choice (never raises it above what the CPU has),
//! for btm's kernels and the GEMM alike, so that every path can be tested and benchmarked on
//! one machine. On other architectures everything runs the baseline path.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// The environment variable that caps the instruction set.
pub const ENV: &str = "BTM_CPU_ISA";

/// An x86-64 instruction-set level, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// x86-64 baseline (SSE2), or any non-x86 processor.
    Baseline,
    /// x86-64-v3: AVX2 and FMA (Haswell, Zen 1 and later).
    Avx2,
    /// x86-64-v4: AVX-512 F, BW, DQ and VL (Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4).
    Avx512,
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 3] = [Isa::Baseline, Isa::Avx2, Isa::Avx512];

    /// The name `BTM_CPU_ISA` takes and benchmarks report.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parse a level's [name](Isa::name).
    pub fn parse(name: &str) -> Result<Isa, String> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name() == name.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("{ENV}={name:?} is not an instruction set btm knows; use baseline, avx2 or avx512"))
    }

    /// The highest level this processor supports.
    pub fn detected() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") && has!("avx2") && has!("fma") {
                return Isa::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    /// The cap `BTM_CPU_ISA` sets, if any; an unknown value is an error.
    pub fn cap_from_env() -> Result<Option<Isa>, String> {
        match std::env::var(ENV) {
            Ok(value) if !value.trim().is_empty() => Isa::parse(&value).map(Some),
            _ => Ok(None),
        }
    }

    /// The level the kernels run with: [`detected`](Isa::detected), capped by `BTM_CPU_ISA`.
    /// Read once per process. An unknown `BTM_CPU_ISA` leaves the detected level (the `btm`
    /// binary refuses such a value at start-up through [`check_env`]).
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        match FORCED.load(Ordering::Relaxed) {
            0 => {}
            level => return Isa::ALL[level as usize - 1].min(Isa::detected()),
        }
        *ACTIVE.get_or_init(|| {
            let detected = Isa::detected();
            match Isa::cap_from_env() {
                Ok(Some(cap)) => cap.min(detected),
                _ => detected,
            }
        })
    }
}

/// 0, or 1 + the index in [`Isa::ALL`] of a level forced by [`force`].
static FORCED: AtomicU8 = AtomicU8::new(0);

/// Run btm's multiversioned kernels at `isa` (capped by the processor) from now on, in every
/// thread, or at the [active](Isa::active) level again with `None`. For tests that compare the
/// paths in one process; the `gemm` crate's choice is made once per process and stays.
/// Every path computes the same IEEE operations in the same order (no fused multiply-add is
/// introduced, reductions keep their explicit lanes), so they agree bit for bit and other
/// threads running meanwhile see the same numbers.
#[doc(hidden)]
pub fn force(isa: Option<Isa>) {
    let level = isa.map_or(0, |isa| Isa::ALL.iter().position(|&x| x == isa).unwrap() as u8 + 1);
    FORCED.store(level, Ordering::Relaxed);
}

/// Fail with a clear message when `BTM_CPU_ISA` holds an unknown value.
pub fn check_env() -> Result<(), String> {
    Isa::cap_from_env().map(|_| ())
}

/// The GEMM micro-kernel family the `gemm` crate runs here: `avx512f`, `fma` or `scalar` on
/// x86-64 (the same test as its dispatcher, with the same cap), the platform's own otherwise.
pub fn gemm_kernel() -> &'static str {
    gemm_common::x86_kernel_name()
}

/// What a benchmark ran on: the processor, the instruction set the kernels used and the one
/// the processor has, and the GEMM kernel family. Every benchmark's JSON carries it, since a
/// speed-up measured on one x86 machine need not hold on another.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CpuInfo {
    /// `model name` from `/proc/cpuinfo` ("unknown" elsewhere).
    pub model: String,
    /// [`Isa::active`]'s name.
    pub isa: &'static str,
    /// [`Isa::detected`]'s name.
    pub isa_detected: &'static str,
    /// [`gemm_kernel`].
    pub gemm_kernel: &'static str,
}

impl CpuInfo {
    /// This process's.
    pub fn current() -> CpuInfo {
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string()))
            })
            .unwrap_or_else(|| "unknown".into());
        CpuInfo { model, isa: Isa::active().name(), isa_detected: Isa::detected().name(), gemm_kernel: gemm_kernel() }
    }
}

/// Define a function whose body is compiled for each [`Isa`] and dispatched by
/// [`Isa::active`] on every call.
///
/// Use it for the serial inner loops of a kernel (a row, a block of rows), not around a
/// rayon section: closures inside the body are compiled for the baseline only (they are
/// separate functions), so call a multiversioned function from inside the rayon closure. The
/// body is `#[inline(always)]` into three wrappers marked `#[target_feature]`, so the compiler
/// vectorises each copy for its own registers (16 float32 lanes with AVX-512, 8 with AVX2, 4
/// with SSE2). Arguments must be plain identifiers; generic parameters take one bound each.
#[macro_export]
macro_rules! multiversion {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident $(<$($gen:ident : $bound:path),+>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?
        $body:block
    ) => {
        $(#[$meta])*
        $vis fn $name $(<$($gen: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body $(<$($gen: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn v4 $(<$($gen: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    body $(::<$($gen),+>)? ($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3 $(<$($gen: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    body $(::<$($gen),+>)? ($($arg),*)
                }
                match $crate::isa::Isa::active() {
                    // SAFETY: `Isa::active` never exceeds what the processor supports.
                    $crate::isa::Isa::Avx512 => return unsafe { v4 $(::<$($gen),+>)? ($($arg),*) },
                    $crate::isa::Isa::Avx2 => return unsafe { v3 $(::<$($gen),+>)? ($($arg),*) },
                    $crate::isa::Isa::Baseline => {}
                }
            }
            body $(::<$($gen),+>)? ($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()).unwrap(), isa);
        }
        assert_eq!(Isa::parse(" AVX2 ").unwrap(), Isa::Avx2);
        let err = Isa::parse("avx1024").unwrap_err();
        assert!(err.contains("BTM_CPU_ISA") && err.contains("avx1024"), "{err}");
    }

    /// Values and gradients of every multiversioned kernel at `isa`, flattened.
    fn kernel_outputs(isa: Isa) -> Vec<Vec<f32>> {
        use crate::testing::random;
        use candle_core::{DType, Tensor, Var};
        force(Some(isa));
        let grads = |out: &Tensor, probe: &Tensor, vars: &[&Var]| -> Vec<Vec<f32>> {
            let g = (out * probe).unwrap().sum_all().unwrap().backward().unwrap();
            let mut all = vec![out.flatten_all().unwrap().to_vec1::<f32>().unwrap()];
            all.extend(vars.iter().map(|v| g.get(v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()));
            all
        };
        // Widths that are not multiples of any vector width, so every tail loop runs too.
        let x = Var::from_tensor(&random(&[37, 203], 1, DType::F32)).unwrap();
        let w = Var::from_tensor(&random(&[203], 2, DType::F32)).unwrap();
        let mut all = grads(&crate::rms_norm(&x, &w, 1e-5).unwrap(), &random(&[37, 203], 3, DType::F32), &[&x, &w]);
        let ab = Var::from_tensor(&(random(&[41, 2 * 77], 4, DType::F32) * 4.0).unwrap()).unwrap();
        all.extend(grads(&crate::swiglu_packed(&ab).unwrap(), &random(&[41, 77], 5, DType::F32), &[&ab]));
        let shape = crate::AttentionShape { heads: 4, kv_heads: 2, head_dim: 10, scale: 0.3, window: None };
        let (t, rows) = (83, 2 * 83);
        let qkv = Var::from_tensor(&random(&[rows, shape.packed_width()], 6, DType::F32)).unwrap();
        let (cos, sin) = (random(&[t, 10], 7, DType::F32), random(&[t, 10], 8, DType::F32));
        for window in [None, Some(19)] {
            let shape = crate::AttentionShape { window, ..shape };
            let out = crate::causal_attention(&qkv, t, shape, &cos, &sin).unwrap();
            all.extend(grads(&out, &random(&[rows, 40], 9, DType::F32), &[&qkv]));
        }
        force(None);
        all
    }

    /// Each path is compiled from the same source with the same operation order, so each
    /// must give the baseline's bits exactly (the `gemm` crate inside attention runs one
    /// fixed kernel family for the whole process).
    #[test]
    fn every_level_gives_the_baseline_bits_in_values_and_gradients() {
        let baseline = kernel_outputs(Isa::Baseline);
        for isa in Isa::ALL.into_iter().filter(|&isa| isa > Isa::Baseline && isa <= Isa::detected()) {
            let got = kernel_outputs(isa);
            for (i, (a, b)) in got.iter().zip(&baseline).enumerate() {
                let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "output {i} differs between {} and baseline", isa.name());
            }
        }
        println!("checked levels up to {} (gemm kernels: {})", Isa::detected().name(), gemm_kernel());
    }

    #[test]
    fn the_active_level_never_exceeds_the_processor() {
        assert!(Isa::active() <= Isa::detected());
        assert!(["avx512f", "fma", "scalar", "neon", "simd128"].contains(&gemm_kernel()) || !cfg!(target_arch = "x86_64"));
    }
}
