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

# The suites: the workspace (with MPI); the kernels and trainer again with AVX2 kernels only
# (the CPU dispatch's other path); the CUDA kernel sources under NVRTC; the NCCL and GPU tests'
# build (they skip at run time without a GPU).
cargo test --workspace --locked --features btm/mpi
BTM_CPU_ISA=avx2 cargo test -p btm-kernels -p btm-trainer --lib --locked
cargo test -p btm-kernels --features nvrtc --locked nvrtc
cargo test -p btm-collective -p btm-kernels --features nccl --locked gpu
