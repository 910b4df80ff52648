#!/usr/bin/env python3
"""llama.cpp's perplexity on a GGUF file that `btm export gguf` wrote, against transformers' on
the Hugging Face folder it was written from, under one convention.

    scripts/gguf_ppl.py --model DIR --gguf FILE --data FILE.jsonl \
        --llama-python ~/.cache/btm-ci/llama-venv/bin/python [--seq-len 128] [--max-docs 8]

Run it with the Python that has torch and transformers (BTM_PYTHON); it runs llama.cpp
(llama-cpp-python, built from source) through `--llama-python` in a second process, as the two
live in separate venvs.

The convention: the same token ids on both sides (the folder's tokenizer.json with its special
tokens, so btm's `<s>` starts every document on both), cut into the same non-overlapping windows
of `--seq-len` tokens; in each window every token after the first is predicted; the NLL is
computed here, in float64, from each side's logits (llama.cpp's through its logits API with
`logits_all`), and perplexity is exp of the mean NLL over all predicted tokens. llama.cpp's KV
cache is float32, so a float32 file is compared with no 16-bit step on either side.

It also tokenizes the text with llama.cpp's own tokenizer (the GGUF's vocabulary, merges and
pre-tokenizer) and reports whether it gives the same ids as the `tokenizers` library.

Prints one JSON object: both perplexities, their relative difference, the tokenizer agreement, the
llama.cpp version. Exits 1 if the relative difference exceeds `--tolerance` (default 1e-3).
"""
import argparse
import json
import math
import subprocess
import sys
import tempfile


def windows(ids_per_doc, seq_len):
    """Non-overlapping windows of at most seq_len tokens, each with at least one prediction."""
    out = []
    for ids in ids_per_doc:
        for start in range(0, len(ids), seq_len):
            w = ids[start:start + seq_len]
            if len(w) >= 2:
                out.append(w)
    return out


def nll_of(logits_rows, window):
    """Summed NLL (float64) of window[1:] given logits rows 0..n-2 (log-softmax done here)."""
    import numpy as np

    logits = np.asarray(logits_rows, dtype=np.float64)[: len(window) - 1]
    shift = logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(logits - shift).sum(axis=1)) + shift[:, 0]
    targets = np.asarray(window[1:])
    return float((logz - logits[np.arange(len(targets)), targets]).sum())


def run_llama(args):
    """In the llama-cpp-python venv: NLL per window from llama.cpp's logits, and its tokenization."""
    import llama_cpp

    with open(args.request) as f:
        req = json.load(f)
    llm = llama_cpp.Llama(
        model_path=req["gguf"],
        n_ctx=req["seq_len"],
        n_batch=req["seq_len"],
        n_ubatch=req["seq_len"],
        logits_all=True,
        n_threads=req["threads"],
        type_k=0,  # GGML_TYPE_F32: no f16 rounding of keys and values
        type_v=0,
        verbose=False,
    )
    total = 0.0
    for w in req["windows"]:
        llm.reset()
        llm.eval(w)
        total += nll_of(llm.scores[: len(w)], w)
    # llama.cpp's own tokenizer on the same documents, with its BOS as the file says.
    llama_ids = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) for text in req["texts"]]
    json.dump({"nll": total, "ids": llama_ids, "version": llama_cpp.__version__}, sys.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the Hugging Face folder the GGUF was exported from")
    p.add_argument("--gguf", help="the GGUF file")
    p.add_argument("--data", help="JSONL, one {\"text\": ...} per line")
    p.add_argument("--llama-python", help="a Python with llama-cpp-python")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-docs", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--llama-request", dest="request", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.request:
        return run_llama(args)

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    with open(args.data) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()][: args.max_docs]
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    ids = [tok.encode(t, add_special_tokens=True).ids for t in texts]
    wins = windows(ids, args.seq_len)
    predicted = sum(len(w) - 1 for w in wins)

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    hf_nll = 0.0
    with torch.no_grad():
        for w in wins:
            logits = model(torch.tensor([w])).logits[0]
            hf_nll += nll_of(logits.numpy(), w)

    with tempfile.NamedTemporaryFile("w", suffix=".json") as req:
        json.dump({"gguf": args.gguf, "seq_len": args.seq_len, "threads": args.threads, "windows": wins, "texts": texts}, req)
        req.flush()
        out = subprocess.run(
            [args.llama_python, __file__, "--llama-request", req.name], check=True, capture_output=True, text=True
        )
    llama = json.loads(out.stdout)
    hf_ppl = math.exp(hf_nll / predicted)
    llama_ppl = math.exp(llama["nll"] / predicted)
    rel = abs(llama_ppl - hf_ppl) / hf_ppl
    same_ids = sum(a == b for a, b in zip(ids, llama["ids"]))
    result = {
        "model": args.model,
        "class": type(model).__name__,
        "gguf": args.gguf,
        "windows": len(wins),
        "predicted_tokens": predicted,
        "transformers_ppl": hf_ppl,
        "llama_cpp_ppl": llama_ppl,
        "rel_diff": rel,
        "tokenizer_same_ids_docs": f"{same_ids}/{len(ids)}",
        "llama_cpp_python": llama["version"],
    }
    print(json.dumps(result))
    return 0 if rel <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
