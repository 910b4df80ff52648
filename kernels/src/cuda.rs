//! The MoE kernels as CUDA C++ sources, compiled at run time with NVRTC through `cudarc`.
//!
//! Sources (each prefixed with `cuda/common.cuh`; no headers, so NVRTC needs nothing else):
//! - `route.cu`: the routing plan on the device (per-expert counts, offsets, a stable counting
//!   sort of the slots; `position` capacity drops), so group sizes never go to the host.
//! - `permute.cu`: permute (optionally scaled), unpermute (per token, no atomics), slot dots.
//! - `swiglu.cu`: fused SwiGLU forward and backward.
//! - `grouped_gemm.cu`: forward, dX and dW over ragged groups whose offsets stay on the device.
//! - `ops.cu`: the row kernels of the candle custom ops on CUDA (`cuda_ops/`).
//!
//! Every kernel has float32 and bfloat16 variants (`_f32`, `_bf16`) with float32 arithmetic.
//! Loading `libnvrtc`/`libcuda` is guarded by [`nvrtc_available`] / [`driver_available`],
//! which probe for the library instead of letting cudarc panic when it is missing.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

const COMMON: &str = include_str!("cuda/common.cuh");

/// One CUDA translation unit and the kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name under `src/cuda/` (e.g. `route.cu`); also the program name NVRTC reports.
    pub name: &'static str,
    /// The file's text, without the `common.cuh` prelude ([`Self::source`] adds it).
    pub body: &'static str,
    /// The `extern "C"` kernels it defines, each of which must appear in its PTX.
    pub functions: &'static [&'static str],
}

impl KernelSource {
    /// The full source handed to NVRTC: the common prelude, then the body.
    pub fn source(&self) -> String {
        format!("{COMMON}\n{}", self.body)
    }
}

/// The row kernels behind the candle custom ops on CUDA (`cuda_ops/`).
pub const OPS: KernelSource = KernelSource {
    name: "ops.cu",
    body: include_str!("cuda/ops.cu"),
    functions: &[
        "btm_gather_f32",
        "btm_combine_f32",
        "btm_slot_dots_f32",
        "btm_scale_rows_f32",
        "btm_swiglu_packed_fwd_f32",
        "btm_swiglu_packed_bwd_f32",
        "btm_gather_bf16",
        "btm_combine_bf16",
        "btm_slot_dots_bf16",
        "btm_scale_rows_bf16",
        "btm_swiglu_packed_fwd_bf16",
        "btm_swiglu_packed_bwd_bf16",
        "btm_causal_softmax_f32",
        "btm_causal_softmax_bwd_f32",
        "btm_rms_norm_f32",
        "btm_rms_norm_bwd_f32",
        "btm_nll_f32",
        "btm_nll_bwd_f32",
        "btm_causal_softmax_bf16",
        "btm_causal_softmax_bwd_bf16",
        "btm_rms_norm_bf16",
        "btm_rms_norm_bwd_bf16",
        "btm_nll_bf16",
        "btm_nll_bwd_bf16",
        "btm_column_partials",
        "btm_column_totals_f32",
        "btm_column_totals_bf16",
        "btm_adamw_moment",
        "btm_adamw_update",
    ],
};

/// Every kernel source of the crate.
pub const SOURCES: [KernelSource; 5] = [
    KernelSource {
        name: "route.cu",
        body: include_str!("cuda/route.cu"),
        functions: &["moe_route_counts", "moe_route_offsets", "moe_route_scatter"],
    },
    KernelSource {
        name: "permute.cu",
        body: include_str!("cuda/permute.cu"),
        functions: &[
            "moe_permute_f32",
            "moe_unpermute_f32",
            "moe_slot_dots_f32",
            "moe_permute_bf16",
            "moe_unpermute_bf16",
            "moe_slot_dots_bf16",
        ],
    },
    KernelSource {
        name: "swiglu.cu",
        body: include_str!("cuda/swiglu.cu"),
        functions: &["moe_swiglu_fwd_f32", "moe_swiglu_bwd_f32", "moe_swiglu_fwd_bf16", "moe_swiglu_bwd_bf16"],
    },
    KernelSource {
        name: "grouped_gemm.cu",
        body: include_str!("cuda/grouped_gemm.cu"),
        functions: &["moe_gemm_fwd_f32", "moe_gemm_dx_f32", "moe_gemm_dw_f32", "moe_gemm_fwd_bf16", "moe_gemm_dx_bf16", "moe_gemm_dw_bf16"],
    },
    OPS,
];

/// Whether `libnvrtc` can be loaded (without cudarc's panic when it cannot).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver library `libcuda` can be loaded (a GPU machine).
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Compile one source to PTX for `arch` (e.g. `compute_90` for H100/H200).
pub fn compile(src: &KernelSource, arch: &'static str) -> Result<Ptx, String> {
    if !nvrtc_available() {
        return Err("libnvrtc not found (scripts/cuda-toolkit.sh --nvrtc-only provides it)".into());
    }
    let opts = CompileOptions { arch: Some(arch), name: Some(src.name.into()), ..Default::default() };
    compile_ptx_with_opts(src.source(), opts).map_err(|e| format!("{}: {e}", src.name))
}

/// The float32 kernels loaded on one GPU, with launchers that mirror the CPU ops. Group sizes
/// and offsets stay in device memory: buffers are sized by host-known upper bounds (T·k rows).
pub mod gpu {
    use std::sync::Arc;

    use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg};

    use super::{compile, SOURCES};

    /// Threads per block of the row kernels and of the GEMM tiles (16 × 16 threads, 4 × 4 each).
    const THREADS: u32 = 256;
    /// Output tile edge of the GEMM kernels.
    const TILE: u32 = 64;
    /// Grid cap for the grid-stride kernels.
    const MAX_BLOCKS: u32 = 65_535;

    /// A routing plan on the device (see `RoutePlan`); `rows` has room for all T·k slots.
    pub struct DevicePlan {
        /// [E+1] start row of each expert's group; `offsets[E]` = N kept assignments.
        pub offsets: CudaSlice<u32>,
        /// [T·k] slot `t·k + j` of each permuted row; only the first N are written.
        pub rows: CudaSlice<u32>,
        /// [T·k] permuted row of each slot, or `DROPPED` (`u32::MAX`).
        pub slot_rows: CudaSlice<u32>,
        /// Number of tokens T.
        pub tokens: u32,
        /// Experts k per token.
        pub top_k: u32,
        /// Number of experts E.
        pub experts: u32,
    }

    /// Every kernel of [`SOURCES`] compiled and loaded on one GPU, with the launchers below.
    pub struct GpuMoe {
        /// The context's default stream, on which every copy and launch is queued in order.
        pub stream: Arc<CudaStream>,
        functions: Vec<(&'static str, CudaFunction)>,
    }

    type Res<T> = Result<T, String>;

    fn err(e: DriverError) -> String {
        format!("CUDA driver: {e:?}")
    }

    fn grid(n: u32) -> u32 {
        n.clamp(1, MAX_BLOCKS)
    }

    fn cfg(blocks: (u32, u32, u32), threads: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: blocks, block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
    }

    impl GpuMoe {
        /// Compile every kernel for `arch` (e.g. `compute_90`) and load it on GPU `ordinal`.
        /// Fails (without panicking) when libcuda or libnvrtc is missing.
        pub fn new(ordinal: usize, arch: &'static str) -> Res<Self> {
            if !super::driver_available() {
                return Err("libcuda not found: no GPU driver on this machine".into());
            }
            let ctx = CudaContext::new(ordinal).map_err(err)?;
            let mut functions = Vec::new();
            for src in &SOURCES {
                let module = ctx.load_module(compile(src, arch)?).map_err(err)?;
                for &name in src.functions {
                    functions.push((name, module.load_function(name).map_err(err)?));
                }
            }
            Ok(Self { stream: ctx.default_stream(), functions })
        }

        fn f(&self, name: &str) -> &CudaFunction {
            &self.functions.iter().find(|(n, _)| *n == name).expect("kernel listed in SOURCES").1
        }

        /// Copy host data into a new device buffer.
        pub fn upload<T: cudarc::driver::DeviceRepr>(&self, data: &[T]) -> Res<CudaSlice<T>> {
            self.stream.clone_htod(data).map_err(err)
        }

        /// Copy a device buffer into a new host vector, after the work queued before it.
        pub fn download<T: cudarc::driver::DeviceRepr>(&self, data: &CudaSlice<T>) -> Res<Vec<T>> {
            self.stream.clone_dtoh(data).map_err(err)
        }

        fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Res<CudaSlice<T>> {
            self.stream.alloc_zeros(n.max(1)).map_err(err)
        }

        /// Stable counting sort of the [T, k] expert indices by expert, on the device;
        /// `capacity` 0 = dropless, else the `position` policy.
        pub fn route_plan(&self, experts: &CudaSlice<u32>, tokens: u32, top_k: u32, num_experts: u32, capacity: u32) -> Res<DevicePlan> {
            let slots = tokens * top_k;
            let mut counts = self.zeros::<u32>(num_experts as usize)?;
            let mut offsets = self.zeros::<u32>(num_experts as usize + 1)?;
            let mut rows = self.zeros::<u32>(slots as usize)?;
            let mut slot_rows = self.zeros::<u32>(slots as usize)?;
            // SAFETY: argument lists match the kernels' signatures in route.cu; buffers are sized
            // E, E+1, T·k and T·k as the kernels index them.
            unsafe {
                let mut l = self.stream.launch_builder(self.f("moe_route_counts"));
                l.arg(experts).arg(&slots).arg(&capacity).arg(&mut counts);
                l.launch(cfg((num_experts, 1, 1), THREADS)).map_err(err)?;
                let mut l = self.stream.launch_builder(self.f("moe_route_offsets"));
                l.arg(&counts).arg(&num_experts).arg(&mut offsets);
                l.launch(cfg((1, 1, 1), 32)).map_err(err)?;
                let mut l = self.stream.launch_builder(self.f("moe_route_scatter"));
                l.arg(experts).arg(&slots).arg(&capacity).arg(&offsets).arg(&mut rows).arg(&mut slot_rows);
                l.launch(cfg((num_experts, 1, 1), THREADS)).map_err(err)?;
            }
            Ok(DevicePlan { offsets, rows, slot_rows, tokens, top_k, experts: num_experts })
        }

        /// `P[r] = X[token(r)]` into a [T·k, H] buffer (rows past N = offsets[E] stay zero).
        pub fn permute(&self, x: &CudaSlice<f32>, plan: &DevicePlan, hidden: u32) -> Res<CudaSlice<f32>> {
            let mut out = self.zeros::<f32>((plan.tokens * plan.top_k * hidden) as usize)?;
            let no_scale = 0u64;
            // SAFETY: matches moe_permute_f32 in permute.cu; a null scale means unscaled.
            unsafe {
                let mut l = self.stream.launch_builder(self.f("moe_permute_f32"));
                l.arg(x).arg(&no_scale).arg(&plan.rows).arg(&plan.offsets).arg(&plan.experts);
                l.arg(&plan.top_k).arg(&hidden).arg(&mut out);
                l.launch(cfg((grid(plan.tokens * plan.top_k), 1, 1), THREADS)).map_err(err)?;
            }
            Ok(out)
        }

        /// `Y[t] = Σ_j w[t,j] · P[row(t,j)]` (weights `None`: unweighted).
        pub fn unpermute(
            &self,
            p: &CudaSlice<f32>,
            weights: Option<&CudaSlice<f32>>,
            plan: &DevicePlan,
            hidden: u32,
        ) -> Res<CudaSlice<f32>> {
            let mut out = self.zeros::<f32>((plan.tokens * hidden) as usize)?;
            let null = 0u64;
            // SAFETY: matches moe_unpermute_f32 in permute.cu.
            unsafe {
                let mut l = self.stream.launch_builder(self.f("moe_unpermute_f32"));
                l.arg(p);
                match weights {
                    Some(w) => l.arg(w),
                    None => l.arg(&null),
                };
                l.arg(&plan.slot_rows).arg(&plan.tokens).arg(&plan.top_k).arg(&hidden).arg(&mut out);
                l.launch(cfg((grid(plan.tokens), 1, 1), THREADS)).map_err(err)?;
            }
            Ok(out)
        }

        /// Grouped `Y_e = X_e · W_eᵀ` (X [T·k, K] permuted rows, W [E, M, K]) → [T·k, M].
        pub fn gemm_forward(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, plan: &DevicePlan, m: u32, k: u32) -> Res<CudaSlice<f32>> {
            self.gemm_rows("moe_gemm_fwd_f32", x, w, plan, m, k, m)
        }

        /// Grouped `dX_e = dY_e · W_e` → [T·k, K].
        pub fn gemm_input_grad(&self, dy: &CudaSlice<f32>, w: &CudaSlice<f32>, plan: &DevicePlan, m: u32, k: u32) -> Res<CudaSlice<f32>> {
            self.gemm_rows("moe_gemm_dx_f32", dy, w, plan, m, k, k)
        }

        #[allow(clippy::too_many_arguments)]
        fn gemm_rows(
            &self,
            name: &str,
            a: &CudaSlice<f32>,
            w: &CudaSlice<f32>,
            plan: &DevicePlan,
            m: u32,
            k: u32,
            cols: u32,
        ) -> Res<CudaSlice<f32>> {
            let n_max = plan.tokens * plan.top_k;
            let mut out = self.zeros::<f32>((n_max * cols) as usize)?;
            let blocks = (cols.div_ceil(TILE), n_max.div_ceil(TILE) + plan.experts, 1);
            // SAFETY: matches moe_gemm_fwd_f32 / moe_gemm_dx_f32 in grouped_gemm.cu.
            unsafe {
                let mut l = self.stream.launch_builder(self.f(name));
                l.arg(a).arg(w).arg(&plan.offsets).arg(&plan.experts).arg(&m).arg(&k).arg(&mut out);
                l.launch(cfg(blocks, THREADS)).map_err(err)?;
            }
            Ok(out)
        }

        /// Grouped `dW_e = dY_eᵀ · X_e` → [E, M, K].
        pub fn gemm_weight_grad(&self, dy: &CudaSlice<f32>, x: &CudaSlice<f32>, plan: &DevicePlan, m: u32, k: u32) -> Res<CudaSlice<f32>> {
            let mut out = self.zeros::<f32>((plan.experts * m * k) as usize)?;
            // SAFETY: matches moe_gemm_dw_f32 in grouped_gemm.cu.
            unsafe {
                let mut l = self.stream.launch_builder(self.f("moe_gemm_dw_f32"));
                l.arg(dy).arg(x).arg(&plan.offsets).arg(&m).arg(&k).arg(&mut out);
                l.launch(cfg((k.div_ceil(TILE), m.div_ceil(TILE), plan.experts), THREADS)).map_err(err)?;
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo test -p btm-kernels --features nvrtc nvrtc` — a CUDA syntax error fails it.
    #[test]
    fn nvrtc_compiles_every_kernel() {
        if !nvrtc_available() {
            assert!(std::env::var("BTM_REQUIRE_NVRTC").as_deref() != Ok("1"), "BTM_REQUIRE_NVRTC=1 but libnvrtc was not found");
            eprintln!(
                "SKIPPED nvrtc_compiles_every_kernel: libnvrtc not found; run \
                 `eval \"$(scripts/cuda-toolkit.sh --nvrtc-only)\"` first"
            );
            return;
        }
        for src in &SOURCES {
            let ptx = compile(src, "compute_90").unwrap_or_else(|e| panic!("{e}"));
            let text = ptx.to_src();
            for f in src.functions {
                assert!(text.contains(&format!(".entry {f}(")), "{}: no kernel `{f}` in the PTX", src.name);
            }
            let entries = text.matches(".entry ").count();
            assert_eq!(entries, src.functions.len(), "{}: kernels in the PTX vs listed", src.name);
        }
    }

    /// On a GPU machine: the device kernels against the CPU ops (skips elsewhere).
    #[test]
    fn gpu_kernels_match_the_cpu_ops() {
        use crate::permute::{permute, unpermute, RoutePlan};
        use crate::{grouped_matmul, testing::random};
        use candle_core::{DType, Device, Tensor};
        use std::sync::Arc;

        if !driver_available() || !nvrtc_available() {
            eprintln!("SKIPPED gpu_kernels_match_the_cpu_ops: needs libcuda (a GPU) and libnvrtc");
            return;
        }
        let gpu = gpu::GpuMoe::new(0, "compute_90").expect("load kernels");
        let (t, k, e, h, m) = (300usize, 2usize, 5usize, 70usize, 90usize);
        // Expert 3 gets nothing.
        let experts: Vec<u32> = (0..t * k).map(|s| [0u32, 1, 2, 4][(s * 7 + s / 5) % 4]).collect();
        let cpu_plan = Arc::new(RoutePlan::new(&experts, k, e, None).unwrap());
        let plan = gpu.route_plan(&gpu.upload(&experts).unwrap(), t as u32, k as u32, e as u32, 0).unwrap();
        assert_eq!(gpu.download(&plan.offsets).unwrap(), cpu_plan.offsets());
        assert_eq!(gpu.download(&plan.rows).unwrap(), cpu_plan.rows());
        assert_eq!(gpu.download(&plan.slot_rows).unwrap(), cpu_plan.slot_rows());

        let vec = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let close = |got: &[f32], want: &[f32], what: &str| {
            let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
            let err = got.iter().zip(want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(err <= 1e-4 * scale, "{what}: max error {err} (scale {scale})");
        };
        let x = random(&[t, h], 1, DType::F32);
        let w = random(&[e, m, h], 2, DType::F32);
        let wts = random(&[t, k], 3, DType::F32);
        let (xd, wd, wtd) = (gpu.upload(&vec(&x)).unwrap(), gpu.upload(&vec(&w)).unwrap(), gpu.upload(&vec(&wts)).unwrap());
        let n = cpu_plan.kept();
        let xp = gpu.permute(&xd, &plan, h as u32).unwrap();
        let xp_cpu = permute(&x, &cpu_plan).unwrap();
        assert_eq!(&gpu.download(&xp).unwrap()[..n * h], vec(&xp_cpu).as_slice());

        let off = cpu_plan.offsets_tensor(&Device::Cpu).unwrap();
        let y = gpu.gemm_forward(&xp, &wd, &plan, m as u32, h as u32).unwrap();
        let y_cpu = grouped_matmul(&xp_cpu, &w, &off).unwrap();
        close(&gpu.download(&y).unwrap()[..n * m], &vec(&y_cpu), "gemm forward");
        let dx = gpu.gemm_input_grad(&y, &wd, &plan, m as u32, h as u32).unwrap();
        let dw = gpu.gemm_weight_grad(&y, &xp, &plan, m as u32, h as u32).unwrap();
        let dw_cpu: Vec<f32> = (0..e)
            .flat_map(|g| {
                let (s, r) = (cpu_plan.offsets()[g] as usize, cpu_plan.group_sizes()[g]);
                if r == 0 {
                    return vec![0f32; m * h];
                }
                let yg = y_cpu.narrow(0, s, r).unwrap();
                vec(&yg.t().unwrap().matmul(&xp_cpu.narrow(0, s, r).unwrap()).unwrap())
            })
            .collect();
        close(&gpu.download(&dw).unwrap(), &dw_cpu, "gemm weight grad");
        let dx_want: Vec<f32> = (0..e)
            .flat_map(|g| {
                let (s, r) = (cpu_plan.offsets()[g] as usize, cpu_plan.group_sizes()[g]);
                if r == 0 {
                    return Vec::new();
                }
                vec(&y_cpu.narrow(0, s, r).unwrap().matmul(&w.get(g).unwrap()).unwrap())
            })
            .collect();
        close(&gpu.download(&dx).unwrap()[..n * h], &dx_want, "gemm input grad");

        let out = gpu.unpermute(&y, Some(&wtd), &plan, m as u32).unwrap();
        close(&gpu.download(&out).unwrap(), &vec(&unpermute(&y_cpu, &wts, &cpu_plan).unwrap()), "unpermute");
    }
}
