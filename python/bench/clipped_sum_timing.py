"""Times `Session.clipped_grad_sum` from Python (arrays in, NumPy arrays out): compare with
`cargo run --release --example clipped_sum_timing`, which times the same call through the
Rust API. Prints the median of the timed calls.

Run: python python/bench/clipped_sum_timing.py [MODEL.pdg] [BATCH] [THREADS] [CALLS]
(defaults: samples/mnist_cnn.pdg 128 2 30).
"""

import sys
import time

import numpy as np

import pdgc


def main() -> None:
    args = sys.argv[1:]
    path = args[0] if len(args) > 0 else "samples/mnist_cnn.pdg"
    batch = int(args[1]) if len(args) > 1 else 128
    threads = int(args[2]) if len(args) > 2 else 2
    calls = int(args[3]) if len(args) > 3 else 30
    module = pdgc.compile(path, batch=batch, device="cpu")
    session = module.session(threads=threads)
    params = module.init_params(0)
    rng = np.random.default_rng(1)
    data = {name: rng.standard_normal((batch, *shape)).astype(np.float32) for name, shape in module.inputs.items()}
    data[module.label] = np.arange(batch) % 10
    for _ in range(3):
        session.clipped_grad_sum(params, data, 1.0)  # Warm-up.
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        session.clipped_grad_sum(params, data, 1.0)
        times.append(time.perf_counter() - t)
    times.sort()
    print(f"python clipped_grad_sum {path} B={batch} threads={threads}: "
          f"median {times[calls // 2] * 1e3:.3f} ms over {calls} calls")


if __name__ == "__main__":
    main()
