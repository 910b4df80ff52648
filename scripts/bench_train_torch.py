"""PyTorch eager reference for ``btm bench train``: the same presets, the same step.

Trains ``LlamaForCausalLM`` (or ``MixtralForCausalLM`` with ``--moe``: every FFN 4 experts,
top-2) from random weights on random tokens with AdamW, and prints one JSON line
``{"tokens_per_s", "peak_rss_mb", "forward_s", "backward_s", "optimizer_s", ...}`` like
``btm bench train --json`` (the phases are medians per step):

    /opt/pyref/bin/python scripts/bench_train_torch.py --preset tiny --threads 2 --steps 5 [--moe]

One untimed warm-up step, then ``--steps`` timed steps of forward + cross-entropy (+ the
router's load-balancing loss for MoE) + backward + global-norm clipping + AdamW. Eager
attention, float32, CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

PRESETS = {
    # vocab, hidden, layers, heads, ffn, seq, batch
    "tiny": (4096, 256, 4, 4, 688, 256, 8),
    "small": (8192, 512, 8, 8, 1376, 512, 8),
}


def build(preset: str, moe: bool):
    vocab, hidden, layers, heads, ffn, seq, batch = PRESETS[preset]
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
        attn_implementation="eager",
    )
    if moe:
        cfg = MixtralConfig(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
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
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, vocab, seq, batch = build(args.preset, args.moe)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step() -> tuple[float, float, float]:
        """One training step; the wall seconds of forward + loss, backward, clip + AdamW."""
        ids = torch.randint(0, vocab, (batch, seq + 1))
        t0 = time.perf_counter()
        out = model(input_ids=ids[:, :-1], labels=ids[:, 1:].contiguous(), use_cache=False)
        # transformers shifts labels itself; passing pre-shifted ids costs the same FLOPs.
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    step()
    phases = []
    start = time.perf_counter()
    for _ in range(args.steps):
        phases.append(step())
    secs = time.perf_counter() - start
    median = lambda xs: sorted(xs)[len(xs) // 2]
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "tokens_per_s": args.steps * batch * seq / secs,
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
        "impl": f"torch {torch.__version__} eager",
        # ATen's own kernels (ATEN_CPU_CAPABILITY caps it); MKL and oneDNN pick their own.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }))


if __name__ == "__main__":
    main()
