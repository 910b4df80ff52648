#!/usr/bin/env bash
# CPU training throughput of btm against PyTorch eager, measured alternately in one session
# (the machine's load drifts; alternating runs see the same drift), with medians and their ratio.
#
#   scripts/bench_train_vs_torch.sh [--moe] [--rounds N] [--steps N] [--threads N] [--python PY]
#
# Needs `cargo build --release -p btm` and a Python with torch and transformers
# (default /opt/pyref/bin/python; see scripts/bench_train_torch.py).
set -euo pipefail
cd "$(dirname "$0")/.."
moe="" rounds=5 steps=10 threads=2 python=${PYTHON:-/opt/pyref/bin/python}
while [ $# -gt 0 ]; do
  case "$1" in
    --moe) moe="--moe"; shift ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
btm=target/release/btm
[ -x "$btm" ] || { echo "build first: cargo build --release -p btm" >&2; exit 1; }
out=$(mktemp -d)
for r in $(seq "$rounds"); do
  "$btm" bench train --preset tiny $moe --threads "$threads" --steps "$steps" --json >> "$out/btm.jsonl"
  "$python" scripts/bench_train_torch.py --preset tiny $moe --threads "$threads" --steps "$steps" 2>/dev/null | tail -1 >> "$out/torch.jsonl"
  echo "round $r/$rounds done" >&2
done
"$python" - "$out" <<'PY'
import json, statistics, sys
d = sys.argv[1]
rows = {k: [json.loads(l) for l in open(f"{d}/{k}.jsonl")] for k in ("btm", "torch")}
med = lambda k, f: statistics.median(r[f] for r in rows[k])
for k in ("btm", "torch"):
    tps = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rows[k])
    print(f"{k:5}: median {med(k, 'tokens_per_s'):7.0f} tokens/s (runs {tps}); "
          f"forward {med(k, 'forward_s'):.3f} s, backward {med(k, 'backward_s'):.3f} s, "
          f"optimizer {med(k, 'optimizer_s'):.3f} s; peak RSS {med(k, 'peak_rss_mb'):.0f} MiB")
print(f"btm / torch: {med('btm', 'tokens_per_s') / med('torch', 'tokens_per_s'):.2f}x tokens/s, "
      f"{med('btm', 'peak_rss_mb') / med('torch', 'peak_rss_mb'):.2f}x peak RSS")
PY
rm -rf "$out"
