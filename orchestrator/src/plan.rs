//! From a pipeline to a DAG of jobs.
//!
//! Every job is one `btm` subcommand run as its own process. A job's id is a hash of its
//! kind, arguments, generated files and its dependencies' ids, so an unchanged job keeps its
//! id across `btm run`s (and is skipped once done), and a change anywhere upstream gives every
//! job downstream a new id (and redoes it).
//!
//! Run layout (under `<storage>/<name>/`):
//! ```text
//! pipeline.yaml                 the resolved spec
//! plan.json                     this plan: every job, its inputs, outputs and resources
//! jobs/<name>/                  job.yaml / config.json handed to the job, done.json once finished
//! logs/<name>.log               the job's output
//! tokenizer/  seed/  experts/<domain>/  merged/  continued/  upcycled/  upcycled-continued/
//! baseline/  added/<domain>/  extended/<domain>/   models (trainer outputs keep the HF model in model/)
//! eval/<model>/<domain>.json    {"tokens", "nll", "ppl"} (+ routing shares for MoE models)
//! report.md  report.html  plots/
//! ```

use crate::pipeline::load::resolve;
use crate::pipeline::spec::{Pipeline, TrainParams};
use anyhow::{bail, Context, Result};
use btm_trainer::spec as job;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Tokenizer,
    TrainSeed,
    TrainExpert,
    Merge,
    Upcycle,
    Continue,
    Baseline,
    AddExpert,
    Eval,
}

/// What a job asks of the engine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: usize,
    pub gpus: usize,
    pub memory_mb: Option<u64>,
    pub time_limit_min: Option<u64>,
    /// Processes of one multi-process training job (MPI ranks); 0 or 1: one process.
    #[serde(default)]
    pub ranks: usize,
    /// Nodes of one multi-node job (an external torchrun's `nnodes`: one task per node, meeting
    /// at a rendezvous on the first); 0 or 1: one node.
    #[serde(default)]
    pub nodes: usize,
}

/// A model the run produces (or starts from), for evaluation and the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    /// `seed`, `expert-<domain>`, `merged`, `continued`, `upcycled`, ...
    pub label: String,
    /// The Hugging Face directory.
    pub dir: PathBuf,
    /// Training tokens spent to get here after the seed, all ancestors included.
    pub tokens_after_seed: u64,
    /// Training FLOPs after the seed by the 6 · N_active · tokens rule, all ancestors included.
    pub flops_after_seed: f64,
}

/// A training job's progress source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainInfo {
    pub steps: u64,
    pub tokens: u64,
    pub metrics: PathBuf,
    /// The external trainer's command template, when an external engine trains the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// Unique, readable: `expert/scripture`, `eval/merged/code`.
    pub name: String,
    pub kind: JobKind,
    /// Names of the jobs that must finish first.
    pub deps: Vec<String>,
    /// Arguments after `btm`.
    pub args: Vec<String>,
    /// Files written into the run before the job starts (path, contents).
    pub files: Vec<(PathBuf, String)>,
    /// What it produces; deleted before a (re)start unless the job resumes by itself.
    pub outputs: Vec<PathBuf>,
    /// Trainers resume from their own checkpoints, so their outputs are kept across restarts.
    pub resumable: bool,
    pub resources: Resources,
    pub train: Option<TrainInfo>,
    pub produces: Option<ModelRef>,
}

impl Job {
    /// Folder of the job's own files in the run (`jobs/expert-scripture`).
    pub fn dir(&self, run: &Path) -> PathBuf {
        run.join("jobs").join(self.name.replace('/', "-"))
    }

    pub fn log(&self, run: &Path) -> PathBuf {
        run.join("logs").join(format!("{}.log", self.name.replace('/', "-")))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub run_dir: PathBuf,
    pub jobs: Vec<Job>,
}

/// A job's id: SHA-256 (first 16 hex digits) of its kind, name, arguments, the files it is
/// handed (paths and contents) and its dependencies' ids. An unchanged job keeps its id across
/// `btm run`s and is skipped once done; a change anywhere upstream changes every id below it.
pub fn job_id(kind: JobKind, name: &str, args: &[String], files: &[(PathBuf, String)], dep_ids: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(format!("{kind:?}\0{name}\0"));
    for a in args {
        h.update(a.as_bytes());
        h.update([0]);
    }
    for (p, c) in files {
        h.update(p.to_string_lossy().as_bytes());
        h.update(c.as_bytes());
    }
    for d in dep_ids {
        h.update(d.as_bytes());
    }
    hex::encode(h.finalize())[..16].to_string()
}

/// Training defaults under the pipeline's `train` blocks.
fn defaults() -> TrainParams {
    TrainParams {
        steps: Some(100),
        batch_size: Some(8),
        seq_len: Some(128),
        grad_accum: Some(1),
        lr: Some(1e-3),
        min_lr: None,
        warmup_steps: Some(10),
        decay: Some("cosine".into()),
        weight_decay: Some(0.1),
        betas: Some([0.9, 0.95]),
        grad_clip: Some(1.0),
        seed: Some(0),
        checkpoint_interval: Some(50),
        keep_checkpoints: Some(2),
        eval_interval: Some(0),
        eval_sequences: Some(16),
        log_interval: Some(10),
        aux_loss_coef: Some(0.01),
        z_loss_coef: Some(0.001),
        capacity_factor: None,
        drop_policy: None,
        trainable: None,
        trainer: None,
        resources: None,
        data_parallel: None,
        expert_parallel: None,
    }
}

struct Builder<'a> {
    p: &'a Pipeline,
    base: &'a Path,
    run: PathBuf,
    jobs: Vec<Job>,
    /// Threads per job; `None` lets the local engine decide when the job starts.
    threads: Option<usize>,
}

fn abs(base: &Path, location: &str) -> String {
    let r = resolve(base, location);
    if r.contains("://") {
        return r;
    }
    std::path::absolute(&r).map(|p| p.to_string_lossy().into_owned()).unwrap_or(r)
}

impl Builder<'_> {
    fn id_of(&self, name: &str) -> String {
        self.jobs.iter().find(|j| j.name == name).map(|j| j.id.clone()).unwrap_or_default()
    }

    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        name: String,
        kind: JobKind,
        deps: Vec<String>,
        args: Vec<String>,
        files: Vec<(PathBuf, String)>,
        outputs: Vec<PathBuf>,
        train: Option<TrainInfo>,
        produces: Option<ModelRef>,
    ) -> String {
        let dep_ids: Vec<String> = deps.iter().map(|d| self.id_of(d)).collect();
        let id = job_id(kind, &name, &args, &files, &dep_ids);
        self.jobs.push(Job {
            id,
            name: name.clone(),
            kind,
            deps,
            args,
            files,
            outputs,
            resumable: train.is_some(),
            resources: Resources { cpus: self.threads.unwrap_or(0), gpus: self.p.engine.gpus_per_job(), ..Default::default() },
            train,
            produces,
        });
        name
    }

    fn model(&self, name: &str) -> ModelRef {
        self.jobs.iter().find(|j| j.name == name).and_then(|j| j.produces.clone()).expect("job produces a model")
    }

    /// A trainer job: `btm train --job <run>/jobs/<name>/job.yaml`.
    #[allow(clippy::too_many_arguments)]
    fn train_job(
        &mut self,
        name: &str,
        kind: JobKind,
        deps: Vec<String>,
        init: job::Init,
        out: PathBuf,
        train: Vec<(String, f64)>,
        valid: Vec<String>,
        params: &TrainParams,
        domain: Option<String>,
        label: &str,
        parent: Option<&ModelRef>,
        active_params: usize,
    ) -> Result<String> {
        let t = defaults().overlay(params);
        let steps = t.steps.unwrap_or(0);
        let tokens = t.tokens();
        let spec = job::JobSpec {
            init,
            out: out.to_string_lossy().into_owned(),
            data: job::Data {
                train: train.into_iter().map(|(path, weight)| job::Source { path: PathBuf::from(path), weight }).collect(),
                valid: valid.into_iter().map(PathBuf::from).collect(),
            },
            steps: Some(steps),
            tokens: None,
            batch_size: t.batch_size.unwrap_or(8),
            seq_len: t.seq_len.unwrap_or(128),
            grad_accum: t.grad_accum.unwrap_or(1),
            optimizer: job::Optimizer {
                lr: t.lr.unwrap_or(1e-3),
                betas: t.betas.unwrap_or([0.9, 0.95]),
                eps: 1e-8,
                weight_decay: t.weight_decay.unwrap_or(0.1),
            },
            schedule: job::Schedule {
                warmup_steps: t.warmup_steps.unwrap_or(0),
                decay: if t.decay.as_deref() == Some("constant") { job::Decay::Constant } else { job::Decay::Cosine },
                min_lr: t.min_lr.unwrap_or(t.lr.unwrap_or(1e-3) * 0.1),
            },
            grad_clip: t.grad_clip,
            seed: t.seed.unwrap_or(0),
            threads: t.resources.as_ref().and_then(|r| r.cpus_per_task).or(self.threads),
            eval: job::Eval { interval: t.eval_interval.unwrap_or(0), sequences: t.eval_sequences.unwrap_or(16) },
            checkpoint: job::Checkpointing { interval: t.checkpoint_interval.unwrap_or(0), keep: t.keep_checkpoints.unwrap_or(2) },
            log_interval: t.log_interval.unwrap_or(10),
            moe: job::Moe {
                aux_loss_coef: t.aux_loss_coef.unwrap_or(0.01),
                z_loss_coef: t.z_loss_coef.unwrap_or(0.001),
                capacity_factor: t.capacity_factor,
                drop_policy: t.drop_policy.clone().unwrap_or_else(|| "probs".into()),
            },
            domain,
            dtype: "float32".into(),
            device: "cpu".into(),
            trainable: t.trainable.clone().unwrap_or_default(),
            resume: "auto".into(),
            token_cache: None,
            work_dir: None,
            data_parallel: t.data_parallel.unwrap_or(1),
            expert_parallel: t.expert_parallel.unwrap_or(1),
            collective: Default::default(),
            trainer: match t.trainer.clone().unwrap_or_default() {
                // The script is named relative to the pipeline's folder; the job runs elsewhere.
                btm_trainer::external::Trainer::Torchrun { script, args, nproc_per_node, nnodes } => {
                    btm_trainer::external::Trainer::Torchrun { script: abs(self.base, &script), args, nproc_per_node, nnodes }
                }
                other => other,
            },
        };
        let job_dir = self.run.join("jobs").join(name.replace('/', "-"));
        let yaml = serde_yaml::to_string(&spec)?;
        let flops = 6.0 * active_params as f64 * tokens as f64;
        let produces = ModelRef {
            label: label.into(),
            dir: out.join("model"),
            tokens_after_seed: parent.map_or(0, |p| p.tokens_after_seed) + if kind == JobKind::TrainSeed { 0 } else { tokens },
            flops_after_seed: parent.map_or(0.0, |p| p.flops_after_seed) + if kind == JobKind::TrainSeed { 0.0 } else { flops },
        };
        let job_file = job_dir.join("job.yaml");
        let resources = t.resources.clone().unwrap_or_default();
        let name = self.add(
            name.into(),
            kind,
            deps,
            vec!["train".into(), "--job".into(), job_file.to_string_lossy().into_owned()],
            vec![(job_file, yaml)],
            vec![out.clone()],
            Some(TrainInfo { steps, tokens, metrics: out.join("metrics.jsonl"), external: spec.trainer.template() }),
            Some(produces),
        );
        let job = self.jobs.last_mut().expect("the job just added");
        job.resources.cpus = resources.cpus_per_task.unwrap_or(job.resources.cpus);
        job.resources.gpus = resources.gpus_per_task.unwrap_or(job.resources.gpus);
        job.resources.memory_mb = resources.memory_mb;
        job.resources.time_limit_min = resources.time_limit_min;
        job.resources.ranks = spec.ranks();
        job.resources.nodes = spec.trainer.nodes();
        Ok(name)
    }

    /// One eval job per domain for model `m` (made by job `dep`, if the run makes it).
    /// Scores of BTM's ensemble: the (first arm seed's) experts, all of them and top-1, per
    /// domain, each domain's prior estimated on its `valid` file; with `add_experts`, also
    /// `ensemble-extended`, the experts plus the added ones, on the added domains too.
    fn ensemble_eval_jobs(&mut self) {
        let trained = |prefix: &str| -> Vec<(String, PathBuf)> {
            self.jobs
                .iter()
                .filter(|j| j.kind == JobKind::TrainExpert && j.name.starts_with(prefix))
                .filter_map(|j| j.produces.as_ref().map(|m| (j.name.clone(), m.dir.clone())))
                .collect()
        };
        let experts = trained("expert/");
        if experts.is_empty() {
            return;
        }
        let extended: Vec<(String, PathBuf)> = experts.iter().cloned().chain(trained("added/")).collect();
        let p = self.p;
        let all_domains: Vec<&crate::pipeline::spec::Domain> =
            p.domains.iter().chain(p.add_experts.iter().flat_map(|a| a.domains.iter())).collect();
        let mut sets = vec![
            ("ensemble", None, &experts, p.domains.iter().collect::<Vec<_>>()),
            ("ensemble-top1", Some(1), &experts, p.domains.iter().collect()),
        ];
        if extended.len() > experts.len() {
            sets.push(("ensemble-extended", None, &extended, all_domains));
        }
        for (label, top_k, members, domains) in sets {
            for d in domains {
                self.ensemble_eval_job(label, top_k, members, d);
            }
        }
    }

    /// `btm eval --ensemble` of `members` on domain `d` (prior from its `valid` file).
    fn ensemble_eval_job(&mut self, label: &str, top_k: Option<usize>, members: &[(String, PathBuf)], d: &crate::pipeline::spec::Domain) {
        let mut what = vec!["--ensemble".to_string()];
        what.extend(members.iter().map(|(_, dir)| dir.to_string_lossy().into_owned()));
        if let Some(valid) = &d.valid {
            what.extend(["--prior-from".into(), abs(self.base, valid)]);
        }
        if let Some(k) = top_k {
            what.extend(["--top-k".into(), k.to_string()]);
        }
        let deps = members.iter().map(|(name, _)| name.clone()).collect();
        self.eval_job(label, d, what, vec![], deps);
    }

    fn eval_jobs(&mut self, m: &ModelRef, dep: Option<&str>) {
        for d in &self.p.domains {
            let what = vec!["--model".into(), m.dir.to_string_lossy().into_owned()];
            self.eval_job(&m.label, d, what, vec!["--routing".into()], dep.iter().map(|d| d.to_string()).collect());
        }
    }

    /// Job `eval/<label>/<domain>`: `btm eval <what> --data … --seq-len … --json <flags> --out …`
    /// on `d`'s evaluation split (none when the domain has no such file), capped as `eval` says.
    /// The arguments' order is part of every eval job's id.
    fn eval_job(&mut self, label: &str, d: &crate::pipeline::spec::Domain, what: Vec<String>, flags: Vec<String>, deps: Vec<String>) {
        let e = &self.p.eval;
        let data = match e.split {
            crate::pipeline::spec::Split::Test => d.test.as_ref(),
            crate::pipeline::spec::Split::Valid => d.valid.as_ref(),
        };
        let Some(data) = data else { return };
        let out = self.run.join("eval").join(label).join(format!("{}.json", d.name));
        let mut args = vec!["eval".to_string()];
        args.extend(what);
        args.extend(["--data".into(), abs(self.base, data), "--seq-len".into(), e.seq_len.to_string(), "--json".into()]);
        args.extend(flags);
        args.extend(["--out".into(), out.to_string_lossy().into_owned()]);
        if let Some(n) = e.max_docs {
            args.extend(["--max-docs".into(), n.to_string()]);
        }
        if let Some(n) = e.max_tokens {
            args.extend(["--max-tokens".into(), n.to_string()]);
        }
        self.add(format!("eval/{label}/{}", d.name), JobKind::Eval, deps, args, vec![], vec![out], None, None);
    }
}

fn dense_active_params(cfg: &btm_model::ModelConfig) -> usize {
    cfg.num_active_parameters()
}

/// The seed's config: from the pipeline's shape, or read from the given checkpoint.
fn seed_config(p: &Pipeline, base: &Path) -> Result<btm_model::ModelConfig> {
    if let Some(t) = &p.seed.train {
        let m = &t.model;
        let heads = m.heads;
        if heads == 0 || m.hidden_size % heads != 0 {
            bail!("seed.train.model: hidden_size {} must be a multiple of heads {heads}", m.hidden_size);
        }
        let cfg = btm_model::ModelConfig {
            max_position_embeddings: m.max_positions,
            rope_theta: m.rope_theta,
            tie_word_embeddings: m.tie_embeddings,
            ..btm_model::ModelConfig::llama(t.tokenizer.vocab_size, m.hidden_size, m.layers, heads, m.kv_heads.unwrap_or(heads), m.ffn)
        };
        cfg.validate().context("seed.train.model")?;
        return Ok(cfg);
    }
    let location = p.seed.checkpoint.as_deref().expect("validated: seed has a checkpoint");
    let dir = btm_model::storage::local_dir(&abs(base, location))?;
    Ok(btm_model::Checkpoint::open(&dir).with_context(|| format!("seed.checkpoint `{location}`"))?.config)
}

/// Build the job DAG for a loaded pipeline.
pub fn plan(p: &Pipeline, base: &Path, run_dir: &Path) -> Result<Plan> {
    let threads = p.engine.threads_per_job();
    // An object-store run keeps its URL (joined like a path: `s3://b/runs/x/seed`).
    let run = if btm_model::folder::is_remote(&run_dir.to_string_lossy()) { run_dir.to_path_buf() } else { std::path::absolute(run_dir)? };
    let mut b = Builder { p, base, run: run.clone(), jobs: vec![], threads };
    let seed_cfg = seed_config(p, base)?;
    let dense_n = dense_active_params(&seed_cfg);
    let train_files: Vec<String> = p.domains.iter().map(|d| abs(base, &d.train)).collect();
    let valid_files: Vec<String> = p.domains.iter().filter_map(|d| d.valid.as_ref()).map(|v| abs(base, v)).collect();
    let mix = |files: &[String]| files.iter().map(|f| (f.clone(), 1.0)).collect::<Vec<_>>();

    // 1. The seed: trained here (tokenizer first), or an existing checkpoint.
    let seed_job = if let Some(t) = &p.seed.train {
        let tok_out = run.join("tokenizer").join("tokenizer.json");
        let mut args = vec!["tokenizer".into(), "train".into(), "--data".into()];
        args.extend(train_files.iter().cloned());
        args.extend(["--vocab-size".into(), t.tokenizer.vocab_size.to_string()]);
        if let Some(n) = t.tokenizer.max_docs_per_domain {
            args.extend(["--max-docs".into(), n.to_string()]);
        }
        args.extend(["--out".into(), tok_out.to_string_lossy().into_owned()]);
        let tok = b.add("tokenizer".into(), JobKind::Tokenizer, vec![], args, vec![], vec![tok_out.clone()], None, None);
        let config_file = run.join("jobs").join("seed").join("config.json");
        let config_json = serde_json::to_string_pretty(&seed_cfg.to_hf()?)?;
        let name = b.train_job(
            "seed",
            JobKind::TrainSeed,
            vec![tok],
            job::Init { checkpoint: None, config: Some(config_file.clone()), tokenizer: Some(tok_out) },
            run.join("seed"),
            mix(&train_files),
            valid_files.clone(),
            &t.train,
            None,
            "seed",
            None,
            dense_n,
        )?;
        // The config is one more file handed to the seed job.
        let seed = b.jobs.last_mut().expect("seed job");
        seed.files.push((config_file, config_json));
        Some(name)
    } else {
        None
    };
    let seed_ref = match &seed_job {
        Some(name) => b.model(name),
        None => {
            let location = abs(base, p.seed.checkpoint.as_deref().expect("validated"));
            ModelRef { label: "seed".into(), dir: btm_model::storage::local_dir(&location)?, tokens_after_seed: 0, flops_after_seed: 0.0 }
        }
    };
    let seed_deps: Vec<String> = seed_job.iter().cloned().collect();
    let seed_init = init_from(&seed_ref);
    let mut scored: Vec<String> = seed_job.iter().cloned().collect();

    // The MoE shapes whose active parameters count towards FLOPs.
    let moe_active = |experts: usize, top_k: usize, granularity: usize, shared: bool| -> usize {
        let mut cfg = seed_cfg.clone();
        cfg.moe = Some(btm_model::MoeConfig {
            experts,
            top_k,
            routing: btm_model::Routing::TopkThenSoftmax,
            expert_ffn: seed_cfg.intermediate_size / granularity.max(1),
            shared_expert: shared.then_some(btm_model::SharedExpertConfig { ffn: seed_cfg.intermediate_size, gated: false }),
            dense_layers: vec![],
        });
        cfg.num_active_parameters()
    };
    // Tokens after the seed of the branch-train-merge arm (experts plus the merged MoE's
    // continued training): the budget the dense baseline and the upcycled arm are matched to.
    let expert_tokens: u64 = p.domains.iter().map(|d| p.train.overlay(&d.overrides).tokens_or_default()).sum();
    let continued_tokens = match (&p.merge, &p.continue_training) {
        (Some(_), Some(c)) => p.train.mix_phase(c).tokens_or_default(),
        _ => 0,
    };
    let matched_tokens = expert_tokens + continued_tokens;
    let matched_steps = |t: &TrainParams| -> u64 {
        let t = defaults().overlay(t);
        let per_step = (t.tokens() / t.steps.unwrap_or(1).max(1)).max(1);
        matched_tokens.div_ceil(per_step)
    };

    // Steps 2, 3, 5 and 6 run once per arm seed; the first keeps the plain names.
    let arm_seeds: Vec<Option<u64>> = match p.arm_seeds.as_slice() {
        [] => vec![None],
        seeds => seeds.iter().copied().map(Some).collect(),
    };
    let mut first_merge = None;
    for (r, arm_seed) in arm_seeds.iter().enumerate() {
        let first = r == 0;
        let sfx = match arm_seed {
            Some(s) if !first => format!("-s{s}"),
            _ => String::new(),
        };
        let seeded = |t: TrainParams| with_arm_seed(*arm_seed, t);

        // 2. Branch and train: one expert per domain, no communication between them.
        let mut experts = vec![];
        for d in &p.domains {
            let name = b.train_job(
                &format!("expert{sfx}/{}", d.name),
                JobKind::TrainExpert,
                seed_deps.clone(),
                seed_init.clone(),
                run.join(format!("experts{sfx}")).join(&d.name),
                vec![(abs(base, &d.train), 1.0)],
                d.valid.iter().map(|v| abs(base, v)).collect(),
                &seeded(p.train.overlay(&d.overrides)),
                Some(d.name.clone()),
                &format!("expert-{}{sfx}", d.name),
                Some(&seed_ref),
                dense_n,
            )?;
            experts.push(name);
        }
        // Repeats are scored as finished arms only (evaluation is a large share of a small run).
        if first {
            scored.extend(experts.iter().cloned());
        }

        // 3. Merge into an MoE.
        if let Some(m) = &p.merge {
            let out = run.join(format!("merged{sfx}"));
            let mut args: Vec<String> = vec!["merge".into(), "--experts".into()];
            for e in &experts {
                args.push(b.model(e).dir.to_string_lossy().into_owned());
            }
            args.extend([
                "--out".into(),
                out.to_string_lossy().into_owned(),
                "--top-k".into(),
                m.top_k.to_string(),
                "--routing".into(),
                m.routing.as_str().into(),
                "--router-init".into(),
                m.router_init.as_str().into(),
                "--calib-tokens".into(),
                m.calib_tokens.to_string(),
            ]);
            if matches!(m.router_init, crate::pipeline::spec::RouterInit::Centroid | crate::pipeline::spec::RouterInit::Fit) {
                args.push("--calib".into());
                for d in &p.domains {
                    args.push(format!("{}={}", d.name, abs(base, d.valid.as_deref().expect("validated"))));
                }
            }
            let non_expert = match m.non_expert.strip_prefix("from:") {
                Some(domain) => {
                    let i = p.domains.iter().position(|d| d.name == domain).expect("validated");
                    format!("from:{}", b.model(&experts[i]).dir.display())
                }
                None if m.non_expert == "seed" => format!("from:{}", seed_ref.dir.display()),
                None => m.non_expert.clone(),
            };
            args.extend(["--non-expert".into(), non_expert]);
            if m.shared_expert_from_seed {
                args.extend(["--shared-expert".into(), seed_ref.dir.to_string_lossy().into_owned()]);
            }
            let tokens: u64 = experts.iter().map(|e| b.model(e).tokens_after_seed).sum();
            let flops: f64 = experts.iter().map(|e| b.model(e).flops_after_seed).sum();
            let name = b.add(
                format!("merge{sfx}"),
                JobKind::Merge,
                experts.clone(),
                args,
                vec![],
                vec![out.clone()],
                None,
                Some(ModelRef { label: format!("merged{sfx}"), dir: out, tokens_after_seed: tokens, flops_after_seed: flops }),
            );
            if first {
                scored.push(name.clone());
                first_merge = Some(name.clone());
            }

            // 5. Continue training the merged MoE on the mix.
            if let Some(c) = &p.continue_training {
                let parent = b.model(&name);
                let label = format!("continued{sfx}");
                let continued = b.train_job(
                    &format!("continue/merged{sfx}"),
                    JobKind::Continue,
                    vec![name.clone()],
                    init_from(&parent),
                    run.join(&label),
                    mix(&train_files),
                    valid_files.clone(),
                    &seeded(p.train.mix_phase(c)),
                    None,
                    &label,
                    Some(&parent),
                    moe_active(p.domains.len(), m.top_k, 1, m.shared_expert_from_seed),
                )?;
                scored.push(continued);
            }
        }

        // 6. The compute-matched dense baseline: the seed trained on the mix for as many
        //    tokens as the experts and the merged MoE's continued training together.
        if p.eval.baseline {
            let params = TrainParams { steps: Some(matched_steps(&p.train)), ..seeded(p.train.mix_phase(&TrainParams::default())) };
            let label = format!("baseline{sfx}");
            let name = b.train_job(
                &label,
                JobKind::Baseline,
                seed_deps.clone(),
                seed_init.clone(),
                run.join(&label),
                mix(&train_files),
                valid_files.clone(),
                &params,
                None,
                &label,
                Some(&seed_ref),
                dense_n,
            )?;
            scored.push(name);
        }
    }

    // 4. Upcycle the seed, and train the upcycled MoE on the mix for the matched budget.
    if let Some(u) = &p.upcycle {
        let out = run.join("upcycled");
        let args = vec![
            "upcycle".into(),
            "--model".into(),
            seed_ref.dir.to_string_lossy().into_owned(),
            "--experts".into(),
            u.experts.to_string(),
            "--top-k".into(),
            u.top_k.to_string(),
            "--granularity".into(),
            u.granularity.to_string(),
            "--routing".into(),
            u.routing.as_str().into(),
            "--scaling".into(),
            u.scaling.clone(),
            "--out".into(),
            out.to_string_lossy().into_owned(),
        ];
        let name = b.add(
            "upcycle".into(),
            JobKind::Upcycle,
            seed_deps.clone(),
            args,
            vec![],
            vec![out.clone()],
            None,
            Some(ModelRef { label: "upcycled".into(), dir: out, tokens_after_seed: 0, flops_after_seed: 0.0 }),
        );
        scored.push(name.clone());
        if p.continue_training.is_some() || u.train.is_some() {
            let mut params = p.train.mix_phase(p.continue_training.as_ref().unwrap_or(&TrainParams::default()));
            params = params.overlay(u.train.as_ref().unwrap_or(&TrainParams::default()));
            if u.train.as_ref().and_then(|t| t.steps).is_none() {
                params.steps = Some(matched_steps(&params));
            }
            let parent = b.model(&name);
            let label = "upcycled-continued";
            let continued = b.train_job(
                "continue/upcycled",
                JobKind::Continue,
                vec![name.clone()],
                init_from(&parent),
                run.join(label),
                mix(&train_files),
                valid_files.clone(),
                &with_arm_seed(arm_seeds[0], params),
                None,
                label,
                Some(&parent),
                moe_active(u.experts, u.top_k, u.granularity, false),
            )?;
            scored.push(continued);
        }
    }

    // 7. Add experts for new domains to an existing MoE, one after another.
    if let Some(add) = &p.add_experts {
        let mut moe: (Vec<String>, PathBuf) = match &add.moe {
            Some(loc) => (vec![], btm_model::storage::local_dir(&abs(base, loc))?),
            None => match &first_merge {
                Some(n) => (vec![n.clone()], b.model(n).dir),
                None => bail!("add_experts.moe: give an MoE checkpoint, or add `merge` so the run makes one"),
            },
        };
        let base_ref = match &add.base {
            Some(loc) => {
                let dir = btm_model::storage::local_dir(&abs(base, loc))?;
                ModelRef { label: "base".into(), dir, tokens_after_seed: 0, flops_after_seed: 0.0 }
            }
            None => seed_ref.clone(),
        };
        for d in &add.domains {
            let params = p.train.overlay(&d.overrides);
            let name = b.train_job(
                &format!("added/{}", d.name),
                JobKind::TrainExpert,
                if add.base.is_some() { vec![] } else { seed_deps.clone() },
                job::Init { checkpoint: Some(base_ref.dir.to_string_lossy().into_owned()), config: None, tokenizer: None },
                run.join("added").join(&d.name),
                vec![(abs(base, &d.train), 1.0)],
                d.valid.iter().map(|v| abs(base, v)).collect(),
                &params,
                Some(d.name.clone()),
                &format!("expert-{}", d.name),
                Some(&base_ref),
                dense_n,
            )?;
            let out = run.join("extended").join(&d.name);
            let mut args = vec![
                "add-expert".into(),
                "--moe".into(),
                moe.1.to_string_lossy().into_owned(),
                "--expert".into(),
                b.model(&name).dir.to_string_lossy().into_owned(),
                "--out".into(),
                out.to_string_lossy().into_owned(),
                "--name".into(),
                d.name.clone(),
            ];
            if let Some(v) = &d.valid {
                args.extend(["--calib".into(), abs(base, v)]);
            }
            let mut deps = moe.0.clone();
            deps.push(name);
            let added = b.add(
                format!("add-expert/{}", d.name),
                JobKind::AddExpert,
                deps,
                args,
                vec![],
                vec![out.clone()],
                None,
                Some(ModelRef { label: format!("extended-{}", d.name), dir: out.clone(), tokens_after_seed: 0, flops_after_seed: 0.0 }),
            );
            moe = (vec![added.clone()], out);
            scored.push(added);
        }
    }

    // 8. Score every model on every domain.
    if seed_job.is_none() {
        b.eval_jobs(&seed_ref, None);
    }
    for name in scored {
        let m = b.model(&name);
        b.eval_jobs(&m, Some(&name));
    }
    if p.eval.ensemble {
        b.ensemble_eval_jobs();
    }
    Ok(Plan { run_dir: run, jobs: b.jobs })
}

/// A trainer's start: the checkpoint of model `m`.
fn init_from(m: &ModelRef) -> job::Init {
    job::Init { checkpoint: Some(m.dir.to_string_lossy().into_owned()), config: None, tokenizer: None }
}

/// `t` trained with `arm_seed`, when the pipeline lists arm seeds.
fn with_arm_seed(arm_seed: Option<u64>, t: TrainParams) -> TrainParams {
    TrainParams { seed: arm_seed.or(t.seed), ..t }
}

impl TrainParams {
    fn tokens_or_default(&self) -> u64 {
        defaults().overlay(self).tokens()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(extra: &str) -> Pipeline {
        let yaml = format!(
            "name: t\nseed:\n  train:\n    model: {{hidden_size: 32, layers: 1, heads: 2, ffn: 64}}\n    tokenizer: {{vocab_size: 300}}\n\
             domains:\n  - {{name: a, train: a.jsonl, valid: a.jsonl, test: a.jsonl}}\n  - {{name: b, train: b.jsonl, valid: b.jsonl, test: b.jsonl}}\n\
             train: {{steps: 10, batch_size: 4, seq_len: 32}}\n\
             merge: {{top_k: 1}}\ncontinue: {{steps: 6, batch_size: 2}}\n\
             eval: {{baseline: true}}\n{extra}"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn job<'a>(plan: &'a Plan, name: &str) -> &'a Job {
        plan.jobs.iter().find(|j| j.name == name).unwrap_or_else(|| panic!("no job {name}"))
    }

    fn spec(j: &Job) -> job::JobSpec {
        serde_yaml::from_str(&j.files[0].1).unwrap()
    }

    #[test]
    fn arms_are_compute_matched_and_repeated_per_arm_seed() {
        let dir = tempfile::tempdir().unwrap();
        let p = pipeline("upcycle: {experts: 2, top_k: 1, train: {lr: 0.005}}\narm_seeds: [3, 7]\n");
        let plan = plan(&p, dir.path(), dir.path()).unwrap();
        // Experts: 2 × 10 steps × 128 tokens, plus the MoE's 6 steps × 64 tokens = 2944 tokens.
        for name in ["baseline", "baseline-s7"] {
            let j = job(&plan, name);
            assert_eq!(spec(j).steps, Some(23), "{name}: 2944 / 128 tokens per step, rounded up");
            assert_eq!(j.produces.as_ref().unwrap().tokens_after_seed, 23 * 128);
        }
        let up = spec(job(&plan, "continue/upcycled"));
        assert_eq!((up.steps, up.optimizer.lr, up.seed), (Some(46), 0.005, 3), "continue batch 2 × 32 → 46 steps");
        assert_eq!(job(&plan, "continue/merged").produces.as_ref().unwrap().tokens_after_seed, 2944);
        // Each arm seed trains its own experts, merge and continued MoE, with that seed.
        assert_eq!(spec(job(&plan, "expert/a")).seed, 3);
        assert_eq!(spec(job(&plan, "expert-s7/b")).seed, 7);
        assert_eq!(spec(job(&plan, "continue/merged-s7")).seed, 7);
        assert_eq!(job(&plan, "merge-s7").deps, vec!["expert-s7/a", "expert-s7/b"]);
        assert!(job(&plan, "continue/merged-s7").args.iter().any(|a| a.contains("jobs/continue-merged-s7")));
        // Repeats are scored as finished arms only.
        assert!(plan.jobs.iter().any(|j| j.name == "eval/continued-s7/a"));
        assert!(plan.jobs.iter().any(|j| j.name == "eval/baseline-s7/b"));
        assert!(!plan.jobs.iter().any(|j| j.name.starts_with("eval/merged-s7") || j.name.starts_with("eval/expert-a-s7")));
    }

    /// A phase's `trainer` and `resources` reach its jobs (the domains' overrides too) and
    /// not the mix phases; a btm-trained phase's job file is what it was without them.
    #[test]
    fn phase_trainers_and_resources_reach_their_jobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = plan(&pipeline(""), dir.path(), dir.path()).unwrap();
        let mut p = pipeline("");
        p.train.resources = Some(crate::pipeline::spec::PhaseResources {
            cpus_per_task: Some(8),
            gpus_per_task: Some(1),
            memory_mb: Some(4096),
            time_limit_min: Some(90),
        });
        p.train.trainer = Some(btm_trainer::external::Trainer::Command { command: "exec t {model_in} {model_out}".into() });
        p.domains[1].overrides.resources = Some(crate::pipeline::spec::PhaseResources { cpus_per_task: Some(2), ..Default::default() });
        let plan = plan(&p, dir.path(), dir.path()).unwrap();
        let a = job(&plan, "expert/a");
        assert_eq!((a.resources.cpus, a.resources.gpus, a.resources.memory_mb, a.resources.time_limit_min), (8, 1, Some(4096), Some(90)));
        assert_eq!((spec(a).threads, spec(a).trainer.template().as_deref()), (Some(8), Some("exec t {model_in} {model_out}")));
        assert_eq!(a.train.as_ref().unwrap().external.as_deref(), Some("exec t {model_in} {model_out}"));
        let b = job(&plan, "expert/b");
        assert_eq!((b.resources.cpus, b.resources.memory_mb), (2, None), "an override replaces the whole block");
        for name in ["continue/merged", "baseline", "merge"] {
            assert_eq!(job(&plan, name).resources, job(&base, name).resources, "{name}");
            assert_eq!(job(&plan, name).files, job(&base, name).files, "{name}");
        }
        assert!(spec(job(&plan, "continue/merged")).trainer.is_btm());
    }

    #[test]
    fn a_local_engine_without_threads_leaves_them_to_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan(&pipeline(""), dir.path(), dir.path()).unwrap();
        let seed = job(&plan, "seed");
        assert_eq!((seed.resources.cpus, spec(seed).threads), (0, None));
        let fixed = plan_with_threads(dir.path());
        assert_eq!((fixed.resources.cpus, spec(&fixed).threads), (3, Some(3)));
    }

    #[test]
    fn trainable_in_train_freezes_the_expert_phase_only_and_the_merge_can_keep_the_seeds_weights() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pipeline("upcycle: {experts: 2, top_k: 1}\n");
        p.train.trainable = Some(serde_yaml::from_str("{include: ['*.mlp.*']}").unwrap());
        p.domains[1].overrides.trainable = Some(serde_yaml::from_str("{exclude: ['lm_head.*']}").unwrap());
        p.merge.as_mut().unwrap().non_expert = "seed".into();
        let plan = plan(&p, dir.path(), dir.path()).unwrap();
        let merge = &job(&plan, "merge").args;
        let seed_model = format!("from:{}", job(&plan, "seed").produces.as_ref().unwrap().dir.display());
        assert_eq!(merge[merge.iter().position(|a| a == "--non-expert").unwrap() + 1], seed_model);
        assert_eq!(spec(job(&plan, "expert/a")).trainable.include, vec!["*.mlp.*"]);
        assert_eq!(spec(job(&plan, "expert/b")).trainable.exclude, vec!["lm_head.*"], "a domain's own selection wins");
        for name in ["continue/merged", "baseline", "continue/upcycled"] {
            let t = spec(job(&plan, name)).trainable;
            assert!(t.include.is_empty() && t.exclude.is_empty(), "{name} trains every parameter");
        }
    }

    fn plan_with_threads(dir: &Path) -> Job {
        let mut p = pipeline("");
        p.engine = serde_yaml::from_str("{kind: local, threads_per_job: 3}").unwrap();
        job(&plan(&p, dir, dir).unwrap(), "seed").clone()
    }
}
