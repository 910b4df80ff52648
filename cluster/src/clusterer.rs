//! A fitted clusterer: everything needed to place new text (c-BTM, Gururangan et al. 2023):
//! the vocabulary and idf, the SVD projection, the centroids and the inference temperature.
//!
//! A text's embedding is its unit tf-idf vector projected on the SVD components and scaled to
//! unit norm again (the reference's `Pipeline([tfidf, svd, Normalizer])`); its cluster is the
//! nearest centroid (the reference's `kmeans.predict`, also how it assigns the training data
//! after fitting balanced clusters on a sample); its mixture weights are c-BTM's §2.3
//! `softmax(−‖e − c_j‖² / T)` over the centroids, optionally kept to the top k and
//! renormalised (`downstream_tasks/estimate_cluster.py`). A text with no vocabulary term embeds
//! as the zero vector and goes to the centroid of smallest norm.
//!
//! On disk, a folder holds `clusterer.json` (vocabulary, settings) and `clusterer.safetensors`
//! (`idf` [terms], `components` [terms, dims], `centroids` [k, dims], all float32).

use crate::error::ClusterError;
use crate::kmeans::{self, KMeansOptions};
use crate::matrix::Csr;
use crate::svd::{randomized_svd, Svd, SvdOptions};
use crate::tfidf::{SparseVec, TfidfOptions, Vectorizer};
use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The clusterer's settings file in a clusterer folder.
pub const CLUSTERER_JSON: &str = "clusterer.json";
/// The clusterer's tensors in a clusterer folder.
pub const CLUSTERER_TENSORS: &str = "clusterer.safetensors";
const FORMAT: &str = "btm-cluster/1";

/// c-BTM's inference temperature (§2.3: T = 0.1).
pub const DEFAULT_TEMPERATURE: f32 = 0.1;

/// How a clusterer is fitted. The defaults are c-BTM's (100 SVD dimensions, balanced
/// clusters, T = 0.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitOptions {
    /// Clusters.
    pub k: usize,
    /// SVD dimensions of the embedding.
    pub dims: usize,
    /// Vocabulary and term weighting.
    pub tfidf: TfidfOptions,
    /// `Some(b)`: balanced k-means, no cluster above ⌈b·n/k⌉ sample documents; `None`: plain.
    pub balance: Option<f64>,
    /// Most k-means iterations.
    pub max_iter: usize,
    /// Seed of the SVD and k-means draws.
    pub seed: u64,
    /// Temperature of the mixture weights.
    pub temperature: f32,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            k: 8,
            dims: 100,
            tfidf: TfidfOptions::default(),
            balance: Some(1.0),
            max_iter: 100,
            seed: 0,
            temperature: DEFAULT_TEMPERATURE,
        }
    }
}

/// A fitted clusterer (module docs).
#[derive(Debug, Clone)]
pub struct Clusterer {
    vectorizer: Vectorizer,
    dims: usize,
    /// `terms × dims`, row-major: a term's row is its direction in the embedding.
    components: Vec<f32>,
    /// `k × dims`, row-major.
    centroids: Vec<f32>,
    temperature: f32,
    options: FitOptions,
}

/// A fit's by-products, for reports.
#[derive(Debug, Clone)]
pub struct Fit {
    /// The clusterer.
    pub clusterer: Clusterer,
    /// Each fitting document's cluster under the (balanced) fit.
    pub assignments: Vec<u32>,
    /// The SVD's singular values, decreasing.
    pub singular_values: Vec<f64>,
    /// k-means iterations run.
    pub iterations: usize,
}

impl Clusterer {
    /// Fit tf-idf, the SVD and k-means on `sample`.
    pub fn fit(sample: &[String], options: &FitOptions) -> Result<Fit> {
        let (vectorizer, rows) = Self::vectorize(sample, options)?;
        Self::fit_vectors(vectorizer, &rows, options)
    }

    /// The first stage of [`Self::fit`]: the vocabulary fitted on `sample` and each sample
    /// document's tf-idf vector (after which the text itself is no longer needed).
    pub fn vectorize(sample: &[String], options: &FitOptions) -> Result<(Vectorizer, Vec<SparseVec>)> {
        anyhow::ensure!(options.k >= 1, "k must be at least 1");
        anyhow::ensure!(options.temperature > 0.0, "the temperature must be positive");
        if let Some(b) = options.balance {
            anyhow::ensure!(b >= 1.0 && b.is_finite(), "the balance factor must be at least 1, not {b}");
        }
        if options.k > sample.len() {
            return Err(ClusterError::TooFewDocuments { k: options.k, documents: sample.len() }.into());
        }
        let vectorizer = Vectorizer::fit(sample, &options.tfidf)?;
        let rows = sample.par_iter().map(|t| vectorizer.transform(t)).collect();
        Ok((vectorizer, rows))
    }

    /// The rest of [`Self::fit`]: the SVD and k-means on the sample's tf-idf vectors `rows`.
    pub fn fit_vectors(vectorizer: Vectorizer, rows: &[SparseVec], options: &FitOptions) -> Result<Fit> {
        let terms = vectorizer.terms().len();
        let Svd { singular_values, components: v } =
            randomized_svd(&Csr::from_rows(rows, terms), &SvdOptions { dims: options.dims, seed: options.seed, ..Default::default() });
        let dims = v.cols;
        let components = (0..terms).flat_map(|t| (0..dims).map(move |d| (t, d))).map(|(t, d)| v.get(t, d) as f32).collect();
        drop(v);
        let mut clusterer =
            Clusterer { vectorizer, dims, components, centroids: vec![], temperature: options.temperature, options: options.clone() };
        // The points k-means sees are embedded exactly as `place` will embed text later.
        let points: Vec<f32> = rows.par_iter().flat_map_iter(|r| clusterer.project(r)).collect();
        let km = kmeans::fit(
            &points,
            dims,
            &KMeansOptions { k: options.k, balance: options.balance, max_iter: options.max_iter, seed: options.seed },
        )?;
        clusterer.centroids = km.centroids;
        Ok(Fit { clusterer, assignments: km.assignments, singular_values, iterations: km.iterations })
    }

    /// Clusters.
    pub fn k(&self) -> usize {
        self.centroids.len() / self.dims
    }

    /// Embedding dimensions (at most the SVD dimensions asked for: the sample's rank bounds them).
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// The temperature of [`Self::weights`].
    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// The same clusterer with another temperature.
    pub fn with_temperature(mut self, temperature: f32) -> Result<Self> {
        anyhow::ensure!(temperature > 0.0 && temperature.is_finite(), "the temperature must be positive, not {temperature}");
        self.temperature = temperature;
        Ok(self)
    }

    /// The settings it was fitted with.
    pub fn options(&self) -> &FitOptions {
        &self.options
    }

    /// The vocabulary and idf.
    pub fn vectorizer(&self) -> &Vectorizer {
        &self.vectorizer
    }

    /// The unit-norm embedding of a tf-idf vector (zero for the zero vector).
    pub fn project(&self, x: &SparseVec) -> Vec<f32> {
        let mut e = vec![0f32; self.dims];
        for &(t, v) in x {
            let row = &self.components[t as usize * self.dims..(t as usize + 1) * self.dims];
            e.iter_mut().zip(row).for_each(|(e, c)| *e += v * c);
        }
        let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            e.iter_mut().for_each(|x| *x /= norm);
        }
        e
    }

    /// The unit-norm embedding of `text`.
    pub fn embed(&self, text: &str) -> Vec<f32> {
        self.project(&self.vectorizer.transform(text))
    }

    /// Squared distances of `text`'s embedding to each centroid.
    pub fn distances(&self, text: &str) -> Vec<f32> {
        kmeans::distances(&self.embed(text), &self.centroids, self.dims)
    }

    /// The cluster of `text`: its nearest centroid.
    pub fn place(&self, text: &str) -> usize {
        kmeans::argmin(&self.distances(text))
    }

    /// c-BTM's mixture weights of `text` over the clusters (module docs); with `top_k`, all but
    /// the `top_k` largest are zero and those sum to 1.
    pub fn weights(&self, text: &str, top_k: Option<usize>) -> Vec<f32> {
        self.weights_from_distances(&self.distances(text), top_k)
    }

    /// [`Self::weights`] from squared distances already computed.
    pub fn weights_from_distances(&self, distances: &[f32], top_k: Option<usize>) -> Vec<f32> {
        let t = f64::from(self.temperature);
        let logits: Vec<f64> = distances.iter().map(|&d| -f64::from(d) / t).collect();
        let mut keep: Vec<usize> = (0..logits.len()).collect();
        keep.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        keep.truncate(top_k.unwrap_or(logits.len()).max(1));
        let top = logits[keep[0]];
        let mut w = vec![0f64; logits.len()];
        for &j in &keep {
            w[j] = (logits[j] - top).exp();
        }
        let sum: f64 = w.iter().sum();
        w.into_iter().map(|x| (x / sum) as f32).collect()
    }

    /// The `n` terms that weigh most in `cluster`'s centroid mapped back to term space (the
    /// reference's `get_top_terms`: `svd.inverse_transform(centroids)`).
    pub fn top_terms(&self, cluster: usize, n: usize) -> Vec<String> {
        let c = &self.centroids[cluster * self.dims..(cluster + 1) * self.dims];
        let scores: Vec<f32> = self.components.par_chunks(self.dims).map(|row| row.iter().zip(c).map(|(a, b)| a * b).sum()).collect();
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        order.into_iter().take(n).map(|t| self.vectorizer.terms()[t].clone()).collect()
    }
}

/// `clusterer.json`.
#[derive(Serialize, Deserialize)]
struct Saved {
    format: String,
    k: usize,
    dims: usize,
    temperature: f32,
    sublinear_tf: bool,
    options: FitOptions,
    terms: Vec<String>,
}

impl Clusterer {
    /// Write the clusterer into folder `dir` (each file through a temporary and a rename).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let saved = Saved {
            format: FORMAT.into(),
            k: self.k(),
            dims: self.dims,
            temperature: self.temperature,
            sublinear_tf: self.vectorizer.sublinear_tf(),
            options: self.options.clone(),
            terms: self.vectorizer.terms().to_vec(),
        };
        btm_model::publish::write_file(&dir.join(CLUSTERER_JSON), &serde_json::to_vec(&saved)?)?;
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (idf, components, centroids) = (bytes(self.vectorizer.idf()), bytes(&self.components), bytes(&self.centroids));
        let terms = saved.terms.len();
        use safetensors::{tensor::TensorView, Dtype};
        let tensors = [
            ("idf", TensorView::new(Dtype::F32, vec![terms], &idf)?),
            ("components", TensorView::new(Dtype::F32, vec![terms, self.dims], &components)?),
            ("centroids", TensorView::new(Dtype::F32, vec![self.k(), self.dims], &centroids)?),
        ];
        btm_model::publish::write_file(&dir.join(CLUSTERER_TENSORS), &safetensors::serialize(tensors, None)?)?;
        Ok(())
    }

    /// Read the clusterer saved in folder `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let bad = |reason: String| ClusterError::NotAClusterer { path: dir.display().to_string(), reason };
        let json = std::fs::read(dir.join(CLUSTERER_JSON)).map_err(|e| bad(format!("{CLUSTERER_JSON}: {e}")))?;
        let saved: Saved = serde_json::from_slice(&json).map_err(|e| bad(format!("{CLUSTERER_JSON}: {e}")))?;
        if saved.format != FORMAT {
            return Err(bad(format!("format {:?}, expected {FORMAT:?}", saved.format)).into());
        }
        let bytes = std::fs::read(dir.join(CLUSTERER_TENSORS)).map_err(|e| bad(format!("{CLUSTERER_TENSORS}: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("{CLUSTERER_TENSORS}: {e}")))?;
        let terms = saved.terms.len();
        let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
                return Err(bad(format!("{name} is {:?} {:?}, expected F32 {shape:?}", t.dtype(), t.shape())).into());
            }
            Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        let idf = tensor("idf", &[terms])?;
        let components = tensor("components", &[terms, saved.dims])?;
        let centroids = tensor("centroids", &[saved.k, saved.dims])?;
        let vectorizer = Vectorizer::from_parts(saved.terms, idf, saved.sublinear_tf).context(bad("its vocabulary".into()))?;
        Ok(Self { vectorizer, dims: saved.dims, components, centroids, temperature: saved.temperature, options: saved.options })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::topical_docs;

    fn options(k: usize) -> FitOptions {
        FitOptions { k, dims: 8, tfidf: TfidfOptions { min_df: 1, ..Default::default() }, ..Default::default() }
    }

    #[test]
    fn topics_become_clusters_and_weights_prefer_the_own_cluster() {
        let (docs, labels) = topical_docs(25);
        let fit = Clusterer::fit(&docs, &options(4)).unwrap();
        let c = &fit.clusterer;
        for (d, &l) in docs.iter().zip(&labels) {
            assert_eq!(c.place(d), c.place(&docs[l]), "{d}");
        }
        assert_eq!(fit.assignments.iter().map(|&a| a as usize).collect::<Vec<_>>(), docs.iter().map(|d| c.place(d)).collect::<Vec<_>>());
        let w = c.weights(&docs[0], None);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(kmeans::argmin(&w.iter().map(|x| -x).collect::<Vec<_>>()), c.place(&docs[0]));
        let top2 = c.weights(&docs[0], Some(2));
        assert_eq!(top2.iter().filter(|&&x| x > 0.0).count(), 2);
        assert!((top2.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let top_terms = c.top_terms(c.place(&docs[1]), 6);
        assert!(top_terms.iter().all(|t| ["def", "return", "self", "import", "lambda", "yield"].contains(&t.as_str())), "{top_terms:?}");
    }

    /// Two documents over two terms, both in both (idf 1): rows (3, 4)/5 and (4, 3)/5, so
    /// AᵀA = [[1, 0.96], [0.96, 1]] with right singular vectors (1, 1)/√2 and (1, −1)/√2
    /// (σ = 1.4 and 0.2). The first document embeds as (1.4, 0.2)/√2 up to the second
    /// component's sign, already of unit norm; "apple" alone, (1, 0), as (1, 1)/√2.
    #[test]
    fn the_embedding_matches_a_hand_computation() {
        let docs = ["apple apple apple banana banana banana banana".to_string(), "apple apple apple apple banana banana banana".into()];
        let options = FitOptions { k: 1, dims: 2, tfidf: TfidfOptions { min_df: 1, ..Default::default() }, ..Default::default() };
        let c = Clusterer::fit(&docs, &options).unwrap().clusterer;
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let e = c.embed(&docs[0]);
        assert!((e[0] - 1.4 * h).abs() < 1e-5 && (e[1].abs() - 0.2 * h).abs() < 1e-5, "{e:?}");
        let e = c.embed("Apple!");
        assert!((e[0] - h).abs() < 1e-5 && (e[1].abs() - h).abs() < 1e-5, "{e:?}");
        assert_eq!(c.embed("durian"), [0.0, 0.0]);
    }

    #[test]
    fn weights_are_a_softmax_of_negative_squared_distance_over_temperature() {
        let (docs, _) = topical_docs(5);
        let c = Clusterer::fit(&docs, &options(2)).unwrap().clusterer.with_temperature(0.5).unwrap();
        let w = c.weights_from_distances(&[0.0, 0.5, 1.0], None);
        let e = [1.0f64, (-1.0f64).exp(), (-2.0f64).exp()];
        let s: f64 = e.iter().sum();
        for (got, want) in w.iter().zip(e) {
            assert!((f64::from(*got) - want / s).abs() < 1e-6);
        }
        let w = c.weights_from_distances(&[0.0, 0.5, 1.0], Some(1));
        assert_eq!(w, [1.0, 0.0, 0.0]);
    }

    #[test]
    fn a_saved_clusterer_places_text_as_the_original() {
        let (docs, _) = topical_docs(10);
        let c = Clusterer::fit(&docs, &options(4)).unwrap().clusterer;
        let dir = tempfile::tempdir().unwrap();
        c.save(dir.path()).unwrap();
        let back = Clusterer::load(dir.path()).unwrap();
        assert_eq!((back.k(), back.dims(), back.temperature()), (4, c.dims(), DEFAULT_TEMPERATURE));
        for d in &docs {
            assert_eq!(back.distances(d), c.distances(d));
        }
        let e = Clusterer::load(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(e.downcast_ref::<ClusterError>(), Some(ClusterError::NotAClusterer { .. })), "{e}");
    }
}
