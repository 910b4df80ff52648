//! (being written) The expert trainer.
