//! tf-idf vectors, as scikit-learn's `TfidfVectorizer` makes them (c-BTM's first stage,
//! Gururangan et al. 2023, §2.1):
//!
//! - the vocabulary: terms ([`crate::text`]) in at least `min_df` documents of the fitting
//!   sample; when more than `max_features` remain, the most frequent over the sample (ties by
//!   term); columns in alphabetical order, as scikit-learn orders its features;
//! - smooth idf: `idf(t) = ln((1 + n) / (1 + df(t))) + 1` over the `n` fitting documents;
//! - a document's vector: `tf(t) · idf(t)` over its vocabulary terms, `tf` the count or, with
//!   `sublinear_tf`, `1 + ln(count)`; then scaled to unit L2 norm. A document with no
//!   vocabulary term is the zero vector.

use crate::error::ClusterError;
use anyhow::Result;
use rayon::prelude::*;
use std::collections::HashMap;

/// How the vocabulary is chosen and terms are weighted.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TfidfOptions {
    /// Weight a term by `1 + ln(count)` instead of its count.
    pub sublinear_tf: bool,
    /// Keep only terms found in at least this many fitting documents.
    pub min_df: usize,
    /// Keep at most this many terms (the most frequent); `None`: all. The projection holds
    /// `max_features × dims` floats, so this also bounds the clusterer's size.
    pub max_features: Option<usize>,
}

impl Default for TfidfOptions {
    /// c-BTM's scikit-learn defaults, except that a term must be in two documents (a term in
    /// one cannot make two documents alike) and the vocabulary is capped (bounded memory).
    fn default() -> Self {
        Self { sublinear_tf: false, min_df: 2, max_features: Some(65_536) }
    }
}

/// A sparse vector: (column, value) pairs in increasing column order.
pub type SparseVec = Vec<(u32, f32)>;

/// A fitted vocabulary and its idf weights.
#[derive(Debug, Clone)]
pub struct Vectorizer {
    terms: Vec<String>,
    idf: Vec<f32>,
    sublinear_tf: bool,
    index: HashMap<String, u32>,
}

impl Vectorizer {
    /// Fit the vocabulary and idf on `docs` (at least one).
    pub fn fit(docs: &[String], options: &TfidfOptions) -> Result<Self> {
        // (document frequency, total count) of every term, counted in parallel.
        let counts = docs
            .par_iter()
            .fold(HashMap::<String, (u32, u64)>::new, |mut acc, doc| {
                for (term, count) in term_counts(doc) {
                    let e = acc.entry(term).or_default();
                    e.0 += 1;
                    e.1 += u64::from(count);
                }
                acc
            })
            .reduce(HashMap::new, merge_counts);
        let mut kept: Vec<(String, u32, u64)> =
            counts.into_iter().filter(|(_, (df, _))| *df as usize >= options.min_df.max(1)).map(|(t, (df, tf))| (t, df, tf)).collect();
        if let Some(max) = options.max_features {
            if kept.len() > max {
                kept.sort_unstable_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
                kept.truncate(max);
            }
        }
        if kept.is_empty() {
            return Err(ClusterError::EmptyVocabulary { documents: docs.len(), min_df: options.min_df }.into());
        }
        kept.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let n = docs.len() as f64;
        let idf = kept.iter().map(|(_, df, _)| (((1.0 + n) / (1.0 + f64::from(*df))).ln() + 1.0) as f32).collect();
        let terms = kept.into_iter().map(|(t, _, _)| t).collect();
        Self::from_parts(terms, idf, options.sublinear_tf)
    }

    /// A vectorizer from its saved parts: terms in column order and their idf.
    pub fn from_parts(terms: Vec<String>, idf: Vec<f32>, sublinear_tf: bool) -> Result<Self> {
        anyhow::ensure!(terms.len() == idf.len(), "{} terms but {} idf weights", terms.len(), idf.len());
        let index: HashMap<String, u32> = terms.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        anyhow::ensure!(index.len() == terms.len(), "the vocabulary repeats a term");
        Ok(Self { terms, idf, sublinear_tf, index })
    }

    /// The vocabulary, in column order.
    pub fn terms(&self) -> &[String] {
        &self.terms
    }

    /// Each column's idf.
    pub fn idf(&self) -> &[f32] {
        &self.idf
    }

    /// Whether term counts are dampened to `1 + ln(count)`.
    pub fn sublinear_tf(&self) -> bool {
        self.sublinear_tf
    }

    /// The unit-norm tf-idf vector of `text` (empty when it has no vocabulary term).
    pub fn transform(&self, text: &str) -> SparseVec {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        crate::text::for_each_term(text, |t| {
            if let Some(&col) = self.index.get(t) {
                *counts.entry(col).or_default() += 1;
            }
        });
        let mut v: Vec<(u32, f64)> = counts
            .into_iter()
            .map(|(col, c)| {
                let tf = if self.sublinear_tf { 1.0 + f64::from(c).ln() } else { f64::from(c) };
                (col, tf * f64::from(self.idf[col as usize]))
            })
            .collect();
        v.sort_unstable_by_key(|&(col, _)| col);
        let norm = v.iter().map(|(_, x)| x * x).sum::<f64>().sqrt();
        v.into_iter().map(|(col, x)| (col, (x / norm) as f32)).collect()
    }
}

/// Each term of `text` and its count.
fn term_counts(text: &str) -> HashMap<String, u32> {
    let mut counts = HashMap::new();
    crate::text::for_each_term(text, |t| {
        if let Some(c) = counts.get_mut(t) {
            *c += 1;
        } else {
            counts.insert(t.to_string(), 1);
        }
    });
    counts
}

fn merge_counts(mut a: HashMap<String, (u32, u64)>, b: HashMap<String, (u32, u64)>) -> HashMap<String, (u32, u64)> {
    if a.len() < b.len() {
        return merge_counts(b, a);
    }
    for (t, (df, tf)) in b {
        let e = a.entry(t).or_default();
        e.0 += df;
        e.1 += tf;
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(texts: &[&str]) -> Vec<String> {
        texts.iter().map(|t| t.to_string()).collect()
    }

    /// Three documents worked by hand: n = 3, df(apple) = 1, df(banana) = 3, df(cherry) = 2.
    #[test]
    fn tfidf_matches_a_hand_computation() {
        let v = Vectorizer::fit(
            &docs(&["apple banana apple", "banana cherry", "cherry banana the"]),
            &TfidfOptions { min_df: 1, ..Default::default() },
        )
        .unwrap();
        assert_eq!(v.terms(), ["apple", "banana", "cherry"]);
        let idf_apple = (4.0f64 / 2.0).ln() + 1.0; // 1.6931
        let idf_cherry = (4.0f64 / 3.0).ln() + 1.0; // 1.2877
        let want_idf = [idf_apple, 1.0, idf_cherry];
        for (got, want) in v.idf().iter().zip(want_idf) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
        // "apple banana apple": (2 · 1.6931, 1 · 1, 0) / ‖·‖ = (3.3863, 1) / 3.5308.
        let norm = (4.0 * idf_apple * idf_apple + 1.0).sqrt();
        let got = v.transform("Apple, banana; APPLE and durian");
        assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 1]);
        assert!((f64::from(got[0].1) - 2.0 * idf_apple / norm).abs() < 1e-6);
        assert!((f64::from(got[1].1) - 1.0 / norm).abs() < 1e-6);
        // Sublinear: tf(apple) = 1 + ln 2.
        let s = Vectorizer::from_parts(v.terms().to_vec(), v.idf().to_vec(), true).unwrap();
        let a = (1.0 + 2f64.ln()) * idf_apple;
        let got = s.transform("apple banana apple");
        assert!((f64::from(got[0].1) - a / (a * a + 1.0).sqrt()).abs() < 1e-6);
        assert!(v.transform("durian and the").is_empty());
    }

    #[test]
    fn min_df_and_max_features_choose_the_vocabulary() {
        let d = docs(&["alpha alpha alpha beta", "beta gamma", "beta gamma delta"]);
        let v = Vectorizer::fit(&d, &TfidfOptions { min_df: 2, ..Default::default() }).unwrap();
        assert_eq!(v.terms(), ["beta", "gamma"]);
        // The two most frequent over the sample (alpha: 3, beta: 3), in alphabetical order.
        let v = Vectorizer::fit(&d, &TfidfOptions { min_df: 1, max_features: Some(2), ..Default::default() }).unwrap();
        assert_eq!(v.terms(), ["alpha", "beta"]);
        let e = Vectorizer::fit(&d, &TfidfOptions { min_df: 4, ..Default::default() }).unwrap_err();
        assert!(matches!(e.downcast_ref::<ClusterError>(), Some(ClusterError::EmptyVocabulary { .. })), "{e}");
    }
}
