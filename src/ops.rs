//! The op vocabulary: one table row per `.pdg` layer, giving its arguments (positional
//! order, types, defaults) and which per-example gradient strategies apply to it.
//!
//! The checker binds call arguments against this table; nothing else in the front end
//! spells out an op's argument list. Shape rules live in `check::shapes`, one `match` arm
//! per [`OpKind`].

use std::fmt;

use serde::Serialize;

use crate::graph::Activation;

/// What kind of value an argument takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgTy {
    Tensor,
    /// A positive (or, for padding, non-negative) integer.
    Int,
    /// An integer, or a tuple with one integer per spatial dim.
    Size,
    /// Padding: a size (the same before and after), or a tuple with one `(lo, hi)` pair
    /// per spatial dim (`lo` elements before the input, `hi` after).
    Padding,
    Float,
    Bool,
}

impl fmt::Display for ArgTy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArgTy::Tensor => "a tensor",
            ArgTy::Int => "an integer",
            ArgTy::Size => "an integer or a tuple of integers",
            ArgTy::Padding => "an integer, a tuple of integers or a tuple of (lo, hi) pairs",
            ArgTy::Float => "a number",
            ArgTy::Bool => "`true` or `false`",
        })
    }
}

/// An argument's default when it is not given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Default {
    Required,
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Defaults to the value of another argument (pool `stride` = `kernel`).
    SameAs(&'static str),
    /// Optional with no value (e.g. `in=`, which is only checked when given).
    Absent,
}

#[derive(Debug, Clone, Copy)]
pub struct ArgSig {
    pub name: &'static str,
    pub ty: ArgTy,
    pub default: Default,
    /// May only be given as `name=value`.
    pub keyword_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OpKind {
    Conv {
        spatial: usize,
    },
    Linear,
    /// A pointwise nonlinearity of the activation table (`crate::activation`); leaky_relu's
    /// slope here is a placeholder that the checker replaces with the argument.
    Activation(Activation),
    MaxPool {
        spatial: usize,
    },
    AvgPool {
        spatial: usize,
    },
    GlobalAvgPool,
    Flatten,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    Add,
    CrossEntropy,
    Mse,
}

impl OpKind {
    pub fn is_loss(self) -> bool {
        matches!(self, OpKind::CrossEntropy | OpKind::Mse)
    }

    /// The per-example gradient strategies that exist for this op's parameters
    /// (empty for ops without parameters).
    pub fn strategies(self) -> &'static [Strategy] {
        use Strategy::*;
        match self {
            OpKind::Conv { .. } => &[Naive, Crb, Unfold, Direct, Ghost],
            OpKind::Linear => &[Naive, Outer, Ghost],
            OpKind::GroupNorm | OpKind::InstanceNorm | OpKind::LayerNorm => &[Direct],
            _ => &[],
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct OpSig {
    pub name: &'static str,
    pub kind: OpKind,
    pub args: &'static [ArgSig],
}

const fn pos(name: &'static str, ty: ArgTy, default: Default) -> ArgSig {
    ArgSig { name, ty, default, keyword_only: false }
}

const fn kw(name: &'static str, ty: ArgTy, default: Default) -> ArgSig {
    ArgSig { name, ty, default, keyword_only: true }
}

const X: ArgSig = pos("input", ArgTy::Tensor, Default::Required);

const CONV: &[ArgSig] = &[
    X,
    pos("out", ArgTy::Int, Default::Required),
    pos("kernel", ArgTy::Size, Default::Required),
    pos("stride", ArgTy::Size, Default::Int(1)),
    pos("padding", ArgTy::Padding, Default::Int(0)),
    pos("dilation", ArgTy::Size, Default::Int(1)),
    pos("groups", ArgTy::Int, Default::Int(1)),
    pos("bias", ArgTy::Bool, Default::Bool(true)),
    kw("in", ArgTy::Int, Default::Absent),
];

const LINEAR: &[ArgSig] = &[
    X,
    pos("out", ArgTy::Int, Default::Required),
    pos("bias", ArgTy::Bool, Default::Bool(true)),
    kw("in", ArgTy::Int, Default::Absent),
];

const POOL: &[ArgSig] = &[
    X,
    pos("kernel", ArgTy::Size, Default::Required),
    pos("stride", ArgTy::Size, Default::SameAs("kernel")),
    pos("padding", ArgTy::Padding, Default::Int(0)),
];

const UNARY: &[ArgSig] = &[X];

const LEAKY: &[ArgSig] = &[X, pos("slope", ArgTy::Float, Default::Float(0.01))];

const GROUP_NORM: &[ArgSig] = &[
    X,
    pos("groups", ArgTy::Int, Default::Required),
    pos("eps", ArgTy::Float, Default::Float(1e-5)),
    pos("affine", ArgTy::Bool, Default::Bool(true)),
];

const INSTANCE_NORM: &[ArgSig] =
    &[X, pos("eps", ArgTy::Float, Default::Float(1e-5)), pos("affine", ArgTy::Bool, Default::Bool(false))];

const LAYER_NORM: &[ArgSig] = &[
    X,
    kw("dims", ArgTy::Int, Default::Absent),
    kw("eps", ArgTy::Float, Default::Float(1e-5)),
    kw("affine", ArgTy::Bool, Default::Bool(true)),
];

const BINARY: &[ArgSig] = &[pos("a", ArgTy::Tensor, Default::Required), pos("b", ArgTy::Tensor, Default::Required)];

const LOSS: &[ArgSig] =
    &[pos("input", ArgTy::Tensor, Default::Required), pos("label", ArgTy::Tensor, Default::Required)];

/// Every op of the language.
pub static OPS: &[OpSig] = &[
    OpSig { name: "conv1d", kind: OpKind::Conv { spatial: 1 }, args: CONV },
    OpSig { name: "conv2d", kind: OpKind::Conv { spatial: 2 }, args: CONV },
    OpSig { name: "linear", kind: OpKind::Linear, args: LINEAR },
    OpSig { name: "relu", kind: OpKind::Activation(Activation::Relu), args: UNARY },
    OpSig { name: "leaky_relu", kind: OpKind::Activation(Activation::LeakyRelu { slope: 0.01 }), args: LEAKY },
    OpSig { name: "tanh", kind: OpKind::Activation(Activation::Tanh), args: UNARY },
    OpSig { name: "sigmoid", kind: OpKind::Activation(Activation::Sigmoid), args: UNARY },
    OpSig { name: "gelu", kind: OpKind::Activation(Activation::Gelu), args: UNARY },
    OpSig { name: "hardswish", kind: OpKind::Activation(Activation::Hardswish), args: UNARY },
    OpSig { name: "maxpool1d", kind: OpKind::MaxPool { spatial: 1 }, args: POOL },
    OpSig { name: "maxpool2d", kind: OpKind::MaxPool { spatial: 2 }, args: POOL },
    OpSig { name: "avgpool1d", kind: OpKind::AvgPool { spatial: 1 }, args: POOL },
    OpSig { name: "avgpool2d", kind: OpKind::AvgPool { spatial: 2 }, args: POOL },
    OpSig { name: "global_avg_pool", kind: OpKind::GlobalAvgPool, args: UNARY },
    OpSig { name: "flatten", kind: OpKind::Flatten, args: UNARY },
    OpSig { name: "group_norm", kind: OpKind::GroupNorm, args: GROUP_NORM },
    OpSig { name: "instance_norm", kind: OpKind::InstanceNorm, args: INSTANCE_NORM },
    OpSig { name: "layer_norm", kind: OpKind::LayerNorm, args: LAYER_NORM },
    OpSig { name: "add", kind: OpKind::Add, args: BINARY },
    OpSig { name: "cross_entropy", kind: OpKind::CrossEntropy, args: LOSS },
    OpSig { name: "mse", kind: OpKind::Mse, args: LOSS },
];

/// Names that users coming from PyTorch may reach for, with the reason they are not ops.
pub static REJECTED: &[(&str, &str, &str)] = &[
    (
        "batch_norm",
        "batch_norm normalizes with the statistics of the whole batch, so each example's output depends on the other examples and no per-example gradient exists",
        "use `group_norm(x, groups)` (or `instance_norm`/`layer_norm`), which normalizes each example on its own",
    ),
    (
        "dropout",
        "dropout is not supported: pdgc computes exact, deterministic per-example gradients",
        "remove it; DP-SGD's clipping and noise already regularize",
    ),
];

pub fn lookup(name: &str) -> Option<&'static OpSig> {
    OPS.iter().find(|op| op.name == name)
}

/// The per-example gradient strategies of a layer written in index notation that has
/// parameters: a batch-1 backward per example; the derived per-example gradient equations
/// run over the batch, a window product through im2col columns and a contraction
/// (`unfold`) or each equation as one loop nest reading the window in place (`direct`); or
/// ghost norms from the Gram products of their factors (for norms and clipped sums, where
/// every parameter is read in one place; the planner offers it only there).
pub const INDEX_STRATEGIES: &[Strategy] = &[Strategy::Naive, Strategy::Unfold, Strategy::Direct, Strategy::Ghost];

/// [`INDEX_STRATEGIES`] of a layer that reads no window, where `unfold` and `direct` would
/// be the same kernels: `direct` stands for both.
pub const PLAIN_INDEX_STRATEGIES: &[Strategy] = &[Strategy::Naive, Strategy::Direct, Strategy::Ghost];

/// The per-example gradient strategies that apply to a node's op (empty for ops without
/// parameters).
pub fn strategies(op: &crate::graph::Op) -> &'static [Strategy] {
    match op {
        crate::graph::Op::Index(l) if l.params().next().is_some() && l.reads_windows() => INDEX_STRATEGIES,
        crate::graph::Op::Index(l) if l.params().next().is_some() => PLAIN_INDEX_STRATEGIES,
        crate::graph::Op::Index(_) => &[],
        other => lookup(other.name()).map_or(&[], |o| o.kind.strategies()),
    }
}

/// A way to compute a layer's per-example gradients (README, "`pdgc explain`").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// A batch-1 backward per example.
    Naive,
    /// The seed paper's grouped convolution (groups = B·G).
    Crb,
    /// im2col, then a batched GEMM.
    Unfold,
    /// A fused kernel without an im2col buffer.
    Direct,
    /// Linear: the outer product g_n a_nᵀ.
    Outer,
    /// Norms only, from Gram matrices (no per-example gradient materialized).
    Ghost,
}

impl Strategy {
    pub const ALL: [Strategy; 6] =
        [Strategy::Naive, Strategy::Crb, Strategy::Unfold, Strategy::Direct, Strategy::Outer, Strategy::Ghost];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::Crb => "crb",
            Strategy::Unfold => "unfold",
            Strategy::Direct => "direct",
            Strategy::Outer => "outer",
            Strategy::Ghost => "ghost",
        }
    }

    pub fn from_name(name: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
