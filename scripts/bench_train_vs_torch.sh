#!/usr/bin/env bash
# CPU training throughput of btm against PyTorch eager, measured alternately in one session
# (the machine's load drifts; alternating runs see the same drift), with medians and their ratio.
#
#   scripts/bench_train_vs_torch.sh [--moe] [--rounds N] [--steps N] [--threads N] [--isa avx2|baseline] [--python PY]
#
# --isa caps both sides' instruction set: btm through BTM_CPU_ISA (its kernels and the gemm
# crate), PyTorch through ATEN_CPU_CAPABILITY (its own kernels), MKL_ENABLE_INSTRUCTIONS and
# ONEDNN_MAX_CPU_ISA (the GEMM libraries it calls, which ATEN_CPU_CAPABILITY does not reach).
#
# Needs `cargo build --release -p btm` and a Python with torch and transformers
# (default /opt/pyref/bin/python; see scripts/bench_train_torch.py).
set -euo pipefail
cd "$(dirname "$0")/.."
moe="" rounds=5 steps=10 threads=2 isa="" python=${PYTHON:-/opt/pyref/bin/python}
while [ $# -gt 0 ]; do
  case "$1" in
    --moe) moe="--moe"; shift ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --isa) isa=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
btm_env=() torch_env=()
case "$isa" in
  "") ;;
  avx2) btm_env=(BTM_CPU_ISA=avx2); torch_env=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2) ;;
  baseline) btm_env=(BTM_CPU_ISA=baseline); torch_env=(ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41) ;;
  *) echo "--isa takes avx2 or baseline" >&2; exit 2 ;;
esac
btm=target/release/btm
[ -x "$btm" ] || { echo "build first: cargo build --release -p btm" >&2; exit 1; }
out=$(mktemp -d)
for r in $(seq "$rounds"); do
  env "${btm_env[@]}" "$btm" bench train --preset tiny $moe --threads "$threads" --steps "$steps" --json >> "$out/btm.jsonl"
  env "${torch_env[@]}" "$python" scripts/bench_train_torch.py --preset tiny $moe --threads "$threads" --steps "$steps" 2>/dev/null | tail -1 >> "$out/torch.jsonl"
  echo "round $r/$rounds done" >&2
done
"$python" - "$out" <<'PY'
import json, statistics, sys
d = sys.argv[1]
rows = {k: [json.loads(l) for l in open(f"{d}/{k}.jsonl")] for k in ("btm", "torch")}
med = lambda k, f: statistics.median(r[f] for r in rows[k])
cpu = rows["btm"][0].get("cpu", {})
print(f"cpu: {cpu.get('model', '?')}; btm kernels {cpu.get('isa', '?')} (of {cpu.get('isa_detected', '?')}), "
      f"gemm {cpu.get('gemm_kernel', '?')}; torch {rows['torch'][0].get('cpu_capability', '?')}")
for k in ("btm", "torch"):
    tps = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rows[k])
    print(f"{k:5}: median {med(k, 'tokens_per_s'):7.0f} tokens/s (runs {tps}); "
          f"forward {med(k, 'forward_s'):.3f} s, backward {med(k, 'backward_s'):.3f} s, "
          f"optimizer {med(k, 'optimizer_s'):.3f} s; peak RSS {med(k, 'peak_rss_mb'):.0f} MiB")
print(f"btm / torch: {med('btm', 'tokens_per_s') / med('torch', 'tokens_per_s'):.2f}x tokens/s, "
      f"{med('btm', 'peak_rss_mb') / med('torch', 'peak_rss_mb'):.2f}x peak RSS")
PY
rm -rf "$out"
