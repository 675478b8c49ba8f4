"""pdgc against its peers: PyTorch, torch.func, Opacus, Opacus ghost clipping and JAX, timed
in one run on one machine, each measurement in a process of its own.

    python benches/peers/peers.py            # the timing table (5 nets x B = 32, 128)
    python benches/peers/peers.py --check    # first: do the clipped sums agree? (B = 4)
    python benches/peers/peers.py --memory   # VGG16 B = 16: one step each, time and peak RSS
    python benches/peers/peers.py --quick    # few repetitions, to see that everything runs

See benches/peers/README.md for what each column measures. Progress goes to stderr, the
tables to stdout (markdown).
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from nets import NETS, param_shapes, shapes

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TIMED_NETS = ["mnist_cnn", "cifar_cnn", "toy_l2_r4_k3", "toy_l3_r2_k5", "toy_l4_r2_k3"]
PEERS = {  # worker system -> column title
    "torch": "PyTorch non-private",
    "vmap": "torch.func vmap",
    "opacus": "Opacus",
    "ghost": "Opacus ghost",
    "jax": "JAX vmap",
}
PACKAGES = ["torch", "opacus", "jax", "jaxlib", "numpy", "safetensors"]


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


class Runner:
    """Starts child processes pinned to the first `threads` CPUs, with the thread-count
    variables of the BLAS and OpenMP runtimes set, and measures each one's peak RSS."""

    def __init__(self, threads: int):
        self.threads = threads
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < threads:
            log(f"warning: {threads} threads asked for, but only {len(allowed)} CPUs are available")
        self.cpus = allowed[:threads]
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                        OPENBLAS_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
                        TF_CPP_MIN_LOG_LEVEL="2")
        # A forked child's ru_maxrss also counts the pages it shared with this process before
        # its exec, so no child measures below what `true` measures; above it, a child's
        # figure is its own peak.
        self.floor_mb = self.run(["true"], timeout=60)["peak_rss_mb"]

    def run(self, cmd: list, timeout: float) -> dict:
        """Runs `cmd`; returns rc, stdout, the tail of stderr, wall seconds and the peak RSS
        in MB (ru_maxrss of this one child, from wait4)."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.perf_counter()
            proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, env=self.env, cwd=ROOT,
                                    preexec_fn=lambda: os.sched_setaffinity(0, self.cpus))
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - start > timeout:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.02)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            stderr = err.read().decode(errors="replace").strip().splitlines()
            return {"rc": proc.returncode, "stdout": out.read().decode(errors="replace"),
                    "stderr": " | ".join(stderr[-3:]), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
                    "timed_out": wall > timeout}


def worker_cmd(system: str, net: str, *args) -> list:
    return [sys.executable, HERE / "worker.py", system, net, *args]


def failure(res: dict) -> str:
    why = "timed out" if res["timed_out"] else f"exit {res['rc']}"
    return f"{why}: {res['stderr'][-300:]}"


# ---------------------------------------------------------------- machine


def machine(pdgc: str, runner: Runner, packages=PACKAGES) -> list:
    """Lines naming the machine and the version of every package in `packages`."""
    cpu, flags, cores, package = "unknown CPU", set(), set(), None
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and cpu == "unknown CPU":
                cpu = value
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key == "physical id":
                package = value
            elif key == "core id":
                cores.add((package, value))
    isa = [f for f in ("avx512f", "avx2", "fma") if f in flags]
    with open("/proc/meminfo") as f:
        mem_gb = int(f.readline().split()[1]) / 1024 ** 2
    versions = []
    for p in packages:
        try:
            versions.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{p} (not installed)")
    pdgc_version = subprocess.run([pdgc, "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    load = os.getloadavg()[0]
    return [
        f"- CPU: {cpu} ({', '.join(isa) or 'no AVX2'}); {len(cores) or '?'} cores, {os.cpu_count()} logical CPUs, "
        f"{mem_gb:.1f} GiB memory; "
        f"load average {load:.2f} at the start",
        f"- every system ran on {runner.threads} thread(s), pinned to CPU(s) {','.join(map(str, runner.cpus))}",
        f"- {platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- {', '.join(versions)}",
        f"- {pdgc_version or pdgc} ({pdgc}), repository at {commit or 'unknown commit'}",
    ]


# ---------------------------------------------------------------- timing


def time_peer(runner, system, net, batch, warmup, reps) -> dict:
    res = runner.run(worker_cmd(system, net, "--batch", batch, "--threads", runner.threads, "--warmup", warmup,
                                "--reps", reps), timeout=900)
    if res["rc"] != 0:
        return {"error": failure(res)}
    out = json.loads(res["stdout"].strip().splitlines()[-1])
    return {"ms": statistics.median(out["times_ms"]), "times_ms": out["times_ms"], "rss_mb": res["peak_rss_mb"],
            "import_rss_mb": out["import_rss_mb"]}


def time_pdgc(runner, pdgc, net, batch, reps) -> dict:
    """`pdgc bench` (its own warm-up run, then the median of `reps`) of the non-private and the
    clipped-sum steps, under the cost model's plan (`--auto-only --main-steps`)."""
    cmd = [pdgc, "bench", f"samples/{net}.pdg", "--batch", batch, "--repeats", reps, "--threads", runner.threads,
           "--device", "cpu", "--format", "json", "--auto-only", "--main-steps"]
    res = runner.run(cmd, timeout=1800)
    if res["rc"] != 0:
        return {"error": failure(res)}
    report = json.loads(res["stdout"])
    [auto] = [c for c in report["columns"] if c["config"] == "auto"]
    return {"nonprivate_ms": report["nonprivate_ms"], "clipped_ms": auto["clipped_sum_ms"],
            "rss_mb": res["peak_rss_mb"], "device": report["device"]}


def fmt_ms(ms) -> str:
    if ms is None:
        return "failed"
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def timing(args, runner, pdgc) -> int:
    """Every (net, batch): each peer, then `pdgc bench` and one `pdgc grads` for its RSS."""
    jobs = [(n, b) for n in args.nets for b in args.batches]
    total = len(jobs) * (len(PEERS) + 1)
    done, start, results = 0, time.perf_counter(), {}
    for net, batch in jobs:
        row = {}
        for system in PEERS:
            done += 1
            r = time_peer(runner, system, net, batch, args.warmup, args.reps)
            row[system] = r
            log(f"[{done}/{total}] {system:>6} {net} B={batch}: "
                f"{fmt_ms(r.get('ms')) + ' ms' if 'ms' in r else r['error']} ({time.perf_counter() - start:.0f} s)")
        done += 1
        r = time_pdgc(runner, pdgc, net, batch, args.reps)
        row["pdgc"] = r
        log(f"[{done}/{total}]   pdgc {net} B={batch}: "
            + (f"non-private {fmt_ms(r['nonprivate_ms'])} ms, clipped sum {fmt_ms(r['clipped_ms'])} ms"
               if "error" not in r else r["error"]) + f" ({time.perf_counter() - start:.0f} s)")
        [res] = pdgc_grads(runner, pdgc, NETS[net], batch, [["--norms-only", "--clip", "1.0"]], timeout=900)
        row["pdgc_grads"] = {"rss_mb": res["peak_rss_mb"], "wall_s": res["wall_s"]} if res["rc"] == 0 else {
            "error": failure(res)}
        log(f"      pdgc grads --norms-only --clip 1.0 {net} B={batch}: "
            + (f"{res['wall_s']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB" if res["rc"] == 0 else failure(res)))
        results[(net, batch)] = row
    print_timing(args, runner, pdgc, results)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{n} B={b}": row for (n, b), row in results.items()}, indent=1))
    log(f"done in {time.perf_counter() - start:.0f} s")
    return 1 if any("error" in r for row in results.values() for r in row.values()) else 0


def print_timing(args, runner, pdgc, results: dict):
    """The two markdown tables (times, peak RSS), the machine, and what failed."""
    print(f"## Peers: median ms per step, {runner.threads} thread(s), median of {args.reps} timed steps "
          f"after {args.warmup} warm-up step(s) (pdgc: after 1)\n")
    print("\n".join(machine(pdgc, runner)) + "\n")
    cols = list(PEERS.values()) + ["pdgc non-private", "pdgc clipped sum", "pdgc clipped ÷ best private peer",
                                   "pdgc non-private ÷ PyTorch"]
    print("| net | B | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for (net, batch), row in results.items():
        cells = [fmt_ms(row[s].get("ms")) for s in PEERS]
        p = row["pdgc"]
        cells += [fmt_ms(p.get("nonprivate_ms")), fmt_ms(p.get("clipped_ms"))]
        private = [row[s]["ms"] for s in ("vmap", "opacus", "ghost", "jax") if "ms" in row[s]]
        ok = "error" not in p
        cells.append(f"{p['clipped_ms'] / min(private):.2f}x" if ok and private else "-")
        cells.append(f"{p['nonprivate_ms'] / row['torch']['ms']:.2f}x" if ok and "ms" in row["torch"] else "-")
        print(f"| {net} | {batch} | " + " | ".join(cells) + " |")

    print("\n## Peak RSS (MB) of each measurement's process: the whole process (interpreter, libraries, warm-up "
          "and timed steps); in parentheses, the peak less the RSS right after importing the framework\n")
    cols = list(PEERS.values()) + ["pdgc bench (non-private and clipped-sum steps)", "pdgc grads --norms-only --clip 1.0"]
    print("| net | B | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for (net, batch), row in results.items():
        cells = [f"{row[s]['rss_mb']:.0f} (+{row[s]['rss_mb'] - row[s]['import_rss_mb']:.0f})" if "rss_mb" in row[s]
                 else "failed" for s in PEERS]
        cells += [f"{row[s]['rss_mb']:.0f}" if "rss_mb" in row[s] else "failed" for s in ("pdgc", "pdgc_grads")]
        print(f"| {net} | {batch} | " + " | ".join(cells) + " |")
    print(f"\n(No child measures below {runner.floor_mb:.0f} MB, what `true` measures: the pages a forked child "
          "shares with this script before its exec count; a figure at that floor means at most that.)")
    for (net, batch), row in results.items():
        for system, r in row.items():
            if "error" in r:
                print(f"\nfailed: {system} {net} B={batch}: {r['error']}")


# ---------------------------------------------------------------- check


def write_batch(path: Path, net, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *net.input_shape), dtype=np.float32)
    y = rng.integers(0, net.classes, batch, dtype=np.int64)
    save_file({"x": x, "y": y}, str(path))


def pdgc_grads(runner, pdgc, net, batch: int, variants: list, timeout: float) -> list:
    """Runs `pdgc grads` once per flag list in `variants`, on parameters from `pdgc init` and
    a random batch (neither measured); returns each run's result (see Runner.run)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params, data, out = tmp / "params.safetensors", tmp / "batch.safetensors", tmp / "out.safetensors"
        subprocess.run([pdgc, "init", f"samples/{net.name}.pdg", "-o", params, "--seed", "0"], check=True, cwd=ROOT,
                       capture_output=True)
        write_batch(data, net, batch, seed=1)
        results = []
        for flags in variants:
            results.append(runner.run([pdgc, "grads", f"samples/{net.name}.pdg", "--params", params, "--batch", data,
                                       "--output", out, "--device", "cpu", *flags], timeout=timeout))
            out.unlink(missing_ok=True)
        return results


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def check_graph(pdgc, net) -> list:
    """Differences between our layer list and pdgc's checked graph (names, shapes)."""
    out = subprocess.run([pdgc, "check", "--format", "json", f"samples/{net.name}.pdg"], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode != 0:
        return [f"pdgc check failed: {out.stderr.strip()}"]
    [entry] = json.loads(out.stdout)
    graph = entry["graph"]
    problems = []
    theirs = {p["name"]: tuple(p["shape"]) for p in graph["params"]}
    ours = param_shapes(net)
    if list(theirs.items()) != list(ours.items()):
        problems.append(f"parameters differ: pdgc {theirs} vs {ours}")
    nodes = graph["nodes"]
    if tuple(nodes[0]["shape"]) != tuple(net.input_shape):
        problems.append(f"input {nodes[0]['shape']} vs {net.input_shape}")
    if tuple(nodes[-1]["shape"]) != shapes(net)[-1]:
        problems.append(f"logits {nodes[-1]['shape']} vs {shapes(net)[-1]}")
    if "CrossEntropy" not in graph["loss"]:
        problems.append(f"loss {graph['loss']} is not cross entropy")
    return problems


def check(args, runner, pdgc, tolerance=1e-4) -> int:
    """At B = 4, on the same parameters (`pdgc init`) and batch: every system's clipped sum
    against a float64 torch.func reference (and PyTorch's mean gradient, pdgc's norms)."""
    batch = 4
    failures = 0
    cols = ["PyTorch mean grad"] + [PEERS[s] for s in ("vmap", "opacus", "ghost", "jax")] + ["pdgc clipped sum",
                                                                                             "pdgc norms"]
    lines = [f"## Check: worst relative L2 error of any parameter's result against float64 torch.func "
             f"(B={batch}, C = the median per-example norm, tolerance {tolerance:g})\n",
             "| net | C | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name in args.nets:
        net = NETS[name]
        for p in check_graph(pdgc, net):
            log(f"check {name}: {p}")
            failures += 1
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            params, data = tmp / "params.safetensors", tmp / "batch.safetensors"
            subprocess.run([pdgc, "init", f"samples/{name}.pdg", "-o", params, "--seed", "1"], check=True, cwd=ROOT,
                           capture_output=True)
            write_batch(data, net, batch, seed=7)
            res = runner.run(worker_cmd("reference", name, "--params", params, "--data", data, "--out",
                                        tmp / "reference.safetensors"), timeout=600)
            if res["rc"] != 0:
                log(f"check {name}: reference {failure(res)}")
                return 1
            ref = load_file(str(tmp / "reference.safetensors"))
            norms = ref["norms"]
            clip = float(np.median(norms))
            factor = np.minimum(1.0, clip / (norms + 1e-6))
            names = list(param_shapes(net))
            ref_clipped = {k: np.tensordot(factor, ref[f"per_example.{k}"], axes=1) for k in names}
            errs = []
            for system in ("torch", "vmap", "opacus", "ghost", "jax"):
                out = tmp / f"{system}.safetensors"
                res = runner.run(worker_cmd(system, name, "--params", params, "--data", data, "--out", out,
                                            "--clip", repr(clip)), timeout=600)
                if res["rc"] != 0:
                    errs.append(None)
                    log(f"check {name}: {system} {failure(res)}")
                    continue
                got = load_file(str(out))
                want = {k: ref[f"grad.{k}"] for k in names} if system == "torch" else ref_clipped
                errs.append(max(rel_err(got[k], want[k]) for k in names))
            out = tmp / "pdgc.safetensors"
            res = runner.run([pdgc, "grads", f"samples/{name}.pdg", "--params", params, "--batch", data, "--output",
                              out, "--norms-only", "--clip", repr(clip), "--device", "cpu"], timeout=600)
            if res["rc"] != 0:
                errs += [None, None]
                log(f"check {name}: pdgc {failure(res)}")
            else:
                got = load_file(str(out))
                errs.append(max(rel_err(got[f"clipped_sum.{k}"], ref_clipped[k]) for k in names))
                errs.append(rel_err(got["norms"], norms))
        bad = [e is None or e > tolerance for e in errs]
        failures += sum(bad)
        cells = ["failed" if e is None else f"{e:.1e}" + (" FAIL" if b else "") for e, b in zip(errs, bad)]
        lines.append(f"| {name} | {clip:.3g} | " + " | ".join(cells) + " |")
        log(f"check {name}: " + ", ".join(f"{c}: {x}" for c, x in zip(cols, cells)))
    print("\n".join(lines))
    print(f"\n{'all agree' if failures == 0 else f'{failures} disagreement(s)'}")
    return 1 if failures else 0


# ---------------------------------------------------------------- memory


def memory(args, runner, pdgc) -> int:
    """VGG16: one step of each system in a process of its own; the step's time and the
    process's peak RSS. pdgc is timed as whole commands (load, compile, step, write)."""
    net = NETS["vgg16"]
    rows, failed = [], 0
    start = time.perf_counter()
    for batch in args.memory_batch:
        for system, title in [("torch", "PyTorch non-private"), ("ghost", "Opacus ghost (clipped sum)"),
                              ("vmap", "torch.func vmap (clipped sum)"), ("opacus", "Opacus (clipped sum)")]:
            log(f"memory: {system} vgg16 B={batch} ...")
            res = runner.run(worker_cmd(system, "vgg16", "--batch", batch, "--threads", runner.threads, "--warmup", 0,
                                        "--reps", 1), timeout=args.memory_timeout)
            if res["rc"] != 0:
                failed += 1
                rows.append((batch, title, "failed", f"{res['wall_s']:.1f}", f"{res['peak_rss_mb'] / 1024:.2f}", "-",
                             failure(res)))
            else:
                out = json.loads(res["stdout"].strip().splitlines()[-1])
                rows.append((batch, title, f"{out['times_ms'][0] / 1e3:.1f}", f"{res['wall_s']:.1f}",
                             f"{res['peak_rss_mb'] / 1024:.2f}", f"{out['import_rss_mb'] / 1024:.2f}", ""))
            log(f"memory: {rows[-1]} ({time.perf_counter() - start:.0f} s)")
        variants = [("`pdgc grads --norms-only`", ["--norms-only"]),
                    ("`pdgc grads --norms-only --clip 1.0` (clipped sum)", ["--norms-only", "--clip", "1.0"])]
        if args.pdgc_full_grads:
            variants.append(("`pdgc grads --clip 1.0` (per-example grads too)", ["--clip", "1.0"]))
        log(f"memory: {len(variants)} pdgc grads commands, vgg16 B={batch} ...")
        for (title, _), res in zip(variants, pdgc_grads(runner, pdgc, net, batch, [f for _, f in variants],
                                                        args.memory_timeout)):
            ok = res["rc"] == 0
            failed += not ok
            rows.append((batch, title, "-", f"{res['wall_s']:.1f}", f"{res['peak_rss_mb'] / 1024:.2f}", "-",
                         "" if ok else failure(res)))
            log(f"memory: {rows[-1]} ({time.perf_counter() - start:.0f} s)")
    print(f"## VGG16 (224x224), one step per process, {runner.threads} thread(s)\n")
    print("\n".join(machine(pdgc, runner)) + "\n")
    print("| B | system | step (s) | whole process (s) | peak RSS (GB) | RSS after imports (GB) | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    log(f"done in {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


# ---------------------------------------------------------------- main


def warn_if_busy():
    """Warns on stderr when the 1-minute load average says other processes share the CPUs."""
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: load average {load:.2f}: other processes share the CPUs, and the times will show it "
            f"(OpenMP's spinning barriers slow multi-threaded PyTorch down many times over)")


def find_pdgc(given) -> str:
    for candidate in [given, os.environ.get("PDGC"), ROOT / "target" / "release" / "pdgc", shutil.which("pdgc")]:
        if candidate and Path(candidate).is_file():
            return str(Path(candidate).resolve())
    sys.exit("no pdgc binary: build it (cargo build --release) or pass --pdgc PATH")


def main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--pdgc", help="the pdgc binary (default: $PDGC, target/release/pdgc, pdgc on PATH)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every system (default 2)")
    ap.add_argument("--nets", nargs="+", default=TIMED_NETS, choices=TIMED_NETS)
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones (peers)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps; the median is reported")
    ap.add_argument("--quick", action="store_true", help="1 warm-up step, 2 timed steps: to see that it runs")
    ap.add_argument("--json", help="also write the raw timing results here")
    ap.add_argument("--check", action="store_true", help="only check that the clipped sums agree (B = 4)")
    ap.add_argument("--memory", action="store_true", help="only the VGG16 one-step time and memory table (slow)")
    ap.add_argument("--memory-batch", nargs="+", type=int, default=[16], help="VGG16 batch sizes (default 16)")
    ap.add_argument("--memory-timeout", type=float, default=1800, help="seconds per VGG16 process")
    ap.add_argument("--pdgc-full-grads", action="store_true",
                    help="--memory: also `pdgc grads --clip 1.0`, which materializes every per-example gradient")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.reps = 1, 2
    pdgc = find_pdgc(args.pdgc)
    runner = Runner(args.threads)
    warn_if_busy()
    if args.check:
        return check(args, runner, pdgc)
    if args.memory:
        return memory(args, runner, pdgc)
    return timing(args, runner, pdgc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
