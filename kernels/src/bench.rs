//! `btm bench moe`: one MoE layer forward + backward, fused vs the reference loop over experts.
//!
//! Each case builds random weights (router [E,H], per-expert SwiGLU weights for the reference,
//! the same values stacked for the fused layer), then times `y = layer(x)` and
//! `(y · probe).sum().backward()` with gradients for x, the router and every expert weight.
//! Fused and reference runs alternate (one warm-up each, then `reps` timed pairs), so a change
//! in machine load hits both paths alike; the figures are medians. Besides wall time, the
//! process CPU time of each run is reported (Linux), which busy neighbours distort less.
//!
//! Two rates put the speedup in context: each path's GFLOP/s (the layer's matrix-multiply FLOPs
//! over its wall time; no path can beat the machine's GEMM peak, so a reference already near it
//! bounds the possible speedup), and the grouped GEMM alone against one dense GEMM of the same
//! FLOPs measured in the same run (the upcycling issue's GPU target: ≥ 60 % of cuBLAS).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use serde::Serialize;

use crate::moe::{fused_moe, reference_moe, ExpertRef, ExpertWeights, MoeOptions};
use crate::router::Routing;

/// One MoE shape: E experts, top-k, expert FFN width F.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MoeCase {
    /// Number E of routed experts.
    pub experts: usize,
    /// Experts k each token is sent to.
    pub top_k: usize,
    /// Width F of each expert's SwiGLU.
    pub ffn: usize,
}

impl MoeCase {
    /// Matrix-multiply FLOPs of one MoE layer forward + backward on `tokens` × `hidden` inputs:
    /// each of the T·k assignments runs three H×F products forward (gate, up, down: 6·H·F) and
    /// twice that backward (dX and dW), plus the router's T×H×E product (forward, dX, dW).
    /// Element-wise work (SwiGLU, permute, softmax) is left out: it is not what bounds the layer.
    pub fn flops(&self, tokens: usize, hidden: usize) -> f64 {
        let (t, h) = (tokens as f64, hidden as f64);
        let (e, k, f) = (self.experts as f64, self.top_k as f64, self.ffn as f64);
        18.0 * t * k * h * f + 6.0 * t * h * e
    }
}

/// The shapes: (8, 2, 2816) and the fine-grained (64, 8, 352).
pub const DEFAULT_CASES: [MoeCase; 2] = [MoeCase { experts: 8, top_k: 2, ffn: 2816 }, MoeCase { experts: 64, top_k: 8, ffn: 352 }];

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct MoeBenchSpec {
    /// Tokens T per layer call (rows of the input).
    pub tokens: usize,
    /// Width H of each token's hidden state.
    pub hidden: usize,
    /// The MoE shapes to time, one result each.
    pub cases: Vec<MoeCase>,
    /// Timed runs per path (the median is reported), after one warm-up run.
    pub reps: usize,
    /// Also time the reference loop (the slow part); false = fused only.
    pub reference: bool,
    /// Element type of inputs and weights: float32, or bfloat16 (CUDA; the router stays
    /// float32 inside the layer either way).
    #[serde(skip)]
    pub dtype: DType,
    /// The device's dense peak in TFLOP/s for the model FLOPs utilisation (GPU runs).
    pub peak_tflops: Option<f64>,
}

impl Default for MoeBenchSpec {
    /// T = 4096 (the CPU target), hidden 1024, both issue shapes, 3 reps.
    fn default() -> Self {
        Self { tokens: 4096, hidden: 1024, cases: DEFAULT_CASES.to_vec(), reps: 3, reference: true, dtype: DType::F32, peak_tflops: None }
    }
}

/// One case's figures.
#[derive(Debug, Clone, Serialize)]
pub struct MoeBenchResult {
    /// The shape timed (its fields appear at the top level in JSON).
    #[serde(flatten)]
    pub case: MoeCase,
    /// Tokens T per layer call, from the spec.
    pub tokens: usize,
    /// Hidden width H, from the spec.
    pub hidden: usize,
    /// Element type of the run (`"f32"` or `"bf16"`).
    pub dtype: &'static str,
    /// How the grouped products ran: `cpu_tiles` (the `gemm` crate, tile by tile), or on CUDA
    /// `cublas_grouped` (one `cublasGemmGroupedBatchedEx`) or `cublas_looped` (one
    /// `cublasGemmEx` per group).
    pub grouped_gemm_path: &'static str,
    /// `"cpu"`, or the GPU's location as candle prints it.
    pub device: String,
    /// Threads in rayon's pool during the run.
    pub threads: usize,
    /// The processor, instruction set and GEMM kernels (CPU runs).
    pub cpu: crate::isa::CpuInfo,
    /// Median forward + backward wall milliseconds of the fused layer.
    pub fused_ms: f64,
    /// Tokens per second through the fused layer, forward and backward.
    pub tokens_per_s: f64,
    /// The fused layer's FLOP/s over `peak_tflops` (GPU runs given a peak).
    pub mfu: Option<f64>,
    /// The peak it is taken against, TFLOP/s.
    pub peak_tflops: Option<f64>,
    /// The device memory pool's high-water mark over one fused forward + backward, MiB (CUDA).
    pub peak_device_memory_mb: Option<f64>,
    /// Median forward + backward wall milliseconds of the reference loop.
    pub reference_ms: Option<f64>,
    /// reference_ms / fused_ms.
    pub speedup: Option<f64>,
    /// Matrix-multiply FLOPs of one forward + backward ([`MoeCase::flops`]), the same for both paths.
    pub flops: f64,
    /// flops / fused wall time, in GFLOP/s: how close the fused layer runs to the machine's peak,
    /// which bounds any speedup (the reference can be beaten by at most peak / its GFLOP/s).
    pub fused_gflops: f64,
    /// flops / reference wall time, in GFLOP/s; `None` when the reference was not run.
    pub reference_gflops: Option<f64>,
    /// The grouped GEMM alone (forward of the gate projection: T·k rows over E equal groups,
    /// [T·k, H] · W_e [F, H]ᵀ) next to one dense matmul of the same FLOPs ([T·k, H] · [H, F],
    /// candle's own: the `gemm` crate on CPU, cuBLAS on CUDA), both in GFLOP/s, and their ratio:
    /// how much of the machine's best dense GEMM rate the ragged one keeps.
    pub grouped_gemm_gflops: f64,
    /// The dense matmul of the same FLOPs, in GFLOP/s (see `grouped_gemm_gflops`).
    pub dense_gemm_gflops: f64,
    /// grouped_gemm_gflops / dense_gemm_gflops.
    pub grouped_vs_dense: f64,
    /// Median process CPU milliseconds (all threads) per run, where the OS reports it.
    pub fused_cpu_ms: Option<f64>,
    /// The same for the reference loop; `None` when it was not run or the OS does not report it.
    pub reference_cpu_ms: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU time used by this process so far, in milliseconds (Linux: utime + stime of
/// /proc/self/stat, in clock ticks of 10 ms); `None` elsewhere.
fn process_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 10.0)
}

/// Wall and CPU milliseconds of one run.
fn measure(run: &mut dyn FnMut() -> Result<()>) -> Result<(f64, Option<f64>)> {
    let (start, cpu0) = (Instant::now(), process_cpu_ms());
    run()?;
    let cpu = process_cpu_ms().zip(cpu0).map(|(b, a)| b - a);
    Ok((start.elapsed().as_secs_f64() * 1e3, cpu))
}

/// Median (wall, CPU) milliseconds of each closure, run alternately after one warm-up each.
fn time_alternating(reps: usize, runs: &mut [&mut dyn FnMut() -> Result<()>]) -> Result<Vec<(f64, Option<f64>)>> {
    for run in runs.iter_mut() {
        run()?; // warm-up: first-touch allocations, thread pool start
    }
    let mut samples: Vec<Vec<(f64, Option<f64>)>> = vec![Vec::new(); runs.len()];
    for _ in 0..reps.max(1) {
        for (run, out) in runs.iter_mut().zip(samples.iter_mut()) {
            out.push(measure(*run)?);
        }
    }
    Ok(samples
        .into_iter()
        .map(|s| {
            let cpu: Option<Vec<f64>> = s.iter().map(|x| x.1).collect();
            (median(s.iter().map(|x| x.0).collect()), cpu.map(median))
        })
        .collect())
}

/// Median GFLOP/s of (the grouped GEMM, one dense GEMM of the same FLOPs) for `case`.
fn gemm_rates(spec: &MoeBenchSpec, case: MoeCase, device: &Device) -> Result<(f64, f64)> {
    let (rows, h, e, f) = (spec.tokens * case.top_k, spec.hidden, case.experts, case.ffn);
    let x = Tensor::randn(0f32, 1.0, (rows, h), device)?.to_dtype(spec.dtype)?;
    let w = Tensor::randn(0f32, 1.0 / (h as f32).sqrt(), (e, f, h), device)?.to_dtype(spec.dtype)?;
    // Equal groups (the last takes the remainder): the shape a balanced router produces.
    let offsets: Vec<u32> = (0..=e).map(|i| if i == e { rows } else { i * (rows / e) } as u32).collect();
    let offsets = Tensor::new(offsets.as_slice(), device)?;
    let dense_w = Tensor::randn(0f32, 1.0 / (h as f32).sqrt(), (h, f), device)?.to_dtype(spec.dtype)?;
    // Synchronize so a GPU's asynchronous launches are timed to completion.
    let mut grouped = || {
        let y = crate::grouped_gemm::grouped_matmul(&x, &w, &offsets)?;
        device.synchronize().map(|_| drop(y))
    };
    let mut dense = || {
        let y = x.matmul(&dense_w)?;
        device.synchronize().map(|_| drop(y))
    };
    let t = time_alternating(spec.reps, &mut [&mut grouped, &mut dense])?;
    let flops = 2.0 * (rows * h * f) as f64;
    Ok((flops / (t[0].0 * 1e6), flops / (t[1].0 * 1e6)))
}

/// Run one case on `device` in `spec.dtype`.
pub fn bench_case(spec: &MoeBenchSpec, case: MoeCase, device: &Device) -> Result<MoeBenchResult> {
    let (t, h, e, f) = (spec.tokens, spec.hidden, case.experts, case.ffn);
    let randn = |dims: (usize, usize), fan_in: usize| -> Result<Var> {
        Var::from_tensor(&Tensor::randn(0f32, 1.0 / (fan_in as f32).sqrt(), dims, device)?.to_dtype(spec.dtype)?)
    };
    let x = randn((t, h), 1)?;
    let router = randn((e, h), h)?;
    let mut per_expert = Vec::with_capacity(e);
    for _ in 0..e {
        per_expert.push((randn((f, h), h)?, randn((f, h), h)?, randn((h, f), f)?));
    }
    let stack = |pick: fn(&(Var, Var, Var)) -> &Var| -> Result<Tensor> {
        let parts: Vec<&Tensor> = per_expert.iter().map(|v| pick(v).as_tensor()).collect();
        Ok(Var::from_tensor(&Tensor::stack(&parts, 0)?)?.as_tensor().clone())
    };
    let stacked = ExpertWeights::new(&stack(|v| &v.0)?, &stack(|v| &v.1)?, &stack(|v| &v.2)?)?;
    let probe = Tensor::randn(0f32, 1.0, (t, h), device)?.to_dtype(spec.dtype)?;
    let opts = MoeOptions { top_k: case.top_k, routing: Routing::SoftmaxThenTopk, capacity: None };

    let mut fused = || -> Result<()> {
        let (y, _) = fused_moe(&x, &router, &stacked, &opts)?;
        (y * &probe)?.sum_all()?.backward().map(drop)?;
        device.synchronize()
    };
    let refs: Vec<ExpertRef> = per_expert.iter().map(|(g, u, d)| (g.as_tensor(), u.as_tensor(), d.as_tensor())).collect();
    let mut reference = || -> Result<()> {
        let (y, _) = reference_moe(&x, &router, &refs, &opts)?;
        (y * &probe)?.sum_all()?.backward().map(drop)?;
        device.synchronize()
    };
    let peak_device_memory_mb = peak_memory_of(device, &mut fused)?;
    let (fused, reference) = if spec.reference {
        let t = time_alternating(spec.reps, &mut [&mut fused, &mut reference])?;
        (t[0], Some(t[1]))
    } else {
        (time_alternating(spec.reps, &mut [&mut fused])?[0], None)
    };
    let (fused_ms, fused_cpu_ms) = fused;
    let flops = case.flops(t, h);
    let gflops = |ms: f64| flops / (ms * 1e6);
    let (grouped_gemm_gflops, dense_gemm_gflops) = gemm_rates(spec, case, device)?;
    Ok(MoeBenchResult {
        case,
        tokens: t,
        hidden: h,
        dtype: if spec.dtype == DType::BF16 { "bf16" } else { "f32" },
        grouped_gemm_path: grouped_gemm_path(device),
        device: if device.is_cpu() { "cpu".into() } else { format!("{:?}", device.location()) },
        threads: rayon::current_num_threads(),
        cpu: crate::isa::CpuInfo::current(),
        fused_ms,
        tokens_per_s: t as f64 / (fused_ms / 1e3),
        mfu: spec.peak_tflops.filter(|_| !device.is_cpu()).map(|peak| gflops(fused_ms) / (peak * 1e3)),
        peak_tflops: spec.peak_tflops.filter(|_| !device.is_cpu()),
        peak_device_memory_mb,
        reference_ms: reference.map(|r| r.0),
        speedup: reference.map(|r| r.0 / fused_ms),
        flops,
        fused_gflops: gflops(fused_ms),
        reference_gflops: reference.map(|r| gflops(r.0)),
        grouped_gemm_gflops,
        dense_gemm_gflops,
        grouped_vs_dense: grouped_gemm_gflops / dense_gemm_gflops,
        fused_cpu_ms,
        reference_cpu_ms: reference.and_then(|r| r.1),
    })
}

/// The device memory pool's high-water mark over one run of `run`, in MiB (`None` off CUDA).
fn peak_memory_of(device: &Device, run: &mut dyn FnMut() -> Result<()>) -> Result<Option<f64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        run()?;
        crate::cuda_ops::reset_peak_memory(d)?;
        run()?;
        return Ok(Some(crate::cuda_ops::peak_memory(d)? as f64 / (1u64 << 20) as f64));
    }
    let _ = (device, run);
    Ok(None)
}

/// How the grouped products ran on `device` (see [`MoeBenchResult::grouped_gemm_path`]).
fn grouped_gemm_path(device: &Device) -> &'static str {
    if device.is_cpu() {
        return "cpu_tiles";
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return match crate::cuda_ops::gemm_path() {
            crate::cuda_ops::GemmPath::Grouped => "cublas_grouped",
            crate::cuda_ops::GemmPath::Looped => "cublas_looped",
            crate::cuda_ops::GemmPath::None => "none",
        };
    }
    "none"
}

/// Run every case of `spec`, calling `report` after each (for progress output).
pub fn bench_moe(spec: &MoeBenchSpec, device: &Device, mut report: impl FnMut(&MoeBenchResult)) -> Result<Vec<MoeBenchResult>> {
    let mut out = Vec::new();
    for &case in &spec.cases {
        let r = bench_case(spec, case, device)?;
        report(&r);
        out.push(r);
    }
    Ok(out)
}

/// One human-readable line for a result.
pub fn format_result(r: &MoeBenchResult) -> String {
    let cpu = |ms: Option<f64>| ms.map_or(String::new(), |c| format!(" (cpu {c:.0} ms)"));
    let reference = match (r.reference_ms, r.speedup) {
        (Some(ms), Some(s)) => format!(
            "  reference {ms:9.1} ms{} {:6.1} GFLOP/s  speedup {s:5.2}x",
            cpu(r.reference_cpu_ms),
            r.reference_gflops.unwrap_or(0.0)
        ),
        _ => String::new(),
    };
    format!(
        "moe T={} H={} E={} k={} F={} {} {} ({} threads): fused {:9.1} ms{} {:6.1} GFLOP/s{reference}\n  \
         fused {:.0} tokens/s{}{}; grouped GEMM ({}) {:6.1} GFLOP/s vs one dense GEMM of the same FLOPs {:6.1} GFLOP/s ({:.0} %)",
        r.tokens,
        r.hidden,
        r.case.experts,
        r.case.top_k,
        r.case.ffn,
        r.dtype,
        r.device,
        r.threads,
        r.fused_ms,
        cpu(r.fused_cpu_ms),
        r.fused_gflops,
        r.tokens_per_s,
        r.mfu.map_or(String::new(), |m| format!(", MFU {:.1} % of {} TFLOP/s", 100.0 * m, r.peak_tflops.unwrap_or(0.0))),
        r.peak_device_memory_mb.map_or(String::new(), |m| format!(", peak device memory {m:.0} MiB")),
        r.grouped_gemm_path,
        r.grouped_gemm_gflops,
        r.dense_gemm_gflops,
        100.0 * r.grouped_vs_dense
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_bench_runs_and_reports_both_paths() {
        let case = MoeCase { experts: 4, top_k: 2, ffn: 8 };
        let spec =
            MoeBenchSpec { tokens: 32, hidden: 16, cases: vec![case], reps: 1, reference: true, dtype: DType::F32, peak_tflops: Some(1.0) };
        let mut lines = Vec::new();
        let results = bench_moe(&spec, &Device::Cpu, |r| lines.push(format_result(r))).unwrap();
        assert_eq!(results.len(), 1);
        assert!(results[0].fused_ms > 0.0 && results[0].reference_ms.unwrap() > 0.0);
        assert!(lines[0].contains("E=4 k=2 F=8") && lines[0].contains("GFLOP/s"), "{}", lines[0]);
        assert!(lines[0].contains("grouped GEMM") && results[0].grouped_vs_dense > 0.0, "{}", lines[0]);
        // 18·T·k·H·F + 6·T·H·E = 18·32·2·16·8 + 6·32·16·4
        assert_eq!(results[0].flops, 147456.0 + 12288.0);
        let json = serde_json::to_string(&results[0]).unwrap();
        assert!(json.contains("\"experts\":4") && json.contains("\"speedup\":"), "{json}");
        // 32 tokens in the median fused run; no MFU or device memory on the CPU.
        assert!((results[0].tokens_per_s * results[0].fused_ms / 1e3 - 32.0).abs() < 1e-6);
        assert!(results[0].mfu.is_none() && results[0].peak_device_memory_mb.is_none());
    }
}
