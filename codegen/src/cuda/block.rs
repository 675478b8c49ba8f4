//! Block-cooperative kernels: one CUDA block of [`BLOCK`] threads per grid iteration, its
//! threads stepping together through the iteration's statements, a `__syncthreads()`
//! barrier after each (the IR's statements run in order; the barrier makes one
//! statement's stores visible to the next one's loads, global and shared memory alike).
//!
//! Each statement of the grid's body becomes a `Unit`:
//! * a contraction: a tiled product ([`Tile`]): the block walks `C` in block tiles of
//!   `bm × bn`; each thread sums a `tm × tn` register tile, reading `A` and `B` from shared
//!   memory, where the block stages `bk` steps of `k` at a time in two alternating stages
//!   (the next step's loads overlap this step's arithmetic, one barrier per step). Each
//!   thread sums its outputs over `k` in ascending order, as the IR defines the sum, so the
//!   result equals the loop nest's to rounding (NVRTC may fuse the multiply-adds).
//! * a loop nest whose iterations the independence proof separates
//!   ([`independent_over`], as for the grid): spread over the block's threads, with the
//!   loops of its innermost body that [`sunk_loops`] proves safe in the thread index too.
//! * a loop (or `if`) whose body holds a contraction: every thread runs it, its body's
//!   statements units of their own (uniform control flow, so every thread meets the same
//!   barriers).
//! * a sum into a register from zero through a loop nest (a squared norm): the threads
//!   split the iterations, a tree in shared memory adds their partial sums.
//! * anything else (a running sum, a store through a reduction), and consecutive statements
//!   that share a register: thread 0 runs them while the others wait at the barrier after.
//!
//! A kernel is rendered this way when its grid iterations are independent (or the grid is a
//! single iteration), every register read is set earlier in the same unit, and some unit
//! does work the block can share (a contraction or a spread nest); see `plan`. Statements
//! that share a register (a running sum set, updated, then stored) are one unit. Otherwise
//! the one-thread-per-iteration form of [`super`] renders it.

use std::fmt::Write;

use super::{pad, Renderer, BLOCK};
use crate::analysis::launch::{
    accs_set_before_read, cond_reads_acc, grid_independent, independent_over, injective_over, reads_acc, sunk_loops,
    Sunk,
};
use crate::ir::{holds_contract, AccId, Binary, Cond, Contract, Expr, Extent, Kernel, Loop, Operand, Stmt, VarId};

/// A contraction's tiling: block tile `bm × bn` of `C`, `bk` steps of `k` per shared-memory
/// stage, register tile `tm × tn` per thread. `(bm / tm) · (bn / tn)` is [`BLOCK`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub tm: u32,
    pub tn: u32,
}

impl Tile {
    /// Floats of one shared-memory stage: `bk` rows of `A`'s tile and of `B`'s.
    pub fn stage(&self) -> u32 {
        self.bk * (self.bm + self.bn)
    }

    /// Threads along a tile's columns.
    fn cols(&self) -> u32 {
        self.bn / self.tn
    }
}

/// The block tiles [`tile_for`] chooses from, `(bm, bn, tm, tn)`, each of [`BLOCK`] threads.
const TILES: [(u32, u32, u32, u32); 13] = [
    (128, 64, 8, 8),
    (64, 128, 8, 8),
    (64, 64, 8, 4),
    (64, 64, 4, 8),
    (64, 32, 4, 4),
    (32, 64, 4, 4),
    (64, 16, 4, 2),
    (16, 64, 2, 4),
    (32, 32, 4, 2),
    (32, 32, 2, 4),
    (32, 16, 2, 2),
    (16, 32, 2, 2),
    (16, 16, 2, 1),
];

/// Steps of `k` per shared-memory stage.
const TILE_K: u32 = 16;

/// The batch a contraction over the batch is tiled for (its extent is known only at launch).
const ASSUMED_BATCH: u64 = 256;

/// The tile for a contraction of extents `[M, N, K]`, from its shape: the one that least
/// costs `padded(M) · padded(N) · (1 + 1/tm + 1/tn)`, the multiply-adds of the block
/// tiles that cover `C` (rounded up to whole tiles) plus the shared-memory loads that feed
/// them (`tm + tn` per `tm · tn` multiply-adds). Big register tiles where `C` is large,
/// small ones where a big tile would be mostly padding.
pub fn tile_for(extents: [Extent; 3]) -> Tile {
    let size = |e: Extent| match e {
        Extent::Fixed(n) => u64::from(n.max(1)),
        Extent::Batch => ASSUMED_BATCH,
    };
    let (m, n) = (size(extents[0]), size(extents[1]));
    let cost = |t: &Tile| {
        let padded = m.div_ceil(u64::from(t.bm)) * u64::from(t.bm) * n.div_ceil(u64::from(t.bn)) * u64::from(t.bn);
        padded as f64 * (1.0 + 1.0 / f64::from(t.tm) + 1.0 / f64::from(t.tn))
    };
    TILES
        .iter()
        .map(|&(bm, bn, tm, tn)| Tile { bm, bn, bk: TILE_K, tm, tn })
        .min_by(|a, b| cost(a).total_cmp(&cost(b)))
        .expect("TILES is not empty")
}

/// How the block runs one statement of a grid iteration.
#[derive(Debug)]
pub(super) enum Unit<'k> {
    /// Every thread runs the loop (or `if`); its body's statements are units of their own.
    Uniform { head: Head<'k>, body: Vec<Unit<'k>> },
    /// A tiled product.
    Contract(&'k Contract, Tile),
    /// The iterations of the perfectly nested loops `nest` spread over the block's threads,
    /// the `sunk` loops of the innermost body in the thread index too.
    Spread { nest: Vec<&'k Loop>, sunk: Option<Sunk> },
    /// A sum from zero into register `acc` over the perfectly nested loops `nest`, whose
    /// innermost body is `acc = acc + term`: the threads split the iterations, each sums
    /// its share, a tree in shared memory adds the shares; then thread 0 runs `rest`
    /// (typically the store of the sum).
    Reduce { acc: AccId, nest: Vec<&'k Loop>, term: &'k Expr, rest: Vec<&'k Stmt> },
    /// Thread 0 runs these statements.
    Single(Vec<&'k Stmt>),
}

/// The control statement of a [`Unit::Uniform`].
#[derive(Debug)]
pub(super) enum Head<'k> {
    Loop(&'k Loop),
    If(&'k Cond),
}

/// A kernel's block-cooperative form: its grid body's units, the shared memory they need
/// (floats) and every variable sunk into a thread index.
#[derive(Debug)]
pub(super) struct BlockPlan<'k> {
    pub units: Vec<Unit<'k>>,
    pub shared: u32,
    pub sunk: Vec<VarId>,
    /// Whether a reduction needs the shared array of one float per thread.
    pub reduces: bool,
}

/// The block-cooperative form of `k` (private arguments sliced, contractions not
/// desugared), or `None` where the block could not share its work (see the module doc).
pub(super) fn plan(k: &Kernel) -> Option<BlockPlan<'_>> {
    if !(k.grid.extent == Extent::Fixed(1) || grid_independent(k)) {
        return None;
    }
    let units = units(k, &k.grid.body)?;
    let mut plan = BlockPlan { units: Vec::new(), shared: 0, sunk: Vec::new(), reduces: false };
    plan.note(&units);
    plan.units = units;
    let (together, alone) = split_work(&plan.units);
    // Some work shared by the block's threads, at least half of it; otherwise one thread per
    // grid iteration runs the same serial work with many more iterations in flight.
    (together > 0.0 && together >= alone).then_some(plan)
}

impl BlockPlan<'_> {
    /// Records what `units` need: shared memory for the tiles, the sunk variables, the
    /// reduction array.
    fn note(&mut self, units: &[Unit<'_>]) {
        for u in units {
            match u {
                Unit::Uniform { body, .. } => self.note(body),
                Unit::Reduce { .. } => self.reduces = true,
                Unit::Contract(_, tile) => self.shared = self.shared.max(2 * tile.stage()),
                Unit::Spread { sunk, .. } => self.sunk.extend(sunk.iter().flat_map(|s| s.vars.iter().copied())),
                Unit::Single(_) => {}
            }
        }
    }
}

/// The work of `units` (in loop iterations, see [`iterations`]) that the block's threads
/// share, and the work thread 0 does alone.
fn split_work(units: &[Unit<'_>]) -> (f64, f64) {
    units.iter().fold((0.0, 0.0), |(together, alone), u| match u {
        Unit::Uniform { head, body } => {
            let times = match head {
                Head::Loop(l) => size(l.extent),
                Head::If(_) => 1.0,
            };
            let (t, a) = split_work(body);
            (together + times * t, alone + times * a)
        }
        Unit::Contract(c, _) => (together + c.extents.iter().map(|e| size(*e)).product::<f64>(), alone),
        Unit::Spread { nest, .. } | Unit::Reduce { nest, .. } => (together + loop_iterations(nest[0]), alone),
        Unit::Single(stmts) => {
            (together, alone + stmts.iter().map(|s| iterations(std::slice::from_ref(*s))).sum::<f64>())
        }
    })
}

/// The statements' innermost iterations (a contraction's multiply-adds, one for any other
/// statement), a batch extent counted as [`ASSUMED_BATCH`].
fn iterations(stmts: &[Stmt]) -> f64 {
    stmts
        .iter()
        .map(|s| match s {
            Stmt::Loop(l) => loop_iterations(l),
            Stmt::If { then, .. } => iterations(then),
            Stmt::Contract(c) => c.extents.iter().map(|e| size(*e)).product(),
            Stmt::Set { .. } | Stmt::Store { .. } => 1.0,
        })
        .sum()
}

fn loop_iterations(l: &Loop) -> f64 {
    size(l.extent) * iterations(&l.body).max(1.0)
}

fn size(e: Extent) -> f64 {
    e.resolve(ASSUMED_BATCH) as f64
}

/// The units of `body`. Consecutive statements that share a register (one sets it, a later
/// one reads it) form one unit: registers are per thread, so they run in the same thread.
fn units<'k>(k: &'k Kernel, body: &'k [Stmt]) -> Option<Vec<Unit<'k>>> {
    let mut out = Vec::new();
    // Groups of statements without contractions since the last contraction.
    let mut run: Vec<Vec<&'k Stmt>> = Vec::new();
    for s in body {
        if holds_contract(std::slice::from_ref(s)) {
            flush(k, &mut run, &mut out);
            out.push(match s {
                Stmt::Contract(c) => tileable(k, c).then(|| Unit::Contract(c, tile_for(c.extents)))?,
                Stmt::Loop(l) => Unit::Uniform { head: Head::Loop(l), body: units(k, &l.body)? },
                Stmt::If { cond, then } if !cond_reads_acc(cond, &|_| true) => {
                    Unit::Uniform { head: Head::If(cond), body: units(k, then)? }
                }
                _ => return None,
            });
            continue;
        }
        // Every register `s` reads is set in it, or in the nearest groups before it.
        let local = |stmts: &[&Stmt]| {
            let mut set = Vec::new();
            stmts.iter().all(|s| accs_set_before_read(std::slice::from_ref(*s), &mut set))
        };
        let from = (0..=run.len()).rev().find(|&g| {
            let joined: Vec<&Stmt> = run[g..].iter().flatten().copied().chain([s]).collect();
            local(&joined)
        })?;
        let mut group: Vec<&'k Stmt> = run.drain(from..).flatten().collect();
        group.push(s);
        run.push(group);
    }
    flush(k, &mut run, &mut out);
    Some(out)
}

/// The units of groups of statements without contractions: a lone loop spread over the
/// threads where its iterations are separate, everything else in thread 0.
fn flush<'k>(k: &'k Kernel, run: &mut Vec<Vec<&'k Stmt>>, out: &mut Vec<Unit<'k>>) {
    for group in run.drain(..) {
        out.push(match group.as_slice() {
            [s @ Stmt::Loop(l)] => spread(k, s, l).unwrap_or(Unit::Single(group)),
            _ => reduction(&group).unwrap_or(Unit::Single(group)),
        });
    }
}

/// A group that sums into a register from zero through a loop nest whose only statement
/// adds to it, then uses the sum (`s = 0; for … { s = s + term }; y[…] = s`).
fn reduction<'k>(group: &[&'k Stmt]) -> Option<Unit<'k>> {
    let [Stmt::Set { acc, value: Expr::Const(zero) }, Stmt::Loop(l), rest @ ..] = group else { return None };
    if zero.to_bits() != 0 {
        return None;
    }
    let mut nest = vec![l];
    loop {
        match nest[nest.len() - 1].body.as_slice() {
            [Stmt::Loop(inner)] => nest.push(inner),
            [Stmt::Set { acc: a, value: Expr::Binary(Binary::Add, sum, term) }]
                if a == acc && **sum == Expr::Acc(*acc) && !reads_acc(term, &|_| true) =>
            {
                return Some(Unit::Reduce { acc: *acc, nest, term, rest: rest.to_vec() });
            }
            _ => return None,
        }
    }
}

/// The loops of `s` (the loop `l`) whose iterations may run on separate threads of the
/// block: `l`, then each loop that is the whole body of the previous one, as long as every
/// stored argument of `s` stays indexed by all their variables ([`independent_over`]) or by
/// one index injective in them ([`injective_over`]), and every register read in a loop's
/// body is set earlier in its iteration (as [`crate::analysis::launch::parallel_nest`]
/// for the grid).
fn spread<'k>(k: &'k Kernel, s: &'k Stmt, l: &'k Loop) -> Option<Unit<'k>> {
    // The perfect nest under `l`, then its longest prefix whose iterations are separate.
    let mut chain = vec![l];
    while let [Stmt::Loop(inner)] = chain[chain.len() - 1].body.as_slice() {
        chain.push(inner);
    }
    let body = std::slice::from_ref(s);
    let separate = |nest: &[&Loop]| {
        let vars: Vec<VarId> = nest.iter().map(|l| l.var).collect();
        (independent_over(k.args.len(), body, &vars) || injective_over(k, body, nest))
            && nest.iter().all(|l| accs_set_before_read(&l.body, &mut Vec::new()))
    };
    let len = (1..=chain.len()).rev().find(|&n| separate(&chain[..n]))?;
    chain.truncate(len);
    let inner = chain[len - 1];
    Some(Unit::Spread { sunk: sunk_loops(k, &inner.body), nest: chain })
}

/// Whether the tiled product computes what `c`'s loop nest does: `A` indexed without `n`,
/// `B` without `m`, `C` without `k`; `C` neither `A` nor `B`; and distinct `(m, n)` storing
/// to distinct elements of `C` (each is one thread's, written once).
fn tileable(k: &Kernel, c: &Contract) -> bool {
    let uses = |op: &Operand, v: VarId| op.index.iter().flat_map(|a| &a.terms).any(|t| t.var == v);
    if uses(&c.a, c.n) || uses(&c.b, c.m) || uses(&c.c, c.k) || c.c.arg == c.a.arg || c.c.arg == c.b.arg {
        return false;
    }
    let (cm, cn) = (flat_coef(k, &c.c, c.m), flat_coef(k, &c.c, c.n));
    let (Some(cm), Some(cn)) = (cm, cn) else { return false };
    // Injective on [0, M) × [0, N) when one variable's step exceeds the other's whole range.
    let covers = |big: i128, small: i128, extent: Extent| match extent {
        Extent::Fixed(e) => big.abs() >= small.abs() * i128::from(e),
        Extent::Batch => false,
    };
    let fixed_one = |e: Extent| e == Extent::Fixed(1) || e == Extent::Fixed(0);
    match (fixed_one(c.extents[0]), fixed_one(c.extents[1])) {
        (true, true) => true,
        (true, false) => cn != 0,
        (false, true) => cm != 0,
        (false, false) => cm != 0 && cn != 0 && (covers(cm, cn, c.extents[1]) || covers(cn, cm, c.extents[0])),
    }
}

/// The step of `op`'s flat (row-major) element index per unit of `v`; `None` if `v` is
/// divided somewhere (not a strided matrix).
fn flat_coef(k: &Kernel, op: &Operand, v: VarId) -> Option<i128> {
    let strides = k.args[op.arg.0 as usize].strides();
    let mut coef = 0i128;
    for (ix, &st) in op.index.iter().zip(&strides) {
        for t in ix.terms.iter().filter(|t| t.var == v) {
            if t.div != 1 {
                return None;
            }
            coef += i128::from(t.coef) * i128::from(st);
        }
    }
    Some(coef)
}

impl Renderer<'_> {
    /// The grid loop of a block-cooperative kernel: blocks take grid iterations in turn.
    pub(super) fn block_body(&self, out: &mut String, plan: &BlockPlan<'_>) {
        let k = self.k;
        let g = self.var(k.grid.var);
        if plan.shared > 0 {
            let _ = writeln!(out, "  __shared__ float pdgc_smem[{}];", plan.shared);
        }
        if plan.reduces {
            let _ = writeln!(out, "  __shared__ float pdgc_red[{BLOCK}];");
        }
        let _ = writeln!(out, "  // One block per grid iteration; its threads run each statement together.");
        let extent = self.extent(k.grid.extent);
        let it = self.it;
        let _ = writeln!(out, "  for ({it} {g} = blockIdx.x; {g} < {extent}; {g} += gridDim.x) {{");
        self.locals(out, 2);
        self.units(out, &plan.units, 2);
        let _ = writeln!(out, "  }}");
    }

    fn units(&self, out: &mut String, units: &[Unit<'_>], depth: usize) {
        let p = pad(depth);
        for u in units {
            match u {
                Unit::Uniform { head: Head::Loop(l), body } => {
                    let v = self.var(l.var);
                    let it = self.it;
                    let _ = writeln!(out, "{p}for ({it} {v} = 0; {v} < {}; ++{v}) {{", self.extent(l.extent));
                    self.units(out, body, depth + 1);
                    let _ = writeln!(out, "{p}}}");
                }
                Unit::Uniform { head: Head::If(cond), body } => {
                    let _ = writeln!(out, "{p}if {} {{", self.cond(cond));
                    self.units(out, body, depth + 1);
                    let _ = writeln!(out, "{p}}}");
                }
                Unit::Contract(c, tile) => {
                    self.tiled(out, c, tile, depth);
                    let _ = writeln!(out, "{p}__syncthreads();");
                }
                Unit::Spread { nest, sunk } => {
                    self.spread(out, nest, sunk.as_ref(), depth);
                    let _ = writeln!(out, "{p}__syncthreads();");
                }
                Unit::Reduce { acc, nest, term, rest } => {
                    self.reduce(out, *acc, nest, term, rest, depth);
                    let _ = writeln!(out, "{p}__syncthreads();");
                }
                Unit::Single(stmts) => {
                    let _ = writeln!(out, "{p}if (threadIdx.x == 0) {{");
                    for s in stmts {
                        self.stmts(out, std::slice::from_ref(*s), depth + 1);
                    }
                    let _ = writeln!(out, "{p}}}");
                    let _ = writeln!(out, "{p}__syncthreads();");
                }
            }
        }
    }

    /// A reduction (see [`Unit::Reduce`]): each thread sums every `BLOCK`-th iteration in
    /// order, the block adds the partial sums as a tree (the sum's association differs from
    /// the loop's; the result agrees to rounding), thread 0 takes the total.
    fn reduce(&self, out: &mut String, acc: AccId, nest: &[&Loop], term: &Expr, rest: &[&Stmt], depth: usize) {
        let p = pad(depth);
        let dims: Vec<(String, Extent)> = nest.iter().map(|l| (self.var(l.var).to_string(), l.extent)).collect();
        let s = &self.accs[acc.0 as usize];
        let _ = writeln!(out, "{p}// The sum into {s}: split over the block's threads, then a tree in shared memory.");
        let _ = writeln!(out, "{p}{{");
        let q = pad(depth + 1);
        let _ = writeln!(out, "{q}float pdgc_part = 0.0f;");
        self.strided(out, &dims, depth + 1);
        let _ = writeln!(out, "{q}  pdgc_part = pdgc_part + {};", self.expr(term));
        let _ = writeln!(out, "{q}}}");
        let _ = writeln!(out, "{q}pdgc_red[threadIdx.x] = pdgc_part;");
        let _ = writeln!(out, "{q}__syncthreads();");
        let _ = writeln!(out, "{q}for (int pdgc_w = {}; pdgc_w > 0; pdgc_w >>= 1) {{", BLOCK / 2);
        let _ =
            writeln!(out, "{q}  if (threadIdx.x < pdgc_w) pdgc_red[threadIdx.x] += pdgc_red[threadIdx.x + pdgc_w];");
        let _ = writeln!(out, "{q}  __syncthreads();");
        let _ = writeln!(out, "{q}}}");
        let _ = writeln!(out, "{q}if (threadIdx.x == 0) {{");
        let _ = writeln!(out, "{q}  {s} = pdgc_red[0];");
        for st in rest {
            self.stmts(out, std::slice::from_ref(*st), depth + 2);
        }
        let _ = writeln!(out, "{q}}}");
        let _ = writeln!(out, "{p}}}");
    }

    /// Opens the loop in which the block's threads stride over the flattened iterations of
    /// `dims` (outermost first) and binds each dim's variable; the caller closes it.
    fn strided(&self, out: &mut String, dims: &[(String, Extent)], depth: usize) {
        let _ = writeln!(
            out,
            "{}for ({} pdgc_i = threadIdx.x; pdgc_i < {}; pdgc_i += blockDim.x) {{",
            pad(depth),
            self.it,
            self.product(dims)
        );
        self.decompose(out, dims, "pdgc_i", depth + 1);
    }

    /// Binds the thread dimensions `dims` (outermost first) from the flat index `from`, the
    /// innermost fastest.
    pub(super) fn decompose(&self, out: &mut String, dims: &[(String, Extent)], from: &str, depth: usize) {
        let (p, it) = (pad(depth), self.it);
        let _ = writeln!(out, "{p}{it} pdgc_rest = {from};");
        for (i, (v, e)) in dims.iter().enumerate().rev() {
            if i == 0 {
                let _ = writeln!(out, "{p}const {it} {v} = pdgc_rest;");
            } else {
                let e = self.extent(*e);
                let _ = writeln!(out, "{p}const {it} {v} = pdgc_rest % {e};");
                let _ = writeln!(out, "{p}pdgc_rest /= {e};");
            }
        }
    }

    /// A spread nest: the block's threads stride over its flattened iterations, the
    /// innermost loop (then the sunk loops) fastest between neighbouring threads.
    fn spread(&self, out: &mut String, nest: &[&Loop], sunk: Option<&Sunk>, depth: usize) {
        let p = pad(depth);
        let mut dims: Vec<(String, Extent)> = nest.iter().map(|l| (self.var(l.var).to_string(), l.extent)).collect();
        if let Some(s) = sunk {
            let vars: Vec<&str> = s.vars.iter().map(|v| self.var(*v)).collect();
            let _ = writeln!(
                out,
                "{p}// Spread over the block's threads; sunk into pdgc_t: the loops over {}.",
                vars.join(", ")
            );
            dims.push(("pdgc_t".to_string(), s.extent));
        } else {
            let _ = writeln!(out, "{p}// Spread over the block's threads.");
        }
        self.strided(out, &dims, depth);
        let inner = nest.last().expect("a spread nest has a loop");
        self.stmts(out, &inner.body, depth + 1);
        let _ = writeln!(out, "{p}}}");
    }

    /// A tiled contraction (see the module doc). Shared memory holds two stages, each `A`'s
    /// tile as `[bk][bm]` then `B`'s as `[bk][bn]`; thread `t` owns rows
    /// `t / (bn/tn) + i·(bm/tm)` and columns `t % (bn/tn) + j·(bn/tn)` of the block tile, so
    /// neighbouring threads read neighbouring shared words and store neighbouring columns.
    fn tiled(&self, out: &mut String, c: &Contract, t: &Tile, depth: usize) {
        let p = pad(depth);
        let (m, n) = (self.var(c.m), self.var(c.n));
        let [em, en, ek] = c.extents.map(|e| self.extent(e));
        let head = self.k.stmt_head(&Stmt::Contract(c.clone()));
        let _ = writeln!(out, "{p}// {head}");
        let _ = writeln!(
            out,
            "{p}// tiled: {}×{} of C per block step, {}×{} per thread, k in steps of {} through two shared stages",
            t.bm, t.bn, t.tm, t.tn, t.bk
        );
        let _ = writeln!(out, "{p}{{");
        let q = pad(depth + 1);
        let _ =
            writeln!(out, "{q}const int pdgc_tr = threadIdx.x / {}, pdgc_tc = threadIdx.x % {};", t.cols(), t.cols());
        let it = self.it;
        let _ = writeln!(out, "{q}const {it} pdgc_ksteps = ({ek} + {}) / {};", t.bk - 1, t.bk);
        let _ = writeln!(out, "{q}for ({it} pdgc_m0 = 0; pdgc_m0 < {em}; pdgc_m0 += {}) {{", t.bm);
        let _ = writeln!(out, "{q}for ({it} pdgc_n0 = 0; pdgc_n0 < {en}; pdgc_n0 += {}) {{", t.bn);
        let r = pad(depth + 2);
        let _ = writeln!(out, "{r}float pdgc_c[{}][{}];", t.tm, t.tn);
        let _ = writeln!(out, "{r}#pragma unroll");
        let _ = writeln!(out, "{r}for (int pdgc_i = 0; pdgc_i < {}; ++pdgc_i)", t.tm);
        let _ = writeln!(out, "{r}  #pragma unroll");
        let _ = writeln!(out, "{r}  for (int pdgc_j = 0; pdgc_j < {}; ++pdgc_j) pdgc_c[pdgc_i][pdgc_j] = 0.0f;", t.tn);
        self.stage_loads(out, c, t, "0", "0", depth + 2);
        let _ = writeln!(out, "{r}__syncthreads();");
        let _ = writeln!(out, "{r}for ({it} pdgc_ks = 0; pdgc_ks < pdgc_ksteps; ++pdgc_ks) {{");
        let s = pad(depth + 3);
        let _ = writeln!(out, "{s}if (pdgc_ks + 1 < pdgc_ksteps) {{");
        self.stage_loads(out, c, t, "(pdgc_ks + 1)", "((pdgc_ks + 1) & 1)", depth + 4);
        let _ = writeln!(out, "{s}}}");
        let _ = writeln!(out, "{s}const float* pdgc_As = pdgc_smem + (pdgc_ks & 1) * {};", t.stage());
        let _ = writeln!(out, "{s}const float* pdgc_Bs = pdgc_As + {};", t.bk * t.bm);
        let _ = writeln!(out, "{s}const {it} pdgc_kleft = {ek} - pdgc_ks * {};", t.bk);
        let _ = writeln!(out, "{s}const int pdgc_kn = pdgc_kleft < {0} ? (int)pdgc_kleft : {0};", t.bk);
        let _ = writeln!(out, "{s}for (int pdgc_kk = 0; pdgc_kk < pdgc_kn; ++pdgc_kk) {{");
        let u = pad(depth + 4);
        let _ = writeln!(out, "{u}float pdgc_a[{}], pdgc_b[{}];", t.tm, t.tn);
        let _ = writeln!(out, "{u}#pragma unroll");
        let _ = writeln!(
            out,
            "{u}for (int pdgc_i = 0; pdgc_i < {}; ++pdgc_i) pdgc_a[pdgc_i] = pdgc_As[pdgc_kk * {} + pdgc_tr + pdgc_i * {}];",
            t.tm,
            t.bm,
            t.bm / t.tm
        );
        let _ = writeln!(out, "{u}#pragma unroll");
        let _ = writeln!(
            out,
            "{u}for (int pdgc_j = 0; pdgc_j < {}; ++pdgc_j) pdgc_b[pdgc_j] = pdgc_Bs[pdgc_kk * {} + pdgc_tc + pdgc_j * {}];",
            t.tn,
            t.bn,
            t.cols()
        );
        let _ = writeln!(out, "{u}#pragma unroll");
        let _ = writeln!(out, "{u}for (int pdgc_i = 0; pdgc_i < {}; ++pdgc_i)", t.tm);
        let _ = writeln!(out, "{u}  #pragma unroll");
        let _ = writeln!(
            out,
            "{u}  for (int pdgc_j = 0; pdgc_j < {}; ++pdgc_j) pdgc_c[pdgc_i][pdgc_j] += pdgc_a[pdgc_i] * pdgc_b[pdgc_j];",
            t.tn
        );
        let _ = writeln!(out, "{s}}}");
        let _ = writeln!(out, "{s}__syncthreads();");
        let _ = writeln!(out, "{r}}}");
        // The register tile into C, each element by the one thread that owns it.
        let op = if c.accumulate { "+=" } else { "=" };
        let _ = writeln!(out, "{r}#pragma unroll");
        let _ = writeln!(out, "{r}for (int pdgc_i = 0; pdgc_i < {}; ++pdgc_i) {{", t.tm);
        let _ = writeln!(out, "{r}  const {it} {m} = pdgc_m0 + pdgc_tr + pdgc_i * {};", t.bm / t.tm);
        let _ = writeln!(out, "{r}  #pragma unroll");
        let _ = writeln!(out, "{r}  for (int pdgc_j = 0; pdgc_j < {}; ++pdgc_j) {{", t.tn);
        let _ = writeln!(out, "{r}    const {it} {n} = pdgc_n0 + pdgc_tc + pdgc_j * {};", t.cols());
        let _ = writeln!(
            out,
            "{r}    if ({m} < {em} && {n} < {en}) {} {op} pdgc_c[pdgc_i][pdgc_j];",
            self.access(c.c.arg, &c.c.index)
        );
        let _ = writeln!(out, "{r}  }}");
        let _ = writeln!(out, "{r}}}");
        let _ = writeln!(out, "{q}}}");
        let _ = writeln!(out, "{q}}}");
        let _ = writeln!(out, "{p}}}");
    }

    /// The block's loads of step `ks` of `k` into stage `stage`: `A`'s `bm × bk` tile and
    /// `B`'s `bk × bn` one, zero outside the operands. Neighbouring threads load along
    /// whichever of the tile's two dims has unit stride in memory (coalesced reads).
    fn stage_loads(&self, out: &mut String, c: &Contract, t: &Tile, ks: &str, stage: &str, depth: usize) {
        let p = pad(depth);
        let (m, n, kv) = (self.var(c.m), self.var(c.n), self.var(c.k));
        let [em, en, ek] = c.extents.map(|e| self.extent(e));
        let _ = writeln!(out, "{p}{{");
        let q = pad(depth + 1);
        let _ = writeln!(out, "{q}float* pdgc_As = pdgc_smem + {stage} * {};", t.stage());
        let _ = writeln!(out, "{q}float* pdgc_Bs = pdgc_As + {};", t.bk * t.bm);
        // Each shared tile is [bk][width]: `A`'s rows (m) or `B`'s columns (n) along the
        // width. Neighbouring threads take neighbouring k where k has unit stride in the
        // operand (and, for `B`, n does not), else neighbouring m or n.
        let unit = |op: &Operand, v: VarId| flat_coef(self.k, op, v).is_some_and(|s| s.abs() == 1);
        let a_k_fast = unit(&c.a, c.k);
        let b_k_fast = unit(&c.b, c.k) && !unit(&c.b, c.n);
        for (op, tile, other, other_extent, other_base, width, k_fast) in
            [(&c.a, "pdgc_As", m, &em, "pdgc_m0", t.bm, a_k_fast), (&c.b, "pdgc_Bs", n, &en, "pdgc_n0", t.bn, b_k_fast)]
        {
            let total = t.bk * width;
            let _ = writeln!(out, "{q}for (int pdgc_l = threadIdx.x; pdgc_l < {total}; pdgc_l += {BLOCK}) {{");
            let (kk, oo) = match k_fast {
                true => (format!("pdgc_l % {}", t.bk), format!("pdgc_l / {}", t.bk)),
                false => (format!("pdgc_l / {width}"), format!("pdgc_l % {width}")),
            };
            let _ = writeln!(out, "{q}  const int pdgc_kk = {kk}, pdgc_o = {oo};");
            let it = self.it;
            let _ = writeln!(out, "{q}  const {it} {kv} = {ks} * {} + pdgc_kk;", t.bk);
            let _ = writeln!(out, "{q}  const {it} {other} = {other_base} + pdgc_o;");
            let _ = writeln!(
                out,
                "{q}  {tile}[pdgc_kk * {width} + pdgc_o] = ({other} < {other_extent} && {kv} < {ek}) ? {} : 0.0f;",
                self.access(op.arg, &op.index)
            );
            let _ = writeln!(out, "{q}}}");
        }
        let _ = writeln!(out, "{p}}}");
    }

    /// The product of thread dimensions' extents, in the index type (with 64-bit indices a
    /// fixed first factor gets `LL`, so two `int` literals never multiply in 32 bits).
    pub(super) fn product(&self, dims: &[(String, Extent)]) -> String {
        let total: Vec<String> = dims
            .iter()
            .enumerate()
            .map(|(i, d)| match d.1 {
                Extent::Fixed(n) if i == 0 => format!("{n}{}", self.ll),
                e => self.extent(e),
            })
            .collect();
        total.join(" * ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tile_has_one_thread_per_register_tile() {
        for &(bm, bn, tm, tn) in &TILES {
            assert_eq!((bm / tm) * (bn / tn), BLOCK, "{bm}×{bn} by {tm}×{tn}");
            assert_eq!((bm % tm, bn % tn), (0, 0));
            // Two stages fit the 48 KiB of static shared memory.
            assert!(2 * TILE_K * (bm + bn) * 4 <= 48 * 1024);
        }
    }

    #[test]
    fn tiles_follow_the_shape() {
        let t = |m, n| {
            let t = tile_for([Extent::Fixed(m), Extent::Fixed(n), Extent::Fixed(64)]);
            (t.bm, t.bn, t.tm, t.tn)
        };
        assert_eq!(t(1024, 1024), (128, 64, 8, 8), "large: the biggest register tile");
        assert_eq!(t(32, 25), (32, 32, 4, 2), "a small conv's product: no mostly-empty tile");
        assert_eq!(t(10, 512), (16, 64, 2, 4), "few rows, many columns");
        let b = tile_for([Extent::Batch, Extent::Fixed(32), Extent::Fixed(512)]);
        assert_eq!((b.bm, b.bn), (64, 32), "the batch as rows, tiled for {ASSUMED_BATCH}");
    }
}
