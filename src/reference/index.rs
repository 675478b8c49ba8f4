//! The oracle for layers written in index notation: their statements evaluated point by
//! point in f64, and their backward pass by the chain rule over those points, with each
//! body's local derivative taken *numerically* (a central difference of the body in the one
//! read, in f64). It shares nothing with the symbolic derivation (`grad::layer`) but the
//! checked layer itself, so the two check each other.

use std::collections::BTreeMap;

use crate::grad::{Access, Cmp, Expr, Func};
use crate::index_layer::{IndexLayer, IndexStmt, LocalKind};

/// Values of the layer's tensors for one example, row-major, by local name.
pub type Values<'a> = BTreeMap<String, std::borrow::Cow<'a, [f64]>>;

/// Every assignment of `vars` (row-major order), as values in the same order.
fn points<'a>(vars: &'a [(&'static str, usize)]) -> impl Iterator<Item = Vec<i64>> + 'a {
    let total: usize = vars.iter().map(|(_, r)| *r).product();
    (0..total).map(move |mut k| {
        let mut p = vec![0i64; vars.len()];
        for (slot, (_, r)) in vars.iter().enumerate().rev() {
            p[slot] = (k % r) as i64;
            k /= r;
        }
        p
    })
}

struct Env<'v> {
    vars: &'v [(&'static str, usize)],
    at: &'v [i64],
}

impl Env<'_> {
    fn get(&self, v: &str) -> i64 {
        self.vars.iter().position(|(u, _)| *u == v).map(|i| self.at[i]).expect("a bound variable")
    }
}

/// The flat offset of `a` at `env` in a tensor of `shape`, or `None` in its zero padding.
fn offset(a: &Access, env: &Env<'_>, shape: &[usize]) -> Option<usize> {
    let mut off = 0usize;
    for (ix, &d) in a.index.iter().zip(shape) {
        let i: i64 = ix.offset + ix.terms.iter().map(|t| t.coef * env.get(t.var).div_euclid(t.div)).sum::<i64>();
        if i < 0 || i >= d as i64 {
            return None;
        }
        off = off * d + i as usize;
    }
    Some(off)
}

/// `e` at `env`; read number `k` (pre-order) has value `read(k, access)`.
fn eval(e: &Expr, env: &Env<'_>, read: &mut dyn FnMut(usize, &Access) -> f64, k: &mut usize) -> f64 {
    let mut ev = |x: &Expr, k: &mut usize| eval(x, env, read, k);
    match e {
        Expr::Read(a) => {
            let v = read(*k, a);
            *k += 1;
            v
        }
        Expr::Num(x) => *x,
        Expr::Var(v) => env.get(v) as f64,
        Expr::Mul(items) => items.iter().fold(1.0, |acc, x| acc * ev(x, k)),
        Expr::Add(items) => items.iter().fold(0.0, |acc, x| acc + ev(x, k)),
        Expr::Sub(a, b) => {
            let a = ev(a, k);
            a - ev(b, k)
        }
        Expr::Div(a, b) => {
            let a = ev(a, k);
            a / ev(b, k)
        }
        Expr::Apply(f, args) => {
            let xs: Vec<f64> = args.iter().map(|x| ev(x, k)).collect();
            match f {
                Func::Exp => xs[0].exp(),
                Func::Log => xs[0].ln(),
                Func::Tanh => xs[0].tanh(),
                Func::Sqrt => xs[0].sqrt(),
                Func::Erf => libm::erf(xs[0]),
                Func::Max => xs[0].max(xs[1]),
                Func::Min => xs[0].min(xs[1]),
                Func::Activation(a) => super::act(*a, xs[0]),
            }
        }
        Expr::Select { a, op, b, then, otherwise } => {
            let (a, b) = (ev(a, k), ev(b, k));
            let holds = match op {
                Cmp::Lt => a < b,
                Cmp::Le => a <= b,
                Cmp::Eq => a == b,
                Cmp::Gt => a > b,
                Cmp::Ge => a >= b,
            };
            // Both arms are walked so that reads keep their numbers.
            let (t, o) = (ev(then, k), ev(otherwise, k));
            if holds {
                t
            } else {
                o
            }
        }
        Expr::FirstMax(..) | Expr::Reduce(..) => unreachable!("the checker admits no such term body"),
    }
}

/// A statement's variables for one term: its left-hand side's, then the term's sums.
fn term_vars(s: &IndexStmt, sum: &[&'static str]) -> Vec<(&'static str, usize)> {
    s.vars.iter().chain(sum).map(|v| (*v, s.range(v))).collect()
}

fn row_major(s: &IndexStmt, at: &[i64]) -> usize {
    s.vars.iter().zip(at).fold(0, |off, (v, &i)| off * s.range(v) + i as usize)
}

/// Runs the layer's statements on one example: `values` holds its inputs and parameters
/// and receives every temporary. Returns the output.
pub fn forward(layer: &IndexLayer, values: &mut Values<'_>) -> Vec<f64> {
    for s in &layer.stmts {
        let size: usize = s.vars.iter().map(|v| s.range(v)).product();
        let mut out = vec![0.0; size];
        for term in &s.terms {
            let vars = term_vars(s, &term.sum);
            for at in points(&vars) {
                let env = Env { vars: &vars, at: &at };
                let mut read = |_: usize, a: &Access| {
                    let t = layer.tensor(&a.tensor).expect("a checked read");
                    offset(a, &env, &t.shape).map_or(0.0, |o| values[&a.tensor][o])
                };
                out[row_major(s, &at[..s.vars.len()])] += eval(&term.body, &env, &mut read, &mut 0);
            }
        }
        values.insert(s.lhs.clone(), out.into());
    }
    values[&layer.output().lhs].to_vec()
}

/// Backpropagates `dout` through one example whose tensors are `values` (after
/// [`forward`]): the gradient of every input and parameter, by local name.
pub fn backward(layer: &IndexLayer, values: &Values<'_>, dout: &[f64]) -> BTreeMap<String, Vec<f64>> {
    let mut grads: BTreeMap<String, Vec<f64>> =
        layer.tensors.iter().map(|t| (t.name.clone(), vec![0.0; t.shape.iter().product()])).collect();
    grads.insert(layer.output().lhs.clone(), dout.to_vec());
    for s in layer.stmts.iter().rev() {
        let dt = grads[&s.lhs].clone();
        for term in &s.terms {
            let vars = term_vars(s, &term.sum);
            for at in points(&vars) {
                let g = dt[row_major(s, &at[..s.vars.len()])];
                if g == 0.0 {
                    continue;
                }
                let env = Env { vars: &vars, at: &at };
                let value_of = |a: &Access| {
                    let t = layer.tensor(&a.tensor).expect("a checked read");
                    offset(a, &env, &t.shape).map(|o| (o, values[&a.tensor][o]))
                };
                let mut reads = Vec::new();
                eval(
                    &term.body,
                    &env,
                    &mut |_, a| {
                        reads.push(a.clone());
                        0.0
                    },
                    &mut 0,
                );
                for (k, a) in reads.iter().enumerate() {
                    let Some((o, v)) = value_of(a) else { continue };
                    // ∂body/∂(read k) by a central difference in f64.
                    let h = 1e-6 * v.abs().max(1.0);
                    let at_value = |x: f64| {
                        eval(
                            &term.body,
                            &env,
                            &mut |j, b: &Access| if j == k { x } else { value_of(b).map_or(0.0, |(_, v)| v) },
                            &mut 0,
                        )
                    };
                    let partial = (at_value(v + h) - at_value(v - h)) / (2.0 * h);
                    grads.get_mut(&a.tensor).expect("a local tensor")[o] += g * partial;
                }
            }
        }
    }
    grads.retain(|name, _| layer.tensor(name).is_some_and(|t| t.kind != LocalKind::Temp));
    grads
}
