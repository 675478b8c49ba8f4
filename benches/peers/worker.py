"""One peer system's step on one net at one batch size, in a process of its own.

    python worker.py SYSTEM NET --batch B --threads T --warmup W --reps R
    python worker.py SYSTEM NET --threads T --params P.safetensors --data D.safetensors --out O.safetensors --clip C

peers.py starts this once per (system, net, batch) so that thread settings, caches and the
peak RSS belong to that one measurement. Timing mode prints one JSON line with every timed
step's milliseconds; `--out` mode runs one step on the given parameters and batch and writes
its result as safetensors (float32, or float64 for `reference`), for peers.py --check.

SYSTEM is one of (each step is one full gradient computation on the batch x, y; C is the
clipping norm; g_n is the gradient of example n's own cross-entropy loss):

* torch     PyTorch, non-private: forward, mean cross-entropy, backward (p.grad = mean_n g_n).
* vmap      torch.func: vmap(grad(loss of one example)) gives every g_n, then the norms
            ||g_n|| over all parameters and the clipped sum sum_n min(1, C/(||g_n|| + 1e-6)) g_n.
* opacus    Opacus (PrivacyEngine.make_private, grad_sample_mode="hooks", noise 0): forward,
            mean loss, backward (hooks store p.grad_sample), then the optimizer's
            clip_and_accumulate(), which leaves the clipped sum in p.summed_grad.
* ghost     Opacus ghost clipping (grad_sample_mode="ghost", noise 0): the wrapped criterion's
            loss.backward() runs the two backward passes (norms, then the clipped sum into p.grad).
* jax       JAX on the CPU: jax.jit of vmap(grad(loss of one example)), norms and clipped sum
            as for vmap.
* reference float64 torch.func (check only): per-example gradients, norms and mean gradient.

Each step ends when its result is computed (block_until_ready for JAX); no optimizer update,
no noise. The clip factor min(1, C/(norm + 1e-6)) is Opacus' (and pdgc's).
"""

import argparse
import json
import sys
import time

from nets import NETS, default_init, jax_forward, torch_model

SYSTEMS = ("torch", "vmap", "opacus", "ghost", "jax")


def load_inputs(args, net):
    """(params, x, y) as numpy arrays from the files; without files, params is None (each
    system then draws PyTorch's default initialization itself) and x, y are drawn (x standard
    normal, y uniform classes)."""
    import numpy as np
    if args.params:
        from safetensors.numpy import load_file
        params = load_file(args.params)
        data = load_file(args.data)
        return params, data["x"].astype(np.float32), data["y"].astype(np.int64)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.batch, *net.input_shape), dtype=np.float32)
    y = rng.integers(0, net.classes, args.batch, dtype=np.int64)
    return None, x, y


def torch_step(system, net, params, x, y, clip, threads, device="cpu"):
    """The step as a closure returning `{name: tensor}` (the mean gradient for `torch`, the
    clipped sum otherwise, per-example gradients etc. for `reference`), on `device`."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = torch.float64 if system == "reference" else torch.float32
    model = torch_model(net).to(dtype)
    if params is not None:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    model = model.to(device)
    names = [k for k, _ in model.named_parameters()]
    xt, yt = torch.from_numpy(x).to(dtype).to(device), torch.from_numpy(y).to(device)

    if system == "torch":
        def step():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt), yt).backward()
            return {k: p.grad for k, p in model.named_parameters()}
        return step

    if system in ("vmap", "reference"):
        from torch.func import functional_call, grad, vmap
        detached = {k: p.detach() for k, p in model.named_parameters()}

        def loss_one(p, xn, yn):
            return F.cross_entropy(functional_call(model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0))

        per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

        def step():
            g = per_example(detached, xt, yt)
            norms = torch.stack([t.flatten(1).pow(2).sum(1) for t in g.values()]).sum(0).sqrt()
            if system == "reference":
                out = {f"per_example.{k}": t for k, t in g.items()}
                out.update({f"grad.{k}": t.mean(0) for k, t in g.items()})
                out["norms"] = norms
                return out
            factor = (clip / (norms + 1e-6)).clamp(max=1.0)
            return {k: torch.einsum("n,n...->...", factor, t) for k, t in g.items()}
        return step

    import warnings
    warnings.filterwarnings("ignore")  # Opacus warns about the secure RNG and the accountant.
    from opacus import PrivacyEngine
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=len(yt))
    engine = PrivacyEngine()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    mode = "ghost" if system == "ghost" else "hooks"
    made = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
                               max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode,
                               criterion=torch.nn.CrossEntropyLoss())
    dp_model, dp_optimizer = made[0], made[1]
    plain = dict(model.named_parameters())  # the wrapped module shares these Parameters
    assert list(plain) == names

    if system == "opacus":
        def step():
            dp_optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(dp_model(xt), yt).backward()
            dp_optimizer.clip_and_accumulate()
            return {k: p.summed_grad for k, p in plain.items()}
        return step

    criterion = made[2]

    def step():
        dp_optimizer.zero_grad(set_to_none=True)
        criterion(dp_model(xt), yt).backward()
        return {k: p.grad for k, p in plain.items()}
    return step


def jax_step(net, params, x, y, clip):
    """The JAX clipped-sum step as a closure returning `{name: array}`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    if params is None:
        params = default_init(net, seed=0)
    forward = jax_forward(net)

    def loss_one(p, xn, yn):
        logits = forward(p, xn[None])
        return -jax.nn.log_softmax(logits)[0, yn]

    @jax.jit
    def clipped_sum(p, xb, yb):
        g = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(p, xb, yb)
        norms = jnp.sqrt(sum(jnp.sum(t.reshape(t.shape[0], -1) ** 2, axis=1) for t in g.values()))
        factor = jnp.minimum(1.0, clip / (norms + 1e-6))
        return {k: jnp.tensordot(factor, t, axes=1) for k, t in g.items()}

    p = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in params.items()}
    xb, yb = jnp.asarray(x), jnp.asarray(y.astype(np.int32))

    def step():
        return jax.block_until_ready(clipped_sum(p, xb, yb))
    return step


def rss_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status in MB: VmRSS (now) or VmHWM (peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def import_libraries(system: str):
    """Imports the system's framework up front, so that the RSS measured after it is the
    libraries' share of the peak, before any model or batch exists."""
    if system == "jax":
        import jax
        jax.devices()  # the CPU client is created on first use
    else:
        import torch  # noqa: F401
        if system in ("opacus", "ghost"):
            import opacus  # noqa: F401


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("system", choices=SYSTEMS + ("reference",))
    ap.add_argument("net", choices=sorted(NETS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--params", help="parameters (safetensors, pdgc names); default: PyTorch's init (seed 0)")
    ap.add_argument("--data", help="the batch (safetensors: x, y); with --params")
    ap.add_argument("--out", help="run one step and write its result here (safetensors)")
    args = ap.parse_args(argv)
    net = NETS[args.net]
    import_libraries(args.system)
    import_rss = rss_mb("VmRSS")
    params, x, y = load_inputs(args, net)
    start = time.perf_counter()
    if args.system == "jax":
        step = jax_step(net, params, x, y, args.clip)
    else:
        step = torch_step(args.system, net, params, x, y, args.clip, args.threads)
    setup_s = time.perf_counter() - start

    if args.out:
        import numpy as np
        from safetensors.numpy import save_file
        out = step()
        save_file({k: np.ascontiguousarray(np.asarray(v.detach() if hasattr(v, "detach") else v)) for k, v in
                   out.items()}, args.out)
        print(json.dumps({"system": args.system, "net": args.net, "out": args.out}))
        return

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"system": args.system, "net": args.net, "batch": len(y), "threads": args.threads,
                      "setup_s": setup_s, "times_ms": times, "import_rss_mb": import_rss,
                      "peak_rss_mb": rss_mb("VmHWM")}))


if __name__ == "__main__":
    main(sys.argv[1:])
