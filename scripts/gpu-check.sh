#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build, check the CUDA session against the reference,
# the CPU session and the PyTorch vectors, then time the clipped-sum step against the
# non-private step. Prints one summary at the end. Meant to finish in well under 10 min.
#
#   scripts/gpu-check.sh                 # everything
#   PDGC_GPU_QUICK=1 scripts/gpu-check.sh   # correctness only
#
# NVRTC is found through LD_LIBRARY_PATH; if it is not there, this script looks in
# $PDGC_NVRTC_DIR, .ci/cuda (what .ci/run installs) and /usr/local/cuda/lib64.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-target/gpu-check}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

for d in "${PDGC_NVRTC_DIR:-}" "$PWD/.ci/cuda/nvidia/cuda_nvrtc/lib" /usr/local/cuda/lib64; do
    if [ -n "$d" ] && ls "$d"/libnvrtc.so* >/dev/null 2>&1; then
        export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        break
    fi
done
say "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"

say "== build (release)"
cargo build --release --locked 2>&1 | tail -2 | tee -a "$LOG" || exit 1
PDGC=target/release/pdgc

say "== correctness: CUDA sessions vs the f64 reference (every strategy) and the PyTorch vectors"
start=$(date +%s)
PDGC_REQUIRE_GPU=1 cargo test --release --locked --test numerics -- cuda_ auto_without 2>&1 | tee -a "$LOG" | grep -E "^test |test result|panicked|on NVIDIA"
correctness=${PIPESTATUS[0]}
say "   ($(( $(date +%s) - start )) s, exit $correctness)"

summary=()
if [ "${PDGC_GPU_QUICK:-0}" != "1" ]; then
    say "== timings: clipped-sum step vs the non-private step (auto plan)"
    for spec in "cifar_cnn 256" "alexnet 16" "vgg16 8" "mnist_cnn 256" "resnet18_gn 32"; do
        set -- $spec
        say "-- $1, batch $2"
        if timeout 240 "$PDGC" bench "samples/$1.pdg" --batch "$2" --device cuda --repeats 10 --strategy unfold \
            --format json > "$OUT_DIR/bench-$1.json" 2>> "$LOG"; then
            line=$(python3 - "$OUT_DIR/bench-$1.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
auto = next(c for c in r["columns"] if c["config"] == "auto")
print(f'{r["model"]:<12} B={r["batch"]:<4} non-private {r["nonprivate_ms"]:8.2f} ms  clipped sum {auto["clipped_sum_ms"]:8.2f} ms '
      f'({auto["clipped_sum_ms"] / r["nonprivate_ms"]:.2f}x)  on {r["device"]}')
PY
)
            say "$line"
            summary+=("$line")
        else
            say "$1: bench failed (see $LOG)"
            summary+=("$1: bench failed")
        fi
    done
fi

echo
echo "===== gpu-check summary ====="
[ "$correctness" = 0 ] && echo "correctness: PASS" || echo "correctness: FAIL (exit $correctness)"
for l in "${summary[@]}"; do echo "$l"; done
echo "(log: $LOG)"
[ "$correctness" = 0 ]
