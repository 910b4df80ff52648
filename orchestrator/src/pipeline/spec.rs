//! The pipeline YAML: one file describes a whole Branch-Train-Merge run.
//!
//! ```yaml
//! name: quickstart
//! storage: runs                     # local folder or object-store URL; the run lives in <storage>/<name>
//! engine: {kind: local, slots: 4}
//! seed:
//!   train:                          # or `checkpoint: path/or/url` for an existing HF model
//!     model: {hidden_size: 64, layers: 2, heads: 4, ffn: 176}
//!     tokenizer: {vocab_size: 512}
//!     train: {steps: 200, lr: 3.0e-3}
//! domains:
//!   - {name: scripture, train: data/scripture/train.jsonl, valid: data/scripture/valid.jsonl, test: data/scripture/test.jsonl}
//! train: {steps: 100, batch_size: 8, seq_len: 128, lr: 1.0e-3}
//! merge: {top_k: 2, routing: topk_then_softmax, router_init: centroid}
//! continue: {steps: 50, lr: 5.0e-4}
//! eval: {split: test, baseline: true}
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Run name; the run's folder is `<storage>/<name>`.
    pub name: String,
    /// Where runs live: a local folder or an object-store URL (file://, s3://, gs://, az://).
    #[serde(default = "default_storage")]
    pub storage: String,
    #[serde(default)]
    pub engine: EngineSpec,
    pub seed: SeedSpec,
    /// The domains: a list, or `{discover: …}` to find them in unlabelled text (c-BTM); then
    /// the list holds the discovered ones, `cluster-0` … `cluster-<k-1>`.
    pub domains: Vec<Domain>,
    /// Written as `domains: {discover: …}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discover: Option<Discover>,
    /// Hyperparameters of every expert's training (per-domain `overrides` win). The dense
    /// baseline is trained like the experts: it takes this block's `trainer` and `resources`.
    #[serde(default)]
    pub experts: TrainParams,
    /// Merge the trained experts into an MoE (omit to only train experts).
    #[serde(default)]
    pub merge: Option<MergeSpec>,
    /// Upcycle the seed into an MoE (instead of, or besides, branch-train-merge).
    #[serde(default)]
    pub upcycle: Option<UpcycleSpec>,
    /// Continue training the MoE model(s) on the mix of all domains.
    #[serde(default, rename = "continue")]
    pub continue_training: Option<TrainParams>,
    #[serde(default)]
    pub eval: EvalSpec,
    /// Append experts for new domains to an existing MoE without retraining the others.
    #[serde(default)]
    pub add_experts: Option<AddExperts>,
    /// Repeat the branch-train-merge arm and the dense baseline once per training seed (data
    /// order and initialisation of everything after the seed model), to show run-to-run noise.
    /// The first seed's models keep their plain names; the others get `-s<seed>` (e.g.
    /// `continued-s1`). The upcycled arm and added experts run with the first seed only.
    #[serde(default)]
    pub arm_seeds: Vec<u64>,
    /// BTM's own arm (ELMforest, Li et al. 2022): the seed branched into one expert per domain,
    /// each trained on its own domain, with the dense baseline's post-seed tokens split evenly
    /// between them (BTM's compute-matched setting) unless `steps` says otherwise; these
    /// hyperparameters override `experts` (and each domain's `overrides`). Its experts, not the
    /// btm-merge arm's, are then scored as the posterior-weighted ensemble (rows `ensemble`,
    /// `ensemble-top1`; `eval.ensemble` implied) and, with `eval.averaged`, as the per-domain
    /// parameter average. Repeated per arm seed (`ensemble-s<seed>`).
    #[serde(default)]
    pub ensemble_arm: Option<TrainParams>,
}

fn default_storage() -> String {
    "runs".into()
}

/// Where jobs run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EngineSpec {
    /// Child processes on this machine.
    Local {
        /// Jobs that may run at once.
        #[serde(default = "default_slots")]
        slots: usize,
        /// CPU threads per job (default: the machine's cores shared among the jobs running
        /// when a job starts, so a lone job, such as the seed, gets them all).
        #[serde(default)]
        threads_per_job: Option<usize>,
        /// Retries of a failed job before the run fails.
        #[serde(default = "default_retries")]
        retries: u32,
        /// GPUs the jobs share, each running job holding its own (`CUDA_VISIBLE_DEVICES`):
        /// a number, or `auto` (default): the machine's, or those `CUDA_VISIBLE_DEVICES`
        /// names. Only asked for when a job trains on CUDA.
        #[serde(default)]
        gpus: Gpus,
    },
    /// A Slurm cluster, through its command-line tools or slurmrestd. Jobs that become ready
    /// together (the per-domain trainers) are one job array.
    Slurm {
        #[serde(default)]
        api: SlurmApi,
        #[serde(default)]
        partition: Option<String>,
        /// Jobs submitted and unfinished at once (Slurm queues the rest of the cluster's work).
        #[serde(default = "default_slurm_slots")]
        slots: usize,
        /// CPUs per job (also the trainer's threads).
        #[serde(default = "one")]
        cpus_per_task: usize,
        #[serde(default)]
        mem_per_cpu_mb: Option<u64>,
        /// GPUs per job, requested as `--gres=gpu:N`.
        #[serde(default)]
        gpus_per_task: usize,
        #[serde(default)]
        time_limit_min: Option<u64>,
        /// Resubmissions of a failed task (node failure, preemption); trainers resume.
        #[serde(default = "default_retries")]
        retries: u32,
        /// slurmrestd settings for `api: rest`.
        #[serde(default)]
        rest: Option<SlurmRest>,
        /// srun's MPI plugin for multi-rank jobs (`pmix`, `pmi2`; `srun --mpi=list` names the
        /// cluster's); default: the cluster's `MpiDefault`.
        #[serde(default)]
        mpi: Option<String>,
    },
    /// A Kubernetes cluster: one Indexed Job per batch of jobs, through the API server.
    Kubernetes(KubernetesSpec),
    /// A Ray cluster: each job a Ray job, through the Jobs REST API of its dashboard.
    Ray(RaySpec),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RaySpec {
    /// The Ray dashboard's address (Jobs API), e.g. http://127.0.0.1:8265 (https works).
    pub address: String,
    /// The environment variable holding the cluster's auth token (`RAY_AUTH_MODE=token`), sent
    /// as `Authorization: Bearer`; never written to logs or the run. Unset: no token is sent.
    #[serde(default = "default_ray_token_env")]
    pub token_env: String,
    /// Path of `btm` on the Ray nodes (default: this btm's own path, for nodes that share this
    /// machine's filesystem).
    #[serde(default)]
    pub btm: Option<String>,
    /// Jobs submitted and unfinished at once (Ray queues what its nodes cannot start yet).
    #[serde(default = "default_slurm_slots")]
    pub slots: usize,
    /// CPUs per job (`entrypoint_num_cpus`; also the trainer's threads).
    #[serde(default = "one")]
    pub cpus_per_task: usize,
    /// GPUs per job (`entrypoint_num_gpus`).
    #[serde(default)]
    pub gpus_per_task: usize,
    /// Memory per job in MiB (`entrypoint_memory`, which Ray takes in bytes).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Resubmissions of a failed job; trainers resume from their checkpoints.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// A PEM file of CA certificates to trust for an `https://` address, besides the system's
    /// (and `SSL_CERT_FILE`'s).
    #[serde(default)]
    pub ca_cert: Option<String>,
    /// Also pass this machine's object-store credentials (every `AWS_*`, `AZURE_*` and
    /// `GOOGLE_*` variable) to the jobs, for nodes without their own. Ray shows them to anyone
    /// who can read its job list, so they are not passed by default.
    #[serde(default)]
    pub forward_credentials: bool,
}

fn default_ray_token_env() -> String {
    "RAY_AUTH_TOKEN".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSpec {
    /// Container image with the `btm` binary.
    pub image: String,
    /// Path of `btm` inside the image.
    #[serde(default = "default_btm_in_image")]
    pub btm: String,
    /// The namespace of the Jobs (default: the kubeconfig context's, in a pod its own, else
    /// `default`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Jobs submitted and unfinished at once.
    #[serde(default = "default_slurm_slots")]
    pub slots: usize,
    #[serde(default = "one")]
    pub cpus_per_task: usize,
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// GPUs per pod, requested as `nvidia.com/gpu`.
    #[serde(default)]
    pub gpus_per_task: usize,
    /// Pod retries per index (`backoffLimitPerIndex`); trainers resume from their checkpoints.
    #[serde(default = "default_backoff")]
    pub backoff_limit: u32,
    #[serde(default)]
    pub service_account: Option<String>,
    /// A ReadWriteMany volume holding the run folder, mounted at the same path in every pod.
    /// Not needed when `storage` is an object store: then each pod's output is its log
    /// (`kubectl logs`).
    #[serde(default)]
    pub volume: Option<Volume>,
    /// A Secret whose keys become every pod's environment: the object store's credentials
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, …) for a run kept in a bucket.
    #[serde(default)]
    pub env_from_secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// PersistentVolumeClaim name.
    pub claim: String,
    pub mount_path: String,
}

fn default_btm_in_image() -> String {
    "btm".into()
}
fn default_backoff() -> u32 {
    2
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SlurmApi {
    /// sbatch / squeue / scontrol / scancel.
    #[default]
    Cli,
    /// slurmrestd through HTTP with a JWT.
    Rest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlurmRest {
    /// e.g. http://127.0.0.1:6820
    pub url: String,
    #[serde(default = "default_slurm_user")]
    pub user: String,
    /// The environment variable holding the JWT (never written to logs or the run).
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// The slurmrestd API version: `auto` (the newest btm speaks of those the server's OpenAPI
    /// document offers), or one of v0.0.38, v0.0.40, v0.0.41, v0.0.42.
    #[serde(default = "default_api_version")]
    pub api_version: String,
}

fn default_slurm_slots() -> usize {
    64
}
fn default_slurm_user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "root".into())
}
fn default_token_env() -> String {
    "SLURM_JWT".into()
}
fn default_api_version() -> String {
    "auto".into()
}

impl EngineSpec {
    /// CPU threads each job gets; `None`: the local engine shares the machine's cores among
    /// the jobs running when each starts.
    pub fn threads_per_job(&self) -> Option<usize> {
        match self {
            EngineSpec::Local { threads_per_job, .. } => *threads_per_job,
            EngineSpec::Slurm { cpus_per_task, .. } => Some(*cpus_per_task),
            EngineSpec::Kubernetes(k) => Some(k.cpus_per_task),
            EngineSpec::Ray(r) => Some(r.cpus_per_task),
        }
    }

    pub fn gpus_per_job(&self) -> usize {
        match self {
            EngineSpec::Local { .. } => 0,
            EngineSpec::Slurm { gpus_per_task, .. } => *gpus_per_task,
            EngineSpec::Kubernetes(k) => k.gpus_per_task,
            EngineSpec::Ray(r) => r.gpus_per_task,
        }
    }

    pub fn retries(&self) -> u32 {
        match self {
            EngineSpec::Local { retries, .. } | EngineSpec::Slurm { retries, .. } => *retries,
            // Kubernetes retries pods itself (backoffLimitPerIndex); one more resubmission.
            EngineSpec::Kubernetes(_) => 1,
            EngineSpec::Ray(r) => r.retries,
        }
    }
}

/// The local engine's GPUs: a count, or `auto`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Gpus {
    /// This many: the first N of `CUDA_VISIBLE_DEVICES`, else GPUs 0…N-1.
    Count(usize),
    /// Every GPU the machine has (or `CUDA_VISIBLE_DEVICES` names).
    #[default]
    Auto,
}

impl Serialize for Gpus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Gpus::Count(n) => s.serialize_u64(*n as u64),
            Gpus::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Gpus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Gpus;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of GPUs or `auto`")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Gpus, E> {
                usize::try_from(n).map(Gpus::Count).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Gpus, E> {
                usize::try_from(n).map(Gpus::Count).map_err(|_| E::custom(format!("gpus: {n}: expected a number of GPUs or `auto`")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Gpus, E> {
                match v {
                    "auto" => Ok(Gpus::Auto),
                    other => Err(E::custom(format!("gpus: `{other}`: expected a number of GPUs or `auto`"))),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl JsonSchema for Gpus {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Gpus".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A number of GPUs, or `auto`: the machine's (or those CUDA_VISIBLE_DEVICES names).",
            "oneOf": [{"type": "integer", "minimum": 0}, {"const": "auto"}]
        })
    }
}

fn default_slots() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn default_retries() -> u32 {
    1
}

impl Default for EngineSpec {
    fn default() -> Self {
        EngineSpec::Local { slots: default_slots(), threads_per_job: None, retries: default_retries(), gpus: Gpus::Auto }
    }
}

/// The model every expert branches from: an existing checkpoint, or one trained here from
/// `model` and `tokenizer` with the hyperparameters in `train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SeedSpec {
    /// An existing Hugging Face checkpoint (folder or URL).
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Train a seed from scratch on the mix of all domains, of this shape.
    #[serde(default)]
    pub model: Option<ModelShape>,
    /// The seed's tokenizer, trained first on every domain's training text (with `model`).
    #[serde(default)]
    pub tokenizer: Option<TokenizerSpec>,
    /// Hyperparameters of the seed's training (with `model`).
    #[serde(default)]
    pub train: TrainParams,
}

/// A seed trained here ([`SeedSpec::scratch`]).
#[derive(Debug, Clone, Copy)]
pub struct SeedTrain<'a> {
    pub model: &'a ModelShape,
    pub tokenizer: &'a TokenizerSpec,
    pub train: &'a TrainParams,
}

impl SeedSpec {
    /// The seed to train here, when `model` and `tokenizer` are given.
    pub fn scratch(&self) -> Option<SeedTrain<'_>> {
        Some(SeedTrain { model: self.model.as_ref()?, tokenizer: self.tokenizer.as_ref()?, train: &self.train })
    }
}

/// The shape of a Llama-style seed trained from scratch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    /// Key/value heads (grouped-query attention); default = heads.
    #[serde(default)]
    pub kv_heads: Option<usize>,
    /// Width of the SwiGLU FFN.
    pub ffn: usize,
    #[serde(default = "default_max_positions")]
    pub max_positions: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_embeddings: bool,
}

fn default_max_positions() -> usize {
    1024
}

fn default_rope_theta() -> f64 {
    10000.0
}

/// A byte-level BPE tokenizer trained on the domains' training text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpec {
    pub vocab_size: usize,
    /// Documents per domain to train it on (default: all).
    #[serde(default)]
    pub max_docs_per_domain: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    /// Used in paths and reports: letters, digits, `-` and `_`.
    pub name: String,
    /// Training text (path or URL): JSONL (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`), parquet (a
    /// file, a folder of shards or a `*` glob) or a Megatron indexed dataset (`.idx`); in an
    /// object store it is streamed, never downloaded whole.
    pub train: String,
    /// The training text's format, when its name does not say it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<btm_trainer::sources::Format>,
    /// The JSON field or parquet column of the training text (default `text`; `valid` and
    /// `test` are JSONL with `text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_key: Option<String>,
    /// JSONL validation text: calibration data for the router and validation perplexity.
    #[serde(default)]
    pub valid: Option<String>,
    /// JSONL test text for the evaluation.
    #[serde(default)]
    pub test: Option<String>,
    /// Training hyperparameters for this domain's expert only.
    #[serde(default)]
    pub overrides: TrainParams,
}

/// `domains: {discover: …}`: domains found in unlabelled text the c-BTM way (Gururangan et al.
/// 2023; `btm cluster`): a cluster job runs first and its clusters become domains `cluster-0` …
/// `cluster-<k-1>`, each trained, validated and tested on its cluster's split. The ensemble then
/// weighs its experts by the clusterer's weights of the context rather than the posterior.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Discover {
    /// The unlabelled text: JSONL or parquet, paths (relative to the pipeline) or URLs.
    pub data: Vec<String>,
    /// Clusters, and so experts.
    pub k: usize,
    /// The JSON field or parquet column holding the text (default `text`).
    #[serde(default)]
    pub text_key: Option<String>,
    /// Documents the clusterer is fitted on (default: `btm cluster`'s).
    #[serde(default)]
    pub sample: Option<usize>,
    /// Seed of the sample, the projection, k-means and the splits.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Plain k-means instead of balanced.
    #[serde(default)]
    pub plain: bool,
}

/// The domain `discover` names cluster `i`.
pub fn cluster_domain_name(i: usize) -> String {
    format!("cluster-{i}")
}

/// Training hyperparameters; every field is optional so blocks can be layered
/// (defaults ← `experts` ← a domain's `overrides`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    pub steps: Option<u64>,
    pub batch_size: Option<usize>,
    pub seq_len: Option<usize>,
    pub grad_accum: Option<usize>,
    pub lr: Option<f64>,
    pub min_lr: Option<f64>,
    pub warmup_steps: Option<u64>,
    /// `cosine` or `constant`.
    pub decay: Option<Decay>,
    pub weight_decay: Option<f64>,
    pub betas: Option<[f64; 2]>,
    pub grad_clip: Option<f64>,
    pub seed: Option<u64>,
    pub checkpoint_interval: Option<u64>,
    pub keep_checkpoints: Option<usize>,
    pub eval_interval: Option<u64>,
    pub eval_sequences: Option<usize>,
    pub log_interval: Option<u64>,
    /// MoE load-balancing loss coefficient.
    pub aux_loss_coef: Option<f64>,
    /// MoE router z-loss coefficient.
    pub z_loss_coef: Option<f64>,
    /// MoE expert capacity factor (absent = dropless).
    pub capacity_factor: Option<f64>,
    /// `probs` or `position`: which assignments over capacity are dropped.
    pub drop_policy: Option<btm_kernels::DropPolicy>,
    /// `cpu` or `cuda`. Default: `cuda` when the phase's jobs ask for GPUs
    /// (`resources.gpus_per_task`, else the engine's), otherwise `cpu`.
    pub device: Option<Device>,
    /// `float32`, or `bfloat16` (mixed precision: float32 master weights and optimizer state).
    /// Default: `bfloat16` on `cuda`, `float32` on `cpu`.
    pub dtype: Option<DType>,
    /// Which parameters train (globs over Hugging Face tensor names, `*` matches anything);
    /// the rest stay frozen. Set in `experts`, it selects for the expert phase only: the merged
    /// MoE's training, the baseline and the upcycled arm train every parameter unless their own
    /// block sets it. E.g. `{include: ["*.mlp.*"]}` keeps the seed's embeddings and attention,
    /// so the merge's non-expert weights are exactly the seed's.
    pub trainable: Option<btm_trainer::spec::Trainable>,
    /// Who trains this phase: `{kind: btm}` (default), `{kind: command, command: "… {model_in}
    /// … {model_out} …"}` or `{kind: torchrun, script: train.py, args: […], nproc_per_node: N}`:
    /// an external engine through Hugging Face checkpoints (docs/training.md, "External trainers"). Set
    /// in `experts` it holds for the expert phase (and the domains' overrides) and the dense
    /// baseline, which is trained like the experts; the other mix phases set their own.
    pub trainer: Option<btm_trainer::spec::Trainer>,
    /// What each job of this phase asks of the engine, over the engine block's settings (e.g.
    /// a whole GPU node for the experts, one core for the rest). Like `trainer`, set in `experts`
    /// it holds for the expert phase and the baseline, not for the other mix phases.
    pub resources: Option<PhaseResources>,
    /// Ranks that train this phase's model on different micro-batches, gradients summed over
    /// them (launched with `mpirun`, `srun`; needs btm built with `--features mpi`). A step's
    /// `grad_accum` micro-batches are shared among the `data_parallel × expert_parallel` ranks.
    /// Like `resources`, set in `experts` it holds for the expert phase, not for the mix phases.
    pub data_parallel: Option<usize>,
    /// Ranks over which each MoE layer's experts are split (MoE phases: `continue`,
    /// `upcycle.train`); tokens travel to their experts by all-to-all.
    pub expert_parallel: Option<usize>,
}

/// Where a training phase's jobs compute ([`TrainParams::placement`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub device: Device,
    pub dtype: DType,
    /// GPUs each task (each rank of a multi-rank job) asks for.
    pub gpus_per_task: usize,
}

/// A phase's own resources; every field overrides the engine block's for its jobs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PhaseResources {
    /// CPUs per task (btm's trainer uses as many threads).
    pub cpus_per_task: Option<usize>,
    pub gpus_per_task: Option<usize>,
    /// Memory per task, MiB.
    pub memory_mb: Option<u64>,
    /// Wall-clock limit per task, minutes (Slurm).
    pub time_limit_min: Option<u64>,
}

macro_rules! overlay_fields {
    ($base:expr, $over:expr, $($f:ident),*) => {
        TrainParams { $($f: $over.$f.clone().or_else(|| $base.$f.clone()),)* }
    };
}

impl TrainParams {
    /// `self` with every field `over` sets replaced.
    pub fn overlay(&self, over: &TrainParams) -> TrainParams {
        overlay_fields!(
            self,
            over,
            steps,
            batch_size,
            seq_len,
            grad_accum,
            lr,
            min_lr,
            warmup_steps,
            decay,
            weight_decay,
            betas,
            grad_clip,
            seed,
            checkpoint_interval,
            keep_checkpoints,
            eval_interval,
            eval_sequences,
            log_interval,
            aux_loss_coef,
            z_loss_coef,
            capacity_factor,
            drop_policy,
            device,
            dtype,
            trainable,
            trainer,
            resources,
            data_parallel,
            expert_parallel
        )
    }

    /// A mix-phase block (`continue`, the baseline, the upcycled arm's `train`) layered over
    /// `experts`: every hyperparameter inherits, but not `experts`' `trainable`, which belongs
    /// to the expert phase.
    pub fn mix_phase(&self, over: &TrainParams) -> TrainParams {
        TrainParams {
            trainable: over.trainable.clone(),
            trainer: over.trainer.clone(),
            resources: over.resources.clone(),
            data_parallel: over.data_parallel,
            expert_parallel: over.expert_parallel,
            ..self.overlay(over)
        }
    }

    /// Where this phase's jobs compute on `engine`, with what, and how many GPUs each task
    /// asks for: `device` as written, else `cuda` when the phase asks for GPUs
    /// (`resources.gpus_per_task`, else the engine's); `dtype` as written, else `bfloat16` on
    /// CUDA (the precision GPU training uses) and `float32` on the CPU. A CUDA phase on the
    /// local engine that names no GPU count takes one GPU per rank.
    pub fn placement(&self, engine: &EngineSpec) -> Placement {
        let asked = self.resources.as_ref().and_then(|r| r.gpus_per_task);
        let mut gpus_per_task = asked.unwrap_or_else(|| engine.gpus_per_job());
        let device = self.device.unwrap_or(if gpus_per_task > 0 { Device::Cuda } else { Device::Cpu });
        if device == Device::Cuda && asked.is_none() && gpus_per_task == 0 && matches!(engine, EngineSpec::Local { .. }) {
            gpus_per_task = 1;
        }
        let dtype = self.dtype.unwrap_or(match device {
            Device::Cuda => DType::Bfloat16,
            Device::Cpu => DType::Float32,
        });
        Placement { device, dtype, gpus_per_task }
    }

    /// These settings over the defaults ([`TrainArgs::default`]): what the phase's jobs run.
    pub fn resolve(&self) -> TrainArgs {
        let d = TrainArgs::default();
        let lr = self.lr.unwrap_or(d.lr);
        TrainArgs {
            steps: self.steps.unwrap_or(d.steps),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            seq_len: self.seq_len.unwrap_or(d.seq_len),
            grad_accum: self.grad_accum.unwrap_or(d.grad_accum),
            lr,
            min_lr: self.min_lr.unwrap_or(MIN_LR_FRACTION * lr),
            warmup_steps: self.warmup_steps.unwrap_or(d.warmup_steps),
            decay: self.decay.unwrap_or(d.decay),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            betas: self.betas.unwrap_or(d.betas),
            grad_clip: self.grad_clip.or(d.grad_clip),
            seed: self.seed.unwrap_or(d.seed),
            checkpoint_interval: self.checkpoint_interval.unwrap_or(d.checkpoint_interval),
            keep_checkpoints: self.keep_checkpoints.unwrap_or(d.keep_checkpoints),
            eval_interval: self.eval_interval.unwrap_or(d.eval_interval),
            eval_sequences: self.eval_sequences.unwrap_or(d.eval_sequences),
            log_interval: self.log_interval.unwrap_or(d.log_interval),
            aux_loss_coef: self.aux_loss_coef.unwrap_or(d.aux_loss_coef),
            z_loss_coef: self.z_loss_coef.unwrap_or(d.z_loss_coef),
            capacity_factor: self.capacity_factor.or(d.capacity_factor),
            drop_policy: self.drop_policy.unwrap_or(d.drop_policy),
            trainable: self.trainable.clone().unwrap_or(d.trainable),
            trainer: self.trainer.clone().unwrap_or(d.trainer),
            resources: self.resources.clone().unwrap_or(d.resources),
            data_parallel: self.data_parallel.unwrap_or(d.data_parallel),
            expert_parallel: self.expert_parallel.unwrap_or(d.expert_parallel),
        }
    }
}

/// The final learning rate of the cosine decay as a share of the peak, unless `min_lr` is
/// given: 10 %, as Chinchilla (Hoffmann et al. 2022) and Llama train. A job file written by
/// hand keeps the trainer's own default, 0.
pub const MIN_LR_FRACTION: f64 = 0.1;

/// A training phase's settings with every default in place: what its job file is written from.
/// The pipeline's defaults are [`TrainArgs::default`], written once; a block of training
/// parameters ([`TrainParams`]) patches them. Where and in what precision the phase computes depends on
/// the engine too: [`TrainParams::placement`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainArgs {
    pub steps: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub decay: Decay,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub grad_clip: Option<f64>,
    pub seed: u64,
    pub checkpoint_interval: u64,
    pub keep_checkpoints: usize,
    pub eval_interval: u64,
    pub eval_sequences: usize,
    pub log_interval: u64,
    pub aux_loss_coef: f64,
    pub z_loss_coef: f64,
    pub capacity_factor: Option<f64>,
    pub drop_policy: btm_kernels::DropPolicy,
    pub trainable: btm_trainer::spec::Trainable,
    pub trainer: btm_trainer::spec::Trainer,
    pub resources: PhaseResources,
    pub data_parallel: usize,
    pub expert_parallel: usize,
}

impl Default for TrainArgs {
    /// A phase's shape and cadence are the pipeline's (a short run that warms up and keeps
    /// checkpoints to resume from); the optimizer, clipping, validation, logging and MoE losses
    /// are the trainer's own ([`btm_trainer::spec`]).
    fn default() -> Self {
        let (optimizer, moe) = (btm_trainer::spec::Optimizer::default(), btm_trainer::spec::Moe::default());
        let lr = optimizer.lr;
        Self {
            steps: 100,
            batch_size: 8,
            seq_len: 128,
            grad_accum: 1,
            lr,
            min_lr: MIN_LR_FRACTION * lr,
            warmup_steps: 10,
            decay: btm_trainer::spec::Schedule::default().decay,
            weight_decay: optimizer.weight_decay,
            betas: optimizer.betas,
            grad_clip: btm_trainer::spec::default_clip(),
            seed: 0,
            checkpoint_interval: 50,
            keep_checkpoints: btm_trainer::spec::Checkpointing::default().keep,
            eval_interval: 0,
            eval_sequences: btm_trainer::spec::Eval::default().sequences,
            log_interval: btm_trainer::spec::DEFAULT_LOG_INTERVAL,
            aux_loss_coef: moe.aux_loss_coef,
            z_loss_coef: moe.z_loss_coef,
            capacity_factor: moe.capacity_factor,
            drop_policy: moe.drop_policy,
            trainable: Default::default(),
            trainer: Default::default(),
            resources: Default::default(),
            data_parallel: 1,
            expert_parallel: 1,
        }
    }
}

impl TrainArgs {
    /// Tokens one run of these settings consumes.
    pub fn tokens(&self) -> u64 {
        // Saturating: a mistyped size must end in the checks' named errors, not an overflow.
        let per_step = self.batch_size.saturating_mul(self.seq_len).saturating_mul(self.grad_accum);
        self.steps.saturating_mul(u64::try_from(per_step).unwrap_or(u64::MAX))
    }
}

// The routing, router-initialisation, scaling and schedule types are the libraries' own: one
// definition each for the pipeline, the CLI and the job files.
pub use btm_merger::router_init::RouterInit;
pub use btm_merger::scaling::ScalingMode;
pub use btm_model::Routing;
pub use btm_trainer::device::{DType, Device};
pub use btm_trainer::spec::Decay;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeSpec {
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    #[serde(default = "default_routing")]
    pub routing: Routing,
    #[serde(default = "default_router_init")]
    pub router_init: RouterInit,
    /// Calibration tokens per domain (from its `valid` split) for centroid/fit router init.
    #[serde(default = "default_calib_tokens")]
    pub calib_tokens: usize,
    /// Non-expert weights: `average` (BTX), `seed` to keep the seed's (exact when the expert
    /// phase froze them, see `train.trainable`), or `from:<domain>` to copy one expert's.
    #[serde(default = "default_non_expert")]
    pub non_expert: NonExpertSource,
    /// Keep the seed's FFN as an always-on shared expert.
    #[serde(default)]
    pub shared_expert_from_seed: bool,
    /// Router inits to compare with `router_init` (e.g. `[fit]`): the first arm seed's experts
    /// are merged again with each and continued like the main merge, as models
    /// `merged-<init>` and `continued-<init>`.
    #[serde(default)]
    pub also_router_init: Vec<RouterInit>,
}

fn default_top_k() -> usize {
    2
}
fn default_routing() -> Routing {
    Routing::TopkThenSoftmax
}
fn default_router_init() -> RouterInit {
    RouterInit::Centroid
}
fn default_calib_tokens() -> usize {
    btm_merger::calib::CalibOptions::default().max_tokens
}
fn default_non_expert() -> NonExpertSource {
    NonExpertSource::Average
}

/// Where the merged model's non-expert weights come from: `average`, `seed` or
/// `from:<domain>` (that domain's expert).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum NonExpertSource {
    /// The mean of the experts' (BTX).
    Average,
    /// The seed's (exact when the expert phase froze them).
    Seed,
    /// One domain's expert's.
    Expert(String),
}

impl TryFrom<String> for NonExpertSource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        // The merger's grammar (`btm_merger::merge::NonExpert`), `from:` naming a domain here,
        // plus `seed`; weights are a job's, not a pipeline's.
        let expected = || format!("`{s}`: expected `average`, `seed` or `from:<domain>`");
        match s.parse::<btm_merger::merge::NonExpert>() {
            _ if s == "seed" => Ok(NonExpertSource::Seed),
            Ok(btm_merger::merge::NonExpert::Average) => Ok(NonExpertSource::Average),
            Ok(btm_merger::merge::NonExpert::From(domain)) => Ok(NonExpertSource::Expert(domain.to_string_lossy().into_owned())),
            Ok(btm_merger::merge::NonExpert::Weighted(_)) | Err(_) => Err(expected()),
        }
    }
}

impl From<NonExpertSource> for String {
    fn from(s: NonExpertSource) -> String {
        match s {
            NonExpertSource::Average => "average".into(),
            NonExpertSource::Seed => "seed".into(),
            NonExpertSource::Expert(domain) => format!("from:{domain}"),
        }
    }
}

impl JsonSchema for NonExpertSource {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "NonExpertSource".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^(average|seed|from:.+)$",
            "description": "`average`, `seed` or `from:<domain>`"
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpcycleSpec {
    pub experts: usize,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Fine-grained experts: each expert is 1/granularity of the dense FFN.
    #[serde(default = "one")]
    pub granularity: usize,
    #[serde(default = "default_routing")]
    pub routing: Routing,
    /// `exact` (√a on up and down) or `megatron` (a^(1/3) on gate, up and down).
    #[serde(default = "default_scaling")]
    pub scaling: ScalingMode,
    /// Training of the upcycled MoE on the mix, over `experts` ← `continue`. Without `steps`
    /// it trains for as many tokens as the dense baseline (the experts' plus the merged MoE's
    /// continued training), so the arms are compute-matched. The upcycling paper trains with a
    /// high, pre-training-like peak learning rate: set `lr` here.
    #[serde(default)]
    pub train: Option<TrainParams>,
}

fn one() -> usize {
    1
}
fn default_scaling() -> ScalingMode {
    ScalingMode::Exact
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Valid,
    Test,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    #[serde(default = "default_split")]
    pub split: Split,
    #[serde(default = "default_eval_seq_len")]
    pub seq_len: usize,
    /// Documents per domain to score (default: all).
    #[serde(default)]
    pub max_docs: Option<usize>,
    /// Tokens of text per domain to score at most (documents in file order, the last one cut
    /// short; default: all).
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Also train a compute-matched dense baseline: the seed trained on the mix for the same
    /// number of tokens as the experts plus the MoE's continued training.
    #[serde(default)]
    pub baseline: bool,
    /// Also score BTM's own model, the ensemble of the experts (`btm eval --ensemble`): rows
    /// `ensemble` (every expert, mixed by the domain posterior; the prior estimated on each
    /// evaluation domain's `valid` file, uniform without one) and `ensemble-top1`.
    #[serde(default)]
    pub ensemble: bool,
    /// Also score BTM's parameter average (`btm average`): for each evaluation domain, the
    /// experts averaged with that domain's ensemble prior as weights (estimated on its `valid`
    /// file), one dense model per domain, scored on that domain: row `averaged`.
    #[serde(default)]
    pub averaged: bool,
    /// Score every expert on every domain even in a wide run (more than
    /// [`WIDE_RUN_DOMAINS`] domains), where each expert is otherwise scored on its own domain
    /// and the [`CROSS_DOMAIN_SAMPLE`] after it: the full table grows as the square of the
    /// domains.
    #[serde(default)]
    pub full_table: bool,
}

/// Domains above which a run is wide: its experts are scored on a sample of the other domains.
pub const WIDE_RUN_DOMAINS: usize = 16;
/// Other domains each expert of a wide run is scored on.
pub const CROSS_DOMAIN_SAMPLE: usize = 8;

fn default_split() -> Split {
    Split::Test
}
fn default_eval_seq_len() -> usize {
    128
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self {
            split: default_split(),
            seq_len: default_eval_seq_len(),
            max_docs: None,
            max_tokens: None,
            baseline: false,
            ensemble: false,
            averaged: false,
            full_table: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddExperts {
    /// The MoE to extend (default: this run's merged model).
    #[serde(default)]
    pub moe: Option<String>,
    /// The dense model new experts branch from (default: this run's seed).
    #[serde(default)]
    pub base: Option<String>,
    pub domains: Vec<Domain>,
    /// Train each added expert where it will live (DEMix, Gururangan et al. 2022; FlexOlmo):
    /// after `add-expert`, only its FFN and its router row train, inside the otherwise frozen
    /// MoE, on its domain plus a replay of the old ones (`replay`). Settings over `experts`'s;
    /// `trainable` defaults to the new expert and its router row, and the load-balancing loss is
    /// off unless set here (it would pull the old domains' tokens to the new expert).
    #[serde(default)]
    pub train_in_place: Option<TrainParams>,
    /// Share of the in-place training data drawn from the old domains' training text (split
    /// evenly among them): the guard keeps the new router row away from their tokens, and where
    /// no bias-free row can (a first layer's inputs), the new expert learns to serve them. 0.3,
    /// measured: at 0.1 the old domains lost up to 2.2 % (docs/adding-domains.md).
    #[serde(default = "default_replay")]
    pub replay: f64,
    /// While training in place, the replayed old tokens keep the new expert out of their
    /// top-k: its logit is held `margin` below their k-th largest old logit by a squared-hinge
    /// penalty of weight `coef` (`btm train`'s `moe.router_guard`; `coef: 0` leaves the row to
    /// the language-model loss, which pulls old tokens to the new expert wherever it helps them).
    #[serde(default)]
    pub guard: InPlaceGuard,
}

fn default_replay() -> f64 {
    0.3
}

/// `add_experts.guard`: the margin guard while an added expert trains in place.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InPlaceGuard {
    /// Logits by which the new expert stays below an old token's k-th largest old logit.
    #[serde(default = "btm_trainer::spec::default_guard_margin")]
    pub margin: f64,
    /// The penalty's weight.
    #[serde(default = "btm_trainer::spec::default_guard_coef")]
    pub coef: f64,
}

impl Default for InPlaceGuard {
    fn default() -> Self {
        Self { margin: btm_trainer::spec::default_guard_margin(), coef: btm_trainer::spec::default_guard_coef() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_saturate_instead_of_overflowing() {
        let small = TrainArgs { steps: 10, batch_size: 4, seq_len: 32, grad_accum: 2, ..TrainArgs::default() };
        assert_eq!(small.tokens(), 2560);
        let huge = TrainArgs { steps: u64::MAX / 2, batch_size: usize::MAX, ..TrainArgs::default() };
        assert_eq!(huge.tokens(), u64::MAX);
    }

    /// A phase that sets nothing runs the defaults; `min_lr` follows the phase's own `lr`.
    #[test]
    fn train_blocks_patch_the_defaults_written_once() {
        assert_eq!(TrainParams::default().resolve(), TrainArgs::default());
        let t = TrainParams { lr: Some(0.02), warmup_steps: Some(0), ..Default::default() }.resolve();
        assert_eq!((t.lr, t.min_lr, t.warmup_steps, t.steps), (0.02, MIN_LR_FRACTION * 0.02, 0, TrainArgs::default().steps));
        let t = TrainParams { seq_len: Some(64), steps: Some(3), ..Default::default() }.resolve();
        assert_eq!(t.tokens(), 3 * 8 * 64);
    }
}
