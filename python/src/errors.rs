//! The exceptions the Python package raises, and the mapping from [`pdgc::Error`] to them.
//! Every message is the error's `Display` text, the same line the CLI prints.

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

create_exception!(pdgc, Error, PyValueError, "Base class of every error pdgc raises (a `ValueError`).");
create_exception!(pdgc, SourceError, Error, "A `.pdg` source with errors; the message holds the diagnostics.");
create_exception!(
    pdgc,
    FileError,
    Error,
    "A file that cannot be read or written, or is not what it should be (ONNX files included)."
);
create_exception!(pdgc, MissingTensorError, Error, "A parameter, model input or label is missing.");
create_exception!(pdgc, UnexpectedTensorError, Error, "A parameter that the model does not have.");
create_exception!(pdgc, ShapeError, Error, "An array of the wrong shape, or inputs that disagree on the batch size.");
create_exception!(pdgc, DtypeError, Error, "An array of the wrong dtype (float32 values, int64 or int32 classes).");
create_exception!(pdgc, LayoutError, Error, "An array that is not C-contiguous, or read-only where it is updated.");
create_exception!(pdgc, NonFiniteError, Error, "A NaN or infinity in the parameters or the batch.");
create_exception!(pdgc, LabelError, Error, "A class label outside `0..classes`.");
create_exception!(pdgc, BatchTooLargeError, Error, "A batch larger than the module was compiled for.");
create_exception!(pdgc, SettingError, Error, "An invalid setting: clip norm, optimizer, device, goal, noise...");
create_exception!(pdgc, PrivacyError, Error, "Invalid privacy-accounting arguments.");
create_exception!(
    pdgc,
    DeviceError,
    Error,
    "The device or kernel backend failed (e.g. `device=\"cuda\"` without a GPU)."
);
create_exception!(
    pdgc,
    OutOfMemoryError,
    Error,
    "Not enough memory for a run, even one example at a time, or for a whole result."
);
create_exception!(pdgc, InternalError, Error, "A bug in pdgc: please report it.");

/// The Python exception for a pdgc error, with the CLI's message.
pub fn to_py(e: pdgc::Error) -> PyErr {
    use pdgc::Error as E;
    let msg = e.to_string();
    match e {
        E::Source(_) => SourceError::new_err(msg),
        E::Read { .. }
        | E::Write { .. }
        | E::Safetensors { .. }
        | E::Module { .. }
        | E::Checkpoint { .. }
        | E::DiskFull { .. } => {
            FileError::new_err(msg)
        }
        E::MissingTensor { .. } => MissingTensorError::new_err(msg),
        E::UnexpectedTensor { .. } => UnexpectedTensorError::new_err(msg),
        E::Shape { .. } | E::BatchMismatch { .. } => ShapeError::new_err(msg),
        E::Dtype { .. } => DtypeError::new_err(msg),
        E::NonFinite { .. } => NonFiniteError::new_err(msg),
        E::LabelOutOfRange { .. } => LabelError::new_err(msg),
        E::BatchTooLarge { .. } => BatchTooLargeError::new_err(msg),
        // Too large for the kernels at the compiled batch size: the fix is a setting (the batch).
        E::EmptyBatch | E::BadClipNorm(_) | E::InvalidSetting { .. } | E::TooLarge { .. } => SettingError::new_err(msg),
        E::Privacy(_) => PrivacyError::new_err(msg),
        E::Device(_) | E::Backend(_) => DeviceError::new_err(msg),
        E::DataMissing { .. }
        | E::Gzip { .. }
        | E::IdxMagic { .. }
        | E::IdxDamaged { .. }
        | E::DatasetMismatch { .. }
        | E::DataModelMismatch { .. }
        | E::Import(_) => FileError::new_err(msg),
        E::OutOfMemory { .. } => OutOfMemoryError::new_err(msg),
        E::Internal(_) => InternalError::new_err(msg),
    }
}

/// Adds the exception classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add("SourceError", py.get_type::<SourceError>())?;
    m.add("FileError", py.get_type::<FileError>())?;
    m.add("MissingTensorError", py.get_type::<MissingTensorError>())?;
    m.add("UnexpectedTensorError", py.get_type::<UnexpectedTensorError>())?;
    m.add("ShapeError", py.get_type::<ShapeError>())?;
    m.add("DtypeError", py.get_type::<DtypeError>())?;
    m.add("LayoutError", py.get_type::<LayoutError>())?;
    m.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    m.add("LabelError", py.get_type::<LabelError>())?;
    m.add("BatchTooLargeError", py.get_type::<BatchTooLargeError>())?;
    m.add("SettingError", py.get_type::<SettingError>())?;
    m.add("PrivacyError", py.get_type::<PrivacyError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add("OutOfMemoryError", py.get_type::<OutOfMemoryError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    Ok(())
}
