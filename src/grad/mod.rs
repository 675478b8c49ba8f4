//! Stage 3, `differentiate`: Graph to [`GradGraph`], the per-example backward pass.
//!
//! Every op has one forward definition in index notation ([`rules::define`], one table).
//! Ops that are contractions with a parameter — conv, linear, the affine part of the
//! norms — are differentiated by one generic rule ([`derive_contraction`]): the gradient
//! with respect to one factor is the contraction of `dY` with the other factor over the
//! variables that factor lacks, with the batch index `n` kept free. That gives the
//! per-example parameter gradients (`dW[n,...]`, never summed over `n`) and the input
//! gradients (a gather when the input is indexed by plain variables, a scatter `+=` when
//! it is indexed by affine windows). Nonlinear ops carry their input-gradient rule in the
//! same table.
//!
//! `lower` consumes these equations: pointwise ones (activations, adds) and every phase of
//! layers in index notation and of `linear` are lowered generically (`lower::equation`,
//! `lower::index`), the rest by the op's kernel generators.
//!
//! Invariants: steps are in reverse topological order; a step exists for every node but the
//! inputs (its forward definition), with input gradients exactly for the inputs that need
//! one (depend on a parameter); every parameter of the graph has exactly one
//! [`ParamGrad`], whose left-hand side starts with `n`.

mod index;
pub mod layer;
mod rules;

use std::fmt;

use serde::Serialize;

pub use index::{intern, Access, Cmp, Equation, Expr, Func, Index, Reduction, Term, Var};
pub use rules::{as_index_layer, label_local, param_local};

use crate::graph::{Graph, NodeId};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GradGraph {
    pub model: String,
    /// The per-example loss and its gradient with respect to the network output.
    pub loss: Vec<Equation>,
    /// The range of every variable of the loss's equations but `n`.
    pub loss_ranges: Vec<(Var, usize)>,
    /// One step per node that takes part in the backward pass, output to input.
    pub steps: Vec<GradStep>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GradStep {
    pub node: NodeId,
    /// `conv1: conv2d`, `relu`, ...
    pub title: String,
    /// What the local names stand for: `X = %2 [16, 14, 14]`, `W = conv1.weight ...`.
    pub bindings: Vec<String>,
    pub forward: Vec<Equation>,
    /// Gradients with respect to the inputs that need one (`dX`, `dA`, `dB`).
    pub input_grads: Vec<Equation>,
    pub param_grads: Vec<ParamGrad>,
    /// For a layer written in index notation, for the built-in ops lowered like one
    /// ([`as_index_layer`]) and for pools: the range of every variable its equations use
    /// but `n`, one range per name (their lowering is generic and reads them here). Empty
    /// for the other built-in ops, whose kernels know their loops.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<(Var, usize)>,
}

/// The per-example gradient of one parameter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamGrad {
    /// `conv1.weight`
    pub param: String,
    pub eq: Equation,
}

/// A forward definition `Y = Σ W[w] · X[x] (+ b[bias])`, summing over the variables of
/// `w` and `x` that `y` lacks.
#[derive(Debug, Clone)]
pub struct Contraction {
    pub y: Access,
    pub w: Access,
    pub x: Access,
    pub bias: Option<Access>,
}

/// The derived equations of a contraction.
pub struct Derived {
    pub forward: Equation,
    pub dx: Equation,
    pub dw: Equation,
    pub db: Option<Equation>,
}

fn minus(vars: Vec<Var>, remove: &[Var]) -> Vec<Var> {
    vars.into_iter().filter(|v| !remove.contains(v)).collect()
}

fn union(a: Vec<Var>, b: Vec<Var>) -> Vec<Var> {
    let mut out = a;
    for v in b {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

fn grad_name(tensor: &str) -> String {
    format!("d{tensor}")
}

/// Differentiates `Y = Σ W·X + b` with respect to W, b (per example: `n` stays free) and X.
pub fn derive_contraction(c: &Contraction) -> Derived {
    let (yv, wv, xv) = (c.y.vars(), c.w.vars(), c.x.vars());
    let reduce = minus(union(wv.clone(), xv.clone()), &yv);
    let product = Expr::mul(vec![Expr::Read(c.w.clone()), Expr::Read(c.x.clone())]);
    let mut rhs = Expr::sum(reduce, product);
    if let Some(b) = &c.bias {
        rhs = Expr::Add(vec![rhs, Expr::Read(b.clone())]);
    }
    let forward = Equation { lhs: c.y.clone(), accumulate: false, rhs };

    let dy = Expr::Read(c.y.renamed(grad_name(&c.y.tensor)));
    // dW[n, w...] = Σ_{(y ∪ x) − w − n} dY · X
    let mut dw_lhs = c.w.renamed(grad_name(&c.w.tensor));
    dw_lhs.index.insert(0, Index::var("n"));
    let mut keep = wv.clone();
    keep.push("n");
    let dw_sum = minus(union(yv.clone(), xv.clone()), &keep);
    let dw = Equation {
        lhs: dw_lhs,
        accumulate: false,
        rhs: Expr::sum(dw_sum, Expr::mul(vec![dy.clone(), Expr::Read(c.x.clone())])),
    };
    // db[n, b...] = Σ_{y − b − n} dY
    let db = c.bias.as_ref().map(|b| {
        let mut lhs = b.renamed(grad_name(&b.tensor));
        lhs.index.insert(0, Index::var("n"));
        let mut keep = b.vars();
        keep.push("n");
        Equation { lhs, accumulate: false, rhs: Expr::sum(minus(yv.clone(), &keep), dy.clone()) }
    });
    // dX: a gather over the variables X lacks, or a scatter through affine windows.
    let dx_lhs = c.x.renamed(grad_name(&c.x.tensor));
    let dx_product = Expr::mul(vec![dy, Expr::Read(c.w.clone())]);
    let dx = if c.x.is_plain() {
        let sum = minus(union(yv, wv), &xv);
        Equation { lhs: dx_lhs, accumulate: false, rhs: Expr::sum(sum, dx_product) }
    } else {
        Equation { lhs: dx_lhs, accumulate: true, rhs: dx_product }
    };
    Derived { forward, dx, dw, db }
}

/// Stage 3: the per-example backward pass of `graph`.
pub fn differentiate(graph: &Graph) -> GradGraph {
    // A node needs a gradient if a parameter lies at or before it.
    let mut needs = vec![false; graph.nodes.len()];
    for n in &graph.nodes {
        needs[n.id.index()] = graph.params_of(n.id).next().is_some() || n.inputs.iter().any(|i| needs[i.index()]);
    }
    let steps = graph
        .nodes
        .iter()
        .rev()
        .filter_map(|n| {
            let input_needs: Vec<bool> = n.inputs.iter().map(|i| needs[i.index()]).collect();
            rules::define(graph, n, &input_needs)
        })
        .collect();
    let (loss, loss_ranges) = rules::loss(graph);
    GradGraph { model: graph.name.clone(), loss, loss_ranges, steps }
}

impl GradGraph {
    /// The step of `node` (`None` for graph inputs).
    pub fn step(&self, node: NodeId) -> Option<&GradStep> {
        self.steps.iter().find(|s| s.node == node)
    }
}

impl fmt::Display for GradGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "grads {}  (per example: n is never summed)", self.model)?;
        writeln!(f, "loss")?;
        for eq in &self.loss {
            writeln!(f, "    {eq}")?;
        }
        for s in &self.steps {
            writeln!(f, "{} {}", s.node, s.title)?;
            for b in &s.bindings {
                writeln!(f, "    where {b}")?;
            }
            for eq in &s.forward {
                writeln!(f, "    fwd   {eq}")?;
            }
            for pg in &s.param_grads {
                writeln!(f, "    grad  {eq}    -> {}", pg.param, eq = pg.eq)?;
            }
            for eq in &s.input_grads {
                writeln!(f, "    back  {eq}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_gradients_follow_goodfellow() {
        let c = Contraction {
            y: Access::new("Y", &["n", "o"]),
            w: Access::new("W", &["o", "i"]),
            x: Access::new("X", &["n", "i"]),
            bias: Some(Access::new("b", &["o"])),
        };
        let d = derive_contraction(&c);
        assert_eq!(d.forward.to_string(), "Y[n,o] = Σ_{i} W[o,i] · X[n,i] + b[o]");
        assert_eq!(d.dw.to_string(), "dW[n,o,i] = dY[n,o] · X[n,i]");
        assert_eq!(d.db.expect("bias").to_string(), "db[n,o] = dY[n,o]");
        assert_eq!(d.dx.to_string(), "dX[n,i] = Σ_{o} dY[n,o] · W[o,i]");
    }

    #[test]
    fn conv_gradient_sums_over_output_positions() {
        let c = Contraction {
            y: Access::new("Y", &["n", "co", "oh", "ow"]),
            w: Access::new("W", &["co", "ci", "kh", "kw"]),
            x: Access {
                tensor: "X".into(),
                index: vec![
                    Index::var("n"),
                    Index::var("ci"),
                    Index::window("oh", 2, "kh", 1, 3),
                    Index::window("ow", 2, "kw", 1, 3),
                ],
            },
            bias: None,
        };
        let d = derive_contraction(&c);
        assert_eq!(d.dw.to_string(), "dW[n,co,ci,kh,kw] = Σ_{oh,ow} dY[n,co,oh,ow] · X[n,ci,oh·2+kh−3,ow·2+kw−3]");
        assert!(d.dx.accumulate, "an affine input is a scatter");
        assert_eq!(d.dx.to_string(), "dX[n,ci,oh·2+kh−3,ow·2+kw−3] += dY[n,co,oh,ow] · W[co,ci,kh,kw]");
    }
}
