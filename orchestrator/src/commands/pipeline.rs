//! `btm validate` and `btm schema`.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ValidateArgs {
    /// The pipeline YAML.
    pub file: PathBuf,
    /// Override a value: `--set train.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

pub fn validate(args: ValidateArgs) -> Result<()> {
    match crate::pipeline::load(&args.file, &args.sets) {
        Ok(loaded) => {
            let p = &loaded.pipeline;
            println!("{}: ok (run `{}`, {} domains)", args.file.display(), p.name, p.domains.len());
            Ok(())
        }
        Err(errors) => Err(anyhow::Error::new(errors)),
    }
}

pub fn schema() -> Result<()> {
    let schema = schemars::schema_for!(crate::pipeline::Pipeline);
    println!("{}", serde_json::to_string_pretty(&schema)?);
    Ok(())
}
