//! The ONNX protobuf messages (`proto/onnx.proto`, compiled by build.rs with prost-build and
//! protox into OUT_DIR), and the few readers the importer needs on top of them: attributes by
//! name, initializer data as f32 or i64, value-info shapes.

use std::collections::HashMap;
use std::path::Path;

#[allow(clippy::all, missing_docs)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use onnx::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};

/// `TensorProto.DataType` values the importer reads.
pub const FLOAT: i32 = 1;
pub const INT32: i32 = 6;
pub const INT64: i32 = 7;
pub const DOUBLE: i32 = 11;

/// A constant tensor's values.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    /// Stored outside the .onnx file (external data) in a file that is not there: the shape
    /// is known, the values are not.
    Absent,
}

/// An initializer or a `Constant` node's value.
#[derive(Debug, Clone, PartialEq)]
pub struct Const {
    /// The ONNX name (a PyTorch `state_dict` name for parameters).
    pub name: String,
    pub dims: Vec<usize>,
    pub data: Data,
}

impl Const {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// The values as f32 (`None` when absent or not a float tensor).
    pub fn f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The values as i64 (`None` when absent or not an integer tensor).
    pub fn i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Whether every value equals `x` (false when the values are absent).
    pub fn all_equal(&self, x: f32) -> bool {
        self.f32().is_some_and(|v| v.iter().all(|&y| y == x))
    }
}

/// Reads a `TensorProto` into a [`Const`]. `dir` is where external data files are looked up.
pub fn read_tensor(t: &TensorProto, dir: Option<&Path>) -> Result<Const, String> {
    let name = t.name().to_string();
    let dims = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("tensor `{name}` has a negative dimension {d}")))
        .collect::<Result<Vec<usize>, String>>()?;
    let n: usize = dims.iter().product();
    let external = t.data_location == Some(onnx::tensor_proto::DataLocation::External as i32);
    let raw: Option<Vec<u8>> = if external {
        match read_external(t, dir)? {
            Some(bytes) => Some(bytes),
            None => return Ok(Const { name, dims, data: Data::Absent }),
        }
    } else {
        t.raw_data.clone()
    };
    let dtype = t.data_type();
    let data = match (dtype, raw) {
        (FLOAT, Some(raw)) => {
            Data::F32(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        }
        (FLOAT, None) => Data::F32(t.float_data.clone()),
        (DOUBLE, Some(raw)) => {
            Data::F32(raw.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32).collect())
        }
        (DOUBLE, None) => Data::F32(t.double_data.iter().map(|&x| x as f32).collect()),
        (INT64, Some(raw)) => {
            Data::I64(raw.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect())
        }
        (INT64, None) => Data::I64(t.int64_data.clone()),
        (INT32, Some(raw)) => {
            Data::I64(raw.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect())
        }
        (INT32, None) => Data::I64(t.int32_data.iter().map(|&x| x as i64).collect()),
        (other, _) => {
            return Err(format!("tensor `{name}` has ONNX data type {other}, not float32, float64 or an integer"))
        }
    };
    let len = match &data {
        Data::F32(v) => v.len(),
        Data::I64(v) => v.len(),
        Data::Absent => n,
    };
    if len != n {
        return Err(format!("tensor `{name}` of shape {dims:?} holds {len} values, expected {n}"));
    }
    Ok(Const { name, dims, data })
}

/// The bytes of an external-data tensor, or `None` when its file does not exist.
fn read_external(t: &TensorProto, dir: Option<&Path>) -> Result<Option<Vec<u8>>, String> {
    let name = t.name();
    let entries: HashMap<&str, &str> = t.external_data.iter().map(|e| (e.key(), e.value())).collect();
    let location = entries.get("location").ok_or_else(|| format!("external tensor `{name}` has no location"))?;
    let number = |key: &str| -> Result<Option<usize>, String> {
        entries
            .get(key)
            .map(|v| v.parse::<usize>().map_err(|_| format!("external tensor `{name}`: {key} `{v}` is not a number")))
            .transpose()
    };
    let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
    let Some(dir) = dir else { return Ok(None) };
    let path = dir.join(location);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let end = match length {
        Some(l) => offset.checked_add(l),
        None => Some(bytes.len()),
    };
    match end {
        Some(end) if end <= bytes.len() && offset <= end => Ok(Some(bytes[offset..end].to_vec())),
        _ => Err(format!("{}: too short for tensor `{name}` (damaged or truncated)", path.display())),
    }
}

/// A node's attribute by name.
pub fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name() == name)
}

pub fn attr_int(node: &NodeProto, name: &str) -> Option<i64> {
    attr(node, name).map(|a| a.i())
}

pub fn attr_float(node: &NodeProto, name: &str) -> Option<f32> {
    attr(node, name).map(|a| a.f())
}

pub fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

pub fn attr_string(node: &NodeProto, name: &str) -> Option<String> {
    attr(node, name).map(|a| String::from_utf8_lossy(a.s()).into_owned())
}

/// One dimension of a value's declared shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Dim {
    Fixed(i64),
    /// A named or unnamed dynamic dimension.
    Dynamic(String),
}

/// The element type and declared shape of a graph input or output (`None` if not a tensor).
pub fn value_shape(v: &ValueInfoProto) -> Option<(i32, Vec<Dim>)> {
    use onnx::tensor_shape_proto::dimension::Value;
    use onnx::type_proto::Value as Ty;
    let Some(Ty::TensorType(t)) = v.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    let dims = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(Value::DimValue(v)) => Dim::Fixed(*v),
                    Some(Value::DimParam(p)) => Dim::Dynamic(p.clone()),
                    None => Dim::Dynamic("?".into()),
                })
                .collect()
        })
        .unwrap_or_default();
    Some((t.elem_type(), dims))
}
