"""PyTorch eager reference for ``btm bench train``: the same presets, the same step.

Trains ``LlamaForCausalLM`` (or ``MixtralForCausalLM`` with ``--moe``: every FFN 4 experts,
top-2) from random weights on random tokens with AdamW, and prints one JSON line
``{"tokens_per_s", "peak_rss_mb", "forward_s", "backward_s", "optimizer_s", ...}`` like
``btm bench train --json`` (the phases are medians per step):

    /opt/pyref/bin/python scripts/bench_train_torch.py --preset tiny --threads 2 --steps 5 [--moe]
    python3 scripts/bench_train_torch.py --device cuda --preset gpt-125m --steps 20 [--moe]

One untimed warm-up step, then ``--steps`` timed steps of forward + cross-entropy (+ the
router's load-balancing loss for MoE) + backward + global-norm clipping + AdamW.
On the CPU: eager attention, float32. On CUDA, the way a PyTorch user trains: bfloat16
autocast over float32 weights, ``scaled_dot_product_attention`` (``attn_implementation="sdpa"``)
and the fused AdamW; the JSON adds the model FLOPs utilisation (the same PaLM formula as
``btm bench train``: 6·N + 12·L·H·T per token, N the non-embedding parameters a token passes
through) and ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

PRESETS = {
    # vocab, hidden, layers, heads, ffn, seq, batch, experts (with --moe)
    "tiny": (4096, 256, 4, 4, 688, 256, 8, 4),
    "small": (8192, 512, 8, 8, 1376, 512, 8, 4),
    "gpt-125m": (50304, 768, 12, 12, 2048, 1024, 16, 8),
}
TOP_K = 2


def flops_per_token(preset: str, moe: bool) -> float:
    """PaLM's 6·N + 12·L·H·T, as btm's ``Preset::flops_per_token``."""
    vocab, hidden, layers, heads, ffn, seq, _, experts = PRESETS[preset]
    attn = 4 * hidden * hidden  # q, k, v, o (as many KV heads as query heads)
    per_ffn = 3 * hidden * ffn
    ffn_active = TOP_K * per_ffn + experts * hidden if moe else per_ffn  # + the router
    n = layers * (attn + ffn_active + 2 * hidden) + hidden + vocab * hidden  # norms, final norm, lm_head
    return 6.0 * n + 12.0 * layers * hidden * seq


def build(preset: str, moe: bool, attention: str):
    vocab, hidden, layers, heads, ffn, seq, batch, experts = PRESETS[preset]
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation=attention,
    )
    if moe:
        cfg = MixtralConfig(num_local_experts=experts, num_experts_per_tok=TOP_K, output_router_logits=True,
                            router_aux_loss_coef=0.01, **common)
        model = MixtralForCausalLM(cfg)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model, vocab, seq, batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--moe", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--peak-tflops", type=float, default=989.4,
                    help="the GPU's dense bfloat16 peak for the MFU (H100/H200 SXM datasheet)")
    args = ap.parse_args()

    cuda = args.device == "cuda"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, vocab, seq, batch = build(args.preset, args.moe, "sdpa" if cuda else "eager")
    model.to(args.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> tuple[float, float, float]:
        """One training step; the wall seconds of forward + loss, backward, clip + AdamW."""
        ids = torch.randint(0, vocab, (batch, seq + 1), device=args.device)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda):
            out = model(input_ids=ids[:, :-1], labels=ids[:, 1:].contiguous(), use_cache=False)
        # transformers shifts labels itself; passing pre-shifted ids costs the same FLOPs.
        sync()
        t1 = time.perf_counter()
        out.loss.backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    phases = []
    start = time.perf_counter()
    for _ in range(args.steps):
        phases.append(step())
    secs = time.perf_counter() - start
    median = lambda xs: sorted(xs)[len(xs) // 2]
    params = sum(p.numel() for p in model.parameters())
    tokens_per_s = args.steps * batch * seq / secs
    fpt = flops_per_token(args.preset, args.moe)
    print(json.dumps({
        "tokens_per_s": tokens_per_s,
        "device": f"cuda ({torch.cuda.get_device_name()})" if cuda else "cpu",
        "dtype": "bf16" if cuda else "f32",
        "flops_per_token": fpt,
        "mfu": tokens_per_s * fpt / (args.peak_tflops * 1e12) if cuda else None,
        "peak_tflops": args.peak_tflops if cuda else None,
        "peak_device_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "preset": args.preset,
        "moe": args.moe,
        "threads": args.threads,
        "steps": args.steps,
        "step_s": secs / args.steps,
        "forward_s": median([p[0] for p in phases]),
        "backward_s": median([p[1] for p in phases]),
        "optimizer_s": median([p[2] for p in phases]),
        "parameters": params,
        "impl": f"torch {torch.__version__} " + ("bf16 autocast, sdpa, fused AdamW" if cuda else "eager"),
        # ATen's own kernels (ATEN_CPU_CAPABILITY caps it); MKL and oneDNN pick their own.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }))


if __name__ == "__main__":
    main()
