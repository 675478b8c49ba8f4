"""Type stubs of `pdgc._pdgc`, the native module (see `pdgc` for the tour)."""

import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

#: An array argument: a NumPy array or anything `numpy.asarray` views without copying
#: (buffer protocol, `__array__`: PyTorch CPU tensors).
ArrayLike = Any
#: Named arrays: parameters by PyTorch `state_dict` name, or a batch (inputs and label).
Arrays = Mapping[str, ArrayLike]
F32Array = npt.NDArray[np.float32]

class Error(ValueError):
    """Base class of every error pdgc raises; the message is the CLI's."""

class SourceError(Error): ...
class FileError(Error): ...
class MissingTensorError(Error): ...
class UnexpectedTensorError(Error): ...
class ShapeError(Error): ...
class DtypeError(Error): ...
class LayoutError(Error): ...
class NonFiniteError(Error): ...
class LabelError(Error): ...
class BatchTooLargeError(Error): ...
class SettingError(Error): ...
class PrivacyError(Error): ...
class DeviceError(Error): ...
class InternalError(Error): ...
class OutOfMemoryError(Error): ...

def compile(
    path_or_source: Union[str, "os.PathLike[str]"],
    *,
    batch: Optional[int] = None,
    goal: str = "clipped_sum",
    device: str = "auto",
    profile: Optional[str] = None,
    memory_budget: Optional[int] = None,
    strategy: Optional[Mapping[str, str]] = None,
) -> Module:
    """Compiles a `.pdg` model (a path or the source text) or loads a `.pdgm` module.

    `batch` is the largest batch a session accepts (default 32); `goal` (`"clipped_sum"`,
    `"grads"`, `"norms"`) the plan `Module.plan()` shows; `device` (`"auto"`, `"cpu"`,
    `"cuda"`, `"interpreter"`, `"cuda-host"`) where sessions run by default; `profile`
    (`"cpu2"`, `"h100"`, `"h200"`) the device profile planned for; `strategy` per-layer
    overrides such as `{"conv1": "unfold"}`.
    """

class Module:
    """A compiled model. Make one with `pdgc.compile`; run it through `session()`."""

    @property
    def name(self) -> str: ...
    @property
    def max_batch(self) -> int: ...
    @property
    def goal(self) -> str: ...
    @property
    def params(self) -> Dict[str, Tuple[int, ...]]:
        """Parameter names (PyTorch `state_dict` names) and shapes."""
    @property
    def inputs(self) -> Dict[str, Tuple[int, ...]]:
        """Model input names and per-example shapes (a batch adds a leading B)."""
    @property
    def label(self) -> str:
        """The label's name in a batch."""
    def session(
        self, device: Optional[str] = None, *, threads: Optional[int] = None, seed: Optional[int] = None
    ) -> Session:
        """A session on `device` (default: the module's) with `threads` CPU workers; `seed`
        seeds its noise generator (default: operating-system entropy)."""
    def init_params(self, seed: int = 0) -> Dict[str, F32Array]:
        """PyTorch-default initial parameters from a seeded stream."""
    def plan(self, goal: Optional[str] = None) -> str:
        """The plan for `goal` (default: the module's), as `pdgc explain` prints it."""
    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Writes the module as a `.pdgm` file."""

class Generator:
    """A seeded ChaCha20 stream for DP-SGD noise (OS entropy when `seed` is None)."""

    def __init__(self, seed: Optional[int] = None) -> None: ...

class Optimizer:
    """An optimizer with PyTorch's semantics and its running state."""

    @staticmethod
    def sgd(lr: float, momentum: float = 0.0) -> Optimizer:
        """`torch.optim.SGD(lr=lr, momentum=momentum)`."""
    @staticmethod
    def adam(lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> Optimizer:
        """`torch.optim.Adam(lr=lr, betas=(beta1, beta2), eps=eps)`."""
    @property
    def steps(self) -> int: ...
    def state_dict(self) -> Dict[str, F32Array]:
        """The optimizer's buffers by name, copied."""

class ClippedSum:
    """`sum`: name → Σ_n min(1, C/(‖g_n‖+1e-6)) g_n; `norms` and `loss`: [B]."""

    @property
    def sum(self) -> Dict[str, F32Array]: ...
    @property
    def norms(self) -> F32Array: ...
    @property
    def loss(self) -> F32Array: ...

class StepReport:
    """What one DP-SGD step saw."""

    @property
    def batch_size(self) -> int: ...
    @property
    def losses(self) -> F32Array: ...
    @property
    def norms(self) -> F32Array: ...
    @property
    def clipped_fraction(self) -> float: ...

class Session:
    """A module on a device. `params` maps every parameter name to an array; `batch` maps
    each model input to float32 `[B, ...]` and the label to int64/int32 classes `[B]` (or a
    float32 target). An empty batch gives empty per-example results and zero sums."""

    @property
    def device(self) -> str: ...
    @property
    def fallback_reason(self) -> Optional[str]: ...
    @property
    def max_batch(self) -> int: ...
    @property
    def threads(self) -> int: ...
    @threads.setter
    def threads(self, value: int) -> None: ...
    @property
    def memory_budget(self) -> int:
        """Bytes the session's buffers may take; larger batches run as micro-batches."""
    @memory_budget.setter
    def memory_budget(self, value: int) -> None: ...
    def loss(self, params: Arrays, batch: Arrays) -> F32Array:
        """Per-example losses, [B]."""
    def forward(self, params: Arrays, batch: Arrays) -> F32Array:
        """The network's output, [B, ...]."""
    def per_example_grads(self, params: Arrays, batch: Arrays) -> Dict[str, F32Array]:
        """Each example's gradient: name → [B, *shape]."""
    def per_example_norms(self, params: Arrays, batch: Arrays) -> F32Array:
        """Each example's gradient norm over all parameters, [B]."""
    def clipped_grad_sum(self, params: Arrays, batch: Arrays, clip: float) -> ClippedSum:
        """Σ_n min(1, C/(‖g_n‖+1e-6)) g_n with the norms and losses it saw."""
    def batch_grad(self, params: Arrays, batch: Arrays) -> Dict[str, F32Array]:
        """The gradient of Σ_n loss_n: name → shape."""
    def _timed_clipped_grad_sum(self, params: Arrays, batch: Arrays, clip: float) -> Tuple[ClippedSum, float]:
        """`clipped_grad_sum` and the seconds of its Rust API call (for overhead timing)."""
    def dp_sgd_step(
        self,
        params: Arrays,
        batch: Arrays,
        *,
        clip: float,
        noise_multiplier: float,
        expected_batch: float,
        optimizer: Optimizer,
        generator: Optional[Generator] = None,
    ) -> StepReport:
        """One DP-SGD step; updates the parameter arrays in place."""

def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> Tuple[float, float]: ...
def _pld_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float: ...
def _pld_noise_multiplier(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float: ...
def _rdp_noise_multiplier(
    target_epsilon: float, sample_rate: float, steps: int, delta: float, tolerance: float
) -> float: ...
