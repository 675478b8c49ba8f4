//! The kernel verifier. Backends compile only verified kernels: the CPU backend emits
//! unchecked loads and stores, so the static bounds proof below is what makes its code
//! memory-safe.
//!
//! Invariants checked (each failure names the kernel and the offending statement):
//!
//! 1. Every `ArgId`, `VarId` and `AccId` is in range of its table.
//! 2. Every `VarId` is bound by exactly one loop (the grid included): no shadowing, no
//!    reuse by a sibling loop, no variable that no loop binds.
//! 3. Every variable that an index uses (loads, stores, `Expr::Index`, `Cond::InRange`)
//!    is bound by an enclosing loop.
//! 4. `Dim::Batch` appears only as the first dim of an argument, and the fixed dims of an
//!    argument multiply to a size that 64-bit byte offsets can hold. A `Private` argument
//!    has no batch dim (its size is one iteration's).
//! 5. A load or store has as many indices as its argument has dims; loads read only `In`
//!    and `InOut` arguments, stores write only `Out` and `InOut` arguments.
//! 6. Every read of an accumulator comes after a `Set` of it in program (textual) order.
//! 7. Every term has `div > 0`.
//! 8. Static bounds: every load and store index is provably in bounds for every batch
//!    size. A variable of a `Fixed(e)` loop ranges over `[0, e-1]`; a term
//!    `coef·⌊var/div⌋` over the interval between `0` and `coef·⌊(e-1)/div⌋`; an index
//!    over the sum of its terms' intervals plus its offset, like terms (same variable and
//!    divisor) merged first (exact i128 arithmetic, so nothing overflows). The interval
//!    must lie within i64: backends compute indices in wrapping 64-bit arithmetic, which
//!    then gives the exact value. An enclosing `If` whose condition is, or has as a
//!    conjunct of `Cond::And`, `InRange { index: c, lo, hi }` narrows the interval of any
//!    accessed index equal to `s·c + r` for an integer `s ≠ 0` (terms compared after
//!    sorting and merging like terms) to `s·[lo, hi-1]` plus the interval of the rest `r`
//!    (a constant `d` for an index dim's own guard, `[lo+d, hi-1+d]`; other terms for a
//!    flattened index, whose interval the other guards narrow in turn), provided the
//!    interval of `c` itself lies within i64; conditions inside `Select` narrow nothing,
//!    since a backend may evaluate both arms. A position of a `Dim::Batch` dim must be
//!    exactly one variable of an `Extent::Batch` loop, and such a variable appears in no
//!    other load or store position. An access that is never reached (inside a `Fixed(0)` loop, or narrowed
//!    to an empty interval) is accepted.
//!
//! 9. The variables a [`crate::ir::Contract`] binds (`m`, `n`, `k`) appear in its operands'
//!    indices only with `div == 1`. Checks 1–8 run on the kernel's desugared form
//!    ([`crate::ir::Kernel::desugared`]), where a contraction is the loop nest that defines
//!    it, so its variables are loop variables there and its accesses are proved in bounds
//!    like any other.
//!
//! Checks 1–8 see `Private` arguments in their sliced form ([`Kernel::private_sliced`]: one
//! slice per grid iteration, an `inout` buffer), so they are read and written like any
//! buffer and proved in bounds in every slice. That iterations write a private buffer
//! before they read it is not proved; the interpreter fills it with NaN, so a test that
//! runs a kernel there sees any read of what the iteration did not write.
//!
//! What it does not check: that grid iterations are independent (see
//! [`crate::analysis::launch::grid_independent`] for the sufficient condition the CPU backend uses before it
//! splits a grid over threads).

use thiserror::Error;

use crate::ir::{Affine, Arg, ArgId, Cond, Dim, Expr, Extent, Kernel, Loop, Mode, Stmt, Term, VarId};
use crate::visit::{walk_body, walk_stmt, Visitor};

/// Every problem found in one kernel, one message each.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("kernel `{kernel}` is invalid:\n  {}", .errors.join("\n  "))]
pub struct VerifyError {
    pub kernel: String,
    pub errors: Vec<String>,
}

/// Checks every invariant listed in the module doc. A kernel with contractions is checked
/// in its desugared form ([`Kernel::desugared`]), which defines what they mean, plus
/// invariant 9; private arguments in their sliced form ([`Kernel::private_sliced`]).
pub fn verify(k: &Kernel) -> Result<(), VerifyError> {
    let desugared = k.desugared();
    let mut errors = contract_errors(k);
    for a in k.args.iter().filter(|a| !a.is_bound()) {
        if a.dims.contains(&Dim::Batch) {
            errors.push(format!("private argument `{}` has a batch dim", a.name));
        }
    }
    if let Err(e) = verify_loops(&desugared.private_sliced()) {
        errors.extend(e.errors);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(VerifyError { kernel: k.name.clone(), errors })
    }
}

/// Invariant 9: the contraction variables `m`, `n`, `k` appear in the operands only as
/// plain terms (`div == 1`), so every operand is a strided matrix.
fn contract_errors(k: &Kernel) -> Vec<String> {
    struct Check<'a> {
        k: &'a Kernel,
        out: Vec<String>,
    }
    impl<'k> Visitor<'k> for Check<'_> {
        fn stmt(&mut self, s: &'k Stmt) {
            if let Stmt::Contract(c) = s {
                let own = [c.m, c.n, c.k];
                for op in [&c.a, &c.b, &c.c] {
                    if op.index.iter().flat_map(|a| &a.terms).any(|t| own.contains(&t.var) && t.div != 1) {
                        self.out.push(format!(
                            "in `{}`: a contraction variable is divided in an operand index",
                            self.k.stmt_head(s)
                        ));
                    }
                }
            }
            walk_stmt(self, s);
        }
    }
    let mut check = Check { k, out: Vec::new() };
    walk_body(&mut check, &k.grid.body);
    check.out
}

fn verify_loops(k: &Kernel) -> Result<(), VerifyError> {
    let mut v = Verifier {
        k,
        errors: Vec::new(),
        binds: vec![0; k.vars.len()],
        scope: Vec::new(),
        facts: Vec::new(),
        set: vec![false; k.accs.len()],
        unreachable: 0,
    };
    v.args();
    v.lp(&k.grid, true);
    for (i, n) in v.binds.iter().enumerate() {
        if *n == 0 {
            v.errors.push(format!("variable `{}` is never bound by a loop", k.vars[i]));
        }
    }
    if v.errors.is_empty() {
        Ok(())
    } else {
        Err(VerifyError { kernel: k.name.clone(), errors: v.errors })
    }
}

/// An interval `[lo, hi]` of integers; empty when `lo > hi`.
type Interval = (i128, i128);

/// `InRange` facts from enclosing `If`s: `lo <= Σ terms + offset < hi`.
struct Fact {
    terms: Vec<NormalTerm>,
    offset: i64,
    lo: i64,
    hi: i64,
}

struct Verifier<'k> {
    k: &'k Kernel,
    errors: Vec<String>,
    /// How many loops bind each variable.
    binds: Vec<u32>,
    /// The enclosing loops' variables and extents, outermost first.
    scope: Vec<(VarId, Extent)>,
    facts: Vec<Fact>,
    /// Accumulators with a `Set` earlier in program order.
    set: Vec<bool>,
    /// How many enclosing loops have extent 0 (their bodies never run).
    unreachable: usize,
}

/// Largest element count of the fixed dims (2^40): byte offsets of such buffers fit in
/// `i64` with room for a batch factor.
pub const MAX_FIXED_ELEMS: u64 = 1 << 40;

impl Verifier<'_> {
    fn err(&mut self, at: &str, msg: String) {
        self.errors.push(format!("in `{at}`: {msg}"));
    }

    fn var_name(&self, v: VarId) -> String {
        self.k.vars.get(v.0 as usize).cloned().unwrap_or_else(|| format!("v{}", v.0))
    }

    fn args(&mut self) {
        for a in &self.k.args {
            for (i, d) in a.dims.iter().enumerate() {
                if *d == Dim::Batch && i != 0 {
                    self.errors
                        .push(format!("argument `{}`: the batch dim is dim {i}; it may only be the first", a.name));
                }
            }
            let fixed: u128 = a
                .dims
                .iter()
                .map(|d| match d {
                    Dim::Batch => 1u128,
                    Dim::Fixed(n) => *n as u128,
                })
                .fold(1u128, |p, n| p.saturating_mul(n));
            if fixed > MAX_FIXED_ELEMS as u128 {
                self.errors.push(format!(
                    "argument `{}` has {fixed} elements per example; at most 2^40 are supported",
                    a.name
                ));
            }
        }
    }

    fn extent_of(&self, v: VarId) -> Option<Extent> {
        self.scope.iter().rev().find(|(w, _)| *w == v).map(|(_, e)| *e)
    }

    fn lp(&mut self, l: &Loop, grid: bool) {
        let extent = match l.extent {
            Extent::Batch => "B".to_string(),
            Extent::Fixed(n) => n.to_string(),
        };
        let keyword = if grid { "grid" } else { "for" };
        let header = format!("{keyword} {} in 0..{extent}", self.var_name(l.var));
        let var_ok = match self.binds.get_mut(l.var.0 as usize) {
            None => {
                self.err(
                    &header,
                    format!("loop variable v{} is out of range ({} variables)", l.var.0, self.k.vars.len()),
                );
                false
            }
            Some(n) => {
                *n += 1;
                if *n > 1 {
                    let name = self.var_name(l.var);
                    self.err(&header, format!("variable `{name}` is bound by more than one loop"));
                }
                true
            }
        };
        let zero = l.extent == Extent::Fixed(0);
        if zero {
            self.unreachable += 1;
        }
        if var_ok {
            self.scope.push((l.var, l.extent));
        }
        self.stmts(&l.body);
        if var_ok {
            self.scope.pop();
        }
        if zero {
            self.unreachable -= 1;
        }
    }

    fn stmts(&mut self, body: &[Stmt]) {
        for s in body {
            self.stmt(s);
        }
    }

    fn stmt(&mut self, s: &Stmt) {
        match s {
            Stmt::Loop(l) => self.lp(l, false),
            Stmt::Set { acc, value } => {
                let at = self.k.stmt_head(s);
                self.expr(value, &at);
                match self.set.get_mut(acc.0 as usize) {
                    Some(done) => *done = true,
                    None => self.err(
                        &at,
                        format!("accumulator a{} is out of range ({} accumulators)", acc.0, self.k.accs.len()),
                    ),
                }
            }
            Stmt::Store { arg, index, value, .. } => {
                let at = self.k.stmt_head(s);
                self.expr(value, &at);
                self.access(*arg, index, true, &at);
            }
            Stmt::If { cond, then } => {
                let at = self.k.stmt_head(s);
                self.cond(cond, &at);
                let before = self.facts.len();
                let mut ranges = Vec::new();
                in_ranges(cond, &mut ranges);
                for (index, lo, hi) in ranges {
                    // A fact narrows only when its index is computed exactly in 64-bit
                    // arithmetic (as every backend computes it).
                    if let Some((l, h)) = self.natural(index) {
                        if fits_i64(l, h) {
                            let (terms, offset) = normalize(index);
                            self.facts.push(Fact { terms, offset, lo, hi });
                        }
                    }
                }
                self.stmts(then);
                self.facts.truncate(before);
            }
            Stmt::Contract(_) => self.err(&self.k.stmt_head(s), "a contraction survived desugaring".into()),
        }
    }

    fn expr(&mut self, e: &Expr, at: &str) {
        match e {
            Expr::Const(_) => {}
            Expr::Load { arg, index } => self.access(*arg, index, false, at),
            Expr::Acc(a) => match self.set.get(a.0 as usize) {
                None => {
                    self.err(at, format!("accumulator a{} is out of range ({} accumulators)", a.0, self.k.accs.len()))
                }
                Some(false) => {
                    let name = &self.k.accs[a.0 as usize];
                    self.err(at, format!("accumulator `{name}` is read before any `Set` of it"));
                }
                Some(true) => {}
            },
            Expr::Index(a) => {
                self.affine(a, at);
            }
            Expr::Unary(_, a) => self.expr(a, at),
            Expr::Binary(_, a, b) => {
                self.expr(a, at);
                self.expr(b, at);
            }
            Expr::Select { cond, then, otherwise } => {
                self.cond(cond, at);
                self.expr(then, at);
                self.expr(otherwise, at);
            }
        }
    }

    fn cond(&mut self, c: &Cond, at: &str) {
        match c {
            Cond::InRange { index, .. } => {
                self.affine(index, at);
            }
            Cond::Cmp { a, b, .. } => {
                self.expr(a, at);
                self.expr(b, at);
            }
            Cond::And(cs) => {
                for c in cs {
                    self.cond(c, at);
                }
            }
        }
    }

    /// Invariants 1, 3 and 7 for one index; true when it is well formed.
    fn affine(&mut self, a: &Affine, at: &str) -> bool {
        let mut ok = true;
        for t in &a.terms {
            if t.var.0 as usize >= self.k.vars.len() {
                self.err(at, format!("variable v{} is out of range ({} variables)", t.var.0, self.k.vars.len()));
                ok = false;
                continue;
            }
            if self.extent_of(t.var).is_none() {
                let name = self.var_name(t.var);
                self.err(at, format!("variable `{name}` is used outside any loop that binds it"));
                ok = false;
            }
            if t.div <= 0 {
                let name = self.var_name(t.var);
                self.err(at, format!("a term of `{name}` divides by {}; divisors must be positive", t.div));
                ok = false;
            }
        }
        ok
    }

    fn access(&mut self, arg: ArgId, index: &[Affine], store: bool, at: &str) {
        let Some(a) = self.k.args.get(arg.0 as usize) else {
            self.err(at, format!("argument {} is out of range ({} arguments)", arg.0, self.k.args.len()));
            return;
        };
        match (store, a.mode) {
            (false, Mode::Out) => self.err(at, format!("loads from `{}`, an `out` argument", a.name)),
            (true, Mode::In) => self.err(at, format!("stores to `{}`, an `in` argument", a.name)),
            _ => {}
        }
        if index.len() != a.dims.len() {
            self.err(at, format!("`{}` has {} dims but is indexed with {}", a.name, a.dims.len(), index.len()));
            return;
        }
        for (pos, (ix, dim)) in index.iter().zip(&a.dims).enumerate() {
            if !self.affine(ix, at) {
                continue;
            }
            self.position(a, pos, ix, *dim, at);
        }
    }

    /// Invariant 8 for one index position.
    fn position(&mut self, a: &Arg, pos: usize, ix: &Affine, dim: Dim, at: &str) {
        let what = format!("index {pos} of `{}` (`{}`)", a.name, self.k.affine_text(ix));
        match dim {
            Dim::Batch => {
                let ok = ix.as_var().is_some_and(|v| self.extent_of(v) == Some(Extent::Batch));
                if !ok {
                    let rule = "it must be exactly one variable of a batch-extent loop";
                    self.err(at, format!("{what} is in a batch dim; {rule}"));
                }
            }
            Dim::Fixed(d) => {
                let batch_var = ix.terms.iter().find(|t| self.extent_of(t.var) == Some(Extent::Batch));
                if let Some(t) = batch_var {
                    let name = self.var_name(t.var);
                    self.err(at, format!("{what} uses the batch-extent variable `{name}` outside a batch dim"));
                    return;
                }
                if self.unreachable > 0 {
                    return;
                }
                let Some((lo, hi)) = self.natural(ix) else {
                    return;
                };
                if !fits_i64(lo, hi) {
                    self.err(at, format!("{what} ranges over [{lo}, {hi}], beyond 64-bit arithmetic"));
                    return;
                }
                let (lo, hi) = self.narrow(ix, (lo, hi));
                if lo > hi {
                    return;
                }
                if lo < 0 || hi >= d as i128 {
                    let guard = if self.facts.is_empty() { "" } else { " even under the enclosing guards" };
                    self.err(at, format!("{what} ranges over [{lo}, {hi}]{guard}, outside the dim 0..{d}"));
                }
            }
        }
    }

    /// The interval of an index from its variables' extents alone; `None` when a
    /// variable is unbound, has a batch extent or a zero extent, or a divisor is not
    /// positive (all reported elsewhere, or unreachable).
    fn natural(&self, ix: &Affine) -> Option<Interval> {
        let (terms, offset) = normalize(ix);
        self.natural_terms(&terms, offset as i128)
    }

    /// [`Self::natural`] of `Σ terms + offset`.
    fn natural_terms(&self, terms: &[NormalTerm], offset: i128) -> Option<Interval> {
        let mut lo = offset;
        let mut hi = offset;
        for &(var, div, coef) in terms {
            let e = match self.extent_of(var)? {
                Extent::Fixed(e) if e > 0 && div > 0 => e as i128,
                _ => return None,
            };
            // Floor division of non-negative values: ⌊var/div⌋ is in [0, ⌊(e-1)/div⌋].
            let q = (e - 1) / div as i128;
            let end = coef * q;
            lo += end.min(0);
            hi += end.max(0);
        }
        Some((lo, hi))
    }

    /// Narrows an index's interval by the enclosing `InRange` facts (invariant 8): where
    /// the index is `s·c + r` for a fact `lo <= c < hi`, an integer `s ≠ 0` and the rest
    /// `r` (every term of `s·c` appears in the index), it lies in `s·[lo, hi-1]` plus the
    /// interval of `r`, itself narrowed by the other facts. With `r` a constant this is
    /// the guard of an index dim; with `r` other terms, the guards of the dims of a
    /// flattened index (`1024·c + 32·(h+kh-1) + (w+kw-1)` under `0 <= h+kh-1 < 32` and
    /// `0 <= w+kw-1 < 32`).
    fn narrow(&self, ix: &Affine, interval: Interval) -> Interval {
        let (terms, offset) = normalize(ix);
        let facts: Vec<&Fact> = self.facts.iter().collect();
        let within =
            |facts: &[&Fact]| self.narrowed(&terms, offset as i128, facts).map_or(interval, |i| intersect(interval, i));
        // Each fact is used at most once along a path; beyond a few facts, one at a time.
        if facts.len() > MAX_NARROWING_FACTS {
            return facts.iter().fold(interval, |acc, f| intersect(acc, within(&[f])));
        }
        within(&facts)
    }

    /// The interval of `Σ terms + offset` by its variables' extents and each decomposition
    /// through one of `facts` (see [`Self::narrow`]), intersected; `None` where neither
    /// bounds it.
    fn narrowed(&self, terms: &[NormalTerm], offset: i128, facts: &[&Fact]) -> Option<Interval> {
        let mut best = self.natural_terms(terms, offset);
        for (i, f) in facts.iter().enumerate() {
            let Some(s) = multiple_of(terms, &f.terms) else { continue };
            if f.lo >= f.hi {
                // The guard is never true: nothing under it runs.
                return Some((1, 0));
            }
            let rest: Vec<NormalTerm> =
                terms.iter().filter(|t| !f.terms.iter().any(|u| (u.0, u.1) == (t.0, t.1))).copied().collect();
            let rest_offset = offset - s * f.offset as i128;
            let others: Vec<&Fact> = facts.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, f)| *f).collect();
            let Some((rlo, rhi)) = self.narrowed(&rest, rest_offset, &others) else { continue };
            let (a, b) = (s * f.lo as i128, s * (f.hi as i128 - 1));
            let through = (a.min(b) + rlo, a.max(b) + rhi);
            best = Some(best.map_or(through, |x| intersect(x, through)));
        }
        best
    }
}

/// How many enclosing facts [`Verifier::narrow`] combines along one decomposition (more
/// are applied one at a time): the combinations grow as the factorial of the count.
const MAX_NARROWING_FACTS: usize = 6;

/// The integer `s ≠ 0` with `terms ⊇ s·fact` term by term (same variables and divisors,
/// coefficients `s` times the fact's), if there is one; `1` for a constant fact and index.
fn multiple_of(terms: &[NormalTerm], fact: &[NormalTerm]) -> Option<i128> {
    // A constant guard bounds only a constant index (itself plus the offsets' difference).
    let Some(&(var, div, coef)) = fact.first() else { return terms.is_empty().then_some(1) };
    let own = terms.iter().find(|t| (t.0, t.1) == (var, div))?.2;
    if own % coef != 0 {
        return None;
    }
    let s = own / coef;
    let all = fact.iter().all(|&(v, d, c)| terms.iter().any(|t| (t.0, t.1) == (v, d) && t.2 == s * c));
    (s != 0 && all).then_some(s)
}

fn intersect((a, b): Interval, (c, d): Interval) -> Interval {
    (a.max(c), b.min(d))
}

fn fits_i64(lo: i128, hi: i128) -> bool {
    lo >= i64::MIN as i128 && hi <= i64::MAX as i128
}

/// The `InRange` conjuncts of a condition.
fn in_ranges<'c>(c: &'c Cond, out: &mut Vec<(&'c Affine, i64, i64)>) {
    match c {
        Cond::InRange { index, lo, hi } => out.push((index, *lo, *hi)),
        Cond::Cmp { .. } => {}
        Cond::And(cs) => {
            for c in cs {
                in_ranges(c, out);
            }
        }
    }
}

/// `(var, div, coef)`, with the coefficient exact after merging like terms.
type NormalTerm = (VarId, i64, i128);

/// An index's terms sorted by `(var, div)` with like terms merged and zero coefficients
/// dropped, and its offset: two indices with equal normal terms differ by a constant.
fn normalize(a: &Affine) -> (Vec<NormalTerm>, i64) {
    let mut terms: Vec<NormalTerm> = Vec::with_capacity(a.terms.len());
    let mut sorted: Vec<&Term> = a.terms.iter().collect();
    sorted.sort_by_key(|t| (t.var, t.div));
    for t in sorted {
        match terms.last_mut() {
            Some(last) if last.0 == t.var && last.1 == t.div => last.2 += t.coef as i128,
            _ => terms.push((t.var, t.div, t.coef as i128)),
        }
    }
    terms.retain(|t| t.2 != 0);
    (terms, a.offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_sorts_and_merges_like_terms() {
        let (i, j) = (VarId(0), VarId(1));
        let a = Affine::var(j).plus(i, 2).plus(j, -1).plus(i, 1).offset(3);
        let (terms, offset) = normalize(&a);
        assert_eq!(terms, vec![(i, 1, 3)]);
        assert_eq!(offset, 3);
    }
}
