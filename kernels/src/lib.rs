//! MoE operators for btm.
//!
//! Everything an MoE layer does besides its experts' matrix multiplies lives here: router
//! top-k selection in both orders, the router's auxiliary losses, and (in later work) the
//! fused token permute/unpermute and grouped GEMM. The functions in [`router`] are the plain
//! reference path built from differentiable candle primitives; fused CPU/CUDA kernels plug in
//! beside them and are tested against them.

pub mod router;

pub use router::{load_balancing_loss, route, z_loss, Routed, Routing};
