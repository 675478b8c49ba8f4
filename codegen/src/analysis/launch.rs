//! How a kernel's iterations may be split: which grid iterations are independent (the CPU
//! backend splits those over threads, the CUDA backend over blocks), which loops nested in
//! the grid become GPU thread dimensions ([`parallel_nest`]) and which loops of the
//! innermost body are sunk into the thread index ([`sunk_loops`]).

use super::{visit_accesses, visit_accesses_in_loops};
use crate::ir::{AccId, Cond, Expr, Extent, Kernel, Loop, Stmt, VarId};
use crate::visit::{walk_body, walk_expr, walk_stmt, Visitor};

/// A sufficient condition for the IR's promise that grid iterations are independent:
/// every argument that some statement stores to is accessed (by every load and store of
/// it) with the grid variable, alone, in one and the same index position. Iteration `g`
/// then touches only elements whose coordinate there is `g`, so iterations run on
/// different threads never touch the same element. Private arguments count in their
/// sliced form ([`Kernel::private_sliced`], one slice per iteration), so they never stand
/// in the way. Assumes a verified kernel.
pub fn grid_independent(k: &Kernel) -> bool {
    let k = k.private_sliced();
    independent_over(k.args.len(), &k.grid.body, &[k.grid.var])
}

/// The same condition for several loop variables at once (the grid's and those of loops
/// nested in it): every stored argument is accessed, by every load and store of it in
/// `body`, with each variable of `vars` alone in a position fixed per variable. Then
/// distinct combinations of the variables' values touch disjoint elements of every stored
/// argument, so the combinations may run on different threads.
pub fn independent_over(args: usize, body: &[Stmt], vars: &[VarId]) -> bool {
    let mut stored = vec![false; args];
    visit_accesses(body, &mut |arg, _, store| {
        if store {
            if let Some(s) = stored.get_mut(arg.0 as usize) {
                *s = true;
            }
        }
    });
    // For each stored argument and variable, the positions that are that variable in every
    // access seen so far (a bit set; buffers have few dims).
    let mut positions: Vec<Vec<u64>> = vec![vec![u64::MAX; vars.len()]; args];
    let mut ok = true;
    visit_accesses(body, &mut |arg, index, _| {
        let i = arg.0 as usize;
        if !stored.get(i).copied().unwrap_or(false) {
            return;
        }
        for (slot, &v) in positions[i].iter_mut().zip(vars) {
            let here = index
                .iter()
                .take(64)
                .enumerate()
                .filter(|(_, a)| a.as_var() == Some(v))
                .fold(0u64, |m, (p, _)| m | 1 << p);
            *slot &= here;
            if *slot == 0 {
                ok = false;
            }
        }
    });
    ok
}

/// Another sufficient condition for the iterations of the loops `nest` (perfectly nested,
/// outermost first, the outermost one the only statement of `body`) to touch disjoint
/// elements, on the flat (row-major) element index of each stored argument. Every access
/// to it is `Σ c_v·v` over the nest's variables, the same for all of them, plus the same
/// terms in variables bound outside the nest (fixed while it runs), plus a part in the
/// variables of loops inside the nest and a constant, which lies in one window
/// `[lo, hi]` for all accesses. The accesses of one iteration then lie within
/// `base + [lo, hi]`, and distinct iterations' bases are far enough apart when, taken in
/// order of increasing `|c_v|`, each step exceeds what the window and the smaller steps
/// span: `|c_v| > (hi − lo) + Σ |c_u|·(extent_u − 1)`, as the digits of a mixed-radix
/// number (a batch extent is allowed only for the largest step). This covers the flattened
/// stores [`independent_over`] cannot see, such as an im2col's columns
/// `cols[576·ci + 192·kh + 64·kw + 8·oh + ow]` with their padding taps.
pub fn injective_over(k: &Kernel, body: &[Stmt], nest: &[&Loop]) -> bool {
    let Some(inner) = nest.last() else { return false };
    // The loops inside the nest, with their extents.
    struct Loops<'a>(Vec<&'a Loop>);
    impl<'a> Visitor<'a> for Loops<'a> {
        fn enter_loop(&mut self, l: &'a Loop) {
            self.0.push(l);
        }
    }
    let mut inside = Loops(Vec::new());
    walk_body(&mut inside, &inner.body);
    let mut stored = vec![false; k.args.len()];
    visit_accesses(body, &mut |arg, _, store| stored[arg.0 as usize] |= store);
    /// Per stored argument: the nest's steps and the outer terms every access shares, and
    /// the window of the rest.
    #[derive(PartialEq)]
    struct Shape {
        nest: Vec<i128>,
        outer: Vec<(VarId, i128)>,
    }
    let mut seen: Vec<Option<(Shape, i128, i128)>> = (0..k.args.len()).map(|_| None).collect();
    let mut ok = true;
    visit_accesses(body, &mut |arg, index, _| {
        let i = arg.0 as usize;
        if !stored[i] || !ok {
            return;
        }
        let strides = k.args[i].strides();
        let mut shape = Shape { nest: vec![0; nest.len()], outer: Vec::new() };
        let (mut lo, mut hi) = (0i128, 0i128);
        for (a, &st) in index.iter().zip(&strides) {
            let st = i128::from(st);
            lo += i128::from(a.offset) * st;
            hi += i128::from(a.offset) * st;
            for t in &a.terms {
                let step = i128::from(t.coef) * st;
                if let Some(p) = nest.iter().position(|l| l.var == t.var) {
                    ok &= t.div == 1;
                    shape.nest[p] += step;
                } else if let Some(l) = inside.0.iter().find(|l| l.var == t.var) {
                    // A loop inside the nest: its variable spans [0, extent − 1].
                    let Extent::Fixed(e) = l.extent else {
                        ok = false;
                        return;
                    };
                    ok &= t.div == 1;
                    let reach = step * (i128::from(e.max(1)) - 1);
                    lo += reach.min(0);
                    hi += reach.max(0);
                } else {
                    ok &= t.div == 1;
                    match shape.outer.iter_mut().find(|o| o.0 == t.var) {
                        Some(o) => o.1 += step,
                        None => shape.outer.push((t.var, step)),
                    }
                }
            }
        }
        shape.outer.sort_by_key(|o| o.0 .0);
        match &mut seen[i] {
            Some((s, l, h)) => {
                ok &= *s == shape;
                (*l, *h) = ((*l).min(lo), (*h).max(hi));
            }
            slot => *slot = Some((shape, lo, hi)),
        }
    });
    ok && seen.iter().flatten().all(|(shape, lo, hi)| {
        let mut steps: Vec<(i128, Extent)> = Vec::new();
        for (l, &step) in nest.iter().zip(&shape.nest) {
            match l.extent {
                Extent::Fixed(0 | 1) => {}
                _ if step == 0 => return false,
                e => steps.push((step.abs(), e)),
            }
        }
        steps.sort_by_key(|s| s.0);
        let mut span = hi - lo;
        for (j, &(step, extent)) in steps.iter().enumerate() {
            if step <= span {
                return false;
            }
            match extent {
                Extent::Fixed(e) => span += step * (i128::from(e) - 1),
                Extent::Batch if j + 1 == steps.len() => {}
                Extent::Batch => return false,
            }
        }
        true
    })
}

/// The loops that become the thread index: the grid, then each loop that is the whole
/// body of the previous one, as long as every stored argument stays indexed by all of
/// their variables ([`independent_over`]) and every accumulator read in the loop's body is
/// set earlier in the same iteration (so per-thread registers see the same values the
/// sequential loop would). Empty when the grid itself is not independent.
pub fn parallel_nest(k: &Kernel) -> Vec<&Loop> {
    if !grid_independent(k) || !accs_set_before_read(&k.grid.body, &mut Vec::new()) {
        return Vec::new();
    }
    let mut nest = vec![&k.grid];
    let mut vars = vec![k.grid.var];
    while let [Stmt::Loop(inner)] = nest[nest.len() - 1].body.as_slice() {
        vars.push(inner.var);
        if !independent_over(k.args.len(), &k.grid.body, &vars) || !accs_set_before_read(&inner.body, &mut Vec::new()) {
            break;
        }
        nest.push(inner);
    }
    nest
}

/// Loops inside the parallel nest's body that also become a thread dimension ("sunk"):
/// each thread runs the body with every loop of `vars` cut down to the single iteration
/// `pdgc_t`, the innermost thread index. Found by [`sunk_loops`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sunk {
    pub extent: Extent,
    pub vars: Vec<VarId>,
}

/// The loops of the parallel nest's innermost `body` that can be sunk into the thread
/// index, if any. Every load and store of every stored argument lies in one of them, and
/// indexes that argument with the loop's variable alone at one position fixed per argument;
/// they all have the same extent, none contains another, none carries a register value from
/// one iteration to the next, and no register set in one is read outside them. Then threads
/// that differ only in `pdgc_t` touch disjoint elements of every stored argument, and each
/// sees the values the sequential loops would give it.
///
/// This turns the GEMM-shaped loops (`for r { w = W[co,r]; for t { y[t] += w·x[r,t] } }`)
/// into one thread per output element, reducing over `r` in its own registers, with
/// neighbouring threads on neighbouring `t` (coalesced loads and stores).
pub fn sunk_loops(k: &Kernel, body: &[Stmt]) -> Option<Sunk> {
    let mut stored = vec![false; k.args.len()];
    visit_accesses(body, &mut |arg, _, store| stored[arg.0 as usize] |= store);
    // For each access of a stored argument, the innermost enclosing loop whose variable is
    // alone at some index position; that position must be the same for every access.
    let mut chosen: Vec<&Loop> = Vec::new();
    let mut positions: Vec<Option<usize>> = vec![None; k.args.len()];
    let mut ok = true;
    visit_accesses_in_loops(body, &mut Vec::new(), &mut |arg, index, _, loops| {
        if !stored[arg.0 as usize] {
            return;
        }
        let found =
            loops.iter().rev().find_map(|l| index.iter().position(|a| a.as_var() == Some(l.var)).map(|p| (*l, p)));
        let Some((l, p)) = found else {
            ok = false;
            return;
        };
        ok &= positions[arg.0 as usize].replace(p).is_none_or(|q| q == p);
        if !chosen.iter().any(|c| c.var == l.var) {
            chosen.push(l);
        }
    });
    let extent = chosen.first()?.extent;
    if !ok || extent == Extent::Fixed(1) || chosen.iter().any(|l| l.extent != extent) {
        return None;
    }
    let vars: Vec<VarId> = chosen.iter().map(|l| l.var).collect();
    let mut assigned_inside = Vec::new();
    for l in &chosen {
        let mut assigned = Vec::new();
        collect_sets(&l.body, &mut assigned, &mut Vec::new());
        // A register the loop assigns must be set before it is read in each iteration (a
        // running sum is not); one it does not assign is loop-invariant.
        let mut invariant: Vec<AccId> = (0..k.accs.len() as u32).map(AccId).filter(|a| !assigned.contains(a)).collect();
        let mut inner_loops = Vec::new();
        collect_sets(&l.body, &mut Vec::new(), &mut inner_loops);
        if inner_loops.iter().any(|v| vars.contains(v)) || !accs_set_before_read(&l.body, &mut invariant) {
            return None;
        }
        assigned_inside.extend(assigned);
    }
    if reads_outside(body, &vars, &assigned_inside) {
        return None;
    }
    Some(Sunk { extent, vars })
}

/// The registers `body` sets and the loop variables it binds, at any depth.
fn collect_sets(body: &[Stmt], accs: &mut Vec<AccId>, loops: &mut Vec<VarId>) {
    struct Sets<'a> {
        accs: &'a mut Vec<AccId>,
        loops: &'a mut Vec<VarId>,
    }
    impl<'k> Visitor<'k> for Sets<'_> {
        fn stmt(&mut self, s: &'k Stmt) {
            if let Stmt::Set { acc, .. } = s {
                self.accs.push(*acc);
            }
            walk_stmt(self, s);
        }
        fn enter_loop(&mut self, l: &'k Loop) {
            self.loops.push(l.var);
        }
    }
    // Kernels are desugared before any analysis here (`render_module`).
    walk_body(&mut Sets { accs, loops }, body);
}

/// Whether `body`, outside the loops over `vars`, reads one of `accs`.
fn reads_outside(body: &[Stmt], vars: &[VarId], accs: &[AccId]) -> bool {
    let hit = |a: AccId| accs.contains(&a);
    body.iter().any(|s| match s {
        Stmt::Loop(l) if vars.contains(&l.var) => false,
        Stmt::Loop(l) => reads_outside(&l.body, vars, accs),
        Stmt::Set { value, .. } | Stmt::Store { value, .. } => reads_acc(value, &hit),
        Stmt::If { cond, then } => cond_reads_acc(cond, &hit) || reads_outside(then, vars, accs),
        Stmt::Contract(_) => false,
    })
}

/// Whether `e` reads a register for which `p` holds.
pub(crate) fn reads_acc(e: &Expr, p: &impl Fn(AccId) -> bool) -> bool {
    let mut reads = ReadsAcc { p, hit: false };
    reads.expr(e);
    reads.hit
}

pub(crate) fn cond_reads_acc(c: &Cond, p: &impl Fn(AccId) -> bool) -> bool {
    let mut reads = ReadsAcc { p, hit: false };
    reads.cond(c);
    reads.hit
}

/// Finds a read of a register for which `p` holds.
struct ReadsAcc<'p, P> {
    p: &'p P,
    hit: bool,
}

impl<'k, P: Fn(AccId) -> bool> Visitor<'k> for ReadsAcc<'_, P> {
    fn expr(&mut self, e: &'k Expr) {
        if let Expr::Acc(a) = e {
            self.hit |= (self.p)(*a);
        }
        walk_expr(self, e);
    }
}

/// Whether every accumulator read in `body` was set before, in program order, within one
/// execution of `body` (sets inside nested loops and `if`s count only inside them).
pub(crate) fn accs_set_before_read(body: &[Stmt], set: &mut Vec<AccId>) -> bool {
    for s in body {
        let unset = |a: AccId| !set.contains(&a);
        let ok = match s {
            Stmt::Set { acc, value } => {
                let ok = !reads_acc(value, &unset);
                set.push(*acc);
                ok
            }
            Stmt::Store { value, .. } => !reads_acc(value, &unset),
            Stmt::Loop(l) => accs_set_before_read(&l.body, &mut set.clone()),
            Stmt::If { cond, then } => !cond_reads_acc(cond, &unset) && accs_set_before_read(then, &mut set.clone()),
            Stmt::Contract(_) => true,
        };
        if !ok {
            return false;
        }
    }
    true
}
