//! The Graph IR: the checked network. Every tensor's per-example shape is known, every
//! layer's arguments are resolved (defaults filled in), every parameter has its PyTorch
//! name and layout.
//!
//! Invariants (established by `check`, relied on by every later stage):
//! - `nodes` is in topological order: a node's inputs have smaller ids.
//! - `nodes[i].id == NodeId(i)`.
//! - Shapes exclude the batch dim and every dim is ≥ 1.
//! - A node has a `layer` name iff its op has parameters; layer names are unique.
//! - `params` lists every parameter once, in node order, weight before bias.
//! - The loss reads a node and the label; its shapes agree with the label.

use std::fmt;

use serde::Serialize;

use crate::diag::Span;
use crate::index_layer::IndexLayer;
use crate::ops::Strategy;

/// Index of a node in [`Graph::nodes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub struct NodeId(pub u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// A per-example shape (no batch dim).
pub type Shape = Vec<usize>;

/// Elements of a shape; saturates at `u64::MAX` (only the size checks of `check` ever see
/// a shape that large, and they reject it).
pub fn numel(shape: &[usize]) -> u64 {
    shape.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64))
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub label: LabelSpec,
    pub loss: Loss,
    pub params: Vec<ParamSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub id: NodeId,
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub shape: Shape,
    /// The user's layer name (`conv1`), present iff the op has parameters.
    pub layer: Option<String>,
    /// A user override from `@strategy(...)`.
    pub strategy: Option<Strategy>,
    /// Forward FLOPs per example (a multiply-add counts 2).
    pub flops: u64,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Op {
    Input {
        name: String,
    },
    Conv(Conv),
    Linear(Linear),
    Activation(Activation),
    Pool(Pool),
    GlobalAvgPool,
    Flatten,
    GroupNorm(Norm),
    InstanceNorm(Norm),
    /// Normalizes over the last `norm.groups` dims (the field is reused as a dim count).
    LayerNorm(Norm),
    Add,
    /// A layer written in index notation in the source.
    Index(Box<IndexLayer>),
}

/// conv1d (`spatial == 1`) or conv2d (`spatial == 2`). All vectors have `spatial` entries;
/// `pad_lo[a]` zeros pad the input before axis `a`, `pad_hi[a]` after it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conv {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: Vec<usize>,
    pub stride: Vec<usize>,
    pub pad_lo: Vec<usize>,
    pub pad_hi: Vec<usize>,
    pub dilation: Vec<usize>,
    pub groups: usize,
    pub bias: bool,
}

impl Conv {
    pub fn spatial(&self) -> usize {
        self.kernel.len()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Activation {
    Relu,
    LeakyRelu { slope: f64 },
    Tanh,
    Sigmoid,
    Gelu,
    Hardswish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PoolKind {
    Max,
    Avg,
}

/// A max or average pool; padding as in [`Conv`] (`-inf` for max, counted zeros for average).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pool {
    pub kind: PoolKind,
    pub kernel: Vec<usize>,
    pub stride: Vec<usize>,
    pub pad_lo: Vec<usize>,
    pub pad_hi: Vec<usize>,
}

/// group_norm (`groups` groups over channels), instance_norm (`groups == channels`) and
/// layer_norm (`groups` = number of trailing dims normalized).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Norm {
    pub groups: usize,
    pub eps: f64,
    pub affine: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum LabelSpec {
    Classes { name: String, classes: usize },
    Target { name: String, shape: Shape },
}

impl LabelSpec {
    pub fn name(&self) -> &str {
        match self {
            LabelSpec::Classes { name, .. } | LabelSpec::Target { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Loss {
    /// Softmax cross-entropy of `logits` (shape `[classes]`) against the class label.
    CrossEntropy { logits: NodeId },
    /// Mean squared error of `pred` against the target label, mean over the example's elements.
    Mse { pred: NodeId },
}

impl Loss {
    pub fn input(&self) -> NodeId {
        match self {
            Loss::CrossEntropy { logits: n } | Loss::Mse { pred: n } => *n,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamSpec {
    /// `NAME.weight` or `NAME.bias`.
    pub name: String,
    pub shape: Shape,
    pub node: NodeId,
}

impl Graph {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    pub fn param_count(&self) -> u64 {
        self.params.iter().map(|p| numel(&p.shape)).sum()
    }

    pub fn flops(&self) -> u64 {
        self.nodes.iter().map(|n| n.flops).sum()
    }

    /// The parameters of one node (weight first).
    pub fn params_of(&self, id: NodeId) -> impl Iterator<Item = &ParamSpec> {
        self.params.iter().filter(move |p| p.node == id)
    }

    pub fn inputs(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| matches!(n.op, Op::Input { .. }))
    }
}

impl Op {
    /// The op's name as written in `.pdg` source.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Conv(c) if c.spatial() == 1 => "conv1d",
            Op::Conv(_) => "conv2d",
            Op::Linear(_) => "linear",
            Op::Activation(a) => a.name(),
            Op::Pool(p) => match (p.kind, p.kernel.len()) {
                (PoolKind::Max, 1) => "maxpool1d",
                (PoolKind::Max, _) => "maxpool2d",
                (PoolKind::Avg, 1) => "avgpool1d",
                (PoolKind::Avg, _) => "avgpool2d",
            },
            Op::GlobalAvgPool => "global_avg_pool",
            Op::Flatten => "flatten",
            Op::GroupNorm(_) => "group_norm",
            Op::InstanceNorm(_) => "instance_norm",
            Op::LayerNorm(_) => "layer_norm",
            Op::Add => "add",
            Op::Index(l) => crate::grad::intern(&l.def),
        }
    }
}

fn dims(v: &[usize]) -> String {
    v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}

/// Padding as `1x1` when every axis is symmetric, else `(lo,hi)` per axis: `(0,1)x(1,1)`.
fn pads(lo: &[usize], hi: &[usize]) -> String {
    if lo == hi {
        return dims(lo);
    }
    lo.iter().zip(hi).map(|(l, h)| format!("({l},{h})")).collect::<Vec<_>>().join("x")
}

fn shape(v: &[usize]) -> String {
    format!("[{}]", v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        match self {
            Op::Input { name } => write!(f, " {name}"),
            Op::Conv(c) => write!(
                f,
                " in={} out={} kernel={} stride={} padding={} dilation={} groups={} bias={}",
                c.in_channels,
                c.out_channels,
                dims(&c.kernel),
                dims(&c.stride),
                pads(&c.pad_lo, &c.pad_hi),
                dims(&c.dilation),
                c.groups,
                c.bias
            ),
            Op::Linear(l) => write!(f, " in={} out={} bias={}", l.in_features, l.out_features, l.bias),
            Op::Activation(Activation::LeakyRelu { slope }) => write!(f, " slope={slope:?}"),
            Op::Pool(p) => {
                write!(
                    f,
                    " kernel={} stride={} padding={}",
                    dims(&p.kernel),
                    dims(&p.stride),
                    pads(&p.pad_lo, &p.pad_hi)
                )
            }
            Op::GroupNorm(n) => write!(f, " groups={} eps={:?} affine={}", n.groups, n.eps, n.affine),
            Op::InstanceNorm(n) => write!(f, " eps={:?} affine={}", n.eps, n.affine),
            Op::LayerNorm(n) => write!(f, " dims={} eps={:?} affine={}", n.groups, n.eps, n.affine),
            Op::Index(l) => {
                let params: Vec<String> = l.params().map(|p| format!("{}{}", p.name, shape(&p.shape))).collect();
                write!(f, " (index notation; params {})", params.join(" "))
            }
            Op::Activation(_) | Op::GlobalAvgPool | Op::Flatten | Op::Add => Ok(()),
        }
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "graph {}", self.name)?;
        for n in &self.nodes {
            write!(f, "  {} = ", n.id)?;
            if let Some(s) = n.strategy {
                write!(f, "@strategy({s}) ")?;
            }
            if let Some(layer) = &n.layer {
                write!(f, "{layer}: ")?;
            }
            write!(f, "{}", n.op)?;
            if !n.inputs.is_empty() {
                let ins: Vec<String> = n.inputs.iter().map(|i| i.to_string()).collect();
                write!(f, " ({})", ins.join(", "))?;
            }
            writeln!(f, " -> {}  flops={}", shape(&n.shape), n.flops)?;
        }
        match &self.label {
            LabelSpec::Classes { name, classes } => writeln!(f, "  label {name}: classes({classes})")?,
            LabelSpec::Target { name, shape: s } => writeln!(f, "  label {name}: {}", shape(s))?,
        }
        match &self.loss {
            Loss::CrossEntropy { logits } => writeln!(f, "  loss cross_entropy({logits}, {})", self.label.name())?,
            Loss::Mse { pred } => writeln!(f, "  loss mse({pred}, {})", self.label.name())?,
        }
        writeln!(f, "params")?;
        for p in &self.params {
            writeln!(f, "  {} {} ({})  of {}", p.name, shape(&p.shape), numel(&p.shape), p.node)?;
        }
        writeln!(f, "total params={} flops/example={}", self.param_count(), self.flops())
    }
}
