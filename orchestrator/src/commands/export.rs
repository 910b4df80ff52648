//! `btm export`: write a checkpoint in another runtime's format. `btm export gguf` writes the
//! one-file GGUF that llama.cpp (and what is built on it) loads; see `btm_model::gguf`.

use anyhow::Result;
use btm_model::gguf::{export, ExportOptions, OutType};
use btm_model::Checkpoint;
use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ExportCommand {
    /// A GGUF file for llama.cpp: Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE,
    /// OLMo2 and OLMoE checkpoints with a byte-level BPE tokenizer.
    Gguf(GgufArgs),
}

/// `--outtype`, named as llama.cpp's converter names it.
#[derive(Clone, Copy, ValueEnum)]
pub enum GgufOutType {
    /// Every tensor float32.
    F32,
    /// Matrices float16; norms, biases and routers float32.
    F16,
    /// Matrices bfloat16; norms, biases and routers float32.
    Bf16,
    /// Matrices in ggml's Q8_0 blocks (f16 where a row is not a multiple of 32 wide).
    #[value(name = "q8_0")]
    Q8_0,
}

impl From<GgufOutType> for OutType {
    fn from(t: GgufOutType) -> Self {
        match t {
            GgufOutType::F32 => OutType::F32,
            GgufOutType::F16 => OutType::F16,
            GgufOutType::Bf16 => OutType::Bf16,
            GgufOutType::Q8_0 => OutType::Q8_0,
        }
    }
}

#[derive(Args)]
pub struct GgufArgs {
    /// Model directory or object-store URL.
    #[arg(long)]
    model: String,
    /// The GGUF file to write (written under a temporary name, renamed when complete).
    #[arg(long)]
    out: PathBuf,
    /// Type of the weight matrices. Default, as llama.cpp's converter's `auto`: bf16 for a
    /// bfloat16 checkpoint, f16 otherwise.
    #[arg(long, value_enum)]
    outtype: Option<GgufOutType>,
    /// `general.name` in the file (default: the model folder's name).
    #[arg(long)]
    name: Option<String>,
}

pub fn run(cmd: ExportCommand) -> Result<()> {
    match cmd {
        ExportCommand::Gguf(args) => gguf(args),
    }
}

fn gguf(args: GgufArgs) -> Result<()> {
    let dir = btm_model::storage::local_dir(&args.model)?;
    let ckpt = Checkpoint::open(&dir)?;
    let opts = ExportOptions { outtype: args.outtype.map(OutType::from), name: args.name };
    let summary = export(&ckpt, &args.out, &opts)?;
    for note in &summary.notes {
        eprintln!("note: {note}");
    }
    println!(
        "wrote {} ({} as llama.cpp's `{}`, {}, {} tensors, {} bytes, pre-tokenizer `{}`)",
        args.out.display(),
        ckpt.architecture.class_name(),
        summary.architecture,
        summary.outtype.as_str(),
        summary.tensors,
        summary.bytes,
        summary.pre_tokenizer
    );
    Ok(())
}
