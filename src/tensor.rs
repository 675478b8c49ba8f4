//! Tensors at the library boundary: parameters, batches and results, read from and
//! written to safetensors files (which torch, JAX and numpy all read and write).
//!
//! Everything that comes in is validated here — names, shapes, dtypes, finiteness, label
//! ranges — so the kernels only ever see well-formed buffers.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::graph::{numel, Graph, LabelSpec, Op};

/// Adds `part` into `acc` tensor by tensor (sums over micro-batches); every tensor of `acc`
/// must have its counterpart in `part`.
pub fn add_into(acc: &mut TensorMap, part: &TensorMap) -> Result<()> {
    for (name, t) in acc.iter_mut() {
        let p = part.get(name).ok_or_else(|| Error::Internal(format!("no partial sum for `{name}`")))?;
        for (a, &b) in t.data.iter_mut().zip(&p.data) {
            *a += b;
        }
    }
    Ok(())
}

/// A dense row-major f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(numel(&shape) as usize, data.len());
        Tensor { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Tensor {
        let n = numel(&shape) as usize;
        Tensor { shape, data: vec![0.0; n] }
    }
}

/// Named tensors (parameters, gradients, a batch's inputs).
pub type TensorMap = BTreeMap<String, Tensor>;

/// A model's parameters by PyTorch `state_dict` name.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub tensors: TensorMap,
}

/// Labels of a batch: class indices or real-valued targets.
#[derive(Debug, Clone, PartialEq)]
pub enum Labels {
    Classes(Vec<i64>),
    Target(Tensor),
}

/// One batch: the model's inputs by name (`[B, ...]`) and the labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub inputs: TensorMap,
    pub labels: Labels,
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors { path: path.to_path_buf(), message: e.to_string() })
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

/// Decodes a float tensor (f32; f64 and f16/bf16 are refused with a clear message).
fn floats(file: &str, name: &str, t: &TensorView<'_>) -> Result<Vec<f32>> {
    match t.dtype() {
        Dtype::F32 => Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        other => {
            Err(Error::Dtype { file: file.into(), name: name.into(), expected: "F32".into(), found: dtype_name(other) })
        }
    }
}

fn check_finite(file: &str, name: &str, data: &[f32]) -> Result<()> {
    match data.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NonFinite { file: file.into(), name: name.into(), index, value: data[index] }),
        None => Ok(()),
    }
}

fn shape_text(s: &[usize]) -> String {
    format!("{s:?}")
}

impl Params {
    /// PyTorch's default initialization: conv and linear weights and biases uniform in
    /// ±1/√fan_in (kaiming_uniform with a = √5), norm weights 1 and biases 0.
    pub fn init(graph: &Graph, seed: u64) -> Params {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut tensors = TensorMap::new();
        for p in &graph.params {
            let node = graph.node(p.node);
            let n = numel(&p.shape) as usize;
            let data = match &node.op {
                Op::Conv(_) | Op::Linear(_) => {
                    let weight = &graph.params_of(p.node).next().expect("a weight").shape;
                    let fan_in: usize = weight[1..].iter().product();
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                }
                // Layers written in index notation: uniform in ±1/√fan-in, the fan-in being
                // the elements of a parameter's trailing dims, or its length for a vector.
                Op::Index(_) => {
                    let fan_in: usize = if p.shape.len() > 1 { p.shape[1..].iter().product() } else { n };
                    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                }
                _ if p.name.ends_with(".weight") => vec![1.0; n],
                _ => vec![0.0; n],
            };
            tensors.insert(p.name.clone(), Tensor::new(p.shape.clone(), data));
        }
        Params { tensors }
    }

    /// Reads a safetensors file and checks it against the model: every parameter present
    /// with its shape, f32, finite. Extra tensors are an error too (a wrong file).
    pub fn load(path: &Path, graph: &Graph) -> Result<Params> {
        let bytes = read_file(path)?;
        let st = parse(path, &bytes)?;
        Params::from_views(&path.display().to_string(), graph, &st.names(), |name| st.tensor(name).ok())
    }

    /// Checks named tensors against the model as [`Params::load`] does, with the same
    /// errors: `names` are all the tensors there are, `get` finds one by name, and `file`
    /// names their source in messages. Array bindings (Python) use this with their arrays.
    pub fn from_views<'a>(
        file: &str,
        graph: &Graph,
        names: &[&str],
        get: impl Fn(&str) -> Option<TensorView<'a>>,
    ) -> Result<Params> {
        let file = file.to_string();
        let mut tensors = TensorMap::new();
        for p in &graph.params {
            // A parameter may also go by its PyTorch module path (`features.0.weight` for
            // `features_0.weight`), as `pdgc import` writes them.
            let torch_name = crate::import::names::pytorch_param_name(&p.name);
            let t = get(&p.name).or_else(|| get(&torch_name)).ok_or_else(|| Error::MissingTensor {
                file: file.clone(),
                name: p.name.clone(),
                hint: format!(" (the model `{}` has {} parameter tensors)", graph.name, graph.params.len()),
            })?;
            if t.shape() != p.shape.as_slice() {
                return Err(Error::Shape {
                    file,
                    name: p.name.clone(),
                    expected: shape_text(&p.shape),
                    found: t.shape().to_vec(),
                });
            }
            let data = floats(&file, &p.name, &t)?;
            check_finite(&file, &p.name, &data)?;
            tensors.insert(p.name.clone(), Tensor::new(p.shape.clone(), data));
        }
        let known = |n: &str| {
            graph.params.iter().any(|p| p.name == n || crate::import::names::pytorch_param_name(&p.name) == n)
        };
        if let Some(extra) = names.iter().find(|n| !known(n)) {
            return Err(Error::UnexpectedTensor { file, name: extra.to_string(), model: graph.name.clone() });
        }
        Ok(Params { tensors })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        save_tensors(path, &self.tensors, None)
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }
}

/// Writes named f32 tensors (and optional metadata) as safetensors.
pub fn save_tensors(path: &Path, tensors: &TensorMap, metadata: Option<BTreeMap<String, String>>) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(name, t)| (name.clone(), t.data.iter().flat_map(|x| x.to_le_bytes()).collect(), t.shape.clone()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(name, data, shape)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Internal(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta = metadata.map(|m| m.into_iter().collect());
    let out = safetensors::serialize(views, meta).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(path, out).map_err(|source| Error::Write { path: path.to_path_buf(), source })
}

impl Batch {
    /// Reads a batch file: every model input by name as f32 `[B, ...]`, the label by its
    /// name as int64/int32 class indices `[B]` or an f32 target `[B, ...]`.
    pub fn load(path: &Path, graph: &Graph) -> Result<Batch> {
        let bytes = read_file(path)?;
        let st = parse(path, &bytes)?;
        Batch::from_safetensors(&path.display().to_string(), &st, graph)
    }

    pub fn from_safetensors(file: &str, st: &SafeTensors<'_>, graph: &Graph) -> Result<Batch> {
        Batch::from_views(file, graph, |name| st.tensor(name).ok())
    }

    /// Reads a batch from named tensors as [`Batch::load`] does, with the same checks and
    /// errors: `get` finds a tensor by name (other tensors are ignored), `file` names their
    /// source in messages. Array bindings (Python) use this with their arrays.
    pub fn from_views<'a>(file: &str, graph: &Graph, get: impl Fn(&str) -> Option<TensorView<'a>>) -> Result<Batch> {
        let missing = |name: &str, what: &str| Error::MissingTensor {
            file: file.into(),
            name: name.into(),
            hint: format!(" (the model's {what})"),
        };
        let mut inputs = TensorMap::new();
        for node in graph.inputs() {
            let Op::Input { name } = &node.op else { continue };
            let t = get(name).ok_or_else(|| missing(name, "input"))?;
            if t.shape().len() != node.shape.len() + 1 || t.shape()[1..] != node.shape[..] {
                return Err(Error::Shape {
                    file: file.into(),
                    name: name.clone(),
                    expected: format!(
                        "[B, {}]",
                        node.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
                    ),
                    found: t.shape().to_vec(),
                });
            }
            let data = floats(file, name, &t)?;
            check_finite(file, name, &data)?;
            inputs.insert(name.clone(), Tensor::new(t.shape().to_vec(), data));
        }
        let label_name = graph.label.name();
        let t = get(label_name).ok_or_else(|| missing(label_name, "label"))?;
        let labels = match &graph.label {
            LabelSpec::Classes { classes, .. } => {
                if t.shape().len() != 1 {
                    return Err(Error::Shape {
                        file: file.into(),
                        name: label_name.into(),
                        expected: "[B]".into(),
                        found: t.shape().to_vec(),
                    });
                }
                let values: Vec<i64> = match t.dtype() {
                    Dtype::I64 => {
                        t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
                    }
                    Dtype::I32 => t
                        .data()
                        .chunks_exact(4)
                        .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
                        .collect(),
                    other => {
                        return Err(Error::Dtype {
                            file: file.into(),
                            name: label_name.into(),
                            expected: "I64 or I32 class indices".into(),
                            found: dtype_name(other),
                        })
                    }
                };
                if let Some((example, &value)) =
                    values.iter().enumerate().find(|(_, &v)| v < 0 || v as usize >= *classes)
                {
                    return Err(Error::LabelOutOfRange { file: file.into(), example, value, classes: *classes });
                }
                Labels::Classes(values)
            }
            LabelSpec::Target { shape, .. } => {
                if t.shape().len() != shape.len() + 1 || t.shape()[1..] != shape[..] {
                    return Err(Error::Shape {
                        file: file.into(),
                        name: label_name.into(),
                        expected: format!(
                            "[B, {}]",
                            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
                        ),
                        found: t.shape().to_vec(),
                    });
                }
                let data = floats(file, label_name, &t)?;
                check_finite(file, label_name, &data)?;
                Labels::Target(Tensor::new(t.shape().to_vec(), data))
            }
        };
        let batch = Batch { inputs, labels };
        batch.size()?;
        Ok(batch)
    }

    /// The number of examples; every input and the label must agree. It may be zero: an
    /// empty batch (Poisson sampling draws them) is valid and gives empty per-example
    /// results and zero sums.
    pub fn size(&self) -> Result<usize> {
        let label_n = match &self.labels {
            Labels::Classes(v) => v.len(),
            Labels::Target(t) => t.shape[0],
        };
        for (name, t) in &self.inputs {
            if t.shape[0] != label_n {
                return Err(Error::BatchMismatch { a: name.clone(), na: t.shape[0], b: "label".into(), nb: label_n });
            }
        }
        Ok(label_n)
    }

    /// The first `n` examples (or fewer): for slicing a dataset into batches.
    pub fn slice(&self, start: usize, end: usize) -> Batch {
        let cut = |t: &Tensor| {
            let per: usize = t.shape[1..].iter().product();
            let mut shape = t.shape.clone();
            shape[0] = end - start;
            Tensor::new(shape, t.data[start * per..end * per].to_vec())
        };
        Batch {
            inputs: self.inputs.iter().map(|(k, t)| (k.clone(), cut(t))).collect(),
            labels: match &self.labels {
                Labels::Classes(v) => Labels::Classes(v[start..end].to_vec()),
                Labels::Target(t) => Labels::Target(cut(t)),
            },
        }
    }

    /// A random batch for a model (standard-normal inputs, uniform labels): benchmarks,
    /// examples and tests.
    pub fn random(graph: &Graph, size: usize, seed: u64) -> Batch {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut normal = move || {
            // Box–Muller.
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random_range(0.0..1.0);
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        };
        let mut inputs = TensorMap::new();
        for node in graph.inputs() {
            let Op::Input { name } = &node.op else { continue };
            let mut shape = vec![size];
            shape.extend(&node.shape);
            let n = numel(&shape) as usize;
            inputs.insert(name.clone(), Tensor::new(shape, (0..n).map(|_| normal()).collect()));
        }
        let labels = match &graph.label {
            LabelSpec::Classes { classes, .. } => {
                Labels::Classes((0..size).map(|i| ((i * 7919 + seed as usize * 31) % classes) as i64).collect())
            }
            LabelSpec::Target { shape, .. } => {
                let mut s = vec![size];
                s.extend(shape);
                let n = numel(&s) as usize;
                Labels::Target(Tensor::new(s, (0..n).map(|_| normal()).collect()))
            }
        };
        Batch { inputs, labels }
    }
}
