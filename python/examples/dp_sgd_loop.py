"""DP-SGD from a Python loop over your own arrays, with ε printed per epoch.

The model is a small CIFAR-10-shaped CNN written in `.pdg` (its layer names are the
`state_dict` names of the equivalent PyTorch module below, so trained weights move to and
from PyTorch unchanged). The data is your own: `--data FILE.npz` with arrays `x` (float32
`[N, 3, 32, 32]`), `y` (int64 `[N]`) and optionally `x_test`, `y_test`; without it,
synthetic CIFAR-shaped data: Gaussian noise plus a faint per-class image.

Each step takes a Poisson sample (each example with probability q; sizes vary and empty
steps happen), and `Session.dp_sgd_step` clips, sums, adds N(0, σ²C²) noise, divides by the
expected batch size q·N and updates the parameter arrays in place. σ is chosen up front for
the target ε over all the steps (`pdgc.privacy.noise_multiplier`), and the ε spent so far is
printed after each epoch (`pdgc.privacy.epsilon`).

The equivalent PyTorch module (its `state_dict()` has the same names and shapes)::

    nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 16, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(16, 32, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc1=nn.Linear(2048, 64), relu3=nn.ReLU(), fc2=nn.Linear(64, 10)))

and `params = {k: v.detach().numpy() for k, v in model.state_dict().items()}` hands its
weights to pdgc (the arrays share memory with the tensors, so the steps update them).

A model of your own: export it from PyTorch to ONNX, import it, and pass the files::

    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), "model.onnx", dynamo=True)
    pdgc import model.onnx -o model.pdg          # writes model.safetensors beside it
    python python/examples/dp_sgd_loop.py --model model.pdg --weights model.safetensors

Run: python python/examples/dp_sgd_loop.py [--model F.pdg [--weights F.safetensors]] [--data FILE.npz]
[--epochs 3] [--epsilon 8] ...
"""

import argparse
import time

import numpy as np

import pdgc

MODEL = """
model small_cnn {
    input x: [3, 32, 32];
    label y: classes(10);
    h = maxpool2d(relu(conv1: conv2d(x, 16, 3, padding=1)), 2);   // 16 x 16 x 16
    h = maxpool2d(relu(conv2: conv2d(h, 32, 3, padding=1)), 2);   // 32 x 8 x 8
    h = relu(fc1: linear(flatten(h), 64));
    logits = fc2: linear(h, 10);
    loss cross_entropy(logits, y);
}
"""


def load(args, shape, classes):
    """Training and test arrays: the user's `.npz`, or synthetic data of the model's input
    `shape` (CIFAR's by default) with `classes` classes."""
    if args.data:
        d = np.load(args.data)
        x, y = np.ascontiguousarray(d["x"], np.float32), d["y"].astype(np.int64)
        if "x_test" in d:
            return x, y, np.ascontiguousarray(d["x_test"], np.float32), d["y_test"].astype(np.int64)
        return x[: -len(x) // 10], y[: -len(y) // 10], x[-len(x) // 10 :], y[-len(y) // 10 :]
    rng = np.random.default_rng(args.seed)
    y = rng.integers(0, classes, args.examples + 256)
    patterns = rng.standard_normal((classes, *shape), dtype=np.float32)  # one faint image per class
    x = rng.standard_normal((args.examples + 256, *shape), dtype=np.float32) + 1.0 * patterns[y]
    return x[: args.examples], y[: args.examples], x[args.examples :], y[args.examples :]


def accuracy(session, params, names, x, y):
    """Test accuracy from the logits, in chunks of the session's batch."""
    hits = 0
    for i in range(0, len(x), session.max_batch):
        chunk = {names[0]: x[i : i + session.max_batch], names[1]: y[i : i + session.max_batch]}
        logits = session.forward(params, chunk)
        hits += int((logits.argmax(1) == y[i : i + session.max_batch]).sum())
    return hits / len(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a .pdg file (e.g. from `pdgc import`); default: the CNN above")
    ap.add_argument("--weights", help="a .safetensors of the model's parameters (e.g. from `pdgc import`)")
    ap.add_argument("--data", help="an .npz with x, y (and optionally x_test, y_test)")
    ap.add_argument("--examples", type=int, default=4096, help="synthetic examples when there is no --data")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--sample-rate", type=float, default=0.05, help="Poisson sampling rate q")
    ap.add_argument("--epsilon", type=float, default=8.0, help="the target ε after all epochs")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--max-batch", type=int, default=256, help="the compiled batch (larger samples are split)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    module = pdgc.compile(args.model or MODEL, batch=args.max_batch, device="auto")
    if len(module.inputs) != 1:
        raise SystemExit(f"the model has {len(module.inputs)} inputs; this example feeds one")
    (input_name, shape), = module.inputs.items()
    names = (input_name, module.label)
    classes = module.params[list(module.params)[-1]][0]  # the last layer's outputs
    x, y, x_test, y_test = load(args, shape, classes)
    n, q = len(x), args.sample_rate
    steps_per_epoch = max(1, round(1 / q))
    total_steps = args.epochs * steps_per_epoch
    sigma = pdgc.privacy.noise_multiplier(args.epsilon, q, total_steps, args.delta)
    print(f"{n} examples, q = {q}, {steps_per_epoch} steps per epoch, expected batch {q * n:.1f}, "
          f"σ = {sigma:.4f} for ε = {args.epsilon} at δ = {args.delta} after {args.epochs} epochs")

    session = module.session(threads=args.threads, seed=args.seed)
    if args.weights:
        from safetensors.numpy import load_file  # PyTorch names, as `pdgc import` writes them

        params = {k: np.ascontiguousarray(v, np.float32) for k, v in load_file(args.weights).items()}
    else:
        params = module.init_params(args.seed)  # or a PyTorch model's state_dict as NumPy arrays
    opt = pdgc.Optimizer.sgd(lr=args.lr, momentum=args.momentum)
    # Poisson sampling from a seeded stream (use a cryptographic source for a real deployment).
    sampler = np.random.default_rng(args.seed + 1)
    for epoch in range(1, args.epochs + 1):
        started, losses, sizes = time.time(), [], []
        for _ in range(steps_per_epoch):
            take = sampler.random(n) < q  # empty samples happen: a noise-only step
            report = session.dp_sgd_step(
                params, {names[0]: x[take], names[1]: y[take]},
                clip=args.clip, noise_multiplier=sigma, expected_batch=q * n, optimizer=opt,
            )
            losses.extend(report.losses.tolist())
            sizes.append(report.batch_size)
        spent = pdgc.privacy.epsilon(sigma, q, epoch * steps_per_epoch, args.delta)
        print(f"epoch {epoch}: train loss {np.mean(losses) if losses else float('nan'):.4f}, "
              f"test accuracy {accuracy(session, params, names, x_test, y_test):.2%}, mean batch {np.mean(sizes):.1f}, "
              f"ε = {spent:.3f} (δ = {args.delta}), {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
