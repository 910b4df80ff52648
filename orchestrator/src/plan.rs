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
use crate::pipeline::spec::{NonExpertSource, Pipeline, TrainArgs, TrainParams, CROSS_DOMAIN_SAMPLE, WIDE_RUN_DOMAINS};
use anyhow::{bail, Context, Result};
use btm_merger::merge::NonExpert;
use btm_model::ModelConfig;
use btm_trainer::jobs::{AverageSpec, EvalBatch, EvalSpec, TokenizerSpec};
use btm_trainer::spec as job;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// `btm cluster`: the domains of a pipeline that discovers them.
    Cluster,
    Tokenizer,
    TrainSeed,
    TrainExpert,
    Merge,
    Upcycle,
    Continue,
    Baseline,
    AddExpert,
    /// An added expert trained inside the frozen MoE.
    TrainInPlace,
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

impl Resources {
    /// GPUs the whole job holds while it runs: each of its tasks' (ranks on one node).
    pub fn gpus_held(&self) -> usize {
        self.gpus * self.ranks.max(1)
    }
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
    /// Parameters active per token: the model's inference cost (0: unknown).
    #[serde(default)]
    pub active_params: usize,
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
    /// Where it computes, and in what precision.
    #[serde(default)]
    pub device: job::Device,
    #[serde(default)]
    pub dtype: job::DType,
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

/// The stage a job name belongs to: its first part (`expert` of `expert/code`).
pub fn stage_of(name: &str) -> &str {
    name.split('/').next().unwrap_or("job")
}

impl Job {
    /// The stage a job belongs to: the first part of its name (`expert` of `expert/code`).
    pub fn stage(&self) -> &str {
        stage_of(&self.name)
    }

    /// Folder of the job's own files in the run (`jobs/expert-scripture`).
    pub fn dir(&self, run: &Path) -> PathBuf {
        run.join("jobs").join(self.name.replace('/', "-"))
    }

    pub fn log(&self, run: &Path) -> PathBuf {
        run.join("logs").join(format!("{}.log", self.name.replace('/', "-")))
    }

    /// A job of nothing but a name (also its id), a kind and dependencies: what the executor's
    /// and the status's tests schedule.
    #[cfg(test)]
    pub fn named(name: &str, kind: JobKind, deps: Vec<String>) -> Job {
        Job {
            id: name.into(),
            name: name.into(),
            kind,
            deps,
            args: vec![],
            files: vec![],
            outputs: vec![],
            resumable: false,
            resources: Resources::default(),
            train: None,
            produces: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub run_dir: PathBuf,
    pub jobs: Vec<Job>,
    /// How this btm writes jobs ([`PLAN_FORMAT`]); 0 in plans written before it was recorded.
    #[serde(default)]
    pub format: u32,
}

/// The way jobs are written, raised when every job's id changes with it: 1 passed argv,
/// 2 writes each job's typed spec file.
pub const PLAN_FORMAT: u32 = 2;

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

fn abs(base: &Path, location: &str) -> String {
    let r = resolve(base, location);
    if r.contains("://") {
        return r;
    }
    std::path::absolute(&r).map(|p| p.to_string_lossy().into_owned()).unwrap_or(r)
}

impl<'a> Builder<'a> {
    /// Add `job` to the plan; its dependencies are handles of jobs added before it, so each
    /// has an id to hash.
    fn add(&mut self, job: NewJob) -> JobRef {
        let NewJob { name, kind, deps, args, files, outputs, train, produces } = job;
        let dep_ids: Vec<String> = deps.iter().map(|d| self.jobs[d.0].id.clone()).collect();
        let id = job_id(kind, &name, &args, &files, &dep_ids);
        self.jobs.push(Job {
            id,
            name,
            kind,
            deps: deps.iter().map(|d| self.jobs[d.0].name.clone()).collect(),
            args,
            files,
            outputs,
            resumable: train.is_some(),
            resources: Resources { cpus: self.threads.unwrap_or(0), gpus: self.p.engine.gpus_per_job(), ..Default::default() },
            train,
            produces,
        });
        JobRef(self.jobs.len() - 1)
    }

    /// Job `name` that runs `btm <command> --spec FILE`, its `spec` written to
    /// `jobs/<name>/spec.json` (so the spec is part of the job's id).
    fn spec_job(&mut self, command: &[&str], spec: &impl Serialize, job: NewJob) -> JobRef {
        let file = self.run.join("jobs").join(job.name.replace('/', "-")).join("spec.json");
        // Plain data (strings, numbers, enums) always serializes.
        let json = serde_json::to_string_pretty(spec).expect("a job spec serializes");
        let mut args: Vec<String> = command.iter().map(|c| c.to_string()).collect();
        args.extend(["--spec".to_string(), file.to_string_lossy().into_owned()]);
        self.add(NewJob { args, files: vec![(file, json)], ..job })
    }

    /// The model job `j` produces.
    fn model(&self, j: JobRef) -> ModelRef {
        self.jobs[j.0].produces.clone().expect("job produces a model")
    }

    /// A trainer job: `btm train --job <run>/jobs/<name>/job.yaml`.
    fn train_job(&mut self, j: TrainJob) -> Result<JobRef> {
        let TrainJob { name, kind, deps, init, out, train, valid, params, domain, label, parent, active_params, router_guard } = j;
        let placement = params.placement(&self.p.engine);
        let t = params.resolve();
        let (steps, tokens) = (t.steps, t.tokens());
        let mut spec = self.job_spec(&t, init, &out, train, valid, domain);
        spec.moe.router_guard = router_guard;
        spec.device = placement.device;
        spec.dtype = placement.dtype;
        // Ranks on GPUs sum their gradients where they live, over NCCL.
        if placement.device == job::Device::Cuda && spec.ranks() > 1 {
            spec.collective = btm_collective::Backend::Nccl;
        }
        let job_dir = self.run.join("jobs").join(name.replace('/', "-"));
        let yaml = serde_yaml::to_string(&spec)?;
        let flops = 6.0 * active_params as f64 * tokens as f64;
        let produces = ModelRef {
            label,
            dir: out.join("model"),
            tokens_after_seed: parent.map_or(0, |p| p.tokens_after_seed) + if kind == JobKind::TrainSeed { 0 } else { tokens },
            flops_after_seed: parent.map_or(0.0, |p| p.flops_after_seed) + if kind == JobKind::TrainSeed { 0.0 } else { flops },
            active_params,
        };
        let job_file = job_dir.join("job.yaml");
        let resources = t.resources.clone();
        let handle = self.add(NewJob {
            name,
            kind,
            deps,
            args: vec!["train".into(), "--job".into(), job_file.to_string_lossy().into_owned()],
            files: vec![(job_file, yaml)],
            outputs: vec![out.clone()],
            train: Some(TrainInfo {
                steps,
                tokens,
                metrics: out.join("metrics.jsonl"),
                external: spec.trainer.template(),
                device: spec.device,
                dtype: spec.dtype,
            }),
            produces: Some(produces),
        });
        let job = &mut self.jobs[handle.0];
        job.resources.cpus = resources.cpus_per_task.unwrap_or(job.resources.cpus);
        job.resources.gpus = placement.gpus_per_task;
        job.resources.memory_mb = resources.memory_mb;
        job.resources.time_limit_min = resources.time_limit_min;
        job.resources.ranks = spec.ranks();
        job.resources.nodes = spec.trainer.nodes();
        Ok(handle)
    }

    /// The `btm train` job file of a training job: the phase's settings `t` as the trainer's
    /// [`job::JobSpec`].
    fn job_spec(
        &self,
        t: &TrainArgs,
        init: job::Init,
        out: &Path,
        train: Vec<job::Source>,
        valid: Vec<String>,
        domain: Option<String>,
    ) -> job::JobSpec {
        job::JobSpec {
            init,
            out: out.to_string_lossy().into_owned(),
            data: job::Data { train, valid: valid.into_iter().map(PathBuf::from).collect() },
            steps: Some(t.steps),
            tokens: None,
            batch_size: t.batch_size,
            seq_len: t.seq_len,
            grad_accum: t.grad_accum,
            optimizer: job::Optimizer { lr: t.lr, betas: t.betas, weight_decay: t.weight_decay, ..job::Optimizer::default() },
            schedule: job::Schedule { warmup_steps: t.warmup_steps, decay: t.decay, min_lr: t.min_lr },
            grad_clip: t.grad_clip,
            seed: t.seed,
            threads: t.resources.cpus_per_task.or(self.threads),
            eval: job::Eval { interval: t.eval_interval, sequences: t.eval_sequences },
            checkpoint: job::Checkpointing { interval: t.checkpoint_interval, keep: t.keep_checkpoints },
            log_interval: t.log_interval,
            moe: job::Moe {
                aux_loss_coef: t.aux_loss_coef,
                z_loss_coef: t.z_loss_coef,
                capacity_factor: t.capacity_factor,
                drop_policy: t.drop_policy,
                router_guard: None,
            },
            domain,
            dtype: Default::default(),
            device: Default::default(),
            trainable: t.trainable.clone(),
            resume: "auto".into(),
            token_cache: None,
            work_dir: None,
            data_parallel: t.data_parallel,
            expert_parallel: t.expert_parallel,
            // Kubernetes starts each rank in a pod of its own, with no MPI launcher: the ranks
            // meet over sockets. Local and Slurm runs start them with mpirun / srun.
            collective: match self.p.engine {
                crate::pipeline::spec::EngineSpec::Kubernetes(_) => btm_collective::Backend::Tcp,
                _ => Default::default(),
            },
            trainer: match t.trainer.clone() {
                // The script is named relative to the pipeline's folder; the job runs elsewhere.
                job::Trainer::Torchrun { script, args, nproc_per_node, nnodes } => {
                    job::Trainer::Torchrun { script: abs(self.base, &script), args, nproc_per_node, nnodes }
                }
                other => other,
            },
        }
    }

    /// The experts BTM's ensemble and average are made of, for the arm with suffix `sfx`: the
    /// ensemble arm's when the pipeline has one, else the branch-train-merge arm's.
    fn ensemble_members(&self, sfx: &str) -> Vec<(JobRef, PathBuf)> {
        let prefix = if self.p.ensemble_arm.is_some() { format!("ensemble-expert{sfx}/") } else { format!("expert{sfx}/") };
        self.trained_experts(&prefix)
    }

    /// The expert-training jobs named `<prefix>…`, with their model folders.
    fn trained_experts(&self, prefix: &str) -> Vec<(JobRef, PathBuf)> {
        self.jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| j.kind == JobKind::TrainExpert && j.name.starts_with(prefix))
            .filter_map(|(i, j)| j.produces.as_ref().map(|m| (JobRef(i), m.dir.clone())))
            .collect()
    }

    /// Scores of BTM's ensemble: the first arm seed's experts, all of them and top-1, on each
    /// domain, each domain's prior estimated on its `valid` file; the ensemble arm's repeats
    /// (`ensemble-s<seed>`); with `add_experts`, also `ensemble-extended`, the experts plus the
    /// added ones, on the added domains too.
    fn ensemble_eval_jobs(&mut self) {
        let experts = self.ensemble_members("");
        if experts.is_empty() {
            return;
        }
        let extended: Vec<(JobRef, PathBuf)> = experts.iter().cloned().chain(self.trained_experts("added/")).collect();
        let p = self.p;
        let all_domains: Vec<&crate::pipeline::spec::Domain> =
            p.domains.iter().chain(p.add_experts.iter().flat_map(|a| a.domains.iter())).collect();
        let mut sets = vec![
            ("ensemble".to_string(), None, experts.clone(), p.domains.iter().collect::<Vec<_>>()),
            ("ensemble-top1".to_string(), Some(1), experts.clone(), p.domains.iter().collect()),
        ];
        if p.ensemble_arm.is_some() {
            for s in p.arm_seeds.iter().skip(1) {
                let label = format!("ensemble-s{s}");
                sets.push((label, None, self.ensemble_members(&format!("-s{s}")), p.domains.iter().collect()));
            }
        }
        if extended.len() > experts.len() {
            sets.push(("ensemble-extended".to_string(), None, extended, all_domains));
        }
        for (label, top_k, members, domains) in sets {
            let scoring = Scoring {
                ensemble: members.iter().map(|(_, dir)| dir.to_string_lossy().into_owned()).collect(),
                top_k,
                ..Scoring::default()
            };
            let deps = members.iter().map(|(job, _)| *job).collect();
            self.eval_job(&label, &domains, scoring, deps);
        }
    }

    /// Job `eval/<label>`: model `m` (made by job `dep`, if the run makes it) on the domains it
    /// is scored on ([`Self::domains_scored_by`]).
    fn eval_jobs(&mut self, m: &ModelRef, dep: Option<JobRef>) {
        let domains = self.domains_scored_by(dep);
        let scoring = Scoring { model: Some(m.dir.to_string_lossy().into_owned()), routing: true, ..Scoring::default() };
        // A given seed waits for the domains' data only.
        self.eval_job(&m.label, &domains, scoring, dep.or(self.data_job).into_iter().collect());
    }

    /// Every domain, the added ones too (the models before the addition set the new domain's
    /// baseline); in a wide run, an expert's own domain and the few after it, unless the pipeline
    /// asks for the full table.
    fn domains_scored_by(&self, job: Option<JobRef>) -> Vec<&'a crate::pipeline::spec::Domain> {
        let p = self.p;
        let all: Vec<&crate::pipeline::spec::Domain> =
            p.domains.iter().chain(p.add_experts.iter().flat_map(|a| a.domains.iter())).collect();
        let expert_domain =
            job.filter(|j| self.jobs[j.0].kind == JobKind::TrainExpert).and_then(|j| self.jobs[j.0].name.rsplit('/').next());
        let (Some(own), false) = (expert_domain, all.len() <= WIDE_RUN_DOMAINS || p.eval.full_table) else { return all };
        let Some(at) = all.iter().position(|d| d.name == own) else { return all };
        (0..=CROSS_DOMAIN_SAMPLE.min(all.len() - 1)).map(|k| all[(at + k) % all.len()]).collect()
    }

    /// Job `eval/<label>`: `btm eval` of what `scoring` names on each of `domains`' evaluation
    /// split (a domain without one is skipped), capped as `eval` says, each domain's JSON written
    /// to `eval/<label>/<domain>.json`. An ensemble's prior is estimated on each domain's `valid`
    /// file.
    fn eval_job(&mut self, label: &str, domains: &[&crate::pipeline::spec::Domain], scoring: Scoring, deps: Vec<JobRef>) {
        let e = &self.p.eval;
        let ensemble = !scoring.ensemble.is_empty();
        let mut batch = vec![];
        for d in domains {
            let data = match e.split {
                crate::pipeline::spec::Split::Test => d.test.as_ref(),
                crate::pipeline::spec::Split::Valid => d.valid.as_ref(),
            };
            let Some(data) = data else { continue };
            batch.push(btm_trainer::jobs::EvalDomain {
                data: PathBuf::from(abs(self.base, data)),
                out: self.run.join("eval").join(label).join(format!("{}.json", d.name)),
                prior_from: d.valid.as_ref().filter(|_| ensemble).map(|v| PathBuf::from(abs(self.base, v))),
            });
        }
        if batch.is_empty() {
            return;
        }
        let Scoring { model, ensemble, top_k, routing } = scoring;
        // Discovered domains' experts are weighed by the clusterer (c-BTM), not the posterior.
        let clusters = (!ensemble.is_empty() && self.p.discover.is_some()).then(|| self.run.join(CLUSTERS));
        if clusters.is_some() {
            batch.iter_mut().for_each(|d| d.prior_from = None);
        }
        let base = EvalSpec {
            model,
            ensemble,
            prior_from: None,
            top_k,
            clusters,
            temperature: None,
            data: PathBuf::new(),
            seq_len: e.seq_len,
            max_docs: e.max_docs,
            max_tokens: e.max_tokens,
            json: true,
            dtype: Default::default(),
            device: Default::default(),
            routing,
            out: None,
        };
        let outputs = batch.iter().map(|d| d.out.clone()).collect();
        let name = format!("eval/{label}");
        self.spec_job(&["eval"], &EvalBatch { base, domains: batch }, NewJob::new(name, JobKind::Eval, deps, outputs));
    }
}

/// What an eval job scores: a model, or an ensemble of experts (with its top-k).
#[derive(Default)]
struct Scoring {
    model: Option<String>,
    ensemble: Vec<String>,
    top_k: Option<usize>,
    /// Also report an MoE's routing shares.
    routing: bool,
}

fn dense_active_params(cfg: &btm_model::ModelConfig) -> usize {
    cfg.num_active_parameters()
}

/// The seed's config: from the pipeline's shape, or read from the given checkpoint.
fn seed_config(p: &Pipeline, base: &Path) -> Result<btm_model::ModelConfig> {
    if let Some(t) = p.seed.scratch() {
        let m = t.model;
        let heads = m.heads;
        if heads == 0 || m.hidden_size % heads != 0 {
            bail!("seed.model: hidden_size {} must be a multiple of heads {heads}", m.hidden_size);
        }
        let cfg = btm_model::ModelConfig {
            max_position_embeddings: m.max_positions,
            rope_theta: m.rope_theta,
            tie_word_embeddings: m.tie_embeddings,
            ..btm_model::ModelConfig::llama(t.tokenizer.vocab_size, m.hidden_size, m.layers, heads, m.kv_heads.unwrap_or(heads), m.ffn)
        };
        cfg.validate().context("seed.model")?;
        return Ok(cfg);
    }
    let location = p.seed.checkpoint.as_deref().expect("validated: seed has a checkpoint");
    let dir = btm_model::storage::local_dir(&abs(base, location))?;
    Ok(btm_model::Checkpoint::open(&dir).with_context(|| format!("seed.checkpoint `{location}`"))?.config)
}

/// Build the job DAG for a loaded pipeline, phase by phase. Jobs are added in this order (the
/// executor starts ready jobs in plan order); each arm seed repeats experts, merge, continue and
/// baseline, the first keeping the plain names.
pub fn plan(p: &Pipeline, base: &Path, run_dir: &Path) -> Result<Plan> {
    // Discovered domains are the cluster job's splits, in the run.
    let discovered;
    let p = match &p.discover {
        Some(d) => {
            let clusters = run_root(run_dir)?.join(CLUSTERS);
            discovered = Pipeline { domains: crate::pipeline::load::discovered_domains(d.k, &clusters), ..p.clone() };
            &discovered
        }
        None => p,
    };
    let mut b = Builder::new(p, base, run_dir)?;
    b.discover_phase();
    let seed = b.seed_phase()?;
    let mut scored: Vec<JobRef> = seed.job.into_iter().collect();
    let arm_seeds: Vec<Option<u64>> = match p.arm_seeds.as_slice() {
        [] => vec![None],
        seeds => seeds.iter().copied().map(Some).collect(),
    };
    let mut first_merge = None;
    for (r, &arm_seed) in arm_seeds.iter().enumerate() {
        let arm = Arm::new(arm_seed, r == 0);
        let experts = b.expert_phase(&seed, &arm)?;
        // Repeats are scored as finished arms only (evaluation is a large share of a small run).
        if arm.first {
            scored.extend(experts.iter().copied());
        }
        if let Some(m) = &p.merge {
            let merged = b.merge_phase(&seed, &arm, m, m.router_init, &experts)?;
            if arm.first {
                scored.push(merged);
                first_merge = Some(merged);
            }
            if let Some(c) = &p.continue_training {
                scored.push(b.continue_merged_phase(&arm, m, c, merged)?);
            }
            // The same experts under other router inits: a controlled comparison of the init.
            for &init in m.also_router_init.iter().filter(|_| arm.first) {
                let variant = Arm { sfx: format!("{}-{}", arm.sfx, init.as_str()), ..arm.clone() };
                let merged = b.merge_phase(&seed, &variant, m, init, &experts)?;
                scored.push(merged);
                if let Some(c) = &p.continue_training {
                    scored.push(b.continue_merged_phase(&variant, m, c, merged)?);
                }
            }
        }
        if let Some(e) = &p.ensemble_arm {
            let members = b.ensemble_arm_phase(&seed, &arm, e)?;
            if arm.first {
                scored.extend(members);
            }
        }
        if p.eval.baseline {
            scored.push(b.baseline_phase(&seed, &arm)?);
        }
    }
    if let Some(u) = &p.upcycle {
        scored.extend(b.upcycle_phase(&seed, u, arm_seeds[0])?);
    }
    if let Some(add) = &p.add_experts {
        scored.extend(b.add_expert_phase(&seed, add, first_merge.zip(p.merge.as_ref()))?);
    }
    b.eval_phase(&seed, scored);
    Ok(Plan { run_dir: b.run, jobs: b.jobs, format: PLAN_FORMAT })
}

/// The run folder's location: an object-store run keeps its URL (joined like a path:
/// `s3://b/runs/x/seed`), a local one is made absolute.
fn run_root(run_dir: &Path) -> Result<PathBuf> {
    Ok(if btm_model::folder::is_remote(&run_dir.to_string_lossy()) { run_dir.to_path_buf() } else { std::path::absolute(run_dir)? })
}

/// Where a run that discovers its domains keeps the clusters (`btm cluster --out`).
const CLUSTERS: &str = "clusters";

/// The plan under construction and what every phase reads: the pipeline, its folder, the run
/// folder, the seed's shape and the domains' files.
struct Builder<'a> {
    p: &'a Pipeline,
    base: &'a Path,
    run: PathBuf,
    jobs: Vec<Job>,
    /// Threads per job; `None` lets the local engine decide when the job starts.
    threads: Option<usize>,
    /// The job that writes the domains' data (`discover`'s cluster job), if the run makes it.
    data_job: Option<JobRef>,
    seed_cfg: btm_model::ModelConfig,
    /// Active parameters of the dense seed (and its experts and baseline).
    dense_n: usize,
    /// Every domain's training file, and the validation files of those that have one.
    /// Every domain's training source at weight 1: the mix the mix phases train on.
    mix_sources: Vec<job::Source>,
    train_files: Vec<String>,
    valid_files: Vec<String>,
}

/// The seed model: the job that trains it (`None` for a given checkpoint) and the model.
struct Seed {
    job: Option<JobRef>,
    /// The job writing the domains' data, which a given seed's branches wait for.
    data: Option<JobRef>,
    model: ModelRef,
}

impl Seed {
    fn deps(&self) -> Vec<JobRef> {
        self.job.or(self.data).into_iter().collect()
    }
    fn init(&self) -> job::Init {
        init_from(&self.model)
    }
}

/// One repetition of the branch-train-merge arm and its baseline under a training seed.
#[derive(Clone)]
struct Arm {
    seed: Option<u64>,
    first: bool,
    /// Appended to job and folder names: empty for the first arm, `-s<seed>` for repeats.
    sfx: String,
}

impl Arm {
    fn new(seed: Option<u64>, first: bool) -> Self {
        let sfx = match seed {
            Some(s) if !first => format!("-s{s}"),
            _ => String::new(),
        };
        Self { seed, first, sfx }
    }
    fn seeded(&self, t: TrainParams) -> TrainParams {
        with_arm_seed(self.seed, t)
    }
}

/// A job to add: what it runs (`btm <args>`, with `files` written for it first), what it waits
/// for, and what it makes.
struct NewJob {
    name: String,
    kind: JobKind,
    deps: Vec<JobRef>,
    args: Vec<String>,
    files: Vec<(PathBuf, String)>,
    outputs: Vec<PathBuf>,
    train: Option<TrainInfo>,
    produces: Option<ModelRef>,
}

impl NewJob {
    /// A job that makes no model and is no trainer; `args` and `files` are filled in by
    /// [`Builder::spec_job`].
    fn new(name: String, kind: JobKind, deps: Vec<JobRef>, outputs: Vec<PathBuf>) -> Self {
        Self { name, kind, deps, args: vec![], files: vec![], outputs, train: None, produces: None }
    }
}

/// A job of the plan under construction (its index): what a phase gets back and what later
/// jobs depend on, so a dependency cannot name a job that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JobRef(usize);

/// A training job to add: where it starts, what it reads, how it trains and what it makes.
struct TrainJob<'m> {
    name: String,
    kind: JobKind,
    deps: Vec<JobRef>,
    init: job::Init,
    out: PathBuf,
    train: Vec<job::Source>,
    valid: Vec<String>,
    params: TrainParams,
    domain: Option<String>,
    /// The model's label in reports (`expert-code`, `continued`, …).
    label: String,
    /// The model it continues from, whose training cost it adds to.
    parent: Option<&'m ModelRef>,
    /// Active parameters, for the FLOPs (6 · N_active · tokens).
    active_params: usize,
    /// The trainer's router guard (an added expert trained in place).
    router_guard: Option<job::RouterGuard>,
}

impl<'a> Builder<'a> {
    fn new(p: &'a Pipeline, base: &'a Path, run_dir: &Path) -> Result<Self> {
        // An object-store run keeps its URL (joined like a path: `s3://b/runs/x/seed`).
        let run = run_root(run_dir)?;
        let seed_cfg = seed_config(p, base)?;
        Ok(Self {
            p,
            base,
            run,
            jobs: vec![],
            data_job: None,
            threads: p.engine.threads_per_job(),
            dense_n: dense_active_params(&seed_cfg),
            seed_cfg,
            mix_sources: p.domains.iter().map(|d| domain_source(base, d, 1.0)).collect(),
            train_files: p.domains.iter().map(|d| abs(base, &d.train)).collect(),
            valid_files: p.domains.iter().filter_map(|d| d.valid.as_ref()).map(|v| abs(base, v)).collect(),
        })
    }

    /// Every domain's training file at weight 1: the mix the mix phases train on.
    fn mix(&self) -> Vec<job::Source> {
        self.mix_sources.clone()
    }

    /// The shape of an MoE made from the seed, for counting its parameters (the routing does
    /// not change the count).
    fn moe_config(&self, experts: usize, top_k: usize, granularity: usize, shared: bool) -> ModelConfig {
        let mut cfg = self.seed_cfg.clone();
        cfg.moe = Some(btm_model::MoeConfig {
            experts,
            top_k,
            routing: btm_model::Routing::TopkThenSoftmax,
            expert_ffn: self.seed_cfg.intermediate_size / granularity.max(1),
            shared_expert: shared.then_some(btm_model::SharedExpertConfig { ffn: self.seed_cfg.intermediate_size, gated: false }),
            dense_layers: vec![],
        });
        cfg
    }

    /// Active parameters of an MoE made from the seed (they count towards FLOPs).
    fn moe_active(&self, experts: usize, top_k: usize, granularity: usize, shared: bool) -> usize {
        self.moe_config(experts, top_k, granularity, shared).num_active_parameters()
    }

    /// Steps of `t`'s batch shape that spend the branch-train-merge arm's tokens after the seed
    /// (experts plus the merged MoE's continued training): the budget of the dense baseline and
    /// of the upcycled arm.
    fn matched_steps(&self, t: &TrainParams) -> u64 {
        let p = self.p;
        let expert_tokens: u64 = p.domains.iter().map(|d| p.experts.overlay(&d.overrides).tokens_or_default()).sum();
        let continued_tokens = match (&p.merge, &p.continue_training) {
            (Some(_), Some(c)) => p.experts.mix_phase(c).tokens_or_default(),
            _ => 0,
        };
        let t = t.resolve();
        let per_step = (t.tokens() / t.steps.max(1)).max(1);
        (expert_tokens + continued_tokens).div_ceil(per_step)
    }

    /// `domains: {discover}`: `btm cluster` of the unlabelled text into the run's clusters
    /// folder, whose splits are the domains' data.
    fn discover_phase(&mut self) {
        let Some(d) = &self.p.discover else { return };
        let data = d.data.iter().map(|f| abs(self.base, f)).collect();
        let out = self.run.join(CLUSTERS);
        let mut spec = btm_cluster::ClusterSpec::new(data, d.k, out.clone());
        spec.text_key = d.text_key.clone().unwrap_or(spec.text_key);
        spec.sample = d.sample.unwrap_or(spec.sample);
        spec.seed = d.seed.unwrap_or(spec.seed);
        spec.plain = d.plain;
        self.data_job = Some(self.spec_job(&["cluster"], &spec, NewJob::new("cluster".into(), JobKind::Cluster, vec![], vec![out])));
    }

    /// The seed: a tokenizer and a seed trained here, or an existing checkpoint.
    fn seed_phase(&mut self) -> Result<Seed> {
        let p = self.p;
        let Some(t) = p.seed.scratch() else {
            let location = abs(self.base, p.seed.checkpoint.as_deref().expect("validated"));
            let dir = btm_model::storage::local_dir(&location)?;
            return Ok(Seed {
                job: None,
                data: self.data_job,
                model: ModelRef { label: "seed".into(), dir, tokens_after_seed: 0, flops_after_seed: 0.0, active_params: self.dense_n },
            });
        };
        let tok_out = self.run.join("tokenizer").join("tokenizer.json");
        let spec = TokenizerSpec {
            data: self.train_files.iter().map(PathBuf::from).collect(),
            // Validation checked every domain reads its text under one key.
            text_key: p.domains.first().and_then(|d| d.text_key.clone()).unwrap_or_else(|| btm_trainer::sources::DEFAULT_TEXT_KEY.into()),
            vocab_size: t.tokenizer.vocab_size,
            max_docs: t.tokenizer.max_docs_per_domain,
            out: tok_out.clone(),
        };
        let tok = self.spec_job(
            &["tokenizer", "train"],
            &spec,
            NewJob::new("tokenizer".into(), JobKind::Tokenizer, self.data_job.into_iter().collect(), vec![tok_out.clone()]),
        );
        let config_file = self.run.join("jobs").join("seed").join("config.json");
        let config_json = serde_json::to_string_pretty(&self.seed_cfg.to_hf()?)?;
        let job = self.train_job(TrainJob {
            name: "seed".into(),
            kind: JobKind::TrainSeed,
            deps: vec![tok],
            init: job::Init { checkpoint: None, config: Some(config_file.clone()), tokenizer: Some(tok_out) },
            out: self.run.join("seed"),
            train: self.mix(),
            valid: self.valid_files.clone(),
            params: t.train.clone(),
            domain: None,
            label: "seed".into(),
            parent: None,
            active_params: self.dense_n,
            router_guard: None,
        })?;
        // The config is one more file handed to the seed job.
        self.jobs[job.0].files.push((config_file, config_json));
        Ok(Seed { model: self.model(job), job: Some(job), data: self.data_job })
    }

    /// Branch and train: one expert per domain from the seed, no communication between them.
    fn expert_phase(&mut self, seed: &Seed, arm: &Arm) -> Result<Vec<JobRef>> {
        let p = self.p;
        let params = p.domains.iter().map(|d| p.experts.overlay(&d.overrides)).collect();
        self.domain_experts(seed, arm, "expert", params)
    }

    /// BTM's own arm: one expert per domain from the seed, trained on its own domain for an
    /// even share of the dense baseline's post-seed tokens (or `e.steps`), scored later as an
    /// ensemble and a parameter average rather than merged.
    fn ensemble_arm_phase(&mut self, seed: &Seed, arm: &Arm, e: &TrainParams) -> Result<Vec<JobRef>> {
        let p = self.p;
        let even_share = |params: &TrainParams| self.matched_steps(params).div_ceil(p.domains.len() as u64);
        let params: Vec<TrainParams> = p
            .domains
            .iter()
            .map(|d| {
                let params = p.experts.overlay(&d.overrides).overlay(e);
                TrainParams { steps: e.steps.or_else(|| Some(even_share(&params))), ..params }
            })
            .collect();
        self.domain_experts(seed, arm, "ensemble-expert", params)
    }

    /// One expert per domain, branched from the seed and trained on that domain with its
    /// `params` (one per domain, in order) under the arm's seed: jobs `<kind><sfx>/<domain>`,
    /// models `<kind>s<sfx>/<domain>` labelled `<kind>-<domain><sfx>`.
    fn domain_experts(&mut self, seed: &Seed, arm: &Arm, kind: &str, params: Vec<TrainParams>) -> Result<Vec<JobRef>> {
        let p = self.p;
        let mut experts = vec![];
        for (d, params) in p.domains.iter().zip(params) {
            let name = self.train_job(TrainJob {
                name: format!("{kind}{}/{}", arm.sfx, d.name),
                kind: JobKind::TrainExpert,
                deps: seed.deps(),
                init: seed.init(),
                out: self.run.join(format!("{kind}s{}", arm.sfx)).join(&d.name),
                train: vec![domain_source(self.base, d, 1.0)],
                valid: d.valid.iter().map(|v| abs(self.base, v)).collect(),
                params: arm.seeded(params),
                domain: Some(d.name.clone()),
                label: format!("{kind}-{}{}", d.name, arm.sfx),
                parent: Some(&seed.model),
                active_params: self.dense_n,
                router_guard: None,
            })?;
            experts.push(name);
        }
        Ok(experts)
    }

    /// Merge the arm's experts into an MoE (`btm merge`) with routers from `router_init`.
    fn merge_phase(
        &mut self,
        seed: &Seed,
        arm: &Arm,
        m: &crate::pipeline::spec::MergeSpec,
        router_init: crate::pipeline::spec::RouterInit,
        experts: &[JobRef],
    ) -> Result<JobRef> {
        let p = self.p;
        let out = self.run.join(format!("merged{}", arm.sfx));
        let calibrated = matches!(router_init, crate::pipeline::spec::RouterInit::Centroid | crate::pipeline::spec::RouterInit::Fit);
        let calib = if calibrated {
            p.domains.iter().map(|d| format!("{}={}", d.name, abs(self.base, d.valid.as_deref().expect("validated")))).collect()
        } else {
            vec![]
        };
        let non_expert = match &m.non_expert {
            NonExpertSource::Expert(domain) => {
                let i = p.domains.iter().position(|d| &d.name == domain).expect("validated");
                NonExpert::From(self.model(experts[i]).dir)
            }
            NonExpertSource::Seed => NonExpert::From(seed.model.dir.clone()),
            NonExpertSource::Average => NonExpert::Average,
        };
        let spec = btm_merger::MergeSpec {
            experts: experts.iter().map(|e| self.model(*e).dir.to_string_lossy().into_owned()).collect(),
            out: out.to_string_lossy().into_owned(),
            top_k: m.top_k,
            routing: m.routing,
            router: btm_merger::RouterSpec { init: Some(router_init), calib_tokens: m.calib_tokens, ..Default::default() },
            calib,
            non_expert,
            weights: None,
            shared_expert: m.shared_expert_from_seed.then(|| seed.model.dir.to_string_lossy().into_owned()),
            output: Default::default(),
        };
        let tokens: u64 = experts.iter().map(|e| self.model(*e).tokens_after_seed).sum();
        let flops: f64 = experts.iter().map(|e| self.model(*e).flops_after_seed).sum();
        let produces = ModelRef {
            label: format!("merged{}", arm.sfx),
            dir: out.clone(),
            tokens_after_seed: tokens,
            flops_after_seed: flops,
            active_params: self.moe_active(p.domains.len(), m.top_k, 1, m.shared_expert_from_seed),
        };
        let job =
            NewJob { produces: Some(produces), ..NewJob::new(format!("merge{}", arm.sfx), JobKind::Merge, experts.to_vec(), vec![out]) };
        Ok(self.spec_job(&["merge"], &spec, job))
    }

    /// Continue training the merged MoE on the mix.
    fn continue_merged_phase(
        &mut self,
        arm: &Arm,
        m: &crate::pipeline::spec::MergeSpec,
        c: &TrainParams,
        merged: JobRef,
    ) -> Result<JobRef> {
        let p = self.p;
        let parent = self.model(merged);
        let label = format!("continued{}", arm.sfx);
        self.train_job(TrainJob {
            name: format!("continue/merged{}", arm.sfx),
            kind: JobKind::Continue,
            deps: vec![merged],
            init: init_from(&parent),
            out: self.run.join(&label),
            train: self.mix(),
            valid: self.valid_files.clone(),
            params: arm.seeded(p.experts.mix_phase(c)),
            domain: None,
            label,
            parent: Some(&parent),
            active_params: self.moe_active(p.domains.len(), m.top_k, 1, m.shared_expert_from_seed),
            router_guard: None,
        })
    }

    /// The compute-matched dense baseline: the seed trained on the mix for as many tokens as
    /// the experts and the merged MoE's continued training together, by the experts' trainer
    /// and resources (the same recipe, so the comparison is like for like).
    fn baseline_phase(&mut self, seed: &Seed, arm: &Arm) -> Result<JobRef> {
        let p = self.p;
        let recipe = TrainParams { trainer: p.experts.trainer.clone(), resources: p.experts.resources.clone(), ..TrainParams::default() };
        let params = TrainParams { steps: Some(self.matched_steps(&p.experts)), ..arm.seeded(p.experts.mix_phase(&recipe)) };
        let label = format!("baseline{}", arm.sfx);
        self.train_job(TrainJob {
            name: label.clone(),
            kind: JobKind::Baseline,
            deps: seed.deps(),
            init: seed.init(),
            out: self.run.join(&label),
            train: self.mix(),
            valid: self.valid_files.clone(),
            params,
            domain: None,
            label,
            parent: Some(&seed.model),
            active_params: self.dense_n,
            router_guard: None,
        })
    }

    /// Upcycle the seed, and train the upcycled MoE on the mix for the matched budget (under
    /// the first arm seed). Returns the models to score.
    fn upcycle_phase(&mut self, seed: &Seed, u: &crate::pipeline::spec::UpcycleSpec, arm_seed: Option<u64>) -> Result<Vec<JobRef>> {
        let p = self.p;
        let out = self.run.join("upcycled");
        let spec = btm_merger::UpcycleSpec {
            granularity: u.granularity,
            routing: u.routing,
            scaling: u.scaling,
            ..btm_merger::UpcycleSpec::new(
                seed.model.dir.to_string_lossy().into_owned(),
                u.experts,
                u.top_k,
                out.to_string_lossy().into_owned(),
            )
        };
        let produces = ModelRef {
            label: "upcycled".into(),
            dir: out.clone(),
            tokens_after_seed: 0,
            flops_after_seed: 0.0,
            active_params: self.moe_active(u.experts, u.top_k, u.granularity, false),
        };
        let job = NewJob { produces: Some(produces), ..NewJob::new("upcycle".into(), JobKind::Upcycle, seed.deps(), vec![out]) };
        let name = self.spec_job(&["upcycle"], &spec, job);
        let mut scored = vec![name];
        if p.continue_training.is_some() || u.train.is_some() {
            let mut params = p.experts.mix_phase(p.continue_training.as_ref().unwrap_or(&TrainParams::default()));
            params = params.overlay(u.train.as_ref().unwrap_or(&TrainParams::default()));
            if u.train.as_ref().and_then(|t| t.steps).is_none() {
                params.steps = Some(self.matched_steps(&params));
            }
            let parent = self.model(name);
            let label = "upcycled-continued";
            scored.push(self.train_job(TrainJob {
                name: "continue/upcycled".into(),
                kind: JobKind::Continue,
                deps: vec![name],
                init: init_from(&parent),
                out: self.run.join(label),
                train: self.mix(),
                valid: self.valid_files.clone(),
                params: with_arm_seed(arm_seed, params),
                domain: None,
                label: label.into(),
                parent: Some(&parent),
                active_params: self.moe_active(u.experts, u.top_k, u.granularity, false),
                router_guard: None,
            })?);
        }
        Ok(scored)
    }

    /// The MoE `add_experts` extends, and its shape: the index the next added expert takes,
    /// and the config that counts its active parameters. Either `add_experts.moe` or the run's
    /// first merge (its job id and folder).
    fn moe_to_extend(
        &self,
        add: &crate::pipeline::spec::AddExperts,
        first_merge: Option<(JobRef, &crate::pipeline::spec::MergeSpec)>,
    ) -> Result<((Vec<JobRef>, PathBuf), ModelConfig)> {
        let p = self.p;
        Ok(match (&add.moe, first_merge) {
            (Some(loc), _) => {
                let dir = btm_model::storage::local_dir(&abs(self.base, loc))?;
                let cfg = btm_model::Checkpoint::open(&dir).with_context(|| format!("add_experts.moe: {}", dir.display()))?.config;
                if cfg.moe.is_none() {
                    bail!("add_experts.moe: {} is a dense model, not an MoE", dir.display());
                }
                ((vec![], dir), cfg)
            }
            (None, Some((n, m))) => {
                let cfg = self.moe_config(p.domains.len(), m.top_k, 1, m.shared_expert_from_seed);
                ((vec![n], self.model(n).dir), cfg)
            }
            (None, None) => bail!("add_experts.moe: give an MoE checkpoint, or add `merge` so the run makes one"),
        })
    }

    /// The `btm add-expert` job that appends expert `expert`'s FFN (domain `d`) to the MoE
    /// `moe` (the job ids it waits for, its folder), writing `out`.
    fn add_expert_job(
        &mut self,
        moe: &(Vec<JobRef>, PathBuf),
        expert: JobRef,
        d: &crate::pipeline::spec::Domain,
        out: &Path,
        active_params: usize,
    ) -> JobRef {
        let spec = btm_merger::AddExpertSpec {
            name: Some(d.name.clone()),
            calib: d.valid.as_ref().map(|v| abs(self.base, v)),
            ..btm_merger::AddExpertSpec::new(
                moe.1.to_string_lossy().into_owned(),
                self.model(expert).dir.to_string_lossy().into_owned(),
                out.to_string_lossy().into_owned(),
            )
        };
        let mut deps = moe.0.clone();
        deps.push(expert);
        let produces = ModelRef {
            label: format!("extended-{}", d.name),
            dir: out.to_path_buf(),
            tokens_after_seed: 0,
            flops_after_seed: 0.0,
            active_params,
        };
        let job = NewJob {
            produces: Some(produces),
            ..NewJob::new(format!("add-expert/{}", d.name), JobKind::AddExpert, deps, vec![out.to_path_buf()])
        };
        self.spec_job(&["add-expert"], &spec, job)
    }

    /// Add experts for new domains to an existing MoE (the run's first merge, or `moe`), one
    /// after another: each trained from the seed (or `base`), then appended. Returns the
    /// extended models.
    fn add_expert_phase(
        &mut self,
        seed: &Seed,
        add: &crate::pipeline::spec::AddExperts,
        first_merge: Option<(JobRef, &crate::pipeline::spec::MergeSpec)>,
    ) -> Result<Vec<JobRef>> {
        let p = self.p;
        let (mut moe, mut moe_cfg) = self.moe_to_extend(add, first_merge)?;
        let base_ref = match &add.base {
            Some(loc) => {
                let dir = btm_model::storage::local_dir(&abs(self.base, loc))?;
                ModelRef { label: "base".into(), dir, tokens_after_seed: 0, flops_after_seed: 0.0, active_params: self.dense_n }
            }
            None => seed.model.clone(),
        };
        let mut scored = vec![];
        for d in &add.domains {
            let name = self.train_job(TrainJob {
                name: format!("added/{}", d.name),
                kind: JobKind::TrainExpert,
                deps: if add.base.is_some() { vec![] } else { seed.deps() },
                init: job::Init { checkpoint: Some(base_ref.dir.to_string_lossy().into_owned()), config: None, tokenizer: None },
                out: self.run.join("added").join(&d.name),
                train: vec![domain_source(self.base, d, 1.0)],
                valid: d.valid.iter().map(|v| abs(self.base, v)).collect(),
                params: p.experts.overlay(&d.overrides),
                domain: Some(d.name.clone()),
                label: format!("expert-{}", d.name),
                parent: Some(&base_ref),
                active_params: self.dense_n,
                router_guard: None,
            })?;
            // The new domain's own dense expert is scored too: what the MoE's new expert is held to.
            scored.push(name);
            let out = self.run.join("extended").join(&d.name);
            // The new expert's index, and the extended MoE's shape.
            let index = moe_cfg.moe.as_ref().expect("an MoE").experts;
            moe_cfg.moe.as_mut().expect("an MoE").experts += 1;
            let added = self.add_expert_job(&moe, name, d, &out, moe_cfg.num_active_parameters());
            scored.push(added);
            moe = (vec![added], out.clone());
            if let Some(t) = &add.train_in_place {
                let expert = self.model(name);
                let trained = self.train_in_place_job(add, d, t, added, &out, index, moe_cfg.num_active_parameters(), &expert)?;
                moe = (vec![trained], self.model(trained).dir);
                scored.push(trained);
            }
        }
        Ok(scored)
    }

    /// Train added expert `index` where it will live: its FFN and its router row inside the
    /// frozen extended MoE at `extended` (`active_params` per token), on domain `d` plus the old
    /// domains' replay.
    #[allow(clippy::too_many_arguments)]
    fn train_in_place_job(
        &mut self,
        add: &crate::pipeline::spec::AddExperts,
        d: &crate::pipeline::spec::Domain,
        over: &TrainParams,
        added: JobRef,
        extended: &Path,
        index: usize,
        active_params: usize,
        expert: &ModelRef,
    ) -> Result<JobRef> {
        let p = self.p;
        let mut params = p.experts.mix_phase(over);
        if params.trainable.is_none() {
            let selection = vec![format!("*.mlp.experts.{index}.*"), format!("*.mlp.gate.weight[{index}]")];
            params.trainable = Some(btm_trainer::spec::Trainable { include: selection, exclude: vec![] });
        }
        params.aux_loss_coef = over.aux_loss_coef.or(Some(0.0));
        let mut train = vec![domain_source(self.base, d, 1.0 - add.replay)];
        // The replayed old tokens keep the new expert out of their top-k (the guard's training form).
        let guard = add.replay > 0.0 && add.guard.coef > 0.0;
        if add.replay > 0.0 {
            let share = add.replay / p.domains.len() as f64;
            train.extend(p.domains.iter().map(|old| job::Source { guarded: guard, ..domain_source(self.base, old, share) }));
        }
        let router_guard = guard.then(|| job::RouterGuard { experts: vec![index], margin: add.guard.margin, coef: add.guard.coef });
        let label = format!("in-place-{}", d.name);
        self.train_job(TrainJob {
            name: format!("train-in-place/{}", d.name),
            kind: JobKind::TrainInPlace,
            deps: vec![added],
            init: job::Init { checkpoint: Some(extended.to_string_lossy().into_owned()), config: None, tokenizer: None },
            out: self.run.join("in-place").join(&d.name),
            train,
            valid: d.valid.iter().map(|v| abs(self.base, v)).collect(),
            params,
            domain: Some(d.name.clone()),
            label,
            parent: Some(expert),
            active_params,
            router_guard,
        })
    }

    /// Score every model on every domain (a given seed too), and BTM's ensemble.
    fn eval_phase(&mut self, seed: &Seed, scored: Vec<JobRef>) {
        if seed.job.is_none() {
            self.eval_jobs(&seed.model, None);
        }
        for job in scored {
            let m = self.model(job);
            self.eval_jobs(&m, Some(job));
        }
        if self.p.eval.ensemble || self.p.ensemble_arm.is_some() {
            self.ensemble_eval_jobs();
        }
        if self.p.eval.averaged {
            self.averaged_eval_jobs();
        }
    }

    /// BTM's parameter average of the (first arm seed's) ensemble members, one per evaluation domain with
    /// a `valid` file: `btm average --weights-from valid` into `averaged/<domain>`, scored on
    /// that domain as row `averaged`.
    fn averaged_eval_jobs(&mut self) {
        let experts = self.ensemble_members("");
        if experts.len() < 2 {
            return;
        }
        for d in &self.p.domains {
            let Some(valid) = &d.valid else { continue };
            let out = self.run.join("averaged").join(&d.name);
            let spec = AverageSpec {
                experts: experts.iter().map(|(_, dir)| dir.to_string_lossy().into_owned()).collect(),
                weights_from: Some(PathBuf::from(abs(self.base, valid))),
                weights: vec![],
                seq_len: btm_trainer::jobs::DEFAULT_SEQ_LEN,
                out: out.clone(),
                device: Default::default(),
            };
            let deps = experts.iter().map(|(job, _)| *job).collect();
            let job =
                self.spec_job(&["average"], &spec, NewJob::new(format!("average/{}", d.name), JobKind::Merge, deps, vec![out.clone()]));
            // Each domain's average is a model of its own, scored on that domain only.
            let scoring = Scoring { model: Some(out.to_string_lossy().into_owned()), ..Scoring::default() };
            self.eval_job(&format!("averaged/{}", d.name), &[d], scoring, vec![job]);
        }
    }
}

/// A trainer's start: the checkpoint of model `m`.
fn init_from(m: &ModelRef) -> job::Init {
    job::Init { checkpoint: Some(m.dir.to_string_lossy().into_owned()), config: None, tokenizer: None }
}

/// Domain `d`'s training text as a trainer source at `weight`.
fn domain_source(base: &Path, d: &crate::pipeline::spec::Domain, weight: f64) -> job::Source {
    job::Source { path: PathBuf::from(abs(base, &d.train)), weight, format: d.format, text_key: d.text_key.clone(), guarded: false }
}

/// `t` trained with `arm_seed`, when the pipeline lists arm seeds.
fn with_arm_seed(arm_seed: Option<u64>, t: TrainParams) -> TrainParams {
    TrainParams { seed: arm_seed.or(t.seed), ..t }
}

impl TrainParams {
    fn tokens_or_default(&self) -> u64 {
        self.resolve().tokens()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Re-pinned when every job became its typed spec file (`btm <kind> --spec FILE`), with
    /// every phase: the seed's tokenizer, experts, merge under two router inits, continued
    /// training, baseline, arm repeats, upcycling, an added expert trained in place, the ensemble
    /// and the parameter average.
    const PINNED_IDS: &[&str] = &[
        "tokenizer 38ae527b45e17fea",
        "seed 8aa2dd54186ec0aa",
        "expert/a 38ea8af7255bf9b5",
        "expert/b 1c13faeea7ea1f16",
        "merge fea80916fd0b555b",
        "continue/merged 8494875a1923f466",
        "merge-fit 2d201818baf98304",
        "continue/merged-fit 5bc3fc4ca5d8ecbb",
        "baseline 04564383a06a088e",
        "expert-s2/a 5aefe0b657c9e7a1",
        "expert-s2/b 34f69211039a878a",
        "merge-s2 ce3370780c2388cb",
        "continue/merged-s2 5ee89286ed95ba97",
        "baseline-s2 d15ffe699527aaa7",
        "upcycle 90b52f14fd2a02d5",
        "continue/upcycled b72a083e64ef74c9",
        "added/c a477106b84d23886",
        "add-expert/c f22389f609011376",
        "train-in-place/c f1d55230d131c77f",
        "eval/seed 9421b7483917fa53",
        "eval/expert-a 063aa21369cd5d86",
        "eval/expert-b 3b5cb3e074fa1b5a",
        "eval/merged 80f0e6c091a1900a",
        "eval/continued ea3c6744d0a544ce",
        "eval/merged-fit 2cee0f25d9e405dd",
        "eval/continued-fit 40ef9eb800a5809c",
        "eval/baseline 8948fc6b46599b0e",
        "eval/continued-s2 cb602f0b6cccfd60",
        "eval/baseline-s2 442c837f3c40152e",
        "eval/upcycled 819fc783db9cb3b7",
        "eval/upcycled-continued fee700f178d008b0",
        "eval/expert-c 46ab85590e2fcd15",
        "eval/extended-c ce3788cc2ef38088",
        "eval/in-place-c c920699b27c20ff6",
        "eval/ensemble fa81e7e6cc1074e8",
        "eval/ensemble-top1 228cca2c142d530a",
        "eval/ensemble-extended bd098697b9b260cf",
        "average/a a6fb32bc7817ad4d",
        "eval/averaged/a 79b6e093da5f65e9",
        "average/b d8a85be2051a53ba",
        "eval/averaged/b ccdd986fe04e5ad4",
    ];

    fn pipeline(extra: &str) -> Pipeline {
        let yaml = format!(
            "name: t\nseed:\n  model: {{hidden_size: 32, layers: 1, heads: 2, ffn: 64}}\n  tokenizer: {{vocab_size: 300}}\n\
             domains:\n  - {{name: a, train: a.jsonl, valid: a.jsonl, test: a.jsonl}}\n  - {{name: b, train: b.jsonl, valid: b.jsonl, test: b.jsonl}}\n\
             experts: {{steps: 10, batch_size: 4, seq_len: 32}}\n\
             merge: {{top_k: 1}}\ncontinue: {{steps: 6, batch_size: 2}}\n\
             eval: {{baseline: true}}\n{extra}"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn job<'a>(plan: &'a Plan, name: &str) -> &'a Job {
        plan.jobs.iter().find(|j| j.name == name).unwrap_or_else(|| panic!("no job {name}"))
    }

    /// Whether the plan scores model `label` on `domain`.
    fn scored(plan: &Plan, label: &str, domain: &str) -> bool {
        let file = format!("eval/{label}/{domain}.json");
        plan.jobs.iter().any(|j| j.name.starts_with(&format!("eval/{label}")) && j.outputs.iter().any(|o| o.ends_with(&file)))
    }

    fn spec(j: &Job) -> job::JobSpec {
        spec_file(j)
    }

    /// The spec a job runs, as its file in the run holds it.
    fn spec_file<T: serde::de::DeserializeOwned>(j: &Job) -> T {
        serde_yaml::from_str(&j.files[0].1).unwrap()
    }

    /// Every job of a plan with every phase, by name and id. The ids are pinned: a change to
    /// how the plan is built that changes a job's command, files or dependencies shows here
    /// (and would redo that job in every existing run).
    #[test]
    fn job_ids_are_pinned() {
        let extra = "upcycle: {experts: 2, top_k: 1}\narm_seeds: [1, 2]\nadd_experts:\n  domains:\n    - {name: c, train: c.jsonl, valid: c.jsonl, test: c.jsonl}\n  train_in_place: {steps: 5}\n";
        let mut p = pipeline(extra);
        p.eval.ensemble = true;
        p.eval.averaged = true;
        p.merge.as_mut().unwrap().also_router_init = vec![crate::pipeline::spec::RouterInit::Fit];
        let plan = plan(&p, Path::new("/base"), Path::new("/runs/t")).unwrap();
        let ids: Vec<String> = plan.jobs.iter().map(|j| format!("{} {}", j.name, j.id)).collect();
        assert_eq!(ids, PINNED_IDS, "{ids:#?}");
    }

    /// One eval job per model: the plan grows linearly with the domains. A wide run scores each
    /// expert on its own domain and the few after it, unless `eval.full_table` asks for all.
    #[test]
    fn a_wide_run_plans_linearly_many_jobs() {
        let n = 40;
        let domains: String =
            (0..n).map(|i| format!("  - {{name: d{i}, train: d{i}.jsonl, valid: d{i}.jsonl, test: d{i}.jsonl}}\n")).collect();
        let yaml = format!(
            "name: w\nseed:\n  model: {{hidden_size: 32, layers: 1, heads: 2, ffn: 64}}\n  tokenizer: {{vocab_size: 300}}\n\
             domains:\n{domains}experts: {{steps: 2}}\nmerge: {{top_k: 1}}\neval: {{ensemble: true}}\n"
        );
        let mut p: Pipeline = serde_yaml::from_str(&yaml).unwrap();
        let sampled = plan(&p, Path::new("/base"), Path::new("/runs/w")).unwrap();
        // tokenizer, seed, n experts, merge; eval: seed, n experts, merged, ensemble, top-1.
        assert_eq!(sampled.jobs.len(), 3 + n + 1 + n + 3);
        let expert = job(&sampled, "eval/expert-d39");
        let scored: Vec<String> = expert.outputs.iter().map(|o| o.file_stem().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(scored, ["d39", "d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7"], "its own domain first, then the next ones");
        assert_eq!(job(&sampled, "eval/merged").outputs.len(), n, "a model that is not one domain's expert sees every domain");
        p.eval.full_table = true;
        let full = plan(&p, Path::new("/base"), Path::new("/runs/w")).unwrap();
        assert_eq!(job(&full, "eval/expert-d39").outputs.len(), n);
        assert_eq!(full.jobs.len(), sampled.jobs.len(), "still one eval job per model");
    }

    /// `domains: {discover}`: the cluster job runs first, its clusters are the domains (their
    /// files the job's splits), and the ensemble is weighed by the clusterer.
    #[test]
    fn discovered_domains_come_from_a_cluster_job_that_runs_first() {
        let yaml = "name: d\nseed:\n  model: {hidden_size: 32, layers: 1, heads: 2, ffn: 64}\n  tokenizer: {vocab_size: 300}\n\
                    domains: []\ndiscover: {data: [all.jsonl], k: 3, seed: 5}\nexperts: {steps: 2}\nmerge: {top_k: 1}\neval: {ensemble: true}\n";
        let mut p: Pipeline = serde_yaml::from_str(yaml).unwrap();
        p.domains = crate::pipeline::load::discovered_domains(3, Path::new(""));
        let plan = plan(&p, Path::new("/base"), Path::new("/runs/d")).unwrap();
        assert_eq!(plan.jobs[0].name, "cluster");
        let cluster: btm_cluster::ClusterSpec = spec_file(&plan.jobs[0]);
        assert_eq!(
            (cluster.data, cluster.k, cluster.seed, cluster.out),
            (vec!["/base/all.jsonl".to_string()], 3, 5, PathBuf::from("/runs/d/clusters"))
        );
        assert_eq!(job(&plan, "tokenizer").deps, vec!["cluster"]);
        let expert = spec(job(&plan, "expert/cluster-2"));
        assert_eq!(expert.data.train[0].path, PathBuf::from("/runs/d/clusters/cluster-2/train.jsonl"));
        assert!(scored(&plan, "merged", "cluster-1"));
        let ensemble: EvalBatch = spec_file(job(&plan, "eval/ensemble"));
        assert_eq!(ensemble.base.clusters, Some(PathBuf::from("/runs/d/clusters")));
        assert!(ensemble.domains.iter().all(|d| d.prior_from.is_none()), "the clusterer weighs the experts");
    }

    /// `add_experts.train_in_place`: after `add-expert`, the new expert (index 2 of a two-domain
    /// merge) and its router row train in the extended MoE, without the load-balancing loss, on
    /// the new domain plus the old domains' replay; the next phase and the scores read its model.
    #[test]
    fn added_experts_train_in_place() {
        let extra = "add_experts:\n  domains:\n    - {name: c, train: c.jsonl, valid: c.jsonl, test: c.jsonl}\n  train_in_place: {steps: 5, lr: 0.01}\n  replay: 0.2\n";
        let plan = plan(&pipeline(extra), Path::new("/base"), Path::new("/runs/t")).unwrap();
        let j = job(&plan, "train-in-place/c");
        assert_eq!(j.deps, vec!["add-expert/c"]);
        let s = spec(j);
        assert_eq!(s.init.checkpoint.as_deref(), Some("/runs/t/extended/c"));
        assert_eq!(s.trainable.include, vec!["*.mlp.experts.2.*", "*.mlp.gate.weight[2]"]);
        assert_eq!((s.steps, s.optimizer.lr, s.moe.aux_loss_coef), (Some(5), 0.01, 0.0));
        let sources: Vec<(String, f64, bool)> = s.data.train.iter().map(|t| (t.path.display().to_string(), t.weight, t.guarded)).collect();
        assert_eq!(
            sources,
            vec![("/base/c.jsonl".to_string(), 0.8, false), ("/base/a.jsonl".into(), 0.1, true), ("/base/b.jsonl".into(), 0.1, true)]
        );
        // The replayed old tokens keep the new expert out of their top-k.
        assert_eq!(s.moe.router_guard, Some(job::RouterGuard { experts: vec![2], margin: 1.0, coef: 1.0 }));
        assert!(scored(&plan, "in-place-c", "a"));
        assert!(scored(&plan, "expert-c", "c"));
        // `guard: {coef: 0}` leaves the row to the language-model loss.
        let off = super::plan(&pipeline(&format!("{extra}  guard: {{coef: 0}}\n")), Path::new("/base"), Path::new("/runs/t")).unwrap();
        let s = spec(job(&off, "train-in-place/c"));
        assert!(s.moe.router_guard.is_none() && s.data.train.iter().all(|t| !t.guarded));
    }

    /// On Kubernetes a multi-rank job's ranks meet over the TCP collective (no MPI launcher);
    /// elsewhere over MPI.
    #[test]
    fn kubernetes_ranks_use_the_tcp_collective() {
        let mut p = pipeline("");
        p.experts.data_parallel = Some(2);
        p.experts.grad_accum = Some(2);
        let local = plan(&p, Path::new("/base"), Path::new("/runs/t")).unwrap();
        assert_eq!(spec(job(&local, "expert/a")).collective, btm_collective::Backend::Mpi);
        p.engine = serde_yaml::from_str("{kind: kubernetes, image: btm:1}").unwrap();
        let k8s = plan(&p, Path::new("/base"), Path::new("/runs/t")).unwrap();
        let s = spec(job(&k8s, "expert/a"));
        assert_eq!((s.collective, s.data_parallel), (btm_collective::Backend::Tcp, 2));
        assert_eq!(job(&k8s, "expert/a").resources.ranks, 2);
    }

    /// BTM's ensemble arm: per arm seed, one expert per domain trained for an even share of the
    /// dense baseline's tokens; the ensemble and the average are made of its experts, not the
    /// btm-merge arm's. `also_router_init` merges the first seed's experts again and continues.
    #[test]
    fn the_ensemble_arm_is_compute_matched_and_other_router_inits_are_merged_from_the_same_experts() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pipeline("ensemble_arm: {lr: 0.002}\narm_seeds: [3, 7]\n");
        p.eval.averaged = true;
        p.merge.as_mut().unwrap().also_router_init = vec![crate::pipeline::spec::RouterInit::Fit];
        let plan = plan(&p, dir.path(), dir.path()).unwrap();
        // The baseline's 23 steps × 128 tokens, over 2 domains at 128 tokens a step: 12 each.
        let baseline_tokens = job(&plan, "baseline").produces.as_ref().unwrap().tokens_after_seed;
        for (name, seed) in [("ensemble-expert/a", 3), ("ensemble-expert/b", 3), ("ensemble-expert-s7/a", 7)] {
            let s = spec(job(&plan, name));
            assert_eq!((s.steps, s.optimizer.lr, s.seed), (Some(12), 0.002, seed), "{name}");
        }
        let members: u64 =
            ["ensemble-expert/a", "ensemble-expert/b"].iter().map(|n| job(&plan, n).produces.as_ref().unwrap().tokens_after_seed).sum();
        assert!(members >= baseline_tokens && members < baseline_tokens + 2 * 128, "{members} vs {baseline_tokens}");
        let ensemble = job(&plan, "eval/ensemble");
        assert_eq!(ensemble.deps, vec!["ensemble-expert/a", "ensemble-expert/b"]);
        assert_eq!(job(&plan, "eval/ensemble-s7").deps, vec!["ensemble-expert-s7/a", "ensemble-expert-s7/b"]);
        assert_eq!(job(&plan, "average/a").deps, vec!["ensemble-expert/a", "ensemble-expert/b"]);
        assert!(scored(&plan, "ensemble-expert-a", "b"), "the first seed's members are scored");
        // The fit router: the first seed's experts, merged again and continued like the main merge.
        let fit = job(&plan, "merge-fit");
        assert_eq!(fit.deps, vec!["expert/a", "expert/b"]);
        let fit_spec: btm_merger::MergeSpec = spec_file(fit);
        assert_eq!(fit_spec.router.init, Some(btm_merger::RouterInit::Fit));
        assert_eq!(fit_spec.calib.len(), 2, "a fitted router is calibrated on every domain");
        assert_eq!(job(&plan, "continue/merged-fit").deps, vec!["merge-fit"]);
        assert_eq!(spec(job(&plan, "continue/merged-fit")).seed, 3);
        assert!(scored(&plan, "continued-fit", "a"));
        assert!(!plan.jobs.iter().any(|j| j.name == "merge-s7-fit"), "the comparison runs under the first arm seed");
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
        assert!(scored(&plan, "continued-s7", "a"));
        assert!(scored(&plan, "baseline-s7", "b"));
        assert!(!plan.jobs.iter().any(|j| j.name.starts_with("eval/merged-s7") || j.name.starts_with("eval/expert-a-s7")));
    }

    /// A phase's `trainer` and `resources` reach its jobs (the domains' overrides too) and
    /// not the mix phases; a btm-trained phase's job file is what it was without them.
    #[test]
    fn phase_trainers_and_resources_reach_their_jobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = plan(&pipeline(""), dir.path(), dir.path()).unwrap();
        let mut p = pipeline("");
        p.experts.resources = Some(crate::pipeline::spec::PhaseResources {
            cpus_per_task: Some(8),
            gpus_per_task: Some(1),
            memory_mb: Some(4096),
            time_limit_min: Some(90),
        });
        p.experts.trainer = Some(btm_trainer::spec::Trainer::Command { command: "exec t {model_in} {model_out}".into() });
        p.domains[1].overrides.resources = Some(crate::pipeline::spec::PhaseResources { cpus_per_task: Some(2), ..Default::default() });
        let plan = plan(&p, dir.path(), dir.path()).unwrap();
        let a = job(&plan, "expert/a");
        assert_eq!((a.resources.cpus, a.resources.gpus, a.resources.memory_mb, a.resources.time_limit_min), (8, 1, Some(4096), Some(90)));
        assert_eq!((spec(a).threads, spec(a).trainer.template().as_deref()), (Some(8), Some("exec t {model_in} {model_out}")));
        assert_eq!(a.train.as_ref().unwrap().external.as_deref(), Some("exec t {model_in} {model_out}"));
        let b = job(&plan, "expert/b");
        assert_eq!((b.resources.cpus, b.resources.memory_mb), (2, None), "an override replaces the whole block");
        for name in ["continue/merged", "merge"] {
            assert_eq!(job(&plan, name).resources, job(&base, name).resources, "{name}");
            assert_eq!(job(&plan, name).files, job(&base, name).files, "{name}");
        }
        assert!(spec(job(&plan, "continue/merged")).trainer.is_btm());
        // The dense baseline is trained like the experts (their trainer and resources), so the
        // arms compare like for like, also at a scale btm's own trainer does not reach.
        let baseline = job(&plan, "baseline");
        assert_eq!((baseline.resources.cpus, baseline.resources.gpus), (8, 1));
        assert_eq!(spec(baseline).trainer.template().as_deref(), Some("exec t {model_in} {model_out}"));
    }

    /// A phase computes where its GPUs are: CPU and float32 without any, CUDA and bfloat16
    /// with them; a CUDA phase on the local engine takes a GPU per rank and sums over NCCL.
    #[test]
    fn phases_compute_where_their_gpus_are() {
        use crate::pipeline::spec::{DType, Device, PhaseResources};
        let dir = tempfile::tempdir().unwrap();
        let cpu = plan(&pipeline(""), dir.path(), dir.path()).unwrap();
        for j in cpu.jobs.iter().filter(|j| j.train.is_some()) {
            assert_eq!((spec(j).device, spec(j).dtype, j.resources.gpus), (Device::Cpu, DType::Float32, 0), "{}", j.name);
        }

        let mut p = pipeline("");
        p.experts.resources = Some(PhaseResources { gpus_per_task: Some(1), ..Default::default() });
        let c = p.continue_training.as_mut().unwrap();
        (c.device, c.data_parallel, c.grad_accum) = (Some(Device::Cuda), Some(2), Some(2));
        p.domains[1].overrides.dtype = Some(DType::Float32);
        let plan = plan(&p, dir.path(), dir.path()).unwrap();
        let placed = |name: &str| {
            let j = job(&plan, name);
            let t = j.train.as_ref().unwrap();
            assert_eq!((t.device, t.dtype), (spec(j).device, spec(j).dtype), "{name}: the plan shows what the job file says");
            (spec(j).device, spec(j).dtype, j.resources.gpus, spec(j).collective)
        };
        let default = btm_collective::Backend::default();
        assert_eq!(placed("expert/a"), (Device::Cuda, DType::Bfloat16, 1, default));
        assert_eq!(placed("expert/b"), (Device::Cuda, DType::Float32, 1, default), "a domain's dtype wins");
        assert_eq!(placed("baseline"), (Device::Cuda, DType::Bfloat16, 1, default), "the baseline trains like the experts");
        assert_eq!(placed("seed"), (Device::Cpu, DType::Float32, 0, default));
        assert_eq!(placed("continue/merged"), (Device::Cuda, DType::Bfloat16, 1, btm_collective::Backend::Nccl));
        assert_eq!(job(&plan, "continue/merged").resources.ranks, 2);
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
        p.experts.trainable = Some(serde_yaml::from_str("{include: ['*.mlp.*']}").unwrap());
        p.domains[1].overrides.trainable = Some(serde_yaml::from_str("{exclude: ['lm_head.*']}").unwrap());
        p.merge.as_mut().unwrap().non_expert = NonExpertSource::Seed;
        let plan = plan(&p, dir.path(), dir.path()).unwrap();
        let merge: btm_merger::MergeSpec = spec_file(job(&plan, "merge"));
        assert_eq!(merge.non_expert, NonExpert::From(job(&plan, "seed").produces.clone().unwrap().dir));
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
