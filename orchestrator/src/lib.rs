//! The library behind the `btm` command: its subcommands, pipelines, plans, engines and
//! reports. The binary (`main.rs`) only parses the command line and dispatches here; the
//! modules are public so that the fuzz harness (`fuzz/`, through [`fuzz_targets`]) and tests
//! can call the readers directly.

pub mod commands;
pub mod engine;
pub mod executor;
pub mod fuzz_targets;
pub mod inputs;
pub mod pipeline;
pub mod plan;
pub mod report;
/// YAML read with bounds (in btm-model, so that `btm train --job` reads job files the same way).
pub use btm_model::yaml;
