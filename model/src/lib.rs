//! btm's model core.
//!
//! Everything in btm reads, runs and writes models through this crate: the model's shape
//! ([`config`]), its tensors and their Hugging Face names ([`weights`]), the transformer
//! itself in candle ([`model`]), checkpoints in Hugging Face layout ([`checkpoint`]),
//! `MANIFEST.json` ([`manifest`]) and `btm.json` lineage ([`lineage`]), tokenizers
//! ([`tokenizer`]), perplexity ([`eval`]) and object-store URLs ([`storage`]).
//!
//! # Publishing
//!
//! Nothing btm writes is ever seen half-written. Files and folders are written under a hidden
//! temporary sibling and renamed into place ([`publish::write_file`], [`publish::StagingFile`],
//! [`publish::StagingDir`]); a folder's `MANIFEST.json` (size and SHA-256 of every file) is
//! written last inside it ([`checkpoint::write_checkpoint`]), and to an object store it is
//! uploaded last ([`folder::Folder::upload_dir`]), so a reader that finds the manifest finds
//! every file it lists. btm's local cache is [`folder::cache_root`].

#![warn(missing_docs)]

pub mod card;
pub mod checkpoint;
pub mod config;
pub mod dtype;
pub mod ensemble;
pub mod error;
pub mod eval;
pub mod folder;
pub mod fuzz_targets;
pub mod gguf;
pub mod jsonl;
pub mod lineage;
pub mod manifest;
pub mod model;
pub mod publish;
pub mod storage;
pub mod tokenizer;
pub mod weights;
pub mod yaml;

pub use btm_kernels::Routing;
pub use checkpoint::{write_checkpoint, write_checkpoint_files, write_checkpoint_part, Checkpoint, Extras, WriteOptions, WriterPart};
pub use config::{Architecture, ModelConfig, MoeConfig, RopeScaling, SharedExpertConfig};
pub use dtype::DType;
pub use error::{Error, Result};
pub use lineage::Lineage;
pub use manifest::Manifest;
pub use model::Transformer;
