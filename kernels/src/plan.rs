//! The host-side plans the MoE ops share between their CPU and CUDA sides: where each routed
//! assignment lives in the expert-sorted buffer ([`RoutePlan`]) and which of the grouped
//! products runs ([`Kind`]).
//!
//! A leaf of the crate's modules (it uses none of them), so the ops (`permute.rs`,
//! `grouped_gemm.rs`) and their CUDA launchers (`cuda_ops/`) can all read it without importing
//! one another in a cycle.

use candle_core::{Device, Result, Tensor};

/// Marks a dropped slot in [`RoutePlan::slot_rows`].
pub const DROPPED: u32 = u32::MAX;

/// Where each routed assignment lives in the expert-sorted buffer, and back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    tokens: usize,
    top_k: usize,
    /// [E+1] start of each expert's rows; the last entry is the number of kept assignments N.
    offsets: Vec<u32>,
    /// [N] the slot `t·k + j` of each permuted row.
    rows: Vec<u32>,
    /// [T·k] the permuted row of each slot, or [`DROPPED`].
    slot_rows: Vec<u32>,
}

impl RoutePlan {
    /// Plan for `experts` (row-major [T, k] expert indices); `keep` (same shape) marks the
    /// assignments that survive the capacity limit, `None` = dropless.
    pub fn new(experts: &[u32], top_k: usize, num_experts: usize, keep: Option<&[bool]>) -> Result<Self> {
        if top_k == 0 || !experts.len().is_multiple_of(top_k) {
            candle_core::bail!("route plan: {} assignments is not a multiple of k = {top_k}", experts.len());
        }
        if let Some(keep) = keep {
            if keep.len() != experts.len() {
                candle_core::bail!("route plan: keep mask has {} entries, expected {}", keep.len(), experts.len());
            }
        }
        let kept = |s: usize| keep.is_none_or(|k| k[s]);
        let mut counts = vec![0u32; num_experts];
        for (s, &e) in experts.iter().enumerate() {
            if e as usize >= num_experts {
                candle_core::bail!("route plan: expert index {e} out of range for {num_experts} experts");
            }
            if kept(s) {
                counts[e as usize] += 1;
            }
        }
        let mut offsets = Vec::with_capacity(num_experts + 1);
        let mut total = 0u32;
        offsets.push(total);
        for c in &counts {
            total += c;
            offsets.push(total);
        }
        let mut next: Vec<u32> = offsets[..num_experts].to_vec();
        let mut rows = vec![0u32; total as usize];
        let mut slot_rows = vec![DROPPED; experts.len()];
        for (s, &e) in experts.iter().enumerate() {
            if kept(s) {
                let r = next[e as usize];
                next[e as usize] += 1;
                rows[r as usize] = s as u32;
                slot_rows[s] = r;
            }
        }
        Ok(Self { tokens: experts.len() / top_k, top_k, offsets, rows, slot_rows })
    }

    /// Plan from a [T, k] u32 tensor of expert indices and an optional keep mask.
    pub fn from_tensor(experts: &Tensor, num_experts: usize, keep: Option<&[bool]>) -> Result<Self> {
        let (_, k) = experts.dims2()?;
        Self::new(&experts.flatten_all()?.to_vec1::<u32>()?, k, num_experts, keep)
    }

    /// Number of tokens T routed.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// Experts k per token (the plan has T·k slots).
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    /// Number of experts E (groups).
    pub fn num_experts(&self) -> usize {
        self.offsets.len() - 1
    }
    /// Number of kept assignments N (rows of the permuted buffer).
    pub fn kept(&self) -> usize {
        self.rows.len()
    }
    /// Number of assignments dropped by the capacity limit.
    pub fn dropped(&self) -> usize {
        self.tokens * self.top_k - self.kept()
    }
    /// [E+1] row offsets of each expert's group.
    pub fn offsets(&self) -> &[u32] {
        &self.offsets
    }
    /// [N] slot of each permuted row.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }
    /// [T·k] permuted row of each slot, or [`DROPPED`].
    pub fn slot_rows(&self) -> &[u32] {
        &self.slot_rows
    }
    /// Kept assignments per expert.
    pub fn group_sizes(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| (w[1] - w[0]) as usize).collect()
    }
    /// The offsets as a [E+1] u32 tensor, the form [`crate::grouped_matmul`] takes.
    pub fn offsets_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_slice(&self.offsets, self.offsets.len(), device)
    }
}

/// Which product of the grouped GEMM (see `grouped_gemm.rs`) runs over the groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// (X [N,K], W [E,M,K]) → X_e · W_eᵀ [N, M]
    Forward,
    /// (dY [N,M], W [E,M,K]) → dY_e · W_e [N, K]
    InputGrad,
    /// (dY [N,M], X [N,K]) → dY_eᵀ · X_e [E, M, K]
    WeightGrad,
}
