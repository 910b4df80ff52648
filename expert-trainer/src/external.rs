//! Training by an external engine — torchrun with DDP or FSDP, torchtitan, Megatron through its
//! Hugging Face import/export, or any command — through Hugging Face checkpoints.
//!
//! A job whose spec has `external` does not train in this process: it renders the command
//! template (every `{placeholder}` replaced by a shell-quoted value, see [`PLACEHOLDERS`]), runs
//! it through `sh -c`, relays its output, and then holds the result to the contract:
//!
//! - the command exits 0 and leaves a Hugging Face checkpoint in `{model_out}`: the input's
//!   architecture and every tensor shape, every value finite, the input's tokenizer (or none,
//!   in which case the input's is used);
//! - re-running the command after a kill resumes from its own checkpoints in `{work_dir}`
//!   (which btm keeps across attempts; `{model_out}` is emptied before each attempt).
//!
//! Only then is the model written in btm's layout (`model/`, `MANIFEST.json` last, lineage in
//! `btm.json`) and published like btm's own outputs, to object storage too. A command that
//! exits 0 without a valid checkpoint fails the job with a named error; nothing half-written is
//! ever used. JSON lines the command prints with a `step` key (`{"step", "loss", "lr",
//! "tokens_seen"}`, `{"step", "val_loss", "val_ppl"}`) go into `metrics.jsonl`, so `btm status`
//! and the report show its progress and curves.

use crate::metrics::Metrics;
use crate::outcome::{trained_lineage, Outcome};
use crate::remote::Mirror;
use crate::spec::{JobSpec, Trainer};
use anyhow::{bail, Context, Result};
use btm_model::weights::expected_tensors;
use btm_model::{Checkpoint, Extras, WriteOptions};
use candle_core::DType;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Every placeholder a template may use, with what it becomes.
pub const PLACEHOLDERS: &[(&str, &str)] = &[
    ("model_in", "the input model folder (Hugging Face layout, tokenizer.json included)"),
    ("model_out", "the folder the command must leave its Hugging Face checkpoint in"),
    ("work_dir", "a folder the command owns for its own checkpoints; kept across attempts"),
    ("train_files", "the training JSONL files, each quoted, separated by spaces"),
    ("train_weights", "their sampling weights, comma-separated (`1,0.5`)"),
    ("valid_files", "the validation JSONL files, each quoted, separated by spaces"),
    ("steps", "optimizer steps"),
    ("tokens", "training tokens (steps × batch_size × grad_accum × seq_len)"),
    ("batch_size", "sequences per micro-batch"),
    ("grad_accum", "micro-batches per step"),
    ("seq_len", "tokens per sequence"),
    ("lr", "peak learning rate"),
    ("min_lr", "the learning rate the cosine decays to"),
    ("warmup_steps", "linear warm-up steps"),
    ("decay", "the schedule after warm-up: cosine or constant"),
    ("weight_decay", "AdamW's decoupled weight decay"),
    ("beta1", "AdamW β1"),
    ("beta2", "AdamW β2"),
    ("grad_clip", "global gradient-norm clip (0 = none)"),
    ("seed", "the training seed"),
    ("domain", "the domain trained on (empty for mixtures)"),
    ("nproc_per_node", "processes per node (torchrun's)"),
    ("nnodes", "nodes of a multi-node launch (1 otherwise)"),
    ("rdzv_endpoint", "the rendezvous address of a multi-node launch, `host:port` on its first node (from the engine)"),
    ("rdzv_id", "the multi-node launch's rendezvous id (from the engine)"),
];

/// The variables through which an engine tells each node of a multi-node job where the
/// rendezvous is, its id, and the node's index (node 0 prepares, checks and publishes the
/// output; the others only train). Slurm's tasks read their index from `SLURM_PROCID`.
pub const RDZV_ENDPOINT: &str = "BTM_RDZV_ENDPOINT";
pub const RDZV_ID: &str = "BTM_RDZV_ID";
pub const NODE_RANK: &str = "BTM_NODE_RANK";

/// This process's node index in a multi-node job (`BTM_NODE_RANK`, else Slurm's task index).
pub fn node_rank() -> usize {
    [NODE_RANK, "SLURM_PROCID"].iter().find_map(|v| std::env::var(v).ok().and_then(|s| s.trim().parse().ok())).unwrap_or(0)
}

/// A piece of a command template: text to copy, or the name of a placeholder.
enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

/// `template` cut into its pieces; `{{` and `}}` stand for literal braces. The one parser of
/// templates: checking and rendering both read its pieces.
fn pieces(template: &str) -> Result<Vec<Piece<'_>>> {
    let (mut out, mut last, mut i) = (Vec::new(), 0, 0);
    let bytes = template.as_bytes();
    while i < bytes.len() {
        match bytes[i] {
            b'{' | b'}' if bytes.get(i + 1) == Some(&bytes[i]) => {
                out.push(Piece::Text(&template[last..i + 1]));
                i += 2;
                last = i;
            }
            b'{' => {
                let end = i + template[i..]
                    .find('}')
                    .with_context(|| format!("`{{` at byte {i} is never closed (write `{{{{` for a literal brace)"))?;
                out.push(Piece::Text(&template[last..i]));
                out.push(Piece::Placeholder(&template[i + 1..end]));
                i = end + 1;
                last = i;
            }
            _ => i += 1,
        }
    }
    out.push(Piece::Text(&template[last..]));
    Ok(out)
}

impl Trainer {
    /// The command template this trainer runs (`None` for btm's own).
    pub fn template(&self) -> Option<String> {
        match self {
            Trainer::Btm => None,
            Trainer::Command { command } => Some(command.clone()),
            Trainer::Torchrun { script, args, nproc_per_node, nnodes } => {
                // `exec`: torchrun replaces the shell, so signals (and the parent-death signal)
                // reach it, and it stops its workers.
                let launch = match nnodes {
                    1 => "--standalone --nnodes 1".to_string(),
                    n => format!("--nnodes {n} --rdzv_backend c10d --rdzv_endpoint {{rdzv_endpoint}} --rdzv_id {{rdzv_id}}"),
                };
                let mut line = format!("exec torchrun {launch} --nproc_per_node {nproc_per_node} {}", shell_quote(script));
                for a in args {
                    line.push(' ');
                    line.push_str(a);
                }
                Some(line)
            }
        }
    }

    /// Check the settings and that every placeholder is known; the error names the first
    /// unknown one and lists the known ones.
    pub fn check(&self) -> Result<()> {
        if let Trainer::Torchrun { nproc_per_node, nnodes, .. } = self {
            if *nproc_per_node == 0 {
                bail!("nproc_per_node: must be positive");
            }
            if *nnodes == 0 {
                bail!("nnodes: must be positive");
            }
        }
        let Some(template) = self.template() else { return Ok(()) };
        for piece in pieces(&template)? {
            let Piece::Placeholder(name) = piece else { continue };
            if !PLACEHOLDERS.iter().any(|(p, _)| *p == name) {
                let known: Vec<&str> = PLACEHOLDERS.iter().map(|(p, _)| *p).collect();
                bail!("unknown placeholder `{{{name}}}` (known: {})", known.join(", "));
            }
        }
        Ok(())
    }
}

/// `'…'` with embedded single quotes escaped: one shell word whatever the value.
pub fn shell_quote(value: &str) -> String {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-,:=+@%".contains(&b)) {
        return value.to_string();
    }
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// Replace every placeholder of `template` by its value from `values` (already shell words).
pub fn render(template: &str, values: &BTreeMap<&str, String>) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    for piece in pieces(template)? {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Placeholder(name) => out.push_str(values.get(name).with_context(|| format!("unknown placeholder `{{{name}}}`"))?),
        }
    }
    Ok(out)
}

/// The placeholder values for a job, as shell words.
fn values(spec: &JobSpec, model_in: &Path, model_out: &Path, work_dir: &Path) -> Result<BTreeMap<&'static str, String>> {
    let nnodes = spec.trainer.nodes();
    let nproc = match &spec.trainer {
        Trainer::Torchrun { nproc_per_node, .. } => *nproc_per_node,
        _ => 1,
    };
    let from_engine = |var: &str| -> Result<String> {
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(shell_quote(&v)),
            _ if nnodes == 1 => Ok(String::new()),
            _ => bail!("trainer: nnodes {nnodes} needs the rendezvous its engine sets in `{var}` (run it through `btm run` on Slurm or Kubernetes, or set {RDZV_ENDPOINT}, {RDZV_ID} and {NODE_RANK} on each node)"),
        }
    };
    let (rdzv_endpoint, rdzv_id) = (from_engine(RDZV_ENDPOINT)?, from_engine(RDZV_ID)?);
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let num = |x: f64| format!("{x}");
    let decay = serde_json::to_value(spec.schedule.decay).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let steps = spec.total_steps();
    // Data in an object store (a run kept in a bucket) is fetched into the local cache: the
    // command gets files it can open.
    let local = |p: &Path| -> Result<String> { Ok(q(&btm_model::folder::fetch_file(&p.to_string_lossy())?)) };
    let train_files = spec.data.train.iter().map(|s| local(&s.path)).collect::<Result<Vec<_>>>()?.join(" ");
    let valid_files = spec.data.valid.iter().map(|p| local(p)).collect::<Result<Vec<_>>>()?.join(" ");
    Ok(BTreeMap::from([
        ("model_in", q(model_in)),
        ("model_out", q(model_out)),
        ("work_dir", q(work_dir)),
        ("train_files", train_files),
        ("train_weights", spec.data.train.iter().map(|s| num(s.weight)).collect::<Vec<_>>().join(",")),
        ("valid_files", valid_files),
        ("steps", steps.to_string()),
        ("tokens", (steps * spec.tokens_per_step()).to_string()),
        ("batch_size", spec.batch_size.to_string()),
        ("grad_accum", spec.grad_accum.to_string()),
        ("seq_len", spec.seq_len.to_string()),
        ("lr", num(spec.optimizer.lr)),
        ("min_lr", num(spec.schedule.min_lr)),
        ("warmup_steps", spec.schedule.warmup_steps.to_string()),
        ("decay", decay),
        ("weight_decay", num(spec.optimizer.weight_decay)),
        ("beta1", num(spec.optimizer.betas[0])),
        ("beta2", num(spec.optimizer.betas[1])),
        ("grad_clip", num(spec.grad_clip.unwrap_or(0.0))),
        ("seed", spec.seed.to_string()),
        ("domain", shell_quote(spec.domain.as_deref().unwrap_or(""))),
        ("nproc_per_node", nproc.to_string()),
        ("nnodes", nnodes.to_string()),
        ("rdzv_endpoint", rdzv_endpoint),
        ("rdzv_id", rdzv_id),
    ]))
}

/// Run `spec`'s external trainer to the end and publish its model (see the module docs).
pub fn run(spec: &JobSpec, quiet: bool) -> Result<Outcome> {
    let trainer = &spec.trainer;
    trainer.check().context("trainer")?;
    let template = trainer.template().context("trainer: btm's own trainer has no command")?;
    let Some(init) = &spec.init.checkpoint else {
        bail!("trainer: an external trainer needs `init.checkpoint` (a Hugging Face model to start from)");
    };
    let model_in = btm_model::storage::local_dir(init).with_context(|| format!("init.checkpoint: {init}"))?;
    let input = Checkpoint::open(&model_in).with_context(|| format!("init.checkpoint: {init}"))?;
    let out = spec.out_dir()?;
    let work_dir = out.join("external").join("work");
    let model_out = out.join("external").join("model-out");
    let line = render(&template, &values(spec, &model_in, &model_out, &work_dir)?)?;
    let node = node_rank();
    if node > 0 {
        // Another node of a multi-node launch: train, and leave the output to node 0 (the
        // folders are on a filesystem the nodes share; node 0 prepared them before its torchrun
        // joined the rendezvous, which every node's training waits for).
        let mut metrics = Metrics::silent(&out);
        if !quiet {
            eprintln!("[btm train] node {node}: external trainer: {line}");
        }
        run_command(&line, &mut metrics)?;
        return Ok(Outcome::Finished { step: spec.total_steps(), model_dir: out.join("model") });
    }
    std::fs::create_dir_all(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
    // A previous attempt's output may be half-written: the command starts from an empty folder
    // (its resumable state is in the work folder).
    if model_out.exists() {
        std::fs::remove_dir_all(&model_out).with_context(|| format!("clearing {}", model_out.display()))?;
    }
    std::fs::create_dir_all(&model_out)?;
    let mut metrics = Metrics::open(&out, u64::MAX, quiet)?;
    metrics.say(&format!("external trainer: {line}"));
    run_command(&line, &mut metrics)?;

    let config = check_output(&input, &model_in, &model_out)?;
    let steps = spec.total_steps();
    let mut lineage = trained_lineage(spec, Some(&model_in), steps, steps * spec.tokens_per_step())?;
    lineage.extra.insert("trainer".into(), serde_json::Value::String(line.clone()));
    let trained = Checkpoint::open(&model_out)?;
    let model_dir = out.join("model");
    let extras = Extras { tokenizer: Some(model_in.join("tokenizer.json")), lineage: Some(lineage) };
    let opts = WriteOptions { overwrite: true, ..WriteOptions::default() };
    btm_model::write_checkpoint(&model_dir, &config, &mut |n| Ok(trained.tensor(n)?.to_dtype(DType::F32)?), &extras, &opts)?;
    std::fs::remove_dir_all(&model_out).ok();
    if let Some(url) = spec.mirror_url()? {
        let mirror = Mirror::new(&url)?;
        mirror.delete_dir("model")?;
        mirror.upload_dir(&model_dir, "model")?;
        mirror.upload_file(metrics.path(), crate::metrics::METRICS)?;
    }
    metrics.finish();
    metrics.say(&format!("done: the external trainer's model at {}", model_dir.display()));
    Ok(Outcome::Finished { step: steps, model_dir })
}

/// Run `sh -c line`, relaying its output; JSON lines with a `step` go into the metrics.
fn run_command(line: &str, metrics: &mut Metrics) -> Result<()> {
    let mut command = Command::new("sh");
    command.arg("-c").arg(line).stdout(Stdio::piped()).stderr(Stdio::inherit());
    // SAFETY: prctl is async-signal-safe. If this process dies (killed with its job), the
    // command is sent SIGTERM instead of writing on into a folder the next attempt reuses.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = command.spawn().context("starting `sh` for the external trainer")?;
    let stdout = child.stdout.take().expect("piped stdout");
    for l in BufReader::new(stdout).lines() {
        let l = l?;
        match serde_json::from_str::<serde_json::Value>(&l) {
            Ok(v) if v.get("step").is_some_and(|s| s.is_u64()) => metrics.record(&v)?,
            _ => println!("{l}"),
        }
    }
    let status = child.wait()?;
    match status.code() {
        Some(0) => Ok(()),
        Some(127) => bail!("external trainer: command not found (exit 127): {line}"),
        Some(code) => bail!("external trainer: exited with status {code}: {line}"),
        None => bail!("external trainer: killed by a signal: {line}"),
    }
}

/// Hold the command's output to the contract; the checkpoint's config on success.
pub fn check_output(input: &Checkpoint, model_in: &Path, model_out: &Path) -> Result<btm_model::ModelConfig> {
    let trained = Checkpoint::open(model_out)
        .with_context(|| format!("external trainer: exited 0 but left no valid Hugging Face checkpoint in {}", model_out.display()))?;
    let (want, got) = (&input.config, &trained.config);
    if want.output_architecture() != got.output_architecture() {
        bail!(
            "external trainer: wrote a {:?} model, the input is {:?} ({})",
            got.output_architecture(),
            want.output_architecture(),
            model_out.display()
        );
    }
    let (a, b) = (expected_tensors(want), expected_tensors(got));
    let shapes = |list: &[btm_model::weights::TensorSpec]| -> BTreeMap<String, Vec<usize>> {
        list.iter().map(|t| (t.name.clone(), t.shape.clone())).collect()
    };
    let (want_shapes, got_shapes) = (shapes(&a), shapes(&b));
    if want_shapes != got_shapes {
        let missing: Vec<&String> = want_shapes.keys().filter(|n| !got_shapes.contains_key(*n)).collect();
        let extra: Vec<&String> = got_shapes.keys().filter(|n| !want_shapes.contains_key(*n)).collect();
        let reshaped: Vec<String> =
            want_shapes.iter().filter_map(|(n, s)| got_shapes.get(n).filter(|g| *g != s).map(|g| format!("`{n}` {s:?} → {g:?}"))).collect();
        let mut parts = vec![];
        if let Some(n) = missing.first() {
            parts.push(format!("{} tensors missing (`{n}`…)", missing.len()));
        }
        if let Some(n) = extra.first() {
            parts.push(format!("{} not in the input (`{n}`…)", extra.len()));
        }
        if let Some(r) = reshaped.first() {
            parts.push(format!("{} of another shape ({r}…)", reshaped.len()));
        }
        bail!("external trainer: the output is not the input's architecture: {} ({})", parts.join(", "), model_out.display());
    }
    for spec in &b {
        let values = trained.tensor(&spec.name)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!("external trainer: `{}` holds {} at element {i} ({})", spec.name, values[i], model_out.display());
        }
    }
    let out_tok = model_out.join("tokenizer.json");
    if out_tok.exists() {
        let vocab = |p: &Path| -> Result<BTreeMap<String, u32>> {
            let t = tokenizers::Tokenizer::from_file(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            Ok(t.get_vocab(true).into_iter().collect())
        };
        if vocab(&out_tok)? != vocab(&model_in.join("tokenizer.json"))? {
            bail!("external trainer: the tokenizer changed ({} differs from the input's vocabulary)", out_tok.display());
        }
    }
    Ok(got.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_quoted_values_and_name_unknown_placeholders() {
        let values = BTreeMap::from([("model_in", shell_quote("/a b/it's")), ("steps", "10".to_string())]);
        let line = render("train --in {model_in} --steps {steps} --json '{{\"x\": 1}}'", &values).unwrap();
        assert_eq!(line, "train --in '/a b/it'\\''s' --steps 10 --json '{\"x\": 1}'");
        let t = Trainer::Command { command: "x {model_in} {modle_out}".into() };
        let err = t.check().unwrap_err().to_string();
        assert!(err.contains("unknown placeholder `{modle_out}`") && err.contains("model_out"), "{err}");
        assert!(Trainer::Command { command: "x {model_in".into() }.check().is_err());
        let tr =
            Trainer::Torchrun { script: "train.py".into(), args: vec!["--out".into(), "{model_out}".into()], nproc_per_node: 2, nnodes: 1 };
        tr.check().unwrap();
        assert_eq!(tr.template().unwrap(), "exec torchrun --standalone --nnodes 1 --nproc_per_node 2 train.py --out {model_out}");
        // Two nodes: a c10d rendezvous whose address and id the engine supplies.
        let two = Trainer::Torchrun { script: "t.py".into(), args: vec![], nproc_per_node: 4, nnodes: 2 };
        two.check().unwrap();
        assert_eq!(
            two.template().unwrap(),
            "exec torchrun --nnodes 2 --rdzv_backend c10d --rdzv_endpoint {rdzv_endpoint} --rdzv_id {rdzv_id} --nproc_per_node 4 t.py"
        );
        assert_eq!(two.nodes(), 2);
        assert!(Trainer::Torchrun { script: "t.py".into(), args: vec![], nproc_per_node: 1, nnodes: 0 }.check().is_err());
    }

    #[test]
    fn the_trainer_block_parses_from_yaml_and_rejects_unknown_kinds() {
        let t: Trainer = serde_yaml::from_str("{kind: torchrun, script: s.py, args: [--x, '{steps}'], nproc_per_node: 2}").unwrap();
        assert_eq!(t.template().unwrap(), "exec torchrun --standalone --nnodes 1 --nproc_per_node 2 s.py --x {steps}");
        assert!(serde_yaml::from_str::<Trainer>("{kind: deepspeed}").is_err());
        assert!(serde_yaml::from_str::<Trainer>("{kind: command, command: x, extra: 1}").is_err());
        assert_eq!(serde_yaml::from_str::<Trainer>("{kind: btm}").unwrap(), Trainer::Btm);
    }
}
