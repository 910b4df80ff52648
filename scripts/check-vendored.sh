#!/usr/bin/env bash
# The vendored crates in third_party/ must be crates.io's release plus the patch beside them,
# nothing else: fetch each release with cargo, apply the patch to a copy of its src/ and
# build.rs, and compare with the vendored ones. Exits non-zero, naming the files, on any drift.
#
#   bash scripts/check-vendored.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A throwaway package whose only purpose is to make cargo download the releases.
mkdir -p "$work/fetch/src"
cat > "$work/fetch/Cargo.toml" <<'EOF'
[package]
name = "btm-vendored-check"
version = "0.0.0"
edition = "2021"
[dependencies]
candle-core = { version = "=0.11.1", default-features = false }
gemm-common = { version = "=0.19.0", default-features = false }
candle-kernels = "=0.11.1"
EOF
touch "$work/fetch/src/lib.rs"
(cd "$work/fetch" && cargo fetch -q)
registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/ | head -n 1)

status=0
check() { # name version vendored-dir patch
    local name=$1 version=$2 vendored=$3 patch=$4
    local upstream="$registry/$name-$version"
    [ -d "$upstream/src" ] || { echo "check-vendored: $name $version was not fetched ($upstream)" >&2; exit 1; }
    mkdir -p "$work/$name"
    cp -r "$upstream/src" "$work/$name/src"
    [ -f "$upstream/build.rs" ] && cp "$upstream/build.rs" "$work/$name/build.rs"
    (cd "$work/$name" && patch -s -p1 < "$OLDPWD/$patch")
    if diff -r "$work/$name/src" "$vendored/src" > "$work/$name.diff" \
        && { [ ! -f "$work/$name/build.rs" ] || diff "$work/$name/build.rs" "$vendored/build.rs" >> "$work/$name.diff"; }; then
        echo "check-vendored: $vendored = $name $version + $patch"
    else
        echo "check-vendored: $vendored drifted from $name $version + $patch:" >&2
        cat "$work/$name.diff" >&2
        status=1
    fi
}
check candle-core 0.11.1 third_party/candle-core third_party/candle-core-backprop.patch
check gemm-common 0.19.0 third_party/gemm-common third_party/gemm-common-isa-cap.patch
check candle-kernels 0.11.1 third_party/candle-kernels third_party/candle-kernels-check-only.patch
exit $status
