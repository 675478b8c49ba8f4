//! Layers written in index notation (`layer NAME(...) { ... }`): checking a definition on
//! its own, once, and instantiating it at every call into an [`IndexLayer`].
//!
//! [`Checker::define`] checks everything that does not depend on sizes: the signature, the
//! names, which tensors each statement may read, that indices are affine, where `sum` may
//! stand, that every index variable is bound and every parameter read by plain variables.
//! [`Checker::index_call`] binds a call's arguments, unifies the declared dims with the
//! actual shapes (size symbols), derives every index variable's range and proves every read
//! in bounds (or in the declared zero padding): the invariants of [`crate::index_layer`].
//!
//! A mistake found at a call that lies in the definition's body (a range that cannot be
//! derived, a read out of bounds) points at the body, names the call as a secondary label,
//! and is reported once even when the layer is called again with the same sizes.

use std::collections::HashMap;
use std::rc::Rc;

use crate::diag::{did_you_mean, Diagnostic, Span};
use crate::grad::{intern, Access, Expr, Func, Index, Term, Var};
use crate::graph::{Activation, NodeId, Op};
use crate::index_layer::{IndexLayer, IndexStmt, IndexTerm, LocalKind, LocalTensor};
use crate::ops;
use crate::syntax::ast::{self, BinOp, BodyExpr, BodyExprKind, BodyItem, Ident, PadDim, SigParam, SizeDim};

use super::limits::{self, MAX_DIM, MAX_EXAMPLE_ELEMENTS};
use super::shapes::Built;
use super::{given_twice, missing_argument, too_many_arguments, unknown_argument, Checker, Value};

/// A definition as the checker keeps it: where its name is, whether it was called, and the
/// checked definition (`None` when it has errors, which were reported).
#[derive(Debug)]
pub(super) struct DefEntry {
    pub span: Span,
    pub def: Option<Rc<Def>>,
    pub used: bool,
}

/// A definition checked on its own: everything that does not depend on a call's sizes.
#[derive(Debug)]
pub(super) struct Def {
    name: String,
    inputs: Vec<InputDecl>,
    /// The integer parameters, which are size symbols too.
    sizes: Vec<Ident>,
    params: Vec<ParamDecl>,
    stmts: Vec<StmtDef>,
}

#[derive(Debug)]
struct InputDecl {
    name: String,
    dims: Vec<SizeDim>,
    pad: Vec<(usize, usize)>,
    /// The whole `x: [C, H, W] pad (...)`.
    span: Span,
}

#[derive(Debug)]
struct ParamDecl {
    name: String,
    dims: Vec<SizeDim>,
}

#[derive(Debug)]
struct StmtDef {
    lhs: String,
    vars: Vec<Var>,
    terms: Vec<IndexTerm>,
    /// Every variable of the statement (left-hand side, then each term's sum), once, with
    /// the place it is introduced.
    var_spans: Vec<(Var, Span)>,
    /// Every read of the right-hand side, in source order.
    reads: Vec<ReadDef>,
}

#[derive(Debug)]
struct ReadDef {
    access: Access,
    span: Span,
}

/// What a name in a layer's body stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TensorKind {
    Input,
    Param,
    /// Defined by the statement of this index.
    Temp(usize),
}

#[derive(Debug, Clone, Copy)]
struct TensorDecl {
    kind: TensorKind,
    rank: usize,
    span: Span,
}

/// The scalar functions a body may call, by name.
fn function(name: &str) -> Option<Func> {
    match name {
        "exp" => Some(Func::Exp),
        "log" => Some(Func::Log),
        _ => Activation::ALL.into_iter().find(|a| a.name() == name).map(Func::Activation),
    }
}

fn function_names() -> Vec<&'static str> {
    let mut names = vec!["exp", "log"];
    names.extend(Activation::ALL.iter().map(|a| a.name()));
    names
}

fn flat_mul(a: Expr, b: Expr) -> Expr {
    let mut items = Vec::new();
    for e in [a, b] {
        match e {
            Expr::Mul(inner) => items.extend(inner),
            other => items.push(other),
        }
    }
    Expr::Mul(items)
}

fn flat_add(a: Expr, b: Expr) -> Expr {
    let mut items = Vec::new();
    for e in [a, b] {
        match e {
            Expr::Add(inner) => items.extend(inner),
            other => items.push(other),
        }
    }
    Expr::Add(items)
}

fn negate(e: Expr) -> Expr {
    match e {
        Expr::Num(x) => Expr::Num(-x),
        other => flat_mul(Expr::Num(-1.0), other),
    }
}

fn batch_index(span: Span) -> Diagnostic {
    Diagnostic::error("E0147", "`n` is the batch index of the derived equations; use another name", span)
        .with_label("reserved index name")
        .with_note("the per-example gradient equations index examples by `n`, so a layer's own indices cannot")
}

/// An affine index: its terms (variable, coefficient, where it occurs) and its offset.
type Affine = (Vec<(Var, i64, Span)>, i64);

/// Checks one definition's body; every diagnostic goes to `diags`.
struct DefCx<'a> {
    diags: &'a mut Vec<Diagnostic>,
    ok: bool,
    layer: &'a str,
    tensors: HashMap<String, TensorDecl>,
    /// The size symbols: the integer parameters and the symbols of the inputs' dims.
    sizes: Vec<String>,
    /// The statement being checked.
    current: usize,
    /// The reads of the term being checked, each with its variables where they occur.
    reads: Vec<(ReadDef, Vec<(Var, Span)>)>,
}

impl DefCx<'_> {
    fn error(&mut self, d: Diagnostic) {
        self.diags.push(d);
        self.ok = false;
    }

    /// Declares a tensor name, or reports that the layer already has one by that name.
    fn declare(&mut self, name: &Ident, kind: TensorKind, rank: usize) {
        if let Some(prev) = self.tensors.get(&name.name) {
            let prev = prev.span;
            self.error(
                Diagnostic::error("E0143", format!("`{}` is already defined in this layer", name.name), name.span)
                    .with_label("defined again here")
                    .with_secondary(prev, "first defined here")
                    .with_note("inputs, parameters and the tensor of each statement need names of their own"),
            );
            return;
        }
        self.tensors.insert(name.name.clone(), TensorDecl { kind, rank, span: name.span });
    }

    /// Checks a declared dim: a positive integer within the limits, or (`known`) a size symbol.
    fn dim(&mut self, d: &SizeDim, symbols_known: bool) {
        match d {
            SizeDim::Int(k) if k.value < 1 => self.error(
                Diagnostic::error("E0116", format!("dimension {} is not positive", k.value), k.span)
                    .with_label("every dimension must be at least 1"),
            ),
            SizeDim::Int(k) if k.value as u64 > MAX_DIM => {
                self.error(limits::too_large_value("dimension", k.value, k.span))
            }
            SizeDim::Int(_) => {}
            SizeDim::Sym(s) if !symbols_known => {
                if !self.sizes.contains(&s.name) {
                    self.sizes.push(s.name.clone());
                }
            }
            SizeDim::Sym(s) if self.sizes.contains(&s.name) => {}
            SizeDim::Sym(s) => {
                let mut d = Diagnostic::error("E0144", format!("unknown size `{}`", s.name), s.span)
                    .with_label("not a size of this layer");
                if let Some(m) = did_you_mean(&s.name, self.sizes.iter().map(String::as_str)) {
                    d = d.with_note(format!("did you mean `{m}`?"));
                }
                let known = if self.sizes.is_empty() {
                    "this layer names no sizes".to_string()
                } else {
                    format!("the sizes of `{}`: {}", self.layer, self.sizes.join(", "))
                };
                self.error(d.with_note(format!(
                    "{known}; a parameter's dims are integers or sizes named in the signature (an input's dims, an integer parameter)"
                )));
            }
        }
    }

    /// The affine index `e` is, or a diagnostic.
    fn affine(&mut self, e: &BodyExpr) -> Option<Affine> {
        let not_affine = |why: &str| {
            Diagnostic::error("E0150", "an index must be affine in the index variables", e.span)
                .with_label(why.to_string())
                .with_note("an index is a sum of index variables times integers plus an integer, e.g. `2*h + i - 1`")
        };
        let overflow = || {
            Diagnostic::error("E0150", "an index constant is too large", e.span)
                .with_label("does not fit in 64 bits")
                .with_note("index constants and coefficients must fit in 64-bit integers")
        };
        match &e.kind {
            BodyExprKind::Int(k) => Some((vec![], *k)),
            BodyExprKind::Var(v) => Some((vec![(intern(&v.name), 1, v.span)], 0)),
            BodyExprKind::Neg(inner) => {
                let (terms, off) = self.affine(inner)?;
                self.scale(terms, off, -1, e.span)
            }
            BodyExprKind::Bin(op @ (BinOp::Add | BinOp::Sub), a, b) => {
                let a = self.affine(a);
                let b = self.affine(b);
                let ((mut terms, off_a), (b_terms, off_b)) = (a?, b?);
                let (b_terms, off_b) =
                    if *op == BinOp::Sub { self.scale(b_terms, off_b, -1, e.span)? } else { (b_terms, off_b) };
                let Some(off) = off_a.checked_add(off_b) else {
                    self.error(overflow());
                    return None;
                };
                for (v, c, s) in b_terms {
                    match terms.iter_mut().find(|(w, _, _)| *w == v) {
                        Some(t) => match t.1.checked_add(c) {
                            Some(sum) => t.1 = sum,
                            None => {
                                self.error(overflow());
                                return None;
                            }
                        },
                        None => terms.push((v, c, s)),
                    }
                }
                terms.retain(|(_, c, _)| *c != 0);
                Some((terms, off))
            }
            BodyExprKind::Bin(BinOp::Mul, a, b) => {
                let a = self.affine(a);
                let b = self.affine(b);
                let ((ta, oa), (tb, ob)) = (a?, b?);
                match (ta.is_empty(), tb.is_empty()) {
                    (true, _) => self.scale(tb, ob, oa, e.span),
                    (false, true) => self.scale(ta, oa, ob, e.span),
                    (false, false) => {
                        self.error(not_affine("a product of index variables"));
                        None
                    }
                }
            }
            BodyExprKind::Bin(BinOp::Div, ..) => {
                self.error(not_affine("division is not allowed in an index"));
                None
            }
            BodyExprKind::Float(_) => {
                self.error(not_affine("an index is an integer"));
                None
            }
            BodyExprKind::Read(..) => {
                self.error(not_affine("a tensor element cannot be an index"));
                None
            }
            BodyExprKind::Call(..) | BodyExprKind::Sum(..) => {
                self.error(not_affine("not allowed in an index"));
                None
            }
        }
    }

    fn scale(&mut self, terms: Vec<(Var, i64, Span)>, off: i64, k: i64, span: Span) -> Option<Affine> {
        let scaled: Option<Vec<(Var, i64, Span)>> =
            terms.into_iter().map(|(v, c, s)| c.checked_mul(k).map(|c| (v, c, s))).collect();
        match (scaled, off.checked_mul(k)) {
            (Some(mut t), Some(o)) => {
                t.retain(|(_, c, _)| *c != 0);
                Some((t, o))
            }
            _ => {
                self.error(
                    Diagnostic::error("E0150", "an index constant is too large", span)
                        .with_label("does not fit in 64 bits")
                        .with_note("index constants and coefficients must fit in 64-bit integers"),
                );
                None
            }
        }
    }

    /// A read `t[index, ...]` of the right-hand side.
    fn read(&mut self, t: &Ident, index: &[BodyExpr], span: Span) -> Option<Expr> {
        let mut ok = true;
        match self.tensors.get(&t.name).copied() {
            None => {
                let mut d = Diagnostic::error("E0148", format!("unknown tensor `{}`", t.name), t.span)
                    .with_label("not an input, parameter or tensor of this layer");
                if let Some(m) = did_you_mean(&t.name, self.tensors.keys().map(String::as_str)) {
                    d = d.with_note(format!("did you mean `{m}`?"));
                }
                self.error(d);
                ok = false;
            }
            Some(TensorDecl { kind: TensorKind::Temp(k), span: at, .. }) if k >= self.current => {
                let (label, note) = if k == self.current {
                    ("a statement cannot read the tensor it defines", "compute it from other tensors")
                } else {
                    ("defined by a later statement", "a statement reads only inputs, parameters and earlier statements")
                };
                self.error(
                    Diagnostic::error("E0148", format!("`{}` is read before it is defined", t.name), t.span)
                        .with_label(label)
                        .with_secondary(at, "defined here")
                        .with_note(note),
                );
                ok = false;
            }
            Some(decl) if decl.rank != index.len() => {
                self.error(
                    Diagnostic::error(
                        "E0149",
                        format!("`{}` has {} dims but is read with {} indices", t.name, decl.rank, index.len()),
                        span,
                    )
                    .with_label(format!("expected {} indices", decl.rank))
                    .with_secondary(decl.span, "declared here")
                    .with_note("a read gives one index per dim"),
                );
                ok = false;
            }
            Some(_) => {}
        }
        let mut indices = Vec::new();
        let mut occurrences = Vec::new();
        for ix in index {
            match self.affine(ix) {
                Some((terms, offset)) => {
                    occurrences.extend(terms.iter().map(|(v, _, s)| (*v, *s)));
                    let terms = terms.into_iter().map(|(var, coef, _)| Term { var, coef, div: 1 }).collect();
                    indices.push(Index { terms, offset });
                }
                None => ok = false,
            }
        }
        if !ok {
            return None;
        }
        let access = Access { tensor: t.name.clone(), index: indices };
        self.reads.push((ReadDef { access: access.clone(), span }, occurrences));
        Some(Expr::Read(access))
    }

    /// A value expression (no `sum`: those are terms, split off by [`DefCx::stmt`]).
    fn value(&mut self, e: &BodyExpr) -> Option<Expr> {
        match &e.kind {
            BodyExprKind::Int(k) => Some(Expr::Num(*k as f64)),
            BodyExprKind::Float(x) => Some(Expr::Num(*x)),
            BodyExprKind::Var(v) => {
                let note = match self.tensors.get(&v.name) {
                    Some(_) => format!("`{}` is a tensor: read an element with an index, e.g. `{}[i]`", v.name, v.name),
                    None if self.sizes.contains(&v.name) => {
                        format!("`{}` is a size; sizes are not values (write the number instead)", v.name)
                    }
                    None => "a body computes with tensor elements and numbers; an index is not a value".to_string(),
                };
                self.error(
                    Diagnostic::error("E0156", format!("`{}` is not a value", v.name), v.span)
                        .with_label("a bare name here")
                        .with_note(note),
                );
                None
            }
            BodyExprKind::Read(t, index) => self.read(t, index, e.span),
            BodyExprKind::Call(f, args) => {
                let values: Vec<Option<Expr>> = args.iter().map(|a| self.value(a)).collect();
                let Some(func) = function(&f.name) else {
                    let mut d = Diagnostic::error("E0156", format!("unknown function `{}`", f.name), f.span)
                        .with_label("not a function of the index notation");
                    if let Some(m) = did_you_mean(&f.name, function_names()) {
                        d = d.with_note(format!("did you mean `{m}`?"));
                    }
                    self.error(d.with_note(format!(
                        "functions: {}; layers cannot be called inside a layer",
                        function_names().join(", ")
                    )));
                    return None;
                };
                if args.len() != 1 {
                    self.error(
                        Diagnostic::error("E0156", format!("`{}` takes one argument", f.name), e.span)
                            .with_label(format!("{} arguments given", args.len()))
                            .with_note("functions apply elementwise to one value"),
                    );
                    return None;
                }
                let arg = values.into_iter().next().flatten()?;
                Some(Expr::Apply(func, vec![arg]))
            }
            BodyExprKind::Sum(..) => {
                self.error(
                    Diagnostic::error("E0151", "`sum` must be a whole term of the right-hand side", e.span)
                        .with_label("a sum nested in an expression")
                        .with_note("`y[o] = sum(i: ...) + b[o]` and `y[o] = a[o] - sum(i: ...)` are fine; a sum inside a product, a function or another sum is not")
                        .with_note("bind it to a tensor first: `s[o] = sum(i: ...);`, then read `s[o]`"),
                );
                None
            }
            BodyExprKind::Neg(inner) => self.value(inner).map(negate),
            BodyExprKind::Bin(op, a, b) => {
                let (a, b) = (self.value(a), self.value(b));
                let (a, b) = (a?, b?);
                Some(match op {
                    BinOp::Add => flat_add(a, b),
                    BinOp::Sub => Expr::sub(a, b),
                    BinOp::Mul => flat_mul(a, b),
                    BinOp::Div => Expr::div(a, b),
                })
            }
        }
    }

    /// Checks one statement (the `current`-th).
    fn stmt(&mut self, s: &ast::Stmt) -> Option<StmtDef> {
        let ok_before = self.ok;
        self.ok = true;
        let mut vars: Vec<Var> = Vec::new();
        let mut var_spans: Vec<(Var, Span)> = Vec::new();
        if s.index.is_empty() {
            self.error(
                Diagnostic::error("E0146", format!("`{}` needs at least one index", s.lhs.name), s.lhs.span)
                    .with_label("no index")
                    .with_note("a statement defines a tensor with one dim per index: `y[o] = ...`"),
            );
        }
        for ix in &s.index {
            match &ix.kind {
                BodyExprKind::Var(v) if vars.contains(&intern(&v.name)) => {
                    let first = var_spans.iter().find(|(w, _)| *w == v.name).map(|(_, s)| *s).unwrap_or(v.span);
                    self.error(
                        Diagnostic::error(
                            "E0146",
                            format!("index `{}` appears twice on the left-hand side", v.name),
                            v.span,
                        )
                        .with_label("again here")
                        .with_secondary(first, "first here")
                        .with_note("the left-hand side is indexed by distinct names, one per dim"),
                    )
                }
                BodyExprKind::Var(v) => {
                    if v.name == "n" {
                        self.error(batch_index(v.span));
                    }
                    let var = intern(&v.name);
                    vars.push(var);
                    var_spans.push((var, v.span));
                }
                _ => {
                    self.error(
                        Diagnostic::error("E0146", "the left-hand side is indexed by plain names", ix.span)
                            .with_label("not a plain index name")
                            .with_note(format!(
                                "write the computed position on the right-hand side: `{}[h] = x[2*h + 1]`",
                                s.lhs.name
                            )),
                    );
                    // Its names count as bound, so that their reads are not reported too.
                    names_in(ix, &mut vars);
                }
            }
        }

        // The right-hand side, split into its top-level additive pieces.
        let mut pieces = Vec::new();
        additive_pieces(&s.rhs, false, &mut pieces);
        let has_sum = pieces.iter().any(|(_, e)| matches!(e.kind, BodyExprKind::Sum(..)));
        let mut terms: Vec<IndexTerm> = Vec::new();
        let mut reads: Vec<ReadDef> = Vec::new();
        if !has_sum {
            if let Some(body) = self.value(&s.rhs) {
                terms.push(IndexTerm { sum: vec![], body });
            }
            self.finish_term(&vars, &[], &mut reads);
        } else {
            // Each sum is a term of its own; the other pieces form one more term, placed
            // where the first of them stands.
            let mut rest: Option<Expr> = None;
            let mut rest_at: Option<usize> = None;
            for (neg, piece) in pieces {
                if let BodyExprKind::Sum(sum_vars, body) = &piece.kind {
                    let mut sum: Vec<Var> = Vec::new();
                    for v in sum_vars {
                        let var = intern(&v.name);
                        if v.name == "n" {
                            self.error(batch_index(v.span));
                        }
                        if vars.contains(&var) {
                            self.error(
                                Diagnostic::error(
                                    "E0152",
                                    format!("`{}` is on the left-hand side, so it cannot be summed over", v.name),
                                    v.span,
                                )
                                .with_label("summed over here")
                                .with_note(
                                    "a sum runs over variables the result is not indexed by; rename one of them",
                                ),
                            );
                        } else if sum.contains(&var) {
                            self.error(
                                Diagnostic::error("E0152", format!("`{}` is summed over twice", v.name), v.span)
                                    .with_label("listed again")
                                    .with_note("list each summed variable once: `sum(i, j: ...)`"),
                            );
                        } else {
                            sum.push(var);
                            if !var_spans.iter().any(|(w, _)| *w == var) {
                                var_spans.push((var, v.span));
                            }
                        }
                    }
                    if let Some(body) = self.value(body) {
                        let body = if neg { negate(body) } else { body };
                        terms.push(IndexTerm { sum: sum.clone(), body });
                    }
                    self.finish_term(&vars, &sum, &mut reads);
                } else {
                    if let Some(v) = self.value(piece) {
                        rest = Some(match (rest, neg) {
                            (None, false) => v,
                            (None, true) => negate(v),
                            (Some(acc), false) => flat_add(acc, v),
                            (Some(acc), true) => Expr::sub(acc, v),
                        });
                    }
                    rest_at.get_or_insert(terms.len());
                    self.finish_term(&vars, &[], &mut reads);
                }
            }
            if let (Some(body), Some(at)) = (rest, rest_at) {
                terms.insert(at, IndexTerm { sum: vec![], body });
            }
        }
        let ok = self.ok;
        self.ok = ok_before && ok;
        ok.then(|| StmtDef { lhs: s.lhs.name.clone(), vars, terms, var_spans, reads })
    }

    /// Checks the reads of the term just converted: every variable bound, parameters read
    /// by distinct plain variables. Moves them into `reads`.
    fn finish_term(&mut self, vars: &[Var], sum: &[Var], reads: &mut Vec<ReadDef>) {
        let mut unbound: Vec<Var> = Vec::new();
        for (read, occurrences) in std::mem::take(&mut self.reads) {
            for (v, span) in &occurrences {
                if unbound.contains(v) {
                    continue;
                }
                if !vars.contains(v) && !sum.contains(v) {
                    unbound.push(*v);
                    let mut d = Diagnostic::error("E0153", format!("unbound index `{v}`"), *span)
                        .with_label("not on the left-hand side and not summed over");
                    if self.sizes.iter().any(|s| s == v) {
                        d = d.with_note(format!("`{v}` is a size; sizes cannot appear in an index"));
                    }
                    self.error(d.with_note(format!(
                        "index it on the left-hand side, or sum over it: `sum({v}: ...)` as a whole term"
                    )));
                }
            }
            let is_param = self.tensors.get(&read.access.tensor).is_some_and(|t| t.kind == TensorKind::Param);
            if is_param && !read.access.is_plain() {
                self.error(
                    Diagnostic::error(
                        "E0154",
                        format!("the parameter `{}` must be read by distinct plain indices", read.access.tensor),
                        read.span,
                    )
                    .with_label("a computed or repeated index")
                    .with_note(format!(
                        "read parameters as `{}[o, i]`; shift or stride the inputs instead",
                        read.access.tensor
                    )),
                );
            }
            reads.push(read);
        }
    }
}

/// Adds the index variables named in `e` to `out`.
fn names_in(e: &BodyExpr, out: &mut Vec<Var>) {
    match &e.kind {
        BodyExprKind::Var(v) => out.push(intern(&v.name)),
        BodyExprKind::Read(_, items) | BodyExprKind::Call(_, items) => items.iter().for_each(|i| names_in(i, out)),
        BodyExprKind::Sum(_, inner) | BodyExprKind::Neg(inner) => names_in(inner, out),
        BodyExprKind::Bin(_, a, b) => {
            names_in(a, out);
            names_in(b, out);
        }
        BodyExprKind::Int(_) | BodyExprKind::Float(_) => {}
    }
}

/// Splits `e` into its top-level additive pieces, each with its sign (`true`: subtracted).
fn additive_pieces<'e>(e: &'e BodyExpr, neg: bool, out: &mut Vec<(bool, &'e BodyExpr)>) {
    match &e.kind {
        BodyExprKind::Bin(BinOp::Add, a, b) => {
            additive_pieces(a, neg, out);
            additive_pieces(b, neg, out);
        }
        BodyExprKind::Bin(BinOp::Sub, a, b) => {
            additive_pieces(a, neg, out);
            additive_pieces(b, !neg, out);
        }
        BodyExprKind::Neg(inner) => additive_pieces(inner, !neg, out),
        _ => out.push((neg, e)),
    }
}

/// The definition's checks that need no sizes; `None` if any failed (all reported).
fn define(d: &ast::LayerDef, diags: &mut Vec<Diagnostic>) -> Option<Def> {
    let mut cx = DefCx {
        diags,
        ok: true,
        layer: &d.name.name,
        tensors: HashMap::new(),
        sizes: Vec::new(),
        current: 0,
        reads: Vec::new(),
    };
    let mut inputs = Vec::new();
    let mut sizes: Vec<Ident> = Vec::new();
    for p in &d.sig {
        match p {
            SigParam::Tensor { name, dims, pad, span } => {
                if let Some(first) = sizes.first() {
                    cx.error(
                        Diagnostic::error(
                            "E0142",
                            format!("the tensor parameter `{}` comes after an integer parameter", name.name),
                            name.span,
                        )
                        .with_label("a tensor parameter")
                        .with_secondary(first.span, "the first integer parameter")
                        .with_note("write the tensor parameters first: `layer f(x: [I], O)`"),
                    );
                }
                cx.declare(name, TensorKind::Input, dims.len());
                if dims.is_empty() {
                    cx.error(
                        Diagnostic::error("E0142", format!("`{}` has no dims", name.name), *span)
                            .with_label("an input with no dims")
                            .with_note("a tensor parameter has at least one dim, e.g. `x: [N]`"),
                    );
                }
                for dim in dims {
                    cx.dim(dim, false);
                }
                let pad = match pad {
                    None => vec![(0, 0); dims.len()],
                    Some(entries) => {
                        let at = entries.first().map_or(*span, |f| f.span().to(entries[entries.len() - 1].span()));
                        if entries.len() != dims.len() {
                            cx.error(
                                Diagnostic::error(
                                    "E0142",
                                    format!(
                                        "`pad` gives {} entries but `{}` has {} dims",
                                        entries.len(),
                                        name.name,
                                        dims.len()
                                    ),
                                    at,
                                )
                                .with_label(format!("expected {} entries", dims.len()))
                                .with_note("give one entry per dim: `k` (k zeros before and after) or `(lo, hi)`"),
                            );
                        }
                        let mut pads = Vec::new();
                        for e in entries {
                            let (lo, hi) = match e {
                                PadDim::Same(k) => (*k, *k),
                                PadDim::Pair { lo, hi, .. } => (*lo, *hi),
                            };
                            for k in [lo, hi] {
                                if k.value as u64 > MAX_DIM {
                                    cx.error(limits::too_large_value("padding", k.value, k.span));
                                }
                            }
                            pads.push((
                                lo.value.clamp(0, MAX_DIM as i64) as usize,
                                hi.value.clamp(0, MAX_DIM as i64) as usize,
                            ));
                        }
                        pads
                    }
                };
                inputs.push(InputDecl { name: name.name.clone(), dims: dims.clone(), pad, span: *span });
            }
            SigParam::Size(name) => {
                if let Some(prev) = sizes.iter().find(|s| s.name == name.name) {
                    cx.error(
                        Diagnostic::error(
                            "E0143",
                            format!("`{}` is already defined in this layer", name.name),
                            name.span,
                        )
                        .with_label("defined again here")
                        .with_secondary(prev.span, "first defined here")
                        .with_note("each integer parameter needs a name of its own"),
                    );
                    continue;
                }
                sizes.push(name.clone());
            }
        }
    }
    for s in &sizes {
        if !cx.sizes.contains(&s.name) {
            cx.sizes.push(s.name.clone());
        }
    }
    if inputs.is_empty() {
        cx.error(
            Diagnostic::error("E0142", format!("`{}` takes no tensor input", d.name.name), d.name.span)
                .with_label("no tensor parameter")
                .with_note("a layer reads at least one tensor: `layer f(x: [N]) { ... }`"),
        );
    }

    // Parameters may be declared anywhere in the body; statements are checked in order.
    let mut params = Vec::new();
    for item in &d.body {
        if let BodyItem::Param { name, dims, span } = item {
            cx.declare(name, TensorKind::Param, dims.len());
            if dims.is_empty() {
                cx.error(
                    Diagnostic::error("E0142", format!("the parameter `{}` has no dims", name.name), *span)
                        .with_label("a parameter with no dims")
                        .with_note("a parameter has at least one dim; write `[1]` for a scalar"),
                );
            }
            for dim in dims {
                cx.dim(dim, true);
            }
            params.push(ParamDecl { name: name.name.clone(), dims: dims.clone() });
        }
    }
    let stmts_ast: Vec<&ast::Stmt> =
        d.body.iter().filter_map(|i| if let BodyItem::Stmt(s) = i { Some(s) } else { None }).collect();
    for (k, s) in stmts_ast.iter().enumerate() {
        cx.declare(&s.lhs, TensorKind::Temp(k), s.index.len());
    }
    let mut stmts = Vec::new();
    for (k, s) in stmts_ast.iter().enumerate() {
        cx.current = k;
        if let Some(st) = cx.stmt(s) {
            stmts.push(st);
        }
    }
    let has_error_items = d.body.iter().any(|i| matches!(i, BodyItem::Error { .. }));
    if stmts_ast.is_empty() && !has_error_items {
        cx.error(
            Diagnostic::error("E0145", format!("layer `{}` has no statement", d.name.name), d.name.span)
                .with_label("an empty layer")
                .with_note("a layer computes its output with statements like `y[o] = sum(i: w[o, i] * x[i]);`"),
        );
    }
    for p in &params {
        let read = stmts.iter().flat_map(|s| &s.reads).any(|r| r.access.tensor == p.name);
        let clean = stmts.len() == stmts_ast.len();
        if !read && clean {
            let span = cx.tensors.get(&p.name).map_or(d.name.span, |t| t.span);
            cx.error(
                Diagnostic::error("E0155", format!("the parameter `{}` is never read", p.name), span)
                    .with_label("declared but not read")
                    .with_note("a parameter the output does not depend on has no gradient: read it in a statement or remove it"),
            );
        }
    }
    if !cx.ok || has_error_items {
        return None;
    }
    Some(Def { name: d.name.name.clone(), inputs, sizes, params, stmts })
}

/// The range of a variable and, when it came from a whole index, which read and dim.
#[derive(Debug, Clone, Copy)]
struct Range {
    size: usize,
    from: Option<(usize, usize)>,
}

/// Instantiates a definition for the actual input shapes and size symbols.
fn instantiate(def: &Def, shapes: &[Vec<usize>], syms: &HashMap<String, usize>) -> Result<IndexLayer, Diagnostic> {
    let size = |d: &SizeDim| match d {
        SizeDim::Int(k) => k.value as usize,
        SizeDim::Sym(s) => *syms.get(&s.name).expect("every size symbol is bound by the call"),
    };
    let mut tensors: Vec<LocalTensor> = def
        .inputs
        .iter()
        .zip(shapes)
        .enumerate()
        .map(|(slot, (decl, shape))| LocalTensor {
            name: decl.name.clone(),
            kind: LocalKind::Input(slot),
            shape: shape.clone(),
            padding: decl.pad.clone(),
        })
        .collect();
    for p in &def.params {
        let shape: Vec<usize> = p.dims.iter().map(size).collect();
        tensors.push(LocalTensor {
            name: p.name.clone(),
            kind: LocalKind::Param,
            padding: vec![(0, 0); shape.len()],
            shape,
        });
    }
    let mut stmts = Vec::new();
    for s in &def.stmts {
        let ranges = ranges(s, &tensors)?;
        check_bounds(def, s, &tensors, &ranges)?;
        let shape: Vec<usize> = s.vars.iter().map(|v| ranges[v].size).collect();
        for t in &s.terms {
            let points = s
                .var_spans
                .iter()
                .filter(|(v, _)| s.vars.contains(v) || t.sum.contains(v))
                .fold(1u128, |n, (v, _)| n.saturating_mul(ranges[v].size as u128));
            if points > MAX_EXAMPLE_ELEMENTS as u128 {
                // The product saturates, so a count past 2^64 is described, not printed.
                let shown = if points < u64::MAX as u128 {
                    crate::report::thousands(points as u64)
                } else {
                    "2^64 or more".to_string()
                };
                let span = s.var_spans.first().map_or(Span::default(), |(_, sp)| *sp);
                return Err(Diagnostic::error("E0211", format!("a term of `{}` has too many points", s.lhs), span)
                    .with_label(format!("{shown} points per example (at most {MAX_EXAMPLE_ELEMENTS})"))
                    .with_note(limits::LIMITS_NOTE));
            }
        }
        tensors.push(LocalTensor {
            name: s.lhs.clone(),
            kind: LocalKind::Temp,
            padding: vec![(0, 0); shape.len()],
            shape,
        });
        let ranges = s.var_spans.iter().map(|(v, _)| (*v, ranges[v].size)).collect();
        stmts.push(IndexStmt { lhs: s.lhs.clone(), vars: s.vars.clone(), terms: s.terms.clone(), ranges });
    }
    Ok(IndexLayer { def: def.name.clone(), tensors, stmts })
}

fn tensor<'t>(tensors: &'t [LocalTensor], name: &str) -> &'t LocalTensor {
    tensors.iter().find(|t| t.name == name).expect("a checked read names a known tensor")
}

/// Derives the range of every variable of a statement.
fn ranges(s: &StmtDef, tensors: &[LocalTensor]) -> Result<HashMap<Var, Range>, Diagnostic> {
    let mut known: HashMap<Var, Range> = HashMap::new();
    // A variable used as a whole index takes that dim's size.
    for (ri, r) in s.reads.iter().enumerate() {
        let t = tensor(tensors, &r.access.tensor);
        for (d, ix) in r.access.index.iter().enumerate() {
            let Some(v) = ix.as_var() else { continue };
            let here = t.shape[d];
            match known.get(v) {
                None => {
                    known.insert(v, Range { size: here, from: Some((ri, d)) });
                }
                Some(Range { size, from: Some((r0, d0)) }) if *size != here => {
                    let first = &s.reads[*r0];
                    return Err(Diagnostic::error(
                        "E0158",
                        format!(
                            "index `{v}` ranges over dim {d0} of `{}` (size {size}) and dim {d} of `{}` (size {here})",
                            first.access.tensor, t.name
                        ),
                        r.span,
                    )
                    .with_label(format!("`{v}` indexes a dim of size {here} here"))
                    .with_secondary(first.span, format!("and a dim of size {size} here"))
                    .with_note("an index used alone takes the size of its dim, so both dims must have the same size; use two indices if they differ"));
                }
                Some(_) => {}
            }
        }
    }
    // Then, repeatedly: `a*v + others + offset` (a > 0, every other range known) gives `v`
    // the range that keeps the index below the dim's end and its padding.
    loop {
        let mut progress = false;
        for r in &s.reads {
            let t = tensor(tensors, &r.access.tensor);
            for (d, ix) in r.access.index.iter().enumerate() {
                let unknown: Vec<&Term> = ix.terms.iter().filter(|t| !known.contains_key(t.var)).collect();
                let [term] = unknown.as_slice() else { continue };
                if term.coef <= 0 {
                    continue;
                }
                let others: i128 = ix
                    .terms
                    .iter()
                    .filter_map(|u| known.get(u.var).map(|k| (u.coef as i128 * (k.size as i128 - 1)).max(0)))
                    .sum();
                let last = t.shape[d] as i128 - 1 + t.padding[d].1 as i128 - ix.offset as i128 - others;
                if last < 0 {
                    let v = term.var;
                    return Err(Diagnostic::error(
                        "E0158",
                        format!("index `{v}` has no value that stays in bounds"),
                        r.span,
                    )
                    .with_label(format!(
                        "dim {d} of `{}` has size {}{}, which the other terms of this index already pass",
                        t.name,
                        t.shape[d],
                        padding_text(t.padding[d])
                    ))
                    .with_note("make the dim larger, or the offset or the other indices' ranges smaller"));
                }
                let range = last / term.coef as i128 + 1;
                if range > MAX_DIM as i128 {
                    return Err(Diagnostic::error(
                        "E0211",
                        format!("index `{}` would range over {range} values", term.var),
                        r.span,
                    )
                    .with_label(format!("at most {MAX_DIM}"))
                    .with_note(limits::LIMITS_NOTE));
                }
                known.insert(term.var, Range { size: range as usize, from: None });
                progress = true;
            }
        }
        if !progress {
            break;
        }
    }
    if let Some((v, span)) = s.var_spans.iter().find(|(v, _)| !known.contains_key(v)) {
        return Err(Diagnostic::error("E0158", format!("the range of index `{v}` cannot be derived"), *span)
            .with_label("no read determines its range")
            .with_note(format!(
                "an index takes the size of a dim it indexes alone (`x[{v}]`), or the range that keeps `a*{v} + ...` (a > 0, the other indices' ranges known) inside a dim"
            ))
            .with_note(format!("read some tensor with `{v}` alone, or remove `{v}` if nothing depends on it")));
    }
    Ok(known)
}

fn padding_text((lo, hi): (usize, usize)) -> String {
    if lo == 0 && hi == 0 {
        String::new()
    } else {
        format!(" and padding ({lo}, {hi})")
    }
}

fn pad_entry(lo: i128, hi: i128) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("({lo}, {hi})")
    }
}

/// Proves every read of a statement inside its tensor's bounds and padding.
fn check_bounds(
    def: &Def,
    s: &StmtDef,
    tensors: &[LocalTensor],
    ranges: &HashMap<Var, Range>,
) -> Result<(), Diagnostic> {
    for r in &s.reads {
        let t = tensor(tensors, &r.access.tensor);
        // The indices each dim of this read reaches: `lo..=hi`.
        let reach: Vec<(i128, i128)> = r
            .access
            .index
            .iter()
            .map(|ix| {
                let (mut lo, mut hi) = (ix.offset as i128, ix.offset as i128);
                for term in &ix.terms {
                    let span = term.coef as i128 * (ranges[term.var].size as i128 - 1);
                    lo += span.min(0);
                    hi += span.max(0);
                }
                (lo, hi)
            })
            .collect();
        let inside = |d: usize| {
            let (lo, hi) = reach[d];
            lo >= -(t.padding[d].0 as i128) && hi < t.shape[d] as i128 + t.padding[d].1 as i128
        };
        let Some(d) = (0..reach.len()).find(|&d| !inside(d)) else { continue };
        let (lo, hi) = reach[d];
        let mut diag =
            Diagnostic::error("E0159", format!("`{}` is read out of bounds in dim {d}", t.name), r.span).with_label(
                format!("reads indices {lo}..={hi}; dim {d} has size {}{}", t.shape[d], padding_text(t.padding[d])),
            );
        diag = match def.inputs.iter().find(|i| i.name == t.name) {
            Some(decl) => {
                // The least padding that makes this read valid, every dim at once.
                let entries: Vec<String> = reach
                    .iter()
                    .enumerate()
                    .map(|(k, &(lo, hi))| {
                        let need_lo = (-lo).max(t.padding[k].0 as i128).max(0);
                        let need_hi = (hi - (t.shape[k] as i128 - 1)).max(t.padding[k].1 as i128).max(0);
                        pad_entry(need_lo, need_hi)
                    })
                    .collect();
                let dims: Vec<String> = decl.dims.iter().map(|x| x.to_string()).collect();
                diag.with_secondary(decl.span, "declared here").with_note(format!(
                    "to read zeros outside `{}`, declare its padding in the signature: `{}: [{}] pad ({})` \
                     (ranges are derived with the padding, so zeros after a dim can also lengthen the output)",
                    t.name,
                    t.name,
                    dims.join(", "),
                    entries.join(", ")
                ))
            }
            None => diag.with_note(format!(
                "only a layer's inputs can be zero-padded; `{}` has shape {:?}, so keep its indices inside it",
                t.name, t.shape
            )),
        };
        return Err(diag);
    }
    Ok(())
}

impl Checker {
    /// Checks a definition on its own and records it (before any call is checked).
    pub(super) fn define(&mut self, d: &ast::LayerDef) {
        let name = &d.name;
        if ops::lookup(&name.name).is_some() || ops::REJECTED.iter().any(|(n, _, _)| *n == name.name) {
            self.error(
                Diagnostic::error("E0140", format!("`{}` is the name of a built-in op", name.name), name.span)
                    .with_label("a built-in name")
                    .with_note("a layer in index notation needs a name of its own, e.g. `my_linear`"),
            );
            return;
        }
        if let Some(prev) = self.defs.get(&name.name) {
            let prev = prev.span;
            self.error(
                Diagnostic::error("E0141", format!("the layer `{}` is defined twice", name.name), name.span)
                    .with_label("defined again here")
                    .with_secondary(prev, "first defined here")
                    .with_note("give each definition a name of its own"),
            );
            return;
        }
        let def = define(d, &mut self.diags).map(Rc::new);
        self.defs.insert(name.name.clone(), DefEntry { span: name.span, def, used: false });
    }

    /// A call of a layer in index notation: binds the arguments, instantiates the layer and
    /// adds its node.
    pub(super) fn index_call(&mut self, def: &Def, call: &ast::Call) -> Value {
        let names: Vec<&str> =
            def.inputs.iter().map(|i| i.name.as_str()).chain(def.sizes.iter().map(|s| s.name.as_str())).collect();
        let n_inputs = def.inputs.len();
        let mut slots: Vec<Option<(Value, Span)>> = vec![None; names.len()];
        let mut ok = true;
        let mut positional = 0;
        for arg in &call.args {
            let value = self.expr(&arg.value);
            let index = match &arg.key {
                None => {
                    positional += 1;
                    if positional > names.len() {
                        self.error(too_many_arguments(&def.name, &names, arg.span));
                        ok = false;
                        continue;
                    }
                    positional - 1
                }
                Some(key) => match names.iter().position(|n| *n == key.name) {
                    Some(i) => i,
                    None => {
                        self.error(unknown_argument(&def.name, &names, key));
                        ok = false;
                        continue;
                    }
                },
            };
            if let Some((_, prev)) = &slots[index] {
                let prev = *prev;
                self.error(given_twice(&def.name, names[index], arg.value.span, prev));
                ok = false;
                continue;
            }
            let span = arg.value.span;
            let fits = match (&value, index < n_inputs) {
                (Value::Poison, _) => {
                    ok = false;
                    true
                }
                (Value::Tensor(_), true) => true,
                (Value::Int(v), false) if *v < 1 => {
                    self.error(
                        Diagnostic::error(
                            "E0116",
                            format!("`{}` of `{}` must be positive", names[index], def.name),
                            span,
                        )
                        .with_label(format!("found {v}"))
                        .with_note("an integer parameter is a size: at least 1"),
                    );
                    ok = false;
                    true
                }
                (Value::Int(v), false) if *v as u64 > MAX_DIM => {
                    self.error(limits::too_large_value(&format!("`{}`", names[index]), *v, span));
                    ok = false;
                    true
                }
                (Value::Int(_), false) => true,
                _ => false,
            };
            if !fits {
                let expects = if index < n_inputs { "a tensor" } else { "an integer" };
                let mut d =
                    Diagnostic::error("E0114", format!("`{}` of `{}` expects {expects}", names[index], def.name), span)
                        .with_label(format!("this is {}", value.describe()));
                if value == Value::Label {
                    d = d.with_note("the label can only be used in the `loss` statement");
                }
                self.error(d);
                ok = false;
            }
            slots[index] = Some((value, span));
        }
        for (i, slot) in slots.iter().enumerate() {
            if slot.is_none() {
                let usage = format!("usage: {}({})", def.name, names.join(", "));
                self.error(missing_argument(&def.name, names[i], call.op.span, usage));
                ok = false;
            }
        }
        if !ok {
            return Value::Poison;
        }

        // Size symbols: the integer arguments, then the inputs' dims.
        let mut syms: HashMap<String, (usize, String)> = HashMap::new();
        for (j, s) in def.sizes.iter().enumerate() {
            if let Some((Value::Int(v), _)) = &slots[n_inputs + j] {
                syms.insert(s.name.clone(), (*v as usize, format!("the argument `{}`", s.name)));
            }
        }
        let mut inputs: Vec<NodeId> = Vec::new();
        let mut shapes: Vec<Vec<usize>> = Vec::new();
        for (i, decl) in def.inputs.iter().enumerate() {
            let Some((Value::Tensor(id), span)) = &slots[i] else {
                return Value::Poison;
            };
            let shape = self.nodes[id.index()].shape.clone();
            if let Err(d) = unify(def, decl, &shape, *span, &mut syms) {
                return self.error(d);
            }
            inputs.push(*id);
            shapes.push(shape);
        }
        let syms: HashMap<String, usize> = syms.into_iter().map(|(k, (v, _))| (k, v)).collect();
        let layer = match instantiate(def, &shapes, &syms) {
            Ok(l) => l,
            Err(d) => {
                let key = (d.code, d.span(), d.message.clone());
                if !self.reported.insert(key) {
                    return Value::Poison;
                }
                return self.error(d.with_secondary(call.span, format!("in this call of `{}`", def.name)));
            }
        };
        let shape = layer.output().vars.iter().map(|v| layer.output().range(v)).collect();
        let flops = layer.flops();
        let params = layer.params().map(|p| (p.name.clone(), p.shape.clone())).collect();
        let built = Built { op: Op::Index(Box::new(layer)), shape, flops, params };
        self.add_layer(&def.name, built, inputs, call.layer.as_ref(), &call.attrs, call.span)
    }
}

/// Matches an input's declared dims against its actual shape, binding size symbols.
fn unify(
    def: &Def,
    decl: &InputDecl,
    shape: &[usize],
    span: Span,
    syms: &mut HashMap<String, (usize, String)>,
) -> Result<(), Diagnostic> {
    let declared: Vec<String> = decl.dims.iter().map(|d| d.to_string()).collect();
    let mismatch = |message: String, label: String| {
        Diagnostic::error("E0157", message, span)
            .with_label(label)
            .with_secondary(decl.span, format!("`{}` of `{}` is declared here", decl.name, def.name))
    };
    if decl.dims.len() != shape.len() {
        return Err(mismatch(
            format!(
                "`{}` of `{}` has {} dims ([{}]) but this tensor has shape {:?}",
                decl.name,
                def.name,
                decl.dims.len(),
                declared.join(", "),
                shape
            ),
            format!("{} dims", shape.len()),
        )
        .with_note("reshape it first (`flatten`), or declare the dims it has"));
    }
    for (d, (dim, &actual)) in decl.dims.iter().zip(shape).enumerate() {
        match dim {
            SizeDim::Int(k) if k.value as usize != actual => {
                return Err(mismatch(
                    format!("dim {d} of `{}` is declared {} but this tensor's is {actual}", decl.name, k.value),
                    format!("shape {shape:?}"),
                ))
            }
            SizeDim::Int(_) => {}
            SizeDim::Sym(s) => match syms.get(&s.name) {
                Some((v, from)) if *v != actual => {
                    return Err(mismatch(
                        format!("size `{}` is {v} from {from}, but dim {d} of `{}` is {actual}", s.name, decl.name),
                        format!("shape {shape:?}"),
                    )
                    .with_note(format!("every use of `{}` in the signature must have the same size", s.name)))
                }
                Some(_) => {}
                None => {
                    syms.insert(s.name.clone(), (actual, format!("dim {d} of `{}`", decl.name)));
                }
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_are_the_activation_table_and_exp_log() {
        assert_eq!(function("exp"), Some(Func::Exp));
        assert_eq!(function("sigmoid"), Some(Func::Activation(Activation::Sigmoid)));
        assert_eq!(function("leaky_relu"), Some(Func::Activation(Activation::LeakyRelu { slope: 0.01 })));
        assert_eq!(function("linear"), None);
        assert_eq!(function_names().len(), 2 + Activation::ALL.len());
    }

    #[test]
    fn products_and_sums_are_flattened() {
        let a = Expr::num(2.0);
        let m = flat_mul(flat_mul(a.clone(), a.clone()), a.clone());
        assert_eq!(m, Expr::Mul(vec![a.clone(), a.clone(), a.clone()]));
        assert_eq!(negate(Expr::num(1.5)), Expr::num(-1.5));
        assert_eq!(negate(m), Expr::Mul(vec![Expr::num(-1.0), a.clone(), a.clone(), a]));
    }
}
