#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: check the CUDA sessions against the reference and the
# PyTorch vectors, then time pdgc's clipped-sum step against its non-private step, each
# contraction kernel's FLOP/s against the device's FP32 peak, and PyTorch (non-private,
# torch.func vmap, Opacus) on the same GPU. Prints one summary at the end. Meant to finish
# well inside 10 min.
#
#   scripts/gpu-check.sh                    # in the repository: builds with cargo first
#   gpu-bundle/gpu-check.sh                 # from scripts/gpu-bundle.sh's bundle: no Rust needed
#   PDGC_GPU_QUICK=1 scripts/gpu-check.sh   # correctness only
#
# NVRTC: the bundle's own (nvrtc/), else LD_LIBRARY_PATH, $PDGC_NVRTC_DIR, .ci/cuda,
# /usr/local/cuda/lib64, or the nvidia-cuda-nvrtc wheel beside PyTorch; a versioned library
# alone (libnvrtc.so.13) is linked as libnvrtc.so, the first name cudarc loads.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ -x "$HERE/bin/pdgc" ]; then
    BUNDLE=1
    ROOT="$HERE"
else
    BUNDLE=0
    ROOT="$(cd "$HERE/.." && pwd)"
fi
cd "$ROOT"
OUT_DIR="${OUT:-$ROOT/target/gpu-check}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

find_nvrtc() {
    local d
    for d in "$ROOT/nvrtc" "${PDGC_NVRTC_DIR:-}" "$ROOT/.ci/cuda/nvidia/cuda_nvrtc/lib" /usr/local/cuda/lib64 \
        $(python3 -c 'import glob, os, sys
for p in sys.path:
    for d in glob.glob(os.path.join(p, "nvidia", "*", "lib")) + glob.glob(os.path.join(p, "nvidia", "cu*", "lib")):
        print(d)' 2>/dev/null); do
        [ -n "$d" ] && ls "$d"/libnvrtc.so* >/dev/null 2>&1 || continue
        if ls "$d"/libnvrtc.so "$d"/libnvrtc.so.12 >/dev/null 2>&1; then
            echo "$d"
        else
            # Only a newer versioned library: link it under the plain name cudarc tries first.
            mkdir -p "$OUT_DIR/nvrtc-link"
            ln -sf "$(ls "$d"/libnvrtc.so.* | grep -v builtins | head -1)" "$OUT_DIR/nvrtc-link/libnvrtc.so"
            echo "$OUT_DIR/nvrtc-link:$d"
        fi
        return 0
    done
    return 1
}
if nvrtc_dir=$(find_nvrtc); then
    export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "NVRTC from $nvrtc_dir"
else
    say "no NVRTC found: the CUDA checks will fail (see the comment at the top of this script)"
fi
say "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"

# The numerics tests that run CUDA sessions on the GPU (the CUDA C on the host is CI's).
GPU_TESTS="--exact cuda_every_strategy_matches_the_reference cuda_matches_pytorch_vectors auto_without_cuda_runs_on_the_cpu_and_says_why"
if [ "$BUNDLE" = 1 ]; then
    PDGC="$ROOT/bin/pdgc"
    say "== correctness (bundle): CUDA sessions vs the f64 reference (every strategy) and the PyTorch vectors"
    start=$(date +%s)
    PDGC_TEST_ROOT="$ROOT" PDGC_REQUIRE_GPU=1 "$ROOT/bin/numerics" $GPU_TESTS 2>&1 | tee -a "$LOG" |
        grep -E "^test |test result|panicked|on NVIDIA"
    correctness=${PIPESTATUS[0]}
else
    say "== build (release)"
    cargo build --release --locked 2>&1 | tail -2 | tee -a "$LOG" || exit 1
    PDGC="$ROOT/target/release/pdgc"
    say "== correctness: CUDA sessions vs the f64 reference (every strategy) and the PyTorch vectors"
    start=$(date +%s)
    PDGC_REQUIRE_GPU=1 cargo test --release --locked --test numerics -- $GPU_TESTS 2>&1 | tee -a "$LOG" |
        grep -E "^test |test result|panicked|on NVIDIA"
    correctness=${PIPESTATUS[0]}
fi
say "   ($(( $(date +%s) - start )) s, exit $correctness)"

# The device's FP32 peak: multiprocessors x FP32 lanes per multiprocessor x 2 x max clock.
peak_gflops=$(python3 - <<'PY' 2>/dev/null
import subprocess, torch
p = torch.cuda.get_device_properties(0)
lanes = {(7, 0): 64, (8, 0): 64}.get((p.major, p.minor), 128)
mhz = float(subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True).stdout.split()[0])
print(f"{p.multi_processor_count * lanes * 2 * mhz / 1e3:.0f}")
PY
)
say "FP32 peak: ${peak_gflops:-unknown} GFLOP/s"
# Opacus from the bundle's wheel when the machine's Python lacks it.
if ls "$ROOT"/wheels/*.whl >/dev/null 2>&1 && ! python3 -c "import opacus" 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-index --target "$OUT_DIR/py" \
        "$ROOT"/wheels/*.whl >> "$LOG" 2>&1 && export PYTHONPATH="$OUT_DIR/py${PYTHONPATH:+:$PYTHONPATH}"
fi

summary=()
if [ "${PDGC_GPU_QUICK:-0}" != "1" ]; then
    say "== timings: pdgc (clipped sum vs non-private, kernels' FLOP/s) and PyTorch on the same GPU"
    for spec in "cifar_cnn 256" "alexnet 16" "vgg16 8" "resnet18_gn 32" "mnist_cnn 256"; do
        set -- $spec
        say "-- $1, batch $2"
        bench="$OUT_DIR/bench-$1.json"
        if ! timeout 240 "$PDGC" bench "samples/$1.pdg" --batch "$2" --device cuda --repeats 10 --auto-only \
            --profile --format json > "$bench" 2>> "$LOG"; then
            say "$1: pdgc bench failed (see $LOG)"
            summary+=("$1 B=$2: pdgc bench failed")
            continue
        fi
        peers="$OUT_DIR/peers-$1.json"
        if python3 -c "import sys; sys.path.insert(0, 'benches/peers'); import nets; sys.exit('$1' not in nets.NETS)" 2>/dev/null; then
            timeout 300 python3 benches/peers/gpu.py --net "$1" --batch "$2" > "$peers" 2>> "$LOG" || true
        else
            echo '{"ms": {}, "errors": {"all": "no PyTorch twin in benches/peers/nets.py"}}' > "$peers"
        fi
        line=$(python3 - "$bench" "$peers" "${peak_gflops:-0}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
try:
    peers = json.load(open(sys.argv[2]))
except (OSError, ValueError):
    peers = {"ms": {}, "errors": {"all": "the PyTorch run failed (see the log)"}}
peak = float(sys.argv[3])
auto = next(c for c in r["columns"] if c["config"] == "auto")
np_ms, cs_ms = r["nonprivate_ms"], auto["clipped_sum_ms"]
ms = lambda s: f'{peers["ms"][s]:.2f}' if peers["ms"].get(s) is not None else "n/a"
print(f'{r["model"]:<12} B={r["batch"]:<4} pdgc non-private {np_ms:8.2f} ms  clipped sum {cs_ms:8.2f} ms '
      f'({cs_ms / np_ms:.2f}x) | PyTorch non-private {ms("torch")}  vmap {ms("vmap")}  Opacus {ms("opacus")} ms')
if peers.get("errors"):
    print("    peers not run: " + "; ".join(f"{k}: {v}" for k, v in peers["errors"].items()))
for p in r.get("profile", []):
    for name, kms, launches, gflops, contraction in (k for k in p["kernels"] if k[4]):
        share = f" = {100 * gflops / peak:.0f}% of peak" if peak > 0 else ""
        print(f'    {p["step"]}: {name} {kms:.3f} ms, {gflops:.0f} GFLOP/s{share}')
PY
)
        say "$line"
        summary+=("$(echo "$line" | head -1)")
    done
fi

echo
echo "===== gpu-check summary ====="
[ "$correctness" = 0 ] && echo "correctness: PASS" || echo "correctness: FAIL (exit $correctness)"
echo "FP32 peak: ${peak_gflops:-unknown} GFLOP/s"
for l in "${summary[@]}"; do echo "$l"; done
echo "(log: $LOG)"
[ "$correctness" = 0 ]
