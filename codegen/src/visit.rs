//! The one traversal of the kernel IR. Analyses implement [`Visitor`] and override only the
//! nodes they care about (an access, a register read, a loop); the `walk_*` functions visit
//! everything else in program order: a loop's body between `enter_loop` and `exit_loop`, a
//! store's value before the store itself, a contraction's operand reads before its write.
//! Rewrites implement [`VisitorMut`], which reaches every statement, every access's index and
//! every affine index (loop variables that statements bind are left to the rewrite).
//!
//! Backends and the interpreter do not use it: they give every node its meaning and so
//! match on it themselves.

use crate::ir::{Affine, ArgId, Cond, Expr, Loop, Stmt};

/// A read-only walk over statements, expressions and conditions. Every method's default
/// visits the node's children.
pub trait Visitor<'k> {
    fn stmt(&mut self, s: &'k Stmt) {
        walk_stmt(self, s);
    }

    fn expr(&mut self, e: &'k Expr) {
        walk_expr(self, e);
    }

    fn cond(&mut self, c: &'k Cond) {
        walk_cond(self, c);
    }

    /// A load (`store == false`) or a store of `arg[index]`.
    fn access(&mut self, _arg: ArgId, _index: &'k [Affine], _store: bool) {}

    fn enter_loop(&mut self, _l: &'k Loop) {}

    fn exit_loop(&mut self, _l: &'k Loop) {}
}

pub fn walk_body<'k, V: Visitor<'k> + ?Sized>(v: &mut V, body: &'k [Stmt]) {
    for s in body {
        v.stmt(s);
    }
}

pub fn walk_stmt<'k, V: Visitor<'k> + ?Sized>(v: &mut V, s: &'k Stmt) {
    match s {
        Stmt::Loop(l) => {
            v.enter_loop(l);
            walk_body(v, &l.body);
            v.exit_loop(l);
        }
        Stmt::Set { value, .. } => v.expr(value),
        Stmt::Store { arg, index, value, .. } => {
            v.expr(value);
            v.access(*arg, index, true);
        }
        Stmt::If { cond, then } => {
            v.cond(cond);
            walk_body(v, then);
        }
        Stmt::Contract(c) => {
            v.access(c.a.arg, &c.a.index, false);
            v.access(c.b.arg, &c.b.index, false);
            if c.accumulate {
                v.access(c.c.arg, &c.c.index, false);
            }
            v.access(c.c.arg, &c.c.index, true);
        }
    }
}

pub fn walk_expr<'k, V: Visitor<'k> + ?Sized>(v: &mut V, e: &'k Expr) {
    match e {
        Expr::Const(_) | Expr::Acc(_) | Expr::Index(_) => {}
        Expr::Load { arg, index } => v.access(*arg, index, false),
        Expr::Unary(_, a) => v.expr(a),
        Expr::Binary(_, a, b) => {
            v.expr(a);
            v.expr(b);
        }
        Expr::Select { cond, then, otherwise } => {
            v.cond(cond);
            v.expr(then);
            v.expr(otherwise);
        }
    }
}

pub fn walk_cond<'k, V: Visitor<'k> + ?Sized>(v: &mut V, c: &'k Cond) {
    match c {
        Cond::InRange { .. } => {}
        Cond::Cmp { a, b, .. } => {
            v.expr(a);
            v.expr(b);
        }
        Cond::And(cs) => cs.iter().for_each(|c| v.cond(c)),
    }
}

/// A rewriting walk: every statement (`stmt`) and expression (`expr`), whose defaults visit
/// their children, every access's index (`index`, whose default visits its affines) and
/// every affine index (`affine`) of loads, stores, conditions, index values and contraction
/// operands.
pub trait VisitorMut {
    fn stmt(&mut self, s: &mut Stmt) {
        walk_stmt_mut(self, s);
    }

    fn expr(&mut self, e: &mut Expr) {
        walk_expr_mut(self, e);
    }

    fn affine(&mut self, _a: &mut Affine) {}

    /// The index of an access to `arg` (a load, a store or a contraction operand); the
    /// default visits each of its affines.
    fn index(&mut self, _arg: ArgId, index: &mut Vec<Affine>) {
        index.iter_mut().for_each(|a| self.affine(a));
    }
}

pub fn walk_body_mut<V: VisitorMut + ?Sized>(v: &mut V, body: &mut [Stmt]) {
    for s in body {
        v.stmt(s);
    }
}

pub fn walk_stmt_mut<V: VisitorMut + ?Sized>(v: &mut V, s: &mut Stmt) {
    match s {
        Stmt::Loop(l) => walk_body_mut(v, &mut l.body),
        Stmt::Set { value, .. } => v.expr(value),
        Stmt::Store { arg, index, value, .. } => {
            v.expr(value);
            v.index(*arg, index);
        }
        Stmt::If { cond, then } => {
            walk_cond_mut(v, cond);
            walk_body_mut(v, then);
        }
        Stmt::Contract(c) => {
            for op in [&mut c.a, &mut c.b, &mut c.c] {
                v.index(op.arg, &mut op.index);
            }
        }
    }
}

pub fn walk_expr_mut<V: VisitorMut + ?Sized>(v: &mut V, e: &mut Expr) {
    match e {
        Expr::Const(_) | Expr::Acc(_) => {}
        Expr::Index(a) => v.affine(a),
        Expr::Load { arg, index } => v.index(*arg, index),
        Expr::Unary(_, a) => v.expr(a),
        Expr::Binary(_, a, b) => {
            v.expr(a);
            v.expr(b);
        }
        Expr::Select { cond, then, otherwise } => {
            walk_cond_mut(v, cond);
            v.expr(then);
            v.expr(otherwise);
        }
    }
}

fn walk_cond_mut<V: VisitorMut + ?Sized>(v: &mut V, c: &mut Cond) {
    match c {
        Cond::InRange { index, .. } => v.affine(index),
        Cond::Cmp { a, b, .. } => {
            v.expr(a);
            v.expr(b);
        }
        Cond::And(cs) => cs.iter_mut().for_each(|c| walk_cond_mut(v, c)),
    }
}
