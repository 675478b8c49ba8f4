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
//! read before. [`fuse`] checks what it relies on and refuses otherwise.

use pdgc_codegen::analysis::launch::grid_independent;
use pdgc_codegen::ir::{AccId, Affine, Arg, ArgId, Dim, Expr, Kernel, Loop, Mode, Stmt, Term, VarId};
use pdgc_codegen::visit::{walk_body, walk_body_mut, walk_expr_mut, walk_stmt, walk_stmt_mut, Visitor, VisitorMut};

use crate::error::{Error, Result};

/// `parts` (each a kernel over the batch and the tensors its arguments are, as the index
/// lowering returns them) as one kernel named `name` that runs them in order per example,
/// and the tensors its bound arguments are. Tensor `private` (written by one part, read by
/// a later one) becomes a private argument, flattened to one dim: every access to it must
/// index its batch dim with the grid variable. Other tensors that several parts name must
/// be read-only in all of them and have the same dims.
pub fn fuse(name: &str, parts: &[(Kernel, Vec<String>)], private: &str) -> Result<(Kernel, Vec<String>)> {
    let bug = |what: String| Error::Internal(format!("fusing into `{name}`: {what}"));
    // The host: the first part over the batch, or a batch-summed product whose example
    // loop a gather joins.
    let (host, gather) = match parts {
        [(g, _), (h, _)] if g.grid.extent == Dim::Batch && h.grid.extent != Dim::Batch => (1, Some(0)),
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
    // Each part's body, renumbered, with the fused variable of its example.
    let mut bodies: Vec<(Vec<Stmt>, VarId)> = Vec::new();
    let order: Vec<usize> = match gather {
        Some(g) => vec![host, g],
        None => (0..parts.len()).collect(),
    };
    for &p in &order {
        let (k, names) = &parts[p];
        if names.len() != k.args.len() || (p != host && k.grid.extent != Dim::Batch) {
            return Err(bug(format!("`{}` is not a kernel over the batch with named arguments", k.name)));
        }
        let mut args = Vec::with_capacity(k.args.len());
        let mut private_arg = None;
        for (i, (a, t)) in k.args.iter().zip(names).enumerate() {
            let at = tensors.iter().position(|u| u == t);
            let id = if t == private {
                if a.dims.first() != Some(&Dim::Batch) || a.dims[1..].contains(&Dim::Batch) {
                    return Err(bug(format!("private `{t}` of `{}` is not one slice per example", k.name)));
                }
                private_arg = Some((ArgId(i as u32), a.strides()));
                let len = a.len(1);
                let dims = vec![Dim::Fixed(u32::try_from(len).map_err(|_| bug(format!("`{t}` is too large")))?)];
                match at {
                    Some(at) if fused.args[at].dims == dims => at,
                    Some(_) => return Err(bug(format!("`{t}` has different sizes in the parts"))),
                    None => {
                        fused.args.push(Arg { name: a.name.clone(), dims, mode: Mode::Private });
                        tensors.push(t.clone());
                        fused.args.len() - 1
                    }
                }
            } else {
                match at {
                    Some(at) => {
                        let shared = &fused.args[at];
                        if shared.dims != a.dims || shared.mode != Mode::In || a.mode != Mode::In {
                            return Err(bug(format!("`{t}` is shared by the parts but not read-only in both")));
                        }
                        at
                    }
                    None => {
                        fused.args.push(a.clone());
                        tensors.push(t.clone());
                        fused.args.len() - 1
                    }
                }
            };
            args.push(ArgId(id as u32));
        }
        let Some((private_id, _)) = private_arg else {
            return Err(bug(format!("`{}` does not use `{private}`", k.name)));
        };
        // The part's variable of the example: its grid's, or (the host of a gather) the one
        // that indexes the example of its first access to the private tensor.
        let own_example = if p == host && gather.is_some() {
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
        let mut remap = Remap { vars, accs, args, private: private_arg, example: own_example, sliced: true };
        let mut body = k.grid.body.clone();
        walk_body_mut(&mut remap, &mut body);
        if !remap.sliced {
            return Err(bug(format!("`{}` reaches `{private}` other than at its own example", k.name)));
        }
        bodies.push((body, example));
    }
    let private_id = ArgId(tensors.iter().position(|t| t == private).expect("added above") as u32);
    match gather {
        None => fused.grid.body = bodies.into_iter().flat_map(|(b, _)| b).collect(),
        Some(_) => {
            let [(mut host_body, _), (gather_body, _)]: [(Vec<Stmt>, VarId); 2] =
                bodies.try_into().map_err(|_| bug("two parts expected".into()))?;
            if !insert_before_read(&mut host_body, private_id, gather_body) {
                return Err(bug(format!("no read of `{private}` to gather for")));
            }
            fused.grid.body = host_body;
        }
    }
    if !grid_independent(&fused) {
        return Err(bug("the fused grid's iterations are not independent".into()));
    }
    let bound = tensors.into_iter().zip(&fused.args).filter(|(_, a)| a.mode != Mode::Private).map(|(t, _)| t);
    let bound = bound.collect();
    Ok((fused, bound))
}

/// Whether `s` reads or writes `arg` anywhere.
fn touches(s: &Stmt, arg: ArgId) -> bool {
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

/// Inserts `stmts` right before the statement of `body` (at any depth) that first touches
/// `arg`, in the same block; false when none does.
fn insert_before_read(body: &mut Vec<Stmt>, arg: ArgId, stmts: Vec<Stmt>) -> bool {
    let Some(i) = body.iter().position(|s| touches(s, arg)) else { return false };
    match &mut body[i] {
        Stmt::Loop(l) => insert_before_read(&mut l.body, arg, stmts),
        Stmt::If { then, .. } => insert_before_read(then, arg, stmts),
        _ => {
            body.splice(i..i, stmts);
            true
        }
    }
}

/// One part's ids renumbered into the fused kernel's tables, and its accesses to the
/// private tensor flattened (batch index dropped).
struct Remap {
    vars: Vec<VarId>,
    accs: Vec<AccId>,
    args: Vec<ArgId>,
    /// The part's argument that becomes private, with its strides (batch dim first).
    private: Option<(ArgId, Vec<u64>)>,
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
        if let Some((private, strides)) = &self.private {
            if arg == *private {
                self.sliced &= index.first().and_then(Affine::as_var) == Some(self.example);
                let mut flat = Affine::default();
                for (a, stride) in index.iter().zip(strides).skip(1) {
                    let stride = *stride as i64;
                    flat.terms.extend(a.terms.iter().map(|t| Term { coef: t.coef * stride, ..*t }));
                    flat.offset += a.offset * stride;
                }
                *index = vec![flat];
            }
        }
        index.iter_mut().for_each(|a| self.affine(a));
    }

    fn affine(&mut self, a: &mut Affine) {
        for t in &mut a.terms {
            t.var = self.vars[t.var.0 as usize];
        }
    }
}
