//! The expert trainer: trains a dense expert or an MoE model from a checkpoint on one or more
//! JSONL sources, resumably and exactly.
//!
//! - [`spec`]: the job file (`btm train --job JOB.yaml`), strictly parsed and validated.
//! - [`data`]: tokenize → cache → pack → deterministic weighted shuffle; a [`data::Position`]
//!   is all the data state there is.
//! - [`state`]: the weights as candle `Var`s, from a checkpoint or a seeded random init.
//! - [`loss`]: cross-entropy, fused on the CPU.
//! - [`optim`], [`schedule`]: AdamW with decoupled weight decay, clipping, warmup + cosine.
//! - [`checkpoint`]: atomic, manifest-verified checkpoints with optimizer and data state.
//! - [`train`]: the loop; [`outcome`]: how a run ended and its model's lineage; [`metrics`]:
//!   `metrics.jsonl` and progress lines; [`signals`]: SIGINT/SIGTERM → checkpoint and exit.
//! - [`remote`]: mirroring checkpoints, metrics and the model to an object store.
//! - [`bench`]: `btm bench train`.

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod device_check;
pub mod distributed;
pub mod external;
pub mod fuzz_targets;
pub mod indexed;
pub mod jobs;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod outcome;
pub mod remote;
pub mod schedule;
pub mod signals;
pub mod sources;
pub mod spec;
pub mod state;
pub mod tensorboard;
pub mod train;

pub use outcome::Outcome;
pub use spec::JobSpec;
pub use train::{run, Options};
