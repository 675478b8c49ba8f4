//! Lowering of the equations derived for a layer written in index notation
//! ([`crate::grad::layer`]), for a built-in op that has that form (`linear`, convs, see
//! [`crate::grad::as_index_layer`]: `linear`, convs, the norms), for pools and for the loss:
//! each equation becomes one kernel, with no knowledge of the op it came from.
//!
//! - A gather `t[n, v...] = Σ_terms Σ_{s} body` loops over `v`, sums each term over its own
//!   variables into one accumulator, and stores it once. A gather that is one max or mean
//!   over a window's taps (a pool's forward) is [`reduce_gather`]'s.
//! - A scatter `t[n, idx] += value` (an affine left-hand side) loops over every variable
//!   and adds into `t`; writes that land in the zero padding are dropped. One routed
//!   through a first maximum (max pooling's backward) is [`first_max_scatter`]'s.
//! - A read that may leave its tensor (zero padding) is loaded under a guard, so no backend
//!   ever touches memory outside a buffer; outside, it reads 0.
//! - A reduction inside an expression (a softmax's log-sum-exp, a norm's row means) or a
//!   loop variable's value (a one-hot comparison) is computed into an accumulator first,
//!   inside the loops over the variables it depends on and before the others
//!   ([`Builder::value_in`]); sibling sums over the same loops share one loop nest.
//!
//! Per-example kernels run the batch as their grid (each example on its own); the
//! batch-summed parameter gradient (`Batching::Summed`) drops `n` from the target, makes
//! the parameter's first index the grid and sums `n` inside, so grid iterations still
//! write disjoint elements.
//!
//! Matrix products (also one per example, or per example summed over the batch) and
//! window products become contraction nodes (`matrix_product`, [`WindowProduct`]). A
//! per-example parameter gradient's gather can store each example's squared norm as it
//! stores the gradient ([`gather_with_norm`]), and a window product's contraction kernel
//! after it writes the product ([`flat_gemm`]). The im2col and col2im copies of window
//! products run on split loops (no bounds guard per element inside the input), and so does
//! a gather's term that sums a product over a window's output positions (`window_sum`: a
//! conv's weight gradient under the `direct` schedule, which lowers a window product as a
//! gather instead of columns and a contraction).
//!
//! The ghost strategy of these layers is two more generic kernels: the squared norm of a
//! parameter's gradient from Gram products of its derived equation's two factors
//! ([`ghost_kernel`]), and the clipped sum as that equation weighted by each example's clip
//! factor and summed over the batch ([`clipped_sum_kernel`], or the equation itself reading
//! one factor scaled by the clip factors, see [`scaled_factor`]) — no per-example gradient is
//! ever stored.

/// The name under which the clip factors `c[n]` enter a clipped-sum equation (not a valid
/// `.pdg` identifier, so it cannot name a tensor of the layer).
pub const CLIP: &str = "clip'";

/// What the lowering knows of a tensor that `layer`'s derived equations name: one of its
/// own, or the gradient of one (per example, unpadded).
pub fn tensor_info(layer: &crate::index_layer::IndexLayer, t: &str) -> Option<TensorInfo> {
    use crate::index_layer::LocalKind;
    let (local, grad) = crate::grad::layer::resolve(layer, t)?;
    Some(TensorInfo {
        shape: local.shape.clone(),
        batched: grad || local.kind != LocalKind::Param,
        padding: if grad { vec![(0, 0); local.shape.len()] } else { local.padding.clone() },
    })
}

use std::collections::HashMap;

use pdgc_codegen::ir::{self, Affine, Extent, Kernel, Stmt, VarId};

use super::builder::*;
use super::equation::scalar;
use crate::error::{Error, Result};
use crate::grad::layer::{renamed, GhostForm};
use crate::grad::{Access, Equation, Expr, Index, Reduction, Term, Var};

/// What the lowering needs to know of one tensor an equation names.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Per-example shape (without the batch dim for per-example tensors).
    pub shape: Vec<usize>,
    /// Indexed by `n` first (activations, gradients, temporaries), or not (parameters).
    pub batched: bool,
    /// Zeros before and after each dim of the shape.
    pub padding: Vec<(usize, usize)>,
}

impl TensorInfo {
    /// A per-example tensor of `shape` without padding (a window product's columns).
    pub fn unpadded(shape: Vec<usize>) -> TensorInfo {
        TensorInfo { padding: vec![(0, 0); shape.len()], shape, batched: true }
    }
}

/// How a kernel covers the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// Each example on its own: `n` is the grid.
    PerExample,
    /// A parameter gradient summed over the batch: the target loses its `n`.
    Summed,
}

/// The terms of a right-hand side: `(summed variables, body)`.
fn terms(rhs: &Expr) -> Vec<(Vec<Var>, &Expr)> {
    fn one(e: &Expr) -> (Vec<Var>, &Expr) {
        match e {
            Expr::Reduce(Reduction::Sum, vars, body) => (vars.clone(), &**body),
            other => (Vec::new(), other),
        }
    }
    match rhs {
        Expr::Add(items) if items.iter().any(|x| matches!(x, Expr::Reduce(..))) => items.iter().map(one).collect(),
        other => vec![one(other)],
    }
}

struct Builder<'a> {
    kb: KernelBuilder,
    vars: HashMap<Var, VarId>,
    ranges: &'a [(Var, usize)],
    args: HashMap<String, (ir::ArgId, TensorInfo)>,
}

impl<'a> Builder<'a> {
    /// A builder for kernel `name` whose input arguments are the distinct tensors `exprs`
    /// read, in order of first read; returns it with their names.
    fn reading(
        name: &str,
        ranges: &'a [(Var, usize)],
        exprs: &[&Expr],
        info: &dyn Fn(&str) -> Option<TensorInfo>,
    ) -> Result<(Builder<'a>, Vec<String>)> {
        let mut b = Builder { kb: KernelBuilder::new(name), vars: HashMap::new(), ranges, args: HashMap::new() };
        let mut tensors: Vec<String> = Vec::new();
        for a in exprs.iter().flat_map(|e| crate::grad::layer::reads(e)) {
            if !tensors.contains(&a.tensor) {
                tensors.push(a.tensor.clone());
            }
        }
        for t in &tensors {
            let i = info(t).ok_or_else(|| unbound(t))?;
            let dims = if i.batched { batched(&i.shape) } else { fixed(&i.shape) };
            let arg = b.kb.input(t, dims);
            b.args.insert(t.clone(), (arg, i));
        }
        Ok((b, tensors))
    }

    fn var(&mut self, v: Var) -> VarId {
        if let Some(id) = self.vars.get(v) {
            return *id;
        }
        let id = self.kb.var(v);
        self.vars.insert(v, id);
        id
    }

    fn range(&self, v: Var) -> Result<usize> {
        self.ranges
            .iter()
            .find(|(u, _)| *u == v)
            .map(|(_, r)| *r)
            .ok_or_else(|| Error::Internal(format!("index `{v}` of an index-notation layer has no range")))
    }

    fn affine(&mut self, ix: &Index) -> Affine {
        let mut a = Affine::constant(ix.offset);
        for t in &ix.terms {
            let v = self.var(t.var);
            a = a.plus_div(v, t.coef, t.div);
        }
        a
    }

    /// The least and greatest value of `ix` over the variables' ranges (`n` counts as 0:
    /// it only ever indexes the batch dim).
    fn bounds(&self, ix: &Index) -> Result<(i64, i64)> {
        let (mut lo, mut hi) = (ix.offset, ix.offset);
        for t in &ix.terms {
            if t.var == "n" {
                continue;
            }
            let top = t.coef * ((self.range(t.var)? as i64 - 1) / t.div);
            lo += top.min(0);
            hi += top.max(0);
        }
        Ok((lo, hi))
    }

    /// The per-example dims of an access (its index without the batch index).
    fn dims<'x>(&self, a: &'x Access, info: &TensorInfo) -> &'x [Index] {
        if info.batched {
            &a.index[1..]
        } else {
            &a.index
        }
    }

    /// The conditions under which `a` lies inside its tensor (empty when it always does).
    fn inside(&mut self, a: &Access, info: &TensorInfo) -> Result<Vec<(Affine, usize)>> {
        let mut out = Vec::new();
        for (d, ix) in self.dims(a, info).iter().enumerate() {
            let (lo, hi) = self.bounds(ix)?;
            if lo < 0 || hi >= info.shape[d] as i64 {
                out.push((self.affine(ix), info.shape[d]));
            }
        }
        Ok(out)
    }

    fn index(&mut self, a: &Access) -> Vec<Affine> {
        a.index.iter().map(|ix| self.affine(ix)).collect()
    }

    /// A term body's value, and the statements that load its guarded reads and compute its
    /// reductions first.
    fn value(&mut self, body: &Expr) -> Result<(Vec<Stmt>, ir::Expr)> {
        let (mut levels, value) = self.value_in(body, &[])?;
        Ok((levels.pop().unwrap_or_default(), value))
    }

    /// [`Builder::value`] inside loops over `kept` (outermost first): each reduction of
    /// `body` is computed at the depth of the innermost of `kept` it depends on, so it runs
    /// once per value of the variables it depends on (a softmax's log-sum-exp once per
    /// example and not once per class; a norm's row means once per row, inside the loop
    /// over rows and before the loops over the row's elements). Returns the statements of
    /// each depth — `levels[i]` to run inside the loops over `kept[..i]`, before the loop
    /// over `kept[i]`; the last at each element — and the value.
    fn value_in(&mut self, body: &Expr, kept: &[Var]) -> Result<(Vec<Vec<Stmt>>, ir::Expr)> {
        let (mut levels, mut lifted) = (vec![Vec::new(); kept.len() + 1], Vec::new());
        let body = self.lift(body, kept, &mut levels, &mut lifted)?;
        let mut pre = levels.pop().unwrap_or_default();
        let mut loaded: Vec<(Access, ir::Expr)> = Vec::new();
        for a in crate::grad::layer::reads(&body) {
            if loaded.iter().any(|(b, _)| b == a) {
                continue;
            }
            if a.tensor == LIFTED {
                let at = a.index.first().map_or(0, |ix| ix.offset as usize);
                loaded.push((a.clone(), lifted[at].clone()));
                continue;
            }
            let (arg, info) = self.args.get(&a.tensor).cloned().ok_or_else(|| unbound(&a.tensor))?;
            let index = self.index(a);
            let guard = self.inside(a, &info)?;
            let value = if guard.is_empty() {
                load(arg, index)
            } else {
                let acc = self.kb.acc(&format!("{}_padded", a.tensor));
                pre.push(set(acc, lit(0.0)));
                pre.extend(guarded(guard, vec![set(acc, load(arg, index))]));
                ir::Expr::Acc(acc)
            };
            loaded.push((a.clone(), value));
        }
        let value = scalar(&body, &|a: &Access| loaded.iter().find(|(b, _)| b == a).map(|(_, v)| v.clone()))
            .ok_or_else(|| Error::Internal(format!("an index-notation term the lowering cannot express: {body}")))?;
        levels.push(pre);
        Ok((levels, value))
    }

    /// The loops over `kept` (outermost first, the innermost a vector loop) around `inner`,
    /// with the statements of [`Builder::value_in`]'s `levels` at their depths.
    fn placed(&mut self, kept: &[Var], mut levels: Vec<Vec<Stmt>>, inner: Vec<Stmt>) -> Result<Vec<Stmt>> {
        let mut body = [levels.pop().unwrap_or_default(), inner].concat();
        for (i, &v) in kept.iter().enumerate().rev() {
            let looped = self.loops(&[v], body, i + 1 == kept.len())?;
            body = [std::mem::take(&mut levels[i]), looped].concat();
        }
        Ok(body)
    }

    /// `e` with each reduction and each loop variable's value replaced by a read of
    /// [`LIFTED`] at the position in `lifted` of its value: a reduction's statements go to
    /// `levels[d]`, `d` one past the position in `kept` of the innermost variable it
    /// depends on (0 for none).
    fn lift(&mut self, e: &Expr, kept: &[Var], levels: &mut [Vec<Stmt>], lifted: &mut Vec<ir::Expr>) -> Result<Expr> {
        let at = |lifted: &Vec<ir::Expr>| {
            Expr::Read(Access {
                tensor: LIFTED.into(),
                index: vec![Index { terms: vec![], offset: lifted.len() as i64 - 1 }],
            })
        };
        let mut one = |x: &Expr, b: &mut Builder| b.lift(x, kept, &mut *levels, &mut *lifted);
        Ok(match e {
            Expr::Var(var) => {
                let index = self.affine(&Index::var(var));
                lifted.push(ir::Expr::Index(index));
                at(lifted)
            }
            Expr::Reduce(r, vars, body) => {
                let (stmts, value) = self.reduction(*r, vars, body)?;
                let free = e.free_vars();
                let depth = kept.iter().rposition(|v| free.contains(v)).map_or(0, |i| i + 1);
                merged(&mut levels[depth], stmts);
                lifted.push(value);
                at(lifted)
            }
            Expr::Read(_) | Expr::Num(_) | Expr::FirstMax(..) => e.clone(),
            Expr::Mul(items) => Expr::Mul(items.iter().map(|x| one(x, self)).collect::<Result<_>>()?),
            Expr::Add(items) => Expr::Add(items.iter().map(|x| one(x, self)).collect::<Result<_>>()?),
            Expr::Apply(f, items) => Expr::Apply(*f, items.iter().map(|x| one(x, self)).collect::<Result<_>>()?),
            Expr::Sub(a, b) => Expr::sub(one(a, self)?, one(b, self)?),
            Expr::Div(a, b) => Expr::div(one(a, self)?, one(b, self)?),
            Expr::Select { a, op, b, then, otherwise } => {
                Expr::select(one(a, self)?, *op, one(b, self)?, one(then, self)?, one(otherwise, self)?)
            }
        })
    }

    /// `body`'s value with every read loaded unguarded, and each read with the conditions
    /// under which it lies inside its tensor (for the caller to guard by, or to refuse);
    /// `None` where the scalar lowering cannot express `body`.
    #[allow(clippy::type_complexity)]
    fn unguarded<'e>(&mut self, body: &'e Expr) -> Result<Option<(ir::Expr, Vec<(&'e Access, Vec<(Affine, usize)>)>)>> {
        let (mut loads, mut inside) = (Vec::new(), Vec::new());
        for a in crate::grad::layer::reads(body) {
            let (arg, info) = self.args.get(&a.tensor).cloned().ok_or_else(|| unbound(&a.tensor))?;
            inside.push((a, self.inside(a, &info)?));
            let index = self.index(a);
            loads.push((a.clone(), load(arg, index)));
        }
        let value = scalar(body, &|a: &Access| loads.iter().find(|(b, _)| b == a).map(|(_, v)| v.clone()));
        Ok(value.map(|v| (v, inside)))
    }

    /// The statements that compute `r` over `vars` of `body` into an accumulator, and its
    /// value: a sum or mean (reads outside their tensors count as zero), or a log-sum-exp
    /// (`m + log Σ exp(body − m)` with `m` the maximum, which no term then exceeds).
    fn reduction(&mut self, r: Reduction, vars: &[Var], body: &Expr) -> Result<(Vec<Stmt>, ir::Expr)> {
        let (pre, value) = self.value(body)?;
        let count = vars.iter().map(|v| self.range(v)).collect::<Result<Vec<usize>>>()?.iter().product::<usize>();
        match r {
            Reduction::Sum | Reduction::Mean => {
                let a = self.kb.acc(if r == Reduction::Sum { "sum" } else { "mean" });
                let mut out = vec![set(a, lit(0.0))];
                out.extend(self.vector_nest(vars, [pre, vec![add_to(a, value)]].concat())?);
                let total = if r == Reduction::Sum { acc(a) } else { ir::Expr::div(acc(a), lit(count as f32)) };
                Ok((out, total))
            }
            Reduction::LogSumExp => {
                let (m, sum) = (self.kb.acc("max"), self.kb.acc("sumexp"));
                let mut out = vec![set(m, lit(f32::NEG_INFINITY))];
                out.extend(self.nest(
                    vars,
                    [pre.clone(), vec![set(m, ir::Expr::bin(ir::Binary::Max, acc(m), value.clone()))]].concat(),
                )?);
                out.push(set(sum, lit(0.0)));
                let term = ir::Expr::un(ir::Unary::Exp, ir::Expr::sub(value, acc(m)));
                out.extend(self.vector_nest(vars, [pre, vec![add_to(sum, term)]].concat())?);
                Ok((out, ir::Expr::add(acc(m), ir::Expr::un(ir::Unary::Log, acc(sum)))))
            }
            Reduction::Max => {
                Err(Error::Internal(format!("a maximum inside an expression: max over {vars:?} of {body}")))
            }
        }
    }

    /// Loops over `vars` (the batch for `n`) around `body`, outermost first.
    fn nest(&mut self, vars: &[Var], body: Vec<Stmt>) -> Result<Vec<Stmt>> {
        self.loops(vars, body, false)
    }

    /// [`Builder::nest`] with the innermost loop a vector loop (unless it is the batch's):
    /// the CPU backend runs it on vector lanes where its body allows (a map or a reduction
    /// along unit-stride reads), and as a plain loop otherwise.
    fn vector_nest(&mut self, vars: &[Var], body: Vec<Stmt>) -> Result<Vec<Stmt>> {
        self.loops(vars, body, true)
    }

    fn loops(&mut self, vars: &[Var], body: Vec<Stmt>, vector: bool) -> Result<Vec<Stmt>> {
        let mut body = body;
        for (i, &v) in vars.iter().enumerate().rev() {
            let id = self.var(v);
            // A loop around loops runs as a plain loop: only an innermost loop has lanes.
            let innermost = !body.iter().any(|s| matches!(s, Stmt::Loop(_)));
            body = vec![match v {
                "n" => batch_loop(id, body),
                _ if vector && innermost && i + 1 == vars.len() => vlp(id, self.range(v)?, body),
                _ => lp(id, self.range(v)?, body),
            }];
        }
        Ok(body)
    }
}

/// `stmts` (a reduction's, see [`Builder::reduction`]) after `level`'s statements: where both
/// end in a sum `acc = 0; loops { ..; acc += .. }` over the same loops, one nest computes the
/// two sums (a norm's two row means of its input gradient in one pass over the row). The
/// sums are independent: a reduction inside another's body is computed inside its loops,
/// never beside it.
fn merged(level: &mut Vec<Stmt>, mut stmts: Vec<Stmt>) {
    /// The innermost body of a nest of loops each holding only the next one, and the nest's
    /// headers.
    fn innermost(s: &mut Stmt) -> Option<(Vec<(VarId, ir::Extent, ir::LoopKind)>, &mut Vec<Stmt>)> {
        let Stmt::Loop(l) = s else { return None };
        let header = (l.var, l.extent, l.kind);
        if let [Stmt::Loop(_)] = l.body.as_slice() {
            let (mut headers, body) = innermost(&mut l.body[0])?;
            headers.insert(0, header);
            return Some((headers, body));
        }
        Some((vec![header], &mut l.body))
    }
    let sum = |s: &[Stmt]| matches!(s, [Stmt::Set { value: ir::Expr::Const(c), .. }, Stmt::Loop(_)] if *c == 0.0);
    if sum(&stmts) && level.len() >= 2 && sum(&level[level.len() - 2..]) {
        let (mut new_loop, init) = (stmts.pop(), stmts.pop());
        let last = level.len() - 1;
        if let (Some((ha, body)), Some((hb, more))) =
            (innermost(&mut level[last]), new_loop.as_mut().and_then(innermost))
        {
            if ha == hb {
                body.append(more);
                level.insert(last, init.expect("a sum's initial value"));
                return;
            }
        }
        stmts.extend(init);
        stmts.extend(new_loop);
    }
    level.extend(stmts);
}

/// The tensor under which [`Builder::lift`] stands in a lifted value (not a valid `.pdg`
/// identifier, so it cannot name a tensor of a layer).
const LIFTED: &str = "lifted'";

fn unbound(t: &str) -> Error {
    Error::Internal(format!("tensor `{t}` of an index-notation equation is not bound"))
}

/// A kernel computing `eq`, and the tensors its arguments are, in order (the target last).
/// `info` describes every tensor the equation names; `first`: the kernel is the target's
/// first writer (it overwrites; a scatter, which only adds, zeroes the example's part of its
/// target first).
pub fn equation_kernel(
    name: &str,
    eq: &Equation,
    ranges: &[(Var, usize)],
    info: &dyn Fn(&str) -> Option<TensorInfo>,
    first: bool,
    batching: Batching,
) -> Result<(Kernel, Vec<String>)> {
    build(name, eq, ranges, info, first, batching, None)?
        .ok_or_else(|| Error::Internal(format!("no kernel for the derived equation `{eq}`")))
}

/// A per-example parameter gradient's gather (one that is no matrix product) that also
/// stores the squared norm of each example's gradient in `sqnorm[n, slot]` of `slots`, as
/// it computes the gradient: no second pass over it. With `store`, it stores the gradient
/// too; without, the gradient is never written (the norms are all that is wanted). Returns
/// the kernel and its arguments' tensors (the target where it is stored, then the squared
/// norms, last); `None` for any other equation.
pub fn gather_with_norm(
    name: &str,
    eq: &Equation,
    ranges: &[(Var, usize)],
    info: &dyn Fn(&str) -> Option<TensorInfo>,
    (slot, slots): (usize, usize),
    store: bool,
) -> Result<Option<(Kernel, Vec<String>)>> {
    if !eq.lhs.is_plain() || eq.accumulate {
        return Ok(None);
    }
    if !store {
        // A matrix product's norm is its contraction's to compute, over the stored product.
        let (mut probe, _) = Builder::reading(name, ranges, &[&eq.rhs], info)?;
        let target = info(&eq.lhs.tensor).ok_or_else(|| unbound(&eq.lhs.tensor))?;
        let out = probe.kb.target(&eq.lhs.tensor, batched(&target.shape), true);
        if matrix_product(&mut probe, eq, Batching::PerExample, out, true)?.is_some() {
            return Ok(None);
        }
    }
    build(name, eq, ranges, info, true, Batching::PerExample, Some((slot, slots, store)))
}

/// [`equation_kernel`], and with `norm` the squared norms of [`gather_with_norm`] (the
/// target stored or not): `None` only then, for an equation that is a matrix product (its
/// contraction computes it).
fn build(
    name: &str,
    eq: &Equation,
    ranges: &[(Var, usize)],
    info: &dyn Fn(&str) -> Option<TensorInfo>,
    first: bool,
    batching: Batching,
    norm: Option<(usize, usize, bool)>,
) -> Result<Option<(Kernel, Vec<String>)>> {
    let (mut b, mut tensors) = Builder::reading(name, ranges, &[&eq.rhs], info)?;
    let target = info(&eq.lhs.tensor).ok_or_else(|| unbound(&eq.lhs.tensor))?;
    let overwrite = first && !eq.accumulate;
    let lhs_dims = if batching == Batching::Summed { fixed(&target.shape) } else { batched(&target.shape) };
    if eq.lhs.index.first().and_then(Index::as_var) != Some("n") {
        return Err(Error::Internal(format!("the derived equation `{eq}` is not per example")));
    }
    if let Some((slot, slots, false)) = norm {
        // Only the squared norms: a gather that never writes its target (no argument).
        if !eq.lhs.is_plain() || batching != Batching::PerExample {
            return Ok(None);
        }
        return norm_only(b, tensors, eq, (slot, slots)).map(Some);
    }
    // A scatter's first writer zeroes its target (or stores every element of it) before it
    // adds: it never reads what the target held.
    let fresh = overwrite || (first && !eq.lhs.is_plain() && batching == Batching::PerExample);
    let out = b.kb.target(&eq.lhs.tensor, lhs_dims, fresh);
    tensors.push(eq.lhs.tensor.clone());
    let n = b.var("n");
    // The squared norm's argument, accumulator and store (after every other statement).
    let norm = norm.map(|(slot, slots, _)| {
        tensors.push(SQNORM.to_string());
        let sq = b.kb.output("sqnorm", batched(&[slots]));
        let acc = b.kb.acc("sq");
        (acc, store(sq, vec![v(n), Affine::constant(slot as i64)], ir::Expr::Acc(acc)))
    });
    let square = |acc: ir::AccId, x: &ir::Expr| add_to(acc, ir::Expr::mul(x.clone(), x.clone()));

    if let Some((body, per_example)) = matrix_product(&mut b, eq, batching, out, overwrite)? {
        if norm.is_some() {
            return Ok(None);
        }
        let (grid, extent) = if per_example { (n, Extent::Batch) } else { (b.var("all"), fx(1)) };
        return b.kb.finish(grid, extent, body).map(|k| Some((k, tensors)));
    }
    if eq.lhs.is_plain() {
        // A gather: loop over the target's variables, sum every term, store once. A single
        // term with nothing to sum (a per-example outer product) is stored as it is, so the
        // innermost of the target's loops can be a vector map.
        let kept: Vec<Var> = eq.lhs.index[1..].iter().filter_map(Index::as_var).collect();
        let index = match batching {
            Batching::PerExample => b.index(&eq.lhs),
            Batching::Summed => eq.lhs.index[1..].iter().map(|ix| b.affine(ix)).collect(),
        };
        if batching == Batching::PerExample && norm.is_none() {
            if let Some(body) = reduce_gather(&mut b, eq, out, overwrite)? {
                return b.kb.finish(n, Extent::Batch, body).map(|k| Some((k, tensors)));
            }
        }
        let ts = terms(&eq.rhs);
        if let ([(sum, body)], Batching::PerExample) = (&ts[..], batching) {
            if sum.is_empty() && norm.is_none() {
                if let Some(body) = window_copy(&mut b, eq, out, overwrite, &target.shape)? {
                    return b.kb.finish(n, Extent::Batch, body).map(|k| Some((k, tensors)));
                }
            }
            if sum.is_empty() {
                let (levels, value) = b.value_in(body, &kept)?;
                let mut inner = vec![put(out, index, value.clone(), overwrite)];
                inner.extend(norm.as_ref().map(|(sq, _)| square(*sq, &value)));
                let mut body: Vec<Stmt> = norm.as_ref().map(|(sq, _)| set(*sq, lit(0.0))).into_iter().collect();
                body.extend(b.placed(&kept, levels, inner)?);
                body.extend(norm.map(|(_, store)| store));
                return b.kb.finish(n, Extent::Batch, body).map(|k| Some((k, tensors)));
            }
        }
        if norm.is_some() && batching == Batching::Summed {
            return Err(Error::Internal(format!("a squared norm of a batch-summed gradient: `{eq}`")));
        }
        let acc = b.kb.acc("sum");
        let mut inner = sum_terms(&mut b, &ts, acc, batching)?;
        inner.push(put(out, index, ir::Expr::Acc(acc), overwrite));
        inner.extend(norm.as_ref().map(|(sq, _)| square(*sq, &ir::Expr::Acc(acc))));
        let (grid, extent, loops) = match batching {
            Batching::PerExample => (n, Extent::Batch, kept),
            Batching::Summed => match kept.split_first() {
                Some((g, rest)) => (b.var(g), fx(b.range(g)?), rest.to_vec()),
                None => {
                    let one = b.var("one");
                    (one, fx(1), Vec::new())
                }
            },
        };
        let mut body = Vec::new();
        body.extend(norm.as_ref().map(|(sq, _)| set(*sq, lit(0.0))));
        body.extend(b.nest(&loops, inner)?);
        body.extend(norm.map(|(_, store)| store));
        b.kb.finish(grid, extent, body).map(|k| Some((k, tensors)))
    } else {
        // A scatter: every variable of the equation, adding into the target where it lies
        // inside (its zero padding receives nothing).
        if batching == Batching::Summed {
            return Err(Error::Internal(format!("a scatter into a parameter gradient: `{eq}`")));
        }
        if let Some(body) = first_max_scatter(&mut b, eq, out, first, &target.shape)? {
            return b.kb.finish(n, Extent::Batch, body).map(|k| Some((k, tensors)));
        }
        // The target's first writer zeroes the example's part of it first, in the same kernel.
        let mut body = Vec::new();
        if first {
            body.extend(zeroed(&mut b, out, &target.shape));
        }
        if let Some(copy) = window_copy(&mut b, eq, out, false, &target.shape)? {
            body.extend(copy);
            return b.kb.finish(n, Extent::Batch, body).map(|k| Some((k, tensors)));
        }
        let mut vars: Vec<Var> = Vec::new();
        let mut visit = |a: &Access| {
            for v in a.vars() {
                if v != "n" && !vars.contains(&v) {
                    vars.push(v);
                }
            }
        };
        visit(&eq.lhs);
        for a in crate::grad::layer::reads(&eq.rhs) {
            visit(a);
        }
        let (pre, value) = b.value(&eq.rhs)?;
        let index = b.index(&eq.lhs);
        let guard = b.inside(&eq.lhs, &target)?;
        let store = guarded(guard, vec![accumulate(out, index, value)]);
        body.extend(b.nest(&vars, [pre, store].concat())?);
        b.kb.finish(n, Extent::Batch, body).map(|k| Some((k, tensors)))
    }
}

/// The statements that zero one example's part of a per-example target of `shape`.
fn zeroed(b: &mut Builder, out: ir::ArgId, shape: &[usize]) -> Vec<Stmt> {
    let n = b.var("n");
    let vars: Vec<VarId> = (0..shape.len()).map(|d| b.kb.var(&format!("z{d}"))).collect();
    let index = std::iter::once(v(n)).chain(vars.iter().map(|&x| v(x))).collect();
    vnest(&vars, shape, vec![store(out, index, lit(0.0))])
}

/// Reductions over at most this many taps are unrolled where no tap reads outside its
/// tensor: a max or mean becomes one expression (no loop, no register per tap), and a
/// first-maximum scatter tests tap `i` against the `i` taps before it, so its work grows as
/// the square of the taps.
const UNROLLED_TAPS: usize = 9;

/// Every assignment of values to `vars` in loop order (the last fastest); `None` where
/// there are more than `most`.
#[allow(clippy::type_complexity)]
fn tap_values(b: &Builder, vars: &[Var], most: usize) -> Result<Option<Vec<Vec<(Var, i64)>>>> {
    let mut all: Vec<Vec<(Var, i64)>> = vec![Vec::new()];
    for &var in vars {
        let range = b.range(var)?;
        if all.len() * range > most {
            return Ok(None);
        }
        all = all
            .into_iter()
            .flat_map(|t| {
                (0..range as i64).map(move |k| {
                    let mut t = t.clone();
                    t.push((var, k));
                    t
                })
            })
            .collect();
    }
    Ok(Some(all))
}

/// `a` with each variable of `tap` fixed at its value.
fn pin_access(a: &Access, tap: &[(Var, i64)]) -> Access {
    tap.iter().fold(a.clone(), |a, &(var, k)| a.pinned(var, k))
}

/// `e` with each variable of `tap` fixed at its value.
fn pin(e: &Expr, tap: &[(Var, i64)]) -> Expr {
    e.map(&|a: &Access| pin_access(a, tap), &|var| var)
}

/// Whether every read of `e` stays inside its tensor over the ranges of its variables.
fn reads_inside(b: &mut Builder, e: &Expr) -> Result<bool> {
    for a in crate::grad::layer::reads(e) {
        let (_, info) = b.args.get(&a.tensor).cloned().ok_or_else(|| unbound(&a.tensor))?;
        if !b.inside(a, &info)?.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The window through which the one read of `e` that is not a plain access reads, with its
/// taps among `taps`, as [`window_of`] gives it; `None` where there is no such read.
fn window_read(b: &Builder, e: &Expr, taps: &[Var]) -> Result<Option<(super::window::Window, Vec<Var>, Vec<Var>)>> {
    let reads = crate::grad::layer::reads(e);
    let mut windowed = reads.iter().filter(|a| !a.is_plain());
    let (Some(x), None) = (windowed.next(), windowed.next()) else { return Ok(None) };
    let Some((_, info)) = b.args.get(&x.tensor) else { return Ok(None) };
    if !info.batched || x.index.first().and_then(Index::as_var) != Some("n") {
        return Ok(None);
    }
    window_of(b, x, &info.shape, |t0, t1| match (taps.contains(&t0.var), taps.contains(&t1.var)) {
        (true, false) => Some((t0, t1)),
        (false, true) => Some((t1, t0)),
        _ => None,
    })
}

/// Loops over `kept` around `stmts`, the innermost a vector loop where the CPU backend can
/// run it on lanes: always where the body reads through no window, and by the window rule
/// ([`super::window::lanes`]) where it reads through one whose last output axis is the
/// innermost loop.
fn lanes_nest(b: &mut Builder, kept: &[Var], e: &Expr, taps: &[Var], stmts: Vec<Stmt>) -> Result<Vec<Stmt>> {
    let vector = match window_read(b, e, taps)? {
        None => crate::grad::layer::reads(e).iter().all(|a| a.is_plain()),
        Some((w, _, positions)) => match (kept.last(), positions.last()) {
            (Some(last), Some(pos)) if last == pos => {
                let ol = b.var(last);
                super::window::lanes(&w, ol, &stmts)
            }
            _ => false,
        },
    };
    if vector {
        b.vector_nest(kept, stmts)
    } else {
        b.nest(kept, stmts)
    }
}

/// A per-example gather whose right-hand side is one max or mean over `vars` (a pool's
/// forward `Y[n, c, oh, ow] = max_{kh, kw} X[n, c, 2·oh + kh, 2·ow + kw]`, a global average
/// pool's `Y[n, c] = mean_{h, w} X[n, c, h, w]`), stored once per element of its target. A
/// tap of a max whose reads leave their tensors is skipped (max pooling pads with −∞); a
/// mean counts it as zero (average pooling's count includes the padding). A reduction over
/// few taps ([`UNROLLED_TAPS`]) none of which leaves its tensor is one expression of every
/// tap's value. `None` for any other equation.
fn reduce_gather(b: &mut Builder, eq: &Equation, out: ir::ArgId, overwrite: bool) -> Result<Option<Vec<Stmt>>> {
    let Expr::Reduce(r @ (Reduction::Max | Reduction::Mean), vars, body) = &eq.rhs else { return Ok(None) };
    let max = *r == Reduction::Max;
    let kept: Vec<Var> = eq.lhs.index[1..].iter().filter_map(Index::as_var).collect();
    let index = b.index(&eq.lhs);
    let count = vars.iter().map(|v| b.range(v)).collect::<Result<Vec<usize>>>()?.iter().product::<usize>() as f32;
    if let Some(taps) = tap_values(b, vars, UNROLLED_TAPS)? {
        let bodies: Vec<Expr> = taps.iter().map(|t| pin(body, t)).collect();
        let mut inside = true;
        for e in &bodies {
            inside &= reads_inside(b, e)?;
        }
        if inside {
            let mut values = Vec::new();
            for e in &bodies {
                values.push(b.value(e)?.1);
            }
            let mut values = values.into_iter();
            let first = values.next().ok_or_else(|| Error::Internal(format!("a reduction over nothing: `{eq}`")))?;
            let value = if max {
                values.fold(first, |m, x| ir::Expr::bin(ir::Binary::Max, m, x))
            } else {
                ir::Expr::div(values.fold(first, ir::Expr::add), lit(count))
            };
            let stmts = vec![put(out, index, value, overwrite)];
            return lanes_nest(b, &kept, body, vars, stmts).map(Some);
        }
    }
    let a = b.kb.acc(if max { "max" } else { "mean" });
    let mut inner = vec![set(a, lit(if max { f32::NEG_INFINITY } else { 0.0 }))];
    if max {
        // The taps outside are skipped: the update runs where every read lies inside.
        let (value, inside) = b
            .unguarded(body)?
            .ok_or_else(|| Error::Internal(format!("a maximum the lowering cannot express: {body}")))?;
        let guards = inside.into_iter().flat_map(|(_, g)| g).collect();
        let update = guarded(guards, vec![set(a, ir::Expr::bin(ir::Binary::Max, acc(a), value))]);
        inner.extend(b.nest(vars, update)?);
        inner.push(put(out, index, acc(a), overwrite));
    } else {
        let (pre, value) = b.value(body)?;
        inner.extend(b.vector_nest(vars, [pre, vec![add_to(a, value)]].concat())?);
        inner.push(put(out, index, ir::Expr::div(acc(a), lit(count)), overwrite));
    }
    b.nest(&kept, inner).map(Some)
}

/// The one first-maximum routing `first_max(x, y)` of `e`, as its two reads; `None` where
/// there is none, more than one, or its operands are not reads.
fn first_max_of(e: &Expr) -> Option<(&Access, &Access)> {
    fn visit<'e>(e: &'e Expr, out: &mut Vec<(&'e Expr, &'e Expr)>) {
        match e {
            Expr::FirstMax(x, y) => out.push((x, y)),
            Expr::Mul(items) | Expr::Add(items) | Expr::Apply(_, items) => items.iter().for_each(|x| visit(x, out)),
            Expr::Sub(a, b) | Expr::Div(a, b) => {
                visit(a, out);
                visit(b, out);
            }
            Expr::Select { a, b, then, otherwise, .. } => {
                [a, b, then, otherwise].into_iter().for_each(|x| visit(x, out))
            }
            Expr::Reduce(_, _, body) => visit(body, out),
            Expr::Read(_) | Expr::Num(_) | Expr::Var(_) => {}
        }
    }
    let mut found = Vec::new();
    visit(e, &mut found);
    match found[..] {
        [(Expr::Read(x), Expr::Read(y))] => Some((x, y)),
        _ => None,
    }
}

/// `e` with its first-maximum routing replaced by 1 (the value a tap that takes it adds).
fn routed(e: &Expr) -> Expr {
    match e {
        Expr::FirstMax(..) => Expr::Num(1.0),
        Expr::Mul(items) => {
            let mut items: Vec<Expr> = items.iter().map(routed).filter(|x| *x != Expr::Num(1.0)).collect();
            match items.len() {
                0 => Expr::Num(1.0),
                1 => items.remove(0),
                _ => Expr::Mul(items),
            }
        }
        Expr::Add(items) => Expr::Add(items.iter().map(routed).collect()),
        Expr::Apply(f, items) => Expr::Apply(*f, items.iter().map(routed).collect()),
        Expr::Sub(a, b) => Expr::sub(routed(a), routed(b)),
        Expr::Div(a, b) => Expr::div(routed(a), routed(b)),
        Expr::Select { a, op, b, then, otherwise } => {
            Expr::select(routed(a), *op, routed(b), routed(then), routed(otherwise))
        }
        other => other.clone(),
    }
}

/// A per-example scatter routed through a first maximum (max pooling's backward,
/// `dX[n, c, 2·oh + kh, 2·ow + kw] += dY[n, c, oh, ow] · first_max(X[n, c, 2·oh + kh, 2·ow + kw],
/// Y[n, c, oh, ow])`): `first_max(x, y)` is 1 at the first tap where `x` equals `y` and 0 at
/// every other, the taps being the variables `x` reads and `y` does not, in row-major order
/// (PyTorch's choice among ties). Loops over the other variables, `y`'s first; a tap `x`
/// reads outside its tensor is skipped (the maximum never lies in the padding). Over few
/// taps ([`UNROLLED_TAPS`]) none of which leaves its tensors, the taps are unrolled: tap `i`
/// takes the value where it holds the maximum and no tap before it does; where the windows
/// then tile the target (every element in exactly one) its first writer stores instead of
/// zeroing and adding, and where a tap's writes are vector lanes by the window rule (the
/// windows overlap, stride 1) each tap runs as a loop nest of its own. `None` for any other
/// equation.
fn first_max_scatter(
    b: &mut Builder,
    eq: &Equation,
    out: ir::ArgId,
    first: bool,
    target_shape: &[usize],
) -> Result<Option<Vec<Stmt>>> {
    let Some((x, y)) = first_max_of(&eq.rhs) else { return Ok(None) };
    let y_vars = y.vars();
    let taps: Vec<Var> = x.vars().into_iter().filter(|v| *v != "n" && !y_vars.contains(v)).collect();
    let mut outer: Vec<Var> = y_vars.into_iter().filter(|v| *v != "n").collect();
    for a in std::iter::once(&eq.lhs).chain(crate::grad::layer::reads(&eq.rhs)) {
        for v in a.vars() {
            if v != "n" && !taps.contains(&v) && !outer.contains(&v) {
                outer.push(v);
            }
        }
    }
    let value = routed(&eq.rhs);
    let tap_free = |e: &Expr| crate::grad::layer::reads(e).iter().all(|a| a.vars().iter().all(|v| !taps.contains(v)));
    if taps.is_empty() || !tap_free(&value) || !reads_inside(b, &Expr::Read(y.clone()))? {
        return Ok(None);
    }
    let (x_arg, _) = b.args.get(&x.tensor).cloned().ok_or_else(|| unbound(&x.tensor))?;
    let (y_arg, _) = b.args.get(&y.tensor).cloned().ok_or_else(|| unbound(&y.tensor))?;
    let y_index = b.index(y);
    let ymax = load(y_arg, y_index);
    // `x op max`: whether a tap holds (or does not hold) the maximum.
    let is_max = |xv: &ir::Expr, max: &ir::Expr, op: ir::CmpOp| ir::Cond::Cmp { op, a: xv.clone(), b: max.clone() };
    let target = TensorInfo::unpadded(target_shape.to_vec());
    let g = b.kb.acc("g");
    let (pre, gv) = b.value(&value)?;
    let mut body = Vec::new();

    if let Some(tap_list) = tap_values(b, &taps, UNROLLED_TAPS)? {
        let mut inside = true;
        let mut at = Vec::new();
        for t in &tap_list {
            let (xt, lhs) = (pin(&Expr::Read(x.clone()), t), pin_access(&eq.lhs, t));
            inside &= reads_inside(b, &xt)? && b.inside(&lhs, &target)?.is_empty();
            at.push((xt, lhs));
        }
        if inside {
            let window = window_read(b, &Expr::Read(x.clone()), &taps)?;
            // Each element of the target in exactly one window: its first writer stores.
            let tiles = eq.lhs.index == x.index
                && window.as_ref().is_some_and(|(w, _, _)| w.tiles())
                && x.index[1..].iter().enumerate().all(|(d, ix)| match ix.as_var() {
                    Some(var) => b.range(var).ok() == target_shape.get(d).copied(),
                    None => true,
                });
            let stores = first && tiles;
            if first && !stores {
                body.extend(zeroed(b, out, target_shape));
            }
            let mut xs = Vec::new();
            for (xt, _) in &at {
                xs.push(b.value(xt)?.1);
            }
            // Tap `i` adds `value` where it takes the gradient: where it holds the maximum
            // `ymax` and no tap before it does (`xs` the taps' values).
            let per_tap = |b: &mut Builder, xs: &[ir::Expr], ymax: &ir::Expr, value: &ir::Expr| -> Vec<Stmt> {
                let taken = |i: usize| {
                    let mut conds = vec![is_max(&xs[i], ymax, ir::CmpOp::Eq)];
                    conds.extend(xs[..i].iter().map(|e| is_max(e, ymax, ir::CmpOp::Ne)));
                    if conds.len() == 1 {
                        conds.remove(0)
                    } else {
                        ir::Cond::And(conds)
                    }
                };
                let route = |i: usize| ir::Expr::select(taken(i), value.clone(), lit(0.0));
                at.iter().enumerate().map(|(i, (_, lhs))| put(out, b.index(lhs), route(i), stores)).collect()
            };
            let lanes = match (&window, outer.last()) {
                (Some((w, _, positions)), Some(last)) if pre.is_empty() && positions.last() == Some(last) => {
                    let ol = b.var(last);
                    super::window::lanes(w, ol, &per_tap(b, &xs, &ymax, &gv))
                }
                _ => false,
            };
            if lanes {
                for s in per_tap(b, &xs, &ymax, &gv) {
                    body.extend(b.vector_nest(&outer, vec![s])?);
                }
                return Ok(Some(body));
            }
            // One element at a time: each tap's value and the maximum are read once (the
            // conditions compare each with the maximum up to once per tap after it).
            let mut inner = pre;
            inner.push(set(g, gv));
            let m = b.kb.acc("ymax");
            inner.push(set(m, ymax.clone()));
            let mut read = Vec::with_capacity(xs.len());
            for (i, xv) in xs.iter().enumerate() {
                let t = b.kb.acc(&format!("x{i}"));
                inner.push(set(t, xv.clone()));
                read.push(acc(t));
            }
            inner.extend(per_tap(b, &read, &acc(m), &acc(g)));
            body.extend(b.nest(&outer, inner)?);
            return Ok(Some(body));
        }
    }
    if first {
        body.extend(zeroed(b, out, target_shape));
    }
    // Every tap in order, a flag marking that the maximum was found.
    let found = b.kb.acc("found");
    let xv = load(x_arg, b.index(x));
    let take = ir::Cond::And(vec![
        is_max(&xv, &ymax, ir::CmpOp::Eq),
        ir::Cond::Cmp { op: ir::CmpOp::Eq, a: acc(found), b: lit(0.0) },
    ]);
    let seen = ir::Expr::select(is_max(&xv, &ymax, ir::CmpOp::Eq), lit(1.0), lit(0.0));
    let index = b.index(&eq.lhs);
    let mut guards = b.inside(&eq.lhs, &target)?;
    let (_, x_info) = b.args.get(&x.tensor).cloned().ok_or_else(|| unbound(&x.tensor))?;
    for g in b.inside(x, &x_info)? {
        if !guards.contains(&g) {
            guards.push(g);
        }
    }
    let update = guarded(
        guards,
        vec![
            accumulate(out, index, ir::Expr::select(take, acc(g), lit(0.0))),
            set(found, ir::Expr::bin(ir::Binary::Max, acc(found), seen)),
        ],
    );
    let mut inner = pre;
    inner.extend([set(found, lit(0.0)), set(g, gv)]);
    inner.extend(b.nest(&taps, update)?);
    body.extend(b.nest(&outer, inner)?);
    Ok(Some(body))
}

/// `acc = 0`, then every term of a gather summed into `acc` at one element of its target:
/// a window sum on split rows ([`window_sum`], per example), else a loop nest over the
/// term's summed variables (and the batch, for a batch-summed gradient).
fn sum_terms(b: &mut Builder, ts: &[(Vec<Var>, &Expr)], acc: ir::AccId, batching: Batching) -> Result<Vec<Stmt>> {
    let mut out = vec![set(acc, lit(0.0))];
    for (sum, body) in ts {
        if batching == Batching::PerExample {
            if let Some(rows) = window_sum(b, sum, body, acc)? {
                out.extend(rows);
                continue;
            }
        }
        let (pre, value) = b.value(body)?;
        let mut vars = sum.clone();
        if batching == Batching::Summed {
            vars.insert(0, "n");
        }
        out.extend(b.vector_nest(&vars, [pre, vec![add_to(acc, value)]].concat())?);
    }
    Ok(out)
}

/// A per-example gather's squared norm into `sqnorm[n, slot]` of `slots`, the gradient
/// computed element by element as [`build`]'s gather does (window sums on split rows) and
/// never stored: the kernel of the norms when only the norms are wanted.
fn norm_only(
    mut b: Builder,
    mut tensors: Vec<String>,
    eq: &Equation,
    (slot, slots): (usize, usize),
) -> Result<(Kernel, Vec<String>)> {
    let n = b.var("n");
    tensors.push(SQNORM.to_string());
    let sqnorm = b.kb.output("sqnorm", batched(&[slots]));
    let sq = b.kb.acc("sq");
    let kept: Vec<Var> = eq.lhs.index[1..].iter().filter_map(Index::as_var).collect();
    let ts = terms(&eq.rhs);
    if let [(sum, body)] = &ts[..] {
        if sum.is_empty() {
            // Nothing to sum (an outer product): each element squared as the gather that
            // stores it computes it, on the same vector lanes, so both give the same norm.
            let (levels, value) = b.value_in(body, &kept)?;
            let mut body = vec![set(sq, lit(0.0))];
            body.extend(b.placed(&kept, levels, vec![add_to(sq, ir::Expr::mul(value.clone(), value))])?);
            body.push(store(sqnorm, vec![v(n), Affine::constant(slot as i64)], ir::Expr::Acc(sq)));
            return b.kb.finish(n, Extent::Batch, body).map(|k| (k, tensors));
        }
    }
    let acc = b.kb.acc("sum");
    let mut inner = sum_terms(&mut b, &ts, acc, Batching::PerExample)?;
    inner.push(add_to(sq, ir::Expr::mul(ir::Expr::Acc(acc), ir::Expr::Acc(acc))));
    let mut body = vec![set(sq, lit(0.0))];
    body.extend(b.nest(&kept, inner)?);
    body.push(store(sqnorm, vec![v(n), Affine::constant(slot as i64)], ir::Expr::Acc(sq)));
    b.kb.finish(n, Extent::Batch, body).map(|k| (k, tensors))
}

/// A copy through a window: im2col's gather `cols'[n, V..] = X[n, window]` or col2im's
/// scatter `X[n, window] += cols'[n, V..]`, where each index of `X` is a plain variable or
/// a window `s·o + d·k − p` of two variables (no other terms, `p ≥ 0`), and the plain side
/// runs over its variables in the order: the others, then of each window the variable it runs
/// first (taken as the tap `k`), then of each window the other one (the output position `o`),
/// windows in `X`'s axis order.
/// Lowered by [`window_nest`]: inside the input no bounds guard per element and, where the
/// stride is 1, a vector loop along the innermost position; only the edges check their
/// guards. (A gather that is its target's first writer stores zeros where the window reads
/// padding.) `None` for any other equation; `target_shape` is the per-example shape of the
/// target.
fn window_copy(
    b: &mut Builder,
    eq: &Equation,
    out: ir::ArgId,
    overwrite: bool,
    target_shape: &[usize],
) -> Result<Option<Vec<Stmt>>> {
    let Expr::Read(read) = &eq.rhs else { return Ok(None) };
    let (plain, windowed) = if eq.accumulate { (read, &eq.lhs) } else { (&eq.lhs, read) };
    if !plain.is_plain() || windowed.is_plain() || windowed.index.first().and_then(Index::as_var) != Some("n") {
        return Ok(None);
    }
    let shape = if eq.accumulate {
        target_shape.to_vec()
    } else {
        match b.args.get(&windowed.tensor) {
            Some((_, info)) if info.batched => info.shape.clone(),
            _ => return Ok(None),
        }
    };
    let Some(vars) = plain_vars(plain, true) else { return Ok(None) };
    let position = |v: Var| vars.iter().position(|u| *u == v);
    // Of each window axis's two variables, the one the plain side runs first is the tap.
    let Some((w, taps, positions)) = window_of(b, windowed, &shape, |t0, t1| {
        let (p0, p1) = (position(t0.var)?, position(t1.var)?);
        Some(if p0 < p1 { (t0, t1) } else { (t1, t0) })
    })?
    else {
        return Ok(None);
    };
    let others: Vec<Var> = vars.iter().copied().filter(|v| !taps.contains(v) && !positions.contains(v)).collect();
    if [others.clone(), taps.clone(), positions.clone()].concat() != vars {
        return Ok(None);
    }
    let other_ids: Vec<VarId> = others.iter().map(|v| b.var(v)).collect();
    let extents = others.iter().map(|v| b.range(v)).collect::<Result<Vec<usize>>>()?;
    let tap_ids: Vec<VarId> = taps.iter().map(|v| b.var(v)).collect();
    let pos_ids: Vec<VarId> = positions.iter().map(|v| b.var(v)).collect();
    let (arg, _) = b.args.get(&read.tensor).cloned().ok_or_else(|| unbound(&read.tensor))?;
    let (target, source) = (b.index(&eq.lhs), b.index(read));
    let (inside, outside) = if eq.accumulate {
        (vec![accumulate(out, target, load(arg, source))], Vec::new())
    } else {
        let zeros = if overwrite { vec![store(out, target.clone(), lit(0.0))] } else { Vec::new() };
        (vec![put(out, target, load(arg, source), overwrite)], zeros)
    };
    Ok(Some(nest(&other_ids, &extents, super::window::window_nest(&w, &tap_ids, &pos_ids, inside, outside))))
}

/// The window through which `windowed` (a batched access; `shape` its tensor's per-example
/// shape) reads: each of its indices is a plain variable that stays inside its dim, or
/// `s·o + d·k − p` of two variables (`s, d > 0`, `p ≥ 0`), which `tap_first` orders as
/// (the tap `k`, the output position `o`) or refuses. Returns the window and its taps' and
/// positions' variables, in the axis order of `windowed`; `None` for any other access or
/// where it has no window axis.
fn window_of<'t>(
    b: &Builder,
    windowed: &'t Access,
    shape: &[usize],
    tap_first: impl Fn(&'t Term, &'t Term) -> Option<(&'t Term, &'t Term)>,
) -> Result<Option<(super::window::Window, Vec<Var>, Vec<Var>)>> {
    // Each window axis: (its dim of X, the tap, the position, the padding).
    let mut axes = Vec::new();
    for (d, ix) in windowed.index[1..].iter().enumerate() {
        if ix.as_var().is_some() {
            let (lo, hi) = b.bounds(ix)?;
            if lo < 0 || hi >= shape[d] as i64 {
                return Ok(None);
            }
            continue;
        }
        let [t0, t1] = &ix.terms[..] else { return Ok(None) };
        if t0.div != 1 || t1.div != 1 || t0.coef <= 0 || t1.coef <= 0 || ix.offset > 0 {
            return Ok(None);
        }
        let Some((tap, pos)) = tap_first(t0, t1) else { return Ok(None) };
        axes.push((d, tap, pos, -ix.offset));
    }
    if axes.is_empty() {
        return Ok(None);
    }
    let mut w = super::window::Window {
        input: Vec::new(),
        output: Vec::new(),
        kernel: Vec::new(),
        stride: Vec::new(),
        pad_lo: Vec::new(),
        pad_hi: Vec::new(),
        dilation: Vec::new(),
    };
    for (d, tap, pos, pad) in &axes {
        let (input, output, kernel) = (shape[*d] as i64, b.range(pos.var)? as i64, b.range(tap.var)? as i64);
        let last = (output - 1) * pos.coef + (kernel - 1) * tap.coef - pad;
        w.input.push(input as usize);
        w.output.push(output as usize);
        w.kernel.push(kernel as usize);
        w.stride.push(pos.coef as usize);
        w.dilation.push(tap.coef as usize);
        w.pad_lo.push(*pad as usize);
        w.pad_hi.push((last - (input - 1)).max(0) as usize);
    }
    let taps = axes.iter().map(|a| a.1.var).collect();
    let positions = axes.iter().map(|a| a.2.var).collect();
    Ok(Some((w, taps, positions)))
}

/// The one factor of a product read through an index that is not a plain variable (the
/// windowed read); `None` where there is none or more than one.
fn window_factor(factors: &[Expr]) -> Option<&Access> {
    let mut windowed = factors.iter().filter_map(|f| match f {
        Expr::Read(a) if !a.is_plain() => Some(a),
        _ => None,
    });
    match (windowed.next(), windowed.next()) {
        (Some(x), None) => Some(x),
        _ => None,
    }
}

/// A gather's term `Σ_{sum} F · X[n, window]` that sums a product over the output positions
/// of the window one factor reads (a conv's weight gradient run directly, with no columns:
/// `dW[n, co, ci, kh, kw] = Σ_{oh, ow} dY[n, co, oh, ow] · X[n, ci, oh + kh − 1, ow + kw − 1]`),
/// added into `acc`: the taps are the target's variables (bound by enclosing loops), the
/// summed variables exactly the positions, and every other read stays inside its tensor.
/// Lowered by [`window_rows`]: no guard per element inside the input, the padding adds
/// nothing. `None` for any other term.
fn window_sum(b: &mut Builder, sum: &[Var], body: &Expr, acc: ir::AccId) -> Result<Option<Vec<Stmt>>> {
    let Expr::Mul(factors) = body else { return Ok(None) };
    let Some(x) = window_factor(factors) else { return Ok(None) };
    let Some((_, info)) = b.args.get(&x.tensor).cloned() else { return Ok(None) };
    if !info.batched || x.index.first().and_then(Index::as_var) != Some("n") {
        return Ok(None);
    }
    let summed = |v: Var| sum.contains(&v);
    let Some((w, taps, positions)) = window_of(b, x, &info.shape, |t0, t1| match (summed(t0.var), summed(t1.var)) {
        (false, true) => Some((t0, t1)),
        (true, false) => Some((t1, t0)),
        _ => None,
    })?
    else {
        return Ok(None);
    };
    if positions != sum {
        return Ok(None);
    }
    let Some((value, inside)) = b.unguarded(body)? else { return Ok(None) };
    if inside.iter().any(|(a, g)| *a != x && !g.is_empty()) {
        return Ok(None);
    }
    let tap_ids: Vec<VarId> = taps.iter().map(|v| b.var(v)).collect();
    let pos_ids: Vec<VarId> = positions.iter().map(|v| b.var(v)).collect();
    Ok(Some(super::window::window_rows(&w, &tap_ids, &pos_ids, vec![add_to(acc, value)], Vec::new())))
}

/// The workspace of [`crb_kernels`] in the equations it makes (not a valid `.pdg`
/// identifier, so it cannot name a tensor of the layer).
pub const CRB_FULL: &str = "crb_full'";

/// crb (Rochette et al. 2019) as a schedule of a derived per-example gradient that sums a
/// product over a window's output positions (`dW[n, .., k..] = Σ_o F · X[n, .., s·o + d·k − p]`,
/// see `window_sum`): the same equation over every tap position the padded input admits
/// (`positions`, one per window axis, each at least the kernel) — the seed paper's
/// convolution of X by dY with stride and dilation swapped — into the workspace
/// [`CRB_FULL`], then the kernel-sized corner of it copied into the gradient. Returns the
/// two kernels with the tensors of their arguments, and the workspace's per-example shape;
/// `None` where `eq` is no such product.
#[allow(clippy::type_complexity)]
pub fn crb_kernels(
    name: &str,
    eq: &Equation,
    ranges: &[(Var, usize)],
    info: &dyn Fn(&str) -> Option<TensorInfo>,
    positions: &[usize],
) -> Result<Option<(Vec<(Kernel, Vec<String>)>, Vec<usize>)>> {
    let ts = terms(&eq.rhs);
    let ([(sum, Expr::Mul(factors))], false) = (&ts[..], eq.accumulate) else { return Ok(None) };
    let Some(x) = window_factor(factors) else { return Ok(None) };
    // Each window axis's tap: the variable of its index that is not summed.
    let mut taps = Vec::new();
    for ix in x.index.iter().skip(1).filter(|ix| ix.as_var().is_none()) {
        let [t0, t1] = &ix.terms[..] else { return Ok(None) };
        match (sum.contains(&t0.var), sum.contains(&t1.var)) {
            (false, true) => taps.push(t0.var),
            (true, false) => taps.push(t1.var),
            _ => return Ok(None),
        }
    }
    let target = info(&eq.lhs.tensor).ok_or_else(|| unbound(&eq.lhs.tensor))?;
    let lhs_vars: Vec<Option<Var>> = eq.lhs.index.iter().skip(1).map(Index::as_var).collect();
    if taps.len() != positions.len() || !taps.iter().all(|t| lhs_vars.contains(&Some(*t))) {
        return Ok(None);
    }
    let extended = |v: Var| taps.iter().position(|t| *t == v).map(|i| positions[i]);
    let full_shape: Vec<usize> =
        lhs_vars.iter().zip(&target.shape).map(|(v, d)| v.and_then(extended).unwrap_or(*d)).collect();
    let wide: Vec<(Var, usize)> = ranges.iter().map(|(v, r)| (*v, extended(v).unwrap_or(*r))).collect();
    let info = |t: &str| match t {
        CRB_FULL => Some(TensorInfo::unpadded(full_shape.clone())),
        _ => info(t),
    };
    let full = Access { tensor: CRB_FULL.to_string(), index: eq.lhs.index.clone() };
    let conv = Equation { lhs: full.clone(), accumulate: false, rhs: eq.rhs.clone() };
    let corner = Equation { lhs: eq.lhs.clone(), accumulate: false, rhs: Expr::Read(full) };
    let conv = equation_kernel(&format!("{name}_conv"), &conv, &wide, &info, true, Batching::PerExample)?;
    let corner = equation_kernel(&format!("{name}_truncate"), &corner, ranges, &info, true, Batching::PerExample)?;
    Ok(Some((vec![conv, corner], full_shape)))
}

/// How [`matrix_product`] covers the batch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// One contraction over the whole batch: `n` is the rows (per example) or the summed
    /// dimension (a batch-summed gradient).
    Flat,
    /// Per example, the grid over `n`: one contraction of the example's rows.
    PerExample,
    /// Summed over the batch, in one grid iteration: each example's contraction over its
    /// own summed variable added into the target in turn.
    Summed,
}

/// A gather that is a matrix product, as contraction nodes (so the CPU backend runs it on
/// its tuned GEMM), after the equation's other terms where it has some (a bias, per example
/// only): a term that is the product of two reads by plain variables that never leave their
/// tensors, with one variable on each side of the product and one summed. The batch index
/// `n` is a product dimension (per example: the rows of `C[n, q] = Σ_k A[n, k]·B[k, q]`) or
/// the summed one (a batch-summed parameter gradient `C[p, q] = Σ_n A[n, p]·B[n, q]`), both
/// one contraction over the whole batch; where the target has rows of its own
/// (`C[n, t, q] = Σ_k A[n, t, k]·B[k, q]`, or summed `C[p, q] = Σ_n Σ_t A[n, t, p]·B[n, t, q]`)
/// one contraction per example. Returns the body and whether its grid is the batch; `None`
/// for any other equation.
fn matrix_product(
    b: &mut Builder<'_>,
    eq: &Equation,
    batching: Batching,
    out: ir::ArgId,
    overwrite: bool,
) -> Result<Option<(Vec<Stmt>, bool)>> {
    let ts = terms(&eq.rhs);
    // The product term, and the others (a bias), which are added first when there are any.
    let is_product = |(sum, body): &(Vec<Var>, &Expr)| sum.len() <= 1 && matches!(body, Expr::Mul(f) if f.len() == 2);
    let Some(at) = ts.iter().position(is_product) else { return Ok(None) };
    let (sum, body) = &ts[at];
    let rest: Vec<&Expr> = ts.iter().enumerate().filter(|(i, _)| *i != at).map(|(_, (_, e))| *e).collect();
    if !rest.is_empty()
        && (batching != Batching::PerExample || ts.iter().enumerate().any(|(i, t)| i != at && !t.0.is_empty()))
    {
        return Ok(None);
    }
    let Expr::Mul(factors) = body else { return Ok(None) };
    let [Expr::Read(x), Expr::Read(y)] = &factors[..] else { return Ok(None) };
    let plain_vars = |a: &Access| -> Option<Vec<Var>> {
        let vars: Vec<Var> = a.index.iter().map(Index::as_var).collect::<Option<_>>()?;
        let distinct = vars.iter().enumerate().all(|(i, v)| !vars[..i].contains(v));
        distinct.then_some(vars)
    };
    let (Some(xv), Some(yv), Some(lv)) = (plain_vars(x), plain_vars(y), plain_vars(&eq.lhs)) else { return Ok(None) };
    // The three product variables (rows, columns, summed), by batching.
    let (rows, cols, k, mode) = match (batching, &lv[1..], &sum[..]) {
        (Batching::PerExample, [q], [k]) => ("n", *q, *k, Rows::Flat),
        (Batching::Summed, [p, q], []) => (*p, *q, "n", Rows::Flat),
        (Batching::PerExample, [r, q], [k]) => (*r, *q, *k, Rows::PerExample),
        (Batching::Summed, [p, q], [t]) => (*p, *q, *t, Rows::Summed),
        _ => return Ok(None),
    };
    // Which read holds the rows (the other holds the columns); both hold the summed one.
    // Per example, either may also be read at the example's own `n`, its first index.
    let own = |vars: &[Var]| -> Option<Vec<Var>> {
        match (mode, vars.first()) {
            (Rows::Flat, _) => Some(vars.to_vec()),
            (_, Some(&"n")) => Some(vars[1..].to_vec()),
            _ => (!vars.contains(&"n")).then(|| vars.to_vec()),
        }
    };
    let (Some(xv), Some(yv)) = (own(&xv), own(&yv)) else { return Ok(None) };
    let side =
        |vars: &[Var], own: Var| vars.iter().all(|v| *v == own || *v == k) && vars.contains(&k) && vars.contains(&own);
    let (a, bb) = if side(&xv, rows) && side(&yv, cols) {
        (x, y)
    } else if side(&yv, rows) && side(&xv, cols) {
        (y, x)
    } else {
        return Ok(None);
    };
    for r in [a, bb] {
        let (_, info) = b.args.get(&r.tensor).cloned().ok_or_else(|| unbound(&r.tensor))?;
        if !b.inside(r, &info)?.is_empty() {
            return Ok(None);
        }
    }
    let extent = |b: &Builder<'_>, v: Var| -> Result<Extent> {
        if v == "n" {
            Ok(Extent::Batch)
        } else {
            Ok(fx(b.range(v)?))
        }
    };
    let extents = [extent(b, rows)?, extent(b, cols)?, extent(b, k)?];
    let (arg_a, arg_b) = (b.args[&a.tensor].0, b.args[&bb.tensor].0);
    let (ai, bi) = (a.index.clone(), bb.index.clone());
    let ci: Vec<Index> = match batching {
        Batching::PerExample => eq.lhs.index.clone(),
        Batching::Summed => eq.lhs.index[1..].to_vec(),
    };
    let example = b.var("n");
    let at = |ix: &[Index], m: VarId, nn: VarId, kk: VarId| -> Vec<Affine> {
        ix.iter()
            .map(|i| {
                let v = i.as_var().expect("plain");
                Affine::var(if v == rows {
                    m
                } else if v == cols {
                    nn
                } else if v == k {
                    kk
                } else {
                    example
                })
            })
            .collect()
    };
    let mut body = Vec::new();
    if !rest.is_empty() {
        // C = the other terms, then C += the product.
        let (pre, value) = b.value(&Expr::Add(rest.into_iter().cloned().collect()))?;
        let index = b.index(&eq.lhs);
        let vars: Vec<Var> = if mode == Rows::Flat { vec!["n", cols] } else { vec![rows, cols] };
        let fill = b.nest(&vars, [pre, vec![put(out, index, value, overwrite)]].concat())?;
        body.extend(fill);
    }
    if mode == Rows::Summed && overwrite {
        let index = ci.iter().map(|ix| b.affine(ix)).collect();
        body.extend(b.nest(&[rows, cols], vec![put(out, index, lit(0.0), true)])?);
    }
    let accumulate = !overwrite || !body.is_empty();
    let product = contract(&mut b.kb, extents, (arg_a, arg_b, out), accumulate, |m, nn, kk| {
        (at(&ai, m, nn, kk), at(&bi, m, nn, kk), at(&ci, m, nn, kk))
    });
    body.push(if mode == Rows::Summed { batch_loop(example, vec![product]) } else { product });
    Ok(Some((body, mode == Rows::PerExample)))
}

/// The tag, in a kernel's list of tensors, of its per-example squared norms (the `sqnorm`
/// argument, bound to the norm-parts buffer; not a valid `.pdg` identifier, so a layer's
/// tensor cannot take its place).
pub const SQNORM: &str = "sqnorm'";

/// The name under which a window product's im2col columns enter its equations (not a valid
/// `.pdg` identifier, so it cannot name a tensor of the layer).
pub const COLUMNS: &str = "cols'";

/// An equation that reads or writes a tensor through a window (an affine index, as a
/// convolution's `x[c, h + i - 1, w + j - 1]`) in a product with tensors read by plain
/// variables, lowered as a convolution is: im2col columns `cols'` and one contraction per
/// example of flattened views (`C[M × N] (+)= A[M × K] · B[K × N]`).
///
/// - A gather `T[n, R.., C..] = Σ_K P[(n,) R.., K..] · X[n, window(K, C)] (+ bias[R..])`
///   (a conv's forward pass, its per-example weight gradient): the columns
///   `cols'[n, K.., C..] = X[n, window]` first (an ordinary gather, reading the padding under
///   guards), then `T = P · cols'`.
/// - A scatter `X[n, window(R, C)] += P[R.., K..] · Q[n, K.., C..]`, every variable summed (a
///   conv's input gradient, `P` read as `[K × M]`): first `cols'[n, R.., C..] = Pᵀ · Q`, then
///   the scatter of the columns through the window (`col2im`).
///
/// Variables that lead every access of the product (after `n`) as plain indices are its
/// groups `G..` (a grouped conv's group, see `grad::grouped_view`): one product per group,
/// the columns `cols'[n, G.., ..]`.
#[derive(Debug, Clone)]
pub struct WindowProduct {
    /// The gather of the columns before the contraction, or `None`.
    pub before: Option<Equation>,
    /// The scatter of the columns after the contraction, or `None`.
    pub after: Option<Equation>,
    /// The columns' per-example shape.
    pub columns_shape: Vec<usize>,
    pub gemm: FlatGemm,
}

/// `c[n, g, m, t] (+)= Σ_k a[(n,) g, m, k] · b[(n,) g, k, t]` over flattened views of
/// `M × K`, `K × N` and `M × N` elements per group `g` (a grouped conv's groups; without
/// groups, `G = 1` and the views have no group dim), after `c = bias[g, m]` where there is
/// a bias.
#[derive(Debug, Clone)]
pub struct FlatGemm {
    /// `M`, `K`, `N`.
    pub dims: [usize; 3],
    /// `G`: one product per group (`1`: none).
    pub groups: usize,
    pub a: String,
    /// `a` is stored `[K, M]` (read transposed).
    pub a_transposed: bool,
    pub b: String,
    /// `b` is stored `[N, K]` (read transposed).
    pub b_transposed: bool,
    pub c: String,
    pub bias: Option<String>,
}

/// The window-product form of `eq` (see [`WindowProduct`]), or `None`.
pub fn window_product(
    eq: &Equation,
    ranges: &[(Var, usize)],
    info: &dyn Fn(&str) -> Option<TensorInfo>,
) -> Option<WindowProduct> {
    if eq.lhs.index.first()?.as_var() != Some("n") {
        return None;
    }
    if eq.accumulate {
        scatter_window(eq, ranges, info)
    } else {
        gather_window(eq, ranges, info)
    }
}

/// The variables of an access through a window after its batch index, in im2col's order:
/// those of its plain indices, then each window's second variable (written `h + i`, its
/// tap `i`), then each window's first (its output position `h`), in axis order.
fn window_order(x: &Access) -> Vec<Var> {
    let dims = &x.index[1..];
    let mut out: Vec<Var> = dims.iter().filter_map(Index::as_var).collect();
    for pick in [1, 0] {
        out.extend(dims.iter().filter(|ix| ix.terms.len() == 2).map(|ix| ix.terms[pick].var));
    }
    out
}

/// The plain variables of `a` after the batch index (where `batched`), if it has one.
fn plain_vars(a: &Access, batched: bool) -> Option<Vec<Var>> {
    if batched && a.index.first()?.as_var() != Some("n") {
        return None;
    }
    a.index.iter().skip(usize::from(batched)).map(Index::as_var).collect()
}

/// The groups of a product (see [`WindowProduct`]): the longest run of variables that
/// leads each of `lists` and the indices `x` as plain indices.
fn group_prefix(lists: &[&[Var]], x: &[Index]) -> Vec<Var> {
    let mut out = Vec::new();
    for (i, ix) in x.iter().enumerate() {
        match ix.as_var() {
            Some(v) if lists.iter().all(|l| l.get(i) == Some(&v)) => out.push(v),
            _ => break,
        }
    }
    out
}

/// Whether `vars` index every element of a tensor of `shape` once, in order.
fn covers(vars: &[Var], shape: &[usize], ranges: &[(Var, usize)]) -> bool {
    let range = |v: &Var| ranges.iter().find(|(u, _)| u == v).map(|(_, r)| *r);
    vars.len() == shape.len() && vars.iter().zip(shape).all(|(v, d)| range(v) == Some(*d))
}

fn sizes(vars: &[Var], ranges: &[(Var, usize)]) -> Option<Vec<usize>> {
    vars.iter().map(|v| ranges.iter().find(|(u, _)| u == v).map(|(_, r)| *r)).collect()
}

fn gather_window(
    eq: &Equation,
    ranges: &[(Var, usize)],
    info: &dyn Fn(&str) -> Option<TensorInfo>,
) -> Option<WindowProduct> {
    if !eq.lhs.is_plain() {
        return None;
    }
    let ts = terms(&eq.rhs);
    let at = ts.iter().position(|(sum, body)| !sum.is_empty() && matches!(body, Expr::Mul(f) if f.len() == 2))?;
    let (sum, body) = &ts[at];
    let Expr::Mul(factors) = body else { return None };
    let [Expr::Read(f0), Expr::Read(f1)] = &factors[..] else { return None };
    let (p, x) = match (f0.is_plain(), f1.is_plain()) {
        (true, false) => (f0, f1),
        (false, true) => (f1, f0),
        _ => return None,
    };
    let (pi, xi) = (info(&p.tensor)?, info(&x.tensor)?);
    if !xi.batched || x.index.first()?.as_var() != Some("n") {
        return None;
    }
    let p_all = plain_vars(p, pi.batched)?;
    let lhs_all = plain_vars(&eq.lhs, true)?;
    let groups = group_prefix(&[&p_all, &lhs_all], &x.index[1..]);
    let (p_vars, lhs) = (p_all[groups.len()..].to_vec(), lhs_all[groups.len()..].to_vec());
    let x_vars: Vec<Var> = x.index[1 + groups.len()..].iter().flat_map(Index::vars).collect();
    let rows: Vec<Var> = lhs.iter().copied().filter(|v| p_vars.contains(v) && !x_vars.contains(v)).collect();
    let cols: Vec<Var> = lhs.iter().copied().filter(|v| x_vars.contains(v) && !p_vars.contains(v)).collect();
    // The flattened views must be row-major matrices: P = [rows.., sum..], T = [rows.., cols..],
    // every variable covering its whole dim, and X reading nothing else. Per group, a
    // product may have one row (a depthwise conv's channel is its group and its row).
    if (rows.is_empty() && groups.is_empty())
        || cols.is_empty()
        || [rows.clone(), sum.clone()].concat() != p_vars
        || [rows.clone(), cols.clone()].concat() != lhs
        || !covers(&p_all, &pi.shape, ranges)
        || !covers(&lhs_all, &info(&eq.lhs.tensor)?.shape, ranges)
        || !x_vars.iter().all(|v| sum.contains(v) || cols.contains(v))
    {
        return None;
    }
    // Other terms: at most one bias, read by the row variables alone.
    let mut bias = None;
    for (i, (s, e)) in ts.iter().enumerate() {
        if i == at {
            continue;
        }
        match e {
            Expr::Read(b) if s.is_empty() && bias.is_none() && !info(&b.tensor)?.batched => {
                if plain_vars(b, false)? != [groups.clone(), rows.clone()].concat() {
                    return None;
                }
                bias = Some(b.tensor.clone());
            }
            _ => return None,
        }
    }
    let product = |vars: &[Var]| sizes(vars, ranges).map(|s| s.iter().product::<usize>());
    let dims = [product(&rows)?, product(sum)?, product(&cols)?];
    // The columns in the window's own order where the product allows (read transposed
    // where the window's positions are summed, as in a weight gradient), so that every
    // equation reading `x` through this window gathers the same columns.
    let own = window_order(x);
    let b_transposed = own == [groups.clone(), cols.clone(), sum.clone()].concat();
    let col_vars: Vec<Var> = if b_transposed {
        std::iter::once("n").chain(own).collect()
    } else {
        [&["n"][..], &groups, sum, &cols].concat()
    };
    Some(WindowProduct {
        before: Some(Equation { lhs: Access::new(COLUMNS, &col_vars), accumulate: false, rhs: Expr::Read(x.clone()) }),
        after: None,
        columns_shape: sizes(&col_vars[1..], ranges)?,
        gemm: FlatGemm {
            dims,
            groups: product(&groups)?,
            a: p.tensor.clone(),
            a_transposed: false,
            b: COLUMNS.to_string(),
            b_transposed,
            c: eq.lhs.tensor.clone(),
            bias,
        },
    })
}

fn scatter_window(
    eq: &Equation,
    ranges: &[(Var, usize)],
    info: &dyn Fn(&str) -> Option<TensorInfo>,
) -> Option<WindowProduct> {
    if eq.lhs.is_plain() {
        return None;
    }
    let Expr::Mul(factors) = &eq.rhs else { return None };
    let [Expr::Read(f0), Expr::Read(f1)] = &factors[..] else { return None };
    let (i0, i1) = (info(&f0.tensor)?, info(&f1.tensor)?);
    // `P` (not batched, read `[K.., R..]`) and `Q` (batched, read `[n, K.., C..]`).
    let ((p, _), (q, qi)) = match (i0.batched, i1.batched) {
        (false, true) => ((f0, i0), (f1, i1)),
        (true, false) => ((f1, i1), (f0, i0)),
        _ => return None,
    };
    let (p_all, q_all) = (plain_vars(p, false)?, plain_vars(q, true)?);
    let groups = group_prefix(&[&p_all, &q_all], &eq.lhs.index[1..]);
    let (p_vars, q_vars) = (p_all[groups.len()..].to_vec(), q_all[groups.len()..].to_vec());
    let lhs_vars: Vec<Var> = eq.lhs.index[1 + groups.len()..].iter().flat_map(Index::vars).collect();
    let k: Vec<Var> = p_vars.iter().copied().filter(|v| q_vars.contains(v) && !lhs_vars.contains(v)).collect();
    let rows: Vec<Var> = p_vars.iter().copied().filter(|v| !k.contains(v)).collect();
    let cols: Vec<Var> = q_vars.iter().copied().filter(|v| !k.contains(v)).collect();
    // Per group, the sum may have one term and the product one row (a depthwise conv).
    if ((k.is_empty() || rows.is_empty()) && groups.is_empty())
        || cols.is_empty()
        || [k.clone(), rows.clone()].concat() != p_vars
        || [k.clone(), cols.clone()].concat() != q_vars
        || rows.iter().any(|v| cols.contains(v))
        || !covers(&p_all, &info(&p.tensor)?.shape, ranges)
        || !covers(&q_all, &qi.shape, ranges)
        || !lhs_vars.iter().all(|v| rows.contains(v) || cols.contains(v))
    {
        return None;
    }
    let product = |vars: &[Var]| sizes(vars, ranges).map(|s| s.iter().product::<usize>());
    let dims = [product(&rows)?, product(&k)?, product(&cols)?];
    let col_vars: Vec<Var> = [&["n"][..], &groups, &rows, &cols].concat();
    Some(WindowProduct {
        before: None,
        after: Some(Equation {
            lhs: eq.lhs.clone(),
            accumulate: true,
            rhs: Expr::Read(Access::new(COLUMNS, &col_vars)),
        }),
        columns_shape: sizes(&col_vars[1..], ranges)?,
        gemm: FlatGemm {
            dims,
            groups: product(&groups)?,
            a: p.tensor.clone(),
            a_transposed: true,
            b: q.tensor.clone(),
            b_transposed: false,
            c: COLUMNS.to_string(),
            bias: None,
        },
    })
}

/// The kernel of a [`FlatGemm`]; `overwrite`: it is its target's first writer. `info` must
/// know [`COLUMNS`]. With [`Batching::Summed`] the target has no batch dim and every
/// example's product is added into it in turn (a parameter gradient summed over the batch;
/// no bias). With `norm = (slot, slots)` (per example only) the kernel also stores the
/// squared norm of each example's product in `sqnorm[n, slot]` of `slots`, summed over the
/// product just written (still in cache). A batch-summed product is split into `parts`
/// partial sums (see [`summed_gemm`]). Returns the kernels, in launch order, each with its
/// arguments' tensors (the target last, then `sqnorm` with a norm).
pub fn flat_gemm(
    name: &str,
    g: &FlatGemm,
    info: &dyn Fn(&str) -> Option<TensorInfo>,
    overwrite: bool,
    (batching, parts): (Batching, usize),
    norm: Option<(usize, usize)>,
) -> Result<Vec<(Kernel, Vec<String>)>> {
    if batching == Batching::Summed {
        if norm.is_some() {
            return Err(Error::Internal(format!("{name}: a squared norm of a batch-summed product")));
        }
        return summed_gemm(name, g, info, overwrite, parts);
    }
    let [m, k, n] = g.dims;
    let mut kb = KernelBuilder::new(name);
    let batched_of = |t: &str| info(t).map(|i| i.batched).ok_or_else(|| unbound(t));
    let (a_batched, b_batched) = (batched_of(&g.a)?, batched_of(&g.b)?);
    let grouped = Grouped::new(&mut kb, g.groups);
    let view = |kb: &mut KernelBuilder, t: &str, batch: bool, dims: [usize; 2]| {
        let dims = grouped.dims(&dims);
        kb.input(t, if batch { batched(&dims) } else { fixed(&dims) })
    };
    let a = view(&mut kb, &g.a, a_batched, if g.a_transposed { [k, m] } else { [m, k] });
    let b = view(&mut kb, &g.b, b_batched, if g.b_transposed { [n, k] } else { [k, n] });
    let bias = g.bias.as_ref().map(|t| kb.input(t, fixed(&grouped.dims(&[m]))));
    let out_dims = batched(&grouped.dims(&[m, n]));
    let out = match norm {
        // The norm reads the product back.
        Some(_) => kb.arg(&g.c, out_dims, ir::Mode::InOut),
        None => kb.target(&g.c, out_dims, overwrite),
    };
    let sq = norm.map(|(_, slots)| kb.output("sqnorm", batched(&[slots])));
    let [ex, row, t] = [kb.var("n"), kb.var("m"), kb.var("t")];
    // Each index: the example where batched, then the group where grouped, then `rest`.
    let at = |batch: bool, rest: &[VarId]| {
        let mut ix = if batch { vec![v(ex)] } else { Vec::new() };
        ix.extend(grouped.index(rest));
        ix
    };
    let mut body = Vec::new();
    if let Some(bias) = bias {
        let value = load(bias, at(false, &[row]));
        let fill = lp(row, m, vec![vlp(t, n, vec![put(out, at(true, &[row, t]), value.clone(), overwrite)])]);
        body.extend(grouped.over(vec![fill]));
    }
    let accumulate = !overwrite || bias.is_some();
    let product = contract(&mut kb, [fx(m), fx(n), fx(k)], (a, b, out), accumulate, |mm, nn, kk| {
        let ai = at(a_batched, &if g.a_transposed { [kk, mm] } else { [mm, kk] });
        let bi = at(b_batched, &if g.b_transposed { [nn, kk] } else { [kk, nn] });
        (ai, bi, at(true, &[mm, nn]))
    });
    body.extend(grouped.over(vec![product]));
    let mut tensors = vec![g.a.clone(), g.b.clone()];
    tensors.extend(g.bias.clone());
    tensors.push(g.c.clone());
    if let (Some(sq), Some((slot, _))) = (sq, norm) {
        let total = kb.acc("sq");
        let x = load(out, at(true, &[row, t]));
        body.push(set(total, lit(0.0)));
        let square = lp(row, m, vec![vlp(t, n, vec![add_to(total, ir::Expr::mul(x.clone(), x))])]);
        body.extend(grouped.over(vec![square]));
        body.push(store(sq, vec![v(ex), Affine::constant(slot as i64)], ir::Expr::Acc(total)));
        tensors.push(SQNORM.to_string());
    }
    kb.finish(ex, Extent::Batch, body).map(|kernel| vec![(kernel, tensors)])
}

/// The group dim of a [`FlatGemm`]'s views: with `G > 1` groups, a leading dim of every
/// view and a loop around each statement over them; with one group, nothing (the kernel
/// is that of an ungrouped product).
struct Grouped {
    groups: usize,
    var: Option<VarId>,
}

impl Grouped {
    fn new(kb: &mut KernelBuilder, groups: usize) -> Grouped {
        Grouped { groups, var: (groups > 1).then(|| kb.var("g")) }
    }

    /// `dims` with the group dim first where grouped.
    fn dims(&self, dims: &[usize]) -> Vec<usize> {
        let mut out = if self.var.is_some() { vec![self.groups] } else { Vec::new() };
        out.extend(dims);
        out
    }

    /// The index `rest` with the group first where grouped.
    fn index(&self, rest: &[VarId]) -> Vec<Affine> {
        self.var.iter().chain(rest).map(|&x| v(x)).collect()
    }

    /// `body` in a loop over the groups where grouped.
    fn over(&self, body: Vec<Stmt>) -> Vec<Stmt> {
        match self.var {
            Some(g) => vec![lp(g, self.groups, body)],
            None => body,
        }
    }
}

/// The name of [`summed_gemm`]'s partial sums (not a valid `.pdg` identifier).
pub const PARTS: &str = "parts'";

/// Into how many partial sums [`summed_gemm`] splits a batch-summed product of `m × n`
/// elements for a batch of `batch`: up to [`SUMMED_PARTS`], fewer where the partial sums
/// would exceed [`SUMMED_PARTS_BYTES`]; `1` (no split) for a product whose target is large
/// enough for a GEMM to be split over its own output blocks.
pub fn summed_parts(batch: usize, elements: usize) -> usize {
    let fit = SUMMED_PARTS_BYTES / (elements.max(1) * 4);
    SUMMED_PARTS.min(batch).min(fit).max(1)
}

/// The most partial sums of a batch-summed product: a fixed number, not the thread count,
/// so that results do not depend on how many threads run them.
pub const SUMMED_PARTS: usize = 8;

/// The most bytes [`summed_gemm`]'s partial sums may take.
pub const SUMMED_PARTS_BYTES: usize = 16 << 20;

/// [`flat_gemm`] summed over the batch: `c[m, t] (+)= Σ_n Σ_k a[(n,) m, k] · b[n, k, t]`.
///
/// Each example's product is small (a conv's weight gradient is `Cout × Cin·k²` over the
/// example's positions), too small to split over threads by its output, so with `parts > 1`
/// the examples are dealt into `parts` partial sums by `n mod parts`, one grid iteration
/// each (independent, so they run on different threads): `{name}_parts` writes
/// `parts'[p, m, t] = Σ_{n ≡ p} Σ_k ...`, then `{name}` adds the partial sums into `c` in
/// order (zeroed first when `overwrite`). The split is fixed at lowering, so the sum's
/// order, and the result, do not depend on the thread count. With `parts == 1`: one
/// kernel, one grid iteration adding the examples in order.
fn summed_gemm(
    name: &str,
    g: &FlatGemm,
    info: &dyn Fn(&str) -> Option<TensorInfo>,
    overwrite: bool,
    parts: usize,
) -> Result<Vec<(Kernel, Vec<String>)>> {
    let [m, k, n] = g.dims;
    if g.bias.is_some() {
        return Err(Error::Internal(format!("{name}: a batch-summed window product with a bias")));
    }
    let split = parts > 1;
    let mut kb = KernelBuilder::new(&if split { format!("{name}_parts") } else { name.to_string() });
    let batched_of = |t: &str| info(t).map(|i| i.batched).ok_or_else(|| unbound(t));
    let a_batched = batched_of(&g.a)?;
    let grouped = Grouped::new(&mut kb, g.groups);
    let a_dims = grouped.dims(&if g.a_transposed { [k, m] } else { [m, k] });
    let a = kb.input(&g.a, if a_batched { batched(&a_dims) } else { fixed(&a_dims) });
    let b = kb.input(&g.b, batched(&grouped.dims(&if g.b_transposed { [n, k] } else { [k, n] })));
    let out_dims = grouped.dims(&[m, n]);
    let out = if split {
        kb.output(PARTS, fixed(&[&[parts][..], &out_dims].concat()))
    } else {
        kb.target(&g.c, fixed(&out_dims), overwrite)
    };
    let [part, ex, row, t] = [kb.var(if split { "p" } else { "one" }), kb.var("n"), kb.var("m"), kb.var("t")];
    // The target's index, with the part first when split (then the group where grouped).
    let at = |rest: [VarId; 2]| -> Vec<Affine> {
        let mut ix = if split { vec![v(part)] } else { Vec::new() };
        ix.extend(grouped.index(&rest));
        ix
    };
    let mut body = Vec::new();
    if overwrite || split {
        body.extend(grouped.over(vec![lp(row, m, vec![vlp(t, n, vec![store(out, at([row, t]), lit(0.0))])])]));
    }
    let product = contract(&mut kb, [fx(m), fx(n), fx(k)], (a, b, out), true, |mm, nn, kk| {
        let mut ai = if a_batched { vec![v(ex)] } else { Vec::new() };
        ai.extend(grouped.index(&if g.a_transposed { [kk, mm] } else { [mm, kk] }));
        let bi = grouped.index(&if g.b_transposed { [nn, kk] } else { [kk, nn] });
        (ai, [vec![v(ex)], bi].concat(), at([mm, nn]))
    });
    let product = grouped.over(vec![product]);
    // `n mod parts == p`: `n - parts·⌊n/parts⌋ - p` in `0..1`.
    let mine = || Affine::var(ex).plus_div(ex, -(parts as i64), parts as i64).plus(part, -1);
    body.push(batch_loop(ex, if split { when(vec![in_range(mine(), 0, 1)], product) } else { product }));
    let first = kb.finish(part, fx(parts), body)?;
    let mut kernels = vec![(first, vec![g.a.clone(), g.b.clone(), if split { PARTS } else { &g.c }.to_string()])];
    if split {
        // The partial sums read as `[parts, G·M, N]`, the target as `[G·M, N]`: the same
        // elements, in the same order, as their grouped views.
        let m = g.groups * m;
        let mut kb = KernelBuilder::new(name);
        let sums = kb.input(PARTS, fixed(&[parts, m, n]));
        let out = kb.target(&g.c, fixed(&[m, n]), overwrite);
        let [row, p, t] = [kb.var("m"), kb.var("p"), kb.var("t")];
        let mut body = Vec::new();
        if overwrite {
            body.push(vlp(t, n, vec![store(out, vec![v(row), v(t)], lit(0.0))]));
        }
        let add = accumulate(out, vec![v(row), v(t)], load(sums, vec![v(p), v(row), v(t)]));
        body.push(lp(p, parts, vec![vlp(t, n, vec![add])]));
        kernels.push((kb.finish(row, fx(m), body)?, vec![PARTS.to_string(), g.c.clone()]));
    }
    Ok(kernels)
}

/// `v_`, `v__`, ...: a name for the primed copy of `v` that `ranges` does not use.
fn primed(v: Var, ranges: &[(Var, usize)]) -> Var {
    let mut name = format!("{v}_");
    while ranges.iter().any(|(u, _)| *u == name) {
        name.push('_');
    }
    crate::grad::intern(&name)
}

/// The squared norm of one parameter's per-example gradient from its ghost form (see
/// [`GhostForm`]), stored in `sq[n, slot]` of `slots`: per example, over every `g`, `t`
/// and `t'`, the product of the two Gram entries `Σ_a A·A'` and `Σ_b B·B'`. Returns the
/// kernel and the tensors it reads, in argument order (the squared norms follow them).
pub fn ghost_kernel(
    name: &str,
    form: &GhostForm,
    ranges: &[(Var, usize)],
    info: &dyn Fn(&str) -> Option<TensorInfo>,
    slot: usize,
    slots: usize,
) -> Result<(Kernel, Vec<String>)> {
    let mut ranges = ranges.to_vec();
    let mut prime = HashMap::new();
    for &t in &form.t {
        let p = primed(t, &ranges);
        let r = ranges.iter().find(|(u, _)| *u == t).map(|(_, r)| *r).ok_or_else(|| unbound(t))?;
        ranges.push((p, r));
        prime.insert(t, p);
    }
    let (left2, right2) = (renamed(&form.left, &prime), renamed(&form.right, &prime));
    let (mut b, mut tensors) = Builder::reading(name, &ranges, &[&form.left, &form.right], info)?;
    let sq = b.kb.output("sqnorm", batched(&[slots]));
    tensors.push(SQNORM.to_string());
    let n = b.var("n");
    if let Expr::Num(c) = form.right {
        // No second factor (a bias): `Σ_{t,t'} Σ_a A[a,t]·A[a,t'] = Σ_a (Σ_t A[a,t])²`, the
        // squared norm of the gradient itself, in O(T) per element instead of O(T²).
        let [total, grad] = [b.kb.acc("total"), b.kb.acc("grad")];
        let (pre, value) = b.value(&form.left)?;
        let sum = b.vector_nest(&form.t, [pre, vec![add_to(grad, value)]].concat())?;
        let square = add_to(total, ir::Expr::mul(ir::Expr::Acc(grad), ir::Expr::Acc(grad)));
        let outer: Vec<Var> = form.g.iter().chain(&form.a).copied().collect();
        let mut body = vec![set(total, lit(0.0))];
        body.extend(b.nest(&outer, [vec![set(grad, lit(0.0))], sum, vec![square]].concat())?);
        let total = ir::Expr::mul(ir::Expr::Acc(total), lit((c * c) as f32));
        body.push(store(sq, vec![v(n), Affine::constant(slot as i64)], total));
        return b.kb.finish(n, Extent::Batch, body).map(|k| (k, tensors));
    }
    let [total, ga, gb] = [b.kb.acc("total"), b.kb.acc("gram_a"), b.kb.acc("gram_b")];
    let gram = |b: &mut Builder<'_>, acc, vars: &[Var], x: &Expr, x2: &Expr| -> Result<Vec<Stmt>> {
        let (p1, v1) = b.value(x)?;
        let (p2, v2) = b.value(x2)?;
        let inner = [p1, p2, vec![add_to(acc, ir::Expr::mul(v1, v2))]].concat();
        Ok([vec![set(acc, lit(0.0))], b.vector_nest(vars, inner)?].concat())
    };
    let mut inner = gram(&mut b, ga, &form.a, &form.left, &left2)?;
    inner.extend(gram(&mut b, gb, &form.b, &form.right, &right2)?);
    inner.push(add_to(total, ir::Expr::mul(ir::Expr::Acc(ga), ir::Expr::Acc(gb))));
    let mut outer: Vec<Var> = form.g.clone();
    outer.extend(&form.t);
    outer.extend(form.t.iter().map(|t| prime[t]));
    let mut body = vec![set(total, lit(0.0))];
    body.extend(b.nest(&outer, inner)?);
    // ‖Σ_t A_tᵀ B_t‖² is never negative; rounding in the cross terms must not make it so.
    let total = ir::Expr::bin(ir::Binary::Max, ir::Expr::Acc(total), lit(0.0));
    body.push(store(sq, vec![v(n), Affine::constant(slot as i64)], total));
    b.kb.finish(n, Extent::Batch, body).map(|k| (k, tensors))
}

/// The name of [`ghost_gram_kernel`]'s Gram matrices (not a valid `.pdg` identifier).
pub const GRAMS: &str = "grams'";

/// The fewest summed positions `T` for which [`ghost_gram_kernel`] computes a ghost norm's
/// Gram matrices as contractions (below, the loop nest of [`ghost_kernel`] is as fast).
pub const GRAM_MIN_POSITIONS: usize = 8;

/// The most bytes per example of [`ghost_gram_kernel`]'s two `T × T` Gram matrices.
pub const GRAM_BYTES: usize = 8 << 20;

/// [`ghost_kernel`]'s squared norm with its Gram matrices as contraction nodes (the CPU
/// runs them on its GEMM), where both factors are per-example matrices read in order:
/// `A[n, g.., a.., t..]` and `B[n, g.., b.., t..]` (plain reads covering unpadded tensors,
/// such as an output gradient and a conv's kept im2col columns). Per example and group,
/// `grams'[n, 0] = AᵀA` and `grams'[n, 1] = BᵀB` (`T × T` each), then their elementwise
/// product summed. Returns the kernel, the tensors of its arguments (`A`, `B`, [`GRAMS`],
/// [`SQNORM`]) and `T`; `None` where the factors are not such matrices, `T`
/// is below [`GRAM_MIN_POSITIONS`], or the Gram matrices exceed [`GRAM_BYTES`].
pub fn ghost_gram_kernel(
    name: &str,
    form: &GhostForm,
    ranges: &[(Var, usize)],
    info: &dyn Fn(&str) -> Option<TensorInfo>,
    slot: usize,
    slots: usize,
) -> Result<Option<(Kernel, Vec<String>, usize)>> {
    let product = |vars: &[Var]| sizes(vars, ranges).map(|s| s.iter().product::<usize>());
    let matrix = |e: &Expr, rows: &[Var]| -> Option<Access> {
        let Expr::Read(a) = e else { return None };
        let ti = info(&a.tensor)?;
        let vars = plain_vars(a, true)?;
        let want = [&form.g[..], rows, &form.t].concat();
        let unpadded = ti.padding.iter().all(|&p| p == (0, 0));
        (ti.batched && unpadded && vars == want && covers(&vars, &ti.shape, ranges)).then(|| a.clone())
    };
    let (Some(a), Some(b)) = (matrix(&form.left, &form.a), matrix(&form.right, &form.b)) else { return Ok(None) };
    let (Some(groups), Some(ma), Some(mb), Some(t)) =
        (product(&form.g), product(&form.a), product(&form.b), product(&form.t))
    else {
        return Ok(None);
    };
    if t < GRAM_MIN_POSITIONS || 2 * t * t * 4 > GRAM_BYTES || a.tensor == b.tensor {
        return Ok(None);
    }
    let mut kb = KernelBuilder::new(name);
    let grouped = Grouped::new(&mut kb, groups);
    let av = kb.input(&a.tensor, batched(&grouped.dims(&[ma, t])));
    let bv = kb.input(&b.tensor, batched(&grouped.dims(&[mb, t])));
    let grams = kb.arg(GRAMS, batched(&[2, t, t]), ir::Mode::InOut);
    let sq = kb.output("sqnorm", batched(&[slots]));
    let [n, row, col] = [kb.var("n"), kb.var("t"), kb.var("u")];
    let total = kb.acc("total");
    let at = |rest: &[VarId]| [vec![v(n)], grouped.index(rest)].concat();
    let gram = |kb: &mut KernelBuilder, x: ir::ArgId, rows: usize, which: i64| {
        contract(kb, [fx(t), fx(t), fx(rows)], (x, x, grams), false, |m, j, k| {
            (at(&[k, m]), at(&[k, j]), vec![v(n), Affine::constant(which), v(m), v(j)])
        })
    };
    let (gram_a, gram_b) = (gram(&mut kb, av, ma, 0), gram(&mut kb, bv, mb, 1));
    let entry = |which: i64| load(grams, vec![v(n), Affine::constant(which), v(row), v(col)]);
    let dot = lp(row, t, vec![vlp(col, t, vec![add_to(total, ir::Expr::mul(entry(0), entry(1)))])]);
    let mut body = vec![set(total, lit(0.0))];
    body.extend(grouped.over(vec![gram_a, gram_b, dot]));
    // ‖Σ_t A_tᵀ B_t‖² is never negative; rounding in the cross terms must not make it so.
    let clamped = ir::Expr::bin(ir::Binary::Max, ir::Expr::Acc(total), lit(0.0));
    body.push(store(sq, vec![v(n), Affine::constant(slot as i64)], clamped));
    let kernel = kb.finish(n, Extent::Batch, body)?;
    Ok(Some((kernel, vec![a.tensor.clone(), b.tensor.clone(), GRAMS.to_string(), SQNORM.to_string()], t)))
}

/// The name under which a tensor scaled by the clip factors, `clipped'[n, ..] = c[n] ·
/// F[n, ..]`, enters book-keeping's equations in place of `F` (see [`scaled_factor`]; not a
/// valid `.pdg` identifier).
pub const CLIPPED: &str = "clipped'";

/// The per-example tensor whose scaling by the clip factors turns the most of `eqs` (one
/// layer's derived parameter gradients) into their clipped sums: one read, in every term
/// of an equation, as a factor of that term's product (so `Σ_n c[n]·eq` is `eq` with that
/// read scaled). Book-keeping then scales it once and runs each such equation summed over
/// the batch as it is — the batch gradient's own kernel, a GEMM where that is one. Among
/// equally useful tensors, the smallest. `None` where no equation has a product with such
/// a factor (the weighted kernel of [`clipped_sum_kernel`] is as cheap then).
pub fn scaled_factor(eqs: &[&Equation], info: &dyn Fn(&str) -> Option<TensorInfo>) -> Option<String> {
    let mut best: Option<(usize, usize, String)> = None;
    let mut seen: Vec<String> = Vec::new();
    for eq in eqs {
        for a in crate::grad::layer::reads(&eq.rhs) {
            if seen.contains(&a.tensor) {
                continue;
            }
            seen.push(a.tensor.clone());
            let Some(ti) = info(&a.tensor).filter(|ti| ti.batched) else { continue };
            let uses = eqs.iter().filter(|eq| scales(eq, &a.tensor)).count();
            let with_product = eqs
                .iter()
                .any(|eq| scales(eq, &a.tensor) && terms(&eq.rhs).iter().any(|(_, body)| matches!(body, Expr::Mul(_))));
            let size: usize = ti.shape.iter().product();
            let better = match &best {
                None => true,
                Some((u, sz, _)) => uses > *u || (uses == *u && size < *sz),
            };
            if with_product && better {
                best = Some((uses, size, a.tensor.clone()));
            }
        }
    }
    best.map(|(_, _, t)| t)
}

/// Whether every term of `eq` reads `t` exactly once, as a factor of its product.
pub fn scales(eq: &Equation, t: &str) -> bool {
    terms(&eq.rhs).iter().all(|(_, body)| {
        let once = crate::grad::layer::reads(body).iter().filter(|a| a.tensor == t).count() == 1;
        let factor = match body {
            Expr::Read(a) => a.tensor == t,
            Expr::Mul(items) => items.iter().any(|x| matches!(x, Expr::Read(a) if a.tensor == t)),
            _ => false,
        };
        once && factor
    })
}

/// `eq` reading [`CLIPPED`] where it read `t`.
pub fn reading_clipped(eq: &Equation, t: &str) -> Equation {
    let swap = |a: &Access| if a.tensor == t { a.renamed(CLIPPED) } else { a.clone() };
    Equation { lhs: eq.lhs.clone(), accumulate: eq.accumulate, rhs: eq.rhs.map(&swap, &|v| v) }
}

/// The clipped sum of one parameter's gradient without materializing it (book-keeping):
/// the derived per-example equation with every term weighted by the example's clip factor
/// (the per-example tensor `clip`, one value per example), summed over the batch.
pub fn clipped_sum_kernel(
    name: &str,
    eq: &Equation,
    ranges: &[(Var, usize)],
    info: &dyn Fn(&str) -> Option<TensorInfo>,
    clip: &str,
) -> Result<(Kernel, Vec<String>)> {
    let weight = Expr::Read(Access::new(clip, &["n"]));
    let weigh = |e: &Expr| match e {
        Expr::Reduce(Reduction::Sum, vars, body) => {
            Expr::Reduce(Reduction::Sum, vars.clone(), Box::new(Expr::Mul(vec![weight.clone(), (**body).clone()])))
        }
        other => Expr::Mul(vec![weight.clone(), other.clone()]),
    };
    let rhs = match &eq.rhs {
        Expr::Add(items) if items.iter().any(|x| matches!(x, Expr::Reduce(..))) => {
            Expr::Add(items.iter().map(weigh).collect())
        }
        other => weigh(other),
    };
    let weighted = Equation { lhs: eq.lhs.clone(), accumulate: false, rhs };
    let with_clip = |t: &str| {
        if t == clip {
            Some(TensorInfo { shape: Vec::new(), batched: true, padding: Vec::new() })
        } else {
            info(t)
        }
    };
    equation_kernel(name, &weighted, ranges, &with_clip, true, Batching::Summed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(input, kernel, stride, pad_lo, dilation)` per axis: the equations
    /// `cols'[n, c, k.., o..] = X[n, c, s·o + d·k − p ..]` and `dX[n, c, s·o + d·k − p ..] +=
    /// cols'[n, c, k.., o..]`, with the ranges and tensor info they need.
    #[allow(clippy::type_complexity)]
    fn window_equations(
        axes: &[(usize, usize, usize, usize, usize)],
    ) -> (Equation, Equation, Vec<(Var, usize)>, Vec<usize>, Vec<usize>) {
        let (ks, os): (Vec<Var>, Vec<Var>) =
            if axes.len() == 1 { (vec!["i"], vec!["h"]) } else { (vec!["i", "j"], vec!["h", "w"]) };
        let mut xi = vec![Index::var("n"), Index::var("c")];
        let mut ranges = vec![("c", 3)];
        let mut input = vec![3];
        for (a, &(size, kernel, stride, pad, dilation)) in axes.iter().enumerate() {
            xi.push(Index::window(os[a], stride, ks[a], dilation, pad));
            let output = (size + pad - dilation * (kernel - 1) - 1) / stride + 1;
            ranges.extend([(ks[a], kernel), (os[a], output)]);
            input.push(size);
        }
        let cols = Access::new(COLUMNS, &[&["n", "c"][..], &ks, &os].concat());
        let cols_shape: Vec<usize> = [&["c"][..], &ks, &os]
            .concat()
            .iter()
            .map(|v| ranges.iter().find(|(u, _)| u == v).expect("a range").1)
            .collect();
        let x = Access { tensor: "X".into(), index: xi };
        let gather = Equation { lhs: cols.clone(), accumulate: false, rhs: Expr::Read(x.clone()) };
        let scatter = Equation { lhs: x.renamed("dX"), accumulate: true, rhs: Expr::Read(cols) };
        (gather, scatter, ranges, input, cols_shape)
    }

    /// A norm's row means inside its input gradient run once per row: inside the loop over
    /// rows `r`, before the loops over the row's elements, not inside them (where they would
    /// give the same values, at the row's size times the work); the two means share one
    /// pass over the row.
    #[test]
    fn reductions_run_at_the_depth_of_the_variables_they_depend_on() {
        let src =
            "model m { input x: [4, 3, 3]; label y: classes(2); h = gn: group_norm(c: conv2d(x, 4, kernel=1), 2); \
                   logits = fc: linear(flatten(h), 2); loss cross_entropy(logits, y); }";
        let graph = crate::compile_front(src).graph.expect("checks");
        let grads = crate::grad::differentiate(&graph);
        let node = graph.nodes.iter().find(|n| n.layer.as_deref() == Some("gn")).expect("the norm");
        let step = grads.step(node.id).expect("a step");
        let layer = crate::grad::as_index_layer(&graph, node).expect("a norm is lowered as a layer");
        let info = |t: &str| tensor_info(&layer, t);
        let dx = step.input_grads.iter().find(|e| e.lhs.tensor == "dX").expect("dX");
        let (k, _) = equation_kernel("dx", dx, &step.ranges, &info, true, Batching::PerExample).expect("lowers");
        struct Depths<'k> {
            k: &'k Kernel,
            open: Vec<&'k str>,
            /// The loops enclosing each loop over a row's primed (reduced) variable.
            reduced: Vec<Vec<&'k str>>,
        }
        impl<'k> pdgc_codegen::visit::Visitor<'k> for Depths<'k> {
            fn enter_loop(&mut self, l: &'k ir::Loop) {
                let name = self.k.vars[l.var.0 as usize].as_str();
                if name.ends_with('′') {
                    self.reduced.push(self.open.clone());
                }
                self.open.push(name);
            }
            fn exit_loop(&mut self, _: &'k ir::Loop) {
                self.open.pop();
            }
        }
        let mut d = Depths { k: &k, open: Vec::new(), reduced: Vec::new() };
        pdgc_codegen::visit::walk_body(&mut d, &k.grid.body);
        assert_eq!(d.reduced, vec![vec!["r"], vec!["r", "c′"]], "{k}");
    }

    /// Window geometries, `(input, kernel, stride, pad_lo, dilation)` per axis: 1-D and 2-D
    /// windows with strides, dilations, padding on either side or none, and windows that
    /// reach past the input's end.
    const GEOMETRIES: [&[(usize, usize, usize, usize, usize)]; 5] = [
        &[(7, 3, 1, 1, 1)],
        &[(9, 3, 2, 2, 2)],
        &[(6, 3, 1, 1, 1), (5, 3, 2, 0, 1)],
        &[(8, 5, 2, 2, 1), (4, 2, 1, 1, 3)],
        &[(3, 3, 3, 4, 1), (7, 1, 1, 0, 1)],
    ];

    fn run(k: &Kernel, bufs: &mut [Vec<f32>]) {
        pdgc_codegen::verify::verify(k).expect("verifies");
        let mut slices: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        pdgc_codegen::interp::run(k, &mut slices, 2).expect("runs");
    }

    /// The windowed read `X[n, c, s·o + d·k − p ..]` of [`window_equations`], its taps' and
    /// positions' variables and ranges, every variable's range, and the input's shape.
    struct WindowRead {
        x: Access,
        ks: Vec<Var>,
        os: Vec<Var>,
        taps: Vec<usize>,
        outs: Vec<usize>,
        ranges: Vec<(Var, usize)>,
        input: Vec<usize>,
    }

    fn window_read(axes: &[(usize, usize, usize, usize, usize)]) -> WindowRead {
        let (gather, _, ranges, input, _) = window_equations(axes);
        let spatial = axes.len();
        let Expr::Read(x) = gather.rhs else { unreachable!() };
        let vars: Vec<Var> = gather.lhs.index.iter().filter_map(Index::as_var).collect();
        let (ks, os) = (vars[2..2 + spatial].to_vec(), vars[2 + spatial..].to_vec());
        let range = |v: &Var| ranges.iter().find(|(u, _)| u == v).expect("a range").1;
        let (taps, outs) = (ks.iter().map(range).collect(), os.iter().map(range).collect());
        WindowRead { x, ks, os, taps, outs, ranges, input }
    }

    /// The row-major coordinates of element `flat` of a tensor of `shape`.
    fn unravel(flat: usize, shape: &[usize]) -> Vec<usize> {
        let (mut rest, mut coords) = (flat, vec![0; shape.len()]);
        for d in (0..shape.len()).rev() {
            coords[d] = rest % shape[d];
            rest /= shape[d];
        }
        coords
    }

    /// The flat per-example position in the input of `axes` (see [`window_equations`]) that
    /// channel `c` reads at output position `pos` and tap `tap`; `None` in the padding.
    fn input_at(axes: &[(usize, usize, usize, usize, usize)], c: usize, pos: &[usize], tap: &[usize]) -> Option<usize> {
        let mut at = Some(c);
        for (a, &(size, _, stride, pad, dilation)) in axes.iter().enumerate() {
            let ix = (pos[a] * stride + tap[a] * dilation) as i64 - pad as i64;
            at = match at {
                Some(at) if (0..size as i64).contains(&ix) => Some(at * size + ix as usize),
                _ => None,
            };
        }
        at
    }

    /// im2col and col2im lowered by `window_copy` (split loops, no guard per element inside
    /// the input) compute exactly the plain definition, element by element, on every window
    /// geometry of [`GEOMETRIES`].
    #[test]
    fn window_copies_are_im2col_and_col2im() {
        for axes in GEOMETRIES {
            let (gather, scatter, ranges, input, cols_shape) = window_equations(axes);
            let info = |t: &str| {
                let shape = match t {
                    "X" | "dX" => input.clone(),
                    _ => cols_shape.clone(),
                };
                Some(TensorInfo::unpadded(shape))
            };
            let (im2col, _) = equation_kernel("im2col", &gather, &ranges, &info, true, Batching::PerExample).unwrap();
            let (col2im, _) = equation_kernel("col2im", &scatter, &ranges, &info, false, Batching::PerExample).unwrap();
            // Both are window copies (not the guarded gather and scatter).
            for (eq, target) in [(&gather, &cols_shape), (&scatter, &input)] {
                let (mut b, _) = Builder::reading("copy", &ranges, &[&eq.rhs], &info).unwrap();
                let out = b.kb.target(&eq.lhs.tensor, batched(target), !eq.accumulate);
                assert!(window_copy(&mut b, eq, out, !eq.accumulate, target).unwrap().is_some(), "{axes:?}: {eq}");
            }
            let batch = 2;
            let (x_len, c_len): (usize, usize) = (input.iter().product(), cols_shape.iter().product());
            let x: Vec<f32> = (0..batch * x_len).map(|i| ((i as f32 + 0.5) * 0.37).sin()).collect();
            let mut bufs = vec![x.clone(), vec![f32::NAN; batch * c_len]];
            run(&im2col, &mut bufs);
            let cols = bufs[1].clone();
            let mut bufs = vec![cols.clone(), vec![0.0; batch * x_len]];
            run(&col2im, &mut bufs);
            let dx = bufs[1].clone();
            // The plain definition, over every (c, taps, positions) in row-major order.
            let mut want_dx = vec![0.0f32; batch * x_len];
            let spatial = axes.len();
            for n in 0..batch {
                for (flat, &got) in cols[n * c_len..(n + 1) * c_len].iter().enumerate() {
                    let coords = unravel(flat, &cols_shape);
                    let at = input_at(axes, coords[0], &coords[1 + spatial..], &coords[1..1 + spatial]);
                    let want = at.map_or(0.0, |at| x[n * x_len + at]);
                    assert_eq!(got.to_bits(), want.to_bits(), "{axes:?}: im2col at {n}, {coords:?}");
                    if let Some(at) = at {
                        want_dx[n * x_len + at] += got;
                    }
                }
            }
            for (i, (got, want)) in dx.iter().zip(&want_dx).enumerate() {
                assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{axes:?}: col2im at {i}: {got} vs {want}");
            }
        }
    }

    /// A gradient that sums a product over a window's output positions (a conv's weight
    /// gradient `G[n, c, k..] = Σ_o Y[n, c, o..] · X[n, c, s·o + d·k − p ..]`) lowered as one
    /// loop nest (`direct`: `window_sum`, split rows with no guard per element inside the
    /// input) and by crb (over every tap position the padded input admits, then the
    /// kernel-sized corner) computes the plain definition on every window geometry of
    /// [`GEOMETRIES`].
    #[test]
    fn window_sums_and_crb_are_the_plain_definition() {
        for axes in GEOMETRIES {
            let WindowRead { x, ks, os, taps, outs, ranges, input } = window_read(axes);
            let (ks, os) = (&ks[..], &os[..]);
            let y = Access::new("Y", &[&["n", "c"][..], os].concat());
            let body = Expr::Mul(vec![Expr::Read(y), Expr::Read(x.clone())]);
            let eq = Equation {
                lhs: Access::new("G", &[&["n", "c"][..], ks].concat()),
                accumulate: false,
                rhs: Expr::Reduce(Reduction::Sum, os.to_vec(), Box::new(body.clone())),
            };
            let (g_shape, y_shape) = ([&[3][..], &taps].concat(), [&[3][..], &outs].concat());
            let info = |t: &str| {
                Some(TensorInfo::unpadded(match t {
                    "X" => input.clone(),
                    "Y" => y_shape.clone(),
                    _ => g_shape.clone(),
                }))
            };
            // `direct`: the term is a window sum (not the guarded gather).
            let (mut b, _) = Builder::reading("direct", &ranges, &[&eq.rhs], &info).unwrap();
            let acc = b.kb.acc("sum");
            assert!(window_sum(&mut b, os, &body, acc).unwrap().is_some(), "{axes:?}: {eq}");
            let (direct, _) = equation_kernel("direct", &eq, &ranges, &info, true, Batching::PerExample).unwrap();
            // crb over one more position per axis than the kernel where the input allows.
            let positions: Vec<usize> = axes
                .iter()
                .zip(&outs)
                .map(|(&(size, kernel, stride, pad, dilation), &out)| {
                    let span = stride * (out - 1) + 1;
                    ((size + 2 * pad).saturating_sub(span) / dilation + 1).max(kernel)
                })
                .collect();
            let (crb, full_shape) =
                crb_kernels("crb", &eq, &ranges, &info, &positions).unwrap().expect("a crb schedule");
            assert_eq!(full_shape, [&[3][..], &positions].concat(), "{axes:?}");
            let batch = 2;
            let (x_len, y_len, g_len) =
                (input.iter().product::<usize>(), y_shape.iter().product::<usize>(), g_shape.iter().product::<usize>());
            let x: Vec<f32> = (0..batch * x_len).map(|i| ((i as f32 + 0.5) * 0.37).sin()).collect();
            let yv: Vec<f32> = (0..batch * y_len).map(|i| ((i as f32 + 0.25) * 0.61).cos()).collect();
            let mut bufs = vec![yv.clone(), x.clone(), vec![f32::NAN; batch * g_len]];
            run(&direct, &mut bufs);
            let got_direct = bufs[2].clone();
            let full_len: usize = full_shape.iter().product();
            let mut bufs = vec![yv.clone(), x.clone(), vec![f32::NAN; batch * full_len]];
            run(&crb[0].0, &mut bufs);
            let mut bufs = vec![bufs[2].clone(), vec![f32::NAN; batch * g_len]];
            run(&crb[1].0, &mut bufs);
            let got_crb = bufs[1].clone();
            // The plain definition in f64, at every (c, taps) in row-major order.
            for n in 0..batch {
                for flat in 0..g_len {
                    let coords = unravel(flat, &g_shape);
                    let mut want = 0.0f64;
                    for o in 0..outs.iter().product::<usize>() {
                        let pos = unravel(o, &outs);
                        let at = input_at(axes, coords[0], &pos, &coords[1..]);
                        let y_at = pos.iter().zip(&outs).fold(coords[0], |acc, (p, o)| acc * o + p);
                        if let Some(at) = at {
                            want += yv[n * y_len + y_at] as f64 * x[n * x_len + at] as f64;
                        }
                    }
                    for (what, got) in [("direct", &got_direct), ("crb", &got_crb)] {
                        let got = got[n * g_len + flat] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{axes:?}: {what} at {n}, {coords:?}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Pool-shaped windows besides [`GEOMETRIES`]: 2x2 windows that tile the input (the
    /// first writer stores), overlapping 2x2 windows at stride 1 (one loop nest per tap),
    /// 3x3 windows at stride 2 (nine taps unrolled) and padded 3x3 windows (loops over taps).
    const POOLS: [&[(usize, usize, usize, usize, usize)]; 4] = [
        &[(8, 2, 2, 0, 1), (6, 2, 2, 0, 1)],
        &[(7, 2, 1, 0, 1), (5, 2, 1, 0, 1)],
        &[(9, 3, 2, 0, 1), (9, 3, 2, 0, 1)],
        &[(8, 3, 2, 1, 1), (7, 3, 2, 1, 1)],
    ];

    /// A max and a mean over a window's taps (`reduce_gather`) and the first-maximum
    /// scatter of a max's gradient (`first_max_scatter`) compute the plain definition —
    /// taps outside the input skipped by the max and counted as zero by the mean, the
    /// gradient to the first tap (row-major) that holds the maximum — on every window of
    /// [`GEOMETRIES`] and [`POOLS`], with many ties (small integers).
    #[test]
    fn pool_reductions_and_first_max_are_the_plain_definition() {
        for axes in GEOMETRIES.iter().chain(&POOLS) {
            let WindowRead { x, ks, os, taps, outs, ranges, input } = window_read(axes);
            let (ks, os) = (&ks[..], &os[..]);
            let y = Access::new("Y", &[&["n", "c"][..], os].concat());
            let reduce = |r: Reduction| Equation {
                lhs: y.clone(),
                accumulate: false,
                rhs: Expr::Reduce(r, ks.to_vec(), Box::new(Expr::Read(x.clone()))),
            };
            let route = Equation {
                lhs: x.renamed("dX"),
                accumulate: true,
                rhs: Expr::Mul(vec![
                    Expr::Read(y.renamed("dY")),
                    Expr::FirstMax(Box::new(Expr::Read(x.clone())), Box::new(Expr::Read(y.clone()))),
                ]),
            };
            let y_shape = [&[3][..], &outs].concat();
            let info = |t: &str| {
                Some(TensorInfo::unpadded(match t {
                    "X" | "dX" => input.clone(),
                    _ => y_shape.clone(),
                }))
            };
            let kernel = |name: &str, eq: &Equation| {
                equation_kernel(name, eq, &ranges, &info, true, Batching::PerExample).unwrap()
            };
            let (max, mean, (back, args)) = (
                kernel("max", &reduce(Reduction::Max)),
                kernel("mean", &reduce(Reduction::Mean)),
                kernel("back", &route),
            );
            assert_eq!(args, ["dY", "X", "Y", "dX"], "{axes:?}");
            let batch = 2;
            let (x_len, y_len) = (input.iter().product::<usize>(), y_shape.iter().product::<usize>());
            let xv: Vec<f32> = (0..batch * x_len).map(|i| ((i * 7 + i / 5) % 4) as f32 - 1.0).collect();
            let dy: Vec<f32> = (0..batch * y_len).map(|i| 1.0 + i as f32).collect();
            let mut bufs = vec![xv.clone(), vec![f32::NAN; batch * y_len]];
            run(&max.0, &mut bufs);
            let got_max = bufs[1].clone();
            let mut bufs = vec![xv.clone(), vec![f32::NAN; batch * y_len]];
            run(&mean.0, &mut bufs);
            let got_mean = bufs[1].clone();
            let mut bufs = vec![dy.clone(), xv.clone(), got_max.clone(), vec![f32::NAN; batch * x_len]];
            run(&back, &mut bufs);
            let got_back = bufs[3].clone();
            // The plain definition at every (c, positions) in row-major order, taps in order.
            let mut want_back = vec![0.0f32; batch * x_len];
            for n in 0..batch {
                for flat in 0..y_len {
                    let coords = unravel(flat, &y_shape);
                    let (mut most, mut sum, mut first) = (f32::NEG_INFINITY, 0.0f32, None);
                    let count: usize = taps.iter().product();
                    for t in 0..count {
                        let tap = unravel(t, &taps);
                        if let Some(at) = input_at(axes, coords[0], &coords[1..], &tap) {
                            let value = xv[n * x_len + at];
                            sum += value;
                            if value > most {
                                (most, first) = (value, Some(at));
                            }
                        }
                    }
                    let at = n * y_len + flat;
                    assert_eq!(got_max[at].to_bits(), most.to_bits(), "{axes:?}: max at {n}, {coords:?}");
                    let mean = sum / count as f32;
                    assert!(
                        (got_mean[at] - mean).abs() <= 1e-6,
                        "{axes:?}: mean at {n}, {coords:?}: {} vs {mean}",
                        got_mean[at]
                    );
                    if let Some(first) = first {
                        want_back[n * x_len + first] += dy[at];
                    }
                }
            }
            for (i, (got, want)) in got_back.iter().zip(&want_back).enumerate() {
                assert_eq!(got.to_bits(), want.to_bits(), "{axes:?}: first-max gradient at {i}");
            }
        }
    }
}
