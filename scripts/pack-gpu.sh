#!/usr/bin/env bash
# Build btm with CUDA here (no GPU needed) and pack what `scripts/gpu-check.sh` runs on the GPU
# machine into gpu-pack/ (git-ignored; carry it): the `btm` binary and the btm-kernels test
# binary, built with `--features cuda`, debug info stripped, xz-compressed, with their SHA-256.
#
#   scripts/pack-gpu.sh            # build + pack; fails when gpu-pack/ exceeds the limit
#
# The GPU machine has CUDA, nvcc and Python with PyTorch but no Rust and no network, and takes
# at most 64 MiB of working tree per call; the pack must leave room for the tree itself.
# Environment: BTM_PACK_LIMIT_MB (default 48), CARGO_TARGET_DIR (default target/cuda: the CUDA
# build keeps its own target folder, so it does not rebuild the CPU one's dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MB="${BTM_PACK_LIMIT_MB:-48}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
unset BTM_CUDA_CHECK_ONLY  # candle's kernels are compiled for real here (third_party/README.md)
eval "$(scripts/cuda-toolkit.sh)"

cargo build --release --locked -p btm --features cuda
# The kernels' own GPU tests (`gpu` in their names), as one test executable.
kernel_tests=$(cargo test --release --locked -p btm-kernels --features cuda --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"] and m["profile"]["test"]:
        print(m["executable"])' | tail -1)
[ -n "$kernel_tests" ] || { echo "pack-gpu: no btm-kernels test executable was built" >&2; exit 1; }

rm -rf gpu-pack.tmp && mkdir gpu-pack.tmp
for pair in "btm:$CARGO_TARGET_DIR/release/btm" "btm-kernels-tests:$kernel_tests"; do
  name="${pair%%:*}" src="${pair#*:}"
  objcopy --strip-debug "$src" "gpu-pack.tmp/$name"
  xz -T0 -6 "gpu-pack.tmp/$name"
done
( cd gpu-pack.tmp && sha256sum ./*.xz > SHA256SUMS )
git rev-parse HEAD > gpu-pack.tmp/COMMIT
git status --porcelain --untracked-files=no | sed 's/^/dirty: /' >> gpu-pack.tmp/COMMIT
size_kb=$(du -sk gpu-pack.tmp | cut -f1)
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
  echo "pack-gpu: gpu-pack is $((size_kb / 1024)) MiB, over the ${LIMIT_MB} MiB limit" >&2
  exit 1
fi
# Published whole or not at all.
rm -rf gpu-pack && mv gpu-pack.tmp gpu-pack
echo "pack-gpu: gpu-pack/ holds $(ls gpu-pack | tr '\n' ' ')($((size_kb / 1024)) MiB)"
