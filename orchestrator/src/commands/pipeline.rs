//! `btm validate` and `btm schema`.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ValidateArgs {
    /// The pipeline YAML.
    pub file: PathBuf,
    /// Override a value: `--set experts.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

pub fn validate(args: ValidateArgs) -> Result<()> {
    match crate::pipeline::load(&args.file, &args.sets) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            let p = &loaded.pipeline;
            println!("{}: ok (run `{}`, {} domains)", args.file.display(), p.name, p.domains.len());
            Ok(())
        }
        Err(errors) => Err(anyhow::Error::new(errors)),
    }
}

/// Which file `btm schema` describes: a pipeline, or a job file of one kind.
#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
pub enum SchemaKind {
    /// A pipeline YAML.
    #[default]
    Pipeline,
    /// `btm train --job FILE`.
    Train,
    /// `btm merge --spec FILE`.
    Merge,
    /// `btm upcycle --spec FILE`.
    Upcycle,
    /// `btm add-expert --spec FILE`.
    AddExpert,
    /// `btm remove-expert --spec FILE`.
    RemoveExpert,
    /// `btm eval --spec FILE`.
    Eval,
    /// `btm average --spec FILE`.
    Average,
    /// `btm tokenizer train --spec FILE`.
    Tokenizer,
    /// `btm cluster --spec FILE`.
    Cluster,
}

/// Print the JSON Schema of a pipeline or of one kind of job file.
pub fn schema(kind: SchemaKind) -> Result<()> {
    use schemars::schema_for;
    let schema = match kind {
        SchemaKind::Pipeline => schema_for!(crate::pipeline::Pipeline),
        SchemaKind::Train => schema_for!(btm_trainer::JobSpec),
        SchemaKind::Merge => schema_for!(btm_merger::MergeSpec),
        SchemaKind::Upcycle => schema_for!(btm_merger::UpcycleSpec),
        SchemaKind::AddExpert => schema_for!(btm_merger::AddExpertSpec),
        SchemaKind::RemoveExpert => schema_for!(btm_merger::RemoveExpertSpec),
        SchemaKind::Eval => schema_for!(btm_trainer::jobs::EvalBatch),
        SchemaKind::Average => schema_for!(btm_trainer::jobs::AverageSpec),
        SchemaKind::Tokenizer => schema_for!(btm_trainer::jobs::TokenizerSpec),
        SchemaKind::Cluster => schema_for!(btm_cluster::ClusterSpec),
    };
    println!("{}", serde_json::to_string_pretty(&schema)?);
    Ok(())
}
