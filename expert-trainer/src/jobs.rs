//! The specs of the jobs besides training that read data with the trainer's readers: tokenizer
//! training (`btm tokenizer train`), evaluation (`btm eval`) and parameter averaging
//! (`btm average`).
//!
//! Each is one definition of the job: serde for the job file a pipeline's plan writes
//! (`btm <command> --spec FILE`), JSON Schema, and the command's flags, which flatten into the same
//! struct. A default is written once, as a constant both read.

use crate::device::{DType, Device};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Tokens in a trained tokenizer's vocabulary, special tokens included.
pub const DEFAULT_VOCAB_SIZE: usize = 8192;
/// Window length of an evaluation, and of the prior an average estimates.
pub const DEFAULT_SEQ_LEN: usize = 128;

fn default_text_key() -> String {
    crate::sources::DEFAULT_TEXT_KEY.to_string()
}
fn default_vocab_size() -> usize {
    DEFAULT_VOCAB_SIZE
}
fn default_seq_len() -> usize {
    DEFAULT_SEQ_LEN
}

/// `btm tokenizer train`: a byte-level BPE tokenizer (`<s>` = 0 is prepended, `</s>` = 1 ends
/// documents).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpec {
    /// Text sources: JSONL (`.jsonl`, `.gz`, `.zst`), parquet (a file, a folder of shards or
    /// a `*` glob), paths or URLs.
    #[arg(long, num_args = 1.., required = true)]
    #[serde(default)]
    pub data: Vec<PathBuf>,
    /// The JSON field or parquet column holding the text.
    #[arg(long, default_value = crate::sources::DEFAULT_TEXT_KEY)]
    #[serde(default = "default_text_key")]
    pub text_key: String,
    /// Tokens in the vocabulary, special tokens included.
    #[arg(long, default_value_t = DEFAULT_VOCAB_SIZE)]
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Use at most this many documents per file.
    #[arg(long)]
    #[serde(default)]
    pub max_docs: Option<usize>,
    /// Where to write tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
}

/// `btm eval`: perplexity by the convention in `btm_model::eval`, of a model or an ensemble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Model directory or object-store URL (file://, s3://, gs://, az://).
    #[arg(long, required_unless_present = "ensemble", conflicts_with = "ensemble")]
    #[serde(default)]
    pub model: Option<String>,
    /// Score the ensemble of these dense experts instead (BTM's ELMforest): each token predicted
    /// by their mixture weighted by the domain posterior (`btm_model::ensemble`).
    #[arg(long, num_args = 1..)]
    #[serde(default)]
    pub ensemble: Vec<String>,
    /// Estimate the ensemble's prior from this held-out JSONL (default: uniform).
    #[arg(long, requires = "ensemble")]
    #[serde(default)]
    pub prior_from: Option<PathBuf>,
    /// Mix only the K members of largest weight at each position (posterior, or with
    /// --clusters the cluster weight).
    #[arg(long, requires = "ensemble")]
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Weigh the members by c-BTM's cluster weights instead of the posterior: at each position,
    /// softmax(−‖e − c_j‖²/T) of the context's embedding by the clusterer `btm cluster` saved in
    /// this folder. Member i is cluster i's expert.
    #[arg(long, requires = "ensemble", conflicts_with = "prior_from")]
    #[serde(default)]
    pub clusters: Option<PathBuf>,
    /// With --clusters: the temperature T (default: the clusterer's; c-BTM's is 0.1).
    #[arg(long, requires = "clusters")]
    #[serde(default)]
    pub temperature: Option<f32>,
    /// JSONL file with a `text` field per line (a path or an object-store URL).
    #[arg(long)]
    pub data: PathBuf,
    /// Longest window, in tokens; documents are cut into non-overlapping windows.
    #[arg(long, default_value_t = DEFAULT_SEQ_LEN)]
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Score only the first N documents.
    #[arg(long)]
    #[serde(default)]
    pub max_docs: Option<usize>,
    /// Use at most N tokens of text: documents in file order, the last one cut short.
    #[arg(long)]
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Print one JSON line {"tokens", "nll", "ppl"}.
    #[arg(long)]
    #[serde(default)]
    pub json: bool,
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = DType::default())]
    #[serde(default)]
    pub dtype: DType,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = Device::default())]
    #[serde(default)]
    pub device: Device,
    /// For an MoE, also report each layer's share of tokens per expert (`routing` in the JSON).
    #[arg(long)]
    #[serde(default)]
    pub routing: bool,
    /// Also write the JSON result to this file (atomically) or object-store URL.
    #[arg(long)]
    #[serde(default)]
    pub out: Option<PathBuf>,
}

/// `btm average`: the parameter average of dense experts, weighted as given or by the
/// ensemble's domain prior.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct AverageSpec {
    /// Dense experts of one architecture and tokenizer (directories or object-store URLs).
    #[arg(long, num_args = 2.., required = true)]
    #[serde(default)]
    pub experts: Vec<String>,
    /// Weights: the ensemble's domain prior estimated on this held-out JSONL of the target domain.
    #[arg(long, conflicts_with = "weights", required_unless_present = "weights")]
    #[serde(default)]
    pub weights_from: Option<PathBuf>,
    /// Weights given, one per expert (normalised to sum to 1).
    #[arg(long, num_args = 1..)]
    #[serde(default)]
    pub weights: Vec<f64>,
    /// Window length for estimating the prior.
    #[arg(long, default_value_t = DEFAULT_SEQ_LEN)]
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// The averaged model's folder (Hugging Face layout; written atomically, manifest last).
    #[arg(long)]
    pub out: PathBuf,
    /// Where the domain posterior is scored.
    #[arg(long, value_enum, default_value_t = Device::default())]
    #[serde(default)]
    pub device: Device,
}

/// The eval job of a plan: one model (or ensemble), `base`, scored on several domains, each with
/// its own text, output and (for an ensemble) prior's text: one job per model rather than one
/// per model and domain, so a run's jobs grow linearly with its domains. With no `domains`,
/// `base` is scored as it stands (the command's flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalBatch {
    pub base: EvalSpec,
    #[serde(default)]
    pub domains: Vec<EvalDomain>,
}

/// One domain of an [`EvalBatch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalDomain {
    /// JSONL text to score.
    pub data: PathBuf,
    /// Where the JSON result goes.
    pub out: PathBuf,
    /// The ensemble prior's held-out text for this domain.
    #[serde(default)]
    pub prior_from: Option<PathBuf>,
}

impl EvalBatch {
    /// The evaluations this batch runs, in order.
    pub fn specs(&self) -> Vec<EvalSpec> {
        if self.domains.is_empty() {
            return vec![self.base.clone()];
        }
        let each = |d: &EvalDomain| EvalSpec {
            data: d.data.clone(),
            out: Some(d.out.clone()),
            prior_from: d.prior_from.clone().or_else(|| self.base.prior_from.clone()),
            ..self.base.clone()
        };
        self.domains.iter().map(each).collect()
    }
}
