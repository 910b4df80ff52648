//! `btm eval`: perplexity by the convention in `btm_model::eval`.

use anyhow::{Context, Result};
use btm_model::Checkpoint;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// Model directory or object-store URL (file://, s3://, gs://, az://).
    #[arg(long)]
    model: String,
    /// JSONL file with a `text` field per line (a path or an object-store URL).
    #[arg(long)]
    data: PathBuf,
    /// Longest window, in tokens; documents are cut into non-overlapping windows.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Score only the first N documents.
    #[arg(long)]
    max_docs: Option<usize>,
    /// Use at most N tokens of text: documents in file order, the last one cut short.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Print one JSON line {"tokens", "nll", "ppl"}.
    #[arg(long)]
    json: bool,
    /// Compute dtype.
    #[arg(long, default_value = "float32")]
    dtype: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// For an MoE, also report each layer's share of tokens per expert (`routing` in the JSON).
    #[arg(long)]
    routing: bool,
    /// Also write the JSON result to this file (atomically) or object-store URL.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    anyhow::ensure!(args.seq_len >= 2, "--seq-len must be at least 2");
    let dir = btm_model::storage::local_dir(&args.model)?;
    let ckpt = Checkpoint::open(&dir).with_context(|| format!("opening model {}", args.model))?;
    let device = super::device(&args.device)?;
    let model = ckpt.load_model(super::dtype(&args.dtype)?, &device)?;
    let tokenizer = ckpt.tokenizer()?;
    // Data given as an object-store URL is fetched into the local cache.
    let data = btm_model::folder::fetch_file(&args.data.to_string_lossy())?;
    let texts = btm_model::jsonl::read_texts(&data, args.max_docs)?;
    anyhow::ensure!(!texts.is_empty(), "{}: no documents", args.data.display());
    let start = std::time::Instant::now();
    let mut docs = texts
        .iter()
        .map(|t| btm_model::tokenizer::encode(&tokenizer, t))
        .collect::<btm_model::Result<Vec<_>>>()?;
    if let Some(cap) = args.max_tokens {
        anyhow::ensure!(cap > 0, "--max-tokens must be positive");
        truncate_to_tokens(&mut docs, cap);
    }
    let (p, routing) = btm_model::eval::score(&model, &docs, args.seq_len, &device, args.routing)?;
    let mut result = serde_json::to_value(p)?;
    if let Some(shares) = &routing {
        result["routing"] = serde_json::to_value(shares)?;
    }
    if let Some(out) = &args.out {
        // A local file is written in place; an object-store URL is uploaded.
        let output = btm_model::folder::Output::new(&out.to_string_lossy())?;
        let tmp = output.path().with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&result)?)?;
        std::fs::rename(&tmp, output.path())?;
        output.publish()?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "{}: {} documents, {} predicted tokens, nll {:.4}, perplexity {:.4} ({:.1}s)",
            args.data.display(),
            docs.len(),
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
