#!/usr/bin/env bash
# c-BTM on the shared corpus (docs/experiments.md, "Domains without labels"):
#   1. the four domains' train files shuffled into one unlabelled file, clustered by
#      `btm cluster`, and the clusters' purity against the true domains;
#   2. three arms from one shared seed, scored on the same test tokens (each domain's test file):
#      dense (the seed trained further on the mix), labelled BTM (one expert per named domain,
#      ensembled by the domain posterior) and c-BTM (one expert per discovered cluster,
#      ensembled by the clusterer's weights).
# Usage: scripts/cbtm-experiment.sh WORKDIR [BTM] [purity-only]
# WORKDIR gets the unlabelled file, the clusterings, the pipelines and their runs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:?usage: $0 WORKDIR [BTM] [purity-only]}
btm=${2:-$root/target/debug/btm}
corpus=${CORPUS:-$root/../shared/corpus}
domains=(code computing dictionary scripture)
mkdir -p "$work"
work=$(cd "$work" && pwd)
cd "$work"

# The unlabelled file and, line for line, each document's true domain (a fixed shuffle).
python3 - "$corpus" "${domains[@]}" <<'PY'
import json, random, sys
corpus, domains = sys.argv[1], sys.argv[2:]
rows = [(d, json.loads(l)["text"]) for d in domains for l in open(f"{corpus}/{d}/train.jsonl")]
random.Random(0).shuffle(rows)
with open("unlabelled.jsonl", "w") as f, open("labels.txt", "w") as g:
    for d, t in rows:
        f.write(json.dumps({"text": t}) + "\n")
        g.write(d + "\n")
PY

# Purity: the share of documents in their cluster's most common true domain.
purity() {
  python3 - labels.txt "$1/assignments.jsonl" <<'PY'
import collections, json, sys
labels = [l.strip() for l in open(sys.argv[1])]
assign = [json.loads(l)["cluster"] for l in open(sys.argv[2])]
assert len(labels) == len(assign)
tab = collections.defaultdict(collections.Counter)
for d, c in zip(labels, assign):
    tab[c][d] += 1
for c in sorted(tab):
    print(f"  cluster {c}: {sum(tab[c].values())} documents, {dict(tab[c].most_common())}")
print(f"  purity {sum(max(t.values()) for t in tab.values()) / len(labels):.4f}")
PY
}
for args in "--k 4" "--k 4 --seed 1" "--k 4 --plain" "--k 8"; do
  out=clusters-$(echo "$args" | tr -d ' -')
  echo "btm cluster --data unlabelled.jsonl $args"
  "$btm" cluster --data unlabelled.jsonl $args --out "$out" --overwrite | tail -1
  purity "$out"
done
[ "${3:-}" = purity-only ] && exit 0

# The arms. A tiny model and few steps: a 2-core CPU runs the whole in minutes.
common="engine: {kind: local, slots: 2, threads_per_job: 1}
experts: {steps: ${EXPERT_STEPS:-60}, batch_size: 16, seq_len: 128, lr: 3.0e-3, warmup_steps: 10, checkpoint_interval: 1000}
merge: {top_k: 1, router_init: centroid, calib_tokens: 2048}"
eval="eval: {split: test, seq_len: 128, max_tokens: ${MAX_TOKENS:-16384}"
{
  echo "name: labelled"
  echo "storage: $work/runs"
  echo "$common"
  echo "seed:
  train:
    model: {hidden_size: 64, layers: 2, heads: 2, kv_heads: 2, ffn: 256, max_positions: 128}
    tokenizer: {vocab_size: 1024, max_docs_per_domain: 300}
    train: {steps: ${SEED_STEPS:-300}, batch_size: 16, seq_len: 128, lr: 3.0e-3, warmup_steps: 30, checkpoint_interval: 1000}"
  echo "domains:"
  for d in "${domains[@]}"; do
    echo "  - {name: $d, train: $corpus/$d/train.jsonl, valid: $corpus/$d/valid.jsonl, test: $corpus/$d/test.jsonl}"
  done
  echo "$eval, baseline: true, ensemble: true}"
} > labelled.yaml
"$btm" run labelled.yaml --quiet
# c-BTM from the labelled run's seed (same tokenizer, same starting weights).
{
  echo "name: cbtm"
  echo "storage: $work/runs"
  echo "$common"
  echo "seed: {checkpoint: $work/runs/labelled/seed/model}"
  echo "domains:
  discover: {data: [$work/unlabelled.jsonl], k: 4, seed: 0}"
  echo "$eval, ensemble: true}"
} > cbtm.yaml
"$btm" run cbtm.yaml --quiet
# c-BTM's ensemble on the true domains' test files, the tokens the labelled run scores its arms
# on; and the labelled ensemble told nothing of the domain (a uniform prior), as c-BTM is.
cbtm=$(for i in 0 1 2 3; do echo "runs/cbtm/experts/cluster-$i/model"; done)
labelled=$(for d in "${domains[@]}"; do echo "runs/labelled/experts/$d/model"; done)
for d in "${domains[@]}"; do
  test=(--data "$corpus/$d/test.jsonl" --seq-len 128 --max-tokens "${MAX_TOKENS:-16384}" --json)
  echo "$d: c-BTM ensemble: $("$btm" eval --ensemble $cbtm --clusters runs/cbtm/clusters "${test[@]}")"
  echo "$d: c-BTM top-1: $("$btm" eval --ensemble $cbtm --clusters runs/cbtm/clusters --top-k 1 "${test[@]}")"
  echo "$d: labelled, uniform prior: $("$btm" eval --ensemble $labelled "${test[@]}")"
done
echo "dense, labelled BTM: runs/labelled/report.md; c-BTM on its clusters' test splits: runs/cbtm/report.md"
