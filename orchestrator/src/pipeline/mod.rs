//! Pipelines: the YAML a user writes ([`spec`]) and how it is loaded and checked ([`load`]).

pub mod load;
pub mod spec;

pub use load::load;
pub use spec::Pipeline;
