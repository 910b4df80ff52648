#!/usr/bin/env bash
# The GPU path's whole check, in one command for the GPU machine (CUDA, nvcc, Python with
# PyTorch; no Rust, no network). Build and pack here first: `scripts/pack-gpu.sh` (gpu-pack/,
# carried). Then, on the GPU machine, from the repository root:
#
#   scripts/gpu-check.sh [OUT_DIR]        # default OUT_DIR: $OUT, else gpu-check-out
#
# In order, each under its own time limit (8 minutes at most in all, the limits summed):
#   1. the btm-kernels GPU tests (NVRTC kernels against the CPU ops);
#   2. `btm device-check --device cuda`: logits of every fixture checkpoint on CUDA against the
#      CPU (float32 ≤ 1e-4, bfloat16 ≤ 1e-2), the fused MoE layer's forward and gradients
#      against the reference loop on CUDA, 50 training steps on CUDA (bfloat16 mixed precision)
#      against the CPU's loss curve (≤ 2 %);
#   3. `btm bench moe --device cuda` (fused vs loop at 8×top-2 and 64×top-8; grouped GEMM vs
#      one cuBLAS GEMM of equal FLOPs);
#   4. `btm bench train --device cuda --preset gpt-125m` dense and `--moe` (8 experts, top-2),
#      each next to `scripts/bench_train_torch.py` on the same GPU (bf16 autocast, SDPA, fused
#      AdamW), alternating btm and PyTorch;
#   5. `btm run configs/gpu-smoke.yaml`: seed → two experts on two GPUs (or one after the other)
#      → merge → continue → eval, every training phase on CUDA; tokens/s per phase.
# Writes OUT_DIR/gpu-check.json (every result, the acceptance verdicts, the commands) and one
# log per step. Exits 0 when every step ran, whatever the verdicts say.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu-check-out}}"
PACK="${BTM_GPU_PACK:-gpu-pack}"
STEPS="${BTM_GPU_CHECK_STEPS:-10}"
mkdir -p "$OUT_DIR"
BIN="$(mktemp -d)"
export PYTHONUNBUFFERED=1

[ -f "$PACK/btm.xz" ] || { echo "gpu-check: $PACK/btm.xz is missing (run scripts/pack-gpu.sh here, carry gpu-pack)" >&2; exit 2; }
(cd "$PACK" && sha256sum -c --quiet SHA256SUMS) || { echo "gpu-check: $PACK does not match its SHA256SUMS" >&2; exit 2; }
for f in "$PACK"/*.xz; do
  name="$(basename "$f" .xz)"
  xz -dc "$f" > "$BIN/$name" && chmod +x "$BIN/$name"
done

# CUDA 13's libraries: the toolkit's, and the ones PyTorch's wheels bring (cuBLAS, NVRTC, cudart).
libs="$(python3 - <<'EOF'
import glob, os, site
dirs = []
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    dirs += glob.glob(os.path.join(root, "nvidia", "*", "lib")) + glob.glob(os.path.join(root, "nvidia", "cu13", "lib"))
dirs += [d for d in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib") if os.path.isdir(d)]
print(":".join(dict.fromkeys(dirs)))
EOF
)"
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT_DIR/nvidia-smi.csv" 2>&1
ldd "$BIN/btm" > "$OUT_DIR/ldd.txt" 2>&1

# step NAME LIMIT_S COMMAND...: stdout to NAME.out, stderr to NAME.log, status and time to steps.tsv.
step() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.out" 2> "$OUT_DIR/$name.log"
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >> "$OUT_DIR/steps.tsv"
  echo "gpu-check: $name: exit $rc after $((SECONDS - start)) s" >&2
}
: > "$OUT_DIR/steps.tsv"

step kernel-tests 60 "$BIN/btm-kernels-tests" gpu --test-threads 1 --nocapture
step device-check 120 "$BIN/btm" device-check --device cuda --fixtures model/tests/fixtures --steps 50 --json
step bench-moe 75 "$BIN/btm" bench moe --device cuda --json
for moe in "" "--moe"; do
  tag="${moe:+-moe}"
  step "bench-train-btm$tag" 33 "$BIN/btm" bench train --device cuda --preset gpt-125m $moe --steps "$STEPS" --json
  step "bench-train-torch$tag" 33 python3 scripts/bench_train_torch.py --device cuda --preset gpt-125m $moe --steps "$STEPS" --threads 8
done
# The path a user takes: a pipeline whose phases train on the GPUs (seed, two experts, merge,
# continued training, eval), each job placed on its own GPU by the local engine.
SMOKE_RUN="$(mktemp -d)/gpu-smoke"
step gpu-smoke 90 "$BIN/btm" run configs/gpu-smoke.yaml --run-dir "$SMOKE_RUN"
cp "$SMOKE_RUN/report.md" "$OUT_DIR/gpu-smoke-report.md" 2>/dev/null || true

python3 - "$OUT_DIR" "$PACK" "$BIN" "$SMOKE_RUN" <<'EOF'
import datetime, json, os, sys
out, pack, bin_dir, smoke_run = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

def last_json(name):
    try:
        lines = [l for l in open(os.path.join(out, name + ".out")).read().splitlines() if l.strip().startswith(("{", "["))]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None

def tail(name, n=15):
    try:
        return open(os.path.join(out, name + ".log")).read().splitlines()[-n:]
    except OSError:
        return []

steps = {}
for line in open(os.path.join(out, "steps.tsv")):
    name, rc, secs, cmd = line.rstrip("\n").split("\t", 3)
    steps[name] = {"exit": int(rc), "seconds": int(secs), "command": cmd.replace(bin_dir + "/", ""),
                   "result": last_json(name), "log_tail": tail(name)}
kernel_out = open(os.path.join(out, "kernel-tests.out")).read() if os.path.exists(os.path.join(out, "kernel-tests.out")) else ""
steps["kernel-tests"]["result"] = [l for l in kernel_out.splitlines() if l.startswith(("test ", "test result"))]

verdicts = {}
kt = steps["kernel-tests"]
verdicts["kernel GPU tests ran and passed"] = kt["exit"] == 0 and "skipping" not in kernel_out and any("passed" in l for l in kt["result"])
dc = steps["device-check"]["result"]
for section in ("logits", "fused_moe", "training"):
    verdicts[f"parity: {section}"] = bool(dc) and all(c["passed"] for c in dc[section])
moe = {(r["experts"], r["top_k"]): r for r in (steps["bench-moe"]["result"] or [])}
r64 = moe.get((64, 8))
verdicts["bench moe: fused ≥ 5× the loop at 64 experts top-8" + (f" (measured {r64['speedup']:.2f}×)" if r64 else "")] = bool(r64) and (r64.get("speedup") or 0) >= 5
for shape in ((8, 2), (64, 8)):
    r = moe.get(shape)
    label = f"bench moe: grouped GEMM ≥ 60 % of dense at {shape[0]}×top-{shape[1]}" + (f" (measured {100 * r['grouped_vs_dense']:.0f} %)" if r else "")
    verdicts[label] = bool(r) and r["grouped_vs_dense"] >= 0.6
for tag, label in (("", "dense"), ("-moe", "8-expert top-2 MoE")):
    b, t = steps[f"bench-train-btm{tag}"]["result"], steps[f"bench-train-torch{tag}"]["result"]
    ratio = b["tokens_per_s"] / t["tokens_per_s"] if b and t else None
    steps[f"bench-train-btm{tag}"]["vs_torch"] = ratio
    verdicts[f"bench train gpt-125m {label}: btm ≥ 1.0× PyTorch" + (f" (measured {ratio:.2f}×)" if ratio else "")] = bool(ratio) and ratio >= 1.0
# Each training phase of the smoke run: its device, dtype and last tokens/s.
smoke = {"completed": os.path.exists(os.path.join(smoke_run, "report.md")), "phases": {}}
try:
    plan = json.load(open(os.path.join(smoke_run, "plan.json")))
    for job in plan["jobs"]:
        t = job.get("train")
        if not t:
            continue
        lines = open(t["metrics"]).read().splitlines() if os.path.exists(t["metrics"]) else []
        rates = [json.loads(l)["tokens_per_s"] for l in lines if '"tokens_per_s"' in l]
        smoke["phases"][job["name"]] = {"device": t.get("device"), "dtype": t.get("dtype"), "tokens_per_s": rates[-1] if rates else None}
except (OSError, ValueError, KeyError) as e:
    smoke["error"] = repr(e)
steps["gpu-smoke"]["pipeline"] = smoke
verdicts["gpu-smoke: seed, experts, merge, continue and eval on CUDA, report written"] = (
    steps["gpu-smoke"]["exit"] == 0 and smoke["completed"]
    and bool(smoke["phases"]) and all(p["device"] == "cuda" for p in smoke["phases"].values()))
report = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "pack": open(os.path.join(pack, "COMMIT")).read().split("\n") if os.path.exists(os.path.join(pack, "COMMIT")) else None,
    "gpu": open(os.path.join(out, "nvidia-smi.csv")).read().strip().splitlines(),
    "verdicts": verdicts,
    "steps": steps,
}
json.dump(report, open(os.path.join(out, "gpu-check.json"), "w"), indent=1, ensure_ascii=False)
for k, v in verdicts.items():
    print(("PASS " if v else "FAIL ") + k)
print(f"gpu-check: wrote {os.path.join(out, 'gpu-check.json')}")
EOF
