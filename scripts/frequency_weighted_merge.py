"""Does a better merge of the embeddings help btm-merge? (docs/experiments.md, point 4)

BTX averages every non-expert tensor over the experts. At the experiment's size the embeddings and
LM head hold most of what an expert learns, and averaging them throws it away. This script rewrites
a finished run's merged MoE so that row v of `embed_tokens` and of `lm_head` is a weighted average
of the experts' rows, each expert weighted by how often token v occurs in its domain:

    w_d(v) = (f_d(v) + a/V) / sum_d' (f_d'(v) + a/V)

with f_d(v) the frequency of token v in domain d's training text (the first ~300k tokens) and a
the smoothing (a = 0.01: a token no domain uses gets the plain average). With `--seed-rest`, every
other non-expert tensor (attention, norms) comes from the seed instead of the experts' average.
Score the result with `btm eval`, or train it further as the MoE phase with `btm train --job`.

    /opt/pyref/bin/python scripts/frequency_weighted_merge.py runs/btm-4domain /tmp/fw-merged [--seed-rest]

Needs `safetensors`, `torch`, `tokenizers` and the corpus at ../shared/corpus.
"""
import hashlib, json, os, shutil, sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

run, out = sys.argv[1], sys.argv[2]
seed_rest = "--seed-rest" in sys.argv[3:]
smoothing, sample_tokens = 0.01, 300_000
corpus = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../shared/corpus")
domains = ["scripture", "code", "dictionary", "computing"]  # the merged model's expert order

tok = Tokenizer.from_file(f"{run}/merged/tokenizer.json")
vocab = tok.get_vocab_size()
freq = []
for d in domains:
    counts, seen = np.zeros(vocab), 0
    with open(f"{corpus}/{d}/train.jsonl") as lines:
        for line in lines:
            ids = tok.encode(json.loads(line)["text"]).ids
            np.add.at(counts, ids, 1)
            seen += len(ids)
            if seen > sample_tokens:
                break
    freq.append(counts / seen)
weight = np.stack(freq) + smoothing / vocab
weight = torch.tensor(weight / weight.sum(0, keepdims=True), dtype=torch.float32)  # [domains, vocab]

shutil.copytree(f"{run}/merged", out, dirs_exist_ok=True)
merged = load_file(f"{run}/merged/model.safetensors")
experts = [load_file(f"{run}/experts/{d}/model/model.safetensors") for d in domains]
if seed_rest:
    seed = load_file(f"{run}/seed/model/model.safetensors")
    merged.update({k: seed[k] for k in merged if "block_sparse_moe" not in k})
for name in ["model.embed_tokens.weight", "lm_head.weight"]:
    merged[name] = sum(weight[i][:, None] * experts[i][name] for i in range(len(domains))).contiguous()
save_file(merged, f"{out}/model.safetensors", metadata={"format": "pt"})

# The checkpoint's manifest lists every file's size and hash; refresh it for the rewritten weights.
manifest = json.load(open(f"{out}/MANIFEST.json"))
for f in manifest["files"]:
    path = f"{out}/{f['path']}"
    f["size"] = os.path.getsize(path)
    f["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
json.dump(manifest, open(f"{out}/MANIFEST.json", "w"), indent=2)
print(f"wrote {out}: mean largest per-token domain weight {weight.max(0).values.mean():.3f}")
