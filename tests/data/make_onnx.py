"""Writes the ONNX test files tests/data/onnx/<model>.onnx for `pdgc import` (tests/import.rs).

Each file is ``torch.onnx.export`` (the default dynamo exporter at opset 20, dynamic batch dim) of a
PyTorch model written to be equivalent to one .pdg model: every sample network in samples/,
two test models in tests/data/models/, ``legacy_opset17`` (below) and ``same_padding`` (convs with
``padding="same"`` and even kernels, which export per-side ``pads``). Module names are chosen
so that pdgc's name mapping (``.`` -> ``_``, ``_`` -> ``__``) gives the sample's layer names:
``features.0`` -> ``features_0``, ``layer2.0.down.conv`` -> ``layer2_0_down_conv``.

Weights:

* the models with PyTorch vectors in tests/data (``<model>.safetensors``, written by
  make_vectors.py) are exported with the vector file's parameters loaded, so the imported
  weights can be checked against them and the imported model's per-example gradients
  against the stored ones;
* ``legacy_opset17`` is written by the TorchScript exporter (``dynamo=False``) at opset 17,
  whose GELU, ``padding="same"`` and group norm look different;
* the others (alexnet, vgg16, resnet18_gn, the toy grid, cifar_cnn, same_padding,
  legacy_opset17) are
  weight-free: after the export every parameter initializer is marked as external data in a
  file that is not kept (``<model>.onnx.data``), so the repository stays small; pdgc imports
  their structure with ``--no-weights``.

How to run (from the repository root; needs torch, onnx, onnxscript and safetensors, CPU
is enough)::

    python tests/data/make_onnx.py            # all models
    python tests/data/make_onnx.py mnist_cnn  # only the named ones
"""

import sys
from pathlib import Path

import onnx
import onnx.numpy_helper
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx.external_data_helper import set_external_data
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "onnx"


def decode(name: str) -> str:
    """pdgc's .pdg layer name -> PyTorch module path (src/import/names.rs)."""
    lead = len(name) - len(name.lstrip("_"))
    if lead % 2 == 1:
        name = name[1:]
    out, i = [], 0
    while i < len(name):
        if name[i] == "_" and name[i + 1:i + 2] == "_":
            out.append("_")
            i += 2
        elif name[i] == "_":
            out.append(".")
            i += 1
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


class MnistCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, stride=2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
        self.fc1 = nn.Linear(512, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = F.max_pool2d(torch.tanh(self.conv1(x)), 2, 1)
        h = F.max_pool2d(torch.tanh(self.conv2(h)), 2, 1)
        return self.fc2(torch.tanh(self.fc1(torch.flatten(h, 1))))


class CifarCnn(nn.Module):
    def __init__(self):
        super().__init__()
        chans = [3, 32, 32, 64, 64, 128, 128]
        for i in range(6):
            setattr(self, f"conv{i + 1}", nn.Conv2d(chans[i], chans[i + 1], 3, padding=1))
        self.fc1 = nn.Linear(2048, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        h = x
        for i in range(6):
            h = torch.tanh(getattr(self, f"conv{i + 1}")(h))
            if i % 2 == 1:
                h = F.max_pool2d(h, 2)
        return self.fc2(torch.tanh(self.fc1(torch.flatten(h, 1))))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv1d(16, 32, 5, dilation=2, padding=4)
        self.conv3 = nn.Conv1d(32, 32, 3, padding=1)
        self.gn3 = nn.GroupNorm(8, 32)
        self.fc = nn.Linear(32, 5)

    def forward(self, signal):
        h = F.max_pool1d(F.relu(self.conv1(signal)), 2)
        h = F.avg_pool1d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.gn3(self.conv3(h)))
        return self.fc(torch.flatten(F.adaptive_avg_pool1d(h, 1), 1))


class DepthwiseSeparable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.dw1 = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw1 = nn.Conv2d(32, 64, 1)
        self.dw2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=64)
        self.pw2 = nn.Conv2d(64, 128, 1)
        self.dw3 = nn.Conv2d(128, 128, 3, stride=2, padding=1, groups=128)
        self.pw3 = nn.Conv2d(128, 128, 1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.pw1(F.relu(self.dw1(h))))
        h = F.relu(self.pw2(F.relu(self.dw2(h))))
        h = F.relu(self.pw3(F.relu(self.dw3(h))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class RegressionMlpLn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(8, 16, 3, padding=1)
        self.ln1 = nn.LayerNorm([16, 16])
        self.in1 = nn.InstanceNorm1d(16, affine=True)
        self.in2 = nn.InstanceNorm1d(16)
        self.head = nn.Linear(256, 4)

    def forward(self, x):
        h = F.leaky_relu(self.conv1(x), 0.1)
        a = self.ln1(h)
        b = self.in2(torch.sigmoid(self.in1(a)))
        return self.head(torch.flatten(F.gelu(a + b), 1))


class Down(nn.Module):
    """A 1x1 strided conv and its group norm: the residual shortcut."""

    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.gn = nn.GroupNorm(groups, cout)

    def forward(self, x):
        return self.gn(self.conv(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, groups=32):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, cout)
        self.down = Down(cin, cout, stride, groups) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return F.relu(out + (self.down(x) if self.down is not None else x))


class Resnet18Gn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.gn1 = nn.GroupNorm(32, 64)
        chans = [64, 64, 128, 256, 512]
        for i in range(1, 5):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(chans[i - 1], chans[i], stride),
                                                     BasicBlock(chans[i], chans[i], 1)))
        self.fc = nn.Linear(512, 1000)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.gn1(self.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            h = getattr(self, f"layer{i}")(h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class GnResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 16, 3, stride=2, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(4, 16)
        self.down = Down(4, 16, 2, 4)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.gn3 = nn.GroupNorm(8, 16)
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1)
        self.gn4 = nn.GroupNorm(2, 16, eps=1e-3)
        self.fc = nn.Linear(16, 6)

    def forward(self, x):
        out = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x)))))
        h = F.relu(out + self.down(x))
        out = self.gn4(self.conv4(F.relu(self.gn3(self.conv3(h)))))
        h = F.relu(out + h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class ConvGeometry(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, dilation=2, padding=2)
        self.c3 = nn.Conv2d(8, 8, (3, 2), stride=(2, 1), groups=2)
        self.c4 = nn.Conv2d(8, 6, (2, 3), padding=(1, 2), dilation=(2, 1), bias=False)
        self.rows = nn.Linear(4, 5)
        self.c5 = nn.Conv1d(2, 4, 5, stride=3, padding=2, dilation=2)
        self.c6 = nn.Conv1d(4, 6, 2, groups=2)
        self.f1 = nn.Linear(60, 16)
        self.f2 = nn.Linear(24, 16)
        self.out = nn.Linear(16, 7)

    def forward(self, img, sig):
        a = torch.sigmoid(self.c1(img))
        a = F.leaky_relu(self.c2(a), 0.2)
        a = F.max_pool2d(a, 3, 2, 1)
        a = F.gelu(self.c3(a))
        a = F.avg_pool2d(self.c4(a), 3, 2, 1)
        a = torch.tanh(self.rows(a))
        b = torch.tanh(self.c5(sig))
        b = F.max_pool1d(b, 3, 2, 1)
        b = F.relu(self.c6(b))
        b = F.avg_pool1d(b, 2, 1)
        h = F.gelu(self.f1(torch.flatten(a, 1)) + self.f2(torch.flatten(b, 1)))
        return self.out(h)


class Toy(nn.Module):
    """The toy grid of Rochette et al. 2019: `layers` convs, channel rate `rate`, kernel `k`."""

    def __init__(self, layers, rate, k, fc_in):
        super().__init__()
        chans = [3] + [25 * rate ** i for i in range(layers)]
        for i in range(layers):
            setattr(self, f"conv{i + 1}", nn.Conv2d(chans[i], chans[i + 1], k, padding=2))
        self.layers = layers
        self.fc = nn.Linear(fc_in, 10)

    def forward(self, x):
        h = x
        for i in range(self.layers):
            h = F.relu(getattr(self, f"conv{i + 1}")(h))
            if i % 2 == 1:
                h = F.max_pool2d(h, 2)
        return self.fc(torch.flatten(h, 1))


class Features(nn.Module):
    """torchvision's AlexNet and VGG-16 (no dropout at inference, no adaptive pool on 224)."""

    def __init__(self, features, classifier):
        super().__init__()
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def alexnet():
    r = lambda: nn.ReLU(inplace=True)
    features = [nn.Conv2d(3, 64, 11, 4, 2), r(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), r(),
                nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), r(), nn.Conv2d(384, 256, 3, padding=1), r(),
                nn.Conv2d(256, 256, 3, padding=1), r(), nn.MaxPool2d(3, 2)]
    classifier = [nn.Dropout(), nn.Linear(9216, 4096), r(), nn.Dropout(), nn.Linear(4096, 4096), r(),
                  nn.Linear(4096, 1000)]
    return Features(features, classifier)


def vgg16():
    features, cin = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if v == "M":
            features.append(nn.MaxPool2d(2))
        else:
            features += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    classifier = [nn.Linear(25088, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(True),
                  nn.Dropout(), nn.Linear(4096, 1000)]
    return Features(features, classifier)


class SamePadding(nn.Module):
    """padding="same" with even kernels: ONNX pads (1, 2) rows and (0, 1) columns."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, (4, 2), padding="same")
        self.c2 = nn.Conv2d(4, 4, 2, padding="same", dilation=3)
        self.fc = nn.Linear(4 * 9 * 8, 5)

    def forward(self, img):
        return self.fc(torch.flatten(torch.tanh(self.c2(torch.tanh(self.c1(img)))), 1))


class Legacy(nn.Module):
    """For the TorchScript exporter at opset 17 (``legacy_opset17``): GELU as erf arithmetic,
    ``padding="same"`` as ``auto_pad=SAME_UPPER``, group norm with Constant nodes, layer
    norm, a 3-D linear as MatMul + Add."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, (4, 2), padding="same")
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(8)
        self.rows = nn.Linear(8, 3)
        self.fc = nn.Linear(4 * 9 * 3, 5)

    def forward(self, img):
        h = F.gelu(self.gn(self.c1(img)))
        h = torch.sigmoid(self.rows(self.ln(h)))
        return self.fc(torch.flatten(h, 1))


# name -> (model factory, {input name: per-example shape}, weights from the vector file?)
MODELS = {
    "mnist_cnn": (MnistCnn, {"x": [1, 28, 28]}, True),
    "cifar_cnn": (CifarCnn, {"x": [3, 32, 32]}, False),
    "conv1d_net": (Conv1dNet, {"signal": [1, 128]}, True),
    "depthwise_separable": (DepthwiseSeparable, {"x": [3, 32, 32]}, True),
    "regression_mlp_ln": (RegressionMlpLn, {"x": [8, 16]}, True),
    "gn_residual_block": (GnResidualBlock, {"x": [4, 12, 12]}, True),
    "conv_geometry": (ConvGeometry, {"img": [3, 25, 23], "sig": [2, 40]}, True),
    "alexnet": (alexnet, {"x": [3, 224, 224]}, False),
    "vgg16": (vgg16, {"x": [3, 224, 224]}, False),
    "resnet18_gn": (Resnet18Gn, {"x": [3, 224, 224]}, False),
    "toy_l2_r4_k3": (lambda: Toy(2, 4, 3, 32400), {"x": [3, 32, 32]}, False),
    "toy_l3_r2_k5": (lambda: Toy(3, 2, 5, 25600), {"x": [3, 32, 32]}, False),
    "toy_l4_r2_k3": (lambda: Toy(4, 2, 3, 24200), {"x": [3, 32, 32]}, False),
    "same_padding": (SamePadding, {"img": [2, 9, 8]}, False),
    "legacy_opset17": (Legacy, {"img": [2, 9, 8]}, False),
}


def strip_weights(path: Path, params: set):
    """Marks every parameter initializer as external data in a file that is not kept."""
    m = onnx.load(str(path))
    offset = 0
    for t in m.graph.initializer:
        if t.name in params:
            if not t.HasField("raw_data"):
                t.raw_data = onnx.numpy_helper.to_array(t).tobytes()
                t.ClearField("float_data")
            size = len(t.raw_data)
            set_external_data(t, location=f"{path.name}.data", offset=offset, length=size)
            t.data_location = onnx.TensorProto.EXTERNAL
            t.ClearField("raw_data")
            offset += size
    onnx.save(m, str(path))


def make(name: str):
    factory, inputs, with_weights = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    if with_weights:
        vectors = load_file(str(ROOT / "tests" / "data" / f"{name}.safetensors"))
        state = {}
        for key in model.state_dict():
            layer, suffix = key.rsplit(".", 1)
            pdg = "_".join(p.replace("_", "__") for p in layer.split(".")) + "." + suffix
            if pdg[0].isdigit():
                pdg = "_" + pdg
            assert decode(pdg.rsplit(".", 1)[0]) == layer, (pdg, layer)
            state[key] = vectors[pdg]
        model.load_state_dict(state)
    args = tuple(torch.randn([2] + shape) for shape in inputs.values())
    batch = torch.export.Dim("batch")
    path = OUT / f"{name}.onnx"
    if name == "legacy_opset17":
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, input_names=list(inputs),
                          output_names=["logits"], dynamic_axes={k: {0: "batch"} for k in inputs})
    else:
        torch.onnx.export(model, args, str(path), dynamo=True, opset_version=20, external_data=False,
                          input_names=list(inputs), output_names=["logits"],
                          dynamic_shapes=tuple({0: batch} for _ in inputs))
    onnx.checker.check_model(onnx.load(str(path)))
    if not with_weights:
        strip_weights(path, set(model.state_dict()))
    print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1e3:.1f} kB, "
          f"{'weights' if with_weights else 'weight-free'}, torch {torch.__version__}")


def main(argv):
    OUT.mkdir(parents=True, exist_ok=True)
    for name in (argv or list(MODELS)):
        make(name)


if __name__ == "__main__":
    main(sys.argv[1:])
