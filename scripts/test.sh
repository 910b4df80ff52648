#!/usr/bin/env bash
# Every test suite of btm, with the real components the tests start: a one-node Slurm, a
# one-node Ray head, an S3-compatible server, Azurite (the Azure Blob emulator, from npm), Open
# MPI, PyTorch + transformers + mergekit + TensorBoard (the reference implementations), the
# Kubernetes schema validator and CUDA's NVRTC compiler (every CUDA kernel is compiled, even
# without a GPU).
#
#   scripts/test.sh            # as root: installs what is missing, then runs every suite
#                              # otherwise: names what is missing, before any build
#
# Downloads are cached under ~/.cache/btm-ci (Python venvs, Azurite) and
# ~/.cache/cuda13-wheels; the first run fetches about 3 GB (PyTorch, CUDA's NVRTC).
# docs/testing.md lists what each suite needs and every BTM_* variable.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${HOME}/.cache/btm-ci"
APT_PACKAGES=(build-essential pkg-config python3-venv python3-pip openmpi-bin libopenmpi-dev libclang-dev
  slurmctld slurmd slurm-client munge slurmrestd slurm-wlm-jwt-plugin curl)

# What is missing, before anything is built.
missing=()
command -v cargo >/dev/null || missing+=("a Rust toolchain >= 1.92 (https://rustup.rs; Debian's rustc is too old)")
command -v npm >/dev/null || missing+=("Node.js >= 20 with npm (for Azurite, the Azure Blob emulator; https://nodejs.org)")
missing_apt=()
for pkg in "${APT_PACKAGES[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing_apt+=("$pkg"); done
if [ "${#missing_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "test.sh: installing ${missing_apt[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing_apt[@]}" >&2
  else
    missing+=("Debian packages: sudo apt-get install ${missing_apt[*]}")
  fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "test.sh: cannot run the tests; missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  echo "(or run scripts/test.sh as root, which installs the packages itself)" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "test.sh: not root: the Slurm tests need root to start munge, slurmctld and slurmd; run as root for every suite" >&2
  exit 1
fi

# A real single-node Slurm (munge, slurmctld, slurmd, slurmrestd with JWT on 127.0.0.1).
eval "$(bash scripts/slurm-local.sh start)"
trap 'bash scripts/slurm-local.sh stop' EXIT
# A real single-node Ray head (token auth, Jobs API on 127.0.0.1:8265, ray[default] in a cached
# venv) for the Ray engine tests; one of them restarts the head through the same script.
eval "$(bash scripts/ray-local.sh start)"
trap 'bash scripts/ray-local.sh stop; bash scripts/slurm-local.sh stop' EXIT

# Python references in cached venvs: the Kubernetes schema validator; PyTorch, transformers,
# TensorBoard and mergekit (the external-trainer, mergekit and reference tests).
VENV="$CACHE/venv"
[ -x "$VENV/bin/kubernetes-validate" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q kubernetes-validate; }
TORCH_VENV="$CACHE/torch-venv"
[ -x "$TORCH_VENV/bin/torchrun" ] && [ -x "$TORCH_VENV/bin/mergekit-moe" ] \
  && "$TORCH_VENV/bin/python" -c "import torch, transformers, tensorboard, mergekit, gguf" 2>/dev/null || {
  python3 -m venv "$TORCH_VENV" && "$TORCH_VENV/bin/pip" install -q "torch==2.9.1" "transformers>=5,<6" "tensorboard>=2.16" "mergekit==0.1.5" "gguf==0.19.0"; }

# Azurite, Microsoft's Azure Storage emulator, from npm (the Azure Blob tests start it).
AZURITE="$CACHE/azurite"
[ -x "$AZURITE/node_modules/.bin/azurite-blob" ] \
  && [ "$(node -p "require('$AZURITE/node_modules/azurite/package.json').version" 2>/dev/null)" = 3.35.0 ] \
  || npm install --silent --no-fund --no-audit --prefix "$AZURITE" azurite@3.35.0 >&2

# CUDA 13's NVRTC from PyPI (no GPU needed): every CUDA kernel source is compiled in a test.
eval "$(bash scripts/cuda-toolkit.sh --nvrtc-only)"

# A component that is missing now fails its tests instead of skipping them.
export BTM_KUBERNETES_VALIDATE="$VENV/bin/kubernetes-validate" BTM_PYTHON="$TORCH_VENV/bin/python"
export BTM_AZURITE="$AZURITE/node_modules/.bin/azurite-blob"
export BTM_REQUIRE_SLURM=1 BTM_REQUIRE_KUBERNETES_VALIDATE=1 BTM_REQUIRE_TORCH=1 BTM_REQUIRE_MERGEKIT=1
export BTM_REQUIRE_S3=1 BTM_REQUIRE_NVRTC=1 BTM_REQUIRE_RAY=1 BTM_REQUIRE_AZURITE=1

# Build every suite first, benchmarks too, in one build: the workspace with MPI, the CUDA
# kernel sources for NVRTC and the NCCL backend (their tests skip at run time without libnvrtc
# or a GPU). One feature set for every suite means nothing is compiled twice.
WS=(--workspace --locked --features btm/mpi,btm-kernels/nvrtc,btm-kernels/nccl)
cargo test "${WS[@]}" --all-targets --no-run

# Then run them, BTM_TEST_JOBS (default 3) at a time. Most of a suite's time is spent waiting on
# what it drives (Slurm, Ray, the object stores, Python, btm's own subprocesses), so suites side
# by side finish sooner than one after another. Each suite's output is printed when it ends.
# The list: every integration-test target (the longest first), every crate's unit tests (the
# CUDA kernel sources under NVRTC and the GPU tests among them), the doc tests, and the kernels
# and trainer again with AVX2 kernels only (the CPU dispatch's other path).
LONGEST_FIRST=(ray slurm external_trainer s3 azure)
targets=$(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
print("\n".join(sorted({t["name"] for p in json.load(sys.stdin)["packages"] for t in p["targets"] if "test" in t["kind"]})))')
suites=()
for t in "${LONGEST_FIRST[@]}"; do grep -qx "$t" <<<"$targets" && suites+=("cargo test ${WS[*]} --test $t"); done
suites+=("cargo test ${WS[*]} --lib" "BTM_CPU_ISA=avx2 unit_tests btm_kernels btm_trainer")
for t in $targets; do [[ " ${LONGEST_FIRST[*]} " == *" $t "* ]] || suites+=("cargo test ${WS[*]} --test $t"); done
suites+=("cargo test ${WS[*]} --bins" "cargo test ${WS[*]} --doc")
# The unit-test executables of the crates named, run from their crates' folders as cargo would
# (`cargo test -p` would resolve features anew and rebuild).
unit_tests() {
  cargo test $WS_ARGS --lib --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in sys.argv[1:]:
        print(m["manifest_path"].rsplit("/", 1)[0], m["executable"])' "$@" >"$logs/unit-tests-$$"
  [ "$(wc -l <"$logs/unit-tests-$$")" = "$#" ] || { echo "unit_tests: expected $# executables for $*" >&2; return 1; }
  while read -r dir exe; do (cd "$dir" && "$exe") || return 1; done <"$logs/unit-tests-$$"
}
logs=$(mktemp -d)
trap 'rm -rf "$logs"; bash scripts/ray-local.sh stop; bash scripts/slurm-local.sh stop' EXIT
export -f unit_tests
export logs WS_ARGS="${WS[*]}"
run_suite() { # index, command
  local start=$SECONDS
  if bash -c "$2" >"$logs/$1.log" 2>&1; then echo "ok $1" >"$logs/$1.status"; else echo "FAILED $1" >"$logs/$1.status"; fi
  printf 'test.sh: %-6s %4d s  %s\n' "$(cut -d' ' -f1 "$logs/$1.status")" $((SECONDS - start)) "$2"
  grep -q '^ok' "$logs/$1.status" || cat "$logs/$1.log"
}
start=$SECONDS
for i in "${!suites[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "${BTM_TEST_JOBS:-3}" ]; do wait -n || true; done
  run_suite "$i" "${suites[$i]}" &
done
wait
failed=$(cat "$logs"/*.status | grep -c '^FAILED' || true)
echo "test.sh: ${#suites[@]} suites in $((SECONDS - start)) s, $failed failed"
[ "$failed" = 0 ]
