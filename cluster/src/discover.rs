//! Domain discovery over whole training sources, in bounded memory (c-BTM §2.1: fit the
//! clusterer on a sample, then assign every document). Two passes over the inputs:
//!
//! 1. a seeded reservoir sample (Vitter's algorithm R) of `sample` documents, on which the
//!    clusterer is fitted ([`Clusterer::fit`]); memory holds the sample, never the corpus;
//! 2. every document, in input order across the files, placed at its nearest centroid (in
//!    parallel batches) and written out: its cluster to `assignments.jsonl` and its text to its
//!    cluster's train, valid or test split.
//!
//! The balanced fit bounds the clusters' sizes on the sample; the second pass then places
//! every document (the sample's included) at its nearest centroid, as the reference does
//! (`metaseq/scripts/cluster.py`: `kmeans.predict`), so that `assignments.jsonl` is what the
//! saved clusterer gives any text ([`assign`]) and the final sizes follow the data around
//! balanced centroids.
//!
//! The output folder ([`discover`]) is written under a temporary name and renamed into place
//! last (`btm_model::publish::StagingDir`):
//!
//! ```text
//! DIR/assignments.jsonl                      {"cluster": i} per input document, in order
//! DIR/cluster-<i>/{train,valid,test}.jsonl   {"text": …} per document of cluster i
//! DIR/clusterer.json, clusterer.safetensors  the clusterer ([`Clusterer::load`])
//! DIR/summary.json                           sizes and top terms per cluster ([`Summary`])
//! ```
//!
//! A document's split is decided by a hash of its text and the seed, so a duplicate never
//! lands in two splits and the split does not depend on the document's position.

use crate::clusterer::{Clusterer, FitOptions};
use crate::error::ClusterError;
use anyhow::{Context, Result};
use btm_trainer::data::SplitMix64;
use btm_trainer::sources::{Documents, Format};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// Documents placed per parallel batch in the second pass.
const BATCH: usize = 4096;
/// Bytes a split file's buffer holds before it is appended to its file: files are opened
/// only to append, so any number of clusters works under any open-file limit.
const FLUSH_BYTES: usize = 256 << 10;
/// The split files, in the order of the split fractions.
pub const SPLITS: [&str; 3] = ["train", "valid", "test"];

/// Settings of [`discover`].
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoverOptions {
    /// How the clusterer is fitted.
    pub fit: FitOptions,
    /// Documents in the fitting sample (the whole input when it has fewer).
    pub sample: usize,
    /// The JSON field or parquet column holding the text.
    pub text_key: String,
    /// Shares of train, valid and test (summing to 1).
    pub split_fractions: [f64; 3],
    /// Replace an existing output folder.
    pub overwrite: bool,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        Self {
            fit: FitOptions::default(),
            sample: 50_000,
            text_key: btm_trainer::sources::DEFAULT_TEXT_KEY.into(),
            split_fractions: [0.9, 0.05, 0.05],
            overwrite: false,
        }
    }
}

/// What [`discover`] found, as written to `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Clusters.
    pub k: usize,
    /// Documents in the inputs.
    pub documents: usize,
    /// UTF-8 bytes of their text.
    pub text_bytes: u64,
    /// Documents the clusterer was fitted on.
    pub sample_documents: usize,
    /// Embedding dimensions.
    pub dims: usize,
    /// Terms in the vocabulary.
    pub vocabulary: usize,
    /// k-means iterations of the fit.
    pub iterations: usize,
    /// Seconds for both passes.
    pub seconds: f64,
    /// Seconds to draw the sample (the first pass), to fit the clusterer, and to place and
    /// write every document (the second pass).
    pub phase_seconds: [f64; 3],
    /// The settings.
    pub options: FitOptions,
    /// Per cluster.
    pub clusters: Vec<ClusterSummary>,
}

/// One cluster in [`Summary`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSummary {
    /// Its index.
    pub cluster: usize,
    /// Documents assigned to it.
    pub documents: usize,
    /// Documents in its train, valid and test splits.
    pub splits: [usize; 3],
    /// Sample documents it held in the (balanced) fit.
    pub sample_documents: usize,
    /// The terms weighing most in its centroid.
    pub top_terms: Vec<String>,
}

/// Cluster the documents of `data` (paths or URLs: JSONL, `.gz`, `.zst`, parquet) into the new
/// folder `out` (module docs).
pub fn discover(data: &[String], out: &Path, options: &DiscoverOptions) -> Result<Summary> {
    let start = std::time::Instant::now();
    let fractions = check_fractions(options.split_fractions)?;
    anyhow::ensure!(options.sample >= 1, "the sample must hold at least one document");
    let staging = btm_model::publish::StagingDir::new(out, options.overwrite)?;
    let (sample, documents, text_bytes) = reservoir(data, &options.text_key, options.sample, options.fit.seed)?;
    if documents == 0 {
        return Err(ClusterError::EmptyInput { inputs: data.join(", ") }.into());
    }
    let sampled = start.elapsed().as_secs_f64();
    // The sample's text goes once it is vectorized: the SVD's memory replaces it.
    let (vectorizer, rows) = Clusterer::vectorize(&sample, &options.fit)?;
    drop(sample);
    let fit = Clusterer::fit_vectors(vectorizer, &rows, &options.fit)?;
    drop(rows);
    let c = &fit.clusterer;
    c.save(&staging.path)?;
    let fitted = start.elapsed().as_secs_f64();
    let sizes = write_clusters(data, &options.text_key, c, &staging.path, fractions, options.fit.seed)?;
    let seconds = start.elapsed().as_secs_f64();
    let clusters = (0..c.k())
        .map(|i| ClusterSummary {
            cluster: i,
            documents: sizes[i].iter().sum(),
            splits: sizes[i],
            sample_documents: fit.assignments.iter().filter(|&&a| a as usize == i).count(),
            top_terms: c.top_terms(i, 10),
        })
        .collect();
    let summary = Summary {
        k: c.k(),
        documents,
        text_bytes,
        sample_documents: fit.assignments.len(),
        dims: c.dims(),
        vocabulary: c.vectorizer().terms().len(),
        iterations: fit.iterations,
        seconds,
        phase_seconds: [sampled, fitted - sampled, seconds - fitted],
        options: options.fit.clone(),
        clusters,
    };
    btm_model::publish::write_file(&staging.path.join("summary.json"), &serde_json::to_vec_pretty(&summary)?)?;
    staging.publish()?;
    Ok(summary)
}

/// Place every document of `data` with `clusterer`, in input order, and write a JSON line per
/// document to `out`: `{"cluster": i}`, and with `weights` also `"weights": [...]` (c-BTM's
/// mixture weights, `Some(top_k)` keeping the largest). Returns the number of documents.
pub fn assign(
    clusterer: &Clusterer,
    data: &[String],
    text_key: &str,
    weights: Option<Option<usize>>,
    out: &mut dyn Write,
) -> Result<usize> {
    let mut n = 0;
    for_each_placed(data, text_key, clusterer, |_, distances| {
        let cluster = crate::kmeans::argmin(distances);
        let line = match weights {
            None => serde_json::json!({ "cluster": cluster }),
            Some(top_k) => serde_json::json!({ "cluster": cluster, "weights": clusterer.weights_from_distances(distances, top_k) }),
        };
        writeln!(out, "{line}")?;
        n += 1;
        Ok(())
    })?;
    out.flush()?;
    Ok(n)
}

/// The documents of one input, the format by its name; a missing text field or column
/// becomes [`ClusterError::MissingTextKey`] (the reader's message, naming the line or the
/// columns, stays below it).
fn documents(location: &str, key: &str) -> Result<impl Iterator<Item = Result<String>>> {
    let docs = Documents::open(location, Format::detect(location), key).with_context(|| format!("opening {location}"))?;
    let (location, key) = (location.to_string(), key.to_string());
    Ok(docs.map(move |d| {
        d.map_err(|e| {
            let msg = format!("{e:#}");
            if msg.contains(&format!("no `{key}` field")) || msg.contains(&format!("no column `{key}`")) {
                e.context(ClusterError::MissingTextKey { location: location.clone(), key: key.clone() })
            } else {
                e
            }
        })
    }))
}

/// A uniform sample of at most `size` documents of `data` (algorithm R, seeded), in input
/// order; also the number of documents and their text's bytes.
fn reservoir(data: &[String], key: &str, size: usize, seed: u64) -> Result<(Vec<String>, usize, u64)> {
    let mut rng = SplitMix64::new(&[seed, 0x5341_4d50_4c45]);
    let mut sample: Vec<(usize, String)> = Vec::new();
    let (mut seen, mut bytes) = (0usize, 0u64);
    for location in data {
        for doc in documents(location, key)? {
            let doc = doc?;
            bytes += doc.len() as u64;
            if sample.len() < size {
                sample.push((seen, doc));
            } else {
                let j = rng.below(seen as u64 + 1) as usize;
                if j < size {
                    sample[j] = (seen, doc);
                }
            }
            seen += 1;
        }
    }
    sample.sort_unstable_by_key(|(i, _)| *i);
    Ok((sample.into_iter().map(|(_, d)| d).collect(), seen, bytes))
}

/// Call `f(text, squared distances to the centroids)` for every document of `data` in input
/// order, the distances computed in parallel a batch at a time.
fn for_each_placed(data: &[String], key: &str, clusterer: &Clusterer, mut f: impl FnMut(&str, &[f32]) -> Result<()>) -> Result<()> {
    let mut batch: Vec<String> = Vec::with_capacity(BATCH);
    let mut flush = |batch: &mut Vec<String>| -> Result<()> {
        let distances: Vec<Vec<f32>> = batch.par_iter().map(|t| clusterer.distances(t)).collect();
        for (text, d) in batch.iter().zip(&distances) {
            f(text, d)?;
        }
        batch.clear();
        Ok(())
    };
    for location in data {
        for doc in documents(location, key)? {
            batch.push(doc?);
            if batch.len() == BATCH {
                flush(&mut batch)?;
            }
        }
    }
    flush(&mut batch)
}

/// The second pass: `assignments.jsonl` and every cluster's splits under `dir`. Returns each
/// cluster's documents per split.
fn write_clusters(data: &[String], key: &str, c: &Clusterer, dir: &Path, fractions: [f64; 3], seed: u64) -> Result<Vec<[usize; 3]>> {
    let mut files: Vec<[AppendBuffer; 3]> = Vec::with_capacity(c.k());
    for i in 0..c.k() {
        let folder = dir.join(format!("cluster-{i}"));
        std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
        files.push(SPLITS.map(|s| AppendBuffer::new(folder.join(format!("{s}.jsonl")))));
        files[i].iter_mut().try_for_each(AppendBuffer::flush)?;
    }
    let path = dir.join("assignments.jsonl");
    let mut assignments = std::io::BufWriter::new(std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?);
    let mut sizes = vec![[0usize; 3]; c.k()];
    for_each_placed(data, key, c, |text, distances| {
        let cluster = crate::kmeans::argmin(distances);
        let split = split_of(text, seed, fractions);
        writeln!(assignments, "{}", serde_json::json!({ "cluster": cluster }))?;
        files[cluster][split].push(&serde_json::json!({ "text": text }))?;
        sizes[cluster][split] += 1;
        Ok(())
    })?;
    assignments.flush().with_context(|| format!("writing {}", path.display()))?;
    files.iter_mut().flatten().try_for_each(AppendBuffer::flush)?;
    Ok(sizes)
}

/// JSON lines bound for one file, appended to it a buffer at a time.
struct AppendBuffer {
    path: std::path::PathBuf,
    buf: Vec<u8>,
}

impl AppendBuffer {
    fn new(path: std::path::PathBuf) -> Self {
        Self { path, buf: Vec::new() }
    }

    fn push(&mut self, line: &serde_json::Value) -> Result<()> {
        serde_json::to_writer(&mut self.buf, line)?;
        self.buf.push(b'\n');
        if self.buf.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Append what is buffered (creating the file on the first call).
    fn flush(&mut self) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        f.write_all(&self.buf).with_context(|| format!("writing {}", self.path.display()))?;
        self.buf.clear();
        Ok(())
    }
}

/// The split (index into [`SPLITS`]) of a document: a 64-bit FNV-1a hash of its text, mixed
/// with the seed by SplitMix64, read as a fraction.
pub fn split_of(text: &str, seed: u64, fractions: [f64; 3]) -> usize {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    let x = SplitMix64::new(&[seed, h]).next_f64();
    if x < fractions[0] {
        0
    } else if x < fractions[0] + fractions[1] {
        1
    } else {
        2
    }
}

/// The split fractions, checked: three non-negative shares summing to 1.
fn check_fractions(f: [f64; 3]) -> Result<[f64; 3]> {
    anyhow::ensure!(
        f.iter().all(|x| x.is_finite() && *x >= 0.0) && (f.iter().sum::<f64>() - 1.0).abs() < 1e-6,
        "the split fractions must be three non-negative numbers summing to 1, not {f:?}"
    );
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::topical_docs;

    fn write_jsonl(path: &Path, key: &str, docs: &[String]) {
        std::fs::write(path, docs.iter().map(|d| serde_json::json!({ key: d }).to_string() + "\n").collect::<String>()).unwrap();
    }

    fn options(k: usize, seed: u64) -> DiscoverOptions {
        let mut o = DiscoverOptions::default();
        o.fit.k = k;
        o.fit.dims = 8;
        o.fit.seed = seed;
        o
    }

    fn read_clusters(path: &Path) -> Vec<usize> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["cluster"].as_u64().unwrap() as usize)
            .collect()
    }

    /// Two files, a sample smaller than the input: every document is assigned in input order,
    /// the splits hold every document once, and `assign` on the same text reproduces
    /// `assignments.jsonl`.
    #[test]
    fn discover_assigns_every_document_and_assign_reproduces_it() {
        let dir = tempfile::tempdir().unwrap();
        let (docs, labels) = topical_docs(40);
        let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
        write_jsonl(&a, "text", &docs[..70]);
        write_jsonl(&b, "text", &docs[70..]);
        let data = [a.to_string_lossy().into_owned(), b.to_string_lossy().into_owned()];
        let out = dir.path().join("clusters");
        let summary = discover(&data, &out, &DiscoverOptions { sample: 100, ..options(4, 1) }).unwrap();
        assert_eq!((summary.documents, summary.sample_documents), (160, 100));
        let got = read_clusters(&out.join("assignments.jsonl"));
        assert_eq!(got.len(), 160);
        // The four topics are the four clusters.
        for (g, l) in got.iter().zip(&labels) {
            assert_eq!(*g, got[*l]);
        }
        let mut in_splits = 0;
        for i in 0..4 {
            for s in SPLITS {
                in_splits += std::fs::read_to_string(out.join(format!("cluster-{i}/{s}.jsonl"))).unwrap().lines().count();
            }
        }
        assert_eq!(in_splits, 160);
        let c = Clusterer::load(&out).unwrap();
        let mut again = Vec::new();
        assert_eq!(assign(&c, &data, "text", None, &mut again).unwrap(), 160);
        assert_eq!(String::from_utf8(again).unwrap(), std::fs::read_to_string(out.join("assignments.jsonl")).unwrap());
        let s: Summary = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(s.clusters.iter().map(|c| c.documents).sum::<usize>(), 160);
        assert!(s.clusters.iter().all(|c| c.sample_documents == 25), "balanced fit: {:?}", s.clusters);
    }

    #[test]
    fn the_same_seed_gives_the_same_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let (docs, _) = topical_docs(30);
        let f = dir.path().join("d.jsonl");
        write_jsonl(&f, "text", &docs);
        let data = [f.to_string_lossy().into_owned()];
        let run = |name: &str, seed: u64| {
            let out = dir.path().join(name);
            discover(&data, &out, &DiscoverOptions { sample: 50, ..options(3, seed) }).unwrap();
            (read_clusters(&out.join("assignments.jsonl")), std::fs::read(out.join(crate::CLUSTERER_TENSORS)).unwrap())
        };
        assert_eq!(run("one", 5), run("two", 5));
    }

    #[test]
    fn bad_inputs_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (docs, _) = topical_docs(1);
        let f = dir.path().join("d.jsonl");
        write_jsonl(&f, "body", &docs);
        let data = [f.to_string_lossy().into_owned()];
        let out = dir.path().join("out");
        let kind = |r: Result<Summary>| {
            let e = r.unwrap_err();
            let kind = e.downcast_ref::<ClusterError>().map(|k| format!("{k:?}")).unwrap_or_else(|| panic!("not named: {e:#}"));
            (kind, format!("{e:#}"))
        };
        let (k, msg) = kind(discover(&data, &out, &options(2, 0)));
        assert!(k.starts_with("MissingTextKey") && msg.contains("d.jsonl:1: no `text` field"), "{msg}");
        let (k, _) = kind(discover(&data, &out, &DiscoverOptions { text_key: "body".into(), ..options(5, 0) }));
        assert_eq!(k, "TooFewDocuments { k: 5, documents: 4 }");
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, "").unwrap();
        let (k, _) = kind(discover(&[empty.to_string_lossy().into_owned()], &out, &options(2, 0)));
        assert!(k.starts_with("EmptyInput"), "{k}");
        // Nothing was published, and no staging folder is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        let e = discover(&data, &out, &DiscoverOptions { split_fractions: [0.5, 0.5, 0.5], ..options(2, 0) }).unwrap_err();
        assert!(e.to_string().contains("split fractions"), "{e}");
    }

    #[test]
    fn splits_follow_the_fractions_and_a_text_always_lands_in_one() {
        let f = [0.8, 0.1, 0.1];
        let mut counts = [0usize; 3];
        for i in 0..10_000 {
            counts[split_of(&format!("document {i}"), 3, f)] += 1;
        }
        assert!((7_700..8_300).contains(&counts[0]) && (800..1_200).contains(&counts[1]), "{counts:?}");
        assert_eq!(split_of("same", 1, f), split_of("same", 1, f));
    }
}
