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
    let bug = |what: String| Error::Internal(format!("fusing into `{name}`: {what}"));
    if parts.is_empty() {
        return Err(bug("no kernels".into()));
    }
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
        let over_batch = k.grid.extent == Dim::Batch || (gather.is_some() && p == host);
        if names.len() != k.args.len() || !over_batch {
            return Err(bug(format!("`{}` is not a kernel over the batch with named arguments", k.name)));
        }
        let mut args = Vec::with_capacity(k.args.len());
        let mut private_arg = None;
        let mut flattened = vec![None; k.args.len()];
        for (i, (a, t)) in k.args.iter().zip(names).enumerate() {
            let flat_arg;
            let a = if t != private && flat.contains(t.as_str()) {
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
            let id = if t == private {
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
                        let shared = &fused.args[at];
                        if shared.dims != a.dims || shared.mode != Mode::In || a.mode != Mode::In {
                            return Err(bug(format!("`{t}` is shared by the parts but not read-only in both")));
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
        let Some((private_id, _, _)) = private_arg else {
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
        let mut remap = Remap { vars, accs, args, private: private_arg, flattened, example: own_example, sliced: true };
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
