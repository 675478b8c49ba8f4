"""The benchmark's networks, written out layer by layer as in samples/*.pdg, and the same
networks as a PyTorch nn.Module and as a JAX function.

Each net is a chain of layers (`Conv`, `Linear`, `Act`, `MaxPool`, `Flatten`) read from
top to bottom, like the .pdg file of the same name; parameterized layers carry the .pdg
layer name, so parameters are called `conv1.weight`, `features_0.bias`, ... in PyTorch's
layout (conv weights `[out, in, kh, kw]`, linear weights `[out, in]`), exactly as pdgc's
`init`, `grads` and safetensors files name them. Every net ends in a cross-entropy loss on
the last layer's logits. `peers.py --check` compares the shapes and names against
`pdgc check --format json` and the clipped sums against `pdgc grads`.
"""

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Conv:
    """conv2d with bias, square kernel, symmetric zero padding."""
    name: str
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0


@dataclass(frozen=True)
class Linear:
    name: str
    out_features: int


@dataclass(frozen=True)
class Act:
    kind: str  # "tanh" or "relu"


@dataclass(frozen=True)
class MaxPool:
    kernel: int
    stride: int


@dataclass(frozen=True)
class Flatten:
    pass


Layer = Union[Conv, Linear, Act, MaxPool, Flatten]


@dataclass(frozen=True)
class Net:
    name: str
    input_shape: tuple  # [channels, height, width]; the batch is implicit
    classes: int
    layers: tuple


def shapes(net: Net) -> list:
    """The shape (without the batch) after each layer."""
    shape, out = tuple(net.input_shape), []
    for layer in net.layers:
        if isinstance(layer, Conv):
            c, h, w = shape
            size = lambda n: (n + 2 * layer.padding - layer.kernel) // layer.stride + 1  # noqa: E731
            shape = (layer.out_channels, size(h), size(w))
        elif isinstance(layer, MaxPool):
            c, h, w = shape
            size = lambda n: (n - layer.kernel) // layer.stride + 1  # noqa: E731
            shape = (c, size(h), size(w))
        elif isinstance(layer, Flatten):
            n = 1
            for d in shape:
                n *= d
            shape = (n,)
        elif isinstance(layer, Linear):
            shape = (layer.out_features,)
        out.append(shape)
    return out


def feature_count(net: Net) -> int:
    """The width of the flattened features that the first linear layer reads."""
    for layer, shape in zip(net.layers, shapes(net)):
        if isinstance(layer, Flatten):
            return shape[0]
    raise ValueError(f"{net.name}: no flatten")


def param_shapes(net: Net) -> dict:
    """`{name: shape}` in PyTorch's layout, in layer order (weight before bias)."""
    out, shape = {}, tuple(net.input_shape)
    for layer, next_shape in zip(net.layers, shapes(net)):
        if isinstance(layer, Conv):
            out[f"{layer.name}.weight"] = (layer.out_channels, shape[0], layer.kernel, layer.kernel)
            out[f"{layer.name}.bias"] = (layer.out_channels,)
        elif isinstance(layer, Linear):
            out[f"{layer.name}.weight"] = (layer.out_features, shape[0])
            out[f"{layer.name}.bias"] = (layer.out_features,)
        shape = next_shape
    return out


def default_init(net: Net, seed: int) -> dict:
    """Parameters drawn as PyTorch's Conv2d and Linear initialize them, without PyTorch:
    weight and bias uniform in +-1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5)), float32."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(net).items():
        if name.endswith(".weight"):
            bound = 1.0 / float(np.sqrt(np.prod(shape[1:])))
        out[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
    return out


def _toy(name: str, convs: int, rate: int, kernel: int, in_features: int) -> Net:
    """A toy CNN of Rochette, Manoel & Tramel 2019: 25 channels first, each next conv has
    `rate` x the channels, padding 2 and ReLU after every conv, a 2x2 max-pool after every
    second conv, then flatten and one linear layer."""
    layers = []
    channels = 25
    for i in range(1, convs + 1):
        layers += [Conv(f"conv{i}", channels, kernel, padding=2), Act("relu")]
        if i % 2 == 0:
            layers.append(MaxPool(2, 2))
        channels *= rate
    layers += [Flatten(), Linear("fc", 10)]
    net = Net(name, (3, 32, 32), 10, tuple(layers))
    assert feature_count(net) == in_features, (name, feature_count(net))
    return net


def _vgg16() -> Net:
    """torchvision's vgg16 (configuration "D") without batch norm and dropout; layer names
    follow its state_dict (features_N = features.N)."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers, index = [], 0
    for c in cfg:
        if c == "M":
            layers.append(MaxPool(2, 2))
            index += 1
        else:
            layers += [Conv(f"features_{index}", c, 3, padding=1), Act("relu")]
            index += 2
    layers += [Flatten(), Linear("classifier_0", 4096), Act("relu"), Linear("classifier_3", 4096), Act("relu"),
               Linear("classifier_6", 1000)]
    return Net("vgg16", (3, 224, 224), 1000, tuple(layers))


def _alexnet() -> Net:
    """torchvision's alexnet without dropout (its adaptive average pool is the identity on
    224 x 224 inputs), as samples/alexnet.pdg."""
    return Net("alexnet", (3, 224, 224), 1000, (
        Conv("features_0", 64, 11, stride=4, padding=2), Act("relu"), MaxPool(3, 2),
        Conv("features_3", 192, 5, padding=2), Act("relu"), MaxPool(3, 2),
        Conv("features_6", 384, 3, padding=1), Act("relu"),
        Conv("features_8", 256, 3, padding=1), Act("relu"),
        Conv("features_10", 256, 3, padding=1), Act("relu"), MaxPool(3, 2),
        Flatten(), Linear("classifier_1", 4096), Act("relu"), Linear("classifier_4", 4096), Act("relu"),
        Linear("classifier_6", 1000)))


NETS = {
    # The DP-SGD MNIST CNN of Papernot et al. 2020 (tanh).
    "mnist_cnn": Net("mnist_cnn", (1, 28, 28), 10, (
        Conv("conv1", 16, 8, stride=2, padding=3), Act("tanh"), MaxPool(2, 1),
        Conv("conv2", 32, 4, stride=2), Act("tanh"), MaxPool(2, 1),
        Flatten(), Linear("fc1", 32), Act("tanh"), Linear("fc2", 10))),
    # The DP-SGD CIFAR-10 CNN of Papernot et al. 2020 (tanh).
    "cifar_cnn": Net("cifar_cnn", (3, 32, 32), 10, (
        Conv("conv1", 32, 3, padding=1), Act("tanh"), Conv("conv2", 32, 3, padding=1), Act("tanh"), MaxPool(2, 2),
        Conv("conv3", 64, 3, padding=1), Act("tanh"), Conv("conv4", 64, 3, padding=1), Act("tanh"), MaxPool(2, 2),
        Conv("conv5", 128, 3, padding=1), Act("tanh"), Conv("conv6", 128, 3, padding=1), Act("tanh"),
        MaxPool(2, 2),
        Flatten(), Linear("fc1", 128), Act("tanh"), Linear("fc2", 10))),
    "toy_l2_r4_k3": _toy("toy_l2_r4_k3", 2, 4, 3, 32400),
    "toy_l3_r2_k5": _toy("toy_l3_r2_k5", 3, 2, 5, 25600),
    "toy_l4_r2_k3": _toy("toy_l4_r2_k3", 4, 2, 3, 24200),
    "vgg16": _vgg16(),
    "alexnet": _alexnet(),
}
assert feature_count(NETS["cifar_cnn"]) == 2048 and feature_count(NETS["vgg16"]) == 25088
assert feature_count(NETS["alexnet"]) == 9216




def torch_model(net: Net):
    """The net as an nn.Module whose submodules are named after the .pdg layers (so its
    state_dict keys are the pdgc parameter names). Activations and pools are functional."""
    import torch
    import torch.nn.functional as F

    class ChainNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            shape = tuple(net.input_shape)
            for layer, next_shape in zip(net.layers, shapes(net)):
                if isinstance(layer, Conv):
                    self.add_module(layer.name, torch.nn.Conv2d(shape[0], layer.out_channels, layer.kernel,
                                                                stride=layer.stride, padding=layer.padding))
                elif isinstance(layer, Linear):
                    self.add_module(layer.name, torch.nn.Linear(shape[0], layer.out_features))
                shape = next_shape

        def forward(self, x):
            for layer in net.layers:
                if isinstance(layer, (Conv, Linear)):
                    x = getattr(self, layer.name)(x)
                elif isinstance(layer, Act):
                    x = torch.tanh(x) if layer.kind == "tanh" else F.relu(x)
                elif isinstance(layer, MaxPool):
                    x = F.max_pool2d(x, layer.kernel, layer.stride)
                else:
                    x = x.flatten(1)
            return x

    return ChainNet()


def jax_forward(net: Net):
    """`forward(params, x) -> logits` in JAX (NCHW activations, OIHW kernels, as PyTorch)."""
    import jax
    import jax.numpy as jnp

    def forward(params, x):
        for layer in net.layers:
            if isinstance(layer, Conv):
                w, b = params[f"{layer.name}.weight"], params[f"{layer.name}.bias"]
                p = layer.padding
                x = jax.lax.conv_general_dilated(x, w, (layer.stride, layer.stride), [(p, p), (p, p)],
                                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
                x = x + b[None, :, None, None]
            elif isinstance(layer, Linear):
                x = x @ params[f"{layer.name}.weight"].T + params[f"{layer.name}.bias"]
            elif isinstance(layer, Act):
                x = jnp.tanh(x) if layer.kind == "tanh" else jax.nn.relu(x)
            elif isinstance(layer, MaxPool):
                k, s = layer.kernel, layer.stride
                x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, k, k), (1, 1, s, s), "VALID")
            else:
                x = x.reshape(x.shape[0], -1)
        return x

    return forward
