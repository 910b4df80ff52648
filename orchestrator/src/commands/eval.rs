//! `btm eval`: perplexity by the convention in `btm_model::eval`.

use anyhow::{Context, Result};
use btm_model::Checkpoint;
use btm_trainer::jobs::{EvalBatch, EvalSpec};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// The evaluation's job file (JSON or YAML, the keys of the flags below), as a pipeline's
    /// plan writes it; instead of the flags.
    #[arg(long, exclusive = true)]
    spec: Option<PathBuf>,
    #[command(flatten)]
    flags: Option<EvalSpec>,
}

impl EvalArgs {
    /// The job's spec: its file (a batch of domains), or the flags (one evaluation).
    pub fn into_spec(self) -> Result<EvalBatch> {
        let flags = self.flags.map(|base| EvalBatch { base, domains: vec![] });
        super::spec_or_flags(self.spec.as_deref(), flags)
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    let specs = args.into_spec()?.specs();
    // Every evaluation of a batch scores the same model (or ensemble) on the same device; only
    // the text and the output differ. Loading it once matters: a 1,024-expert MoE loaded again
    // for each of 1,024 small domains took most of a wide run's time.
    let scorer = Scorer::open(&specs[0])?;
    for spec in &specs {
        scorer.score(spec)?;
    }
    Ok(())
}

/// What a batch scores, loaded once: a model, an ensemble, or a cluster-routed ensemble.
struct Scorer {
    device: candle_core::Device,
    tokenizer: btm_model::tokenizer::Tokenizer,
    models: Vec<btm_model::Transformer>,
    kind: ScorerKind,
}

enum ScorerKind {
    Model,
    Ensemble,
    Clustered(Box<btm_cluster::Clusterer>),
}

impl Scorer {
    /// Check the arguments the batch shares and load its models.
    fn open(args: &EvalSpec) -> Result<Self> {
        anyhow::ensure!(args.model.is_some() == args.ensemble.is_empty(), "give --model or --ensemble, one of them");
        anyhow::ensure!(args.seq_len >= 2, "--seq-len must be at least 2");
        let device = args.device.open()?;
        let dtype = args.dtype.candle();
        let kind = match &args.clusters {
            Some(dir) => {
                let mut clusterer = btm_cluster::Clusterer::load(dir)?;
                if let Some(t) = args.temperature {
                    clusterer = clusterer.with_temperature(t)?;
                }
                anyhow::ensure!(
                    clusterer.k() == args.ensemble.len(),
                    "--clusters {}: {} clusters but {} ensemble members (member i is cluster i's expert)",
                    dir.display(),
                    clusterer.k(),
                    args.ensemble.len()
                );
                ScorerKind::Clustered(Box::new(clusterer))
            }
            None if args.ensemble.is_empty() => ScorerKind::Model,
            None => ScorerKind::Ensemble,
        };
        if !args.ensemble.is_empty() {
            if let Some(k) = args.top_k {
                let n = args.ensemble.len();
                anyhow::ensure!(k >= 1 && k <= n, "--top-k {k}: must be between 1 and the {n} members");
            }
        }
        let members = match &args.model {
            Some(name) => vec![open_model(name)?],
            None => open_members(&args.ensemble)?,
        };
        let models = members.iter().map(|m| Ok(m.load_model(dtype, &device)?)).collect::<Result<Vec<_>>>()?;
        let tokenizer = members[0].tokenizer()?;
        Ok(Self { device, tokenizer, models, kind })
    }

    /// One evaluation: the loaded model(s) on `args.data`, reported as `args` says.
    fn score(&self, args: &EvalSpec) -> Result<()> {
        match &self.kind {
            ScorerKind::Model => self.score_model(args),
            ScorerKind::Ensemble => self.score_ensemble(args),
            ScorerKind::Clustered(clusterer) => self.score_clustered(clusterer, args),
        }
    }

    fn score_model(&self, args: &EvalSpec) -> Result<()> {
        // Data given as an object-store URL is fetched into the local cache.
        let start = std::time::Instant::now();
        let docs = tokenized(&args.data, &self.tokenizer, args.max_docs, args.max_tokens)?;
        let (p, routing) = btm_model::eval::score(&self.models[0], &docs, args.seq_len, &self.device, args.routing)?;
        let mut result = serde_json::to_value(p)?;
        if let Some(shares) = &routing {
            result["routing"] = serde_json::to_value(shares)?;
        }
        report(args, &result, docs.len(), p, start)
    }

    fn score_ensemble(&self, args: &EvalSpec) -> Result<()> {
        let (models, tokenizer, device) = (&self.models, &self.tokenizer, &self.device);
        let start = std::time::Instant::now();
        let prior = match &args.prior_from {
            None => vec![1.0; models.len()],
            Some(path) => {
                let held_out = tokenized(path, tokenizer, args.max_docs, args.max_tokens)?;
                btm_model::ensemble::estimate_prior(models, &held_out, args.seq_len, device)?
            }
        };
        let docs = tokenized(&args.data, tokenizer, args.max_docs, args.max_tokens)?;
        let r = btm_model::ensemble::perplexity(models, &prior, args.top_k, &docs, args.seq_len, device)?;
        let mut result = serde_json::to_value(&r)?;
        result["members"] = serde_json::to_value(&args.ensemble)?;
        report(args, &result, docs.len(), r.perplexity, start)
    }

    /// c-BTM's ensemble (Gururangan et al. 2023, §2.3): each token is predicted by the members'
    /// mixture weighted by the clusterer's weights of its context, the window's tokens before it
    /// decoded to text (`sequence_scorer_btm.py`'s `_get_context_clusters`, whose first position's
    /// context is empty), kept to the `--top-k` largest:
    /// `p(x_t | x_<t) = Σ_j w_j(x_<t) · p_j(x_t | x_<t)`, `w(x) = softmax(−‖e(x) − c_j‖² / T)`.
    fn score_clustered(&self, clusterer: &btm_cluster::Clusterer, args: &EvalSpec) -> Result<()> {
        let (models, tokenizer, device) = (&self.models, &self.tokenizer, &self.device);
        let dir = args.clusters.as_ref().context("--clusters")?;
        let k = models.len();
        let start = std::time::Instant::now();
        let docs = tokenized(&args.data, tokenizer, args.max_docs, args.max_tokens)?;
        let windows = btm_model::eval::windows(&docs, args.seq_len);
        let lps = models.iter().map(|m| btm_model::ensemble::token_logprobs(m, &windows, device)).collect::<btm_model::Result<Vec<_>>>()?;
        let (mut tokens, mut nll, mut mean) = (0u64, 0f64, vec![0f64; k]);
        for (w, window) in windows.iter().enumerate() {
            for t in 1..window.len() {
                let context = tokenizer.decode(&window[..t], true).map_err(|e| anyhow::anyhow!("decoding a context: {e}"))?;
                let weights = clusterer.weights(&context, args.top_k);
                // log Σ_j w_j p_j, over the members with weight.
                let terms: Vec<f64> = (0..k).filter(|&j| weights[j] > 0.0).map(|j| f64::from(weights[j]).ln() + lps[j][w][t - 1]).collect();
                let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                nll -= max + terms.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                mean.iter_mut().zip(&weights).for_each(|(m, &x)| *m += f64::from(x));
                tokens += 1;
            }
        }
        let p = btm_model::eval::Perplexity::from_sums(tokens, nll);
        let mut result = serde_json::to_value(p)?;
        result["members"] = serde_json::to_value(&args.ensemble)?;
        result["clusters"] = serde_json::json!(dir.display().to_string());
        // The temperature in its shortest decimal form (0.1, not 0.10000000149011612).
        result["temperature"] = serde_json::json!(clusterer.temperature().to_string().parse::<f64>()?);
        result["top_k"] = serde_json::json!(args.top_k);
        // The mean weight each member got over the predicted tokens.
        result["weights"] = serde_json::to_value(mean.iter().map(|m| m / tokens.max(1) as f64).collect::<Vec<_>>())?;
        report(args, &result, docs.len(), p, start)
    }
}

/// The model folder or URL `name` (a URL is fetched into the local cache).
fn open_model(name: &str) -> Result<Checkpoint> {
    Checkpoint::open(btm_model::storage::local_dir(name)?).with_context(|| format!("opening model {name}"))
}

/// Members of an ensemble (or of an average), checked to share one tokenizer.
pub fn open_members(names: &[String]) -> Result<Vec<Checkpoint>> {
    let members = names.iter().map(|m| open_model(m)).collect::<Result<Vec<_>>>()?;
    btm_model::ensemble::check_members(&members)?;
    Ok(members)
}

/// The first `max_docs` documents of a JSONL file (path or URL), each tokenized on its own,
/// cut to `max_tokens` tokens in all.
pub fn tokenized(
    path: &std::path::Path,
    tokenizer: &btm_model::tokenizer::Tokenizer,
    max_docs: Option<usize>,
    max_tokens: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    let data = btm_model::folder::fetch_file(&path.to_string_lossy())?;
    let texts = btm_model::jsonl::read_texts(&data, max_docs)?;
    anyhow::ensure!(!texts.is_empty(), "{}: no documents", path.display());
    let mut docs = texts.iter().map(|t| btm_model::tokenizer::encode(tokenizer, t)).collect::<btm_model::Result<Vec<_>>>()?;
    if let Some(cap) = max_tokens {
        anyhow::ensure!(cap > 0, "--max-tokens must be positive");
        truncate_to_tokens(&mut docs, cap);
    }
    Ok(docs)
}

/// Write `result` where `--out` says, print it as `--json` or a line.
fn report(
    args: &EvalSpec,
    result: &serde_json::Value,
    docs: usize,
    p: btm_model::eval::Perplexity,
    start: std::time::Instant,
) -> Result<()> {
    if let Some(out) = &args.out {
        // A local file is written in place; an object-store URL is uploaded.
        let output = btm_model::folder::Output::new(&out.to_string_lossy())?;
        btm_model::publish::write_file(output.path(), &serde_json::to_vec_pretty(&result)?)?;
        output.publish()?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "{}: {} documents, {} predicted tokens, nll {:.4}, perplexity {:.4} ({:.1}s)",
            args.data.display(),
            docs,
            p.tokens,
            p.nll,
            p.ppl,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Keep documents in order until they hold `cap` tokens; the last kept one is cut to fit.
fn truncate_to_tokens(docs: &mut Vec<Vec<u32>>, cap: usize) {
    let mut left = cap;
    let mut keep = 0;
    for doc in docs.iter_mut() {
        if left == 0 {
            break;
        }
        doc.truncate(left);
        left -= doc.len();
        keep += 1;
    }
    docs.truncate(keep);
}

#[cfg(test)]
mod tests {
    use super::truncate_to_tokens;

    #[test]
    fn max_tokens_cuts_the_last_document() {
        let mut docs = vec![vec![1; 5], vec![2; 10], vec![3; 4]];
        truncate_to_tokens(&mut docs, 8);
        assert_eq!(docs, vec![vec![1; 5], vec![2; 3]]);
        let mut all = vec![vec![1; 5], vec![2; 3]];
        truncate_to_tokens(&mut all, 100);
        assert_eq!(all, vec![vec![1; 5], vec![2; 3]]);
    }
}
