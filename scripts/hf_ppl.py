"""Shared perplexity convention used by btm's parity fixtures and checks.

Imported by ``scripts/make_fixtures.py`` and ``scripts/hf_check.py``; the Rust
side of btm implements exactly the same convention:

* every document's ``text`` is tokenized on its own with
  ``tokenizers.Tokenizer.from_file(tokenizer.json).encode(text).ids``
  (special tokens ON, so the tokenizer's post-processor runs, e.g. prepends
  ``<s>``);
* the ids are cut into consecutive, non-overlapping windows of at most
  ``seq_len`` tokens (the last window of a document may be shorter);
* a window with fewer than 2 tokens is skipped;
* every other window is run through the model on its own (batch row of its
  own, positions 0..len-1, no attention mask, no cache), and every token after
  the first one in the window is predicted from the logits of the previous
  position;
* ``nll`` = sum over all predicted tokens of ``-log_softmax(logits)[target]``,
  where the float32 logits are converted to float64 *before* the log-softmax
  and the sum is accumulated in float64;
* ``tokens`` = number of predicted tokens, ``ppl = exp(nll / tokens)``.

Requires torch and tokenizers (transformers only for loading models).
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Sequence


def load_jsonl(path: str) -> list[dict]:
    """Reads a JSONL file of ``{"id": ..., "text": ...}`` documents (blank lines ignored)."""
    docs = []
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                docs.append(json.loads(line))
    return docs


def windows_for_ids(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Non-overlapping windows of at most ``seq_len`` tokens; windows with < 2 tokens are dropped."""
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2")
    out = []
    for start in range(0, len(ids), seq_len):
        w = list(ids[start : start + seq_len])
        if len(w) >= 2:
            out.append(w)
    return out


def make_windows(tokenizer, texts: Iterable[str], seq_len: int) -> list[list[int]]:
    """Tokenizes each text on its own (post-processor applied) and windows it."""
    windows = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        windows.extend(windows_for_ids(ids, seq_len))
    return windows


def perplexity_from_windows(model, windows: list[list[int]], batch_size: int = 1, device: str = "cpu") -> dict:
    """Runs ``model`` (a transformers causal LM) over the windows and returns tokens/nll/ppl.

    Windows of equal length may be batched together (``batch_size`` > 1); no
    padding is ever used, so batching does not change the maths (only, possibly,
    float rounding in the last ulp).
    """
    import torch

    total_nll = 0.0  # python float == float64
    total_tokens = 0

    # Group windows by length (keeping order inside a group) so no padding is needed.
    groups: dict[int, list[list[int]]] = {}
    for w in windows:
        groups.setdefault(len(w), []).append(w)

    with torch.no_grad():
        for length in sorted(groups):
            ws = groups[length]
            for i in range(0, len(ws), max(1, batch_size)):
                chunk = ws[i : i + max(1, batch_size)]
                ids = torch.tensor(chunk, dtype=torch.long, device=device)
                logits = model(input_ids=ids).logits  # [B, L, V]
                logp = torch.log_softmax(logits[:, :-1, :].to(torch.float64), dim=-1)
                targets = ids[:, 1:]
                tok_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, L-1] float64
                total_nll += float(-tok_logp.sum().item())
                total_tokens += int(targets.numel())

    ppl = math.exp(total_nll / total_tokens) if total_tokens > 0 else float("nan")
    return {"tokens": total_tokens, "nll": total_nll, "ppl": ppl}


def perplexity(model, tokenizer, texts: Iterable[str], seq_len: int, batch_size: int = 1, device: str = "cpu") -> dict:
    """Convenience wrapper: tokenizes, windows and evaluates."""
    return perplexity_from_windows(model, make_windows(tokenizer, texts, seq_len), batch_size=batch_size, device=device)
