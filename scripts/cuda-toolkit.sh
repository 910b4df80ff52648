#!/usr/bin/env bash
# Prepare CUDA 13.0 from PyPI wheels on a machine with no GPU (adapted from the shared tools'
# recipe; the project keeps its own copy so CI can install what it needs).
#
#   eval "$(scripts/cuda-toolkit.sh --nvrtc-only)"   # NVRTC only (~100 MB): enough for
#                                                    # `cargo test -p btm-kernels --features nvrtc nvrtc`
#   eval "$(scripts/cuda-toolkit.sh)"                # nvcc, NVRTC, cuBLAS, cuRAND (~640 MB) and a
#                                                    # libcuda link stub, for candle's `cuda` build
#
# Optional last argument: the cache directory (default ~/.cache/cuda13-wheels). Downloads happen
# once; later runs only print the exports. Driver 580 = CUDA 13.0: keep these pins (newer
# NVRTC/nvcc emit PTX that driver rejects; cudarc 0.19.10 knows CUDA versions up to 13.4).
set -euo pipefail
NVRTC_ONLY=0
if [ "${1:-}" = "--nvrtc-only" ]; then NVRTC_ONLY=1; shift; fi
DEST="${1:-$HOME/.cache/cuda13-wheels}"
HERE="$(cd "$(dirname "$0")" && pwd)"
CR="$DEST/raw/nvidia/cu13"

fetch() {
  mkdir -p "$DEST/wheels" "$DEST/raw"
  python3 -m pip download -q --no-deps -d "$DEST/wheels" "$@" >&2
  for w in "$DEST"/wheels/*.whl; do
    [ -f "$w.unpacked" ] && continue
    python3 -m zipfile -e "$w" "$DEST/raw" >&2
    touch "$w.unpacked"
  done
}

if [ ! -e "$CR/lib/libnvrtc.so.13" ]; then
  fetch nvidia-cuda-nvrtc==13.0.88
fi
if [ "$NVRTC_ONLY" = 0 ] && [ ! -x "$CR/bin/nvcc" ]; then
  fetch nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
  chmod +x "$CR"/bin/* "$CR"/nvvm/bin/* 2>/dev/null || true
fi
( cd "$CR/lib" && for f in lib*.so.*; do ln -sf "$f" "${f%%.so.*}.so"; done )

echo "export LD_LIBRARY_PATH=\"$CR/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
if [ "$NVRTC_ONLY" = 0 ]; then
  mkdir -p "$CR/lib/stubs"
  [ -f "$CR/lib/stubs/libcuda.so" ] || gcc -shared -fPIC -Wl,-soname,libcuda.so.1 \
    -o "$CR/lib/stubs/libcuda.so" "$HERE/libcuda_stub.c"
  ln -sf libcuda.so "$CR/lib/stubs/libcuda.so.1"
  # LIBRARY_PATH: the linker finds libcudart, which candle-kernels links, in the wheels' lib.
  echo "export PATH=\"$CR/bin:\$PATH\" CUDA_ROOT=\"$CR\" CUDA_HOME=\"$CR\" CUDA_PATH=\"$CR\" CUDA_COMPUTE_CAP=90"
  echo "export LIBRARY_PATH=\"$CR/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""
fi
