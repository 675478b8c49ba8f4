"""The PyTorch peers on one CUDA GPU, for scripts/gpu-check.sh: the non-private step, the
torch.func vmap clipped sum and Opacus' clipped sum (hooks) of one net of nets.py, on
random inputs, each timed as the median of `--reps` steps after `--warmup` untimed ones,
with the device synchronized around every step.

    python3 benches/peers/gpu.py --net cifar_cnn --batch 256

Prints one JSON object: {"net", "batch", "device", "ms": {system: median ms or null},
"errors": {system: why it did not run}}. A system that cannot run here (Opacus not
installed, out of memory) is reported in "errors", never guessed. The steps are those of
the CPU peers benchmark (worker.py), moved to the GPU.
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np

from nets import NETS
from worker import torch_step

SYSTEMS = ("torch", "vmap", "opacus")


def time_system(system, net, batch, warmup, reps):
    import torch
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *net.input_shape)).astype(np.float32)
    y = rng.integers(0, net.classes, size=batch).astype(np.int64)
    step = torch_step(system, net, None, x, y, 1.0, 1, device="cuda")
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", required=True, choices=sorted(NETS))
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print(json.dumps({"net": args.net, "batch": args.batch, "device": None, "ms": {},
                          "errors": {"all": "torch sees no CUDA device"}}))
        return 1
    net = NETS[args.net]
    out = {"net": args.net, "batch": args.batch, "device": torch.cuda.get_device_name(0), "ms": {}, "errors": {}}
    for system in args.systems:
        try:
            out["ms"][system] = time_system(system, net, args.batch, args.warmup, args.reps)
        except Exception as e:  # an unavailable peer is a reported result, not a crash
            out["ms"][system] = None
            out["errors"][system] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        torch.cuda.empty_cache()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
