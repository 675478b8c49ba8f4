//! Which loops run on vector lanes: the analysis behind the CPU backend's F32X4 path
//! (`cpu/vector.rs` emits the code for the [`Plan`] this returns).
//!
//! A vector loop `for v in 0..n` (a fixed `n >= 4`) is vectorized when its body is a
//! list of statements, each one of
//!
//! - a reduction `acc = acc + e`, `acc = e + acc`, `acc = acc - e`, `acc = max(acc, e)`
//!   or `acc = min(acc, e)` (either operand order for `max`/`min`), each accumulator
//!   reduced at most once, or
//! - a map `arg[index] = e` or `arg[index] += e` whose index moves one element per step
//!   of `v` (its flat offset is `v` plus terms without `v`),
//!
//! where `e` reads no reduced accumulator and is built from constants, loads that move
//! one element per step of `v` or do not depend on `v`, loads that move two elements per
//! step (a stride-2 pool's or conv's taps) of a buffer the loop does not store to, other
//! accumulators, the unary ops
//! (`exp`, `log`, `tanh` and `erf` as the lane versions of their one definition, see
//! `vmath`), the binary ops, and `Select`s over comparisons; any subexpression that does
//! not depend on `v` is allowed, and is computed once in front of the loop. Lanes must be independent: every load of an
//! argument the body stores to uses exactly the index of that store.
//!

use crate::ir::{AccId, Affine, ArgId, Binary, Cond, Expr, Extent, Kernel, Loop, Stmt, VarId};

/// Lanes of one vector (F32X4).
pub(crate) const LANES: u32 = 4;
/// At most this many vector accumulators in all: with the loads of one step they stay
/// within the 16 vector registers of x86-64 (at most 11 live vectors).
pub(crate) const MAX_VECTOR_ACCS: u32 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reduction {
    Add,
    Sub,
    Max,
    Min,
}

pub(crate) enum Item<'k> {
    Reduce { acc: AccId, op: Reduction, value: &'k Expr },
    Store { arg: ArgId, index: &'k [Affine], value: &'k Expr, accumulate: bool },
}

impl Item<'_> {
    pub(crate) fn value(&self) -> &Expr {
        match self {
            Item::Reduce { value, .. } | Item::Store { value, .. } => value,
        }
    }
}

/// How a vector loop runs on lanes.
pub(crate) struct Plan<'k> {
    pub(crate) k: &'k Kernel,
    pub(crate) n: u32,
    pub(crate) var: VarId,
    pub(crate) reduced: Vec<AccId>,
    /// Vectors per iteration of the main loop.
    pub(crate) unroll: u32,
    /// Each argument the body stores to, with the index of its stores.
    pub(crate) stored: Vec<(ArgId, &'k [Affine])>,
    pub(crate) items: Vec<Item<'k>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// The flat offset moves one element per step of the loop variable.
    Unit,
    /// The flat offset moves two elements per step (a stride-2 window's taps): a load
    /// reads the even elements of seven consecutive ones, never past the last it needs.
    Pair,
    /// The flat offset does not depend on the loop variable.
    Invariant,
    Other,
}

/// The plan for a vector loop, or `None` when it must run as scalar code.
pub(crate) fn plan<'k>(k: &'k Kernel, l: &'k Loop) -> Option<Plan<'k>> {
    let Extent::Fixed(n) = l.extent else {
        return None;
    };
    if n < LANES {
        return None;
    }
    let mut p = Plan { k, n, var: l.var, reduced: Vec::new(), unroll: 2, stored: Vec::new(), items: Vec::new() };
    for s in &l.body {
        match s {
            Stmt::Set { acc, value } => {
                let (op, e) = reduction(*acc, value)?;
                if p.reduced.contains(acc) {
                    return None;
                }
                p.reduced.push(*acc);
                p.items.push(Item::Reduce { acc: *acc, op, value: e });
            }
            Stmt::Store { arg, index, value, accumulate } => {
                if p.step(*arg, index) != Step::Unit {
                    return None;
                }
                match p.stored.iter().find(|(a, _)| a == arg) {
                    Some((_, ix)) if *ix != index.as_slice() => return None,
                    Some(_) => {}
                    None => p.stored.push((*arg, index)),
                }
                p.items.push(Item::Store { arg: *arg, index, value, accumulate: *accumulate });
            }
            Stmt::Loop(_) | Stmt::If { .. } | Stmt::Contract(_) => return None,
        }
    }
    if p.items.iter().all(|item| p.lanes_ok(item.value())) {
        // Independent accumulators hide the latency of the adds (4 cycles, 2 a cycle);
        // a map has no chain to hide and unrolls twice to halve the loop overhead.
        let r = p.reduced.len() as u32;
        p.unroll = if r == 0 { 2 } else { (MAX_VECTOR_ACCS / r).clamp(1, 4) };
        Some(p)
    } else {
        None
    }
}

/// `(op, e)` when `value` reduces `acc` by `e`.
fn reduction(acc: AccId, value: &Expr) -> Option<(Reduction, &Expr)> {
    let Expr::Binary(op, a, b) = value else {
        return None;
    };
    let is_acc = |e: &Expr| *e == Expr::Acc(acc);
    match op {
        Binary::Add | Binary::Max | Binary::Min => {
            let e = if is_acc(a) {
                b
            } else if is_acc(b) {
                a
            } else {
                return None;
            };
            let op = match op {
                Binary::Add => Reduction::Add,
                Binary::Max => Reduction::Max,
                _ => Reduction::Min,
            };
            Some((op, e))
        }
        Binary::Sub if is_acc(a) => Some((Reduction::Sub, b)),
        _ => None,
    }
}

impl Plan<'_> {
    pub(crate) fn step(&self, arg: ArgId, index: &[Affine]) -> Step {
        let Some(a) = self.k.args.get(arg.0 as usize) else {
            return Step::Other;
        };
        let mut coef: i128 = 0;
        let mut uses = false;
        for (ix, stride) in index.iter().zip(a.strides()) {
            for t in ix.terms.iter().filter(|t| t.var == self.var) {
                if t.div != 1 {
                    return Step::Other;
                }
                uses = true;
                coef += t.coef as i128 * stride as i128;
            }
        }
        match (uses, coef) {
            (false, _) => Step::Invariant,
            (true, 1) => Step::Unit,
            (true, 2) => Step::Pair,
            _ => Step::Other,
        }
    }

    /// Whether `e` varies along the loop (or reads a reduced accumulator).
    pub(crate) fn depends(&self, e: &Expr) -> bool {
        match e {
            Expr::Const(_) => false,
            Expr::Load { arg, index } => self.step(*arg, index) != Step::Invariant,
            Expr::Acc(a) => self.reduced.contains(a),
            Expr::Index(a) => a.terms.iter().any(|t| t.var == self.var),
            Expr::Unary(_, x) => self.depends(x),
            Expr::Binary(_, a, b) => self.depends(a) || self.depends(b),
            Expr::Select { cond, then, otherwise } => {
                self.cond_depends(cond) || self.depends(then) || self.depends(otherwise)
            }
        }
    }

    pub(crate) fn cond_depends(&self, c: &Cond) -> bool {
        match c {
            Cond::InRange { index, .. } => index.terms.iter().any(|t| t.var == self.var),
            Cond::Cmp { a, b, .. } => self.depends(a) || self.depends(b),
            Cond::And(cs) => cs.iter().any(|c| self.cond_depends(c)),
        }
    }

    /// Whether `e` can be evaluated on four lanes at once.
    pub(crate) fn lanes_ok(&self, e: &Expr) -> bool {
        if !self.depends(e) {
            return self.invariant_ok(e);
        }
        match e {
            Expr::Const(_) => true,
            Expr::Load { arg, index } => match self.step(*arg, index) {
                Step::Unit => self.stored.iter().all(|(a, ix)| a != arg || *ix == index.as_slice()),
                Step::Pair => self.stored.iter().all(|(a, _)| a != arg),
                Step::Invariant | Step::Other => false,
            },
            Expr::Acc(_) | Expr::Index(_) => false,
            Expr::Unary(_, x) => self.lanes_ok(x),
            Expr::Binary(_, a, b) => self.lanes_ok(a) && self.lanes_ok(b),
            Expr::Select { cond, then, otherwise } => {
                self.cond_lanes_ok(cond) && self.lanes_ok(then) && self.lanes_ok(otherwise)
            }
        }
    }

    pub(crate) fn cond_lanes_ok(&self, c: &Cond) -> bool {
        if !self.cond_depends(c) {
            return self.cond_invariant_ok(c);
        }
        match c {
            Cond::InRange { .. } => false,
            Cond::Cmp { a, b, .. } => self.lanes_ok(a) && self.lanes_ok(b),
            Cond::And(cs) => cs.iter().all(|c| self.cond_lanes_ok(c)),
        }
    }

    /// A loop-invariant expression may be computed once in front of the loop unless it
    /// reads a buffer the loop writes.
    pub(crate) fn invariant_ok(&self, e: &Expr) -> bool {
        match e {
            Expr::Const(_) | Expr::Acc(_) | Expr::Index(_) => true,
            Expr::Load { arg, .. } => self.stored.iter().all(|(a, _)| a != arg),
            Expr::Unary(_, x) => self.invariant_ok(x),
            Expr::Binary(_, a, b) => self.invariant_ok(a) && self.invariant_ok(b),
            Expr::Select { cond, then, otherwise } => {
                self.cond_invariant_ok(cond) && self.invariant_ok(then) && self.invariant_ok(otherwise)
            }
        }
    }

    pub(crate) fn cond_invariant_ok(&self, c: &Cond) -> bool {
        match c {
            Cond::InRange { .. } => true,
            Cond::Cmp { a, b, .. } => self.invariant_ok(a) && self.invariant_ok(b),
            Cond::And(cs) => cs.iter().all(|c| self.cond_invariant_ok(c)),
        }
    }
}
