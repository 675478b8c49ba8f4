//! Layers written in index notation in a `.pdg` file, as the checker instantiates them at a
//! call site: every size known, every index variable's range derived, every read proved in
//! bounds (or in the declared zero padding).
//!
//! ```text
//! layer depthwise3(x: [C, H, W] pad (0, 1, 1)) {
//!     param weight: [C, 3, 3];
//!     param bias: [C];
//!     y[c, h, w] = sum(i, j: weight[c, i, j] * x[c, h + i - 1, w + j - 1]) + bias[c];
//! }
//! ```
//!
//! A layer is a list of statements `t[vars] = term + term + ...`; a term is a pointwise
//! expression of reads (`body`), summed over its own index variables (`sum`) or not. Every
//! tensor a statement reads is an input of the layer, one of its parameters, or a tensor an
//! earlier statement defined (a temporary); the last statement defines the layer's output.
//! Reads carry no batch index: the layer is applied to each example on its own.
//!
//! Invariants (established by `check`, relied on by `differentiate`, `lower` and the
//! reference evaluator):
//! - `tensors` holds the inputs (in call order, `Input(slot)`), then the parameters, then one
//!   temporary per statement, in statement order; names are unique.
//! - A statement's left-hand side is a temporary indexed by distinct plain variables, its
//!   `vars`; its shape is their ranges. The last statement's temporary is the output.
//! - A statement's `ranges` holds every variable of the statement (left-hand side and sums)
//!   exactly once; no variable is named `n` (the batch index of the derived equations).
//! - A term's `body` contains only `Read`, `Num`, `Mul`, `Add`, `Sub`, `Div`, `Apply` (of
//!   `Exp`, `Log` or an activation) and `Select`; no reductions. Each read has one index per
//!   dim of its tensor, built from the left-hand side's variables and the term's `sum`.
//! - Every read, over every value of its variables, lies in `[-lo, dim + hi)` for the
//!   tensor's `padding[dim] = (lo, hi)`; outside `[0, dim)` it reads zero. Only inputs are
//!   padded. Parameters are read by plain variables only.

use serde::Serialize;

use crate::grad::{Expr, Var};
use crate::graph::Shape;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IndexLayer {
    /// The definition's name in the source (`depthwise3`).
    pub def: String,
    pub tensors: Vec<LocalTensor>,
    pub stmts: Vec<IndexStmt>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LocalKind {
    /// The layer's `slot`-th input (the node's `inputs[slot]`).
    Input(usize),
    /// A parameter; its full name is `LAYER.NAME`.
    Param,
    /// Defined by a statement.
    Temp,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalTensor {
    pub name: String,
    pub kind: LocalKind,
    pub shape: Shape,
    /// Zeros read before (`lo`) and after (`hi`) each dim; all zero except for padded inputs.
    pub padding: Vec<(usize, usize)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IndexStmt {
    /// The temporary this statement defines.
    pub lhs: String,
    /// Its index: distinct plain variables.
    pub vars: Vec<Var>,
    pub terms: Vec<IndexTerm>,
    /// Every variable of the statement with its range.
    pub ranges: Vec<(Var, usize)>,
}

/// `Σ_{sum} body` (or `body` when `sum` is empty).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IndexTerm {
    pub sum: Vec<Var>,
    pub body: Expr,
}

impl IndexLayer {
    pub fn tensor(&self, name: &str) -> Option<&LocalTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The statement defining the layer's output (the last one).
    pub fn output(&self) -> &IndexStmt {
        self.stmts.last().expect("a checked index layer has a statement")
    }

    pub fn params(&self) -> impl Iterator<Item = &LocalTensor> {
        self.tensors.iter().filter(|t| t.kind == LocalKind::Param)
    }

    pub fn inputs(&self) -> impl Iterator<Item = &LocalTensor> {
        self.tensors.iter().filter(|t| matches!(t.kind, LocalKind::Input(_)))
    }

    /// Whether a statement reads a tensor through an index that is not a plain variable (a
    /// window such as `x[c, 2*h + i - 1]`): only then can a derived gradient be a window
    /// product, which `unfold` and `direct` schedule differently.
    pub fn reads_windows(&self) -> bool {
        self.stmts
            .iter()
            .flat_map(|s| &s.terms)
            .any(|t| crate::grad::layer::reads(&t.body).iter().any(|a| !a.is_plain()))
    }

    /// Forward FLOPs per example: 2 per multiply-add of each term's loop nest, counting a
    /// term's operations as one multiply-add per point (the convention of the built-in ops).
    pub fn flops(&self) -> u64 {
        self.stmts
            .iter()
            .map(|s| {
                s.terms
                    .iter()
                    .map(|t| {
                        let points: u64 = s
                            .ranges
                            .iter()
                            .filter(|(v, _)| s.vars.contains(v) || t.sum.contains(v))
                            .map(|(_, r)| *r as u64)
                            .product();
                        2 * points
                    })
                    .sum::<u64>()
            })
            .sum()
    }
}

impl IndexStmt {
    pub fn range(&self, var: Var) -> usize {
        self.ranges.iter().find(|(v, _)| *v == var).map(|(_, r)| *r).expect("every variable has a range")
    }
}
