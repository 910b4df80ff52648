//! `btm inspect`: what a checkpoint is.

use anyhow::Result;
use btm_model::Checkpoint;
use clap::Args;

#[derive(Args)]
pub struct InspectArgs {
    /// Model directory or object-store URL.
    #[arg(long)]
    model: String,
    /// Print the parsed config and lineage as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let dir = btm_model::storage::local_dir(&args.model)?;
    let ckpt = Checkpoint::open(&dir)?;
    let cfg = &ckpt.config;
    let lineage = ckpt.lineage()?;
    if args.json {
        let v = serde_json::json!({
            "architecture": ckpt.architecture.class_name(),
            "dtype": format!("{:?}", ckpt.dtype()),
            "parameters": cfg.num_parameters(),
            "active_parameters": cfg.num_active_parameters(),
            "config": cfg,
            "lineage": lineage,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{} ({:?})", ckpt.architecture.class_name(), ckpt.dtype());
    println!(
        "  {} layers, hidden {}, {} heads ({} kv, head_dim {}), vocab {}",
        cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    );
    match &cfg.moe {
        None => println!("  dense SwiGLU FFN {}", cfg.intermediate_size),
        Some(m) => println!(
            "  MoE: {} experts of width {}, top-{}, {}{}",
            m.experts,
            m.expert_ffn,
            m.top_k,
            m.routing.as_str(),
            m.shared_expert.as_ref().map(|s| format!(", shared expert {}", s.ffn)).unwrap_or_default()
        ),
    }
    println!("  parameters {} (active per token {})", cfg.num_parameters(), cfg.num_active_parameters());
    if let Some(l) = lineage {
        println!("  lineage: {} by {}, {} parent(s)", l.kind, l.tool, l.parents.len());
    }
    Ok(())
}
