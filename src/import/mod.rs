//! `pdgc import`: an ONNX model (as `torch.onnx.export` writes it) to a `.pdg` source and its
//! weights.
//!
//! The file is decoded with prost from the official `onnx.proto` ([`proto`]); the graph's
//! nodes become `.pdg` statements ([`convert`]), one per node, with layer names taken from
//! the PyTorch module paths ([`names`]: `features.0` → `features_0`, reversibly); the
//! parameters keep their PyTorch names and layouts. The result is checked by the front end
//! before it is returned, so an import that succeeds always yields a model that checks.
//!
//! Errors are [`ImportError`]s, one kind per problem: a damaged file, an opset outside the
//! supported range, an op pdgc has no layer for, a dynamic dimension other than the batch.

mod convert;
pub mod names;
pub mod proto;

use std::collections::HashMap;
use std::path::Path;

use prost::Message;

use crate::graph::Graph;
use crate::tensor::{Tensor, TensorMap};
use convert::Converter;
use proto::{value_shape, Dim, FLOAT};

/// The oldest ONNX opset pdgc imports: opset 13 is where `Reshape`, `Squeeze` and the other
/// ops PyTorch exports reached the definitions the importer reads.
pub const MIN_OPSET: i64 = 13;
/// The newest ONNX opset pdgc imports: the newest whose definitions of the imported ops were
/// checked against the importer (PyTorch 2.x exports opsets 17 to 20).
pub const MAX_OPSET: i64 = 23;

/// Why an ONNX file could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: not a readable ONNX model (damaged or truncated file): {message}")]
    Damaged { path: String, message: String },
    #[error(
        "{path}: ONNX opset {found} is {age}: pdgc imports opsets {MIN_OPSET} to {MAX_OPSET}\n  help: export with \
         opset_version between {MIN_OPSET} and {MAX_OPSET} (torch.onnx.export(..., opset_version=20))"
    )]
    Opset { path: String, found: i64, age: &'static str },
    #[error("{path}: node `{node}` has op type `{op_type}`, which pdgc cannot import\n  help: {help}")]
    UnsupportedOp { path: String, node: String, op_type: String, help: String },
    #[error("{path}: node `{node}` ({op_type}) cannot be imported: {message}\n  help: {help}")]
    Unsupported { path: String, node: String, op_type: String, message: String, help: String },
    #[error(
        "{path}: input `{input}` has a dynamic dimension `{dim}` at axis {axis}: only the batch (axis 0) may be \
         dynamic\n  help: export with a fixed size for that axis (dynamic_shapes / dynamic_axes only on the batch dim)"
    )]
    DynamicShape { path: String, input: String, dim: String, axis: usize },
    #[error("{path}: {message}")]
    Model { path: String, message: String },
    #[error("{path}: the imported model does not check (a bug in pdgc import, please report it):\n{diagnostics}")]
    Check { path: String, diagnostics: String },
}

/// The loss `pdgc import` appends to the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportLoss {
    /// `label y: classes(K); loss cross_entropy(OUTPUT, y);`: the output must be `[K]` logits.
    CrossEntropy,
    /// `label y: [shape of the output]; loss mse(OUTPUT, y);`.
    Mse,
}

/// What to import and how.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The `.pdg` model's name.
    pub name: String,
    pub loss: ImportLoss,
}

/// An imported model.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The `.pdg` source.
    pub source: String,
    /// The checked graph of `source`.
    pub graph: Graph,
    /// The parameters by PyTorch `state_dict` name (`features.0.weight`), or `None` when the
    /// file's weights are stored outside it (external data) and that file is absent.
    pub weights: Option<TensorMap>,
    /// The ONNX opset of the file.
    pub opset: i64,
}

/// Reads and imports an ONNX file; external data is looked up beside it.
pub fn import_file(path: &Path, opts: &ImportOptions) -> crate::Result<Imported> {
    let bytes = std::fs::read(path).map_err(|source| crate::Error::Read { path: path.to_path_buf(), source })?;
    Ok(import_bytes(&path.display().to_string(), &bytes, path.parent(), opts)?)
}

/// Imports the bytes of an ONNX file. `label` names the file in errors; `dir` is where
/// external data files are looked up (`None`: the weights are absent if external).
pub fn import_bytes(
    label: &str,
    bytes: &[u8],
    dir: Option<&Path>,
    opts: &ImportOptions,
) -> Result<Imported, ImportError> {
    let damaged = |message: String| ImportError::Damaged { path: label.to_string(), message };
    let model = proto::ModelProto::decode(bytes).map_err(|e| damaged(e.to_string()))?;
    let Some(graph) = model.graph.as_ref() else {
        return Err(damaged("the file holds no graph".into()));
    };
    if model.ir_version.is_none() || graph.node.is_empty() {
        return Err(damaged("the file holds no ONNX model (no IR version or no nodes)".into()));
    }
    let opset = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain(), "" | "ai.onnx"))
        .map(|o| o.version())
        .ok_or_else(|| damaged("the file declares no version of the standard ONNX opset".into()))?;
    if !(MIN_OPSET..=MAX_OPSET).contains(&opset) {
        let age = if opset < MIN_OPSET { "too old" } else { "too new" };
        return Err(ImportError::Opset { path: label.to_string(), found: opset, age });
    }

    let mut consts = HashMap::new();
    for t in &graph.initializer {
        let c = proto::read_tensor(t, dir).map_err(damaged)?;
        consts.insert(c.name.clone(), c);
    }
    let mut conv = Converter::new(label, &graph.node, opset, consts);
    let mut header = Vec::new();
    for input in graph.input.iter().filter(|i| !conv.consts.contains_key(i.name())) {
        let (var, shape) = input_shape(label, input)?;
        header.push(format!("input {var}: [{}];", join(&shape)));
        conv.reserved.insert(var.clone());
        conv.acts.insert(input.name().to_string(), convert::Act { var, view: shape.clone(), shape });
    }
    if header.is_empty() {
        return Err(ImportError::Model { path: label.into(), message: "the graph has no input".into() });
    }
    conv.run()?;

    let [output] = graph.output.as_slice() else {
        return Err(ImportError::Model {
            path: label.into(),
            message: format!("the graph has {} outputs; pdgc imports a network with one output", graph.output.len()),
        });
    };
    let out = conv.acts.get(output.name()).cloned().ok_or_else(|| ImportError::Model {
        path: label.into(),
        message: format!("the output `{}` is not computed from the input", output.name()),
    })?;
    let label_name = ["y", "target", "label_"].into_iter().find(|n| !conv.reserved.contains(*n)).expect("one is free");
    let (label_line, loss_line) = match opts.loss {
        ImportLoss::CrossEntropy => {
            let [classes] = out.shape.as_slice() else {
                return Err(ImportError::Model {
                    path: label.into(),
                    message: format!(
                        "the output has shape {:?} per example; cross_entropy needs [classes] logits (pass --loss mse for a regression output)",
                        out.shape
                    ),
                });
            };
            (
                format!("label {label_name}: classes({classes});"),
                format!("loss cross_entropy({}, {label_name});", out.var),
            )
        }
        ImportLoss::Mse => {
            (format!("label {label_name}: [{}];", join(&out.shape)), format!("loss mse({}, {label_name});", out.var))
        }
    };

    let mut src = String::new();
    src += &format!("// Imported by `pdgc import` from {label} (ONNX opset {opset}");
    if !model.producer_name().is_empty() {
        src += &format!(", written by {} {}", model.producer_name(), model.producer_version());
    }
    src += ").\n// Layer names are PyTorch module paths with `_` -> `__` and `.` -> `_` (features.0 -> features_0);\n";
    src += "// the weights keep their PyTorch names (features.0.weight).\n";
    src += &format!("model {} {{\n", opts.name);
    for line in header.iter().chain([&label_line]) {
        src += &format!("    {line}\n");
    }
    src += "\n";
    for line in conv.lines.iter().chain([&loss_line]) {
        src += &format!("    {line}\n");
    }
    src += "}\n";

    let front = crate::compile_front(&src);
    let Some(checked) = front.graph else {
        let diagnostics = front.diagnostics.iter().map(|d| format!("  {}: {}", d.code, d.message)).collect::<Vec<_>>();
        return Err(ImportError::Check {
            path: label.into(),
            diagnostics: format!("{}\n{src}", diagnostics.join("\n")),
        });
    };
    // The parameters the checker derived must be exactly the ones converted, shape for shape.
    let found: Vec<(&str, &[usize])> = conv.params.iter().map(|p| (p.pdg_name.as_str(), p.shape.as_slice())).collect();
    let want: Vec<(&str, &[usize])> = checked.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
    if found != want {
        return Err(ImportError::Check {
            path: label.into(),
            diagnostics: format!("  parameters {found:?} differ from the model's {want:?}\n{src}"),
        });
    }
    let weights = conv
        .params
        .iter()
        .map(|p| p.data.clone().map(|d| (p.torch_name.clone(), Tensor::new(p.shape.clone(), d))))
        .collect::<Option<TensorMap>>();
    Ok(Imported { source: src, graph: checked, weights, opset })
}

fn join(v: &[usize]) -> String {
    v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}

/// A graph input's `.pdg` name and per-example shape: float32, a batch dim first (fixed or
/// dynamic), every other dim fixed.
fn input_shape(label: &str, input: &proto::ValueInfoProto) -> Result<(String, Vec<usize>), ImportError> {
    let name = input.name();
    let model_err = |message: String| ImportError::Model { path: label.into(), message };
    let Some((elem, dims)) = value_shape(input) else {
        return Err(model_err(format!("input `{name}` is not a tensor")));
    };
    if elem != FLOAT {
        return Err(model_err(format!("input `{name}` has ONNX element type {elem}; pdgc's inputs are float32")));
    }
    if dims.len() < 2 {
        return Err(model_err(format!(
            "input `{name}` has rank {}; expected a batch dim and at least one more",
            dims.len()
        )));
    }
    let mut shape = Vec::new();
    for (axis, d) in dims.iter().enumerate().skip(1) {
        match d {
            Dim::Fixed(v) if *v >= 1 => shape.push(*v as usize),
            Dim::Fixed(v) => return Err(model_err(format!("input `{name}` has dimension {v} at axis {axis}"))),
            Dim::Dynamic(p) => {
                return Err(ImportError::DynamicShape { path: label.into(), input: name.into(), dim: p.clone(), axis })
            }
        }
    }
    let var = names::encode(name).unwrap_or_else(|_| {
        let s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        format!("input_{}", s.trim_matches('_'))
    });
    Ok((var, shape))
}
