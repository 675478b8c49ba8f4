//! The derivation of a layer written in index notation ([`crate::index_layer`]): reverse-mode
//! differentiation of its statements, symbolically, with no knowledge of what the layer is.
//!
//! Each statement `t[v] = Σ_terms Σ_{s} body` is linear in its terms and in each sum, so the
//! gradient flowing into one read `u[idx]` of a term's body is the output gradient times
//! the body's local derivative with respect to that read ([`derivative`]), over every
//! variable of the term:
//!
//! - a parameter (read by plain variables) gets the gather
//!   `du[n, idx] = Σ_{other vars} dt[n, v] · ∂body/∂u[idx]` — the per-example gradient,
//!   `n` never summed; a parameter read in several places sums their gathers;
//! - an input or temporary read by plain variables gets the same gather (accumulated when
//!   it is not the first contribution to that gradient);
//! - one read through affine indices (a window, a stride) gets the scatter
//!   `du[n, idx] += dt[n, v] · ∂body/∂u[idx]`, writes into the zero padding dropped.
//!
//! The local derivative of each scalar function is the one of [`crate::activation`] for
//! activations, and the chain rule for `exp`, `log`, products and quotients. Every variable
//! name of the derived equations has one range in the whole step ([`GradStep::ranges`]),
//! so the equations lower without the layer at hand; a statement that reuses a name with
//! another range has it renamed (`o` → `o2`).

use std::collections::HashMap;

use crate::graph::Node;
use crate::index_layer::{IndexLayer, IndexStmt, LocalKind};

use super::index::{intern, Access, Cmp, Equation, Expr, Func, Index, Var};
use super::{GradStep, ParamGrad};

/// The name of the gradient of local tensor `t` of `layer`: `dt`, or `ddt` (and so on)
/// where the layer has a tensor of that name itself.
pub fn grad_name(layer: &IndexLayer, t: &str) -> String {
    let mut g = format!("d{t}");
    while layer.tensor(&g).is_some() {
        g.insert(0, 'd');
    }
    g
}

/// The local tensor a derived equation's tensor name stands for, and whether the name is
/// its gradient (`dx` for `x`, see [`grad_name`]).
pub fn resolve<'l>(layer: &'l IndexLayer, name: &str) -> Option<(&'l crate::index_layer::LocalTensor, bool)> {
    match layer.tensor(name) {
        Some(t) => Some((t, false)),
        None => layer.tensors.iter().find(|t| grad_name(layer, &t.name) == name).map(|t| (t, true)),
    }
}

/// The reads of `e` in pre-order, the order [`derivative`] numbers them.
pub fn reads(e: &Expr) -> Vec<&Access> {
    let mut out = Vec::new();
    visit_reads(e, &mut |a| out.push(a));
    out
}

fn visit_reads<'e>(e: &'e Expr, f: &mut impl FnMut(&'e Access)) {
    match e {
        Expr::Read(a) => f(a),
        Expr::Num(_) | Expr::Var(_) => {}
        Expr::Mul(items) | Expr::Add(items) | Expr::Apply(_, items) => items.iter().for_each(|x| visit_reads(x, f)),
        Expr::Sub(a, b) | Expr::Div(a, b) | Expr::FirstMax(a, b) => {
            visit_reads(a, f);
            visit_reads(b, f);
        }
        Expr::Select { a, b, then, otherwise, .. } => {
            for x in [a, b, then, otherwise] {
                visit_reads(x, f);
            }
        }
        Expr::Reduce(_, _, body) => visit_reads(body, f),
    }
}

fn count(e: &Expr) -> usize {
    reads(e).len()
}

fn num(x: f64) -> Expr {
    Expr::Num(x)
}

/// `a · b` without unit factors.
fn times(items: Vec<Expr>) -> Expr {
    let mut flat = Vec::new();
    for x in items {
        match x {
            Expr::Num(v) if v == 1.0 => {}
            Expr::Mul(inner) => flat.extend(inner),
            other => flat.push(other),
        }
    }
    match flat.len() {
        0 => num(1.0),
        1 => flat.pop().expect("one factor"),
        _ => Expr::Mul(flat),
    }
}

/// `e` with unit factors, zero terms and divisions by one removed (derivatives built by the
/// chain rule are full of them).
pub fn simplify(e: &Expr) -> Expr {
    match e {
        Expr::Mul(items) => {
            let items: Vec<Expr> = items.iter().map(simplify).collect();
            if items.iter().any(|x| *x == num(0.0)) {
                return num(0.0);
            }
            times(items)
        }
        Expr::Add(items) => {
            let mut items: Vec<Expr> = items.iter().map(simplify).filter(|x| *x != num(0.0)).collect();
            match items.len() {
                0 => num(0.0),
                1 => items.pop().expect("one term"),
                _ => Expr::Add(items),
            }
        }
        Expr::Sub(a, b) => Expr::sub(simplify(a), simplify(b)),
        Expr::Div(a, b) => match simplify(b) {
            Expr::Num(x) if x == 1.0 => simplify(a),
            b => Expr::div(simplify(a), b),
        },
        Expr::Apply(f, args) => Expr::Apply(*f, args.iter().map(simplify).collect()),
        Expr::Select { a, op, b, then, otherwise } => {
            Expr::select(simplify(a), *op, simplify(b), simplify(then), simplify(otherwise))
        }
        Expr::Reduce(r, vars, body) => Expr::Reduce(*r, vars.clone(), Box::new(simplify(body))),
        other => other.clone(),
    }
}

/// The derivative of `e` with respect to its `target`-th read (pre-order, see [`reads`]),
/// or `None` where it is zero (the read sits in a select's condition, which is piecewise
/// constant, or nowhere). `e` is a term body: no reductions.
pub fn derivative(e: &Expr, target: usize) -> Option<Expr> {
    // Which child holds the target, and the target's number within it.
    let locate = |children: &[&Expr]| -> Option<(usize, usize)> {
        let mut start = 0;
        for (i, c) in children.iter().enumerate() {
            let n = count(c);
            if target < start + n {
                return Some((i, target - start));
            }
            start += n;
        }
        None
    };
    match e {
        Expr::Read(_) => (target == 0).then(|| num(1.0)),
        Expr::Num(_) | Expr::Var(_) | Expr::FirstMax(..) | Expr::Reduce(..) => None,
        Expr::Mul(items) => {
            let (i, t) = locate(&items.iter().collect::<Vec<_>>())?;
            let d = derivative(&items[i], t)?;
            let mut factors: Vec<Expr> =
                items.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, x)| x.clone()).collect();
            factors.push(d);
            Some(times(factors))
        }
        Expr::Add(items) => {
            let (i, t) = locate(&items.iter().collect::<Vec<_>>())?;
            derivative(&items[i], t)
        }
        Expr::Sub(a, b) => match locate(&[a, b])? {
            (0, t) => derivative(a, t),
            (_, t) => Some(times(vec![num(-1.0), derivative(b, t)?])),
        },
        Expr::Div(a, b) => match locate(&[a, b])? {
            (0, t) => Some(Expr::div(derivative(a, t)?, (**b).clone())),
            // d(a/b) = −a·db / b²
            (_, t) => Some(Expr::div(
                times(vec![num(-1.0), (**a).clone(), derivative(b, t)?]),
                Expr::Mul(vec![(**b).clone(), (**b).clone()]),
            )),
        },
        Expr::Apply(f, args) => {
            let (i, t) = locate(&args.iter().collect::<Vec<_>>())?;
            let d = derivative(&args[i], t)?;
            let a = args[0].clone();
            Some(match f {
                Func::Exp => times(vec![e.clone(), d]),
                Func::Log => Expr::div(d, a),
                Func::Tanh => times(vec![Expr::sub(num(1.0), Expr::Mul(vec![e.clone(), e.clone()])), d]),
                Func::Sqrt => Expr::div(d, Expr::Mul(vec![num(2.0), e.clone()])),
                Func::Erf => times(vec![
                    num(std::f64::consts::FRAC_2_SQRT_PI),
                    Expr::apply(Func::Exp, vec![Expr::Mul(vec![num(-1.0), a.clone(), a])]),
                    d,
                ]),
                // The selected argument's derivative (the first one on ties).
                Func::Max | Func::Min => {
                    let cmp = if *f == Func::Max { Cmp::Ge } else { Cmp::Le };
                    let (x, y) = (args[0].clone(), args[1].clone());
                    if i == 0 {
                        Expr::select(x, cmp, y, d, num(0.0))
                    } else {
                        Expr::select(x, cmp, y, num(0.0), d)
                    }
                }
                // The activation table's vector-Jacobian product with `dY` = the inner derivative.
                // `Y = f(X)` is the application itself, which prints and lowers as `f`.
                Func::Activation(act) => act.backward(a, e.clone(), d),
            })
        }
        Expr::Select { a, op, b, then, otherwise } => match locate(&[a, b, then, otherwise])? {
            (0 | 1, _) => None,
            (2, t) => Some(Expr::select((**a).clone(), *op, (**b).clone(), derivative(then, t)?, num(0.0))),
            (_, t) => Some(Expr::select((**a).clone(), *op, (**b).clone(), num(0.0), derivative(otherwise, t)?)),
        },
    }
}

/// `e` with variables renamed by `map`.
fn rename(e: &Expr, map: &HashMap<Var, Var>) -> Expr {
    let var = |v: Var| map.get(v).copied().unwrap_or(v);
    e.map(&|a: &Access| rename_access(a, map), &var)
}

fn rename_access(a: &Access, map: &HashMap<Var, Var>) -> Access {
    let mut a = a.clone();
    for ix in &mut a.index {
        for t in &mut ix.terms {
            t.var = map.get(t.var).copied().unwrap_or(t.var);
        }
    }
    a
}

/// `e` with the batch index `n` put in front of every read of a per-example tensor.
fn batched(e: &Expr, layer: &IndexLayer) -> Expr {
    e.map(&|a: &Access| batched_access(a, layer), &|v| v)
}

fn batched_access(a: &Access, layer: &IndexLayer) -> Access {
    let per_example = layer.tensor(&a.tensor).is_none_or(|t| t.kind != LocalKind::Param);
    let mut a = a.clone();
    if per_example {
        a.index.insert(0, Index::var("n"));
    }
    a
}

/// The layer's statements with every variable name given one range over the whole layer
/// (a name reused with another range is renamed), and those ranges.
fn unique_ranges(layer: &IndexLayer) -> (Vec<IndexStmt>, Vec<(Var, usize)>) {
    let mut ranges: Vec<(Var, usize)> = Vec::new();
    let mut stmts = Vec::new();
    for s in &layer.stmts {
        let mut map = HashMap::new();
        for &(v, r) in &s.ranges {
            match ranges.iter().find(|(u, _)| *u == v) {
                Some((_, r0)) if *r0 == r => {}
                None => ranges.push((v, r)),
                Some(_) => {
                    let fresh = fresh_name(v, &ranges);
                    ranges.push((fresh, r));
                    map.insert(v, fresh);
                }
            }
        }
        let rn = |v: &Var| map.get(v).copied().unwrap_or(v);
        stmts.push(IndexStmt {
            lhs: s.lhs.clone(),
            vars: s.vars.iter().map(rn).collect(),
            terms: s
                .terms
                .iter()
                .map(|t| crate::index_layer::IndexTerm {
                    sum: t.sum.iter().map(rn).collect(),
                    body: rename(&t.body, &map),
                })
                .collect(),
            ranges: s.ranges.iter().map(|(v, r)| (rn(v), *r)).collect(),
        });
    }
    (stmts, ranges)
}

/// `v2`, `v3`, ...: the first that is not taken.
fn fresh_name(v: Var, taken: &[(Var, usize)]) -> Var {
    (2..).map(|k| intern(&format!("{v}{k}"))).find(|f| taken.iter().all(|(u, _)| u != f)).expect("a free name")
}

/// One contribution to a gradient: `target[n, index] (+)= Σ_{sum} value`.
struct Contribution {
    target: Access,
    sum: Vec<Var>,
    value: Expr,
    scatter: bool,
}

/// The equations of `node`'s index layer: forward, parameter gradients, and the gradients
/// of its temporaries and of the inputs that need one (`input_needs`), output to input.
pub fn define(node: &Node, layer: &IndexLayer, input_needs: &[bool], step: &mut GradStep) {
    let (stmts, mut ranges) = unique_ranges(layer);
    step.bindings = layer
        .tensors
        .iter()
        .map(|t| {
            let dims = format!("[{}]", t.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "));
            let what = match t.kind {
                LocalKind::Input(slot) => format!("{} {dims}", node.inputs[slot]),
                LocalKind::Param => format!("{}.{} {dims}", node.layer.as_deref().unwrap_or("?"), t.name),
                LocalKind::Temp if t.name == layer.output().lhs => format!("{} {dims}", node.id),
                LocalKind::Temp => format!("{dims}, a temporary"),
            };
            let pad = if t.padding.iter().any(|&(lo, hi)| lo + hi > 0) {
                let p: Vec<String> = t.padding.iter().map(|(lo, hi)| format!("({lo},{hi})")).collect();
                format!(", zero-padded {}", p.join(""))
            } else {
                String::new()
            };
            format!("{} = {what}{pad}", t.name)
        })
        .collect();
    let with_n = |vars: &[Var]| -> Access {
        let mut all = vec!["n"];
        all.extend_from_slice(vars);
        Access::new("", &all)
    };
    for s in &stmts {
        let terms: Vec<Expr> = s.terms.iter().map(|t| Expr::sum(t.sum.clone(), batched(&t.body, layer))).collect();
        let rhs = if terms.len() == 1 { terms.into_iter().next().expect("one term") } else { Expr::Add(terms) };
        step.forward.push(Equation { lhs: with_n(&s.vars).renamed(s.lhs.clone()), accumulate: false, rhs });
    }
    let needs = |name: &str| match layer.tensor(name).map(|t| t.kind) {
        Some(LocalKind::Input(slot)) => input_needs.get(slot).copied().unwrap_or(false),
        Some(LocalKind::Param | LocalKind::Temp) => true,
        None => false,
    };
    let mut param_parts: Vec<(String, Vec<Contribution>)> = Vec::new();
    let mut others: Vec<Contribution> = Vec::new();
    for s in stmts.iter().rev() {
        let dt = Expr::Read(with_n(&s.vars).renamed(grad_name(layer, &s.lhs)));
        for term in &s.terms {
            let body = batched(&term.body, layer);
            let mut all: Vec<Var> = s.vars.clone();
            all.extend(&term.sum);
            for (k, r) in reads(&body).into_iter().enumerate() {
                let local = if r.index.first().and_then(Index::as_var) == Some("n")
                    && layer.tensor(&r.tensor).is_some_and(|t| t.kind != LocalKind::Param)
                {
                    &r.index[1..]
                } else {
                    &r.index[..]
                };
                if !needs(&r.tensor) {
                    continue;
                }
                let Some(partial) = derivative(&body, k).map(|d| simplify(&d)) else { continue };
                let value = times(vec![dt.clone(), partial]);
                let mut target = r.renamed(grad_name(layer, &r.tensor));
                let is_param = layer.tensor(&r.tensor).is_some_and(|t| t.kind == LocalKind::Param);
                if is_param {
                    target.index.insert(0, Index::var("n"));
                }
                let plain = Access { tensor: String::new(), index: local.to_vec() }.is_plain();
                let kept: Vec<Var> = local.iter().filter_map(Index::as_var).collect();
                let c = if plain {
                    let sum = all.iter().copied().filter(|v| !kept.contains(v)).collect();
                    Contribution { target, sum, value, scatter: false }
                } else {
                    Contribution { target, sum: Vec::new(), value, scatter: true }
                };
                if is_param {
                    match param_parts.iter_mut().find(|(p, _)| *p == r.tensor) {
                        Some((_, parts)) => parts.push(c),
                        None => param_parts.push((r.tensor.clone(), vec![c])),
                    }
                } else {
                    others.push(c);
                }
            }
        }
    }
    // Parameter gradients: one equation per parameter, in declaration order.
    let layer_name = node.layer.as_deref().unwrap_or("?");
    for p in layer.params() {
        let Some((_, parts)) = param_parts.iter().find(|(name, _)| *name == p.name) else { continue };
        let target = parts[0].target.clone();
        let target_vars: Vec<Var> = target.index.iter().filter_map(Index::as_var).collect();
        let mut terms = Vec::new();
        for c in parts {
            // Rename this part's variables to the first part's names for the same dims.
            let mine: Vec<Var> = c.target.index.iter().filter_map(Index::as_var).collect();
            let mut map: HashMap<Var, Var> = mine.iter().copied().zip(target_vars.iter().copied()).collect();
            let mut used: Vec<Var> = reads(&c.value).iter().flat_map(|a| a.vars()).collect();
            used.extend(&c.sum);
            for v in used {
                if !mine.contains(&v) && target_vars.contains(&v) && !map.contains_key(v) {
                    let range = ranges.iter().find(|(u, _)| *u == v).map_or(1, |(_, r)| *r);
                    let fresh = fresh_name(v, &ranges);
                    ranges.push((fresh, range));
                    map.insert(v, fresh);
                }
            }
            let sum = c.sum.iter().map(|v| map.get(v).copied().unwrap_or(v)).collect();
            terms.push(Expr::sum(sum, rename(&c.value, &map)));
        }
        let rhs = if terms.len() == 1 { terms.pop().expect("one part") } else { Expr::Add(terms) };
        step.param_grads.push(ParamGrad {
            param: format!("{layer_name}.{}", p.name),
            eq: Equation { lhs: target, accumulate: false, rhs },
        });
    }
    for c in others {
        let rhs = Expr::sum(c.sum, c.value);
        step.input_grads.push(Equation { lhs: c.target, accumulate: c.scatter, rhs });
    }
    step.ranges = ranges;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(t: &str, vars: &[Var]) -> Expr {
        Expr::read(t, vars)
    }

    #[test]
    fn derivatives_follow_the_chain_rule() {
        // x · sigmoid(g): the first read's derivative is sigmoid(g), the second's x · σ'(g).
        let e = Expr::Mul(vec![
            read("x", &["o"]),
            Expr::apply(Func::Activation(crate::graph::Activation::Sigmoid), vec![read("g", &["o"])]),
        ]);
        assert_eq!(derivative(&e, 0).expect("nonzero").to_string(), "sigmoid(g[o])");
        assert!(derivative(&e, 1).is_some());
        assert!(derivative(&e, 2).is_none(), "only two reads");
        // A read in a select's condition has derivative zero.
        let s = Expr::select(read("a", &["i"]), Cmp::Gt, num(0.0), read("b", &["i"]), num(0.0));
        assert!(derivative(&s, 0).is_none());
        assert_eq!(derivative(&s, 1).expect("nonzero").to_string(), "(a[i] > 0 ? 1 : 0)");
    }
}

/// A per-example parameter gradient in the form ghost norms need:
/// `dW[n, g, a, b] = Σ_t A[n, g, a, t] · B[n, g, b, t]`, so that
/// `‖dW[n]‖² = Σ_g Σ_{t,t'} (Σ_a A[g,a,t]·A[g,a,t']) · (Σ_b B[g,b,t]·B[g,b,t'])` with
/// Gram matrices over the summed variables `t` (Li et al. 2022's ghost clipping, derived
/// for any such contraction). Variables shared by both factors and the parameter (`g`: a
/// grouped conv's groups, a depthwise conv's channels) stay outside the Gram products, so
/// grouped layers get no cross-group terms.
#[derive(Debug, Clone, PartialEq)]
pub struct GhostForm {
    pub g: Vec<Var>,
    pub a: Vec<Var>,
    pub b: Vec<Var>,
    pub t: Vec<Var>,
    /// The factor holding the output gradient (`A`).
    pub left: Expr,
    /// The rest of the product (`B`; `1` when there is none).
    pub right: Expr,
}

/// The ghost form of a parameter gradient derived by [`define`], or `None` when it has
/// several parts (a parameter read in several places).
pub fn ghost_form(eq: &Equation) -> Option<GhostForm> {
    let params: Vec<Var> = eq.lhs.index.iter().skip(1).map(Index::as_var).collect::<Option<_>>()?;
    let (t, body) = match &eq.rhs {
        Expr::Reduce(super::Reduction::Sum, vars, body) => (vars.clone(), &**body),
        Expr::Reduce(..) | Expr::Add(_) => return None,
        other => (Vec::new(), other),
    };
    let mut factors = match body {
        Expr::Mul(items) => items.clone(),
        other => vec![other.clone()],
    };
    let left = factors.remove(0);
    let right = times(factors);
    let (vl, vr) = (left.vars(), right.vars());
    let g: Vec<Var> = params.iter().copied().filter(|v| vl.contains(v) && vr.contains(v)).collect();
    let b: Vec<Var> = params.iter().copied().filter(|v| vr.contains(v) && !vl.contains(v)).collect();
    // A parameter variable neither factor reads repeats the same value: it joins `a`.
    let a: Vec<Var> = params.iter().copied().filter(|v| !g.contains(v) && !b.contains(v)).collect();
    Some(GhostForm { g, a, b, t, left, right })
}

/// `e` with variables renamed by `map` (for the primed copy of a ghost factor).
pub fn renamed(e: &Expr, map: &HashMap<Var, Var>) -> Expr {
    rename(e, map)
}
