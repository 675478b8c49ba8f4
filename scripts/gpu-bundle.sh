#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh needs on a GPU machine that has the NVIDIA driver,
# Python and PyTorch but no Rust toolchain: the stripped release CLI, the stripped numerics
# test binary, the samples and test vectors, NVRTC 12.9 (the version the CLI's cudarc
# bindings name), the GPU peers script with an Opacus wheel, and gpu-check.sh itself, as
# one compressed tarball that must stay under 60 MiB.
#
#   scripts/gpu-bundle.sh                 # -> target/gpu-bundle.tar.xz
#   scripts/gpu-bundle.sh --no-nvrtc      # leave NVRTC out: gpu-check then uses the machine's own
#
# On the GPU machine:
#   tar -xJf gpu-bundle.tar.xz && gpu-bundle/gpu-check.sh
#
# NVRTC comes from $PDGC_NVRTC_DIR, else .ci/cuda (what .ci/run installs from PyPI), else
# it is installed there the way .ci/run does it. Without it in the bundle, gpu-check.sh looks
# for the machine's libnvrtc (CUDA's lib64, or the nvidia-cuda-nvrtc wheel next to PyTorch)
# and links it under the name cudarc loads first, `libnvrtc.so`.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=60
with_nvrtc=1
for a in "$@"; do
    case "$a" in
        --no-nvrtc) with_nvrtc=0 ;;
        -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu-bundle: unknown argument $a (try --help)" >&2; exit 2 ;;
    esac
done
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
STAGE="$TARGET/gpu-bundle"
rm -rf "$STAGE"
mkdir -p "$STAGE/bin" "$STAGE/tests"

echo "== building the release CLI and the numerics tests"
cargo build --release --locked
test_bin=$(cargo test --release --locked --test numerics --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "numerics" and m.get("executable"):
        print(m["executable"])')
[ -x "$test_bin" ] || { echo "gpu-bundle: no numerics test binary found" >&2; exit 1; }
strip -o "$STAGE/bin/pdgc" "$TARGET/release/pdgc"
strip -o "$STAGE/bin/numerics" "$test_bin"

echo "== samples, test vectors, scripts"
cp -r samples "$STAGE/samples"
cp -r tests/data "$STAGE/tests/data"
cp scripts/gpu-check.sh "$STAGE/gpu-check.sh"
mkdir -p "$STAGE/benches/peers"
cp benches/peers/gpu.py benches/peers/nets.py benches/peers/worker.py "$STAGE/benches/peers/"
# Opacus for the PyTorch peers (pure Python; its dependencies are on the GPU image).
mkdir -p "$STAGE/wheels"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$STAGE/wheels" opacus==1.6.0 ||
    echo "gpu-bundle: could not download the Opacus wheel; gpu-check will report Opacus as not run" >&2

if [ "$with_nvrtc" = 1 ]; then
    dir="${PDGC_NVRTC_DIR:-$PWD/.ci/cuda/nvidia/cuda_nvrtc/lib}"
    if ! ls "$dir"/libnvrtc.so.12 >/dev/null 2>&1; then
        echo "== installing NVRTC 12.9 from PyPI into .ci/cuda"
        python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$PWD/.ci/cuda" \
            nvidia-cuda-nvrtc-cu12==12.9.86
        dir="$PWD/.ci/cuda/nvidia/cuda_nvrtc/lib"
    fi
    mkdir -p "$STAGE/nvrtc"
    cp "$dir"/libnvrtc.so.12 "$dir"/libnvrtc-builtins.so.12.* "$STAGE/nvrtc/"
fi

echo "== compressing"
out="$TARGET/gpu-bundle.tar.xz"
tar -C "$TARGET" -cf - gpu-bundle | xz -T0 -6 > "$out.tmp"
mv "$out.tmp" "$out"
bytes=$(stat -c %s "$out")
echo "$out: $((bytes / 1024 / 1024)) MiB ($bytes bytes)"
if [ "$bytes" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "gpu-bundle: the bundle exceeds $LIMIT_MIB MiB; try --no-nvrtc" >&2
    exit 1
fi
