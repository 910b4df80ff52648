"""Which of an expert's trained weights carry its in-domain gain? (docs/experiments.md)

For every domain expert of a finished btm run, writes dense models that keep some of the expert's
tensors and take the rest from the seed or from the experts' average, e.g. `ffn+avg` = the expert's
FFN with averaged attention, embeddings and norms: what the merged MoE computes for that domain if
the router sends it to its own expert only. Score them with `btm eval --model OUT/<variant>/<domain>`.

    /opt/pyref/bin/python scripts/expert_weight_swap.py runs/btm-4domain /tmp/swap

Needs `safetensors` and `torch`.
"""
import hashlib, json, os, shutil, sys

from safetensors.torch import load_file, save_file

run, out_root = sys.argv[1], sys.argv[2]
domains = sorted(os.listdir(f"{run}/experts"))
seed = load_file(f"{run}/seed/model/model.safetensors")
expert = {d: load_file(f"{run}/experts/{d}/model/model.safetensors") for d in domains}
average = {k: sum(expert[d][k] for d in domains) / len(domains) for k in seed}

ffn = lambda k: ".mlp." in k
attn = lambda k: ".self_attn." in k
emb = lambda k: "embed_tokens" in k or "lm_head" in k
# variant: (which tensors come from the expert, where the others come from)
variants = {
    "ffn+seed": (ffn, seed),
    "ffn+avg": (ffn, average),
    "ffnattn+seed": (lambda k: ffn(k) or attn(k), seed),
    "ffnattn+avg": (lambda k: ffn(k) or attn(k), average),
    "ffnemb+seed": (lambda k: ffn(k) or emb(k), seed),
}
for name, (from_expert, rest) in variants.items():
    for d in domains:
        src, out = f"{run}/experts/{d}/model", f"{out_root}/{name}/{d}"
        os.makedirs(out, exist_ok=True)
        for f in ["btm.json", "config.json", "generation_config.json", "tokenizer.json"]:
            shutil.copy(f"{src}/{f}", out)
        tensors = {k: (expert[d][k] if from_expert(k) else rest[k]).contiguous() for k in seed}
        save_file(tensors, f"{out}/model.safetensors", metadata={"format": "pt"})
        # The manifest goes last: btm loads only a model whose manifest matches its files.
        files = []
        for f in sorted(os.listdir(out)):
            if f != "MANIFEST.json":
                b = open(f"{out}/{f}", "rb").read()
                files.append({"path": f, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()})
        json.dump({"format": "btm-manifest/1", "files": files}, open(f"{out}/MANIFEST.json", "w"), indent=2)
        print(f"{out}")
