//! Unsupervised domain discovery for Branch-Train-Merge: c-BTM's clustering (Gururangan et
//! al. 2023, "Scaling Expert Language Models with Unsupervised Domain Discovery", §2.1 and
//! §2.3; reference code `kernelmachine/cbtm`, `metaseq/scripts/train_clusterer.py`).
//!
//! Unlabelled text is split into `k` clusters, one expert's training data each:
//!
//! 1. [`tfidf`]: tf-idf vectors over a vocabulary fitted on a sample ([`text`] tokenizes);
//! 2. [`svd`]: a truncated SVD to 100 dimensions (randomized, Halko et al. 2011), then unit norm;
//! 3. [`kmeans`]: balanced k-means (every cluster within a size bound) or plain k-means, seeded;
//! 4. [`discover`]: a second streaming pass places every document at its nearest centroid and
//!    writes each cluster's train/valid/test splits.
//!
//! A [`Clusterer`] saved with the output places new text later: its nearest cluster
//! ([`Clusterer::place`]) or c-BTM's mixture weights over the experts, `softmax(−‖e − c‖²/T)`
//! ([`Clusterer::weights`]).
//!
//! ```
//! use btm_cluster::{Clusterer, FitOptions};
//! let docs: Vec<String> = (0..40)
//!     .map(|i| if i % 2 == 0 { "psalm lord thee thou shepherd" } else { "def return self import lambda" }.to_string())
//!     .collect();
//! let mut options = FitOptions { k: 2, dims: 4, ..Default::default() };
//! options.tfidf.min_df = 1;
//! let clusterer = Clusterer::fit(&docs, &options)?.clusterer;
//! assert_ne!(clusterer.place("the lord is my shepherd"), clusterer.place("def f(self): return 1"));
//! let w = clusterer.weights("thou art my shepherd", Some(1));
//! assert_eq!(w[clusterer.place("thou art my shepherd")], 1.0);
//! # Ok::<(), anyhow::Error>(())
//! ```

#![warn(missing_docs)]

pub mod clusterer;
pub mod discover;
pub mod error;
pub mod kmeans;
pub mod matrix;
pub mod spec;
pub mod svd;
pub mod text;
pub mod tfidf;

#[cfg(test)]
mod testutil;

pub use clusterer::{Clusterer, Fit, FitOptions, CLUSTERER_JSON, CLUSTERER_TENSORS, DEFAULT_TEMPERATURE};
pub use discover::{assign, discover, DiscoverOptions, Summary};
pub use error::ClusterError;
pub use spec::ClusterSpec;
pub use tfidf::TfidfOptions;
