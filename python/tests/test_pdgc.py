"""The `pdgc` Python package: every entry point, its errors, and agreement with the `pdgc`
command line on the same inputs (`pdgc grads` on safetensors files written from the same
arrays). Needs NumPy, safetensors and the `pdgc` binary (`PDGC_BIN`, or the repository's
target/{debug,release}/pdgc); not torch.
"""

import array
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import pdgc

ROOT = Path(__file__).resolve().parents[2]
MNIST = ROOT / "samples" / "mnist_cnn.pdg"

TINY = """
model tiny {
    input x: [1, 6, 6];
    label y: classes(3);
    h = tanh(conv: conv2d(x, 2, kernel=3));
    logits = fc: linear(flatten(h), 3);
    loss cross_entropy(logits, y);
}
"""


def pdgc_bin() -> str:
    """The CLI to compare with: `PDGC_BIN`, else the repository's build (a missing binary
    fails the comparison tests rather than skipping them)."""
    if os.environ.get("PDGC_BIN"):
        return os.environ["PDGC_BIN"]
    for profile in ("debug", "release"):
        candidate = ROOT / "target" / profile / "pdgc"
        if candidate.exists():
            return str(candidate)
    raise AssertionError("no pdgc binary: run `cargo build` or set PDGC_BIN")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([pdgc_bin(), *args], cwd=ROOT, capture_output=True, text=True)


def random_batch(n: int, seed: int = 0, classes: int = 10, shape=(1, 28, 28)) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, *shape)).astype(np.float32),
        "y": (np.arange(n) * 7 + seed) % classes,
    }


@pytest.fixture(scope="module")
def mnist():
    return pdgc.compile(MNIST, batch=8, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    return pdgc.compile(TINY, batch=4, device="cpu")


# --- compile and Module -------------------------------------------------------------------


def test_compile_from_a_path_a_str_and_the_source(mnist):
    assert mnist.name == "mnist_cnn"
    assert mnist.max_batch == 8
    assert mnist.goal == "clipped_sum"
    assert mnist.inputs == {"x": (1, 28, 28)}
    assert mnist.label == "y"
    assert list(mnist.params) == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                                  "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert mnist.params["conv1.weight"] == (16, 1, 8, 8)
    from_str = pdgc.compile(str(MNIST), batch=3)
    from_source = pdgc.compile(MNIST.read_text(), batch=3, goal="grads")
    assert from_str.params == from_source.params == mnist.params
    assert from_source.goal == "grads"
    assert "mnist_cnn" in repr(from_str) and "max_batch=3" in repr(from_str)


def test_plans_and_init_params(mnist):
    assert "total" in mnist.plan() and mnist.plan("grads") != ""
    params = mnist.init_params(seed=1)
    assert {k: v.shape for k, v in params.items()} == mnist.params
    assert all(v.dtype == np.float32 for v in params.values())
    bound = 1 / np.sqrt(64)
    assert np.abs(params["conv1.weight"]).max() <= bound
    np.testing.assert_array_equal(params["fc2.bias"], mnist.init_params(seed=1)["fc2.bias"])
    assert not np.array_equal(params["fc2.bias"], mnist.init_params(seed=2)["fc2.bias"])


def test_modules_save_and_load(tmp_path, tiny):
    path = tmp_path / "tiny.pdgm"
    tiny.save(path)
    loaded = pdgc.compile(path)
    assert loaded.max_batch == 4 and loaded.params == tiny.params
    with pytest.raises(pdgc.SettingError, match="was compiled for batch 4"):
        pdgc.compile(path, batch=5)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(pdgc.FileError, match="truncated"):
        pdgc.compile(path)


def test_compile_errors():
    with pytest.raises(pdgc.SourceError) as e:
        pdgc.compile(ROOT / "samples" / "errors" / "multiple_errors.pdg")
    assert "did you mean `maxpool2d`?" in str(e.value)
    assert "multiple_errors.pdg:7:37" in str(e.value)
    with pytest.raises(pdgc.FileError, match="cannot read no/such/file.pdg"):
        pdgc.compile("no/such/file.pdg")
    with pytest.raises(pdgc.SettingError, match="batch size must be at least 1"):
        pdgc.compile(TINY, batch=0)
    with pytest.raises(pdgc.SettingError, match="goal"):
        pdgc.compile(TINY, goal="fastest")
    with pytest.raises(pdgc.SettingError, match="device"):
        pdgc.compile(TINY, device="tpu")
    with pytest.raises(pdgc.SettingError, match="profile"):
        pdgc.compile(TINY, profile="a100")
    with pytest.raises(pdgc.SettingError, match="unknown strategy"):
        pdgc.compile(TINY, strategy={"conv": "magic"})
    forced = pdgc.compile(TINY, batch=2, strategy={"conv": "unfold"})
    assert "unfold" in forced.plan()
    assert issubclass(pdgc.SourceError, pdgc.Error) and issubclass(pdgc.Error, ValueError)


# --- Session: the entry points ------------------------------------------------------------


def test_entry_points_agree_with_each_other(mnist):
    s = mnist.session(threads=2)
    assert s.device.startswith("cpu") and s.threads == 2 and s.max_batch == 8
    params = mnist.init_params(0)
    batch = random_batch(6)
    grads = s.per_example_grads(params, batch)
    assert {k: v.shape for k, v in grads.items()} == {k: (6, *v) for k, v in mnist.params.items()}
    norms = s.per_example_norms(params, batch)
    flat = np.concatenate([g.reshape(6, -1) for g in grads.values()], axis=1).astype(np.float64)
    np.testing.assert_allclose(norms, np.linalg.norm(flat, axis=1), rtol=1e-4)
    loss = s.loss(params, batch)
    assert loss.shape == (6,) and loss.dtype == np.float32 and np.all(loss > 0)
    logits = s.forward(params, batch)
    assert logits.shape == (6, 10)
    want = np.log(np.exp(logits.astype(np.float64)).sum(1)) - logits[np.arange(6), batch["y"]]
    np.testing.assert_allclose(loss, want, rtol=1e-4)
    clip = float(np.median(norms))
    cs = s.clipped_grad_sum(params, batch, clip)
    # The norms step and the clipped-sum step are planned per goal and may run a layer with
    # different strategies (ghost norms in one, an outer product's in the other), so their
    # norms agree to rounding, not bit for bit; the forward pass, and so the loss, is shared.
    np.testing.assert_allclose(cs.norms, norms, rtol=1e-6)
    np.testing.assert_array_equal(cs.loss, loss)
    scale = np.minimum(1.0, clip / (norms + 1e-6))
    for name, g in grads.items():
        np.testing.assert_allclose(cs.sum[name], np.tensordot(scale, g, axes=1), rtol=1e-4, atol=1e-6)
    bg = s.batch_grad(params, batch)
    for name, g in grads.items():
        np.testing.assert_allclose(bg[name], g.sum(0), rtol=1e-4, atol=1e-6)


def test_threads_do_not_change_results(tiny):
    params, batch = tiny.init_params(3), random_batch(4, classes=3, shape=(1, 6, 6))
    one = tiny.session(threads=1).per_example_grads(params, batch)
    s = tiny.session()
    s.threads = 2
    two = s.per_example_grads(params, batch)
    for k in one:
        np.testing.assert_allclose(one[k], two[k], rtol=1e-6)
    with pytest.raises(pdgc.SettingError, match="threads 0"):
        s.threads = 0
    with pytest.raises(pdgc.SettingError, match="threads 0"):
        tiny.session(threads=0)


def test_a_small_memory_budget_micro_batches_and_a_tiny_one_is_an_error(tiny):
    params, batch = tiny.init_params(3), random_batch(4, classes=3, shape=(1, 6, 6))
    whole = tiny.session().clipped_grad_sum(params, batch, 0.5)
    s = tiny.session()
    assert s.memory_budget > 0
    s.memory_budget = 3000  # bytes: the buffers of two examples fit (2.4 KiB), of three do not
    part = s.clipped_grad_sum(params, batch, 0.5)
    np.testing.assert_allclose(part.norms, whole.norms, rtol=1e-5)
    for k in whole.sum:
        np.testing.assert_allclose(part.sum[k], whole.sum[k], rtol=1e-5, atol=1e-7)
    s.memory_budget = 64
    with pytest.raises(pdgc.OutOfMemoryError, match="memory budget is 64 B"):
        s.clipped_grad_sum(params, batch, 0.5)


def test_the_interpreter_agrees_with_the_jit(tiny):
    params, batch = tiny.init_params(3), random_batch(3, classes=3, shape=(1, 6, 6))
    jit = tiny.session("cpu").clipped_grad_sum(params, batch, 0.5)
    interp = tiny.session("interpreter").clipped_grad_sum(params, batch, 0.5)
    for k in jit.sum:
        np.testing.assert_allclose(jit.sum[k], interp.sum[k], rtol=1e-4, atol=1e-6)


def test_cuda_is_a_device_error_without_a_gpu(tiny):
    try:
        s = tiny.session("cuda")
    except pdgc.DeviceError as e:
        assert str(e).startswith("device: ") or str(e).startswith("kernel backend: ")
    else:
        assert s.device.startswith("cuda")


class ArrayWrapper:
    """Stands for a PyTorch CPU tensor: no buffer protocol, only `__array__`."""

    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return self._a


def test_buffer_protocol_and_array_interface_inputs(tiny):
    s = tiny.session()
    params, batch = tiny.init_params(0), random_batch(2, classes=3, shape=(1, 6, 6))
    want = s.loss(params, batch)
    wrapped = {k: ArrayWrapper(v) for k, v in params.items()}
    labels = array.array("q", batch["y"].tolist())  # the buffer protocol, int64
    got = s.loss(wrapped, {"x": memoryview(batch["x"]), "y": labels})
    np.testing.assert_array_equal(got, want)
    int32 = s.loss(params, {"x": batch["x"], "y": batch["y"].astype(np.int32)})
    np.testing.assert_array_equal(int32, want)
    extra = dict(batch, note=np.zeros(3, np.float64))  # tensors the model does not read are ignored
    np.testing.assert_array_equal(s.loss(params, extra), want)


# --- errors: the CLI's messages -----------------------------------------------------------


def cli_error(tmp_path, params: dict, batch: dict) -> str:
    """`pdgc grads` on files holding these arrays: its error line, with the file names
    replaced by what the Python API calls them."""
    p, b = tmp_path / "p.safetensors", tmp_path / "b.safetensors"
    save_file(params, str(p))
    save_file(batch, str(b))
    out = run_cli("grads", str(MNIST), "--params", str(p), "--batch", str(b), "-o", str(tmp_path / "o.st"),
                  "--device", "cpu")
    assert out.returncode == 1, out.stderr
    line = out.stderr.strip().splitlines()[-1].removeprefix("error: ")
    return line.replace(str(p), "params").replace(str(b), "batch")


def bad_inputs(mnist):
    params, batch = mnist.init_params(0), random_batch(3)
    missing = dict(params)
    del missing["fc2.weight"]
    nan = dict(params, **{"fc1.bias": params["fc1.bias"].copy()})
    nan["fc1.bias"][5] = np.nan
    return [
        (pdgc.MissingTensorError, missing, batch),
        (pdgc.UnexpectedTensorError, dict(params, extra=np.zeros(2, np.float32)), batch),
        (pdgc.ShapeError, dict(params, **{"fc2.weight": np.zeros((10, 33), np.float32)}), batch),
        (pdgc.DtypeError, dict(params, **{"fc2.bias": params["fc2.bias"].astype(np.float64)}), batch),
        (pdgc.NonFiniteError, nan, batch),
        (pdgc.ShapeError, params, dict(batch, x=np.ascontiguousarray(batch["x"][:, :, :27]))),
        (pdgc.DtypeError, params, dict(batch, y=batch["y"].astype(np.float32))),
        (pdgc.LabelError, params, dict(batch, y=np.array([1, 10, 2]))),
        (pdgc.ShapeError, params, dict(batch, y=np.array([1, 2]))),
        (pdgc.MissingTensorError, params, {"x": batch["x"]}),
        (pdgc.NonFiniteError, params, dict(batch, x=np.full_like(batch["x"], np.inf))),
    ]


def test_bad_inputs_raise_the_cli_messages(tmp_path, mnist):
    s = mnist.session()
    for kind, params, batch in bad_inputs(mnist):
        with pytest.raises(kind) as e:
            s.per_example_grads(params, batch)
        assert str(e.value) == cli_error(tmp_path, params, batch), kind


def test_errors_of_the_python_side(mnist):
    s = mnist.session()
    params, batch = mnist.init_params(0), random_batch(9)
    with pytest.raises(pdgc.BatchTooLargeError) as e:
        s.loss(params, batch)
    assert str(e.value) == "a batch of 9 examples is larger than the 8 this module was compiled for " \
                           "(recompile with --batch 9)"
    small = random_batch(2)
    with pytest.raises(pdgc.LayoutError, match="`x` is not C-contiguous"):
        s.loss(params, dict(small, x=np.asfortranarray(small["x"])))
    with pytest.raises(pdgc.DtypeError, match="`y` has dtype <U1, which pdgc does not read"):
        s.loss(params, dict(small, y=np.array(["a", "b"])))
    with pytest.raises(TypeError, match="batch: expected a dict of arrays"):
        s.loss(params, [small["x"], small["y"]])
    with pytest.raises(pdgc.SettingError, match="clip norm must be a positive finite number"):
        s.clipped_grad_sum(params, small, 0.0)
    with pytest.raises(pdgc.SettingError, match="clip norm"):
        s.clipped_grad_sum(params, small, float("nan"))


# --- agreement with `pdgc grads` ----------------------------------------------------------


def test_results_match_pdgc_grads(tmp_path):
    module = pdgc.compile(MNIST, batch=5, device="cpu")
    params, batch = module.init_params(4), random_batch(5, seed=3)
    p, b, o = tmp_path / "p.safetensors", tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    save_file(params, str(p))
    save_file(batch, str(b))
    out = run_cli("grads", str(MNIST), "--params", str(p), "--batch", str(b), "-o", str(o), "--clip", "0.7",
                  "--device", "cpu")
    assert out.returncode == 0, out.stderr
    cli = load_file(str(o))
    s = module.session()
    np.testing.assert_allclose(s.loss(params, batch), cli["loss"], rtol=1e-6)
    np.testing.assert_allclose(s.per_example_norms(params, batch), cli["norms"], rtol=1e-6)
    grads = s.per_example_grads(params, batch)
    cs = s.clipped_grad_sum(params, batch, 0.7)
    for name in module.params:
        np.testing.assert_allclose(grads[name], cli[name], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(cs.sum[name], cli[f"clipped_sum.{name}"], rtol=1e-5, atol=1e-7)


def test_an_empty_batch_matches_pdgc_grads(tmp_path, mnist):
    params, empty = mnist.init_params(0), random_batch(0)
    s = mnist.session()
    assert s.loss(params, empty).shape == (0,)
    assert s.per_example_norms(params, empty).shape == (0,)
    assert s.forward(params, empty).shape == (0, 10)
    grads = s.per_example_grads(params, empty)
    cs = s.clipped_grad_sum(params, empty, 1.0)
    bg = s.batch_grad(params, empty)
    assert cs.norms.shape == (0,) and cs.loss.shape == (0,)
    for name, shape in mnist.params.items():
        assert grads[name].shape == (0, *shape)
        np.testing.assert_array_equal(cs.sum[name], np.zeros(shape, np.float32))
        np.testing.assert_array_equal(bg[name], np.zeros(shape, np.float32))
    p, b, o = tmp_path / "p.safetensors", tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    save_file(params, str(p))
    save_file(empty, str(b))
    out = run_cli("grads", str(MNIST), "--params", str(p), "--batch", str(b), "-o", str(o), "--clip", "1")
    assert out.returncode == 0, out.stderr
    cli = load_file(str(o))
    assert cli["loss"].shape == (0,) and cli["conv1.weight"].shape == (0, 16, 1, 8, 8)
    np.testing.assert_array_equal(cli["clipped_sum.fc2.weight"], cs.sum["fc2.weight"])


# --- dp_sgd_step --------------------------------------------------------------------------


def test_dp_sgd_step_updates_in_place(tiny):
    s = tiny.session()
    params, batch = tiny.init_params(1), random_batch(4, classes=3, shape=(1, 6, 6))
    before = {k: v.copy() for k, v in params.items()}
    ids = {k: id(v) for k, v in params.items()}
    cs = s.clipped_grad_sum(params, batch, 0.5)
    opt = pdgc.Optimizer.sgd(lr=0.1)
    report = s.dp_sgd_step(params, batch, clip=0.5, noise_multiplier=0.0, expected_batch=4.0, optimizer=opt)
    assert {k: id(v) for k, v in params.items()} == ids, "the same arrays, updated"
    for k in params:
        np.testing.assert_allclose(params[k], before[k] - 0.1 * cs.sum[k] / 4.0, rtol=1e-5, atol=1e-7)
    assert report.batch_size == 4 and opt.steps == 1
    np.testing.assert_array_equal(report.norms, cs.norms)
    np.testing.assert_array_equal(report.losses, cs.loss)
    assert report.clipped_fraction == np.mean(cs.norms > 0.5)


def test_dp_sgd_step_noise_is_seeded(tiny):
    batch = random_batch(7, classes=3, shape=(1, 6, 6))  # larger than max_batch: micro-batched
    results = []
    for seed in (5, 5, 6):
        params = tiny.init_params(1)
        opt = pdgc.Optimizer.adam(lr=0.01)
        for _ in range(2):
            tiny.session().dp_sgd_step(params, batch, clip=1.0, noise_multiplier=1.0, expected_batch=7.0,
                                       optimizer=opt, generator=pdgc.Generator(seed))
        assert opt.steps == 2 and set(opt.state_dict()) == {f"exp_{m}.{k}" for m in ("avg", "avg_sq")
                                                            for k in params}
        results.append(np.concatenate([v.ravel() for v in params.values()]))
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.array_equal(results[0], results[2])
    seeded = tiny.session(seed=9)
    p1, p2 = tiny.init_params(1), tiny.init_params(1)
    seeded.dp_sgd_step(p1, batch, clip=1.0, noise_multiplier=1.0, expected_batch=7.0,
                       optimizer=pdgc.Optimizer.sgd(0.1))
    tiny.session(seed=9).dp_sgd_step(p2, batch, clip=1.0, noise_multiplier=1.0, expected_batch=7.0,
                                     optimizer=pdgc.Optimizer.sgd(0.1))
    np.testing.assert_array_equal(p1["fc.weight"], p2["fc.weight"])


def test_dp_sgd_step_on_an_empty_batch_adds_only_noise(tiny):
    s = tiny.session()
    empty = random_batch(0, classes=3, shape=(1, 6, 6))
    params = tiny.init_params(1)
    before = {k: v.copy() for k, v in params.items()}
    opt = pdgc.Optimizer.sgd(lr=1.0, momentum=0.9)
    r = s.dp_sgd_step(params, empty, clip=1.0, noise_multiplier=0.0, expected_batch=3.0, optimizer=opt)
    assert r.batch_size == 0 and r.losses.shape == (0,) and r.clipped_fraction == 0.0
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    s.dp_sgd_step(params, empty, clip=1.0, noise_multiplier=2.0, expected_batch=3.0, optimizer=opt)
    assert all(np.all(params[k] != before[k]) for k in params), "every coordinate got noise"


def test_dp_sgd_step_errors_leave_params_unchanged(tiny):
    s = tiny.session()
    params, batch = tiny.init_params(1), random_batch(2, classes=3, shape=(1, 6, 6))
    frozen = {k: v.copy() for k, v in params.items()}
    frozen["fc.bias"].setflags(write=False)
    opt = pdgc.Optimizer.sgd(lr=0.1)
    with pytest.raises(pdgc.LayoutError, match="`fc.bias` cannot be updated in place"):
        s.dp_sgd_step(frozen, batch, clip=1.0, noise_multiplier=1.0, expected_batch=2.0, optimizer=opt)
    for k in params:
        np.testing.assert_array_equal(frozen[k], params[k])
    for bad in (dict(clip=-1.0, noise_multiplier=1.0, expected_batch=2.0),
                dict(clip=1.0, noise_multiplier=-1.0, expected_batch=2.0),
                dict(clip=1.0, noise_multiplier=1.0, expected_batch=0.0)):
        with pytest.raises(pdgc.SettingError):
            s.dp_sgd_step(params, batch, optimizer=opt, **bad)
    assert opt.steps == 0
    with pytest.raises(pdgc.SettingError, match="--lr"):
        pdgc.Optimizer.sgd(lr=0.0)
    with pytest.raises(pdgc.SettingError, match="--momentum"):
        pdgc.Optimizer.sgd(lr=0.1, momentum=1.0)
    with pytest.raises(pdgc.SettingError, match="Adam betas"):
        pdgc.Optimizer.adam(lr=0.1, beta1=1.5)


# --- privacy ------------------------------------------------------------------------------


def test_privacy_matches_opacus_and_the_cli():
    # Opacus 1.6's RDPAccountant on (σ, q, T) at δ = 1e-5, as the Rust tests pin it.
    eps, order = pdgc.privacy.epsilon_and_order(1.0, 0.01, 1000, 1e-5, accountant="rdp")
    assert abs(eps - 2.1013652716430564) < 1e-9 and order == 7.8
    rdp = pdgc.privacy.epsilon(1.1, 256 / 60000, 14062, 1e-5, accountant="rdp")
    assert rdp == pytest.approx(2.5965558689607486, rel=1e-9)
    out = run_cli(
        "privacy", "--noise", "1.0", "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5",
        "--accountant", "rdp",
    )
    assert out.returncode == 0, out.stderr
    assert f"{eps:.3f}" in out.stdout, out.stdout
    sigma = pdgc.privacy.noise_multiplier(2.0, 0.01, 1000, 1e-5, accountant="rdp")
    spent = pdgc.privacy.epsilon(sigma, 0.01, 1000, 1e-5, accountant="rdp")
    assert 2.0 - pdgc.privacy.EPSILON_TOLERANCE <= spent <= 2.0
    tight = pdgc.privacy.noise_multiplier(2.0, 0.01, 1000, 1e-5, accountant="rdp", tolerance=1e-6)
    assert abs(pdgc.privacy.epsilon(tight, 0.01, 1000, 1e-5, accountant="rdp") - 2.0) <= 1e-6
    assert pdgc.privacy.epsilon(0.0, 0.01, 10, 1e-5, accountant="rdp") == float("inf")


def test_privacy_pld_is_the_default_and_matches_the_cli():
    # dp_accounting 0.6's PLD on (σ, q, T) = (1.1, 256/60000, 14062) at δ = 1e-5: 2.3817.
    eps = pdgc.privacy.epsilon(1.1, 256 / 60000, 14062, 1e-5)
    assert eps == pytest.approx(2.3817, abs=2e-3)
    assert eps == pdgc.privacy.epsilon(1.1, 256 / 60000, 14062, 1e-5, accountant="pld")
    assert eps < pdgc.privacy.epsilon(1.1, 256 / 60000, 14062, 1e-5, accountant="rdp")
    out = run_cli("privacy", "--noise", "1.1", "--sample-rate", str(256 / 60000), "--steps", "14062")
    assert out.returncode == 0, out.stderr
    assert f"{eps:.4f}" in out.stdout, out.stdout
    sigma = pdgc.privacy.noise_multiplier(2.0, 0.01, 1000, 1e-5)
    assert pdgc.privacy.epsilon(sigma, 0.01, 1000, 1e-5) <= 2.0
    assert pdgc.privacy.epsilon(sigma - 0.002, 0.01, 1000, 1e-5) > 2.0
    eps_pld, order = pdgc.privacy.epsilon_and_order(1.0, 0.01, 1000, 1e-5)
    assert order != order  # NaN: PLD has no RDP order


def test_privacy_errors():
    with pytest.raises(pdgc.PrivacyError, match="δ|delta"):
        pdgc.privacy.epsilon(1.0, 0.01, 100, 0.0)
    with pytest.raises(pdgc.PrivacyError):
        pdgc.privacy.epsilon(1.0, 1.5, 100, 1e-5)
    with pytest.raises(pdgc.PrivacyError):
        pdgc.privacy.epsilon(0.0, 0.01, 100, 1e-5)
    with pytest.raises(pdgc.PrivacyError, match="target ε"):
        pdgc.privacy.noise_multiplier(-1.0, 0.01, 100, 1e-5, accountant="rdp")
    with pytest.raises(pdgc.SettingError, match="accountant 'prv'"):
        pdgc.privacy.epsilon(1.0, 0.01, 100, 1e-5, accountant="prv")
    assert pdgc.privacy.ACCOUNTANTS == ("pld", "rdp")


def test_the_timed_clipped_sum_is_the_clipped_sum(tiny):
    s = tiny.session()
    params, batch = tiny.init_params(2), random_batch(3, classes=3, shape=(1, 6, 6))
    timed, seconds = s._timed_clipped_grad_sum(params, batch, 0.5)
    plain = s.clipped_grad_sum(params, batch, 0.5)
    assert 0.0 < seconds < 60.0
    np.testing.assert_array_equal(timed.norms, plain.norms)
    for k in plain.sum:
        np.testing.assert_array_equal(timed.sum[k], plain.sum[k])


def test_the_worked_example_trains_and_prints_epsilon_per_epoch(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200)
    x = rng.standard_normal((200, 3, 32, 32), dtype=np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=y)  # the user's own arrays
    script = ROOT / "python" / "examples" / "dp_sgd_loop.py"
    out = subprocess.run(
        [sys.executable, str(script), "--data", str(tmp_path / "data.npz"), "--epochs", "2", "--sample-rate", "0.25",
         "--max-batch", "32", "--epsilon", "4", "--threads", "2"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    eps = [float(line.split("ε = ")[1].split()[0]) for line in out.stdout.splitlines() if line.startswith("epoch")]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 4.0, out.stdout
    assert "180 examples" in out.stdout, out.stdout  # 10% held out for the test accuracy


def test_the_worked_example_trains_a_model_imported_from_onnx(tmp_path):
    # The README's path: a PyTorch model exported to ONNX (tests/data/onnx, written by
    # tests/data/make_onnx.py), `pdgc import`, then the Python DP-SGD loop on the user's arrays.
    out = run_cli("import", str(ROOT / "tests" / "data" / "onnx" / "mnist_cnn.onnx"), "-o", str(tmp_path / "m.pdg"))
    assert out.returncode == 0, out.stderr
    weights = tmp_path / "m.safetensors"
    assert weights.exists(), out.stdout + out.stderr
    script = ROOT / "python" / "examples" / "dp_sgd_loop.py"
    out = subprocess.run(
        [sys.executable, str(script), "--model", str(tmp_path / "m.pdg"), "--weights", str(weights),
         "--examples", "300", "--epochs", "2", "--sample-rate", "0.25", "--max-batch", "32", "--epsilon", "4",
         "--threads", "2"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    eps = [float(line.split("ε = ")[1].split()[0]) for line in out.stdout.splitlines() if line.startswith("epoch")]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 4.0, out.stdout
