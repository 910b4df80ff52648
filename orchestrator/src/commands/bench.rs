//! Benchmarks:
//! - `btm bench train --preset tiny|small|gpt-125m [--moe] [--device cpu|cuda] --threads N
//!   [--steps N] [--json]`: training throughput (forward + backward + AdamW on random tokens),
//!   peak memory, and on CUDA model FLOPs utilisation (bfloat16 mixed precision);
//! - `btm bench merge [--experts 8] [--json]`: merging ~110M-parameter experts, against `cp`;
//! - `btm bench orchestrate [--jobs N] [--seconds S]`: the orchestrator's own overhead with N
//!   jobs of known duration on N slots, then one dependent job;
//! - `btm bench moe --device cpu|cuda [--tokens T] [--json]`: one MoE layer forward +
//!   backward, fused kernels against the reference loop, and the grouped GEMM against one
//!   dense GEMM of equal FLOPs (bfloat16 on CUDA);
//! - `btm bench data [--size-mb 2000] [--reps N] [--json]`: tokenizing a generated JSONL through
//!   btm's data pipeline against the tokenizers crate's `encode_batch`, with peak memory;
//! - `btm bench cluster [--mb 2048] [--data FILE...] [--k 8] [--json]`: domain discovery
//!   (`btm cluster`) over a generated JSONL of real text, in MB/s, with peak memory.

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Tokens per second of training steps, and peak resident memory.
    Train(BenchTrainArgs),
    /// Merge synthetic ~110M-parameter experts; peak memory and throughput against `cp`.
    Merge(BenchMergeArgs),
    /// Orchestration overhead: wall time minus the jobs' own durations.
    Orchestrate(BenchOrchestrateArgs),
    /// One MoE layer forward + backward: fused kernels against the reference loop.
    Moe(BenchMoeArgs),
    /// Tokenizing a generated JSONL source: btm's data pipeline against the tokenizers
    /// crate's batch encoder; throughput and peak memory.
    Data(BenchDataArgs),
    /// Domain discovery (`btm cluster`) over a generated JSONL of real text; throughput and
    /// peak memory.
    Cluster(BenchClusterArgs),
    /// A job of known duration (what `bench orchestrate` runs).
    #[command(hide = true)]
    Sleep {
        /// How long to sleep.
        #[arg(long)]
        seconds: f64,
    },
}

#[derive(Args)]
pub struct BenchDataArgs {
    /// Size of the generated JSONL source in MB (10⁶ bytes).
    #[arg(long, default_value_t = 2000)]
    size_mb: u64,
    /// An existing JSONL source to tokenize instead of a generated one.
    #[arg(long)]
    source: Option<std::path::PathBuf>,
    /// The tokenizer (default: a byte-level BPE of 8192 tokens trained on the source's first
    /// 2000 documents).
    #[arg(long)]
    tokenizer: Option<std::path::PathBuf>,
    /// Where the generated source goes (default: a temporary folder).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Tokenizing threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Repetitions of each side, alternating (medians are reported).
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BenchClusterArgs {
    /// Size of the generated JSONL source in MiB.
    #[arg(long, default_value_t = 2048)]
    mb: u64,
    /// JSONL files whose documents the source is cut from (default: the bundled sample's
    /// training text, `data/sample/*/train.jsonl`, compiled in).
    #[arg(long, num_args = 1..)]
    data: Vec<std::path::PathBuf>,
    /// Cluster this existing source as it is instead of generating one.
    #[arg(long, conflicts_with_all = ["data", "mb"])]
    source: Option<std::path::PathBuf>,
    /// Clusters.
    #[arg(long, default_value_t = 8)]
    k: usize,
    /// Documents the clusterer is fitted on (as `btm cluster --sample`).
    #[arg(long, default_value_t = btm_cluster::DiscoverOptions::default().sample)]
    sample: usize,
    /// Where the generated source and the clusters go (default: a temporary folder; needs
    /// twice --mb).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BenchMergeArgs {
    /// Experts to merge.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Where the synthetic experts go (default: a temporary folder; needs ~4 GB).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BenchMoeArgs {
    /// cpu, or cuda (GPU 0; a build with the `cuda` feature).
    #[arg(long, value_enum, default_value_t = super::Device::Cpu)]
    device: super::Device,
    /// Element type (default: float32 on the CPU, bfloat16 on CUDA).
    #[arg(long, value_enum)]
    dtype: Option<super::DType>,
    /// Tokens per layer call (default: 4096 on the CPU, 16384 on CUDA).
    #[arg(long)]
    tokens: Option<usize>,
    /// Model width H.
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    /// Timed repetitions per path (medians are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// The GPU's dense peak in TFLOP/s for the MFU (default: 989.4, the H100/H200 SXM
    /// datasheet's bfloat16 figure; a float32 run should give the device's float32 peak).
    #[arg(long, default_value_t = 989.4)]
    peak_tflops: f64,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BenchOrchestrateArgs {
    /// Independent jobs.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Jobs run at once (default: all of them).
    #[arg(long)]
    slots: Option<usize>,
    /// Duration of each job.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

/// `btm bench train`'s model shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Hidden 256, 4 layers, sequences of 256.
    Tiny,
    /// Hidden 512, 8 layers, sequences of 512.
    Small,
    /// GPT-2 small's shape with a Llama block: hidden 768, 12 layers, sequences of 1024,
    /// batches of 16 (the GPU preset; `--moe`: 8 experts, top-2).
    #[value(name = "gpt-125m")]
    Gpt125m,
}

#[derive(Args)]
pub struct BenchTrainArgs {
    /// Model shape.
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    preset: Preset,
    /// Every FFN becomes experts, top-2 (4 experts; 8 for gpt-125m).
    #[arg(long)]
    moe: bool,
    /// cpu, or cuda (GPU 0, bfloat16 mixed precision; a build with the `cuda` feature).
    #[arg(long, value_enum, default_value_t = super::Device::Cpu)]
    device: super::Device,
    /// The GPU's dense bfloat16 peak in TFLOP/s, for the model FLOPs utilisation (default:
    /// 989.4, the H100/H200 SXM datasheet figure).
    #[arg(long, default_value_t = 989.4)]
    peak_tflops: f64,
    /// CPU threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Processes (MPI ranks, started with mpirun; needs `--features mpi`), each with `--threads`
    /// threads and its own batch: an MoE's experts split over them, a dense model replicated.
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    /// Print one JSON line {"tokens_per_s", "peak_rss_mb", ...}.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Sleep { seconds } => {
            std::thread::sleep(std::time::Duration::from_secs_f64(seconds));
            Ok(())
        }
        BenchCommand::Merge(args) => bench_merge(args),
        BenchCommand::Orchestrate(args) => bench_orchestrate(args),
        BenchCommand::Data(args) => bench_data(args),
        BenchCommand::Cluster(args) => bench_cluster(args),
        BenchCommand::Moe(args) => bench_moe(args),
        BenchCommand::Train(args) => bench_train(args),
    }
}

/// Merge synthetic experts; throughput and peak memory against `cp`.
fn bench_merge(args: BenchMergeArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let shape = btm_merger::bench::BenchShape { experts: args.experts, ..Default::default() };
    let r = btm_merger::bench::run(&dir, &shape)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "merge {} experts of {} parameters: {:.1}s ({:.0} MB/s) vs cp {:.1}s ({:.0} MB/s): {:.2}× cp; peak RSS {:.0} MiB (target {:.0} MiB)",
            shape.experts, r.params_per_expert, r.merge_seconds, r.merge_mb_per_s, r.cp_seconds, r.cp_mb_per_s,
            r.throughput_vs_cp, r.peak_rss_mb, r.rss_target_mb
        );
    }
    Ok(())
}

/// One MoE layer forward + backward, fused kernels against the reference loop.
fn bench_moe(args: BenchMoeArgs) -> Result<()> {
    let device = args.device.open()?;
    let cuda = device.is_cuda();
    let dtype = args.dtype.map_or(if cuda { candle_core::DType::BF16 } else { candle_core::DType::F32 }, |d| d.candle());
    let tokens = args.tokens.unwrap_or(if cuda { 16384 } else { 4096 });
    let spec = btm_kernels::bench::MoeBenchSpec {
        tokens,
        hidden: args.hidden,
        reps: args.reps,
        dtype,
        peak_tflops: Some(args.peak_tflops),
        ..Default::default()
    };
    let quiet = args.json;
    let results = btm_kernels::bench::bench_moe(&spec, &device, |r| {
        if !quiet {
            println!("{}", btm_kernels::bench::format_result(r));
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    }
    Ok(())
}

/// Training throughput of a preset; with `--ranks` above 1, first starts the ranks under mpirun.
fn bench_train(args: BenchTrainArgs) -> Result<()> {
    anyhow::ensure!(args.threads > 0 && args.steps > 0 && args.ranks > 0, "--threads, --steps and --ranks must be positive");
    if args.ranks > 1 && btm_collective::launched_world_size().is_none() {
        // Start the ranks: this same command under mpirun.
        let launch = crate::engine::local_mpi_launch(args.ranks);
        let status = std::process::Command::new(&launch[0])
            .args(&launch[1..])
            .arg(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .status()
            .map_err(|e| anyhow::anyhow!("starting mpirun: {e} (install Open MPI or MPICH)"))?;
        anyhow::ensure!(status.success(), "the {} ranks failed ({status})", args.ranks);
        return Ok(());
    }
    let (dp, ep) = if args.moe { (1, args.ranks) } else { (args.ranks, 1) };
    let ranks = btm_trainer::distributed::Ranks::start(dp, ep, Default::default())?;
    let preset = match args.preset {
        Preset::Tiny => "tiny",
        Preset::Small => "small",
        Preset::Gpt125m => "gpt-125m",
    };
    let on = btm_trainer::bench::BenchDevice { device: args.device.open()?, peak_tflops: Some(args.peak_tflops) };
    let r = btm_trainer::bench::run(preset, args.moe, args.threads, args.steps, &ranks, &on)?;
    if !ranks.is_root() {
        return Ok(());
    }
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "train {}{}{} on {} ({}): {:.0} tokens/s{} ({:.3} s/step: forward {:.3}, backward {:.3}, optimizer {:.3}, of which collectives {:.3}; {} threads, {} parameters), peak RSS {:.0} MiB{}; {} ({} kernels, gemm {})",
            r.preset,
            if r.moe { " moe" } else { "" },
            if r.ranks > 1 { format!(" on {} ranks (expert_parallel {})", r.ranks, r.expert_parallel) } else { String::new() },
            r.device,
            r.dtype,
            r.tokens_per_s,
            r.mfu.map_or(String::new(), |m| format!(", MFU {:.1} % of {} TFLOP/s", 100.0 * m, r.peak_tflops.unwrap_or(0.0))),
            r.step_s,
            r.forward_s,
            r.backward_s,
            r.optimizer_s,
            r.collective_s,
            r.threads,
            r.parameters,
            r.peak_rss_mb,
            r.peak_device_memory_mb.map_or(String::new(), |m| format!(", peak device memory {m:.0} MiB")),
            r.cpu.model,
            r.cpu.isa,
            r.cpu.gemm_kernel
        );
    }
    Ok(())
}

/// N sleep jobs of known duration on N slots, then one dependent sleep job: everything above
/// 2 × the duration is the orchestrator's overhead (spawning, polling, bookkeeping).
fn bench_orchestrate(args: BenchOrchestrateArgs) -> Result<()> {
    use crate::plan::{Job, JobKind, Plan, Resources};
    anyhow::ensure!(args.jobs > 0 && args.seconds > 0.0, "--jobs and --seconds must be positive");
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().to_path_buf();
    let sleep = |name: String, deps: Vec<String>| Job {
        id: name.clone(),
        name: name.clone(),
        kind: if deps.is_empty() { JobKind::TrainExpert } else { JobKind::Merge },
        deps,
        args: vec!["bench".into(), "sleep".into(), "--seconds".into(), args.seconds.to_string()],
        files: vec![],
        outputs: vec![],
        resumable: false,
        resources: Resources { cpus: 1, ..Default::default() },
        train: None,
        produces: None,
    };
    let mut jobs: Vec<Job> = (0..args.jobs).map(|i| sleep(format!("train/{i}"), vec![])).collect();
    jobs.push(sleep("merge".into(), jobs.iter().map(|j| j.name.clone()).collect()));
    let plan = Plan { run_dir: run, jobs, format: crate::plan::PLAN_FORMAT };
    let slots = args.slots.unwrap_or(args.jobs).clamp(1, args.jobs);
    let engine = crate::engine::LocalEngine::new(slots, vec![])?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let start = std::time::Instant::now();
    runtime.block_on(crate::executor::execute(&plan, &engine, 0, true))?;
    let wall = start.elapsed().as_secs_f64();
    // The jobs in waves of `slots`, then the dependent one.
    let ideal = (args.jobs.div_ceil(slots) + 1) as f64 * args.seconds;
    let overhead = (wall - ideal) / wall * 100.0;
    let per_job_ms = (wall - ideal) / (args.jobs + 1) as f64 * 1e3;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"jobs": args.jobs, "slots": slots, "job_seconds": args.seconds, "wall_s": wall, "ideal_s": ideal, "overhead_pct": overhead, "overhead_per_job_ms": per_job_ms})
        );
    } else {
        println!(
            "{} jobs of {}s on {slots} slots, then one dependent job: wall {wall:.2}s, ideal {ideal:.2}s, overhead {overhead:.2} % ({per_job_ms:.1} ms per job)",
            args.jobs, args.seconds
        );
    }
    Ok(())
}

fn bench_data(args: BenchDataArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let source = match &args.source {
        Some(s) => s.clone(),
        None => {
            let s = dir.join("bench-data.jsonl");
            let start = std::time::Instant::now();
            btm_trainer::bench::write_data_source(&s, args.size_mb * 1_000_000)?;
            if !args.json {
                println!("generated {} ({} MB) in {:.1}s", s.display(), args.size_mb, start.elapsed().as_secs_f64());
            }
            s
        }
    };
    let tokenizer = match &args.tokenizer {
        Some(t) => t.clone(),
        None => {
            let texts: Vec<String> = btm_model::jsonl::read_texts(&source, Some(2000))?;
            let tok = btm_model::tokenizer::train_bpe(texts.iter(), 8192)?;
            let path = dir.join("bench-tokenizer.json");
            btm_model::tokenizer::save(&tok, &path)?;
            path
        }
    };
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let r = btm_trainer::bench::run_data(&source, &tokenizer, threads, args.reps)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} ({}, kernels {}), {} threads: {} MB, {} documents, {} tokens\n  btm:       {:.1}s, {:.1} MB/s, {:.0} tokens/s, peak RSS {:.0} MiB\n  reference: {:.1}s, {:.1} MB/s, {:.0} tokens/s, peak RSS {:.0} MiB (tokenizers' encode_batch, no cache written)\n  btm / reference throughput: {:.2}× (median of {})",
            r.cpu.model, r.cpu.isa, r.cpu.gemm_kernel, r.threads, r.source_bytes / 1_000_000, r.documents, r.tokens,
            r.btm_s, r.btm_mb_per_s, r.btm_tokens_per_s, r.btm_peak_rss_mb,
            r.reference_s, r.reference_mb_per_s, r.reference_tokens_per_s, r.reference_peak_rss_mb,
            r.ratio, r.reps
        );
    }
    Ok(())
}

/// The bundled sample's training text, the default material of `bench cluster`'s source.
const SAMPLE_TRAIN: [&str; 3] = [
    include_str!("../../../data/sample/code/train.jsonl"),
    include_str!("../../../data/sample/computing/train.jsonl"),
    include_str!("../../../data/sample/scripture/train.jsonl"),
];

/// The documents of [`SAMPLE_TRAIN`].
fn sample_texts() -> Result<Vec<String>> {
    let mut all = Vec::new();
    for (i, s) in SAMPLE_TRAIN.iter().enumerate() {
        let reader = Box::new(std::io::Cursor::new(s.as_bytes()));
        for t in btm_model::jsonl::Texts::from_reader(&format!("bundled sample {i}"), reader, "text") {
            all.push(t?);
        }
    }
    Ok(all)
}

/// Write about `bytes` of JSONL to `path`, each line `{"text": …}` a random run of 50 to 2000
/// whitespace-separated words (line breaks kept) cut from one of `texts`: real text whose
/// documents rarely repeat, so the clusterer sees a vocabulary like a real corpus's.
fn write_cut_source(path: &std::path::Path, texts: &[String], bytes: u64) -> Result<u64> {
    use std::io::Write;
    // Word boundaries of each text: (start, end) byte offsets.
    let words: Vec<Vec<(usize, usize)>> = texts
        .iter()
        .map(|t| {
            let mut spans = Vec::new();
            let mut start = None;
            for (i, c) in t.char_indices() {
                match (c.is_whitespace(), start) {
                    (true, Some(s)) => {
                        spans.push((s, i));
                        start = None;
                    }
                    (false, None) => start = Some(i),
                    _ => {}
                }
            }
            if let Some(s) = start {
                spans.push((s, t.len()));
            }
            spans
        })
        .collect();
    let usable: Vec<usize> = (0..texts.len()).filter(|&i| !words[i].is_empty()).collect();
    anyhow::ensure!(!usable.is_empty(), "the source material holds no words");
    let mut rng = btm_trainer::data::SplitMix64::new(&[0xC1_0573, bytes]);
    let file = std::fs::File::create(path).map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut written = 0u64;
    while written < bytes {
        let t = usable[rng.below(usable.len() as u64) as usize];
        let spans = &words[t];
        let len = (50 + rng.below(1951) as usize).min(spans.len());
        let first = rng.below((spans.len() - len + 1) as u64) as usize;
        let text = &texts[t][spans[first].0..spans[first + len - 1].1];
        let mut line = serde_json::to_vec(&serde_json::json!({ "text": text }))?;
        line.push(b'\n');
        w.write_all(&line)?;
        written += line.len() as u64;
    }
    w.flush()?;
    Ok(written)
}

/// Domain discovery over a generated (or given) source: MB/s of the whole `btm cluster` run
/// (both passes and the fit) and the process's peak resident memory.
fn bench_cluster(args: BenchClusterArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let source = match &args.source {
        Some(s) => s.clone(),
        None => {
            let texts: Vec<String> = if args.data.is_empty() {
                sample_texts()?
            } else {
                let mut all = Vec::new();
                for d in &args.data {
                    all.extend(btm_model::jsonl::read_texts(d, None)?);
                }
                all
            };
            let s = dir.join("bench-cluster.jsonl");
            let start = std::time::Instant::now();
            let n = write_cut_source(&s, &texts, args.mb << 20)?;
            if !args.json {
                println!(
                    "generated {} ({:.0} MiB from {} documents) in {:.1}s",
                    s.display(),
                    n as f64 / 1048576.0,
                    texts.len(),
                    start.elapsed().as_secs_f64()
                );
            }
            s
        }
    };
    let source_bytes = std::fs::metadata(&source).map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?.len();
    let out = dir.join("bench-clusters");
    let options = btm_cluster::DiscoverOptions {
        fit: btm_cluster::FitOptions { k: args.k, ..Default::default() },
        sample: args.sample,
        overwrite: true,
        ..Default::default()
    };
    let rss_before = btm_trainer::bench::peak_rss_mb();
    let start = std::time::Instant::now();
    let s = btm_cluster::discover(&[source.to_string_lossy().into_owned()], &out, &options)?;
    let seconds = start.elapsed().as_secs_f64();
    let peak = btm_trainer::bench::peak_rss_mb();
    let cpu = btm_kernels::isa::CpuInfo::current();
    // rayon's global pool, which discovery's parallel pass runs on, has one thread a core.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mib = source_bytes as f64 / 1048576.0;
    let r = serde_json::json!({
        "source_bytes": source_bytes,
        "documents": s.documents,
        "k": s.k,
        "sample_documents": s.sample_documents,
        "vocabulary": s.vocabulary,
        "dims": s.dims,
        "seconds": seconds,
        "phase_seconds": s.phase_seconds,
        "mib_per_s": mib / seconds,
        "peak_rss_mb": peak,
        "peak_rss_before_mb": rss_before,
        "threads": threads,
        "cpu": cpu.model,
        "isa": cpu.isa,
    });
    if args.json {
        println!("{r}");
    } else {
        println!(
            "{} ({}), {threads} threads: clustered {mib:.0} MiB, {} documents, into {} clusters (fitted on {}, {} terms, {} dimensions) in {seconds:.1}s: {:.2} MiB/s (sample {:.1}s, fit {:.1}s, assign and write {:.1}s); peak RSS {peak:.0} MiB",
            cpu.model, cpu.isa, s.documents, s.k, s.sample_documents, s.vocabulary, s.dims, mib / seconds,
            s.phase_seconds[0], s.phase_seconds[1], s.phase_seconds[2]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_source_reaches_its_size_with_runs_of_the_texts_words() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let texts = vec!["alpha beta\ngamma delta".repeat(40), "one two three".to_string()];
        let n = write_cut_source(&path, &texts, 20_000).unwrap();
        assert_eq!(n, std::fs::metadata(&path).unwrap().len());
        assert!((20_000..20_000 + 20_000).contains(&n), "{n}");
        let docs = btm_model::jsonl::read_texts(&path, None).unwrap();
        assert!(docs.len() > 5);
        for d in &docs {
            assert!(texts.iter().any(|t| t.contains(d.as_str())), "{d:?} is not a run of a text");
            assert!(!d.starts_with(char::is_whitespace) && !d.ends_with(char::is_whitespace));
        }
        // Different cuts, not one document repeated.
        assert!(docs.iter().any(|d| d != &docs[0]));
    }

    #[test]
    fn the_bundled_sample_parses() {
        assert!(sample_texts().unwrap().len() > 3);
    }
}
