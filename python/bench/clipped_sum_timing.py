"""Times `Session.clipped_grad_sum` from Python (arrays in, NumPy arrays out) and what the
Python path adds to the Rust API call inside it. Prints the medians.

Each timed call is `Session._timed_clipped_grad_sum`, which is `clipped_grad_sum` (the same
code) and also returns the seconds of its `pdgc::Session::clipped_grad_sum` call: the rest
of the call's time, measured from Python, is the Python path's overhead (argument parsing,
array checks and copies in, NumPy arrays out). Both parts of one call see the same machine
load, which makes the comparison stable on a busy machine. To compare by hand,
`cargo run --release --example clipped_sum_timing` times the Rust API in its own process.

Run: python python/bench/clipped_sum_timing.py [MODEL.pdg] [BATCH] [THREADS] [CALLS]
(defaults: samples/mnist_cnn.pdg 128 2 30).
"""

import statistics
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
    total, rust = [], []
    for _ in range(calls):
        t = time.perf_counter()
        _, inside = session._timed_clipped_grad_sum(params, data, 1.0)
        total.append(time.perf_counter() - t)
        rust.append(inside)
    overhead = [t - r for t, r in zip(total, rust)]
    med = {k: statistics.median(v) * 1e3 for k, v in (("total", total), ("rust", rust), ("over", overhead))}
    print(f"clipped_grad_sum {path} B={batch} threads={threads}, medians of {calls} calls: "
          f"from Python {med['total']:.3f} ms, of which the Rust API call {med['rust']:.3f} ms; "
          f"the Python path adds {med['over']:.3f} ms ({100 * med['over'] / med['rust']:.2f}%)")

if __name__ == "__main__":
    main()
