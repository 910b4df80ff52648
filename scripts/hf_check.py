#!/usr/bin/env python3
"""Computes the perplexity of a Hugging Face checkpoint directory with `transformers`.

Used to prove that checkpoints written by btm load in (and agree with)
`transformers`. The perplexity convention is the one in ``scripts/hf_ppl.py``
(shared with ``scripts/make_fixtures.py`` and implemented identically in Rust).

Usage:
    python scripts/hf_check.py --model DIR --data FILE.jsonl --seq-len N \
        [--expect-ppl X --rtol R] [--batch-size B] [--device cpu|cuda]

DIR must contain config.json, the safetensors weights and tokenizer.json.
Prints one JSON line: {"tokens": N, "nll": SUM, "ppl": P}.
With --expect-ppl, exits with status 1 if |ppl - X| / X > R (default R 1e-4).

Requires: torch, transformers (5.x), tokenizers, safetensors. Never touches the
Hugging Face hub (HF_HUB_OFFLINE=1 is forced).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_ppl  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    ap.add_argument("--data", required=True, help="JSONL file with one {\"id\", \"text\"} document per line")
    ap.add_argument("--seq-len", type=int, required=True, help="window length in tokens")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json to use (default: MODEL/tokenizer.json)")
    ap.add_argument("--expect-ppl", type=float, default=None, help="expected perplexity")
    ap.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance for --expect-ppl")
    ap.add_argument("--batch-size", type=int, default=8, help="windows of equal length evaluated together")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = ap.parse_args(argv)

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok_path = args.tokenizer or os.path.join(args.model, "tokenizer.json")
    tokenizer = Tokenizer.from_file(tok_path)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    model.to(args.device)
    model.eval()

    docs = hf_ppl.load_jsonl(args.data)
    res = hf_ppl.perplexity(
        model, tokenizer, [d["text"] for d in docs], args.seq_len, batch_size=args.batch_size, device=args.device
    )
    print(json.dumps(res))

    if args.expect_ppl is not None:
        rel = abs(res["ppl"] - args.expect_ppl) / abs(args.expect_ppl)
        if not (rel <= args.rtol):
            print(
                f"ppl mismatch: got {res['ppl']!r}, expected {args.expect_ppl!r}, rel err {rel:.3e} > rtol {args.rtol:g}",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
