//! A whole MoE layer of SwiGLU experts, fused, plus the plain loop it is checked against.
//!
//! For token rows X [T, H], router weight R [E, H] and stacked expert weights
//! gate_up [E, 2F, H] (each expert's gate rows, then its up rows) and down [E, H, F]
//! (`nn.Linear` layouts), with the N kept assignments grouped by expert (row r belongs to
//! token t(r) and expert e(r)):
//!
//! ```text
//! logits = X·Rᵀ (float32)  → route: top-k experts and weights w [T, k]; capacity → kept rows
//! [A | B][r] = X[t(r)] · gate_up_eᵀ                       gather_matmul   [N, 2F]
//! Hh[r] = w[r] · silu(A[r]) ⊙ B[r]                        swiglu_packed, scale_rows
//! Y[t]  = Σ_{r of t} Hh[r] · down_eᵀ                      matmul_combine  [T, H]
//! ```
//!
//! which equals the reference `Y[t] = Σ_j w[t,j] · down_e(silu(gate_e x_t) ⊙ up_e x_t)`.
//! The permutation is fused into the grouped GEMMs (rows are gathered tile by tile), so no
//! [N, H] tensor (N = T·k) is kept for the backward pass. Every step is a differentiable op:
//! `loss.backward()` reaches X, R (through w) and all expert weights. Dropped assignments
//! contribute nothing and get no gradient. Gate and up share one product so that X is gathered
//! once and its gradient is one product and one scatter, not two of each.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use crate::grouped_gemm::{gather_matmul, matmul_combine};
use crate::permute::{scale_rows, RoutePlan, DROPPED};
use crate::router::{route, Capacity, Routed, Routing};
use crate::swiglu::swiglu_packed;

/// How an MoE layer routes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeOptions {
    /// Experts k each token is sent to (1..=E).
    pub top_k: usize,
    /// The order of top-k selection and softmax.
    pub routing: Routing,
    /// `None` = dropless.
    pub capacity: Option<Capacity>,
}

/// All experts' SwiGLU weights, stacked: gate_up [E, 2F, H] (expert e's gate rows, then its up
/// rows) and down [E, H, F].
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// [E, 2F, H]: expert e's F gate rows, then its F up rows (`nn.Linear` layout).
    pub gate_up: Tensor,
    /// [E, H, F]: each expert's down projection (`nn.Linear` layout).
    pub down: Tensor,
}

impl ExpertWeights {
    /// From stacked gate and up [E, F, H] and down [E, H, F]. Differentiable.
    pub fn new(gate: &Tensor, up: &Tensor, down: &Tensor) -> Result<Self> {
        let (e, f, h) = gate.dims3()?;
        if up.dims() != [e, f, h] || down.dims() != [e, h, f] {
            candle_core::bail!(
                "expert weights: gate {:?}, up {:?}, down {:?} (expected [E,F,H], [E,F,H], [E,H,F])",
                gate.dims(),
                up.dims(),
                down.dims()
            );
        }
        Ok(Self { gate_up: Tensor::cat(&[gate, up], 1)?, down: down.clone() })
    }

    /// Stack per-expert (gate [F,H], up [F,H], down [H,F]) weights. Differentiable (gradients
    /// flow back to the per-expert tensors); it copies every weight once per call.
    pub fn stack(experts: &[ExpertRef]) -> Result<Self> {
        let Some(&(gate0, _, _)) = experts.first() else {
            candle_core::bail!("expert weights: no experts");
        };
        let (f, h) = gate0.dims2()?;
        // [gate_0; up_0; gate_1; up_1; …] in one copy, viewed as [E, 2F, H].
        let gate_up: Vec<&Tensor> = experts.iter().flat_map(|e| [e.0, e.1]).collect();
        let down: Vec<&Tensor> = experts.iter().map(|e| e.2).collect();
        for (i, &(g, u, d)) in experts.iter().enumerate() {
            if g.dims() != [f, h] || u.dims() != [f, h] || d.dims() != [h, f] {
                candle_core::bail!(
                    "expert {i}: gate {:?}, up {:?}, down {:?} (expected [{f}, {h}], [{f}, {h}], [{h}, {f}])",
                    g.dims(),
                    u.dims(),
                    d.dims()
                );
            }
        }
        Ok(Self { gate_up: Tensor::cat(&gate_up, 0)?.reshape((experts.len(), 2 * f, h))?, down: Tensor::stack(&down, 0)? })
    }

    /// (E, F, H), after checking the two shapes agree.
    pub fn dims(&self) -> Result<(usize, usize, usize)> {
        let (e, two_f, h) = self.gate_up.dims3()?;
        let f = two_f / 2;
        if !two_f.is_multiple_of(2) || self.down.dims() != [e, h, f] {
            candle_core::bail!(
                "expert weights: gate_up {:?}, down {:?} (expected [E,2F,H], [E,H,F])",
                self.gate_up.dims(),
                self.down.dims()
            );
        }
        Ok((e, f, h))
    }
}

/// What the router did in one forward pass.
#[derive(Debug, Clone)]
pub struct RouterStats {
    /// [T, E] router logits, float32 (float64 for float64 inputs).
    pub logits: Tensor,
    /// The top-k choice and weights for every token, before the capacity limit drops any.
    pub routed: Routed,
    /// Which assignments were kept and where they went.
    pub plan: Arc<RoutePlan>,
}

impl RouterStats {
    /// Switch load-balancing loss `E · Σ_i f_i · P_i` over the router's choices (before drops).
    pub fn load_balancing_loss(&self) -> Result<Tensor> {
        crate::load_balancing_loss(&self.routed.probs, &self.routed.experts)
    }
    /// Router z-loss `mean(logsumexp(logits)²)`.
    pub fn z_loss(&self) -> Result<Tensor> {
        crate::z_loss(&self.logits)
    }
    /// Kept assignments per expert.
    pub fn tokens_per_expert(&self) -> Vec<usize> {
        self.plan.group_sizes()
    }
    /// Assignments dropped by the capacity limit.
    pub fn dropped(&self) -> usize {
        self.plan.dropped()
    }
}

/// Router logits in float32 (float64 for float64 inputs), routing, and the capacity decision.
pub fn route_tokens(x: &Tensor, router: &Tensor, opts: &MoeOptions) -> Result<RouterStats> {
    let e = router.dim(0)?;
    let dtype = if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let logits = x.to_dtype(dtype)?.matmul(&router.to_dtype(dtype)?.t()?)?;
    let routed = route(&logits, opts.top_k, opts.routing)?;
    let experts = routed.experts.flatten_all()?.to_vec1::<u32>()?;
    let keep = match opts.capacity {
        None => None,
        Some(cap) => {
            let weights = routed.weights.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            Some(cap.keep_mask(&experts, &weights, opts.top_k, e))
        }
    };
    let plan = Arc::new(RoutePlan::new(&experts, opts.top_k, e, keep.as_deref())?);
    Ok(RouterStats { logits, routed, plan })
}

/// The experts' compute dtype for inputs `x`: float64 stays float64 (gradient checks); on CUDA
/// bfloat16 stays bfloat16 (tensor-core GEMMs, float32 accumulation); everything else runs in
/// float32.
fn compute_dtype(x: &Tensor) -> DType {
    match x.dtype() {
        DType::F64 => DType::F64,
        DType::BF16 if x.device().is_cuda() => DType::BF16,
        _ => DType::F32,
    }
}

/// The fused MoE layer: `x` [T, H] (any float dtype; computed as [`compute_dtype`] says),
/// router [E, H], stacked experts. Returns y [T, H] in `x`'s dtype and the router's record.
pub fn fused_moe(x: &Tensor, router: &Tensor, experts: &ExpertWeights, opts: &MoeOptions) -> Result<(Tensor, RouterStats)> {
    let (_, h) = x.dims2()?;
    let (e, _, hw) = experts.dims()?;
    if hw != h || router.dims() != [e, h] {
        candle_core::bail!("fused_moe: x {:?}, router {:?}, experts [{e}, _, {hw}]", x.dims(), router.dims());
    }
    let stats = route_tokens(x, router, opts)?;
    let dtype = compute_dtype(x);
    let plan = &stats.plan;
    let xc = x.to_dtype(dtype)?;
    let gate_up = gather_matmul(&xc, &experts.gate_up.to_dtype(dtype)?, plan)?;
    let hidden = scale_rows(&swiglu_packed(&gate_up)?, &stats.routed.weights.to_dtype(dtype)?, plan)?;
    let y = matmul_combine(&hidden, &experts.down.to_dtype(dtype)?, plan)?;
    Ok((y.to_dtype(x.dtype())?, stats))
}

/// One SwiGLU expert of the reference path: gate, up [F, H], down [H, F].
pub type ExpertRef<'a> = (&'a Tensor, &'a Tensor, &'a Tensor);

/// The reference MoE layer: the model's loop over experts (`index_select`, three matmuls,
/// `index_add`), with the same routing and capacity decision as [`fused_moe`].
pub fn reference_moe(x: &Tensor, router: &Tensor, experts: &[ExpertRef], opts: &MoeOptions) -> Result<(Tensor, RouterStats)> {
    let stats = route_tokens(x, router, opts)?;
    let k = opts.top_k;
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); experts.len()];
    let mut slots: Vec<Vec<u32>> = vec![Vec::new(); experts.len()];
    let assignments = stats.routed.experts.flatten_all()?.to_vec1::<u32>()?;
    for (slot, &e) in assignments.iter().enumerate() {
        if stats.plan.slot_rows()[slot] != DROPPED {
            tokens[e as usize].push((slot / k) as u32);
            slots[e as usize].push(slot as u32);
        }
    }
    let weights = stats.routed.weights.flatten_all()?;
    let mut out = x.zeros_like()?;
    for (e, &(gate, up, down)) in experts.iter().enumerate() {
        if tokens[e].is_empty() {
            continue;
        }
        let n = tokens[e].len();
        let token_idx = Tensor::from_slice(&tokens[e], n, x.device())?;
        let slot_idx = Tensor::from_slice(&slots[e], n, x.device())?;
        let xe = x.index_select(&token_idx, 0)?;
        let h = (xe.matmul(&gate.t()?)?.silu()? * xe.matmul(&up.t()?)?)?;
        let y = h.matmul(&down.t()?)?;
        let w = weights.index_select(&slot_idx, 0)?.to_dtype(y.dtype())?.unsqueeze(1)?;
        out = out.index_add(&token_idx, &y.broadcast_mul(&w)?, 0)?;
    }
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::DropPolicy;
    use crate::testing::{assert_close, finite_difference_check, random};
    use candle_core::{Device, Var};

    struct Layer {
        x: Var,
        router: Var,
        gate: Vec<Var>,
        up: Vec<Var>,
        down: Vec<Var>,
    }

    impl Layer {
        fn new(t: usize, h: usize, e: usize, f: usize, dtype: DType, seed: u64) -> Self {
            let var =
                |dims: &[usize], s: u64, scale: f64| Var::from_tensor(&(random(dims, seed * 1000 + s, dtype) * scale).unwrap()).unwrap();
            Self {
                x: var(&[t, h], 1, 1.0),
                router: var(&[e, h], 2, 1.0),
                gate: (0..e).map(|i| var(&[f, h], 10 + i as u64, 0.5)).collect(),
                up: (0..e).map(|i| var(&[f, h], 100 + i as u64, 0.5)).collect(),
                down: (0..e).map(|i| var(&[h, f], 200 + i as u64, 0.5)).collect(),
            }
        }
        fn refs(&self) -> Vec<ExpertRef<'_>> {
            (0..self.gate.len()).map(|i| (self.gate[i].as_tensor(), self.up[i].as_tensor(), self.down[i].as_tensor())).collect()
        }
        /// Stacked copies of the expert weights, as fresh variables.
        fn stacked(&self) -> (Var, Var, Var) {
            let st = |v: &[Var]| {
                let parts: Vec<&Tensor> = v.iter().map(|v| v.as_tensor()).collect();
                Var::from_tensor(&Tensor::stack(&parts, 0).unwrap()).unwrap()
            };
            (st(&self.gate), st(&self.up), st(&self.down))
        }
    }

    fn weights(g: &Var, u: &Var, d: &Var) -> ExpertWeights {
        ExpertWeights::new(g, u, d).unwrap()
    }

    /// A loss that weighs every output element differently, plus the router's aux losses.
    fn loss(y: &Tensor, stats: &RouterStats, probe: &Tensor) -> Tensor {
        let main = (y * probe).unwrap().sum_all().unwrap();
        let aux = (stats.load_balancing_loss().unwrap() + stats.z_loss().unwrap()).unwrap();
        (main + aux.to_dtype(y.dtype()).unwrap()).unwrap()
    }

    /// Fused and reference forward and all gradients agree to `tol`; returns the stats.
    fn compare(layer: &Layer, opts: &MoeOptions, tol: f64) -> RouterStats {
        let (t, h) = layer.x.dims2().unwrap();
        let probe = random(&[t, h], 99, layer.x.dtype());
        let (yr, sr) = reference_moe(&layer.x, &layer.router, &layer.refs(), opts).unwrap();
        let gr = loss(&yr, &sr, &probe).backward().unwrap();
        let (g, u, d) = layer.stacked();
        let (yf, sf) = fused_moe(&layer.x, &layer.router, &weights(&g, &u, &d), opts).unwrap();
        assert_eq!(sf.plan, sr.plan);
        assert_close(&yf, &yr, tol, "y");
        let gf = loss(&yf, &sf, &probe).backward().unwrap();
        assert_close(gf.get(&layer.x).unwrap(), gr.get(&layer.x).unwrap(), tol, "dx");
        assert_close(gf.get(&layer.router).unwrap(), gr.get(&layer.router).unwrap(), tol, "d router");
        for (stacked, per_expert, name) in [(&g, &layer.gate, "gate"), (&u, &layer.up, "up"), (&d, &layer.down, "down")] {
            let gs = gf.get(stacked).unwrap();
            for (i, v) in per_expert.iter().enumerate() {
                let got = gs.get(i).unwrap();
                match gr.get(v) {
                    Some(want) => assert_close(&got, want, tol, &format!("d {name}[{i}]")),
                    // An expert that got no tokens gets exactly zero gradient.
                    None => {
                        let total = got.abs().unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap();
                        assert_eq!(total.to_scalar::<f64>().unwrap(), 0.0, "d {name}[{i}] of an idle expert");
                    }
                }
            }
        }
        sf
    }

    #[test]
    fn matches_the_reference_loop_in_both_routing_modes() {
        let layer = Layer::new(64, 48, 6, 40, DType::F32, 1);
        for routing in [Routing::TopkThenSoftmax, Routing::SoftmaxThenTopk] {
            let stats = compare(&layer, &MoeOptions { top_k: 2, routing, capacity: None }, 1e-5);
            assert_eq!(stats.dropped(), 0);
            assert_eq!(stats.tokens_per_expert().iter().sum::<usize>(), 128);
        }
    }

    #[test]
    fn matches_the_reference_with_idle_experts() {
        // Positive inputs and strongly negative router rows for experts 3..6: their logits are
        // far below the others for every token, so their groups are empty.
        let layer = Layer::new(40, 32, 6, 24, DType::F32, 2);
        layer.x.set(&(layer.x.as_tensor().abs().unwrap() + 0.1).unwrap()).unwrap();
        let mut r = layer.router.as_tensor().to_vec2::<f32>().unwrap();
        for row in r.iter_mut().skip(3) {
            row.iter_mut().for_each(|v| *v = -v.abs() - 5.0);
        }
        layer.router.set(&Tensor::new(r, &Device::Cpu).unwrap()).unwrap();
        let opts = MoeOptions { top_k: 2, routing: Routing::TopkThenSoftmax, capacity: None };
        let stats = compare(&layer, &opts, 1e-5);
        assert_eq!(&stats.tokens_per_expert()[3..], &[0, 0, 0]);
        assert_eq!(stats.tokens_per_expert()[..3].iter().sum::<usize>(), 80);
    }

    #[test]
    fn matches_the_reference_with_capacity_drops() {
        let layer = Layer::new(64, 32, 4, 24, DType::F32, 3);
        for policy in [DropPolicy::Probs, DropPolicy::Position] {
            let capacity = Some(Capacity { factor: 0.5, policy });
            let opts = MoeOptions { top_k: 2, routing: Routing::SoftmaxThenTopk, capacity };
            let stats = compare(&layer, &opts, 1e-5);
            assert!(stats.dropped() > 0, "{policy:?}: capacity factor 0.5 drops something");
            // capacity = ceil(64·2/4 · 0.5) = 16
            assert!(stats.tokens_per_expert().iter().all(|&n| n <= 16));
        }
    }

    #[test]
    fn a_large_capacity_factor_is_exactly_dropless() {
        let layer = Layer::new(50, 32, 4, 16, DType::F32, 4);
        let (g, u, d) = layer.stacked();
        let w = weights(&g, &u, &d);
        let dropless = MoeOptions { top_k: 2, routing: Routing::TopkThenSoftmax, capacity: None };
        let (y0, s0) = fused_moe(&layer.x, &layer.router, &w, &dropless).unwrap();
        let big = MoeOptions { capacity: Some(Capacity { factor: 4.0, policy: DropPolicy::Probs }), ..dropless };
        let (y1, s1) = fused_moe(&layer.x, &layer.router, &w, &big).unwrap();
        assert_eq!(s0.plan, s1.plan);
        assert_eq!(s1.dropped(), 0);
        let bits = |t: &Tensor| -> Vec<u32> { t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect() };
        assert_eq!(bits(&y0), bits(&y1));
    }

    #[test]
    fn whole_layer_gradients_pass_finite_differences() {
        let layer = Layer::new(6, 4, 3, 5, DType::F64, 5);
        let (g, u, d) = layer.stacked();
        let probe = random(&[6, 4], 7, DType::F64);
        let capacity = Some(Capacity { factor: 0.7, policy: DropPolicy::Probs });
        let opts = MoeOptions { top_k: 2, routing: Routing::SoftmaxThenTopk, capacity };
        finite_difference_check(&[&layer.x, &layer.router, &g, &u, &d], |v| {
            let w = ExpertWeights::new(v[2], v[3], v[4])?;
            let (y, stats) = fused_moe(v[0], v[1], &w, &opts)?;
            assert!(stats.dropped() > 0);
            (y * &probe)?.sum_all()
        });
    }

    #[test]
    fn stacking_per_expert_weights_gives_the_same_layer() {
        let layer = Layer::new(16, 8, 3, 6, DType::F32, 6);
        let opts = MoeOptions { top_k: 1, routing: Routing::TopkThenSoftmax, capacity: None };
        let stacked = ExpertWeights::stack(&layer.refs()).unwrap();
        let (y0, _) = fused_moe(&layer.x, &layer.router, &stacked, &opts).unwrap();
        let (y1, _) = reference_moe(&layer.x, &layer.router, &layer.refs(), &opts).unwrap();
        assert_close(&y0, &y1, 1e-5, "y");
        let bad = ExpertWeights { down: stacked.gate_up.clone(), ..stacked };
        assert!(fused_moe(&layer.x, &layer.router, &bad, &opts).is_err());
    }

    #[test]
    fn half_precision_inputs_run_in_float32_and_keep_their_dtype() {
        let layer = Layer::new(24, 16, 4, 8, DType::F32, 7);
        let opts = MoeOptions { top_k: 2, routing: Routing::TopkThenSoftmax, capacity: None };
        let w = ExpertWeights::stack(&layer.refs()).unwrap();
        let (y32, _) = fused_moe(&layer.x, &layer.router, &w, &opts).unwrap();
        let x16 = layer.x.to_dtype(DType::BF16).unwrap();
        let (y16, _) = fused_moe(&x16, &layer.router, &w, &opts).unwrap();
        assert_eq!(y16.dtype(), DType::BF16);
        assert_close(&y16, &y32, 2e-2, "bf16 vs f32");
    }

    #[test]
    fn the_fused_layer_and_its_gradients_are_bitwise_identical_across_thread_counts() {
        let layer = Layer::new(96, 40, 5, 600, DType::F32, 8);
        let (g, u, d) = layer.stacked();
        let w = weights(&g, &u, &d);
        let opts = MoeOptions { top_k: 2, routing: Routing::SoftmaxThenTopk, capacity: None };
        let probe = random(&[96, 40], 9, DType::F32);
        let run = |threads: usize| -> Vec<Vec<u32>> {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (y, _) = fused_moe(&layer.x, &layer.router, &w, &opts).unwrap();
                let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let bits =
                    |t: &Tensor| -> Vec<u32> { t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect() };
                vec![bits(&y), bits(grads.get(&layer.x).unwrap()), bits(grads.get(&g).unwrap()), bits(grads.get(&d).unwrap())]
            })
        };
        let one = run(1);
        for threads in [2, 3] {
            assert!(run(threads) == one, "{threads} threads differ from 1");
        }
    }
}
