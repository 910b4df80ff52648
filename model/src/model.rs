//! A Llama-family decoder-only transformer in candle, dense or Mixture-of-Experts.
//!
//! Read top to bottom: RMSNorm → rotary embeddings → grouped-query attention → SwiGLU FFN or
//! MoE block → decoder layer → the whole model. The same code serves evaluation and training.
//! Each block is written twice, side by side: from differentiable candle primitives (any device
//! and dtype; candle's own fused `RmsNorm`, `softmax_last_dim` and `rope` kernels are detached
//! from the autograd graph, so they are not used), and, on the CPU in float32/float64, through
//! the fused `btm-kernels` ops with hand-written backward passes (one graph node per norm,
//! attention and SwiGLU instead of chains of ten or twenty), which is what makes CPU training
//! fast. On CUDA (the `cuda` feature of `btm-kernels`) RMSNorm, SwiGLU, the attention's causal
//! softmax and the MoE layer run as the same ops' CUDA kernels, the matrix products as cuBLAS's.
//! The model holds one [`Kernels`] policy ([`Transformer::set_kernels`]) that picks between the
//! two, on the CPU too, and every block asks it (`Kernels::fuses`) rather than testing devices
//! and dtypes itself; a test checks both give the same logits and gradients. Between layers the
//! residual stream is kept as [B·T, H] rows: a reshape is a graph node whose gradient costs a
//! pass of its own. Numerics follow transformers' eager implementation: RMSNorm and attention
//! softmax in float32, router in float32.

use crate::config::{ModelConfig, MoeConfig, RopeScaling};
use btm_kernels::{route, Capacity, ExpertShard, ExpertWeights, MoeOptions, Routed, Routing};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

/// Which implementation the model's blocks run: the fused `btm-kernels` ops (one graph node
/// with a hand-written backward each) or chains of candle primitives (the reference the kernels
/// are tested against). A [`Transformer`] holds one and hands it to every block's forward pass;
/// `Kernels::fuses` is the one place that decides, per block and tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    /// Norms, attention and SwiGLUs (dense, shared, and the routed experts of the reference
    /// loop) through the fused ops where they serve the tensor (CPU in float32/float64; CUDA in
    /// float32/bfloat16 with the `cuda` feature); `false`: the primitive chains everywhere.
    pub fused_ops: bool,
    /// MoE layers through the fused layer where [`btm_kernels::fused_ops_on`] the device;
    /// `false`: the plain loop over experts. Expert-parallel layers take the fused layer always.
    pub fused_moe: bool,
}

impl Kernels {
    /// The fused ops and the fused MoE layer wherever they apply: the default.
    pub const FUSED: Self = Self { fused_ops: true, fused_moe: true };

    /// Whether `op` on `xs` runs through the fused kernels: the policy asks for them and they
    /// serve `xs`'s device and dtype.
    fn fuses(self, op: Op, xs: &Tensor) -> bool {
        match op {
            Op::RmsNorm | Op::SwiGlu => self.fused_ops && (fused_cpu(xs) || fused_gpu(xs)),
            Op::Attention => self.fused_ops && fused_cpu(xs),
            Op::CausalSoftmax => self.fused_ops && fused_gpu(xs),
            Op::Moe => self.fused_moe && btm_kernels::fused_ops_on(xs.device()),
        }
    }
}

impl Default for Kernels {
    fn default() -> Self {
        Self::FUSED
    }
}

/// The blocks that have a fused form, as `Kernels::fuses` tells them apart.
#[derive(Debug, Clone, Copy)]
enum Op {
    RmsNorm,
    SwiGlu,
    /// The whole attention map in one op (CPU).
    Attention,
    /// The attention's scale, mask and softmax in one kernel, the products cuBLAS's (CUDA).
    CausalSoftmax,
    /// The routed experts: the fused layer instead of the loop over experts.
    Moe,
}

/// Whether the fused CPU kernels of `btm-kernels` (one graph node with a hand-written backward
/// per norm, rotary map, attention and SwiGLU, instead of chains of candle primitives) serve a
/// tensor: CPU storage in float32 or float64. Other devices and dtypes use the primitives.
fn fused_cpu(xs: &Tensor) -> bool {
    xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64)
}

/// Whether the CUDA kernels of `btm-kernels` serve a tensor: CUDA storage in float32 or
/// bfloat16, in a build with the `cuda` feature. They fuse RMSNorm, SwiGLU and the attention's
/// causal softmax (the attention's products stay cuBLAS's); RMSNorm and softmax run in float32.
fn fused_gpu(xs: &Tensor) -> bool {
    xs.device().is_cuda() && btm_kernels::fused_ops_on(xs.device()) && matches!(xs.dtype(), DType::F32 | DType::BF16)
}

/// Root-mean-square layer norm (Zhang & Sennrich 2019), computed in float32 as Llama does.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// A norm over the last dimension of width `size`, its gain `vb`'s `weight`, shape `[size]`.
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }

    /// The norm of `xs` with the implementation `kernels` picks.
    pub fn forward_with(&self, xs: &Tensor, kernels: Kernels) -> Result<Tensor> {
        if kernels.fuses(Op::RmsNorm, xs) && self.weight.dtype() == xs.dtype() {
            return btm_kernels::rms_norm(xs, &self.weight, self.eps);
        }
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let inv_rms = (xs.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        xs.broadcast_mul(&inv_rms)?.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

impl Module for RmsNorm {
    /// The norm with the default [`Kernels`].
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, Kernels::FUSED)
    }
}

/// Rotary position embeddings (Su et al. 2021) with the `rotate_half` convention of
/// Hugging Face Llama checkpoints, and Llama 3.1's frequency scaling.
#[derive(Debug, Clone)]
pub struct Rotary {
    /// Inverse frequencies, [head_dim / 2], float32.
    inv_freq: Vec<f32>,
}

impl Rotary {
    /// The inverse frequencies for `cfg`'s `head_dim`, `rope_theta` and `rope_scaling`.
    pub fn new(cfg: &ModelConfig) -> Self {
        let dim = cfg.head_dim;
        // float32 throughout, as transformers computes them.
        let base = cfg.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
        if let Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) = &cfg.rope_scaling
        {
            let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
            let old_ctx = *original_max_position_embeddings as f32;
            let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old_ctx / wavelen - low) / (high - low);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        Self { inv_freq }
    }

    /// cos and sin tables for positions 0..seq_len, [seq_len, head_dim], float32.
    pub fn tables(&self, seq_len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(seq_len * half * 2);
        for pos in 0..seq_len {
            let row: Vec<f32> = self.inv_freq.iter().map(|f| f * pos as f32).collect();
            angles.extend_from_slice(&row);
            angles.extend_from_slice(&row);
        }
        let angles = Tensor::from_vec(angles, (seq_len, half * 2), device)?;
        Ok((angles.cos()?, angles.sin()?))
    }
}

/// x·cos + rotate_half(x)·sin for x of shape [B, H, T, D].
fn apply_rotary(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = xs.dim(D::Minus1)? / 2;
    let x1 = xs.narrow(D::Minus1, 0, half)?;
    let x2 = xs.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let (cos, sin) = (cos.to_dtype(xs.dtype())?, sin.to_dtype(xs.dtype())?);
    xs.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Additive attention mask [T, T]: 0 where query i may see key j (j ≤ i, and i − j < window
/// with sliding-window attention), −∞ elsewhere.
pub fn causal_mask(seq_len: usize, sliding_window: Option<usize>, device: &Device) -> Result<Tensor> {
    let window = sliding_window.unwrap_or(usize::MAX);
    let mask: Vec<f32> =
        (0..seq_len).flat_map(|i| (0..seq_len).map(move |j| if j <= i && i - j < window { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)
}

/// The additive causal mask of one forward pass, built the first time an attention layer needs
/// it: the fused attention kernels (CPU, and the causal softmax on CUDA) mask by index and never
/// do, so a fused pass makes no [T, T] mask at all.
pub struct CausalMask<'a> {
    seq_len: usize,
    sliding_window: Option<usize>,
    device: &'a Device,
    mask: std::cell::OnceCell<Tensor>,
}

impl<'a> CausalMask<'a> {
    /// The mask [`causal_mask`] would make, not made yet.
    pub fn new(seq_len: usize, sliding_window: Option<usize>, device: &'a Device) -> Self {
        Self { seq_len, sliding_window, device, mask: std::cell::OnceCell::new() }
    }

    /// The mask, made on the first call.
    pub fn get(&self) -> Result<&Tensor> {
        if let Some(mask) = self.mask.get() {
            return Ok(mask);
        }
        let mask = causal_mask(self.seq_len, self.sliding_window, self.device)?;
        Ok(self.mask.get_or_init(|| mask))
    }
}

/// Softmax over the last dimension from differentiable primitives.
pub fn softmax_last(xs: &Tensor) -> Result<Tensor> {
    btm_kernels::router::softmax_last(xs)
}

/// `y = x Wᵀ + b` over the last dimension. Leading dimensions are flattened into one so that
/// both the forward product and the weight gradient are single GEMMs over all B·T rows
/// (`candle_nn::Linear` broadcasts W over the batch, so its weight gradient is B products and a
/// reduction).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// From `weight` `[out, in]` and an optional `bias` `[out]` (`nn.Linear` layout).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight W [out, in].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut dims = xs.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(1);
        // Rows go in as they are: a reshape is a graph node with a gradient pass of its own.
        let rows = if xs.rank() == 2 { xs.clone() } else { xs.reshape(((), in_dim))? };
        let mut ys = rows.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            ys = ys.broadcast_add(b)?;
        }
        if xs.rank() == 2 {
            return Ok(ys);
        }
        dims.push(self.weight.dim(0)?);
        ys.reshape(dims)
    }
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
    Ok(Linear::new(weight, bias))
}

/// Grouped-query attention (Ainslie et al. 2023): `num_kv_heads` key/value heads shared by
/// groups of query heads.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3's RMSNorms over each query and key head (width `head_dim`), before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    /// The q/k norms span the whole projection (OLMo), not one head.
    qk_norm_full: bool,
    /// OLMoE's clamp of q, k and v to [-c, c], after the q/k norms.
    clip_qkv: Option<f64>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

impl Attention {
    /// One layer's attention from `vb`'s `{q,k,v,o}_proj.{weight,bias}`, shaped by `cfg`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        Ok(Self {
            q_proj: linear(h, cfg.num_heads * d, cfg.qkv_bias, vb.pp("q_proj"))?,
            k_proj: linear(h, cfg.num_kv_heads * d, cfg.qkv_bias, vb.pp("k_proj"))?,
            v_proj: linear(h, cfg.num_kv_heads * d, cfg.qkv_bias, vb.pp("v_proj"))?,
            o_proj: linear(cfg.num_heads * d, h, cfg.o_bias, vb.pp("o_proj"))?,
            qk_norm: if cfg.qk_norm {
                let (qw, kw) = if cfg.qk_norm_full { (cfg.num_heads * d, cfg.num_kv_heads * d) } else { (d, d) };
                Some((RmsNorm::new(qw, cfg.rms_norm_eps, vb.pp("q_norm"))?, RmsNorm::new(kw, cfg.rms_norm_eps, vb.pp("k_norm"))?))
            } else {
                None
            },
            qk_norm_full: cfg.qk_norm_full,
            clip_qkv: cfg.clip_qkv,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: d,
            sliding_window: cfg.sliding_window,
        })
    }

    /// Attention over token rows `xs` [B·T, H] of `b` sequences of `t` tokens, with the
    /// implementation `kernels` picks; returns [B·T, H].
    pub fn forward(
        &self,
        xs: &Tensor,
        (b, t): (usize, usize),
        cos: &Tensor,
        sin: &Tensor,
        mask: &CausalMask,
        kernels: Kernels,
    ) -> Result<Tensor> {
        if kernels.fuses(Op::Attention, xs) {
            return self.forward_fused(xs, t, cos, sin);
        }
        let xs = &xs.reshape((b, t, ()))?;
        let heads = |proj: &Linear, n: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let mut x = proj.forward(xs)?;
            match norm {
                Some(norm) if self.qk_norm_full => x = norm.forward_with(&x, kernels)?.reshape((b, t, n, self.head_dim))?,
                Some(norm) => x = norm.forward_with(&x.reshape((b, t, n, self.head_dim))?, kernels)?,
                None => x = x.reshape((b, t, n, self.head_dim))?,
            }
            if let Some(c) = self.clip_qkv {
                x = x.clamp(-c, c)?;
            }
            x.transpose(1, 2)?.contiguous()
        };
        let (q_norm, k_norm) = self.qk_norm.as_ref().map(|(q, k)| (q, k)).unzip();
        let q = apply_rotary(&heads(&self.q_proj, self.num_heads, q_norm)?, cos, sin)?;
        let k = apply_rotary(&heads(&self.k_proj, self.num_kv_heads, k_norm)?, cos, sin)?;
        let v = heads(&self.v_proj, self.num_kv_heads, None)?;
        let group = self.num_heads / self.num_kv_heads;
        let (k, v) = (repeat_kv(&k, group)?, repeat_kv(&v, group)?);

        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let probs = if kernels.fuses(Op::CausalSoftmax, &q) {
            // Scale, causal mask and softmax in one kernel, the [T, T] scores kept in q's dtype.
            btm_kernels::causal_softmax(&q.matmul(&k.t()?)?, scale, self.sliding_window)?
        } else {
            let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?.broadcast_add(mask.get()?)?;
            softmax_last(&scores)?.to_dtype(v.dtype())?
        };
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * t, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

impl Attention {
    /// The same map through the fused CPU kernels: q, k and v come out of one product (the
    /// three weights stacked) in [B·T, (heads + 2·kv_heads)·D] rows, which one op rotates and
    /// attends over (no transposes, no repeated key/value heads, no mask tensor).
    fn forward_fused(&self, xs: &Tensor, t: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = self.head_dim;
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj];
        let weight = Tensor::cat(&projections.map(|p| p.weight()), 0)?;
        let mut qkv = xs.matmul(&weight.t()?)?;
        if let [Some(bq), Some(bk), Some(bv)] = projections.map(|p| p.bias.as_ref()) {
            qkv = qkv.broadcast_add(&Tensor::cat(&[bq, bk, bv], 0)?)?;
        } else if projections.iter().any(|p| p.bias.is_some()) {
            candle_core::bail!("attention: q, k and v projections must all have biases or none");
        }
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            // Each head's D columns normalised as rows of width D (Qwen3), or the whole
            // projection as one row (OLMo), before the op rotates them.
            let rows = qkv.dim(0)?;
            let (hq, hk) = (self.num_heads * d, self.num_kv_heads * d);
            let norm = |norm: &RmsNorm, start: usize, width: usize| -> Result<Tensor> {
                let row = if self.qk_norm_full { width } else { d };
                let x = qkv.narrow(1, start, width)?.contiguous()?.reshape((rows * width / row, row))?;
                norm.forward_with(&x, Kernels::FUSED)?.reshape((rows, width))
            };
            let (q, k) = (norm(q_norm, 0, hq)?, norm(k_norm, hq, hk)?);
            qkv = Tensor::cat(&[&q, &k, &qkv.narrow(1, hq + hk, hk)?], 1)?;
        }
        if let Some(c) = self.clip_qkv {
            qkv = qkv.clamp(-c, c)?;
        }
        let shape = btm_kernels::AttentionShape {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: d,
            scale: 1.0 / (d as f64).sqrt(),
            window: self.sliding_window,
        };
        self.o_proj.forward(&btm_kernels::causal_attention(&qkv, t, shape, cos, sin)?)
    }
}

/// [B, n_kv, T, D] → [B, n_kv · group, T, D], each key/value head repeated `group` times.
fn repeat_kv(xs: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(xs.clone());
    }
    let (b, n, t, d) = xs.dims4()?;
    xs.unsqueeze(2)?.expand((b, n, group, t, d))?.reshape((b, n * group, t, d))
}

/// The SwiGLU feed-forward network (Shazeer 2020): down(silu(gate(x)) ⊙ up(x)).
#[derive(Debug, Clone)]
pub struct SwiGlu {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl SwiGlu {
    /// H → F → H from `vb`'s `{gate,up,down}_proj.weight` ([F, H], [F, H], [H, F]), no biases.
    pub fn new(hidden: usize, ffn: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate_proj: linear(hidden, ffn, false, vb.pp("gate_proj"))?,
            up_proj: linear(hidden, ffn, false, vb.pp("up_proj"))?,
            down_proj: linear(ffn, hidden, false, vb.pp("down_proj"))?,
        })
    }

    /// Its weights as an MoE expert: gate, up [F, H] and down [H, F].
    fn weights(&self) -> btm_kernels::moe::ExpertRef<'_> {
        (self.gate_proj.weight(), self.up_proj.weight(), self.down_proj.weight())
    }

    /// The FFN on `xs` with the implementation `kernels` picks.
    pub fn forward_with(&self, xs: &Tensor, kernels: Kernels) -> Result<Tensor> {
        if kernels.fuses(Op::SwiGlu, xs) && xs.rank() == 2 {
            // Gate and up as one product: the input's gradient is then one GEMM, not two
            // GEMMs and a sum.
            let gate_up = Tensor::cat(&[self.gate_proj.weight(), self.up_proj.weight()], 0)?;
            let h = btm_kernels::swiglu_packed(&xs.matmul(&gate_up.t()?)?)?;
            return self.down_proj.forward(&h);
        }
        let gate = self.gate_proj.forward(xs)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
    }
}

impl Module for SwiGlu {
    /// The FFN with the default [`Kernels`].
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, Kernels::FUSED)
    }
}

/// The name, under an MoE layer's `experts`, of all experts' gate and up weights stacked
/// [E, 2F, H] (expert e's F gate rows, then its F up rows), as transformers 5 keeps Mixtral's
/// experts in memory and btm's trainer keeps them in its state.
pub const STACKED_GATE_UP: &str = "gate_up_proj";
/// The name, under an MoE layer's `experts`, of all experts' down weights stacked [E, H, F].
pub const STACKED_DOWN: &str = "down_proj";

/// An MoE layer's routed experts: one SwiGLU per expert, as checkpoints name them
/// (`experts.{e}.{gate,up,down}_proj.weight`), or all of them stacked in two tensors
/// ([`STACKED_GATE_UP`], [`STACKED_DOWN`]), which the fused layer uses without copying and
/// the trainer keeps (one parameter per layer instead of 3·E, no stacking per step).
#[derive(Debug, Clone)]
enum Experts {
    Each(Vec<SwiGlu>),
    Stacked(ExpertWeights),
}

impl Experts {
    /// One SwiGLU per expert (views into stacked weights; gradients flow back to them).
    fn each(&self) -> Result<Vec<SwiGlu>> {
        match self {
            Experts::Each(experts) => Ok(experts.clone()),
            Experts::Stacked(w) => {
                let (e, f, _) = w.dims()?;
                (0..e)
                    .map(|i| {
                        let gate_up = w.gate_up.get(i)?;
                        Ok(SwiGlu {
                            gate_proj: Linear::new(gate_up.narrow(0, 0, f)?, None),
                            up_proj: Linear::new(gate_up.narrow(0, f, f)?, None),
                            down_proj: Linear::new(w.down.get(i)?, None),
                        })
                    })
                    .collect()
            }
        }
    }
}

/// What an MoE layer's router did for one forward pass.
#[derive(Debug, Clone)]
pub struct RouterOutput {
    /// [T, E] router logits, float32.
    pub logits: Tensor,
    /// Each token's top-k experts and weights, and the softmax over all E (before any drops).
    pub routed: Routed,
    /// Token-expert assignments dropped by the capacity limit (0 when dropless).
    pub dropped: usize,
}

impl RouterOutput {
    /// Switch load-balancing loss `E · Σ_i f_i · P_i`, without its coefficient.
    pub fn load_balancing_loss(&self) -> Result<Tensor> {
        btm_kernels::load_balancing_loss(&self.routed.probs, &self.routed.experts)
    }

    /// Router z-loss `mean(logsumexp(logits)²)`, without its coefficient.
    pub fn z_loss(&self) -> Result<Tensor> {
        btm_kernels::z_loss(&self.logits)
    }

    /// Share of the T·k token-expert assignments that the capacity limit dropped.
    pub fn dropped_fraction(&self) -> Result<f64> {
        Ok(self.dropped as f64 / self.routed.experts.elem_count().max(1) as f64)
    }

    /// Share of the token-expert assignments each expert received.
    pub fn expert_load(&self) -> Result<Vec<f32>> {
        let e = self.logits.dim(1)?;
        let counts = btm_kernels::router::expert_counts(&self.routed.experts, e)?;
        let total: f32 = counts.iter().sum::<f32>().max(1.0);
        Ok(counts.into_iter().map(|c| c / total).collect())
    }
}

/// A Mixture-of-Experts FFN: a float32 router picks `top_k` of E SwiGLU experts per token;
/// an optional shared expert (Qwen2-MoE) sees every token, optionally behind a sigmoid gate.
///
/// On the CPU, and on CUDA in builds with the `cuda` feature, the block runs the fused kernels
/// of `btm-kernels` (permute, grouped GEMM, unpermute; optional capacity limit with token
/// dropping). Elsewhere, and on request, it runs
/// the plain reference path (a loop over experts with `index_select`/`index_add`, dropless),
/// which the fused kernels are tested against.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// Router weight [E, H]; applied in float32.
    router: Tensor,
    experts: Experts,
    shared_expert: Option<SwiGlu>,
    shared_expert_gate: Option<Linear>,
    top_k: usize,
    routing: Routing,
    /// Expert capacity (fused path only); `None` = dropless.
    capacity: Option<Capacity>,
    /// Expert parallelism: this rank holds only `shard.local()` of the experts, and tokens go
    /// to the others' by all-to-all ([`btm_kernels::expert_parallel_moe`]).
    shard: Option<ExpertShard>,
}

impl MoeBlock {
    /// An MoE layer holding all its experts, from `vb` (`gate.weight` [E, H], then the experts
    /// per expert or stacked, and the shared expert if `moe` has one).
    pub fn new(hidden: usize, moe: &MoeConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_sharded(hidden, moe, vb, None)
    }

    /// An MoE layer of which this rank holds the experts `shard.local()`, stacked (indices
    /// relative to the shard); `None` = all experts.
    pub fn new_sharded(hidden: usize, moe: &MoeConfig, vb: VarBuilder, shard: Option<&ExpertShard>) -> Result<Self> {
        let router = vb.pp("gate").get((moe.experts, hidden), "weight")?;
        let f = moe.expert_ffn;
        let e = match shard {
            Some(s) if s.experts != moe.experts => {
                candle_core::bail!("expert shard of {} experts for a layer of {}", s.experts, moe.experts)
            }
            Some(s) => s.per_rank(),
            None => moe.experts,
        };
        let stacked = vb.pp("experts");
        if shard.is_some() && !stacked.contains_tensor(STACKED_GATE_UP) {
            candle_core::bail!("an expert-parallel layer needs its experts stacked ({STACKED_GATE_UP}, {STACKED_DOWN})");
        }
        let experts = if stacked.contains_tensor(STACKED_GATE_UP) {
            Experts::Stacked(ExpertWeights {
                gate_up: stacked.get((e, 2 * f, hidden), STACKED_GATE_UP)?,
                down: stacked.get((e, hidden, f), STACKED_DOWN)?,
            })
        } else {
            let each = (0..e).map(|i| SwiGlu::new(hidden, f, vb.pp("experts").pp(i))).collect::<Result<Vec<_>>>()?;
            let refs: Vec<_> = each.iter().map(SwiGlu::weights).collect();
            if refs.iter().any(|(g, u, d)| g.track_op() || u.track_op() || d.track_op()) {
                // Trained per expert: stacked on each call, so gradients reach every expert's own tensors.
                Experts::Each(each)
            } else {
                // Weights no gradient flows to (a checkpoint loaded to score or merge): stacked once
                // here rather than copied on every forward pass, which dominated scoring a wide MoE.
                Experts::Stacked(ExpertWeights::stack(&refs)?)
            }
        };
        let (shared_expert, shared_expert_gate) = match &moe.shared_expert {
            None => (None, None),
            Some(s) => (
                Some(SwiGlu::new(hidden, s.ffn, vb.pp("shared_expert"))?),
                if s.gated { Some(linear(hidden, 1, false, vb.pp("shared_expert_gate"))?) } else { None },
            ),
        };
        Ok(Self {
            router,
            experts,
            shared_expert,
            shared_expert_gate,
            top_k: moe.top_k,
            routing: moe.routing,
            capacity: None,
            shard: shard.cloned(),
        })
    }

    /// Router logits [T, E] in float32 for token rows [T, H].
    pub fn router_logits(&self, xs: &Tensor) -> Result<Tensor> {
        xs.to_dtype(DType::F32)?.matmul(&self.router.to_dtype(DType::F32)?.t()?)
    }

    /// The layer on `xs` [..., H] (any leading dimensions), returning the same shape; pushes
    /// the router's decisions onto `record` when given. Runs with the default [`Kernels`].
    pub fn forward(&self, xs: &Tensor, record: Option<&mut Vec<RouterOutput>>) -> Result<Tensor> {
        self.forward_with(xs, Kernels::FUSED, record)
    }

    /// [`Self::forward`] with the implementation `kernels` picks.
    pub fn forward_with(&self, xs: &Tensor, kernels: Kernels, record: Option<&mut Vec<RouterOutput>>) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let hidden = *dims.last().expect("hidden dim");
        let xs = if xs.rank() == 2 { xs.clone() } else { xs.reshape(((), hidden))? };
        // Expert-parallel layers always take the fused path: only it exchanges tokens.
        let fused = kernels.fuses(Op::Moe, &xs) || self.shard.is_some();
        let (mut out, router) = if fused { self.routed_fused(&xs)? } else { self.routed_reference(&xs, kernels)? };
        if let Some(shared) = &self.shared_expert {
            let mut s = shared.forward_with(&xs, kernels)?;
            if let Some(gate) = &self.shared_expert_gate {
                s = s.broadcast_mul(&sigmoid(&gate.forward(&xs)?)?)?;
            }
            out = (out + s)?;
        }
        if let Some(record) = record {
            record.push(router);
        }
        if out.dims() == dims.as_slice() {
            return Ok(out);
        }
        out.reshape(dims)
    }

    /// The routed experts through the fused kernels. Per-expert weights are stacked on each
    /// call (gradients flow back through the stack to every expert's own tensors); stacked
    /// ones are used as they are.
    fn routed_fused(&self, xs: &Tensor) -> Result<(Tensor, RouterOutput)> {
        let stacked_now;
        let weights = match &self.experts {
            Experts::Stacked(weights) => weights,
            Experts::Each(experts) => {
                let refs: Vec<_> = experts.iter().map(SwiGlu::weights).collect();
                stacked_now = ExpertWeights::stack(&refs)?;
                &stacked_now
            }
        };
        let opts = MoeOptions { top_k: self.top_k, routing: self.routing, capacity: self.capacity };
        let (y, stats) = match &self.shard {
            Some(shard) => btm_kernels::expert_parallel_moe(xs, &self.router, weights, &opts, shard)?,
            None => btm_kernels::fused_moe(xs, &self.router, weights, &opts)?,
        };
        let dropped = stats.dropped();
        Ok((y, RouterOutput { logits: stats.logits, routed: stats.routed, dropped }))
    }

    /// The routed experts by the plain loop (the reference the fused kernels are tested against).
    fn routed_reference(&self, xs: &Tensor, kernels: Kernels) -> Result<(Tensor, RouterOutput)> {
        let logits = self.router_logits(xs)?;
        let routed = route(&logits, self.top_k, self.routing)?;

        // Group the T·k assignments by expert on the host: the reference loop.
        let k = self.top_k;
        let assignments = routed.experts.flatten_all()?.to_vec1::<u32>()?;
        let experts = self.experts.each()?;
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); experts.len()];
        let mut slots: Vec<Vec<u32>> = vec![Vec::new(); experts.len()];
        for (slot, &e) in assignments.iter().enumerate() {
            tokens[e as usize].push((slot / k) as u32);
            slots[e as usize].push(slot as u32);
        }
        let weights = routed.weights.flatten_all()?;
        let mut out = xs.zeros_like()?;
        for (e, expert) in experts.iter().enumerate() {
            if tokens[e].is_empty() {
                continue;
            }
            let n = tokens[e].len();
            let token_idx = Tensor::from_slice(&tokens[e], n, xs.device())?;
            let slot_idx = Tensor::from_slice(&slots[e], n, xs.device())?;
            let y = expert.forward_with(&xs.index_select(&token_idx, 0)?, kernels)?;
            let w = weights.index_select(&slot_idx, 0)?.to_dtype(y.dtype())?.unsqueeze(1)?;
            out = out.index_add(&token_idx, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok((out, RouterOutput { logits, routed, dropped: 0 }))
    }

    /// Limit each expert to `ceil(T·k/E · factor)` assignments (fused path); `None` = dropless.
    pub fn set_capacity(&mut self, capacity: Option<Capacity>) {
        self.capacity = capacity;
    }
}

/// σ(x) = 1 / (1 + e^−x), from differentiable primitives.
fn sigmoid(xs: &Tensor) -> Result<Tensor> {
    (xs.neg()?.exp()? + 1.0)?.recip()
}

/// The FFN slot of a decoder layer.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// One SwiGLU of width `intermediate_size`.
    Dense(SwiGlu),
    /// Routed experts (and a shared one, optionally).
    Moe(MoeBlock),
}

/// One decoder layer: pre-norm x + attn(norm(x)), then h + ffn(norm(h)); or OLMo2's
/// post-norm x + norm(attn(x)), then h + norm(ffn(h)).
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// The norm before attention; `None` in a post-norm layer.
    input_layernorm: Option<RmsNorm>,
    self_attn: Attention,
    /// Before the FFN in a pre-norm layer; on the attention output in a post-norm one.
    post_attention_layernorm: RmsNorm,
    /// The norm on the FFN output; only in a post-norm layer.
    post_feedforward_layernorm: Option<RmsNorm>,
    mlp: Ffn,
}

/// What to collect during a forward pass, beyond the logits.
#[derive(Debug, Default)]
pub struct Trace {
    /// Collect every layer's FFN input (the router's input: the post-attention norm output, or in
    /// a post-norm layer the residual stream itself).
    pub collect_ffn_inputs: bool,
    /// One [B, T, H] tensor per layer when `collect_ffn_inputs` is set.
    pub ffn_inputs: Vec<Tensor>,
    /// One entry per MoE layer, in layer order.
    pub router: Vec<RouterOutput>,
}

impl DecoderLayer {
    /// Layer `layer` of `cfg` from `vb` rooted at `model.layers.{layer}`: an MoE FFN where
    /// [`ModelConfig::is_moe_layer`] says so, holding the experts `shard.local()` if sharded.
    pub fn new(cfg: &ModelConfig, layer: usize, vb: VarBuilder, shard: Option<&ExpertShard>) -> Result<Self> {
        let h = cfg.hidden_size;
        let mlp = match cfg.moe.as_ref().filter(|_| cfg.is_moe_layer(layer)) {
            Some(moe) => Ffn::Moe(MoeBlock::new_sharded(h, moe, vb.pp("mlp"), shard)?),
            None => Ffn::Dense(SwiGlu::new(h, cfg.intermediate_size, vb.pp("mlp"))?),
        };
        let norm = |name: &str| RmsNorm::new(h, cfg.rms_norm_eps, vb.pp(name));
        Ok(Self {
            input_layernorm: if cfg.post_norms { None } else { Some(norm("input_layernorm")?) },
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            post_feedforward_layernorm: if cfg.post_norms { Some(norm("post_feedforward_layernorm")?) } else { None },
            mlp,
        })
    }

    /// One layer on token rows `xs` [B·T, H] of `b` sequences of `t` tokens. The residual
    /// stream stays two-dimensional through the layers: every reshape is a graph node whose
    /// gradient candle accumulates with a full pass of its own.
    fn forward(&self, xs: &Tensor, pass: &Pass, trace: &mut Trace) -> Result<Tensor> {
        let Pass { bt, cos, sin, mask, kernels } = pass;
        let kernels = *kernels;
        let (h, ffn_in) = match &self.input_layernorm {
            Some(input_norm) => {
                let normed = input_norm.forward_with(xs, kernels)?;
                let h = (xs + self.self_attn.forward(&normed, *bt, cos, sin, mask, kernels)?)?;
                let normed = self.post_attention_layernorm.forward_with(&h, kernels)?;
                (h, normed)
            }
            None => {
                let attn = self.self_attn.forward(xs, *bt, cos, sin, mask, kernels)?;
                let h = (xs + self.post_attention_layernorm.forward_with(&attn, kernels)?)?;
                (h.clone(), h)
            }
        };
        if trace.collect_ffn_inputs {
            trace.ffn_inputs.push(ffn_in.reshape((bt.0, bt.1, ()))?);
        }
        let ffn = match &self.mlp {
            Ffn::Dense(mlp) => mlp.forward_with(&ffn_in, kernels)?,
            Ffn::Moe(moe) => moe.forward_with(&ffn_in, kernels, Some(&mut trace.router))?,
        };
        match &self.post_feedforward_layernorm {
            Some(norm) => h + norm.forward_with(&ffn, kernels)?,
            None => h + ffn,
        }
    }
}

/// What every layer of one forward pass shares.
struct Pass<'a> {
    /// Sequences B and tokens per sequence T.
    bt: (usize, usize),
    /// Rotary tables for positions 0..T.
    cos: Tensor,
    sin: Tensor,
    mask: CausalMask<'a>,
    kernels: Kernels,
}

/// The whole model: embeddings, decoder layers, final norm and LM head.
#[derive(Debug, Clone)]
pub struct Transformer {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    config: ModelConfig,
    /// The implementation every forward pass runs its blocks with.
    kernels: Kernels,
}

impl Transformer {
    /// Build from tensors named as in [`crate::weights::expected_tensors`].
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_sharded(cfg, vb, None)
    }

    /// Build a model whose MoE layers hold only the experts `shard.local()` (stacked, as the
    /// trainer keeps them) and exchange tokens with the shard's group; `None` = all experts.
    pub fn new_sharded(cfg: &ModelConfig, vb: VarBuilder, shard: Option<&ExpertShard>) -> Result<Self> {
        let embed = vb.pp("model.embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed.clone(), None)
        } else {
            linear(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"))?
        };
        let layers =
            (0..cfg.num_layers).map(|l| DecoderLayer::new(cfg, l, vb.pp("model.layers").pp(l), shard)).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: Embedding::new(embed, cfg.hidden_size),
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("model.norm"))?,
            lm_head,
            rotary: Rotary::new(cfg),
            config: cfg.clone(),
            kernels: Kernels::FUSED,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn moe_blocks(&mut self) -> impl Iterator<Item = &mut MoeBlock> {
        self.layers.iter_mut().filter_map(|l| match &mut l.mlp {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        })
    }

    /// The implementation the blocks run with ([`Kernels::FUSED`] unless set).
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Run every block with the implementation `kernels` picks.
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Run MoE layers through the fused kernels (default on the CPU) or the reference loop:
    /// [`Kernels::fused_moe`].
    pub fn set_fused_moe(&mut self, fused: bool) {
        self.kernels.fused_moe = fused;
    }

    /// Run norms, attention and dense FFNs through the fused kernels (the default where they
    /// apply) or through chains of candle primitives (the reference the kernels are tested
    /// against; what other devices and dtypes always use): [`Kernels::fused_ops`].
    pub fn set_fused_kernels(&mut self, fused: bool) {
        self.kernels.fused_ops = fused;
    }

    /// Expert capacity for every MoE layer; `None` = dropless (the default).
    pub fn set_moe_capacity(&mut self, capacity: Option<Capacity>) {
        self.moe_blocks().for_each(|m| m.set_capacity(capacity));
    }

    /// Logits [B, T, vocab] for token ids [B, T] (positions 0..T).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_traced(input_ids, &mut Trace::default())
    }

    /// Like [`Self::forward`], also filling `trace` (router decisions, FFN inputs).
    pub fn forward_traced(&self, input_ids: &Tensor, trace: &mut Trace) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        self.forward_rows(input_ids, trace)?.reshape((b, t, ()))
    }

    /// Like [`Self::forward_traced`], with the logits as rows [B·T, vocab] (what a loss
    /// consumes; saves the reshape's gradient pass over the largest activation in training).
    pub fn forward_rows(&self, input_ids: &Tensor, trace: &mut Trace) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t > self.config.max_position_embeddings {
            candle_core::bail!("sequence of {t} tokens is longer than max_position_embeddings ({})", self.config.max_position_embeddings);
        }
        let pass = self.pass((b, t), input_ids.device())?;
        let mut xs = self.embed_tokens.embeddings().index_select(&input_ids.flatten_all()?, 0)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &pass, trace)?;
        }
        self.lm_head.forward(&self.norm.forward_with(&xs, self.kernels)?)
    }

    /// The tables, mask and kernels the layers of a pass over `b` sequences of `t` tokens share.
    fn pass<'a>(&self, (b, t): (usize, usize), device: &'a Device) -> Result<Pass<'a>> {
        let (cos, sin) = self.rotary.tables(t, device)?;
        let mask = CausalMask::new(t, self.config.sliding_window, device);
        Ok(Pass { bt: (b, t), cos, sin, mask, kernels: self.kernels })
    }

    /// The residual stream before layer 0: token embeddings [B, T, H] for ids [B, T].
    /// With [`Self::forward_layers`], lets a caller run the model one layer at a time.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(input_ids)
    }

    /// Run decoder layers `layers` on the residual stream `xs` [B, T, H] (positions 0..T),
    /// filling `trace` as [`Self::forward_traced`] does; returns the residual stream after them.
    pub fn forward_layers(&self, xs: &Tensor, layers: std::ops::Range<usize>, trace: &mut Trace) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        if layers.end > self.layers.len() {
            candle_core::bail!("layers {layers:?} out of range (the model has {})", self.layers.len());
        }
        let pass = self.pass((b, t), xs.device())?;
        let mut xs = xs.reshape((b * t, ()))?;
        for layer in &self.layers[layers] {
            xs = layer.forward(&xs, &pass, trace)?;
        }
        xs.reshape((b, t, ()))
    }

    /// Replace the router weight [E, H] of MoE layer `layer` (router initialisation).
    pub fn set_router(&mut self, layer: usize, weight: Tensor) -> Result<()> {
        match self.layers.get_mut(layer).map(|l| &mut l.mlp) {
            Some(Ffn::Moe(moe)) => {
                if weight.dims() != moe.router.dims() {
                    candle_core::bail!("router for layer {layer}: shape {:?}, expected {:?}", weight.dims(), moe.router.dims());
                }
                moe.router = weight;
                Ok(())
            }
            _ => candle_core::bail!("layer {layer} is not an MoE layer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An MoE layer reads its experts per expert (checkpoint names) or stacked (the trainer's
    /// state): the same model either way, through the fused kernels and the reference loop.
    #[test]
    fn stacked_experts_give_the_per_expert_model() {
        let cfg = ModelConfig {
            moe: Some(MoeConfig {
                experts: 3,
                top_k: 2,
                routing: Routing::TopkThenSoftmax,
                expert_ffn: 12,
                shared_expert: None,
                dense_layers: vec![],
            }),
            ..ModelConfig::llama(29, 16, 2, 4, 2, 24)
        };
        let mut x = 0.37f64;
        let mut per_expert = std::collections::HashMap::new();
        for spec in crate::weights::expected_tensors(&cfg) {
            let n: usize = spec.shape.iter().product();
            let values: Vec<f64> = (0..n)
                .map(|_| {
                    x = (x * 3.7 + 0.11).fract();
                    x - 0.5
                })
                .collect();
            per_expert.insert(spec.name, Tensor::from_vec(values, spec.shape.as_slice(), &Device::Cpu).unwrap());
        }
        let mut stacked = per_expert.clone();
        for l in 0..2 {
            let p = format!("model.layers.{l}.mlp.experts");
            let mut take = |part: &str, e: usize| stacked.remove(&format!("{p}.{e}.{part}.weight")).unwrap();
            let mut gate_up = Vec::new();
            let mut down = Vec::new();
            for e in 0..3 {
                gate_up.extend([take("gate_proj", e), take("up_proj", e)]);
                down.push(take("down_proj", e));
            }
            stacked.insert(format!("{p}.{STACKED_GATE_UP}"), Tensor::cat(&gate_up, 0).unwrap().reshape((3, 24, 16)).unwrap());
            stacked.insert(format!("{p}.{STACKED_DOWN}"), Tensor::stack(&down, 0).unwrap());
        }
        let build = |t: &std::collections::HashMap<String, Tensor>| {
            Transformer::new(&cfg, VarBuilder::from_tensors(t.clone(), DType::F64, &Device::Cpu)).unwrap()
        };
        // Per-expert weights being trained (variables) stay per expert; loaded ones are stacked once.
        let trained: std::collections::HashMap<String, Tensor> =
            per_expert.iter().map(|(k, t)| (k.clone(), candle_core::Var::from_tensor(t).unwrap().as_tensor().clone())).collect();
        let (mut a, mut b, mut c) = (build(&per_expert), build(&stacked), build(&trained));
        let experts = |m: &Transformer| match &m.layers[0].mlp {
            Ffn::Moe(block) => match block.experts {
                Experts::Each(_) => "each",
                Experts::Stacked(_) => "stacked",
            },
            Ffn::Dense(_) => "dense",
        };
        assert_eq!([experts(&a), experts(&b), experts(&c)], ["stacked", "stacked", "each"]);
        let ids = Tensor::from_vec((0..22u32).map(|i| (i * 7) % 29).collect(), (2, 11), &Device::Cpu).unwrap();
        for fused in [true, false] {
            for m in [&mut a, &mut b, &mut c] {
                m.set_fused_moe(fused);
            }
            let la = a.forward(&ids).unwrap();
            for other in [&b, &c] {
                let diff = (&la - other.forward(&ids).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                assert!(diff < 1e-12, "fused {fused}: logits differ by {diff}");
            }
        }
    }

    #[test]
    fn sliding_window_mask() {
        let m = causal_mask(4, Some(2), &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let allowed: Vec<Vec<bool>> = m.iter().map(|r| r.iter().map(|x| *x == 0.0).collect()).collect();
        assert_eq!(
            allowed,
            vec![
                vec![true, false, false, false],
                vec![true, true, false, false],
                vec![false, true, true, false],
                vec![false, false, true, true],
            ]
        );
    }

    /// The fused CPU kernels and the primitive chains give one model the same logits and the
    /// same gradient for every weight: grouped-query attention, a sliding window shorter than
    /// the sequence, q/k/v biases, tied embeddings, a dense layer and an MoE layer with a shared
    /// expert; and again with Qwen3's q/k norms (whose weights must get the same gradient), and
    /// with OLMo's: full-width q/k norms, post-norms and clip_qkv.
    #[test]
    fn fused_kernels_match_the_primitive_chains_in_value_and_gradient() {
        fused_matches_primitive(false, false);
        fused_matches_primitive(true, false);
        fused_matches_primitive(true, true);
    }

    fn fused_matches_primitive(qk_norm: bool, olmo: bool) {
        use crate::config::SharedExpertConfig;
        use candle_core::Var;
        let cfg = ModelConfig {
            qk_norm,
            qk_norm_full: olmo,
            post_norms: olmo,
            // The normalised q and k have unit RMS: a clip at 1.2 cuts some entries.
            clip_qkv: olmo.then_some(1.2),
            // head_dim 6 != 16 / 4, so the norms' width is head_dim's.
            head_dim: if qk_norm { 6 } else { 4 },
            qkv_bias: true,
            sliding_window: Some(5),
            tie_word_embeddings: true,
            moe: Some(MoeConfig {
                experts: 3,
                top_k: 2,
                routing: Routing::SoftmaxThenTopk,
                expert_ffn: 12,
                shared_expert: Some(SharedExpertConfig { ffn: 8, gated: true }),
                dense_layers: vec![0],
            }),
            ..ModelConfig::llama(29, 16, 2, 4, 2, 24)
        };
        cfg.validate().unwrap();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let vars: Vec<(String, Var)> = crate::weights::expected_tensors(&cfg)
            .into_iter()
            .map(|spec| {
                let n: usize = spec.shape.iter().product();
                let values: Vec<f64> = (0..n).map(|_| next()).collect();
                let t = Tensor::from_vec(values, spec.shape.as_slice(), &Device::Cpu).unwrap();
                (spec.name, Var::from_tensor(&t).unwrap())
            })
            .collect();
        let tensors = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let fused = Transformer::new(&cfg, VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu)).unwrap();
        let mut plain = fused.clone();
        plain.set_fused_kernels(false);
        let ids = Tensor::from_vec((0..22u32).map(|i| (i * 7) % 29).collect(), (2, 11), &Device::Cpu).unwrap();
        let probe = Tensor::from_vec((0..2 * 11 * 29).map(|_| next()).collect::<Vec<_>>(), (2, 11, 29), &Device::Cpu).unwrap();
        let run = |m: &Transformer| {
            let logits = m.forward(&ids).unwrap();
            let grads = (&logits * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            (logits, grads)
        };
        let ((lf, gf), (lp, gp)) = (run(&fused), run(&plain));
        // The primitive chains take norms, scores and the router in float32 (as transformers
        // does), the kernels keep float64: agreement to float32 precision.
        let rel_diff = |a: &Tensor, b: &Tensor| {
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0);
            (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() / scale
        };
        assert!(rel_diff(&lf, &lp) < 1e-6, "logits differ by {}", rel_diff(&lf, &lp));
        // Not bitwise equal: the policy did switch `plain` to the primitive chains.
        assert!(rel_diff(&lf, &lp) > 0.0, "fused and primitive logits are identical");
        let mut norm_grads = 0;
        for (name, var) in &vars {
            let (a, b) = (gf.get(var).unwrap(), gp.get(var).unwrap_or_else(|| panic!("no gradient for {name}")));
            assert!(rel_diff(a, b) < 1e-5, "gradient of {name} differs by {}", rel_diff(a, b));
            if name.ends_with("q_norm.weight") || name.ends_with("k_norm.weight") {
                let heads = if !olmo {
                    1
                } else if name.ends_with("q_norm.weight") {
                    4
                } else {
                    2
                };
                assert_eq!(a.dims(), [6 * heads]);
                assert!(a.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() > 0.0, "{name}: zero gradient");
                norm_grads += 1;
            }
        }
        assert_eq!(norm_grads, if qk_norm { 4 } else { 0 });
    }

    /// The gradient of a q_norm weight agrees with a central finite difference of the loss
    /// (through the fused kernels, float64 throughout; the primitive chains take norms in
    /// float32, too coarse for differences, and the test above ties their gradients to these).
    #[test]
    fn qk_norm_gradient_matches_finite_differences() {
        let cfg = ModelConfig { qk_norm: true, head_dim: 6, ..ModelConfig::llama(23, 12, 1, 2, 1, 16) };
        let mut x = 0.21f64;
        let mut tensors: std::collections::HashMap<String, Tensor> = crate::weights::expected_tensors(&cfg)
            .into_iter()
            .map(|spec| {
                let n: usize = spec.shape.iter().product();
                let values: Vec<f64> = (0..n)
                    .map(|_| {
                        x = (x * 3.3 + 0.17).fract();
                        x - 0.5
                    })
                    .collect();
                (spec.name, Tensor::from_vec(values, spec.shape.as_slice(), &Device::Cpu).unwrap())
            })
            .collect();
        let name = "model.layers.0.self_attn.q_norm.weight";
        let ids = Tensor::from_vec((0..10u32).map(|i| (i * 5) % 23).collect(), (1, 10), &Device::Cpu).unwrap();
        let probe =
            Tensor::from_vec((0..230).map(|i| ((i * 7) % 13) as f64 / 13.0 - 0.5).collect::<Vec<_>>(), (1, 10, 23), &Device::Cpu).unwrap();
        {
            let loss = |t: &std::collections::HashMap<String, Tensor>| {
                let m = Transformer::new(&cfg, VarBuilder::from_tensors(t.clone(), DType::F64, &Device::Cpu)).unwrap();
                (m.forward(&ids).unwrap() * &probe).unwrap().sum_all().unwrap()
            };
            let var = candle_core::Var::from_tensor(&tensors[name]).unwrap();
            let mut with_var = tensors.clone();
            with_var.insert(name.into(), var.as_tensor().clone());
            let grad = loss(&with_var).backward().unwrap().get(&var).unwrap().to_vec1::<f64>().unwrap();
            let w = tensors[name].to_vec1::<f64>().unwrap();
            for i in 0..w.len() {
                let eps = 1e-5;
                let mut at = |d: f64| {
                    let mut v = w.clone();
                    v[i] += d;
                    tensors.insert(name.into(), Tensor::from_vec(v, w.len(), &Device::Cpu).unwrap());
                    loss(&tensors).to_scalar::<f64>().unwrap()
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!((numeric - grad[i]).abs() <= 1e-7 * numeric.abs().max(1.0), "w[{i}]: {numeric} vs {}", grad[i]);
                assert!(grad[i].abs() > 1e-6, "w[{i}]: the loss does not depend on q_norm");
            }
            tensors.insert(name.into(), Tensor::from_vec(w, 6, &Device::Cpu).unwrap());
        }
    }

    #[test]
    fn rms_norm_has_gradient() {
        let x = candle_core::Var::new(&[[1f32, 2.0, 3.0]], &Device::Cpu).unwrap();
        let norm = RmsNorm { weight: Tensor::new(&[1f32, 1.0, 1.0], &Device::Cpu).unwrap(), eps: 1e-6 };
        let y = norm.forward(x.as_tensor()).unwrap();
        let g = y.narrow(1, 0, 1).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
    }
}
