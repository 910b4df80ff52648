//! [`ClusterSpec`]: the job spec of `btm cluster` (serde for the job file a pipeline's plan
//! writes, JSON Schema, and with the `clap` feature the command's flags, one definition).

use crate::{DiscoverOptions, FitOptions, TfidfOptions};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `btm cluster`: fit a clusterer on unlabelled text and split the text by cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Text sources: JSONL (.jsonl, .gz, .zst) or parquet (a file, a folder of shards or a `*`
    /// glob), paths or URLs; their documents in order, file after file.
    #[cfg_attr(feature = "clap", arg(long, num_args = 1..))]
    pub data: Vec<String>,
    /// Clusters: one expert's training data each.
    #[cfg_attr(feature = "clap", arg(long))]
    pub k: usize,
    /// The folder to write (assignments.jsonl, cluster-<i>/{train,valid,test}.jsonl, the
    /// clusterer, summary.json); published whole when done.
    #[cfg_attr(feature = "clap", arg(long))]
    pub out: PathBuf,
    /// The JSON field or parquet column holding the text.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = DiscoverOptions::default().text_key))]
    #[serde(default = "default_text_key")]
    pub text_key: String,
    /// Fit on a uniform sample of this many documents (all of them when fewer).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = DiscoverOptions::default().sample))]
    #[serde(default = "default_sample")]
    pub sample: usize,
    /// Seed of the sample, the SVD and k-means, and the splits.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = FitOptions::default().seed))]
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Temperature of the mixture weights the clusterer gives new text (c-BTM: 0.1).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = FitOptions::default().temperature))]
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Balanced k-means, every cluster of the fit within a size bound (c-BTM; the default).
    #[cfg_attr(feature = "clap", arg(long, conflicts_with = "plain"))]
    #[serde(default)]
    pub balanced: bool,
    /// Plain k-means: clusters as large as the data makes them.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub plain: bool,
    /// Balanced: no cluster above ⌈B·n/k⌉ of the n sample documents (1: equal sizes).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = DEFAULT_BALANCE))]
    #[serde(default = "default_balance")]
    pub balance: f64,
    /// Shares of each cluster's train, valid and test splits.
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ',', default_value = "0.9,0.05,0.05"))]
    #[serde(default = "default_split_fractions")]
    pub split_fractions: Vec<f64>,
    /// Dimensions of the truncated SVD.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = FitOptions::default().dims))]
    #[serde(default = "default_dims")]
    pub dims: usize,
    /// Keep only terms in at least this many sample documents.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TfidfOptions::default().min_df))]
    #[serde(default = "default_min_df")]
    pub min_df: usize,
    /// Keep at most this many terms, the most frequent (0: all).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TfidfOptions::default().max_features.unwrap_or(0)))]
    #[serde(default = "default_max_features")]
    pub max_features: usize,
    /// Weigh a term by 1 + ln(count) instead of its count.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub sublinear_tf: bool,
    /// Replace --out if it exists.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default)]
    pub overwrite: bool,
}

/// Balanced k-means' bound: equal sizes.
pub const DEFAULT_BALANCE: f64 = 1.0;

fn default_text_key() -> String {
    DiscoverOptions::default().text_key
}
fn default_sample() -> usize {
    DiscoverOptions::default().sample
}
fn default_seed() -> u64 {
    FitOptions::default().seed
}
fn default_temperature() -> f32 {
    FitOptions::default().temperature
}
fn default_balance() -> f64 {
    DEFAULT_BALANCE
}
fn default_split_fractions() -> Vec<f64> {
    DiscoverOptions::default().split_fractions.to_vec()
}
fn default_dims() -> usize {
    FitOptions::default().dims
}
fn default_min_df() -> usize {
    TfidfOptions::default().min_df
}
fn default_max_features() -> usize {
    TfidfOptions::default().max_features.unwrap_or(0)
}

impl ClusterSpec {
    /// `k` clusters of `data` into `out`; the rest at its defaults.
    pub fn new(data: Vec<String>, k: usize, out: PathBuf) -> Self {
        serde_json::from_value(serde_json::json!({ "data": data, "k": k, "out": out })).expect("every other field has a default")
    }

    /// The discovery this spec asks for.
    pub fn options(&self) -> anyhow::Result<DiscoverOptions> {
        let split_fractions: [f64; 3] = self
            .split_fractions
            .as_slice()
            .try_into()
            .map_err(|_| anyhow::anyhow!("split_fractions takes three numbers (train, valid, test), not {:?}", self.split_fractions))?;
        Ok(DiscoverOptions {
            fit: FitOptions {
                k: self.k,
                dims: self.dims,
                tfidf: TfidfOptions {
                    sublinear_tf: self.sublinear_tf,
                    min_df: self.min_df,
                    max_features: (self.max_features > 0).then_some(self.max_features),
                },
                balance: (!self.plain).then_some(self.balance),
                seed: self.seed,
                temperature: self.temperature,
                ..FitOptions::default()
            },
            sample: self.sample,
            text_key: self.text_key.clone(),
            split_fractions,
            overwrite: self.overwrite,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_with_only_data_k_and_out_takes_the_discovery_defaults() {
        let s = ClusterSpec::new(vec!["a.jsonl".into()], 4, "out".into());
        let (o, d) = (s.options().unwrap(), DiscoverOptions::default());
        assert_eq!((o.sample, o.text_key, o.split_fractions, o.fit.k), (d.sample, d.text_key, d.split_fractions, 4));
        assert_eq!(o.fit.balance, Some(DEFAULT_BALANCE), "balanced k-means unless plain");
        let bad = ClusterSpec { split_fractions: vec![0.5, 0.5], ..s };
        assert!(bad.options().unwrap_err().to_string().contains("three numbers"));
    }
}
