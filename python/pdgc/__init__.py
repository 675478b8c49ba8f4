"""pdgc from Python: per-example gradients and DP-SGD steps of a compiled `.pdg` model.

A tour::

    import numpy as np
    import pdgc

    module = pdgc.compile("samples/mnist_cnn.pdg", batch=128)   # or the source text
    session = module.session(threads=2)
    params = module.init_params(seed=0)          # dict[str, np.ndarray], PyTorch names
    batch = {"x": np.zeros((128, 1, 28, 28), np.float32), "y": np.zeros(128, np.int64)}
    cs = session.clipped_grad_sum(params, batch, clip=1.0)   # cs.sum, cs.norms, cs.loss
    opt = pdgc.Optimizer.sgd(lr=0.1)
    session.dp_sgd_step(params, batch, clip=1.0, noise_multiplier=1.1,
                        expected_batch=128, optimizer=opt)   # updates `params` in place
    pdgc.privacy.epsilon(1.1, sample_rate=128 / 60000, steps=4690, delta=1e-5)

Arrays are anything `numpy.asarray` views without copying (NumPy arrays, the buffer
protocol, PyTorch CPU tensors through `__array__`): float32 and C-contiguous, class labels
int64 or int32. Results are NumPy arrays. Every error is a subclass of `pdgc.Error` (itself a
`ValueError`) whose message is the one the `pdgc` command line prints.
"""

from . import privacy
from ._pdgc import (
    BatchTooLargeError,
    ClippedSum,
    DeviceError,
    DtypeError,
    Error,
    FileError,
    Generator,
    InternalError,
    LabelError,
    LayoutError,
    MissingTensorError,
    Module,
    NonFiniteError,
    OutOfMemoryError,
    Optimizer,
    PrivacyError,
    Session,
    SettingError,
    ShapeError,
    SourceError,
    StepReport,
    UnexpectedTensorError,
    __version__,
    compile,
)

__all__ = [
    "BatchTooLargeError",
    "ClippedSum",
    "DeviceError",
    "DtypeError",
    "Error",
    "FileError",
    "Generator",
    "InternalError",
    "LabelError",
    "LayoutError",
    "MissingTensorError",
    "Module",
    "NonFiniteError",
    "OutOfMemoryError",
    "Optimizer",
    "PrivacyError",
    "Session",
    "SettingError",
    "ShapeError",
    "SourceError",
    "StepReport",
    "UnexpectedTensorError",
    "__version__",
    "compile",
    "privacy",
]
