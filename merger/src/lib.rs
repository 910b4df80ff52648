//! (being written) Merging experts into an MoE, upcycling, adding experts.
