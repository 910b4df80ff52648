//! BTM's own model: the ensemble of domain experts (ELMforest; Li et al. 2022, "Branch-Train-
//! Merge", §4), and its parameter average.
//!
//! Each token is predicted by the experts' mixture weighted by the domain posterior:
//!
//! ```text
//! p(x_t | x_<t) = Σ_j p_j(x_t | x_<t) · P(D = j | x_<t)
//! P(D = j | x_<t) ∝ p_j(x_<t) · P(D = j)          p_j(x_<t) = Π_{s<t} p_j(x_s | x_<s)
//! ```
//!
//! within each evaluation window (the convention of [`crate::eval`]: the window's first token
//! is given, so at t = 1 the posterior is the prior). With `top_k`, only the k experts of
//! largest posterior at each position are mixed, their weights renormalised. Everything is
//! in log space (log-sum-exp), float64.
//!
//! The prior P(D = j) is uniform, or estimated from held-out text ([`estimate_prior`]): the mean
//! over its first [`PRIOR_WINDOWS`] windows of each window's posterior after the whole window,
//! starting from a uniform prior. (The paper uses 100 sequences and an exponential moving
//! average of posteriors; with one pass over a fixed set the plain mean is that average's
//! limit and independent of the windows' order.)
//!
//! The parameter average θ = Σ_j w_j θ_j ([`average`]), with w the same estimated prior, is
//! the paper's cheaper form: one dense model for a target domain.

use crate::error::{Error, Result};
use crate::eval::{windows, Perplexity};
use crate::model::Transformer;
use crate::{Checkpoint, ModelConfig};
use candle_core::{DType, Device, Tensor, D};

/// Held-out windows a prior is estimated from (Li et al. use 100 sequences).
pub const PRIOR_WINDOWS: usize = 100;

/// log p(x_t | x_<t) for t = 1.. of each window, one model.
pub fn token_logprobs(model: &Transformer, windows: &[&[u32]], device: &Device) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::with_capacity(windows.len());
    for w in windows {
        let ids = Tensor::from_slice(w, (1, w.len()), device)?;
        let logits = model.forward(&ids)?.squeeze(0)?.to_dtype(DType::F32)?;
        let t = w.len() - 1;
        let logits = logits.narrow(0, 0, t)?.contiguous()?;
        let max = logits.max_keepdim(D::Minus1)?;
        let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
        let targets = Tensor::from_slice(&w[1..], (t, 1), device)?;
        let picked = logits.gather(&targets, D::Minus1)?;
        let lp = (picked - lse)?.squeeze(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        out.push(lp);
    }
    Ok(out)
}

fn log_sum_exp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + xs.map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// The ensemble's summed NLL over one window, from each member's token log-probabilities
/// `lp[j][t]` and the log prior; with `top_k`, only that many members are mixed per position.
pub fn window_nll(lp: &[&[f64]], log_prior: &[f64], top_k: Option<usize>) -> f64 {
    let members = lp.len();
    // log P(D = j) + log p_j(x_<t), accumulated along the window.
    let mut log_post: Vec<f64> = log_prior.to_vec();
    let mut nll = 0.0;
    // Position-major over member-major data: the index is the clearest loop here.
    #[allow(clippy::needless_range_loop)]
    for pos in 0..lp[0].len() {
        let norm = log_sum_exp(log_post.iter().copied());
        let mut weights: Vec<(usize, f64)> = log_post.iter().map(|&l| l - norm).enumerate().collect();
        if let Some(k) = top_k.filter(|&k| k < members) {
            weights.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            weights.truncate(k);
            let renorm = log_sum_exp(weights.iter().map(|w| w.1));
            weights.iter_mut().for_each(|w| w.1 -= renorm);
        }
        nll -= log_sum_exp(weights.iter().map(|&(j, w)| w + lp[j][pos]));
        for (j, l) in log_post.iter_mut().enumerate() {
            *l += lp[j][pos];
        }
    }
    nll
}

/// What an ensemble evaluation measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EnsembleResult {
    /// The ensemble's perplexity (its fields appear at the top level in JSON).
    #[serde(flatten)]
    pub perplexity: Perplexity,
    /// The prior used, one weight per member.
    pub weights: Vec<f64>,
    /// Members mixed per position (those of largest posterior); `None` = all.
    pub top_k: Option<usize>,
}

/// Check that the members can form an ensemble: one vocabulary and tokenizer.
pub fn check_members(members: &[Checkpoint]) -> Result<()> {
    let Some(first) = members.first() else {
        return Err(Error::Unsupported("an ensemble needs at least one member".into()));
    };
    let vocab = first.tokenizer()?.get_vocab(true);
    for (i, m) in members.iter().enumerate().skip(1) {
        if m.config.vocab_size != first.config.vocab_size {
            return Err(Error::Unsupported(format!(
                "ensemble member {i}: vocabulary of {} tokens, member 0 has {}",
                m.config.vocab_size, first.config.vocab_size
            )));
        }
        if m.tokenizer()?.get_vocab(true) != vocab {
            return Err(Error::Unsupported(format!("ensemble member {i}: its tokenizer differs from member 0's")));
        }
    }
    Ok(())
}

/// The prior from held-out documents: the mean posterior after each of the first
/// [`PRIOR_WINDOWS`] windows, from a uniform start.
pub fn estimate_prior(models: &[Transformer], docs: &[Vec<u32>], seq_len: usize, device: &Device) -> Result<Vec<f64>> {
    let ws: Vec<&[u32]> = windows(docs, seq_len).into_iter().take(PRIOR_WINDOWS).collect();
    if ws.is_empty() {
        return Err(Error::Unsupported("no window of at least 2 tokens to estimate the prior from".into()));
    }
    let lps = models.iter().map(|m| token_logprobs(m, &ws, device)).collect::<Result<Vec<_>>>()?;
    let mut prior = vec![0.0; models.len()];
    for w in 0..ws.len() {
        let totals: Vec<f64> = lps.iter().map(|lp| lp[w].iter().sum()).collect();
        let norm = log_sum_exp(totals.iter().copied());
        for (p, t) in prior.iter_mut().zip(&totals) {
            *p += (t - norm).exp() / ws.len() as f64;
        }
    }
    Ok(prior)
}

/// Perplexity of the ensemble of `models` with `prior` on tokenized documents.
pub fn perplexity(
    models: &[Transformer],
    prior: &[f64],
    top_k: Option<usize>,
    docs: &[Vec<u32>],
    seq_len: usize,
    device: &Device,
) -> Result<EnsembleResult> {
    if prior.len() != models.len() || prior.iter().any(|p| !(p.is_finite() && *p >= 0.0)) || prior.iter().sum::<f64>() <= 0.0 {
        return Err(Error::Unsupported(format!("ensemble prior {prior:?} for {} members", models.len())));
    }
    let total: f64 = prior.iter().sum();
    let log_prior: Vec<f64> = prior.iter().map(|p| (p / total).ln()).collect();
    let ws = windows(docs, seq_len);
    let lps = models.iter().map(|m| token_logprobs(m, &ws, device)).collect::<Result<Vec<_>>>()?;
    let (mut tokens, mut nll) = (0u64, 0f64);
    for w in 0..ws.len() {
        let member: Vec<&[f64]> = lps.iter().map(|lp| lp[w].as_slice()).collect();
        nll += window_nll(&member, &log_prior, top_k);
        tokens += member[0].len() as u64;
    }
    Ok(EnsembleResult { perplexity: Perplexity::from_sums(tokens, nll), weights: prior.iter().map(|p| p / total).collect(), top_k })
}

/// θ = Σ_j w_j θ_j over every tensor of `members` (same architecture and shapes), in float32.
/// Returns the config and a tensor getter for [`crate::write_checkpoint`].
pub fn average<'a>(members: &'a [Checkpoint], weights: &'a [f64]) -> Result<(ModelConfig, impl FnMut(&str) -> Result<Tensor> + 'a)> {
    let Some(first) = members.first() else {
        return Err(Error::Unsupported("averaging needs at least one model".into()));
    };
    if weights.len() != members.len() {
        return Err(Error::Unsupported(format!("{} weights for {} models", weights.len(), members.len())));
    }
    let specs = first.tensor_specs();
    for (i, m) in members.iter().enumerate().skip(1) {
        let other = m.tensor_specs();
        if other.len() != specs.len() || other.iter().zip(&specs).any(|(a, b)| a.name != b.name || a.shape != b.shape) {
            return Err(Error::Unsupported(format!(
                "model {i} does not have model 0's architecture and shapes; only like models can be averaged"
            )));
        }
    }
    check_members(members)?;
    let total: f64 = weights.iter().sum();
    let get = move |name: &str| -> Result<Tensor> {
        let mut acc: Option<Tensor> = None;
        for (m, w) in members.iter().zip(weights) {
            let t = (m.tensor(name)?.to_dtype(DType::F32)? * (w / total))?;
            acc = Some(match acc {
                None => t,
                Some(a) => (a + t)?,
            });
        }
        Ok(acc.expect("at least one member"))
    };
    Ok((first.config.clone(), get))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mixture by hand: two members, two positions.
    #[test]
    fn window_nll_mixes_by_the_running_posterior() {
        let (a, b) = ([0.5f64.ln(), 0.25f64.ln()], [0.25f64.ln(), 0.5f64.ln()]);
        let prior = [0.75f64.ln(), 0.25f64.ln()];
        // t = 1: posterior = prior; t = 2: ∝ prior · p(x_1).
        let p1: f64 = 0.75 * 0.5 + 0.25 * 0.25;
        let (w_a, w_b): (f64, f64) = (0.75 * 0.5, 0.25 * 0.25);
        let p2: f64 = (w_a * 0.25 + w_b * 0.5) / (w_a + w_b);
        let want = -(p1.ln() + p2.ln());
        let got = window_nll(&[&a, &b], &prior, None);
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // Top-1 keeps the member of largest posterior: a, both times.
        let top1 = window_nll(&[&a, &b], &prior, Some(1));
        assert!((top1 - -(0.5f64.ln() + 0.25f64.ln())).abs() < 1e-12);
        // One member is that member.
        assert!((window_nll(&[&a], &[0.0], None) - -(a[0] + a[1])).abs() < 1e-12);
    }
}
