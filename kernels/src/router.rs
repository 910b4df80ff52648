//! Router: logits in float32, top-k selection, the router's auxiliary losses, and the expert
//! capacity limit with its drop policies.
//!
//! Two selection orders are in use in the field:
//! - `topk_then_softmax` (Mixtral): keep the k largest logits, softmax over those k, so each
//!   token's weights sum to 1.
//! - `softmax_then_topk` (Switch, GShard, Megatron upcycling): softmax over all E logits, keep
//!   the k largest probabilities, no renormalisation.
//!
//! Ties are broken deterministically: the lower expert index wins.

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// The order of top-k selection and softmax in the router (one definition: the pipeline's
/// `merge.routing`, the CLI's `--routing` and `config.json` all read this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum), value(rename_all = "snake_case"))]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Keep the k largest logits, then softmax over those k (weights sum to 1; Mixtral).
    TopkThenSoftmax,
    /// Softmax over all E logits, then keep the k largest probabilities as they are (Switch,
    /// Qwen2-MoE with `norm_topk_prob: false`).
    SoftmaxThenTopk,
}

impl Routing {
    /// The snake_case name, as serde, the CLI and `config.json`'s `btm.routing` write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Routing::TopkThenSoftmax => "topk_then_softmax",
            Routing::SoftmaxThenTopk => "softmax_then_topk",
        }
    }
}

impl std::str::FromStr for Routing {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "topk_then_softmax" => Ok(Routing::TopkThenSoftmax),
            "softmax_then_topk" => Ok(Routing::SoftmaxThenTopk),
            other => Err(format!("unknown routing `{other}` (expected topk_then_softmax or softmax_then_topk)")),
        }
    }
}

/// A routing decision for T tokens.
#[derive(Debug, Clone)]
pub struct Routed {
    /// [T, k] float32 weight of each selected expert (differentiable w.r.t. the logits;
    /// float64 when the logits are float64).
    pub weights: Tensor,
    /// [T, k] u32 selected expert indices, best first.
    pub experts: Tensor,
    /// [T, E] float32 (or float64) softmax over all experts (for the load-balancing loss).
    pub probs: Tensor,
}

/// Softmax over the last dimension, built from differentiable primitives
/// (candle's fused `softmax_last_dim` is detached from the graph).
pub fn softmax_last(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// Indices of the k largest values of each row of `scores` [T, E]; ties go to the lower index.
pub fn topk_indices(scores: &Tensor, k: usize) -> Result<Tensor> {
    let (t, e) = scores.dims2()?;
    if k == 0 || k > e {
        candle_core::bail!("top-k: k = {k} must be in 1..={e} (the number of experts)");
    }
    let rows = scores.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(t * k);
    let mut order: Vec<u32> = Vec::with_capacity(e);
    for row in &rows {
        order.clear();
        order.extend(0..e as u32);
        // A total order: descending score, NaN last, the lower index first among equals. Selecting
        // the k first and sorting only them costs O(E) a token rather than a full sort's
        // O(E log E), which dominated routing over a thousand experts.
        let first = |&a: &u32, &b: &u32| {
            let (x, y) = (row[a as usize], row[b as usize]);
            y.partial_cmp(&x).unwrap_or_else(|| x.is_nan().cmp(&y.is_nan())).then(a.cmp(&b))
        };
        if k < e {
            order.select_nth_unstable_by(k - 1, first);
        }
        order[..k].sort_unstable_by(first);
        out.extend_from_slice(&order[..k]);
    }
    Tensor::from_vec(out, (t, k), scores.device())
}

/// Logits in float32, or float64 when given float64 (gradient checks).
fn at_least_f32(logits: &Tensor) -> Result<Tensor> {
    match logits.dtype() {
        DType::F64 => Ok(logits.clone()),
        _ => logits.to_dtype(DType::F32),
    }
}

/// Route T tokens given router logits [T, E] (computed in float32 by the caller; float64 is kept).
pub fn route(logits: &Tensor, k: usize, routing: Routing) -> Result<Routed> {
    let logits = at_least_f32(logits)?;
    let probs = softmax_last(&logits)?;
    // Softmax is monotonic, so ranking logits and ranking probabilities agree.
    let experts = topk_indices(&logits, k)?;
    let weights = match routing {
        Routing::TopkThenSoftmax => softmax_last(&logits.gather(&experts, D::Minus1)?)?,
        Routing::SoftmaxThenTopk => probs.gather(&experts, D::Minus1)?,
    };
    Ok(Routed { weights, experts, probs })
}

/// Number of assignments each expert received: [E] float32 (not differentiable).
pub fn expert_counts(experts: &Tensor, num_experts: usize) -> Result<Vec<f32>> {
    let mut counts = vec![0f32; num_experts];
    for e in experts.flatten_all()?.to_vec1::<u32>()? {
        counts[e as usize] += 1.0;
    }
    Ok(counts)
}

/// Switch Transformer load-balancing loss, without its coefficient:
/// `E · Σ_i f_i · P_i`, where f_i is the share of the T·k assignments that went to expert i
/// and P_i the mean router probability of expert i over the T tokens (Fedus et al. 2021, eq. 4;
/// Megatron's top-k form). Equals 1 under perfectly uniform routing.
pub fn load_balancing_loss(probs: &Tensor, experts: &Tensor) -> Result<Tensor> {
    let (t, e) = probs.dims2()?;
    let k = experts.dim(1)?;
    load_balancing_loss_with_counts(probs, &expert_counts(experts, e)?, (t * k) as f64)
}

/// The load-balancing loss with f_i = `counts[i] / assignments` given: in a distributed step
/// the counts are summed over the ranks, so f is that of the whole batch and the mean over
/// ranks of this loss is the batch's loss (Megatron-Core's global aux loss).
pub fn load_balancing_loss_with_counts(probs: &Tensor, counts: &[f32], assignments: f64) -> Result<Tensor> {
    let e = probs.dim(1)?;
    if counts.len() != e {
        candle_core::bail!("load-balancing loss: {} counts for {e} experts", counts.len());
    }
    let f = Tensor::from_slice(counts, e, probs.device())?.to_dtype(probs.dtype())? / assignments.max(1.0);
    let p = probs.mean(0)?;
    f?.mul(&p)?.sum_all()? * e as f64
}

/// Router z-loss without its coefficient: `mean_t(logsumexp(logits_t)²)` (Zoph et al. 2022, ST-MoE).
pub fn z_loss(logits: &Tensor) -> Result<Tensor> {
    let logits = at_least_f32(logits)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
    lse.sqr()?.mean_all()
}

/// What to drop when more assignments reach an expert than its capacity allows (one
/// definition: the job file's and the pipeline's `moe.drop_policy` read this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Keep the assignments with the highest routing weight; drop the lowest (per expert).
    /// Ties go to the earlier token.
    #[default]
    Probs,
    /// Keep the earliest tokens; drop the latest (per expert).
    Position,
}

impl std::str::FromStr for DropPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "probs" => Ok(DropPolicy::Probs),
            "position" => Ok(DropPolicy::Position),
            other => Err(format!("unknown drop policy `{other}` (expected probs or position)")),
        }
    }
}

/// An expert capacity: each expert takes at most `ceil(T·k / E · factor)` of the T·k
/// assignments (GShard / Switch capacity factor). No capacity at all means dropless routing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Capacity factor: each expert takes at most `ceil(T·k/E · factor)` assignments (1.0 =
    /// an even share).
    pub factor: f64,
    /// Which assignments an over-full expert drops.
    pub policy: DropPolicy,
}

impl Capacity {
    /// Assignments one expert may take: `ceil(T·k/E · factor)`.
    pub fn per_expert(&self, tokens: usize, top_k: usize, experts: usize) -> usize {
        let exact = (tokens * top_k) as f64 / experts as f64 * self.factor;
        // Guard against 2.0000000001-style float noise turning an exact capacity into one more.
        let rounded = exact.round();
        if (exact - rounded).abs() < 1e-9 {
            rounded as usize
        } else {
            exact.ceil() as usize
        }
    }

    /// Which of the T·k assignments survive: `experts` and `weights` are the row-major [T, k]
    /// expert indices and routing weights. Returns a row-major [T, k] mask.
    pub fn keep_mask(&self, experts: &[u32], weights: &[f32], top_k: usize, num_experts: usize) -> Vec<bool> {
        let tokens = experts.len() / top_k.max(1);
        let cap = self.per_expert(tokens, top_k, num_experts);
        let mut keep = vec![false; experts.len()];
        let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); num_experts];
        for (slot, &e) in experts.iter().enumerate() {
            by_expert[e as usize].push(slot);
        }
        for mut slots in by_expert {
            if self.policy == DropPolicy::Probs {
                // Stable: equal weights keep token order, so the earlier token wins.
                slots.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]));
            }
            for &slot in slots.iter().take(cap) {
                keep[slot] = true;
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn logits() -> Tensor {
        Tensor::new(&[[1.0f32, 3.0, 2.0, 3.0], [0.5, -1.0, 0.25, 4.0]], &Device::Cpu).unwrap()
    }

    #[test]
    fn topk_breaks_ties_toward_lower_index() {
        let idx = topk_indices(&logits(), 2).unwrap().to_vec2::<u32>().unwrap();
        assert_eq!(idx, vec![vec![1, 3], vec![3, 0]]);
    }

    /// The selection picks exactly what a full stable sort by descending score picks, in its
    /// order, for every k: rows full of ties (values from a small set), NaN and ±0.
    #[test]
    fn topk_selection_equals_the_full_stable_sort() {
        let (t, e) = (40, 67);
        let palette = [0.0f32, -0.0, 1.5, -2.0, f32::NAN, 1.5, 7.0, f32::NEG_INFINITY];
        let mut state = 12345u64;
        let values: Vec<f32> = (0..t * e)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                palette[(state >> 33) as usize % palette.len()]
            })
            .collect();
        let scores = Tensor::from_vec(values.clone(), (t, e), &Device::Cpu).unwrap();
        for k in [1, 2, 5, e - 1, e] {
            let got = topk_indices(&scores, k).unwrap().to_vec2::<u32>().unwrap();
            for (r, row) in values.chunks(e).enumerate() {
                let mut order: Vec<u32> = (0..e as u32).collect();
                order.sort_by(|&a, &b| {
                    let (x, y) = (row[a as usize], row[b as usize]);
                    y.partial_cmp(&x).unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
                });
                assert_eq!(got[r], order[..k], "row {r}, k {k}: {row:?}");
            }
        }
    }

    #[test]
    fn topk_then_softmax_weights_sum_to_one() {
        let r = route(&logits(), 2, Routing::TopkThenSoftmax).unwrap();
        let w = r.weights.to_vec2::<f32>().unwrap();
        assert_eq!(w[0], vec![0.5, 0.5]);
        // Row 2 picks expert 3 (logit 4.0) then expert 0 (logit 0.5).
        let e = (0.5f32 - 4.0).exp();
        assert!((w[1][0] - 1.0 / (1.0 + e)).abs() < 1e-7);
        assert!((w[1][1] - e / (1.0 + e)).abs() < 1e-7);
    }

    #[test]
    fn softmax_then_topk_keeps_unnormalised_probabilities() {
        let r = route(&logits(), 2, Routing::SoftmaxThenTopk).unwrap();
        let w = r.weights.to_vec2::<f32>().unwrap();
        let row: Vec<f64> = [1.0f64, 3.0, 2.0, 3.0].iter().map(|x| x.exp()).collect();
        let z: f64 = row.iter().sum();
        assert!((w[0][0] as f64 - row[1] / z).abs() < 1e-7);
        assert!((w[0][1] as f64 - row[3] / z).abs() < 1e-7);
    }

    #[test]
    fn load_balancing_loss_is_one_when_uniform() {
        let logits = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        let experts = Tensor::new(&[[0u32], [1], [2], [3]], &Device::Cpu).unwrap();
        let probs = softmax_last(&logits).unwrap();
        let l = load_balancing_loss(&probs, &experts).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn z_loss_matches_definition() {
        let z = z_loss(&logits()).unwrap().to_scalar::<f32>().unwrap() as f64;
        let lse = |r: &[f64]| r.iter().map(|x| x.exp()).sum::<f64>().ln();
        let want = (lse(&[1.0, 3.0, 2.0, 3.0]).powi(2) + lse(&[0.5, -1.0, 0.25, 4.0]).powi(2)) / 2.0;
        assert!((z - want).abs() < 1e-5, "{z} vs {want}");
    }

    #[test]
    fn gradients_reach_the_logits_in_both_modes() {
        for routing in [Routing::TopkThenSoftmax, Routing::SoftmaxThenTopk] {
            let var = Var::from_tensor(&logits()).unwrap();
            let r = route(var.as_tensor(), 2, routing).unwrap();
            let loss = (r.weights.sqr().unwrap().sum_all().unwrap()
                + load_balancing_loss(&r.probs, &r.experts).unwrap()
                + z_loss(var.as_tensor()).unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            let g = grads.get(var.as_tensor()).expect("gradient reaches logits");
            let g: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(g > 0.0, "{routing:?}");
        }
    }

    #[test]
    fn capacity_is_ceil_of_share_times_factor() {
        let cap = |factor| Capacity { factor, policy: DropPolicy::Position }.per_expert(10, 2, 4);
        assert_eq!(cap(1.0), 5);
        assert_eq!(cap(1.1), 6); // 5.5 rounds up
        assert_eq!(cap(0.5), 3); // 2.5 rounds up
        assert_eq!(Capacity { factor: 1.2, policy: DropPolicy::Probs }.per_expert(5, 1, 2), 3);
    }

    #[test]
    fn drop_policies_drop_what_they_say() {
        // 4 tokens, k = 1, 2 experts: capacity ceil(4/2 · 0.5) = 1 per expert.
        let experts = [0u32, 0, 1, 0];
        let weights = [0.2f32, 0.9, 0.4, 0.9];
        let position = Capacity { factor: 0.5, policy: DropPolicy::Position };
        assert_eq!(position.keep_mask(&experts, &weights, 1, 2), vec![true, false, true, false]);
        // Probs keeps the heaviest assignment of expert 0; the tie 0.9/0.9 goes to token 1.
        let probs = Capacity { factor: 0.5, policy: DropPolicy::Probs };
        assert_eq!(probs.keep_mask(&experts, &weights, 1, 2), vec![false, true, true, false]);
        // A large factor keeps everything.
        let big = Capacity { factor: 100.0, policy: DropPolicy::Probs };
        assert!(big.keep_mask(&experts, &weights, 1, 2).iter().all(|&k| k));
        assert_eq!("probs".parse::<DropPolicy>(), Ok(DropPolicy::Probs));
        assert!("latest".parse::<DropPolicy>().is_err());
    }

    #[test]
    fn router_gradients_pass_finite_differences_in_both_modes() {
        use crate::testing::{finite_difference_check, random};
        let logits = Var::from_tensor(&(random(&[5, 4], 11, DType::F64) * 2.0).unwrap()).unwrap();
        let probe = random(&[5, 2], 12, DType::F64);
        for routing in [Routing::TopkThenSoftmax, Routing::SoftmaxThenTopk] {
            finite_difference_check(&[&logits], |v| {
                let r = route(v[0], 2, routing)?;
                let main = (r.weights * &probe)?.sum_all()?;
                main + (load_balancing_loss(&r.probs, &r.experts)? + z_loss(v[0])?)?
            });
        }
    }
}
