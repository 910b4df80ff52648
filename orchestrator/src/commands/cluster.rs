//! `btm cluster`: discover domains in unlabelled text the c-BTM way (tf-idf, truncated SVD,
//! balanced k-means; `btm_cluster`) and split the text into one training set per cluster.
//! `btm cluster assign`: place documents with the clusterer a run saved.

use anyhow::{Context, Result};
use btm_cluster::{ClusterSpec, Clusterer, Summary};
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
    /// The clustering's job file (JSON or YAML, the keys of the flags below), as a pipeline's
    /// plan writes it; instead of the flags.
    #[arg(long, exclusive = true)]
    spec: Option<PathBuf>,
    #[command(flatten)]
    discover: Option<ClusterSpec>,
}

/// The subcommands of `btm cluster`.
#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Place documents with a saved clusterer: one {"cluster": i} line per document, in order.
    Assign(AssignArgs),
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

impl ClusterArgs {
    /// The clustering's spec: its file, or the flags.
    pub fn into_spec(self) -> Result<ClusterSpec> {
        super::spec_or_flags(self.spec.as_deref(), self.discover)
    }
}

pub fn run(mut args: ClusterArgs) -> Result<()> {
    match args.command.take() {
        Some(ClusterCommand::Assign(a)) => assign(a),
        None => discover(args.into_spec()?),
    }
}

fn discover(spec: ClusterSpec) -> Result<()> {
    let summary = btm_cluster::discover(&spec.data, &spec.out, &spec.options()?)?;
    print_summary(&summary, &spec.out);
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
