//! Chains of per-example launches fused through private memory: where one launch over the
//! batch writes a tensor that only the next launch reads (a conv's output that only its
//! activation reads, a conv's input gradient that only a pool's backward reads, that
//! pool's input gradient that only the activation's backward reads), the two run as one
//! kernel ([`fuse::fuse`]) whose grid iteration computes the example's slice of the tensor
//! in private memory and reads it back while it is in cache, instead of writing the batch's
//! tensor to main memory and reading it back in the next launch. The tensor's buffer is
//! then bound by no launch, so no entry's arena holds it.
//!
//! Sound where (each checked here or by [`fuse::fuse`], which refuses otherwise): both
//! launches run the whole grid over the batch; the tensor is an activation or an
//! activation's gradient that the session neither binds nor reads (not the network's
//! output), written by the first launch and read by the second, and bound by no other
//! launch in any entry (every entry that runs one of the pair runs both, back to back); the
//! first launch writes every element of the example's slice before reading any (proved by
//! enumerating its accesses, [`writes_slice_first`]), so nothing reads memory the iteration
//! did not write; the fused grid's iterations are independent.

use std::collections::{HashMap, HashSet};

use pdgc_codegen::ir::{AccId, Affine, ArgId, Cond, Dim, Expr, Kernel, Mode, Stmt, VarId};

use super::fuse::{self, touches};
use super::{Launch, LaunchMode, Program, Role};

/// The most loop iterations and accesses [`writes_slice_first`] enumerates before it gives
/// up (and the pair stays unfused).
const MAX_ACCESSES: u64 = 1 << 24;

/// Fuses, in every entry of `program`, each pair of consecutive launches that pass a
/// tensor of at most `private_bytes` per example from one to the next and nowhere else (see
/// the module doc); `keep` are buffers the session reads after a run. Kernels no launch
/// runs any more are dropped.
pub fn fuse_chains(program: &mut Program, keep: &[super::BufId], private_bytes: u64) {
    // Fusing a pair can make a new pair with the next launch: repeat until nothing fuses.
    // The pairs tried so far (each once, however many rounds there are; kernel indices stay
    // put until the end).
    let mut tried = HashSet::new();
    while let Some((first, second, fused)) = next_pair(program, keep, private_bytes, &mut tried) {
        let kernel = match program.kernels.iter().position(|k| k.name == fused.kernel.name) {
            Some(i) => i,
            None => {
                program.kernels.push(fused.kernel);
                program.kernels.len() - 1
            }
        };
        let launch = Launch { kernel, args: fused.args, mode: LaunchMode::Grid, node: first.node };
        for entry in &mut program.entries {
            let mut out = Vec::with_capacity(entry.launches.len());
            let mut i = 0;
            while i < entry.launches.len() {
                if entry.launches[i] == first && entry.launches.get(i + 1) == Some(&second) {
                    out.push(launch.clone());
                    i += 2;
                } else {
                    out.push(entry.launches[i].clone());
                    i += 1;
                }
            }
            entry.launches = out;
        }
    }
    drop_unused_kernels(program);
}

struct Fused {
    kernel: Kernel,
    args: Vec<super::BufId>,
}

/// The first pair of launches (in entry order) that fuses, with the fused kernel.
fn next_pair(
    program: &Program,
    keep: &[super::BufId],
    private_bytes: u64,
    tried: &mut HashSet<(usize, usize, super::BufId)>,
) -> Option<(Launch, Launch, Fused)> {
    // How many launches bind each buffer, over all entries.
    let mut binders: HashMap<super::BufId, Vec<&Launch>> = HashMap::new();
    for l in program.entries.iter().flat_map(|e| &e.launches) {
        for &id in &l.args {
            binders.entry(id).or_default().push(l);
        }
    }
    for entry in &program.entries {
        for pair in entry.launches.windows(2) {
            let [a, b] = pair else { continue };
            if a.mode != LaunchMode::Grid || b.mode != LaunchMode::Grid {
                continue;
            }
            let (ka, kb) = (&program.kernels[a.kernel], &program.kernels[b.kernel]);
            if ka.grid.extent != Dim::Batch || kb.grid.extent != Dim::Batch {
                continue;
            }
            // The kernel's argument index of each bound argument (`Launch::args` order).
            let bound = |k: &Kernel| -> Vec<usize> { (0..k.args.len()).filter(|&x| k.args[x].is_bound()).collect() };
            let (bound_a, bound_b) = (bound(ka), bound(kb));
            for (i, &t) in a.args.iter().enumerate() {
                let decl = program.buffer(t);
                let Some(&arg) = bound_a.get(i) else { continue };
                let passed = matches!(decl.role, Role::Activation(_) | Role::ActivationGrad(_))
                    && decl.batched
                    && decl.chunk.is_none()
                    && !keep.contains(&t)
                    && decl.per_example_len() * 4 <= private_bytes
                    && matches!(ka.args[arg].mode, Mode::Out | Mode::InOut)
                    && a.args.iter().filter(|&&u| u == t).count() == 1;
                let read = b.args.iter().position(|&u| u == t);
                let Some(j) = read.filter(|_| passed) else { continue };
                let read_only = bound_b.get(j).is_some_and(|&x| kb.args[x].mode == Mode::In);
                if !read_only || b.args.iter().filter(|&&u| u == t).count() != 1 {
                    continue;
                }
                // Only this pair binds `t`, wherever it runs, and every entry that runs
                // one of them runs both back to back.
                if !binders[&t].iter().all(|l| *l == a || *l == b) || !always_together(program, a, b) {
                    continue;
                }
                // The costly checks below, once per pair of kernels and tensor.
                if !tried.insert((a.kernel, b.kernel, t)) {
                    continue;
                }
                if !writes_slice_first(ka, ArgId(arg as u32)) {
                    continue;
                }
                let names = |l: &Launch, k: &Kernel| -> Vec<String> {
                    let mut bound = l.args.iter();
                    k.args
                        .iter()
                        .enumerate()
                        .map(|(x, arg)| match arg.is_bound() {
                            true => bound.next().map(|id| format!("b{}", id.0)).unwrap_or_default(),
                            false => format!("{}'{x}", k.name),
                        })
                        .collect()
                };
                let parts = [(ka.clone(), names(a, ka)), (kb.clone(), names(b, kb))];
                let name = format!("{}__{}", ka.name, kb.name);
                // `fuse` refuses what it cannot prove sound; such a pair stays as it is.
                let Ok((kernel, bound)) = fuse::fuse(&name, &parts, &format!("b{}", t.0)) else { continue };
                // A check, not an expectation: `fuse` flattens the accesses of a tensor the
                // parts view with different dims, and the verifier must still bound them.
                if pdgc_codegen::verify::verify(&kernel).is_err() {
                    continue;
                }
                let args: Option<Vec<_>> =
                    bound.iter().map(|n| n.strip_prefix('b').and_then(|x| x.parse().ok()).map(super::BufId)).collect();
                let Some(args) = args else { continue };
                return Some((a.clone(), b.clone(), Fused { kernel, args }));
            }
        }
    }
    None
}

/// Whether, in every entry, each launch equal to `a` is followed by one equal to `b` and
/// each equal to `b` follows one equal to `a`.
fn always_together(program: &Program, a: &Launch, b: &Launch) -> bool {
    program.entries.iter().all(|e| {
        let l = &e.launches;
        (0..l.len()).all(|i| (l[i] != *a || l.get(i + 1) == Some(b)) && (l[i] != *b || (i > 0 && l[i - 1] == *a)))
    })
}

/// Removes the kernels no launch runs, renumbering the launches' kernel indices.
pub(super) fn drop_unused_kernels(program: &mut Program) {
    let mut used = vec![false; program.kernels.len()];
    for l in program.entries.iter().flat_map(|e| &e.launches) {
        used[l.kernel] = true;
    }
    let mut renumber = vec![0; program.kernels.len()];
    let mut next = 0;
    for (i, &u) in used.iter().enumerate() {
        renumber[i] = next;
        next += usize::from(u);
    }
    let mut i = 0;
    program.kernels.retain(|_| {
        i += 1;
        used[i - 1]
    });
    for l in program.entries.iter_mut().flat_map(|e| &mut e.launches) {
        l.kernel = renumber[l.kernel];
    }
}

/// Whether each grid iteration of `k` writes every element of its example's slice of
/// argument `arg` (a batched argument indexed by the grid variable) before it reads that
/// element, as far as enumerating every access to `arg` in the iteration for example 0
/// shows: a store under an `If` whose condition depends on data counts as not written, a
/// read anywhere counts. `false` where it cannot tell (a loop over the batch inside the
/// iteration, more than [`MAX_ACCESSES`] accesses, an index outside the slice).
pub fn writes_slice_first(k: &Kernel, arg: ArgId) -> bool {
    thread_local! {
        /// Answers so far, by the kernel's text and the argument: planning lowers the same
        /// kernels once per candidate, and enumerating a large slice takes a while.
        static SEEN: std::cell::RefCell<HashMap<(String, u32), bool>> = std::cell::RefCell::new(HashMap::new());
    }
    // The common case at once: the first statement that touches the slice writes all of it.
    if let Some(a) = k.args.get(arg.0 as usize).filter(|a| a.dims.first() == Some(&Dim::Batch)) {
        if let Some(first) = k.grid.body.iter().find(|s| touches(s, arg)) {
            if covers(first, arg, k.grid.var, &a.strides(), a.len(1), &mut Vec::new()) {
                return true;
            }
        }
    }
    let key = (k.to_string(), arg.0);
    if let Some(known) = SEEN.with(|seen| seen.borrow().get(&key).copied()) {
        return known;
    }
    let answer = enumerate_writes(k, arg);
    SEEN.with(|seen| {
        let mut seen = seen.borrow_mut();
        if seen.len() >= 1024 {
            seen.clear();
        }
        seen.insert(key, answer);
    });
    answer
}

/// [`writes_slice_first`] by enumerating the accesses.
fn enumerate_writes(k: &Kernel, arg: ArgId) -> bool {
    let Some(a) = k.args.get(arg.0 as usize) else { return false };
    if a.dims.first() != Some(&Dim::Batch) {
        return false;
    }
    let len = a.len(1);
    let Ok(size) = usize::try_from(len) else { return false };
    let strides = a.strides();
    let mut walk = Walk {
        arg,
        strides,
        written: vec![false; size],
        left: size,
        touching: HashMap::new(),
        vars: vec![None; k.vars.len()],
        budget: MAX_ACCESSES.min(len.saturating_mul(8)),
        grid: k.grid.var,
    };
    walk.vars[k.grid.var.0 as usize] = Some(0);
    walk.body(&k.grid.body, true) && walk.left == 0
}

/// Whether `s`, a nest of loops around one plain store to `arg` or a contraction that
/// stores (not adds) into `arg` (with `loops` the enclosing loops' variables and extents so
/// far; at each level, the other statements touch no `arg`), writes every element of the
/// example's slice exactly once without reading `arg` first.
fn covers(s: &Stmt, arg: ArgId, grid: VarId, strides: &[u64], len: u64, loops: &mut Vec<(VarId, u64)>) -> bool {
    match s {
        Stmt::Loop(l) => {
            // Statements that do not touch `arg` neither write nor read it.
            let touching: Vec<&Stmt> = l.body.iter().filter(|s| touches(s, arg)).collect();
            let (Dim::Fixed(n), [inner]) = (l.extent, touching.as_slice()) else { return false };
            loops.push((l.var, u64::from(n)));
            covers(inner, arg, grid, strides, len, loops)
        }
        Stmt::Store { arg: to, index, value, accumulate: false } if *to == arg => {
            !touches(&Stmt::Set { acc: AccId(0), value: value.clone() }, arg)
                && counts_through(index, grid, strides, loops, len)
        }
        Stmt::Contract(c) if c.c.arg == arg && !c.accumulate && c.a.arg != arg && c.b.arg != arg => {
            let (Dim::Fixed(m), Dim::Fixed(n)) = (c.extents[0], c.extents[1]) else { return false };
            loops.extend([(c.m, u64::from(m)), (c.n, u64::from(n))]);
            counts_through(&c.c.index, grid, strides, loops, len)
        }
        _ => false,
    }
}

/// Whether `index` is the grid variable, then a flat offset `Σ coef·var` (through
/// `strides`) whose terms are the variables of `loops`, each once, with strides that count
/// through all `len` elements of the slice in mixed radix.
fn counts_through(index: &[Affine], grid: VarId, strides: &[u64], loops: &[(VarId, u64)], len: u64) -> bool {
    let Some((first, rest)) = index.split_first() else { return false };
    if first.as_var() != Some(grid) {
        return false;
    }
    // Each loop's stride in the flat offset.
    let mut terms: Vec<(u64, u64, VarId)> = Vec::new();
    for (a, &stride) in rest.iter().zip(&strides[1..]) {
        if a.offset != 0 {
            return false;
        }
        for t in &a.terms {
            let Some(&(_, n)) = loops.iter().find(|(v, _)| *v == t.var) else { return false };
            if t.div != 1 || t.coef <= 0 || terms.iter().any(|(_, _, v)| *v == t.var) {
                return false;
            }
            terms.push((t.coef as u64 * stride, n, t.var));
        }
    }
    if terms.len() != loops.len() {
        return false;
    }
    terms.sort_unstable_by_key(|&(stride, n, _)| (stride, n));
    let mut next = 1;
    for (stride, n, _) in terms {
        if stride != next {
            return false;
        }
        next = stride * n;
    }
    next == len
}

struct Walk {
    arg: ArgId,
    strides: Vec<u64>,
    written: Vec<bool>,
    /// Elements not yet written: at 0, nothing that follows can read unwritten memory.
    left: usize,
    /// [`Walk::touches`] of each statement seen, by address (the kernel is not changed
    /// while it is walked).
    touching: HashMap<*const Stmt, bool>,
    vars: Vec<Option<i64>>,
    budget: u64,
    grid: VarId,
}

impl Walk {
    /// Walks `body`; `sure` is whether it runs unconditionally. False on anything it
    /// cannot follow, or a read before a write.
    fn body(&mut self, body: &[Stmt], sure: bool) -> bool {
        body.iter().all(|s| self.stmt(s, sure))
    }

    /// Whether `s` touches the argument (remembered per statement: a loop asks it of its
    /// body's statements in every iteration).
    fn touches(&mut self, s: &Stmt) -> bool {
        let arg = self.arg;
        *self.touching.entry(s as *const Stmt).or_insert_with(|| touches(s, arg))
    }

    /// Records a write of element `at`, where it certainly happens.
    fn mark(&mut self, at: usize, sure: bool) {
        if sure && !self.written[at] {
            self.written[at] = true;
            self.left -= 1;
        }
    }

    fn stmt(&mut self, s: &Stmt, sure: bool) -> bool {
        // Once every element is written, nothing after can read unwritten memory.
        if self.left == 0 || !self.touches(s) {
            return true;
        }
        match s {
            Stmt::Loop(l) => {
                let Dim::Fixed(n) = l.extent else { return false };
                let v = l.var.0 as usize;
                for i in 0..i64::from(n) {
                    if self.left == 0 {
                        break;
                    }
                    self.budget = match self.budget.checked_sub(1) {
                        Some(b) => b,
                        None => return false,
                    };
                    self.vars[v] = Some(i);
                    if !self.body(&l.body, sure) {
                        return false;
                    }
                }
                self.vars[v] = None;
                true
            }
            Stmt::Set { value, .. } => self.reads(value),
            Stmt::Store { arg, index, value, accumulate } => {
                if !self.reads(value) {
                    return false;
                }
                if *arg != self.arg {
                    return true;
                }
                let Some(at) = self.offset(index) else { return false };
                if *accumulate && !self.written[at] {
                    return false;
                }
                self.mark(at, sure);
                true
            }
            Stmt::If { cond, then } => match self.cond(cond) {
                Some(Some(true)) => self.body(then, sure),
                Some(Some(false)) => true,
                Some(None) => self.body(then, false),
                None => false,
            },
            Stmt::Contract(c) => {
                let extents: Option<Vec<i64>> = c
                    .extents
                    .iter()
                    .map(|e| match e {
                        Dim::Fixed(n) => Some(i64::from(*n)),
                        Dim::Batch => None,
                    })
                    .collect();
                let Some(&[m, n, kk]) = extents.as_deref() else { return false };
                // Reads of the operands, then each element of `C` read (accumulating) and
                // written.
                for (op, (r, s)) in [(&c.a, (c.m, c.k)), (&c.b, (c.k, c.n))] {
                    if op.arg != self.arg {
                        continue;
                    }
                    let (rows, cols) = if r == c.m { (m, kk) } else { (kk, n) };
                    for i in 0..rows {
                        for j in 0..cols {
                            self.vars[r.0 as usize] = Some(i);
                            self.vars[s.0 as usize] = Some(j);
                            let Some(at) = self.offset(&op.index) else { return false };
                            if !self.written[at] {
                                return false;
                            }
                        }
                    }
                }
                if c.c.arg == self.arg {
                    for i in 0..m {
                        for j in 0..n {
                            self.vars[c.m.0 as usize] = Some(i);
                            self.vars[c.n.0 as usize] = Some(j);
                            let Some(at) = self.offset(&c.c.index) else { return false };
                            if c.accumulate && !self.written[at] {
                                return false;
                            }
                            self.mark(at, sure);
                        }
                    }
                }
                for v in [c.m, c.n, c.k] {
                    self.vars[v.0 as usize] = None;
                }
                true
            }
        }
    }

    /// Checks the reads of `arg` in `e`.
    fn reads(&mut self, e: &Expr) -> bool {
        match e {
            Expr::Const(_) | Expr::Acc(_) | Expr::Index(_) => true,
            Expr::Load { arg, index } if *arg == self.arg => self.offset(index).is_some_and(|at| self.written[at]),
            Expr::Load { .. } => true,
            Expr::Unary(_, x) => self.reads(x),
            Expr::Binary(_, x, y) => self.reads(x) && self.reads(y),
            Expr::Select { cond, then, otherwise } => {
                self.cond_reads(cond) && self.reads(then) && self.reads(otherwise)
            }
        }
    }

    fn cond_reads(&mut self, c: &Cond) -> bool {
        match c {
            Cond::InRange { .. } => true,
            Cond::Cmp { a, b, .. } => self.reads(a) && self.reads(b),
            Cond::And(cs) => cs.iter().all(|c| self.cond_reads(c)),
        }
    }

    /// The condition's value where it depends on indices only (`Some(None)` where it
    /// depends on data); `None` where a read in it comes before a write.
    fn cond(&mut self, c: &Cond) -> Option<Option<bool>> {
        if !self.cond_reads(c) {
            return None;
        }
        Some(self.value(c))
    }

    fn value(&self, c: &Cond) -> Option<bool> {
        match c {
            Cond::InRange { index, lo, hi } => self.eval(index).map(|i| *lo <= i && i < *hi),
            Cond::Cmp { .. } => None,
            Cond::And(cs) => {
                let values: Vec<Option<bool>> = cs.iter().map(|c| self.value(c)).collect();
                if values.contains(&Some(false)) {
                    Some(false)
                } else if values.iter().all(|v| *v == Some(true)) {
                    Some(true)
                } else {
                    None
                }
            }
        }
    }

    fn eval(&self, a: &Affine) -> Option<i64> {
        a.terms.iter().try_fold(a.offset, |sum, t| {
            let v = self.vars.get(t.var.0 as usize).copied().flatten()?;
            (t.div > 0).then(|| sum + t.coef * v.div_euclid(t.div))
        })
    }

    /// The element of the slice an access to `arg` at `index` reaches: its batch index
    /// must be the grid variable, its offset within the slice.
    fn offset(&mut self, index: &[Affine]) -> Option<usize> {
        self.budget = self.budget.checked_sub(1)?;
        let (first, rest) = index.split_first()?;
        if first.as_var() != Some(self.grid) {
            return None;
        }
        let mut at = 0i64;
        for (a, &stride) in rest.iter().zip(&self.strides[1..]) {
            at += self.eval(a)? * stride as i64;
        }
        let at = usize::try_from(at).ok()?;
        (at < self.written.len()).then_some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::builder::{accumulate, batched, load, lp, store, v, KernelBuilder};
    use crate::lower::{BufId, BufferDecl, Entry, EntryKind};
    use pdgc_codegen::ir::{CmpOp, Cond, Expr};

    /// A kernel over the batch writing `t[n, i]` for `i < 4` with `body` (given `t` and
    /// `i`), from an input `x[n, 4]`.
    fn writer(body: impl Fn(ArgId, ArgId, pdgc_codegen::ir::VarId, pdgc_codegen::ir::VarId) -> Vec<Stmt>) -> Kernel {
        let mut kb = KernelBuilder::new("w");
        let x = kb.input("x", batched(&[4]));
        let t = kb.output("t", batched(&[4]));
        let [n, i] = [kb.var("n"), kb.var("i")];
        let body = body(x, t, n, i);
        kb.finish(n, Dim::Batch, body).expect("valid")
    }

    #[test]
    fn a_writer_must_write_the_whole_slice_before_reading_it() {
        let t = ArgId(1);
        let all = writer(|x, t, n, i| vec![lp(i, 4, vec![store(t, vec![v(n), v(i)], load(x, vec![v(n), v(i)]))])]);
        assert!(writes_slice_first(&all, t));
        // Three elements of four.
        let part = writer(|x, t, n, i| vec![lp(i, 3, vec![store(t, vec![v(n), v(i)], load(x, vec![v(n), v(i)]))])]);
        assert!(!writes_slice_first(&part, t));
        // Zeroed, then accumulated: fine; accumulated first: not.
        let zeroed = writer(|x, t, n, i| {
            vec![
                lp(i, 4, vec![store(t, vec![v(n), v(i)], Expr::Const(0.0))]),
                lp(i, 4, vec![accumulate(t, vec![v(n), v(i)], load(x, vec![v(n), v(i)]))]),
            ]
        });
        assert!(writes_slice_first(&zeroed, t));
        let unzeroed =
            writer(|x, t, n, i| vec![lp(i, 4, vec![accumulate(t, vec![v(n), v(i)], load(x, vec![v(n), v(i)]))])]);
        assert!(!writes_slice_first(&unzeroed, t));
        // A store under a condition on data may not happen.
        let data = writer(|x, t, n, i| {
            let cond = Cond::Cmp { op: CmpOp::Gt, a: load(x, vec![v(n), v(i)]), b: Expr::Const(0.0) };
            vec![lp(i, 4, vec![Stmt::If { cond, then: vec![store(t, vec![v(n), v(i)], Expr::Const(1.0))] }])]
        });
        assert!(!writes_slice_first(&data, t));
        // Another example's slice is not this one's.
        let other =
            writer(|x, t, n, i| vec![lp(i, 4, vec![store(t, vec![v(n).offset(1), v(i)], load(x, vec![v(n), v(i)]))])]);
        assert!(!writes_slice_first(&other, t));
    }

    /// `x → t → y`: `t[n, i] = 2·x[n, i]`, `y[n, i] = t[n, i] + 1`, as a program whose
    /// entries run both launches, and optionally a third that reads `t` too.
    fn program(third_reader: bool) -> Program {
        let double = writer(|x, t, n, i| {
            vec![lp(i, 4, vec![store(t, vec![v(n), v(i)], Expr::mul(Expr::Const(2.0), load(x, vec![v(n), v(i)])))])]
        });
        let mut kb = KernelBuilder::new("r");
        let t = kb.input("t", batched(&[4]));
        let y = kb.output("y", batched(&[4]));
        let [n, i] = [kb.var("n"), kb.var("i")];
        let body =
            vec![lp(i, 4, vec![store(y, vec![v(n), v(i)], Expr::add(load(t, vec![v(n), v(i)]), Expr::Const(1.0)))])];
        let plus = kb.finish(n, Dim::Batch, body).expect("valid");
        let buffer =
            |name: &str, role| BufferDecl { name: name.into(), batched: true, shape: vec![4], role, chunk: None };
        let launch = |kernel, args: Vec<u32>| Launch {
            kernel,
            args: args.into_iter().map(BufId).collect(),
            mode: LaunchMode::Grid,
            node: None,
        };
        let mut launches = vec![launch(0, vec![0, 1]), launch(1, vec![1, 2])];
        if third_reader {
            launches.push(launch(1, vec![1, 3]));
        }
        Program {
            buffers: vec![
                buffer("x", Role::Input("x".into())),
                buffer("t", Role::Activation(1)),
                buffer("y", Role::Activation(2)),
                buffer("z", Role::Activation(3)),
            ],
            kernels: vec![double, plus],
            entries: vec![Entry { kind: EntryKind::Loss, launches }],
        }
    }

    #[test]
    fn a_tensor_only_the_next_launch_reads_becomes_private() {
        let mut p = program(false);
        fuse_chains(&mut p, &[], 1 << 20);
        assert_eq!(p.kernels.len(), 1, "the two kernels are dropped for the fused one");
        let [launch] = p.entries[0].launches.as_slice() else { panic!("{:?}", p.entries[0].launches) };
        assert_eq!(launch.args, vec![BufId(0), BufId(2)], "`t` is bound by no launch");
        let k = &p.kernels[launch.kernel];
        assert_eq!(k.args.iter().filter(|a| !a.is_bound()).count(), 1);
        let mut x = [1.0f32, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0];
        let mut y = [0.0f32; 8];
        pdgc_codegen::interp::run(k, &mut [&mut x, &mut y], 2).expect("runs");
        assert_eq!(y, [3.0, 5.0, 7.0, 9.0, -1.0, -3.0, -5.0, -7.0]);
    }

    #[test]
    fn a_tensor_read_elsewhere_or_kept_stays_in_memory() {
        let mut p = program(true);
        fuse_chains(&mut p, &[], 1 << 20);
        assert_eq!(p.entries[0].launches.len(), 3, "a third launch reads `t`");
        let mut p = program(false);
        fuse_chains(&mut p, &[BufId(1)], 1 << 20);
        assert_eq!(p.entries[0].launches.len(), 2, "the session reads `t`");
        let mut p = program(false);
        fuse_chains(&mut p, &[], 15);
        assert_eq!(p.entries[0].launches.len(), 2, "`t` is 16 bytes per example");
    }
}
