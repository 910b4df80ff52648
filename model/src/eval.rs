//! Perplexity by a convention anyone can reproduce with `transformers`:
//! each document is tokenized on its own exactly as `tokenizer.json` says, cut into
//! non-overlapping windows of at most `seq_len` tokens, and every token after the first of
//! each window is predicted (positions restart at 0 in every window); windows shorter than
//! 2 tokens are skipped. NLL is summed in float64.

use crate::error::Result;
use crate::model::Transformer;
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

/// Perplexity over a set of predicted tokens, with the sums it came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Perplexity {
    /// Number of predicted tokens.
    pub tokens: u64,
    /// Summed negative log-likelihood (nats).
    pub nll: f64,
    /// exp(nll / tokens).
    pub ppl: f64,
}

impl Perplexity {
    /// From a token count and summed NLL in nats; `ppl` is NaN when `tokens` is 0.
    pub fn from_sums(tokens: u64, nll: f64) -> Self {
        let ppl = if tokens == 0 { f64::NAN } else { (nll / tokens as f64).exp() };
        Self { tokens, nll, ppl }
    }
}

/// Cut each document's ids into windows of at most `seq_len` tokens, dropping those under 2.
pub fn windows(docs: &[Vec<u32>], seq_len: usize) -> Vec<&[u32]> {
    docs.iter().flat_map(|d| d.chunks(seq_len.max(2))).filter(|w| w.len() >= 2).collect()
}

/// Summed NLL of predicting tokens 1.. of each row of `ids` [B, T] from logits [B, T, V].
pub fn sequence_nll(logits: &Tensor, ids: &Tensor) -> Result<Vec<f64>> {
    let (b, t, _) = logits.dims3()?;
    let logits = logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?.contiguous()?;
    let targets = ids.narrow(1, 1, t - 1)?.unsqueeze(2)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    let picked = logits.gather(&targets.contiguous()?, D::Minus1)?;
    let nll = (lse - picked)?.squeeze(2)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    Ok((0..b).map(|i| nll[i].iter().sum()).collect())
}

/// Perplexity of `model` on already-tokenized documents.
pub fn perplexity_of_ids(model: &Transformer, docs: &[Vec<u32>], seq_len: usize, device: &Device) -> Result<Perplexity> {
    Ok(score(model, docs, seq_len, device, false)?.0)
}

/// Perplexity, and for an MoE the share of token-expert assignments each expert received in
/// each MoE layer (`[layer][expert]`, each row summing to 1) when `routing` is set.
pub fn score(
    model: &Transformer,
    docs: &[Vec<u32>],
    seq_len: usize,
    device: &Device,
    routing: bool,
) -> Result<(Perplexity, Option<Vec<Vec<f64>>>)> {
    let windows = windows(docs, seq_len);
    // Batch windows of equal length; full windows are the common case.
    let mut by_len: std::collections::BTreeMap<usize, Vec<&[u32]>> = Default::default();
    for w in windows {
        by_len.entry(w.len()).or_default().push(w);
    }
    const BATCH: usize = 16;
    let experts = model.config().moe.as_ref().map(|m| m.experts);
    let mut counts: Vec<Vec<f64>> = vec![];
    let (mut tokens, mut nll) = (0u64, 0f64);
    for (len, group) in by_len {
        for batch in group.chunks(BATCH) {
            let flat: Vec<u32> = batch.iter().flat_map(|w| w.iter().copied()).collect();
            let ids = Tensor::from_vec(flat, (batch.len(), len), device)?;
            let mut trace = crate::model::Trace::default();
            let logits = model.forward_traced(&ids, &mut trace)?;
            nll += sequence_nll(&logits, &ids)?.iter().sum::<f64>();
            tokens += (batch.len() * (len - 1)) as u64;
            if let (true, Some(e)) = (routing, experts) {
                counts.resize(trace.router.len(), vec![0.0; e]);
                for (layer, r) in trace.router.iter().enumerate() {
                    let c = btm_kernels::router::expert_counts(&r.routed.experts, e)?;
                    for (acc, x) in counts[layer].iter_mut().zip(c) {
                        *acc += x as f64;
                    }
                }
            }
        }
    }
    let shares = (routing && experts.is_some()).then(|| {
        counts
            .into_iter()
            .map(|row| {
                let total: f64 = row.iter().sum::<f64>().max(1.0);
                row.into_iter().map(|c| c / total).collect()
            })
            .collect()
    });
    Ok((Perplexity::from_sums(tokens, nll), shares))
}

/// Perplexity of `model` on raw texts, tokenized one document at a time.
pub fn perplexity(model: &Transformer, tok: &Tokenizer, texts: &[String], seq_len: usize, device: &Device) -> Result<Perplexity> {
    let docs = texts.iter().map(|t| crate::tokenizer::encode(tok, t)).collect::<Result<Vec<_>>>()?;
    perplexity_of_ids(model, &docs, seq_len, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_skip_singletons() {
        let docs = vec![vec![1, 2, 3, 4, 5], vec![7], vec![8, 9]];
        let w = windows(&docs, 2);
        assert_eq!(w, vec![&[1, 2][..], &[3, 4][..], &[8, 9][..]]);
    }
}
