//! A small builder for kernels: named arguments, loop variables and accumulators, and
//! shorthands for the loops and expressions the kernel generators write over and over.
//!
//! Sizes: generators pass sizes as `usize`; the kernel IR's dims and extents are `u32`.
//! Every conversion goes through [`size`], which never truncates: a size that does not fit
//! (which `check::limits` rules out before lowering) is recorded, and the next
//! [`KernelBuilder::finish`] on this thread returns it as [`Error::Internal`] instead of a
//! kernel. Recording rather than returning a `Result` from every shorthand keeps the
//! generators' expression style (loops nested in `vec![..]`, shorthands in closures).

use std::cell::Cell;

use pdgc_codegen::ir::{
    AccId, Affine, Arg, ArgId, Cond, Contract, Dim, Expr, Extent, Kernel, Loop, LoopKind, Mode, Operand, Stmt, VarId,
};
use pdgc_codegen::visit::{walk_stmt_mut, VisitorMut};

use crate::error::{Error, Result};

thread_local! {
    /// The first size since the last [`KernelBuilder::finish`] on this thread that did not
    /// fit the kernel IR's `u32`.
    static TOO_LARGE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// `n` as a size of the kernel IR. One that does not fit `u32` is recorded (the IR gets 0)
/// and fails the kernel being built at its [`KernelBuilder::finish`].
pub fn size(n: usize) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| {
        TOO_LARGE.with(|first| {
            if first.get().is_none() {
                first.set(Some(n));
            }
        });
        0
    })
}

pub struct KernelBuilder {
    name: String,
    args: Vec<Arg>,
    vars: Vec<String>,
    accs: Vec<String>,
}

/// `[Batch, d0, d1, ...]`: a per-example buffer's dims.
pub fn batched(shape: &[usize]) -> Vec<Dim> {
    let mut dims = vec![Dim::Batch];
    dims.extend(shape.iter().map(|&d| Dim::Fixed(size(d))));
    dims
}

/// `[d0, d1, ...]`: a buffer without a batch dim (parameters, sums).
pub fn fixed(shape: &[usize]) -> Vec<Dim> {
    shape.iter().map(|&d| Dim::Fixed(size(d))).collect()
}

impl KernelBuilder {
    pub fn new(name: impl Into<String>) -> KernelBuilder {
        KernelBuilder { name: name.into(), args: Vec::new(), vars: Vec::new(), accs: Vec::new() }
    }

    pub fn arg(&mut self, name: &str, dims: Vec<Dim>, mode: Mode) -> ArgId {
        self.args.push(Arg { name: name.to_string(), dims, mode });
        ArgId(self.args.len() as u32 - 1)
    }

    pub fn input(&mut self, name: &str, dims: Vec<Dim>) -> ArgId {
        self.arg(name, dims, Mode::In)
    }

    pub fn output(&mut self, name: &str, dims: Vec<Dim>) -> ArgId {
        self.arg(name, dims, Mode::Out)
    }

    /// An output that the kernel accumulates into (or overwrites when `first`).
    pub fn target(&mut self, name: &str, dims: Vec<Dim>, first: bool) -> ArgId {
        self.arg(name, dims, if first { Mode::Out } else { Mode::InOut })
    }

    pub fn var(&mut self, name: &str) -> VarId {
        self.vars.push(name.to_string());
        VarId(self.vars.len() as u32 - 1)
    }

    pub fn vars(&mut self, names: &[&str]) -> Vec<VarId> {
        names.iter().map(|n| self.var(n)).collect()
    }

    /// A new accumulator, named `name` (with a number after it where the kernel already
    /// has one of that name, so printed kernels stay unambiguous).
    pub fn acc(&mut self, name: &str) -> AccId {
        let mut unique = name.to_string();
        let mut k = 2;
        while self.accs.contains(&unique) {
            unique = format!("{name}{k}");
            k += 1;
        }
        self.accs.push(unique);
        AccId(self.accs.len() as u32 - 1)
    }

    /// The kernel. Generators may reuse a variable for several sequential loops; here
    /// each loop gets a variable of its own, as the IR requires. An internal error if a
    /// size did not fit the IR (see [`size`]).
    pub fn finish(mut self, grid_var: VarId, grid_extent: Extent, body: Vec<Stmt>) -> Result<Kernel> {
        if let Some(n) = TOO_LARGE.with(Cell::take) {
            return Err(Error::Internal(format!(
                "kernel `{}`: the size {n} does not fit the kernel IR's 32-bit dims (the size checks of `check` \
                 should have rejected the model)",
                self.name
            )));
        }
        let mut bound = vec![false; self.vars.len()];
        bound[grid_var.0 as usize] = true;
        let mut body = self.unique(body, &mut bound);
        // Drop variables no loop binds (declared but unused), renumbering the rest.
        let mut vars = Vec::new();
        let mut grid_var = grid_var;
        for (old, name) in self.vars.iter().enumerate() {
            if !bound[old] {
                continue;
            }
            let new = VarId(vars.len() as u32);
            vars.push(name.clone());
            let old = VarId(old as u32);
            if old != new {
                body = body.into_iter().map(|s| rename_stmt(s, old, new)).collect();
                body = rebind(body, old, new);
                if grid_var == old {
                    grid_var = new;
                }
            }
        }
        Ok(Kernel {
            name: self.name,
            args: self.args,
            vars,
            accs: self.accs,
            grid: Loop { var: grid_var, extent: grid_extent, kind: LoopKind::Serial, body },
        })
    }

    fn unique(&mut self, body: Vec<Stmt>, bound: &mut Vec<bool>) -> Vec<Stmt> {
        body.into_iter()
            .map(|s| match s {
                Stmt::Loop(mut l) => {
                    if bound[l.var.0 as usize] {
                        let old = l.var;
                        let fresh = self.var(&self.vars[old.0 as usize].clone());
                        bound.push(false);
                        l.body = l.body.into_iter().map(|s| rename_stmt(s, old, fresh)).collect();
                        l.var = fresh;
                    }
                    bound[l.var.0 as usize] = true;
                    l.body = self.unique(l.body, bound);
                    Stmt::Loop(l)
                }
                Stmt::If { cond, then } => Stmt::If { cond, then: self.unique(then, bound) },
                Stmt::Contract(c) => {
                    // A contraction binds its own variables, fresh ones from `contract`.
                    for v in [c.m, c.n, c.k] {
                        bound[v.0 as usize] = true;
                    }
                    Stmt::Contract(c)
                }
                other => other,
            })
            .collect()
    }
}

/// Renames the loops that bind `old` (their bodies are renamed by `rename_stmt`).
fn rebind(body: Vec<Stmt>, old: VarId, new: VarId) -> Vec<Stmt> {
    body.into_iter()
        .map(|s| match s {
            Stmt::Loop(mut l) => {
                if l.var == old {
                    l.var = new;
                    l.body = l.body.into_iter().map(|s| rename_stmt(s, old, new)).collect();
                }
                l.body = rebind(l.body, old, new);
                Stmt::Loop(l)
            }
            Stmt::If { cond, then } => Stmt::If { cond, then: rebind(then, old, new) },
            Stmt::Contract(mut c) => {
                let binds = [c.m, c.n, c.k].contains(&old);
                for v in [&mut c.m, &mut c.n, &mut c.k] {
                    if *v == old {
                        *v = new;
                    }
                }
                let mut s = Stmt::Contract(c);
                if binds {
                    // The contraction's own variable: its operands follow the new name.
                    walk_stmt_mut(&mut Rename { old, new }, &mut s);
                }
                s
            }
            other => other,
        })
        .collect()
}

/// Whether `s` is a loop or a contraction that binds `var` (its own `var`, which renames
/// and substitutions of an outer one leave alone).
fn binds(s: &Stmt, var: VarId) -> bool {
    match s {
        Stmt::Loop(l) => l.var == var,
        Stmt::Contract(c) => [c.m, c.n, c.k].contains(&var),
        _ => false,
    }
}

/// Renames `old` to `new` in every affine index it reaches, except inside a loop or a
/// contraction that binds `old` itself (that one keeps its own).
struct Rename {
    old: VarId,
    new: VarId,
}

impl VisitorMut for Rename {
    fn stmt(&mut self, s: &mut Stmt) {
        if !binds(s, self.old) {
            walk_stmt_mut(self, s);
        }
    }

    fn affine(&mut self, a: &mut Affine) {
        for t in &mut a.terms {
            if t.var == self.old {
                t.var = self.new;
            }
        }
    }
}

/// Renames `old` to `new` in a statement (a loop that rebinds `old` keeps its own).
pub(super) fn rename_stmt(mut s: Stmt, old: VarId, new: VarId) -> Stmt {
    Rename { old, new }.stmt(&mut s);
    s
}

/// The index 0 (a size-1 dim, a fixed slot).
pub fn c0() -> Affine {
    Affine::constant(0)
}

pub fn v(var: VarId) -> Affine {
    Affine::var(var)
}

pub fn lp(var: VarId, extent: usize, body: Vec<Stmt>) -> Stmt {
    Stmt::Loop(Loop { var, extent: fx(extent), kind: LoopKind::Serial, body })
}

/// A loop along a unit-stride dim (a SIMD candidate).
pub fn vlp(var: VarId, extent: usize, body: Vec<Stmt>) -> Stmt {
    Stmt::Loop(Loop { var, extent: fx(extent), kind: LoopKind::Vector, body })
}

pub fn batch_loop(var: VarId, body: Vec<Stmt>) -> Stmt {
    Stmt::Loop(Loop { var, extent: Extent::Batch, kind: LoopKind::Serial, body })
}

/// Nested loops over `vars` with `extents`, outermost first.
pub fn nest(vars: &[VarId], extents: &[usize], body: Vec<Stmt>) -> Vec<Stmt> {
    let mut body = body;
    for (var, extent) in vars.iter().zip(extents).rev() {
        body = vec![lp(*var, *extent, body)];
    }
    body
}

pub fn set(acc: AccId, value: Expr) -> Stmt {
    Stmt::Set { acc, value }
}

/// `acc = acc + value`
pub fn add_to(acc: AccId, value: Expr) -> Stmt {
    Stmt::Set { acc, value: Expr::add(Expr::Acc(acc), value) }
}

pub fn store(arg: ArgId, index: Vec<Affine>, value: Expr) -> Stmt {
    Stmt::Store { arg, index, value, accumulate: false }
}

/// A store that overwrites when `first` and accumulates otherwise.
pub fn put(arg: ArgId, index: Vec<Affine>, value: Expr, first: bool) -> Stmt {
    Stmt::Store { arg, index, value, accumulate: !first }
}

pub fn accumulate(arg: ArgId, index: Vec<Affine>, value: Expr) -> Stmt {
    Stmt::Store { arg, index, value, accumulate: true }
}

pub fn load(arg: ArgId, index: Vec<Affine>) -> Expr {
    Expr::load(arg, index)
}

pub fn acc(a: AccId) -> Expr {
    Expr::Acc(a)
}

pub fn lit(x: f32) -> Expr {
    Expr::Const(x)
}

/// Runs `body` only where every index lies in `0..hi`; no guard when there is nothing
/// to check.
pub fn guarded(ranges: Vec<(Affine, usize)>, body: Vec<Stmt>) -> Vec<Stmt> {
    when(ranges.into_iter().map(|(index, hi)| in_range(index, 0, hi as i64)).collect(), body)
}

/// `lo <= index < hi`
pub fn in_range(index: Affine, lo: i64, hi: i64) -> Cond {
    Cond::InRange { index, lo, hi }
}

/// Runs `body` only where every condition holds; no `If` when there is none.
pub fn when(conds: Vec<Cond>, body: Vec<Stmt>) -> Vec<Stmt> {
    let mut conds = conds;
    match conds.len() {
        0 => body,
        1 => vec![Stmt::If { cond: conds.remove(0), then: body }],
        _ => vec![Stmt::If { cond: Cond::And(conds), then: body }],
    }
}

/// Nested loops over `vars` with `extents` like [`nest`], the innermost a vector loop
/// (it must run along a unit-stride dim).
pub fn vnest(vars: &[VarId], extents: &[usize], body: Vec<Stmt>) -> Vec<Stmt> {
    match (vars.split_last(), extents.split_last()) {
        (Some((&inner, outer)), Some((&extent, outer_extents))) => {
            nest(outer, outer_extents, vec![vlp(inner, extent, body)])
        }
        _ => body,
    }
}

/// `body` with `var` replaced by the constant `value` (a loop unrolled, or one iteration
/// taken out of it). `None` never happens for a constant; the type matches [`shifted`].
pub fn pinned(body: Vec<Stmt>, var: VarId, value: i64) -> Option<Vec<Stmt>> {
    substitute(body, Substitute { var, by: value, pin: true, ok: true })
}

/// `body` with `var` replaced by `var + by` (the part of a loop from `by` on, run as a loop
/// from 0). `None` when a term `⌊var/div⌋` cannot follow (`by` not a multiple of `div`).
pub fn shifted(body: Vec<Stmt>, var: VarId, by: i64) -> Option<Vec<Stmt>> {
    substitute(body, Substitute { var, by, pin: false, ok: true })
}

fn substitute(mut body: Vec<Stmt>, mut sub: Substitute) -> Option<Vec<Stmt>> {
    for s in &mut body {
        sub.stmt(s);
    }
    sub.ok.then_some(body)
}

/// Replaces `var` by the constant `by` (`pin`) or by `var + by` in every affine index,
/// except inside a loop or a contraction that binds `var` itself. Loop variables are never negative, so
/// `⌊c/div⌋` of a pinned constant `c ≥ 0` is a plain division, and `⌊(var + by)/div⌋ =
/// ⌊var/div⌋ + by/div` when `div` divides `by`.
struct Substitute {
    var: VarId,
    by: i64,
    pin: bool,
    ok: bool,
}

impl VisitorMut for Substitute {
    fn stmt(&mut self, s: &mut Stmt) {
        if !binds(s, self.var) {
            walk_stmt_mut(self, s);
        }
    }

    fn affine(&mut self, a: &mut Affine) {
        let mut offset = a.offset;
        let mut kept = Vec::with_capacity(a.terms.len());
        for t in a.terms.drain(..) {
            if t.var != self.var {
                kept.push(t);
            } else if self.pin {
                offset += t.coef * self.by.div_euclid(t.div);
            } else if self.by % t.div == 0 {
                offset += t.coef * (self.by / t.div);
                kept.push(t);
            } else {
                self.ok = false;
                kept.push(t);
            }
        }
        a.terms = kept;
        a.offset = offset;
    }
}

/// The contraction `c (+)= Σ_k a · b` over fresh variables `m < M`, `j < N`, `k < K` (the
/// column variable is not called `n`, the batch index's name): the closure gets the three
/// variables and returns the operands' indices `(a, b, c)`.
pub fn contract(
    kb: &mut KernelBuilder,
    extents: [Extent; 3],
    (a, b, c): (ArgId, ArgId, ArgId),
    accumulate: bool,
    index: impl FnOnce(VarId, VarId, VarId) -> (Vec<Affine>, Vec<Affine>, Vec<Affine>),
) -> Stmt {
    let [m, n, k] = [kb.var("m"), kb.var("j"), kb.var("k")];
    let (ai, bi, ci) = index(m, n, k);
    Stmt::Contract(Contract {
        m,
        n,
        k,
        extents,
        a: Operand { arg: a, index: ai },
        b: Operand { arg: b, index: bi },
        c: Operand { arg: c, index: ci },
        accumulate,
    })
}

/// A fixed trip count (checked, see [`size`]).
pub fn fx(n: usize) -> Extent {
    Extent::Fixed(size(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_beyond_u32_fails_the_kernel_instead_of_wrapping() {
        let mut kb = KernelBuilder::new("too_big");
        let x = kb.output("x", batched(&[1 << 32]));
        let [n, i] = [kb.var("n"), kb.var("i")];
        let body = vec![lp(i, 1 << 32, vec![store(x, vec![v(n), v(i)], lit(0.0))])];
        match kb.finish(n, Extent::Batch, body) {
            Err(Error::Internal(message)) => assert!(message.contains("4294967296"), "{message}"),
            other => panic!("expected an internal error, got {other:?}"),
        }
        // The failure belongs to that kernel alone: the next one builds.
        let mut kb = KernelBuilder::new("fits");
        let x = kb.output("x", batched(&[u32::MAX as usize]));
        let [n, i] = [kb.var("n"), kb.var("i")];
        let body = vec![lp(i, u32::MAX as usize, vec![store(x, vec![v(n), v(i)], lit(0.0))])];
        let k = kb.finish(n, Extent::Batch, body).expect("u32::MAX fits");
        assert_eq!(k.args[0].dims, vec![Dim::Batch, Dim::Fixed(u32::MAX)]);
    }
}
