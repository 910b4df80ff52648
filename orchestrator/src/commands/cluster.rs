//! `btm cluster`: discover domains in unlabelled text the c-BTM way (tf-idf, truncated SVD,
//! balanced k-means; `btm_cluster`) and split the text into one training set per cluster.
//! `btm cluster assign`: place documents with the clusterer a run saved.

use anyhow::{Context, Result};
use btm_cluster::{Clusterer, DiscoverOptions, FitOptions, Summary, TfidfOptions};
use btm_trainer::sources::DEFAULT_TEXT_KEY;
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;

/// `btm cluster [assign]`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: Option<ClusterCommand>,
    #[command(flatten)]
    discover: DiscoverArgs,
}

/// The subcommands of `btm cluster`.
#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Place documents with a saved clusterer: one {"cluster": i} line per document, in order.
    Assign(AssignArgs),
}

/// Fit a clusterer and split the text by cluster.
#[derive(Args)]
pub struct DiscoverArgs {
    /// Text sources: JSONL (.jsonl, .gz, .zst) or parquet (a file, a folder of shards or a `*`
    /// glob), paths or URLs; their documents in order, file after file.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<String>,
    /// Clusters: one expert's training data each.
    #[arg(long, required = true)]
    k: Option<usize>,
    /// The folder to write (assignments.jsonl, cluster-<i>/{train,valid,test}.jsonl, the
    /// clusterer, summary.json); published whole when done.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// The JSON field or parquet column holding the text.
    #[arg(long, default_value = DEFAULT_TEXT_KEY)]
    text_key: String,
    /// Fit on a uniform sample of this many documents (all of them when fewer).
    #[arg(long, default_value_t = DiscoverOptions::default().sample)]
    sample: usize,
    /// Seed of the sample, the SVD and k-means, and the splits.
    #[arg(long, default_value_t = FitOptions::default().seed)]
    seed: u64,
    /// Temperature of the mixture weights the clusterer gives new text (c-BTM: 0.1).
    #[arg(long, default_value_t = FitOptions::default().temperature)]
    temperature: f32,
    /// Balanced k-means, every cluster of the fit within a size bound (c-BTM; the default).
    #[arg(long, conflicts_with = "plain")]
    balanced: bool,
    /// Plain k-means: clusters as large as the data makes them.
    #[arg(long)]
    plain: bool,
    /// Balanced: no cluster above ⌈B·n/k⌉ of the n sample documents (1: equal sizes).
    #[arg(long, default_value_t = 1.0)]
    balance: f64,
    /// Shares of each cluster's train, valid and test splits.
    #[arg(long, value_delimiter = ',', default_value = "0.9,0.05,0.05")]
    split_fractions: Vec<f64>,
    /// Dimensions of the truncated SVD.
    #[arg(long, default_value_t = FitOptions::default().dims)]
    dims: usize,
    /// Keep only terms in at least this many sample documents.
    #[arg(long, default_value_t = TfidfOptions::default().min_df)]
    min_df: usize,
    /// Keep at most this many terms, the most frequent (0: all).
    #[arg(long, default_value_t = TfidfOptions::default().max_features.unwrap_or(0))]
    max_features: usize,
    /// Weigh a term by 1 + ln(count) instead of its count.
    #[arg(long)]
    sublinear_tf: bool,
    /// Replace --out if it exists.
    #[arg(long)]
    overwrite: bool,
}

/// `btm cluster assign`.
#[derive(Args)]
pub struct AssignArgs {
    /// The folder `btm cluster` wrote (its clusterer.json and clusterer.safetensors).
    #[arg(long)]
    clusters: PathBuf,
    /// Text sources, as for `btm cluster`.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<String>,
    /// The JSON field or parquet column holding the text.
    #[arg(long, default_value = DEFAULT_TEXT_KEY)]
    text_key: String,
    /// Write the lines to this file (atomically) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also give each document's mixture weights over the clusters (c-BTM: softmax(−d²/T)).
    #[arg(long)]
    weights: bool,
    /// With --weights: keep the K largest weights, renormalised.
    #[arg(long, requires = "weights")]
    top_k: Option<usize>,
    /// With --weights: the temperature (default: the clusterer's).
    #[arg(long, requires = "weights")]
    temperature: Option<f32>,
}

pub fn run(args: ClusterArgs) -> Result<()> {
    match args.command {
        Some(ClusterCommand::Assign(a)) => assign(a),
        None => discover(args.discover),
    }
}

fn discover(args: DiscoverArgs) -> Result<()> {
    let k = args.k.context("--k is required")?;
    let out = args.out.context("--out is required")?;
    let split_fractions: [f64; 3] = args
        .split_fractions
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("--split-fractions takes three numbers (train,valid,test), not {:?}", args.split_fractions))?;
    let options = DiscoverOptions {
        fit: FitOptions {
            k,
            dims: args.dims,
            tfidf: TfidfOptions {
                sublinear_tf: args.sublinear_tf,
                min_df: args.min_df,
                max_features: (args.max_features > 0).then_some(args.max_features),
            },
            balance: (!args.plain).then_some(args.balance),
            seed: args.seed,
            temperature: args.temperature,
            ..FitOptions::default()
        },
        sample: args.sample,
        text_key: args.text_key,
        split_fractions,
        overwrite: args.overwrite,
    };
    let summary = btm_cluster::discover(&args.data, &out, &options)?;
    print_summary(&summary, &out);
    Ok(())
}

/// The clusters as a table, then one line on the whole run.
fn print_summary(s: &Summary, out: &std::path::Path) {
    println!("{:>7} {:>9} {:>6} {:>8} {:>6} {:>6}  top terms", "cluster", "documents", "share", "train", "valid", "test");
    for c in &s.clusters {
        let share = 100.0 * c.documents as f64 / s.documents.max(1) as f64;
        let terms = c.top_terms.iter().take(6).cloned().collect::<Vec<_>>().join(", ");
        println!("{:>7} {:>9} {:>5.1}% {:>8} {:>6} {:>6}  {terms}", c.cluster, c.documents, share, c.splits[0], c.splits[1], c.splits[2]);
    }
    let mb = s.text_bytes as f64 / 1e6;
    println!(
        "clustered {} documents ({mb:.1} MB of text; fitted on {}, {} terms, {} dimensions) into {} clusters in {:.1} s \
         ({:.1} MB/s; sample {:.1} s, fit {:.1} s, assign {:.1} s) → {}",
        s.documents,
        s.sample_documents,
        s.vocabulary,
        s.dims,
        s.k,
        s.seconds,
        mb / s.seconds.max(1e-9),
        s.phase_seconds[0],
        s.phase_seconds[1],
        s.phase_seconds[2],
        out.display()
    );
}

fn assign(args: AssignArgs) -> Result<()> {
    let mut clusterer = Clusterer::load(&args.clusters)?;
    if let Some(t) = args.temperature {
        clusterer = clusterer.with_temperature(t)?;
    }
    let weights = args.weights.then_some(args.top_k);
    match &args.out {
        Some(path) => {
            let staging = btm_model::publish::StagingFile::new(path)?;
            let file = std::fs::File::create(&staging.path).with_context(|| format!("creating {}", staging.path.display()))?;
            let n = btm_cluster::assign(&clusterer, &args.data, &args.text_key, weights, &mut std::io::BufWriter::new(file))?;
            staging.publish()?;
            eprintln!("placed {n} documents → {}", path.display());
        }
        None => {
            let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
            btm_cluster::assign(&clusterer, &args.data, &args.text_key, weights, &mut stdout)?;
            stdout.flush()?;
        }
    }
    Ok(())
}
