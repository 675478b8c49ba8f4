//! Kernels that run one after another over the same grid of examples, fused into one whose
//! grid iteration runs each one's iteration in turn, so that what the first writes for an
//! example and the next reads — an im2col's columns, or the columns a product writes for
//! col2im to scatter — lives in private memory ([`Mode::Private`]): one buffer per worker
//! thread, reused by each example it runs and so kept in that core's cache, instead of the
//! whole batch's columns written to main memory and read back.
//!
//! Two forms. Kernels over the batch run back to back in one grid iteration per example
//! ([`fuse`]): sound when the fused grid's iterations are independent
//! ([`grid_independent`]), for then iteration `n` of the later kernel reads only what
//! iteration `n` of the earlier one wrote. A gather over the batch feeding a product summed
//! over the batch (a weight gradient, whose grid runs over partial sums and loops over
//! examples inside) runs inside that loop, right before the statement that reads what it
//! gathered, for the same example: the product then reads exactly the example's columns it
//! read before, and the gather writes nothing else. [`fuse`] checks what it relies on and
//! refuses otherwise.
//!
//! A third form shares no private memory: a layer's several launches over one grid (a
//! norm's statistics, normalized input and affine output; a layer's weight and bias
//! gradients) run in turn per grid iteration ([`sequence`]), each tensor in its buffer, and
//! their adjacent loops over the same range merge where every element one writes and the
//! other touches is touched by the same iteration of each ([`fuse_loops`]).

use std::collections::{HashMap, HashSet};

use pdgc_codegen::analysis::launch::grid_independent;
use pdgc_codegen::ir::{AccId, Affine, Arg, ArgId, Dim, Expr, Kernel, Loop, Mode, Stmt, Term, VarId};
use pdgc_codegen::visit::{walk_body, walk_body_mut, walk_expr_mut, walk_stmt, walk_stmt_mut, Visitor, VisitorMut};

use crate::error::{Error, Result};

/// `parts` (each a kernel over the batch and the tensors its arguments are, as the index
/// lowering returns them) as one kernel named `name` that runs them in order per example,
/// and the tensors its bound arguments are. Tensor `private` (written by one part, read by
/// a later one) becomes a private argument of one example's dims (flattened to one dim where
/// the parts view it with different dims): every access to it must
/// index its batch dim with the part's variable of the example (its grid's, or that of the
/// example loop of a batch-summed product that a gather joins). Other tensors that several parts
/// name must be read-only in all of them and hold as many elements per example; where the
/// parts view one with different dims (an activation one part flattens), every access to it
/// is flattened to one dim per example.
pub fn fuse(name: &str, parts: &[(Kernel, Vec<String>)], private: &str) -> Result<(Kernel, Vec<String>)> {
    fuse_parts(name, parts, Some(private))
}

/// Kernels `parts` over one grid (see [`fuse`]: over the batch, or all over the same other
/// grid) as one whose grid iteration runs each one's iteration in turn, sharing no private
/// memory: what one part writes for an example and a later one reads stays in its buffer,
/// read back while it is in cache (a norm's row statistics, then its normalized input, then
/// the affine output: one launch). Such a tensor (of the batch) is read and written by the
/// fused kernel; the fused grid's independence
/// ([`grid_independent`]) proves each iteration touches only its own example's slice of
/// it, so iteration `n` of a later part reads what iteration `n` of an earlier one wrote.
/// Refused (an error) otherwise.
pub fn sequence(name: &str, parts: &[(Kernel, Vec<String>)]) -> Result<(Kernel, Vec<String>)> {
    fuse_parts(name, parts, None)
}

fn fuse_parts(name: &str, parts: &[(Kernel, Vec<String>)], private: Option<&str>) -> Result<(Kernel, Vec<String>)> {
    let bug = |what: String| Error::Internal(format!("fusing into `{name}`: {what}"));
    if parts.is_empty() {
        return Err(bug("no kernels".into()));
    }
    // The host: the first part over the batch, or a batch-summed product whose example
    // loop a gather joins.
    let (host, gather) = match parts {
        [(g, _), (h, _)] if private.is_some() && g.grid.extent == Dim::Batch && h.grid.extent != Dim::Batch => {
            (1, Some(0))
        }
        _ => (0, None),
    };
    let first = &parts[host].0;
    let mut fused = Kernel {
        name: name.to_string(),
        args: Vec::new(),
        vars: vec![first.vars[first.grid.var.0 as usize].clone()],
        accs: Vec::new(),
        grid: Loop { var: VarId(0), extent: first.grid.extent, kind: first.grid.kind, body: Vec::new() },
    };
    let mut tensors: Vec<String> = Vec::new();
    // Tensors the parts view with different dims (an activation flattened by one, shaped by
    // the other): every part's accesses to them are flattened to one dim per example.
    let mut dims_of: HashMap<&str, &Vec<Dim>> = HashMap::new();
    let mut flat: HashSet<&str> = HashSet::new();
    for (k, names) in parts {
        for (a, t) in k.args.iter().zip(names) {
            if *dims_of.entry(t).or_insert(&a.dims) != &a.dims {
                flat.insert(t);
            }
        }
    }
    // Each part's body, renumbered, with the fused variable of its example.
    let mut bodies: Vec<(Vec<Stmt>, VarId)> = Vec::new();
    let order: Vec<usize> = match gather {
        Some(g) => vec![host, g],
        None => (0..parts.len()).collect(),
    };
    for &p in &order {
        let (k, names) = &parts[p];
        // Every part runs over the batch, but the host of a gather.
        // (A sequence's parts may all run over another grid, the same one: a layer's
        // batch-summed gradients over their rows.)
        let over_batch = k.grid.extent == Dim::Batch
            || (gather.is_some() && p == host)
            || (private.is_none() && k.grid.extent == first.grid.extent);
        if names.len() != k.args.len() || !over_batch {
            return Err(bug(format!("`{}` is not a kernel over the batch with named arguments", k.name)));
        }
        let mut args = Vec::with_capacity(k.args.len());
        let mut private_arg = None;
        let mut flattened = vec![None; k.args.len()];
        for (i, (a, t)) in k.args.iter().zip(names).enumerate() {
            let flat_arg;
            let is_private = private == Some(t.as_str());
            let a = if !is_private && flat.contains(t.as_str()) {
                let batched = a.dims.first() == Some(&Dim::Batch);
                let len = a.len(1);
                let len = Dim::Fixed(u32::try_from(len).map_err(|_| bug(format!("`{t}` is too large")))?);
                flattened[i] = Some((a.strides(), batched));
                flat_arg = Arg { dims: if batched { vec![Dim::Batch, len] } else { vec![len] }, ..a.clone() };
                &flat_arg
            } else {
                a
            };
            let at = tensors.iter().position(|u| u == t);
            let id = if is_private {
                if a.dims.first() != Some(&Dim::Batch) || a.dims[1..].contains(&Dim::Batch) {
                    return Err(bug(format!("private `{t}` of `{}` is not one slice per example", k.name)));
                }
                // One slice per example: its dims where every part views it alike (so
                // guards on each index still bound it), else flattened.
                let flatten = flat.contains(t.as_str());
                private_arg = Some((ArgId(i as u32), a.strides(), flatten));
                let len = a.len(1);
                let dims = match flatten {
                    true => vec![Dim::Fixed(u32::try_from(len).map_err(|_| bug(format!("`{t}` is too large")))?)],
                    false => a.dims[1..].to_vec(),
                };
                match at {
                    Some(at) if fused.args[at].dims == dims => at,
                    Some(_) => return Err(bug(format!("`{t}` has different sizes in the parts"))),
                    None => {
                        let name = unique_name(&fused.args, &a.name);
                        fused.args.push(Arg { name, dims, mode: Mode::Private });
                        tensors.push(t.clone());
                        fused.args.len() - 1
                    }
                }
            } else {
                match at {
                    Some(at) => {
                        let shared = &mut fused.args[at];
                        let written = shared.mode != Mode::In || a.mode != Mode::In;
                        let per_example = a.dims.first() == Some(&Dim::Batch) && private.is_none();
                        if shared.dims != a.dims || (written && !per_example) {
                            return Err(bug(format!("`{t}` is shared by the parts but not read-only in both")));
                        }
                        // Written by one part, read or written by another: read and written.
                        if shared.mode != a.mode {
                            shared.mode = Mode::InOut;
                        }
                        at
                    }
                    None => {
                        fused.args.push(Arg { name: unique_name(&fused.args, &a.name), ..a.clone() });
                        tensors.push(t.clone());
                        fused.args.len() - 1
                    }
                }
            };
            args.push(ArgId(id as u32));
        }
        let private_id = match (private_arg.as_ref(), private) {
            (Some((id, _, _)), _) => Some(*id),
            (None, Some(private)) => return Err(bug(format!("`{}` does not use `{private}`", k.name))),
            (None, None) => None,
        };
        // The part's variable of the example: its grid's, or (the host of a gather) the one
        // that indexes the example of its first access to the private tensor.
        let own_example = if let (true, Some(_), Some(private_id)) = (p == host, gather, private_id) {
            example_of(&k.grid.body, private_id).ok_or_else(|| bug(format!("no example loop in `{}`", k.name)))?
        } else {
            k.grid.var
        };
        // The gather's grid variable becomes the host's example variable.
        let host_example = bodies.first().map(|(_, v)| *v);
        let vars: Vec<VarId> = (0..k.vars.len())
            .map(|v| match (v == k.grid.var.0 as usize, host_example) {
                (true, Some(example)) if p != host => example,
                (true, _) => VarId(0),
                (false, _) => {
                    fused.vars.push(k.vars[v].clone());
                    VarId(fused.vars.len() as u32 - 1)
                }
            })
            .collect();
        let accs: Vec<AccId> = k
            .accs
            .iter()
            .map(|a| {
                fused.accs.push(a.clone());
                AccId(fused.accs.len() as u32 - 1)
            })
            .collect();
        let example = vars[own_example.0 as usize];
        let mut remap = Remap { vars, accs, args, private: private_arg, flattened, example: own_example, sliced: true };
        let mut body = k.grid.body.clone();
        walk_body_mut(&mut remap, &mut body);
        if !remap.sliced {
            let private = private.unwrap_or_default();
            return Err(bug(format!("`{}` reaches `{private}` other than at its own example", k.name)));
        }
        bodies.push((body, example));
    }
    match (gather, private) {
        (None, None) => {
            fused.grid.body = fuse_loops(bodies.into_iter().flat_map(|(b, _)| b).collect());
            drop_unbound_vars(&mut fused);
        }
        (None, _) | (_, None) => fused.grid.body = bodies.into_iter().flat_map(|(b, _)| b).collect(),
        (Some(_), Some(private)) => {
            let private_id = ArgId(tensors.iter().position(|t| t == private).expect("added above") as u32);
            let [(mut host_body, host_example), (gather_body, _)]: [(Vec<Stmt>, VarId); 2] =
                bodies.try_into().map_err(|_| bug("two parts expected".into()))?;
            // The gather writes nothing but the columns, so running it inside the host's
            // example loop changes nothing else the host computes.
            if gather_body.iter().any(|s| stores_other_than(s, private_id)) {
                return Err(bug(format!("the gather writes more than `{private}`")));
            }
            if !insert_before_read(&mut host_body, private_id, host_example, gather_body) {
                return Err(bug(format!("no read of `{private}` to gather for")));
            }
            fused.grid.body = host_body;
        }
    }
    // Kernels run back to back per example must not see each other's other examples.
    if gather.is_none() && !grid_independent(&fused) {
        return Err(bug("the fused grid's iterations are not independent".into()));
    }
    let bound = tensors.into_iter().zip(&fused.args).filter(|(_, a)| a.is_bound()).map(|(t, _)| t);
    let bound = bound.collect();
    Ok((fused, bound))
}

/// `body` with each two adjacent loops over the same extent (the same kind) that may run as
/// one ([`loops_fuse`]) run as one, the second's variable renamed to the first's, and the
/// merged body's adjacent loops in turn: the parts of a [`sequence`] then share their loop
/// nests (a norm's row statistics and normalized values in one loop over rows, its `X̂` and
/// affine output in one pass over the row), as a hand-written kernel would.
fn fuse_loops(body: Vec<Stmt>) -> Vec<Stmt> {
    let mut out: Vec<Stmt> = Vec::new();
    for s in body {
        if let (Some(Stmt::Loop(prev)), Stmt::Loop(next)) = (out.last_mut(), &s) {
            if prev.extent == next.extent && prev.kind == next.kind {
                let renamed: Vec<Stmt> =
                    next.body.iter().map(|s| super::builder::rename_stmt(s.clone(), next.var, prev.var)).collect();
                if loops_fuse(prev.var, &prev.body, &renamed) {
                    prev.body.extend(renamed);
                    prev.body = fuse_loops(std::mem::take(&mut prev.body));
                    continue;
                }
            }
        }
        out.push(s);
    }
    out
}

/// `k` without the variables no loop binds (those of loops [`fuse_loops`] merged into
/// others), the rest renumbered.
fn drop_unbound_vars(k: &mut Kernel) {
    let mut bound = bound_vars(&k.grid.body);
    bound.insert(k.grid.var);
    let keep: Vec<usize> = (0..k.vars.len()).filter(|&v| bound.contains(&VarId(v as u32))).collect();
    if keep.len() == k.vars.len() {
        return;
    }
    // A variable that is dropped and still read maps to no variable: the verifier says so.
    let mut vars = vec![VarId(u32::MAX); k.vars.len()];
    for (new, &old) in keep.iter().enumerate() {
        vars[old] = VarId(new as u32);
    }
    let mut remap = Remap {
        accs: (0..k.accs.len() as u32).map(AccId).collect(),
        args: (0..k.args.len() as u32).map(ArgId).collect(),
        private: None,
        flattened: vec![None; k.args.len()],
        example: k.grid.var,
        sliced: true,
        vars,
    };
    walk_body_mut(&mut remap, &mut k.grid.body);
    k.grid.var = remap.vars[k.grid.var.0 as usize];
    k.vars = keep.iter().map(|&v| k.vars[v].clone()).collect();
}

/// The variables the loops and contractions of `body` bind, at any depth.
fn bound_vars(body: &[Stmt]) -> HashSet<VarId> {
    struct Bound(HashSet<VarId>);
    impl<'k> Visitor<'k> for Bound {
        fn stmt(&mut self, s: &'k Stmt) {
            match s {
                Stmt::Loop(l) => {
                    self.0.insert(l.var);
                }
                Stmt::Contract(c) => self.0.extend([c.m, c.n, c.k]),
                _ => {}
            }
            walk_stmt(self, s);
        }
    }
    let mut bound = Bound(HashSet::new());
    walk_body(&mut bound, body);
    bound.0
}

/// Whether loop bodies `a` then `b` over the same variable `var` may run as one loop whose
/// iteration runs `a`'s then `b`'s: they share no accumulator, and every argument one of
/// them stores to and the other reaches is accessed (by both) at one index that has, in
/// some dim, the same expression of `var` (coefficient ≠ 0, no division) and of variables
/// bound outside the loops — so an element is touched only by one iteration of each loop,
/// the same one, and iteration `i` of `b` sees exactly what iteration `i` of `a` wrote.
fn loops_fuse(var: VarId, a: &[Stmt], b: &[Stmt]) -> bool {
    #[derive(Default)]
    struct Uses<'k> {
        accesses: Vec<(ArgId, &'k [Affine], bool)>,
        accs: HashSet<AccId>,
    }
    impl<'k> Visitor<'k> for Uses<'k> {
        fn stmt(&mut self, s: &'k Stmt) {
            if let Stmt::Set { acc, .. } = s {
                self.accs.insert(*acc);
            }
            walk_stmt(self, s);
        }
        fn expr(&mut self, e: &'k Expr) {
            if let Expr::Acc(acc) = e {
                self.accs.insert(*acc);
            }
            pdgc_codegen::visit::walk_expr(self, e);
        }
        fn access(&mut self, arg: ArgId, index: &'k [Affine], store: bool) {
            self.accesses.push((arg, index, store));
        }
    }
    let (mut ua, mut ub) = (Uses::default(), Uses::default());
    walk_body(&mut ua, a);
    walk_body(&mut ub, b);
    if ua.accs.intersection(&ub.accs).next().is_some() || a.iter().chain(b).any(|s| matches!(s, Stmt::Contract(_))) {
        return false;
    }
    let inner: HashSet<VarId> = [a, b].into_iter().flat_map(bound_vars).collect();
    let stored = |u: &Uses, arg: ArgId| u.accesses.iter().any(|(x, _, store)| *x == arg && *store);
    let reached = |u: &Uses, arg: ArgId| u.accesses.iter().any(|(x, _, _)| *x == arg);
    let shared: HashSet<ArgId> = ua
        .accesses
        .iter()
        .chain(&ub.accesses)
        .map(|(arg, _, _)| *arg)
        .filter(|&arg| (stored(&ua, arg) && reached(&ub, arg)) || (stored(&ub, arg) && reached(&ua, arg)))
        .collect();
    shared.into_iter().all(|arg| {
        let indices: Vec<&[Affine]> =
            ua.accesses.iter().chain(&ub.accesses).filter(|(x, _, _)| *x == arg).map(|(_, ix, _)| *ix).collect();
        let first = indices[0];
        (0..first.len()).any(|d| {
            let e = &first[d];
            let on_var = e.terms.iter().any(|t| t.var == var && t.coef != 0 && t.div == 1);
            let outer = e.terms.iter().all(|t| t.var == var || !inner.contains(&t.var));
            let by_var = |t: &&Term| t.var == var;
            let single = e.terms.iter().filter(by_var).count() == 1;
            on_var && outer && single && indices.iter().all(|ix| ix.get(d) == Some(e))
        })
    })
}

/// `name`, or `name_2`, `name_3`, … where an argument of `args` has it (parts name their
/// arguments alike, and a kernel's argument names are its parameters in CUDA C).
fn unique_name(args: &[Arg], name: &str) -> String {
    let taken = |n: &str| args.iter().any(|a| a.name == n);
    match taken(name) {
        false => name.to_string(),
        true => (2..).map(|i| format!("{name}_{i}")).find(|n| !taken(n)).expect("a free name"),
    }
}

/// Whether `s` stores to an argument other than `arg`.
fn stores_other_than(s: &Stmt, arg: ArgId) -> bool {
    struct Find(ArgId, bool);
    impl<'k> Visitor<'k> for Find {
        fn access(&mut self, a: ArgId, _: &'k [Affine], store: bool) {
            self.1 |= store && a != self.0;
        }
    }
    let mut find = Find(arg, false);
    walk_stmt(&mut find, s);
    find.1
}

/// Whether `s` reads or writes `arg` anywhere.
pub(super) fn touches(s: &Stmt, arg: ArgId) -> bool {
    struct Find(ArgId, bool);
    impl<'k> Visitor<'k> for Find {
        fn access(&mut self, a: ArgId, _: &'k [Affine], _: bool) {
            self.1 |= a == self.0;
        }
    }
    let mut find = Find(arg, false);
    walk_stmt(&mut find, s);
    find.1
}

/// The variable indexing the example (the batch dim) of the first access to `arg` in
/// `body`, where that index is a single variable.
fn example_of(body: &[Stmt], arg: ArgId) -> Option<VarId> {
    struct Find(ArgId, Option<Option<VarId>>);
    impl<'k> Visitor<'k> for Find {
        fn access(&mut self, a: ArgId, index: &'k [Affine], _: bool) {
            if a == self.0 && self.1.is_none() {
                self.1 = Some(index.first().and_then(Affine::as_var));
            }
        }
    }
    let mut find = Find(arg, None);
    walk_body(&mut find, body);
    find.1.flatten()
}

/// Inserts `stmts` before the first statement of `body` that touches `arg`, inside the loop
/// over `example` and inside any `If` around that statement there (a partial sum's test of
/// which examples it adds), but not inside a loop nested in the example loop, so that they
/// run once per example; false when nothing touches `arg` inside such a loop.
fn insert_before_read(body: &mut Vec<Stmt>, arg: ArgId, example: VarId, stmts: Vec<Stmt>) -> bool {
    insert_in(body, arg, example, false, stmts)
}

fn insert_in(body: &mut Vec<Stmt>, arg: ArgId, example: VarId, inside: bool, stmts: Vec<Stmt>) -> bool {
    let Some(i) = body.iter().position(|s| touches(s, arg)) else { return false };
    match &mut body[i] {
        Stmt::Loop(l) if !inside => {
            let inside = l.var == example;
            insert_in(&mut l.body, arg, example, inside, stmts)
        }
        Stmt::If { then, .. } => insert_in(then, arg, example, inside, stmts),
        _ if inside => {
            body.splice(i..i, stmts);
            true
        }
        _ => false,
    }
}

/// One part's ids renumbered into the fused kernel's tables, and its accesses to the
/// private tensor flattened (batch index dropped).
struct Remap {
    vars: Vec<VarId>,
    accs: Vec<AccId>,
    args: Vec<ArgId>,
    /// The part's argument that becomes private, with its strides (batch dim first) and
    /// whether it is flattened (else its batch index is dropped).
    private: Option<(ArgId, Vec<u64>, bool)>,
    /// Per argument of the part, its strides and whether it is batched where the fused
    /// kernel views it flattened (to `[B, len]`, or `[len]`).
    flattened: Vec<Option<(Vec<u64>, bool)>>,
    /// The part's variable of the example (its grid's, or the example loop's of a host).
    example: VarId,
    /// Whether every access to the private argument so far indexed the batch dim with the
    /// grid variable.
    sliced: bool,
}

impl VisitorMut for Remap {
    fn stmt(&mut self, s: &mut Stmt) {
        // Children first: their accesses are matched by the part's own argument ids.
        walk_stmt_mut(self, s);
        match s {
            Stmt::Loop(l) => l.var = self.vars[l.var.0 as usize],
            Stmt::Set { acc, .. } => *acc = self.accs[acc.0 as usize],
            Stmt::Store { arg, .. } => *arg = self.args[arg.0 as usize],
            Stmt::If { .. } => {}
            Stmt::Contract(c) => {
                for v in [&mut c.m, &mut c.n, &mut c.k] {
                    *v = self.vars[v.0 as usize];
                }
                for op in [&mut c.a, &mut c.b, &mut c.c] {
                    op.arg = self.args[op.arg.0 as usize];
                }
            }
        }
    }

    fn expr(&mut self, e: &mut Expr) {
        walk_expr_mut(self, e);
        match e {
            Expr::Load { arg, .. } => *arg = self.args[arg.0 as usize],
            Expr::Acc(a) => *a = self.accs[a.0 as usize],
            _ => {}
        }
    }

    fn index(&mut self, arg: ArgId, index: &mut Vec<Affine>) {
        if let Some((private, strides, flatten)) = &self.private {
            if arg == *private {
                self.sliced &= index.first().and_then(Affine::as_var) == Some(self.example);
                if *flatten {
                    flatten_after(index, strides, 1);
                }
                index.remove(0);
            }
        }
        if let Some(Some((strides, batched))) = self.flattened.get(arg.0 as usize) {
            flatten_after(index, strides, usize::from(*batched));
        }
        index.iter_mut().for_each(|a| self.affine(a));
    }

    fn affine(&mut self, a: &mut Affine) {
        for t in &mut a.terms {
            t.var = self.vars[t.var.0 as usize];
        }
    }
}

/// Replaces `index[keep..]` by one index into the row-major flattening of those dims
/// (`strides` are the whole tensor's, one per dim of `index`).
fn flatten_after(index: &mut Vec<Affine>, strides: &[u64], keep: usize) {
    let mut flat = Affine::default();
    for (a, stride) in index.iter().zip(strides).skip(keep) {
        let stride = *stride as i64;
        flat.terms.extend(a.terms.iter().map(|t| Term { coef: t.coef * stride, ..*t }));
        flat.offset += a.offset * stride;
    }
    index.truncate(keep);
    index.push(flat);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::builder::{batched, load, lp, store, v, KernelBuilder};

    /// `u[n, i] = 2·x[n, i]` then `y[n, i] = u[n, i + shift]`: a gather and its reader.
    fn parts(shift: i64) -> Vec<(Kernel, Vec<String>)> {
        let mut kb = KernelBuilder::new("gather");
        let x = kb.input("x", batched(&[4]));
        let u = kb.output("u", batched(&[4]));
        let [n, i] = [kb.var("n"), kb.var("i")];
        let body =
            vec![lp(i, 4, vec![store(u, vec![v(n), v(i)], Expr::mul(Expr::Const(2.0), load(x, vec![v(n), v(i)])))])];
        let gather = kb.finish(n, Dim::Batch, body).expect("valid");
        let mut kb = KernelBuilder::new("read");
        let u = kb.input("u", batched(&[4]));
        let y = kb.output("y", batched(&[4]));
        let [n, i] = [kb.var("n"), kb.var("i")];
        let at = if shift == 0 { vec![v(n), v(i)] } else { vec![v(n).offset(shift), v(i)] };
        let body = vec![lp(i, 4, vec![store(y, vec![v(n), v(i)], load(u, at))])];
        let read = kb.finish(n, Dim::Batch, body).expect("valid");
        let names = |t: &[&str]| t.iter().map(|s| s.to_string()).collect();
        vec![(gather, names(&["x", "u"])), (read, names(&["u", "y"]))]
    }

    #[test]
    fn a_gather_and_its_reader_become_one_kernel_with_private_memory() {
        let (k, bound) = fuse("fused", &parts(0), "u").expect("fuses");
        assert_eq!(bound, vec!["x".to_string(), "y".to_string()]);
        let private: Vec<_> = k.args.iter().filter(|a| !a.is_bound()).collect();
        assert_eq!(private.len(), 1);
        assert_eq!(private[0].dims, vec![Dim::Fixed(4)]);
        pdgc_codegen::verify::verify(&k).expect("verifies");
        assert!(grid_independent(&k));
    }

    /// `u[n, i] = 2·x[n, i]`, then `y[n, i] = u[n, i]` or, `reverse`, `u[n, 3 − i]`.
    fn written_then_read(reverse: bool) -> Vec<(Kernel, Vec<String>)> {
        let mut parts = parts(0);
        let mut kb = KernelBuilder::new("read");
        let u = kb.input("u", batched(&[4]));
        let y = kb.output("y", batched(&[4]));
        let [n, i] = [kb.var("n"), kb.var("i")];
        let at = if reverse { Affine::constant(3).plus(i, -1) } else { v(i) };
        let body = vec![lp(i, 4, vec![store(y, vec![v(n), v(i)], load(u, vec![v(n), at]))])];
        parts[1].0 = kb.finish(n, Dim::Batch, body).expect("valid");
        parts
    }

    #[test]
    fn a_sequence_merges_loops_only_where_each_iteration_reads_what_it_wrote() {
        for reverse in [false, true] {
            let (k, bound) = sequence("seq", &written_then_read(reverse)).expect("fuses");
            assert_eq!(bound, vec!["x".to_string(), "u".to_string(), "y".to_string()]);
            pdgc_codegen::verify::verify(&k).expect("verifies");
            // Reading `u[3 − i]` at step `i` needs every step of the writer first.
            let loops = k.grid.body.iter().filter(|s| matches!(s, Stmt::Loop(_))).count();
            assert_eq!(loops, if reverse { 2 } else { 1 }, "{k}");
            let mut x = [1.0f32, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0];
            let (mut u, mut y) = ([f32::NAN; 8], [f32::NAN; 8]);
            pdgc_codegen::interp::run(&k, &mut [&mut x, &mut u, &mut y], 2).expect("runs");
            let want: Vec<f32> = (0..8).map(|e| 2.0 * x[if reverse { e / 4 * 4 + 3 - e % 4 } else { e }]).collect();
            assert_eq!(y.to_vec(), want, "{k}");
        }
        // A part reading another example's slice of what an earlier part writes is refused.
        assert!(sequence("seq", &parts(1)).is_err());
    }

    /// A gather joins the example loop of a product summed over the batch whose grid is one
    /// iteration writing the whole sum (what a weight gradient with a single partial sum
    /// is): `dw[j] += Σ_n u[n, j]`, `u` gathered from `x` per example.
    #[test]
    fn a_gather_joins_the_example_loop_of_a_single_sum() {
        let gather = parts(0).remove(0);
        let mut kb = KernelBuilder::new("sum");
        let u = kb.input("u", batched(&[4]));
        let dw = kb.output("dw", vec![Dim::Fixed(4)]);
        let [p, n, j] = [kb.var("p"), kb.var("n"), kb.var("j")];
        let add = Stmt::Store { arg: dw, index: vec![v(j)], value: load(u, vec![v(n), v(j)]), accumulate: true };
        let body = vec![crate::lower::builder::batch_loop(n, vec![lp(j, 4, vec![add])])];
        let host = kb.finish(p, Dim::Fixed(1), body).expect("valid");
        let names = |t: &[&str]| t.iter().map(|s| s.to_string()).collect();
        let (k, bound) = fuse("fused", &[gather, (host, names(&["u", "dw"]))], "u").expect("fuses");
        assert_eq!(bound, vec!["dw".to_string(), "x".to_string()]);
        pdgc_codegen::verify::verify(&k).expect("verifies");
        // The gather runs inside the example loop, before the sum reads the columns.
        let Stmt::Loop(examples) = &k.grid.body[0] else { panic!("{k}") };
        assert_eq!(examples.body.len(), 2, "{k}");
        let mut x = [1.0f32, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0];
        let mut out = [0.0f32; 4];
        pdgc_codegen::interp::run(&k, &mut [&mut out, &mut x], 2).expect("runs");
        assert_eq!(out, [22.0, 44.0, 66.0, 88.0]);
    }

    #[test]
    fn a_reader_of_another_example_is_refused() {
        let e = fuse("fused", &parts(1), "u").expect_err("reads example n + 1");
        assert!(e.to_string().contains("other than at its own example"), "{e}");
    }
}
