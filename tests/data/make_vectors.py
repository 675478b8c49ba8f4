"""Writes the PyTorch reference vectors tests/data/<model>.safetensors.

Each file holds, for one .pdg model and a small random batch, the per-example losses,
outputs and per-example gradients computed by PyTorch autograd in float64 with
``torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))``; tests/reference.rs checks
that pdgc's f64 reference evaluator (src/reference.rs) reproduces them.

How to run (from the repository root; needs torch, numpy and safetensors, CPU is enough)::

    python tests/data/make_vectors.py            # all models
    python tests/data/make_vectors.py mnist_cnn  # only the named ones

The network is not read from the .pdg text: the script runs ``pdgc check --format json`` and
builds the model from the checked Graph IR it prints (``nodes`` with their ``op``, ``inputs``
and ``shape``; ``label``; ``loss``; ``params``), with torch.nn.functional, so it tests the
graph pdgc builds. The pdgc command is ``$PDGC`` if set (a path to the binary), else
``cargo run --quiet --bin pdgc --``.

Contents of each file (names as in the model):

* every input ``[B, ...]`` (float64, standard normal) and the label ``[B]`` (int64 class
  indices) or ``[B, ...]`` (float64 targets, standard normal);
* every parameter by its PyTorch name, in PyTorch's layout: conv and linear layers get
  PyTorch's default init (their nn.Module's constructor); norm weights are 1 + 0.1 N(0, 1)
  and biases 0.1 N(0, 1) (PyTorch starts at 1 and 0, which would leave the affine transform
  untested). Parameters are drawn in float32 (PyTorch's default dtype) and stored as float32;
  the computation uses them upcast, exactly, to float64;
* ``loss`` ``[B]`` (each example's own loss: cross entropy, or the mean squared error over
  the example's elements), ``output`` ``[B, ...]`` (the tensor the loss reads), both float64;
* ``grad.<param>`` ``[B, ...]``: the gradient of each example's own loss. float64, except
  for models whose gradients would exceed 2 MB as float64 (cifar_cnn), stored as float32 to
  keep tests/data small (a relative rounding of 6e-8, far below the test's 1e-4);
* metadata ``model`` (the .pdg path relative to the repository root) and ``torch`` (the
  version that wrote it).

Before writing, the script checks the vmap'd per-example results against plain batched
autograd (per-example losses with reduction='none'; the sum over examples of the per-example
gradients against the gradient of the summed loss).
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data"

# (model file relative to the root, batch size, seed)
MODELS = [
    ("samples/mnist_cnn.pdg", 4, 1),
    ("samples/cifar_cnn.pdg", 2, 2),
    ("samples/conv1d_net.pdg", 3, 3),
    ("samples/depthwise_separable.pdg", 3, 4),
    ("samples/regression_mlp_ln.pdg", 4, 5),
    ("tests/data/models/gn_residual_block.pdg", 3, 6),
    ("tests/data/models/conv_geometry.pdg", 3, 7),
    ("tests/data/models/hardswish_net.pdg", 3, 8),
    ("tests/data/models/per_side_padding.pdg", 3, 8),
    ("samples/depthwise_index.pdg", 3, 9),
    ("samples/gated_bilinear.pdg", 3, 10),
]

# Layers written in index notation, by definition name: their PyTorch twins, written by hand
# here (the script never reads pdgc's equations, so the vectors test them). Each takes the
# layer's inputs (batched) and its parameters by local name.
INDEX_LAYERS = {
    "depthwise3": lambda xs, p: F.conv2d(xs[0], p["weight"].unsqueeze(1), p["bias"], padding=1,
                                         groups=xs[0].shape[1]),
    "depthwise3s2": lambda xs, p: F.conv2d(xs[0], p["weight"].unsqueeze(1), p["bias"], stride=2,
                                           padding=1, groups=xs[0].shape[1]),
    "gated": lambda xs, p: F.linear(xs[0], p["wv"]) * torch.sigmoid(F.linear(xs[0], p["wg"], p["bg"])),
    "bilinear": lambda xs, p: F.bilinear(xs[0], xs[0], p["weight"], p["bias"]),
}

GRAD_F64_LIMIT_BYTES = 2 * 1024 * 1024


def pdgc_graph(model: str) -> dict:
    cmd = shlex.split(os.environ["PDGC"]) if os.environ.get("PDGC") else [
        "cargo", "run", "--quiet", "--bin", "pdgc", "--"]
    out = subprocess.run(cmd + ["check", "--format", "json", model], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    [entry] = json.loads(out)
    assert not entry["diagnostics"], entry["diagnostics"]
    return entry["graph"]


def op_of(node: dict):
    """serde's externally tagged enum: "Flatten" or {"Conv": {...}}."""
    op = node["op"]
    if isinstance(op, str):
        return op, None
    [(kind, arg)] = op.items()
    return kind, arg


def init_params(graph: dict, gen_seed: int) -> dict:
    torch.manual_seed(gen_seed)
    params = {}
    nodes = graph["nodes"]
    for node in nodes:
        kind, arg = op_of(node)
        layer = node["layer"]
        if layer is None:
            continue
        if kind == "Conv":
            cls = torch.nn.Conv1d if len(arg["kernel"]) == 1 else torch.nn.Conv2d
            m = cls(arg["in_channels"], arg["out_channels"], tuple(arg["kernel"]),
                    groups=arg["groups"], bias=arg["bias"])
            weight, bias = m.weight, m.bias
        elif kind == "Linear":
            m = torch.nn.Linear(arg["in_features"], arg["out_features"], bias=arg["bias"])
            weight, bias = m.weight, m.bias
        elif kind in ("GroupNorm", "InstanceNorm", "LayerNorm"):
            shape = [s["shape"] for s in graph["params"] if s["name"] == f"{layer}.weight"][0]
            weight = 1 + 0.1 * torch.randn(shape)
            bias = 0.1 * torch.randn(shape)
        elif kind == "Index":
            # Uniform in ±1/sqrt(fan-in) like nn.Linear's default, fan-in = the elements of a
            # parameter's trailing dims (at least 1).
            for spec in graph["params"]:
                if spec["name"].startswith(f"{layer}."):
                    fan_in = max(1, int(torch.tensor(spec["shape"][1:]).prod().item()))
                    bound = fan_in ** -0.5
                    params[spec["name"]] = (torch.rand(spec["shape"]) * 2 - 1) * bound
            continue
        else:
            raise ValueError(f"layer {layer}: unexpected parameterized op {kind}")
        params[f"{layer}.weight"] = weight.detach().float()
        if bias is not None:
            params[f"{layer}.bias"] = bias.detach().float()
    for spec in graph["params"]:
        assert list(params[spec["name"]].shape) == spec["shape"], spec
    assert set(params) == {s["name"] for s in graph["params"]}
    return params


def pad_input(x: torch.Tensor, arg: dict, value: float):
    """Symmetric padding as the op's own `padding`; per-side padding (pad_lo != pad_hi) as an
    explicit F.pad with `value` (0 for convs and average pools, -inf for max pools)."""
    lo, hi = arg["pad_lo"], arg["pad_hi"]
    if lo == hi:
        return x, tuple(lo)
    sides = []
    for l, h in zip(reversed(lo), reversed(hi)):  # F.pad lists the last axis first
        sides += [l, h]
    return F.pad(x, sides, value=value), (0,) * len(lo)


def run_graph(graph: dict, params: dict, inputs: dict) -> torch.Tensor:
    """The forward pass on a batch (leading dim), returning the loss's input."""
    acts = []
    for node in graph["nodes"]:
        kind, arg = op_of(node)
        xs = [acts[i] for i in node["inputs"]]
        layer = node["layer"]
        w = params.get(f"{layer}.weight")
        b = params.get(f"{layer}.bias")
        if kind == "Input":
            y = inputs[arg["name"]]
        elif kind == "Conv":
            conv = F.conv1d if len(arg["kernel"]) == 1 else F.conv2d
            x, padding = pad_input(xs[0], arg, 0.0)
            y = conv(x, w, b if arg["bias"] else None, stride=tuple(arg["stride"]),
                     padding=padding, dilation=tuple(arg["dilation"]), groups=arg["groups"])
        elif kind == "Linear":
            y = F.linear(xs[0], w, b if arg["bias"] else None)
        elif kind == "Activation":
            if arg == "Relu":
                y = F.relu(xs[0])
            elif arg == "Tanh":
                y = torch.tanh(xs[0])
            elif arg == "Sigmoid":
                y = torch.sigmoid(xs[0])
            elif arg == "Gelu":
                y = F.gelu(xs[0])  # exact erf form
            elif arg == "Hardswish":
                y = F.hardswish(xs[0])
            elif isinstance(arg, dict) and "LeakyRelu" in arg:
                y = F.leaky_relu(xs[0], negative_slope=arg["LeakyRelu"]["slope"])
            else:
                raise ValueError(f"activation {arg}")
        elif kind == "Pool":
            one_d = len(arg["kernel"]) == 1
            k, s = tuple(arg["kernel"]), tuple(arg["stride"])
            if arg["kind"] == "Max":
                pool = F.max_pool1d if one_d else F.max_pool2d
                x, p = pad_input(xs[0], arg, float("-inf"))
                y = pool(x, k, s, p)
            else:
                pool = F.avg_pool1d if one_d else F.avg_pool2d
                # Zeros padded explicitly are counted like count_include_pad's.
                x, p = pad_input(xs[0], arg, 0.0)
                y = pool(x, k, s, p, ceil_mode=False, count_include_pad=True)
        elif kind == "GlobalAvgPool":
            y = xs[0].mean(dim=tuple(range(2, xs[0].dim())))
        elif kind == "Flatten":
            y = xs[0].flatten(1)
        elif kind == "GroupNorm":
            y = F.group_norm(xs[0], arg["groups"], w, b, arg["eps"])
        elif kind == "InstanceNorm":
            # instance norm = group norm with one group per channel
            y = F.group_norm(xs[0], xs[0].shape[1], w, b, arg["eps"])
        elif kind == "LayerNorm":
            dims = arg["groups"]  # the number of trailing dims normalized
            y = F.layer_norm(xs[0], tuple(node["shape"][-dims:]), w, b, arg["eps"])
        elif kind == "Add":
            y = xs[0] + xs[1]
        elif kind == "Index":
            local = {k.removeprefix(f"{layer}."): v for k, v in params.items() if k.startswith(f"{layer}.")}
            y = INDEX_LAYERS[arg["def"]](xs, local)
        else:
            raise ValueError(f"op {kind}")
        assert list(y.shape[1:]) == node["shape"], (node, y.shape)
        acts.append(y)
    [loss_arg] = next(iter(graph["loss"].values())).values()
    return acts[loss_arg]


def batch_loss(graph: dict, out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per-example losses [B] of a batch."""
    if "CrossEntropy" in graph["loss"]:
        return F.cross_entropy(out, label, reduction="none")
    return F.mse_loss(out, label, reduction="none").flatten(1).mean(dim=1)


def make(model: str, batch: int, seed: int) -> Path:
    graph = pdgc_graph(model)
    name = graph["name"]
    params32 = init_params(graph, seed)
    params = {k: v.double() for k, v in params32.items()}
    g = torch.Generator().manual_seed(1000 + seed)
    inputs = {}
    for node in graph["nodes"]:
        kind, arg = op_of(node)
        if kind == "Input":
            inputs[arg["name"]] = torch.randn([batch] + node["shape"], generator=g,
                                              dtype=torch.float64)
    label_kind, label_arg = next(iter(graph["label"].items()))
    if label_kind == "Classes":
        label = torch.randint(0, label_arg["classes"], (batch,), generator=g, dtype=torch.int64)
    else:
        label = torch.randn([batch] + label_arg["shape"], generator=g, dtype=torch.float64)

    def loss_fn(p, x, y):
        xb = {k: v.unsqueeze(0) for k, v in x.items()}
        out = run_graph(graph, p, xb)
        loss = batch_loss(graph, out, y.unsqueeze(0))[0]
        return loss, (loss, out[0])

    grads, (loss, output) = torch.func.vmap(
        torch.func.grad(loss_fn, has_aux=True), in_dims=(None, 0, 0))(params, inputs, label)

    # Cross-check against plain batched autograd.
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out_b = run_graph(graph, leaves, inputs)
    loss_b = batch_loss(graph, out_b, label)
    torch.testing.assert_close(loss_b.detach(), loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out_b.detach(), output, rtol=1e-12, atol=1e-15)
    sum_grads = torch.autograd.grad(loss_b.sum(), list(leaves.values()))
    for (k, _), sg in zip(leaves.items(), sum_grads):
        torch.testing.assert_close(grads[k].sum(0), sg, rtol=1e-10, atol=1e-14)

    grad_bytes = sum(v.numel() * 8 for v in grads.values())
    grad_dtype = torch.float64 if grad_bytes <= GRAD_F64_LIMIT_BYTES else torch.float32
    tensors = {}
    tensors.update(inputs)
    tensors[label_arg["name"]] = label
    tensors.update(params32)
    tensors["loss"] = loss
    tensors["output"] = output
    for k, v in grads.items():
        tensors[f"grad.{k}"] = v.to(grad_dtype)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    path = OUT / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={"model": model, "torch": torch.__version__})
    print(f"{path.relative_to(ROOT)}: B={batch}, {len(params)} params, "
          f"grads {str(grad_dtype).removeprefix('torch.')}, {path.stat().st_size / 1e6:.2f} MB, "
          f"loss {[round(v, 4) for v in loss.tolist()]}")
    return path


def main(argv):
    torch.set_num_threads(1)  # one thread: reductions in a fixed order, reproducible files
    wanted = set(argv)
    for model, batch, seed in MODELS:
        if not wanted or Path(model).stem in wanted:
            make(model, batch, seed)


if __name__ == "__main__":
    main(sys.argv[1:])
