//! Router initialisation: where an MoE's routing comes from before (or instead of) training.
//!
//! - [`RouterInit::Random`]: i.i.d. normal rows, std 0.02 by default (Megatron-LM's
//!   `init_method_std`). For upcycling, [`virtual_group_router`] draws E/G rows and repeats each
//!   G times so the G shards of one dense copy always get identical logits (He et al. 2024).
//! - [`RouterInit::Zero`]: all logits 0, i.e. uniform routing (ties go to the lower index).
//! - [`RouterInit::Centroid`]: from calibration text per domain, [`centroid_router`]: row e is
//!   the centred, normalised mean of domain e's router inputs, times a temperature τ chosen so
//!   that calibration tokens give their own domain's expert a target probability on average.
//! - [`RouterInit::Fit`]: [`fit_softmax_regression`], a few hundred steps of full-batch
//!   softmax regression (domain = label) started from the centroid solution.
//!
//! The router's input is the post-attention RMSNorm output of the layer (what the router of a
//! Mixtral / Qwen2-MoE block multiplies), not the residual stream; [`crate::calib`] collects it
//! from the merged model one layer at a time.

use crate::calib::CalibOptions;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// How a router is initialised (one definition: the pipeline's `merge.router_init` and the
/// CLI's `--router-init` read this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum), value(rename_all = "snake_case"))]
#[serde(rename_all = "snake_case")]
pub enum RouterInit {
    /// I.i.d. N(0, std²) rows from a per-layer seed.
    Random,
    /// All-zero rows: uniform routing, ties to the lower index.
    Zero,
    /// Domain centroids of calibration text, scaled to a target probability; needs calibration text.
    Centroid,
    /// Softmax regression on calibration text, started from the centroid; needs calibration text.
    Fit,
}

impl std::str::FromStr for RouterInit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(RouterInit::Random),
            "zero" => Ok(RouterInit::Zero),
            "centroid" => Ok(RouterInit::Centroid),
            "fit" => Ok(RouterInit::Fit),
            other => Err(format!("unknown router init `{other}` (expected random, zero, centroid or fit)")),
        }
    }
}

impl RouterInit {
    /// The snake_case name, as serde, the CLI and the lineage write it.
    pub fn as_str(self) -> &'static str {
        match self {
            RouterInit::Random => "random",
            RouterInit::Zero => "zero",
            RouterInit::Centroid => "centroid",
            RouterInit::Fit => "fit",
        }
    }

    /// Centroid and fit are computed from calibration text.
    pub fn needs_calibration(self) -> bool {
        matches!(self, RouterInit::Centroid | RouterInit::Fit)
    }

    /// The initialisation used when none is asked for: centroid when calibration text is
    /// given, random without.
    pub fn default_for(calibrated: bool) -> Self {
        if calibrated {
            RouterInit::Centroid
        } else {
            RouterInit::Random
        }
    }
}

/// Std of a random router row (Megatron-LM's `init_method_std`).
pub const DEFAULT_ROUTER_STD: f64 = 0.02;

/// Centroid: the mean probability a calibration token should give its own domain's expert.
pub const DEFAULT_TARGET_PROB: f64 = 0.8;

/// How `merge` and `add-expert` make a router: the one set of router settings both read (and
/// the CLI's `RouterArgs` fills).
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// Which initialisation (default: random).
    pub init: RouterInit,
    /// Std of a random router.
    pub std: f64,
    /// Seed of a random router (per layer through [`layer_seed`]).
    pub seed: u64,
    /// Centroid: mean probability calibration tokens should give their own expert.
    pub target_prob: f64,
    /// Fit: the softmax regression's settings.
    pub fit: FitOptions,
    /// How much calibration text is read, and how it is windowed.
    pub calib: CalibOptions,
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            init: RouterInit::Random,
            std: DEFAULT_ROUTER_STD,
            seed: 0,
            target_prob: DEFAULT_TARGET_PROB,
            fit: FitOptions::default(),
            calib: CalibOptions::default(),
        }
    }
}

impl RouterOptions {
    /// Layer `layer`'s router rows (`rows` × `hidden`) when no calibration decides them:
    /// [`uncalibrated`] with these settings.
    pub fn uncalibrated(&self, rows: usize, hidden: usize, layer: usize) -> Result<Tensor> {
        uncalibrated(self.init, rows, hidden, self.std, self.seed, layer)
    }
}

/// A per-layer seed, so a layer's random router does not depend on the order tensors are made.
pub fn layer_seed(seed: u64, layer: usize) -> u64 {
    seed ^ (layer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The router rows of an initialisation that reads no calibration text: `rows` × `hidden`,
/// N(0, std²) from a per-layer seed for `random`, zeros otherwise (`zero`, and the starting
/// point that centroid and fit replace). The one place a random or zero router is made.
pub fn uncalibrated(init: RouterInit, rows: usize, hidden: usize, std: f64, seed: u64, layer: usize) -> Result<Tensor> {
    match init {
        RouterInit::Random => random_rows(rows, hidden, std, layer_seed(seed, layer)),
        _ => Ok(Tensor::zeros((rows, hidden), DType::F32, &Device::Cpu)?),
    }
}

/// `rows` × `hidden` float32 matrix of N(0, std²) entries from a seeded `StdRng`; zeros if std = 0.
pub fn random_rows(rows: usize, hidden: usize, std: f64, seed: u64) -> Result<Tensor> {
    ensure!(std >= 0.0 && std.is_finite(), "router std must be finite and non-negative, got {std}");
    if std == 0.0 {
        return Ok(Tensor::zeros((rows, hidden), DType::F32, &Device::Cpu)?);
    }
    let normal = Normal::new(0.0f32, std as f32)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let data: Vec<f32> = (0..rows * hidden).map(|_| normal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(data, (rows, hidden), &Device::Cpu)?)
}

/// Virtual-group router for upcycling (He et al. 2024, §3): E/G random rows, each repeated G
/// times consecutively, so experts c·G … c·G+G−1 (the G shards of dense copy c) tie exactly.
pub fn virtual_group_router(experts: usize, granularity: usize, hidden: usize, std: f64, seed: u64) -> Result<Tensor> {
    ensure!(granularity > 0 && experts.is_multiple_of(granularity), "{experts} experts are not a whole number of groups of {granularity}");
    let copies = experts / granularity;
    let base = random_rows(copies, hidden, std, seed)?;
    Ok(base.unsqueeze(1)?.expand((copies, granularity, hidden))?.reshape((experts, hidden))?)
}

/// Softmax over the last dimension.
fn softmax(xs: &Tensor) -> Result<Tensor> {
    Ok(btm_kernels::router::softmax_last(xs)?)
}

/// Logits of a group of calibration tokens as `fixed + τ · scaled` ([N, E] each), and the
/// expert they should prefer.
pub struct ScoreGroup {
    /// Logits that do not move with τ (e.g. the existing experts'), [N, E] float32.
    pub fixed: Tensor,
    /// Logits multiplied by τ, [N, E] float32.
    pub scaled: Tensor,
    /// Index of the expert these tokens should prefer.
    pub own: usize,
}

/// Mean over groups of the mean probability tokens give their own expert at temperature τ.
pub fn mean_own_probability(groups: &[ScoreGroup], tau: f64) -> Result<f64> {
    let mut total = 0.0;
    for g in groups {
        let probs = softmax(&(&g.fixed + (&g.scaled * tau)?)?)?;
        total += probs.narrow(1, g.own, 1)?.mean_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total / groups.len() as f64)
}

/// Largest mean |logit| a calibrated router may have on its calibration tokens.
pub const MAX_MEAN_LOGIT: f64 = 4.0;

/// The temperature τ at which [`mean_own_probability`] reaches `target`: a log-spaced scan from
/// a near-uniform router up to mean |logit| = [`MAX_MEAN_LOGIT`], then bisection inside the
/// first bracket.
/// Returns (τ, achieved probability). If the target is out of reach (overlapping domains), aims
/// at 95 % of the way from the smallest τ's probability to the best one instead of taking the
/// best τ itself, which is typically enormous (hard routing) for little gain.
pub fn solve_temperature(groups: &[ScoreGroup], target: f64) -> Result<(f64, f64)> {
    ensure!(!groups.is_empty(), "no calibration tokens to choose a temperature from");
    let mut magnitude = 0.0;
    for g in groups {
        magnitude += g.scaled.abs()?.mean_all()?.to_scalar::<f32>()? as f64;
    }
    let magnitude = (magnitude / groups.len() as f64).max(1e-12);
    // Scan τ from a near-uniform router up to one whose logits average MAX_MEAN_LOGIT in
    // magnitude. Beyond that the router is saturated: its z-loss (mean logsumexp²) explodes
    // and training the merged MoE starts from gradients dominated by the router.
    let top = MAX_MEAN_LOGIT.log10();
    let taus: Vec<f64> = (0..120).map(|i| 10f64.powf(-4.0 + (top + 4.0) * i as f64 / 119.0) / magnitude).collect();
    let ps = taus.iter().map(|&t| mean_own_probability(groups, t)).collect::<Result<Vec<_>>>()?;
    let best = ps.iter().cloned().fold(f64::MIN, f64::max);
    let goal = if best >= target { target } else { ps[0] + 0.95 * (best - ps[0]) };
    let i = ps.iter().position(|&p| p >= goal).expect("the best probability reaches the goal");
    if i == 0 {
        return Ok((taus[0], ps[0]));
    }
    // Bisect in log τ between taus[i-1] (below the goal) and taus[i] (at or above).
    let (mut lo, mut hi) = (taus[i - 1].ln(), taus[i].ln());
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if mean_own_probability(groups, mid.exp())? >= goal {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let tau = hi.exp();
    Ok((tau, mean_own_probability(groups, tau)?))
}

/// Row means [H] of [N, H] features.
fn mean_row(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?.mean(0)?)
}

/// `v / ‖v‖`, or zeros if v is (numerically) zero.
fn normalised(v: &Tensor) -> Result<Tensor> {
    let norm = v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    if norm < 1e-20 {
        return Ok(v.zeros_like()?);
    }
    Ok((v / norm)?)
}

/// `v` minus its component along `u`. A router has no bias, so the component of the hidden
/// states shared by all domains (their mean μ̄) would add c_e·μ̄ to expert e's logit for *every*
/// token; rows orthogonal to μ̄ see only each token's deviation from it.
fn orthogonal_to(v: &Tensor, u: &Tensor) -> Result<Tensor> {
    let uu = u.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    if uu < 1e-20 {
        return Ok(v.clone());
    }
    let vu = (v * u)?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((v - (u * (vu / uu))?)?)
}

/// A router computed from calibration features.
#[derive(Debug, Clone)]
pub struct CalibratedRouter {
    /// [E, H] float32.
    pub weight: Tensor,
    /// τ of the centroid solution (logit scale).
    pub temperature: f64,
    /// Mean probability calibration tokens give their own expert (training split).
    pub own_probability: f64,
}

/// Centroid router: with μ_e the mean router input of domain e and μ̄ the mean of the μ_e,
/// c_e = μ_e − μ̄ made orthogonal to μ̄ (see [`orthogonal_to`]), row e = τ · c_e/‖c_e‖, with τ
/// from [`solve_temperature`] for `target`.
pub fn centroid_router(train: &[Tensor], target: f64) -> Result<CalibratedRouter> {
    let e = train.len();
    ensure!(e >= 2, "a centroid router needs at least two domains");
    ensure!(target > 1.0 / e as f64 && target < 1.0, "target probability {target} must lie between 1/E = {:.3} and 1", 1.0 / e as f64);
    let means = train.iter().map(mean_row).collect::<Result<Vec<_>>>()?;
    let centre = (Tensor::stack(&means, 0)?.mean(0))?;
    let rows = means.iter().map(|m| normalised(&orthogonal_to(&(m - &centre)?, &centre)?)).collect::<Result<Vec<_>>>()?;
    let unit = Tensor::stack(&rows, 0)?;
    let groups = train
        .iter()
        .enumerate()
        .map(|(own, x)| {
            let scaled = x.to_dtype(DType::F32)?.matmul(&unit.t()?)?;
            Ok(ScoreGroup { fixed: scaled.zeros_like()?, scaled, own })
        })
        .collect::<Result<Vec<_>>>()?;
    let (tau, p) = solve_temperature(&groups, target)?;
    Ok(CalibratedRouter { weight: (unit * tau)?, temperature: tau, own_probability: p })
}

/// A new router row for an existing router `existing` [E, H] (add an expert): the direction
/// (μ_new − μ_bg)/‖·‖, where μ_bg is the mean of `background` tokens (text of the existing
/// domains; without it the direction is μ_new/‖μ_new‖), times τ chosen so the new domain's
/// tokens give the new expert probability `target` against the existing logits.
pub fn centroid_new_row(existing: &Tensor, new: &Tensor, background: Option<&Tensor>, target: f64) -> Result<CalibratedRouter> {
    ensure!(target > 0.0 && target < 1.0, "target probability {target} must lie between 0 and 1");
    let new = new.to_dtype(DType::F32)?;
    let mut direction = mean_row(&new)?;
    if let Some(bg) = background {
        direction = (direction - mean_row(bg)?)?;
    }
    let unit = normalised(&direction)?.unsqueeze(0)?;
    let existing = existing.to_dtype(DType::F32)?;
    let (n, e) = (new.dim(0)?, existing.dim(0)?);
    let old_logits = new.matmul(&existing.t()?)?;
    let fixed = Tensor::cat(&[&old_logits, &Tensor::zeros((n, 1), DType::F32, &Device::Cpu)?], 1)?;
    let scaled = Tensor::cat(&[&Tensor::zeros((n, e), DType::F32, &Device::Cpu)?, &new.matmul(&unit.t()?)?], 1)?;
    let (tau, p) = solve_temperature(&[ScoreGroup { fixed, scaled, own: e }], target)?;
    Ok(CalibratedRouter { weight: (unit * tau)?, temperature: tau, own_probability: p })
}

/// Settings of [`fit_softmax_regression`].
#[derive(Debug, Clone, Copy)]
pub struct FitOptions {
    /// Full-batch gradient steps (default 300).
    pub steps: usize,
    /// Step size on features rescaled to unit RMS norm.
    pub lr: f64,
    /// Nesterov momentum (default 0.9).
    pub momentum: f64,
    /// L2 penalty (on the rescaled problem).
    pub l2: f64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self { steps: 300, lr: 1.0, momentum: 0.9, l2: 1e-4 }
    }
}

/// Softmax regression `p(e | x) = softmax(W x)_e` by full-batch Nesterov gradient descent on
/// the weighted cross-entropy Σ_n w_n · −log p(y_n | x_n) + l2/2 ‖W‖², starting from `init`
/// [E, H]; rows with `trainable[e] == false` stay fixed. Features are divided by their RMS row
/// norm s during the fit (so one step size suits any model) and the result mapped back (W / s).
pub fn fit_softmax_regression(
    x: &Tensor,
    labels: &[u32],
    sample_weight: &[f32],
    init: &Tensor,
    trainable: &[bool],
    opts: &FitOptions,
) -> Result<Tensor> {
    let (n, _h) = x.dims2()?;
    let e = init.dim(0)?;
    ensure!(labels.len() == n && sample_weight.len() == n, "one label and weight per calibration token");
    ensure!(trainable.len() == e, "one trainable flag per router row");
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= e) {
        bail!("label {bad} out of range for {e} experts");
    }
    let x = x.to_dtype(DType::F32)?;
    let s = (x.sqr()?.sum_keepdim(1)?.mean_all()?.to_scalar::<f32>()? as f64).sqrt().max(1e-12);
    let xh = (x / s)?;
    let dev = Device::Cpu;
    let mut onehot = vec![0f32; n * e];
    for (i, &l) in labels.iter().enumerate() {
        onehot[i * e + l as usize] = 1.0;
    }
    let y = Tensor::from_vec(onehot, (n, e), &dev)?;
    let total: f32 = sample_weight.iter().sum();
    ensure!(total > 0.0, "sample weights sum to zero");
    let sw = Tensor::from_vec(sample_weight.iter().map(|w| w / total).collect::<Vec<_>>(), (n, 1), &dev)?;
    let mask = Tensor::from_vec(trainable.iter().map(|&t| if t { 1f32 } else { 0.0 }).collect::<Vec<_>>(), (e, 1), &dev)?;
    let mut w = (init.to_dtype(DType::F32)? * s)?;
    let mut v = w.zeros_like()?;
    for _ in 0..opts.steps {
        let p = softmax(&xh.matmul(&w.t()?)?)?;
        let residual = (p - &y)?.broadcast_mul(&sw)?;
        let grad = (residual.t()?.matmul(&xh)? + (&w * opts.l2)?)?.broadcast_mul(&mask)?;
        v = ((v * opts.momentum)? + &grad)?;
        let step = (&grad + (&v * opts.momentum)?)?;
        w = (w - (step * opts.lr)?)?;
    }
    Ok((w / s)?)
}

/// Settings of [`guard_new_row`].
#[derive(Debug, Clone, Copy)]
pub struct GuardOptions {
    /// δ: how far (in logits) the new row must stay below each old token's k-th largest logit.
    pub margin: f64,
    /// The MoE's top-k.
    pub top_k: usize,
    /// Share of the old domains' calibration tokens allowed to break the constraint: the
    /// penalty stops rising once at most this share does (0: every token must hold it).
    pub tolerance: f64,
    /// Gradient steps per penalty weight.
    pub steps: usize,
    /// L2 penalty (on the rescaled problem, as in [`FitOptions`]).
    pub l2: f64,
}

impl Default for GuardOptions {
    fn default() -> Self {
        Self { margin: 1.0, top_k: 1, tolerance: 0.0, steps: 300, l2: 1e-4 }
    }
}

/// Penalty weights ρ of the guard, tried in turn (half a decade apart) until at most the
/// tolerated share of calibration tokens violates.
const GUARD_PENALTIES: [f64; 11] = [1.0, 3.16, 10.0, 31.6, 100.0, 316.0, 1e3, 3.16e3, 1e4, 3.16e4, 1e5];

/// A new router row that keeps away from the old domains' tokens.
#[derive(Debug, Clone)]
pub struct GuardedRow {
    /// [1, H] float32.
    pub weight: Tensor,
    /// The last penalty weight ρ used.
    pub penalty: f64,
    /// Share of the old domains' calibration tokens still above `threshold − δ` (0 when the
    /// constraint holds on every one).
    pub violations: f64,
}

/// The k-th largest logit of each token of `x` [N, H] under `router` [E, H] (k ≤ E): the value
/// a new expert's logit must beat to enter the token's top-k (ties go to the lower index, so
/// a new last expert at exactly this value stays out).
pub fn kth_logit(router: &Tensor, x: &Tensor, k: usize) -> Result<Vec<f32>> {
    let e = router.dim(0)?;
    ensure!(k >= 1 && k <= e, "top-k {k} out of range for {e} experts");
    let logits = x.to_dtype(DType::F32)?.matmul(&router.to_dtype(DType::F32)?.t()?)?.to_vec2::<f32>()?;
    Ok(logits
        .into_iter()
        .map(|mut row| {
            row.sort_by(|a, b| b.total_cmp(a));
            row[k - 1]
        })
        .collect())
}

/// The margin guard of incremental expert addition. A Mixtral / Qwen2-MoE router has no bias,
/// so "leave the old tokens alone" must live in the new row r itself: for every old-domain
/// calibration token x with old logits ℓ(x) = W x and k-th largest old logit t(x), ask
///
/// ```text
/// r·x ≤ t(x) − δ                                   (x old: the new expert stays out of its top-k)
/// ```
///
/// while the new domain's tokens z prefer the new expert. The row solves
///
/// ```text
/// min_r  mean_z −log softmax([W z, r·z])_new  +  ρ · mean_x max(0, r·x − t(x) + δ)²  +  l2/2 ‖r‖²
/// ```
///
/// by Nesterov gradient descent from `init` [1, H], with ρ raised ([`GUARD_PENALTIES`]) until
/// at most `tolerance` of the calibration tokens violate. Why this is sound: the constraints are half-spaces in
/// r (W and t(x) are fixed, only the new row moves), so the feasible set is a convex polyhedron;
/// the cross-entropy is convex in r (a log-sum-exp of affine functions minus an affine one), so
/// each penalised problem is convex with a unique minimiser, and as ρ → ∞ the minimisers
/// approach the constrained optimum (exterior penalty method, Nocedal & Wright 2006, §17.1).
/// The margin δ is the slack that carries the guarantee from calibration to unseen tokens;
/// the caller measures how far it carries on held-out text. Tokens of an old domain whose top-k
/// excludes the new expert then get bit-identical outputs under top-k-then-softmax routing.
///
/// Where old and new tokens cannot be told apart by one bias-free row (small models, similar
/// domains), the constraint wins as ρ grows and the new domain loses its expert: the tolerance
/// trades a measured leak for new-domain routing, and the caller reports both.
///
/// Features are divided by their RMS row norm s for the fit (step sizes independent of the
/// model); the step is 1/L with L = 0.25·λ_z + 2ρ·λ_x + l2, λ the largest eigenvalue of each
/// set's second-moment matrix (by power iteration): a bound on the objective's curvature.
pub fn guard_new_row(existing: &Tensor, new: &Tensor, old: &Tensor, init: &Tensor, o: &GuardOptions) -> Result<GuardedRow> {
    ensure!(o.margin >= 0.0 && o.margin.is_finite(), "margin must be finite and non-negative, got {}", o.margin);
    ensure!((0.0..1.0).contains(&o.tolerance), "the guard's tolerance must lie in [0, 1), got {}", o.tolerance);
    let existing = existing.to_dtype(DType::F32)?;
    let (new, old) = (new.to_dtype(DType::F32)?, old.to_dtype(DType::F32)?);
    let (n, m) = (new.dim(0)?, old.dim(0)?);
    ensure!(n > 0 && m > 0, "the guard needs tokens of the new domain and of the old ones");
    let dev = Device::Cpu;
    // Bounds in raw logits: t(x) − δ per old token; the old log-partition per new token.
    let bound: Vec<f32> = kth_logit(&existing, &old, o.top_k)?.into_iter().map(|t| t - o.margin as f32).collect();
    let bound = Tensor::from_vec(bound, (m, 1), &dev)?;
    let old_lse = new.matmul(&existing.t()?)?.log_sum_exp(1)?.unsqueeze(1)?;
    let s = {
        let all = Tensor::cat(&[&new, &old], 0)?;
        (all.sqr()?.sum_keepdim(1)?.mean_all()?.to_scalar::<f32>()? as f64).sqrt().max(1e-12)
    };
    let (zh, xh) = ((&new / s)?, (&old / s)?);
    let (az, ax) = (largest_eigenvalue(&zh)?, largest_eigenvalue(&xh)?);
    // r·x = (s·r)·x̂: fit w = s·r.
    let mut w = (init.to_dtype(DType::F32)?.reshape((1, ()))? * s)?;
    let violations = |w: &Tensor| -> Result<f64> {
        let over = xh.matmul(&w.t()?)?.gt(&bound)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
        Ok(over as f64)
    };
    let mut penalty = 0.0;
    for rho in GUARD_PENALTIES {
        penalty = rho;
        let step = 1.0 / (0.25 * az + 2.0 * rho * ax + o.l2);
        let mut v = w.zeros_like()?;
        for _ in 0..o.steps {
            // Look-ahead point of Nesterov's method.
            let y = (&w - (&v * 0.9)?)?;
            let p_new = candle_nn::ops::sigmoid(&(zh.matmul(&y.t()?)? - &old_lse)?)?;
            let grad_ce = ((p_new - 1.0)?.t()?.matmul(&zh)? / n as f64)?;
            let hinge = (xh.matmul(&y.t()?)? - &bound)?.relu()?;
            let grad_pen = (hinge.t()?.matmul(&xh)? * (2.0 * rho / m as f64))?;
            let grad = ((grad_ce + grad_pen)? + (&y * o.l2)?)?;
            v = ((v * 0.9)? + (grad * step)?)?;
            w = (&w - &v)?;
        }
        if violations(&w)? <= o.tolerance {
            break;
        }
    }
    let violations = violations(&w)?;
    Ok(GuardedRow { weight: (w / s)?, penalty, violations })
}

/// The largest eigenvalue of XᵀX/N for [N, H] features, by 50 steps of power iteration (an
/// estimate from below, so padded by 10 %).
fn largest_eigenvalue(x: &Tensor) -> Result<f64> {
    let n = x.dim(0)? as f64;
    let mut v = Tensor::ones((x.dim(1)?, 1), DType::F32, &Device::Cpu)?;
    let mut lambda = 0.0;
    for _ in 0..50 {
        let w = (x.t()?.matmul(&x.matmul(&v)?)? / n)?;
        lambda = w.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
        if lambda == 0.0 {
            break;
        }
        v = (w / lambda)?;
    }
    Ok(1.1 * lambda)
}

/// Share of the tokens of `x` whose top-k under `router` includes `expert`.
pub fn share_in_topk(router: &Tensor, x: &Tensor, expert: usize, k: usize) -> Result<f64> {
    if x.dim(0)? == 0 {
        return Ok(f64::NAN);
    }
    let logits = x.to_dtype(DType::F32)?.matmul(&router.to_dtype(DType::F32)?.t()?)?;
    let top = btm_kernels::router::topk_indices(&logits, k)?.to_vec2::<u32>()?;
    Ok(top.iter().filter(|row| row.contains(&(expert as u32))).count() as f64 / top.len() as f64)
}

/// Weighted cross-entropy of a router on features; used by tests to check `fit` improves.
pub fn cross_entropy(router: &Tensor, x: &Tensor, labels: &[u32]) -> Result<f64> {
    let p = softmax(&x.to_dtype(DType::F32)?.matmul(&router.to_dtype(DType::F32)?.t()?)?)?.to_vec2::<f32>()?;
    Ok(labels.iter().zip(&p).map(|(&l, row)| -(row[l as usize].max(1e-30) as f64).ln()).sum::<f64>() / labels.len() as f64)
}

/// Top-1 expert of each token (ties to the lower index, as the router's top-k does).
pub fn top1(router: &Tensor, x: &Tensor) -> Result<Vec<u32>> {
    let logits = x.to_dtype(DType::F32)?.matmul(&router.to_dtype(DType::F32)?.t()?)?;
    Ok(btm_kernels::router::topk_indices(&logits, 1)?.flatten_all()?.to_vec1::<u32>()?)
}

/// Share of `x`'s tokens whose top-1 expert is `expert`.
pub fn share_routed_to(router: &Tensor, x: &Tensor, expert: usize) -> Result<f64> {
    share_in_topk(router, x, expert, 1)
}

/// Routing accuracy per domain: the share of domain e's (held-out) tokens whose top-1 expert is e.
pub fn routing_accuracy(router: &Tensor, heldout: &[Tensor]) -> Result<Vec<f64>> {
    heldout.iter().enumerate().map(|(e, x)| share_routed_to(router, x, e)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two Gaussian clusters in 8 dimensions sharing a large common offset (as hidden states do).
    fn clusters(n: usize, seed: u64) -> Vec<Tensor> {
        let offset = random_rows(1, 8, 3.0, 99).unwrap();
        (0..3)
            .map(|d| {
                let centre = (random_rows(1, 8, 1.0, 10 + d).unwrap() + &offset).unwrap();
                random_rows(n, 8, 0.3, seed + d).unwrap().broadcast_add(&centre).unwrap()
            })
            .collect()
    }

    #[test]
    fn virtual_groups_repeat_rows() {
        let r = virtual_group_router(6, 2, 4, 0.02, 1).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(r[0], r[1]);
        assert_eq!(r[4], r[5]);
        assert_ne!(r[1], r[2]);
        assert!(virtual_group_router(6, 4, 4, 0.02, 1).is_err());
        assert_eq!(random_rows(2, 3, 0.0, 1).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn centroid_reaches_target_probability_and_routes_held_out_tokens() {
        let train = clusters(200, 0);
        let held = clusters(100, 1000);
        let r = centroid_router(&train, 0.8).unwrap();
        assert!((r.own_probability - 0.8).abs() < 1e-3, "{}", r.own_probability);
        let acc = routing_accuracy(&r.weight, &held).unwrap();
        assert!(acc.iter().all(|&a| a > 0.9), "{acc:?}");
        // Unreachable targets are an error, not a silent clamp.
        assert!(centroid_router(&train, 0.2).is_err());
    }

    #[test]
    fn unreachable_target_settles_short_of_hard_routing() {
        // Two heavily overlapping domains: no temperature gives own-probability 0.95.
        let a = random_rows(300, 8, 1.0, 1).unwrap();
        let b = (random_rows(300, 8, 1.0, 2).unwrap() + 0.3).unwrap();
        let r = centroid_router(&[a.clone(), b.clone()], 0.95).unwrap();
        assert!(r.own_probability < 0.95 && r.own_probability > 0.5, "{}", r.own_probability);
        let groups: Vec<ScoreGroup> = [a, b]
            .iter()
            .enumerate()
            .map(|(own, x)| {
                let scaled = x.matmul(&(&r.weight / r.temperature).unwrap().t().unwrap()).unwrap();
                ScoreGroup { fixed: scaled.zeros_like().unwrap(), scaled, own }
            })
            .collect();
        for factor in [10.0, 100.0, 1e4] {
            let harder = mean_own_probability(&groups, r.temperature * factor).unwrap();
            assert!(harder - r.own_probability < 0.05, "τ×{factor}: {harder} vs {}", r.own_probability);
        }
    }

    #[test]
    fn fit_lowers_cross_entropy_from_the_centroid_start() {
        let train = clusters(200, 0);
        let x = Tensor::cat(&train, 0).unwrap();
        let labels: Vec<u32> = (0..3u32).flat_map(|d| std::iter::repeat_n(d, 200)).collect();
        let init = centroid_router(&train, 0.6).unwrap().weight;
        let fitted = fit_softmax_regression(&x, &labels, &vec![1.0; 600], &init, &[true; 3], &FitOptions::default()).unwrap();
        let (before, after) = (cross_entropy(&init, &x, &labels).unwrap(), cross_entropy(&fitted, &x, &labels).unwrap());
        assert!(after < 0.5 * before, "{before} -> {after}");
        // Frozen rows do not move.
        let frozen = fit_softmax_regression(&x, &labels, &vec![1.0; 600], &init, &[false, true, false], &FitOptions::default()).unwrap();
        let diff = |a: usize| {
            (frozen.get(a).unwrap() - init.get(a).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(diff(0) < 1e-4 && diff(2) < 1e-4 && diff(1) > 1e-3);
    }

    #[test]
    fn guard_keeps_old_tokens_out_of_the_top_k_and_the_new_domain_in() {
        let (data, held) = (clusters(300, 0), clusters(200, 1000));
        let old = centroid_router(&data[..2], 0.8).unwrap().weight;
        let (bg, held_bg) = (Tensor::cat(&data[..2], 0).unwrap(), Tensor::cat(&held[..2], 0).unwrap());
        // A row aimed at the new domain alone (no background to centre against) also fires on
        // the old tokens, which share the clusters' common offset.
        let greedy = centroid_new_row(&old, &data[2], None, 0.99).unwrap().weight;
        let unguarded = Tensor::cat(&[&old, &greedy], 0).unwrap();
        assert!(share_in_topk(&unguarded, &held_bg, 2, 2).unwrap() > 0.3);
        for k in [1, 2] {
            let o = GuardOptions { margin: 0.5, top_k: k, ..Default::default() };
            let g = guard_new_row(&old, &data[2], &bg, &greedy, &o).unwrap();
            assert_eq!(g.violations, 0.0, "top-{k}: penalty {}", g.penalty);
            // On every calibration token of the old domains, the row stays δ below the k-th logit …
            let bound = kth_logit(&old, &bg, k).unwrap();
            let r: Vec<f32> = bg.matmul(&g.weight.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(r.iter().zip(&bound).all(|(r, t)| *r <= t - 0.5 + 1e-4), "top-{k}");
            // … held-out old tokens keep their top-k, and the new domain goes to the new expert.
            let router = Tensor::cat(&[&old, &g.weight], 0).unwrap();
            assert!(share_in_topk(&router, &held_bg, 2, k).unwrap() < 0.01, "top-{k}");
            assert!(share_routed_to(&router, &held[2], 2).unwrap() > 0.9, "top-{k}");
        }
        let bad = GuardOptions { margin: -1.0, ..Default::default() };
        assert!(guard_new_row(&old, &data[2], &bg, &greedy, &bad).is_err());
    }

    #[test]
    fn new_row_takes_the_new_domain_and_leaves_the_rest() {
        let data = clusters(200, 0);
        let old = centroid_router(&data[..2], 0.8).unwrap().weight;
        let r = centroid_new_row(&old, &data[2], Some(&Tensor::cat(&data[..2], 0).unwrap()), 0.8).unwrap();
        let router = Tensor::cat(&[&old, &r.weight], 0).unwrap();
        let held = clusters(100, 1000);
        assert!(share_routed_to(&router, &held[2], 2).unwrap() > 0.9);
        assert!(share_routed_to(&router, &held[0], 2).unwrap() < 0.1);
        assert!(share_routed_to(&router, &held[1], 2).unwrap() < 0.1);
    }
}
