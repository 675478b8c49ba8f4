"""End-to-end DP-SGD epochs: pdgc against Opacus on Fashion-MNIST, timed one after another in
one run on one machine.

    python benches/peers/fashion_epoch.py                           # 2 epochs of each system, 2 threads
    python benches/peers/fashion_epoch.py --epochs 5 --threads 1
    python benches/peers/fashion_epoch.py --limit 4096 --epochs 1   # a smoke test: measures nothing

The job, the same in every system: the Papernot et al. tanh CNN (samples/mnist_cnn.pdg;
nets.py's `mnist_cnn` for PyTorch) trained privately on Fashion-MNIST's 60000 training
images; Poisson sampling with rate q = 2048/N (N = 60000), round(1/q) = 29 steps per epoch;
per-example clipping to C = 0.12; Gaussian noise of std sigma*C added once to the clipped sum;
the sum divided by the expected batch q*N = 2048; SGD with lr 4 and momentum 0.9 (PyTorch
semantics); the logical batch cut into physical batches of at most 256; pixels normalized as
(p/255 - 0.2860)/0.3530 (pdgc's src/data.rs; here from the IDX files of Debian's
dataset-fashion-mnist with gzip and numpy). sigma is the noise multiplier that spends
epsilon = 2.9 at delta = 1e-5 over the run's epochs by pdgc's default PLD accountant (`pdgc
privacy --epsilon 2.9 ...`, the function `pdgc train --epsilon` uses), unless --noise gives it.

What each system runs, every one in its own process pinned to the first T CPUs (peers.py's
Runner: OMP/MKL/OpenBLAS thread variables set to T):

* pdgc: `pdgc train samples/mnist_cnn.pdg --data fashion-mnist --epochs E --batch 2048 --lr 4
  --momentum 0.9 --clip 0.12 --epsilon 2.9 --seed 1 --threads T --device cpu --micro-batch 256`
  (`--noise sigma` instead of `--epsilon` when --noise is given). Its stderr names the sigma
  it chose (checked against ours) and its micro-batch; each stdout line `epoch k/E: test
  accuracy A%, ..., S s` gives an epoch's accuracy and seconds. pdgc's epoch time (src/train.rs,
  Trainer::run) covers the epoch's steps (drawing each Poisson batch, gathering its examples,
  the clipped sum in micro-batches of 256, noise, the SGD update), then the test accuracy and
  loss over all 10000 test images (forward passes of at most 256), then epsilon so far (PLD);
  not the model's compilation, the data loading or the process start.
* opacus: Opacus 1.6, PrivacyEngine(accountant="prv").make_private(grad_sample_mode="hooks",
  noise_multiplier=sigma, max_grad_norm=0.12, poisson_sampling=False) on a DPDataLoader
  (Opacus' Poisson sampler) built with sample_rate q and round(1/q) steps, because
  make_private's own Poisson loader would take q = 1/ceil(N/2048) = 1/30; the optimizer's
  expected batch is set to q*N and the accountant's step hook to rate q for the same reason.
  Each epoch: BatchMemoryManager(max_physical_batch_size=256) splits every logical batch into
  near-equal physical batches of at most 256 (pdgc cuts 256, 256, ..., remainder); for each:
  zero_grad, forward, mean cross-entropy, backward (hooks store per-sample gradients), step
  (clip and accumulate; after the last physical batch of a logical one: noise, divide by q*N,
  SGD). Then, as pdgc: accuracy and mean loss over the 10000 test images (eval mode, no_grad,
  batches of 256) and epsilon from Opacus' PRV accountant (the numerical one closest to
  pdgc's PLD). The epoch's time is time.perf_counter around exactly that, so model building,
  make_private, imports and data loading are outside it, as for pdgc. Batches come from a
  TensorDataset through the DataLoader (one __getitem__ per example, then default_collate),
  the ordinary Opacus path; that is part of the timed epoch, as pdgc's gather is part of its.
* ghost: the same with grad_sample_mode="ghost" (Opacus ghost clipping): make_private also
  returns the wrapped criterion, whose loss.backward() runs both backward passes (per-sample
  norms, then the clipped sum into p.grad), and step accumulates it.

The two sides draw different batches, noise and initial parameters (pdgc: ChaCha20 streams
keyed by --seed 1 and its own PyTorch-style init; Opacus: torch's generator seeded with 1 and
PyTorch's init), so accuracies agree only statistically.

Options: --pdgc PATH (default: $PDGC, target/release/pdgc, pdgc on PATH), --epochs E
(default 2), --threads T (default 2), --systems pdgc,opacus,ghost, --noise SIGMA, --limit N
(only the first N training examples: q = 2048/N, round(1/q) steps per epoch; to see that
everything runs, not to measure). Progress goes to stderr; stdout gets one markdown table and
the machine's description. See benches/peers/README.md.
"""

import argparse
import gzip
import json
import math
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from nets import NETS, torch_model
from peers import ROOT, Runner, find_pdgc, log, machine, warn_if_busy

DATA = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
         "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
MEAN, STD = np.float32(0.2860), np.float32(0.3530)
# The job (see the module doc).
BATCH, LR, MOMENTUM, CLIP, EPSILON, DELTA, SEED, MICRO_BATCH = 2048, 4.0, 0.9, 0.12, 2.9, 1e-5, 1, 256
SYSTEMS = {  # system -> table row title
    "pdgc": "pdgc (`pdgc train`)",
    "opacus": "Opacus (hooks)",
    "ghost": "Opacus ghost clipping",
}
PACKAGES = ["torch", "opacus", "numpy", "scipy"]


# ---------------------------------------------------------------- data


def read_idx(name: str) -> np.ndarray:
    """One IDX file of unsigned bytes (`name.gz` in DATA) as an array of its dimensions."""
    path = DATA / f"{name}.gz"
    if not path.is_file():
        sys.exit(f"{path} is missing: apt-get install dataset-fashion-mnist")
    with gzip.open(path) as f:
        raw = f.read()
    if raw[:3] != b"\0\0\x08":
        sys.exit(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_idx(path: Path, array: np.ndarray):
    """`array` (unsigned bytes) as a raw IDX file."""
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def normalize(images: np.ndarray) -> np.ndarray:
    """Pixels as pdgc reads them: float32 `(p/255 - 0.2860)/0.3530`, shape [n, 1, 28, 28]."""
    x = (images.astype(np.float32) / np.float32(255) - MEAN) / STD
    return x.reshape(len(images), 1, 28, 28)


def load(limit) -> tuple:
    """(train x, train y, test x, test y), the training set cut to its first `limit` examples."""
    train_x, train_y = read_idx(FILES["train_x"]), read_idx(FILES["train_y"])
    if limit:
        train_x, train_y = train_x[:limit], train_y[:limit]
    return (normalize(train_x), train_y.astype(np.int64), normalize(read_idx(FILES["test_x"])),
            read_idx(FILES["test_y"]).astype(np.int64))


def limited_data_dir(tmp: Path, limit: int) -> str:
    """A directory for `pdgc train --data fashion-mnist:DIR` with the first `limit` training
    examples (raw IDX) and the whole test set (links to the .gz files)."""
    write_idx(tmp / FILES["train_x"], read_idx(FILES["train_x"])[:limit])
    write_idx(tmp / FILES["train_y"], read_idx(FILES["train_y"])[:limit])
    for key in ("test_x", "test_y"):
        (tmp / f"{FILES[key]}.gz").symlink_to(DATA / f"{FILES[key]}.gz")
    return f"fashion-mnist:{tmp}"


def steps_per_epoch(n: int) -> int:
    """round(1/q) with q = BATCH/n, rounding halves up as Rust's f64::round (pdgc's Sampling)."""
    return max(1, math.floor(n / BATCH + 0.5))


# ---------------------------------------------------------------- the Opacus side (a child process)


def evaluate(model, x, y) -> tuple:
    """Test accuracy and mean cross-entropy, in batches of MICRO_BATCH (as pdgc's evaluate)."""
    import torch
    import torch.nn.functional as F
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(y), MICRO_BATCH):
            logits = model(x[start:start + MICRO_BATCH])
            correct += (logits.argmax(1) == y[start:start + MICRO_BATCH]).sum().item()
            loss += F.cross_entropy(logits, y[start:start + MICRO_BATCH], reduction="sum").item()
    model.train()
    return correct / len(y), loss / len(y)


def opacus_worker(args) -> int:
    """Trains with Opacus (args.worker: "opacus" or "ghost") and prints one JSON line per epoch."""
    import warnings
    warnings.filterwarnings("ignore")  # Opacus warns about the secure RNG.
    import torch
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    train_x, train_y, test_x, test_y = (torch.from_numpy(a) for a in load(args.limit))
    n = len(train_y)
    rate = BATCH / n
    loader = DPDataLoader(torch.utils.data.TensorDataset(train_x, train_y), sample_rate=rate,
                          generator=torch.Generator().manual_seed(SEED))
    loader.batch_sampler.steps = steps_per_epoch(n)
    model = torch_model(NETS["mnist_cnn"])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    engine = PrivacyEngine(accountant="prv")
    made = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=args.noise,
                               max_grad_norm=CLIP, poisson_sampling=False,
                               grad_sample_mode="ghost" if args.worker == "ghost" else "hooks",
                               criterion=torch.nn.CrossEntropyLoss())
    dp_model, dp_optimizer, loader = made[0], made[1], made[-1]
    criterion = made[2] if args.worker == "ghost" else torch.nn.CrossEntropyLoss()
    # make_private derives the rate from len(loader) (1/29 here); use q itself, as pdgc does.
    dp_optimizer.expected_batch_size = rate * n
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=rate))
    log(f"{n} training / {len(test_y)} test examples, {len(loader)} steps per epoch, "
        f"expected batch {rate * n:.1f}, physical batch at most {MICRO_BATCH}, sigma {args.noise}")
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        examples = 0
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=MICRO_BATCH,
                                optimizer=dp_optimizer) as physical:
            for x, y in physical:
                examples += len(y)
                dp_optimizer.zero_grad(set_to_none=True)
                criterion(dp_model(x), y).backward()
                dp_optimizer.step()
        accuracy, test_loss = evaluate(dp_model, test_x, test_y)
        epsilon = engine.accountant.get_epsilon(DELTA)
        seconds = time.perf_counter() - start
        print(json.dumps({"epoch": epoch, "accuracy": accuracy, "test_loss": test_loss, "epsilon": epsilon,
                          "mean_batch": examples / len(loader), "seconds": seconds}), flush=True)
    return 0


# ---------------------------------------------------------------- running the systems


def run_child(name: str, cmd: list, runner: Runner, on_line) -> dict:
    """Runs `cmd` pinned as peers.py's Runner pins, calls `on_line` with each stdout line as it
    comes, and passes stderr on to ours (prefixed with `name`). Returns rc, the stderr lines
    and the process's wall seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=runner.env, cwd=ROOT, preexec_fn=lambda: os.sched_setaffinity(0, runner.cpus))
    stderr = []

    def pump():
        for line in proc.stderr:
            stderr.append(line.rstrip("\n"))
            log(f"  {name}: {stderr[-1]}")

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    for line in proc.stdout:
        on_line(line.rstrip("\n"))
    rc = proc.wait()
    pumping.join()
    return {"rc": rc, "stderr": stderr, "wall_s": time.perf_counter() - start}


EPOCH_LINE = re.compile(r"^epoch\s+(\d+)/\d+: test accuracy ([\d.]+)%.*ε = ([\d.]+) .*, ([\d.]+) s$")


def run_pdgc(args, runner, pdgc, sigma, data) -> dict:
    """`pdgc train` on the job; its epochs parsed from stdout."""
    noise = ["--noise", sigma] if args.noise else ["--epsilon", EPSILON]
    cmd = [pdgc, "train", "samples/mnist_cnn.pdg", "--data", data, "--epochs", args.epochs, "--batch", BATCH,
           "--lr", LR, "--momentum", MOMENTUM, "--clip", CLIP, *noise, "--seed", SEED, "--threads", args.threads,
           "--device", "cpu", "--micro-batch", MICRO_BATCH]
    log("pdgc: " + " ".join(map(str, cmd)))
    epochs = []

    def on_line(line):
        m = EPOCH_LINE.match(line)
        if m:
            epochs.append({"accuracy": float(m[2]) / 100, "epsilon": float(m[3]), "seconds": float(m[4])})
            log(f"pdgc: {line}")

    res = run_child("pdgc", cmd, runner, on_line)
    chosen = [float(m[1]) for line in res["stderr"] if (m := re.search(r"noise multiplier σ = ([\d.]+)", line))]
    if chosen and abs(chosen[0] - sigma) > 5e-5:
        log(f"warning: pdgc chose σ = {chosen[0]}, the peers got {sigma}")
    micro = [int(m[1]) for line in res["stderr"] if (m := re.search(r"micro-batch (\d+)", line))]
    if micro and micro[0] != MICRO_BATCH:
        log(f"warning: pdgc says micro-batch {micro[0]}, Opacus' physical batch is {MICRO_BATCH}")
    return result(res, epochs, args.epochs)


def run_opacus(args, runner, system, sigma) -> dict:
    """This script's Opacus worker mode in a child process."""
    cmd = [sys.executable, Path(__file__).resolve(), "--worker", system, "--noise", repr(sigma), "--epochs",
           args.epochs, "--threads", args.threads, *(["--limit", args.limit] if args.limit else [])]
    epochs = []

    def on_line(line):
        r = json.loads(line)
        epochs.append(r)
        log(f"{system}: epoch {r['epoch']}/{args.epochs}: test accuracy {100 * r['accuracy']:.2f}%, "
            f"test loss {r['test_loss']:.4f}, ε = {r['epsilon']:.3f}, mean batch {r['mean_batch']:.1f}, "
            f"{r['seconds']:.1f} s")

    return result(run_child(system, cmd, runner, on_line), epochs, args.epochs)


def result(res: dict, epochs: list, expected: int) -> dict:
    if res["rc"] != 0 or len(epochs) != expected:
        tail = " | ".join(res["stderr"][-3:])[-300:]
        return {"error": f"exit {res['rc']} after {len(epochs)} epoch(s): {tail}"}
    return {"epochs": epochs, "wall_s": res["wall_s"]}


def noise_multiplier(args, pdgc, n) -> float:
    """--noise, else the σ `pdgc privacy` finds for ε = EPSILON over the run's steps."""
    if args.noise:
        return args.noise
    steps = steps_per_epoch(n) * args.epochs
    cmd = [pdgc, "privacy", "--epsilon", EPSILON, "--batch", BATCH, "--dataset-size", n, "--steps", steps,
           "--delta", DELTA]
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    m = re.search(r"^noise multiplier\s+([\d.eE+-]+)$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        sys.exit(f"{' '.join(map(str, cmd))} failed: {out.stderr.strip() or out.stdout.strip()}")
    return float(m[1])


# ---------------------------------------------------------------- the table


def print_table(args, machine_lines, sigma, n, results):
    limited = f" (**--limit {args.limit}: a smoke test, it measures nothing**)" if args.limit else ""
    print(f"### DP-SGD epochs on Fashion-MNIST, mnist_cnn, {args.threads} thread(s){limited}\n")
    print("| system | epochs | seconds per epoch | median s/epoch | final test accuracy | final ε (δ = 1e-5) "
          "| whole process s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    accountant = {"pdgc": "PLD", "opacus": "PRV", "ghost": "PRV"}
    for system, r in results.items():
        if "error" in r:
            print(f"| {SYSTEMS[system]} | failed: {r['error']} | | | | | |")
            continue
        seconds = [e["seconds"] for e in r["epochs"]]
        last = r["epochs"][-1]
        print(f"| {SYSTEMS[system]} | {len(seconds)} | {', '.join(f'{s:.1f}' for s in seconds)} "
              f"| {statistics.median(seconds):.1f} | {100 * last['accuracy']:.2f}% "
              f"| {last['epsilon']:.3f} ({accountant[system]}) | {r['wall_s']:.1f} |")
    print()
    print(f"- the job: {n} training / 10000 test examples, Poisson rate q = {BATCH}/{n}, {steps_per_epoch(n)} steps "
          f"per epoch, C = {CLIP}, σ = {sigma:.6g}, SGD lr {LR:g} momentum {MOMENTUM}, physical batch {MICRO_BATCH}")
    print("- an epoch's seconds: its steps, then test accuracy and loss over the 10000 test images, then ε so far; "
          "whole process: start to exit (imports, data, compilation or make_private, all epochs)")
    for line in machine_lines:
        print(line)


def main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--pdgc", help="the pdgc binary (default: $PDGC, target/release/pdgc, pdgc on PATH)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of every system (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every system (default 2)")
    ap.add_argument("--systems", default="pdgc,opacus,ghost", help="comma-separated, of pdgc, opacus, ghost")
    ap.add_argument("--noise", type=float, help="noise multiplier σ (default: pdgc's σ for ε = 2.9 over the run)")
    ap.add_argument("--limit", type=int, help="only the first N training examples: a smoke test, measures nothing")
    ap.add_argument("--worker", choices=["opacus", "ghost"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return opacus_worker(args)
    systems = [s for s in args.systems.split(",") if s]
    if not systems or any(s not in SYSTEMS for s in systems):
        ap.error(f"--systems takes a comma-separated list of {', '.join(SYSTEMS)}")
    if args.epochs < 1 or args.threads < 1:
        ap.error("--epochs and --threads must be at least 1")
    n = len(read_idx(FILES["train_y"]))
    if args.limit:
        if not BATCH <= args.limit <= n:
            ap.error(f"--limit must be between the batch {BATCH} and {n}")
        n = args.limit
    pdgc = find_pdgc(args.pdgc)
    runner = Runner(args.threads)
    warn_if_busy()
    machine_lines = machine(pdgc, runner, PACKAGES)  # now, for the load average at the start
    if args.limit:
        log(f"--limit {args.limit}: a smoke test; its times measure nothing")
    sigma = noise_multiplier(args, pdgc, n)
    log(f"σ = {sigma} ({'--noise' if args.noise else f'ε = {EPSILON} at δ = {DELTA} over {args.epochs} epoch(s)'})")
    results = {}
    with tempfile.TemporaryDirectory(prefix="fashion-epoch-") as tmp:
        for system in systems:
            if system == "pdgc":
                data = limited_data_dir(Path(tmp), args.limit) if args.limit else "fashion-mnist"
                results[system] = run_pdgc(args, runner, pdgc, sigma, data)
            else:
                results[system] = run_opacus(args, runner, system, sigma)
            if "error" in results[system]:
                log(f"{system}: failed: {results[system]['error']}")
    print_table(args, machine_lines, sigma, n, results)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
