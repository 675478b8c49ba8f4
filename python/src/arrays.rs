//! Arrays in and out. In: a `dict[str, array]` whose values are NumPy arrays or anything
//! `numpy.asarray` turns into one without copying (the buffer protocol, `__array__`: PyTorch
//! CPU tensors), read as safetensors views of their bytes and checked by the library's own
//! validation ([`pdgc::Params::from_views`], [`pdgc::Batch::from_views`]), so names, shapes,
//! dtypes and non-finite values get the CLI's messages. Out: NumPy arrays that take over the
//! result's `Vec` (no copy beyond the one out of the session's buffers).

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{PyArray1, PyArrayDescrMethods, PyArrayDyn, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;
use safetensors::tensor::{Dtype, TensorView};

use crate::errors::{self, DtypeError, LayoutError};

/// Named arrays, each checked to be C-contiguous with a dtype that safetensors names.
pub struct Arrays<'py> {
    /// What messages call the arrays: `params` or `batch`.
    file: &'static str,
    items: Vec<(String, Bound<'py, PyUntypedArray>, Dtype)>,
}

fn asarray<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyUntypedArray>> {
    if let Ok(a) = obj.cast::<PyUntypedArray>() {
        return Ok(a.clone());
    }
    static ASARRAY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let py = obj.py();
    let f = ASARRAY.get_or_try_init(py, || py.import("numpy")?.getattr("asarray").map(Bound::unbind))?;
    let a = f.bind(py).call1((obj,))?;
    a.cast_into::<PyUntypedArray>().map_err(|e| PyTypeError::new_err(e.to_string()))
}

/// The safetensors dtype of a native-endian NumPy dtype, if it has one.
fn dtype_of(array: &Bound<'_, PyUntypedArray>) -> Option<Dtype> {
    let d = array.dtype();
    if d.is_native_byteorder() == Some(false) {
        return None;
    }
    Some(match (d.kind(), d.itemsize()) {
        (b'f', 4) => Dtype::F32,
        (b'f', 8) => Dtype::F64,
        (b'f', 2) => Dtype::F16,
        (b'i', 8) => Dtype::I64,
        (b'i', 4) => Dtype::I32,
        (b'i', 2) => Dtype::I16,
        (b'i', 1) => Dtype::I8,
        (b'u', 8) => Dtype::U64,
        (b'u', 4) => Dtype::U32,
        (b'u', 2) => Dtype::U16,
        (b'u', 1) => Dtype::U8,
        (b'b', 1) => Dtype::BOOL,
        _ => return None,
    })
}

impl<'py> Arrays<'py> {
    /// Reads `dict[str, array]`. `file` is what messages call it (`params` or `batch`).
    pub fn from_dict(file: &'static str, obj: &Bound<'py, PyAny>) -> PyResult<Arrays<'py>> {
        let dict = obj.cast::<PyDict>().map_err(|_| {
            let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
            PyTypeError::new_err(format!("{file}: expected a dict of arrays by name, got {ty}"))
        })?;
        let mut items = Vec::with_capacity(dict.len());
        for (key, value) in dict.iter() {
            let name: String = key
                .extract()
                .map_err(|_| PyTypeError::new_err(format!("{file}: tensor names must be strings, got {key}")))?;
            let array = asarray(&value)?;
            let Some(dtype) = dtype_of(&array) else {
                return Err(DtypeError::new_err(format!(
                    "{file}: tensor `{name}` has dtype {}, which pdgc does not read (values are float32, class labels int64 or int32)",
                    array.dtype()
                )));
            };
            if !array.is_c_contiguous() {
                return Err(LayoutError::new_err(format!(
                    "{file}: tensor `{name}` is not C-contiguous (numpy.ascontiguousarray makes a contiguous copy)"
                )));
            }
            items.push((name, array, dtype));
        }
        Ok(Arrays { file, items })
    }

    pub fn names(&self) -> Vec<&str> {
        self.items.iter().map(|(n, _, _)| n.as_str()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Bound<'py, PyUntypedArray>> {
        self.items.iter().find(|(n, _, _)| n == name).map(|(_, a, _)| a)
    }

    /// The array `name` as a safetensors view of its bytes.
    fn view(&self, name: &str) -> Option<TensorView<'_>> {
        let (_, array, dtype) = self.items.iter().find(|(n, _, _)| n == name)?;
        let len = array.len() * dtype.bitsize() / 8;
        let bytes: &[u8] = if len == 0 {
            &[]
        } else {
            // SAFETY: the array is C-contiguous (checked in `from_dict`), so its `len` bytes
            // start at its data pointer; `self` holds a reference to it for the borrow's
            // lifetime, and the GIL is held throughout (no Python code runs while the view
            // is read), so the memory stays valid.
            unsafe { std::slice::from_raw_parts((*array.as_array_ptr()).fields.data as *const u8, len) }
        };
        TensorView::new(*dtype, array.shape().to_vec(), bytes).ok()
    }

    /// The model's parameters, checked as `pdgc grads --params` checks a file.
    pub fn params(&self, graph: &pdgc::Graph) -> PyResult<pdgc::Params> {
        pdgc::Params::from_views(self.file, graph, &self.names(), |n| self.view(n)).map_err(errors::to_py)
    }

    /// A batch (the model's inputs and label by name), checked as `pdgc grads --batch` checks
    /// a file.
    pub fn batch(&self, graph: &pdgc::Graph) -> PyResult<pdgc::Batch> {
        pdgc::Batch::from_views(self.file, graph, |n| self.view(n)).map_err(errors::to_py)
    }
}

/// A tensor as a NumPy array that owns the tensor's data (no copy).
pub fn to_numpy<'py>(py: Python<'py>, t: pdgc::Tensor) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let a = ArrayD::from_shape_vec(IxDyn(&t.shape), t.data)
        .map_err(|e| errors::InternalError::new_err(format!("a result's shape does not fit its data: {e}")))?;
    Ok(PyArrayDyn::from_owned_array(py, a))
}

/// A vector as a 1-D NumPy array that owns it (no copy).
pub fn vec_to_numpy(py: Python<'_>, v: Vec<f32>) -> Bound<'_, PyArray1<f32>> {
    PyArray1::from_vec(py, v)
}

/// Named tensors as `dict[str, numpy.ndarray]`.
pub fn to_dict(py: Python<'_>, tensors: pdgc::TensorMap) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (name, t) in tensors {
        d.set_item(name, to_numpy(py, t)?)?;
    }
    Ok(d)
}
