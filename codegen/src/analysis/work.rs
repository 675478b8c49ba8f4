//! What a kernel costs to run, read off its IR: the floating-point operations of its loop
//! nests and of its contractions, and the bytes of its arguments. The planner's cost model
//! times these with a device profile, so its estimates follow the kernels that actually run.
//!
//! Counting rules, for a launch on `batch` examples:
//! - every statement runs once per iteration of each enclosing loop (a loop over the batch
//!   runs `batch` times); an `If`'s body is counted as if its condition held (guards of
//!   padded windows are true almost everywhere), except a residue test
//!   `lo <= v - c·⌊v/c⌋ + e < hi` (the examples a batch-summed product deals to one of its
//!   partial sums), whose body runs in `(hi - lo)/c` of the iterations of `v`'s loop;
//! - a `Set` or `Store` costs the float operations of its value (one per unary, binary or
//!   select node; `exp`, `log`, `tanh` and `erf` count [`TRANSCENDENTAL`]), plus one for an
//!   accumulating store;
//! - a [`Contract`] costs `2·M·N·K` and is reported with its shape, since tuned GEMMs reach
//!   an efficiency that depends on it;
//! - loop-nest operations are split by the innermost loop they run in: one that reads an
//!   argument with a stride other than one element per step of its variable (ghost's Gram
//!   products read columns T apart) is *strided*, any other is *unit-stride*;
//! - bytes are each argument read once and written once (`inout` both): the traffic of a
//!   kernel whose working set streams through the caches once.

use crate::ir::{Arg, Cond, Contract, Expr, Kernel, Loop, Mode, Stmt, Unary};
use crate::visit::{walk_stmt, Visitor};

/// Float operations one `exp`, `log`, `tanh` or `erf` counts for (their polynomial
/// approximations take about this many multiply-adds).
pub const TRANSCENDENTAL: u64 = 10;

/// One contraction's shape and how many times the kernel runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub count: u64,
}

impl Gemm {
    /// `2·M·N·K` per run, times the runs.
    pub fn flops(&self) -> u64 {
        2u64.saturating_mul(self.m).saturating_mul(self.n).saturating_mul(self.k).saturating_mul(self.count)
    }
}

/// The work of one kernel launch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Work {
    /// Loop-nest float operations in unit-stride innermost loops.
    pub unit_flops: u64,
    /// Loop-nest float operations in innermost loops that read with a stride.
    pub strided_flops: u64,
    pub gemms: Vec<Gemm>,
    /// Bytes of the arguments read and written.
    pub bytes: u64,
}

impl Work {
    pub fn flops(&self) -> u64 {
        self.unit_flops + self.strided_flops + self.gemms.iter().map(Gemm::flops).sum::<u64>()
    }
}

/// The work of one launch of `k` on `batch` examples.
pub fn work(k: &Kernel, batch: u64) -> Work {
    let mut c = Count { k, batch, mult: vec![1], loops: Vec::new(), work: Work::default() };
    c.enter_loop(&k.grid);
    for s in &k.grid.body {
        c.stmt(s);
    }
    c.exit_loop(&k.grid);
    c.work.bytes = k.args.iter().map(|a| arg_bytes(a, batch)).sum();
    c.work
}

/// The share `(num, den)` of its enclosing iterations in which an `If`'s condition holds:
/// `(hi - lo)/c` for a residue test `lo <= v - c·⌊v/c⌋ + e < hi` (`v mod c` in a window of
/// `hi - lo` values, whatever `e` adds), `1` for any other condition.
fn share(cond: &Cond) -> (u64, u64) {
    let Cond::InRange { index, lo, hi } = cond else { return (1, 1) };
    let residue = index.terms.iter().find_map(|t| {
        let whole = index.terms.iter().any(|u| u.var == t.var && u.coef == 1 && u.div == 1);
        (t.div > 1 && t.coef == -t.div && whole).then_some(t.div as u64)
    });
    match residue {
        Some(c) => ((hi - lo).clamp(0, c as i64) as u64, c),
        None => (1, 1),
    }
}

fn arg_bytes(a: &Arg, batch: u64) -> u64 {
    let elems: u64 = a.dims.iter().map(|d| d.resolve(batch)).product();
    // Private memory is reused by every iteration of a worker and stays in its cache.
    let passes = match a.mode {
        Mode::InOut => 2,
        Mode::Private => 0,
        Mode::In | Mode::Out => 1,
    };
    elems.saturating_mul(4 * passes)
}

struct Count<'k> {
    k: &'k Kernel,
    batch: u64,
    /// The product of the enclosing loops' trip counts, one entry per open loop.
    mult: Vec<u64>,
    loops: Vec<&'k Loop>,
    work: Work,
}

impl Count<'_> {
    fn times(&self) -> u64 {
        *self.mult.last().expect("inside the grid")
    }

    /// Whether the innermost open loop reads some argument with a stride other than one
    /// element per step of its variable.
    fn strided(&self, body: &[Stmt]) -> bool {
        let Some(l) = self.loops.last() else { return false };
        struct Reads<'a> {
            k: &'a Kernel,
            var: crate::ir::VarId,
            strided: bool,
        }
        impl<'k> Visitor<'k> for Reads<'_> {
            fn access(&mut self, arg: crate::ir::ArgId, index: &'k [crate::ir::Affine], store: bool) {
                if store {
                    return;
                }
                let strides = self.k.args[arg.0 as usize].strides();
                let step: i64 = index
                    .iter()
                    .zip(&strides)
                    .flat_map(|(a, s)| {
                        a.terms.iter().filter(|t| t.var == self.var).map(move |t| {
                            if t.div == 1 {
                                t.coef * *s as i64
                            } else {
                                i64::MAX
                            }
                        })
                    })
                    .fold(0i64, |acc, x| acc.saturating_add(x));
                if step != 0 && step != 1 {
                    self.strided = true;
                }
            }
        }
        let mut r = Reads { k: self.k, var: l.var, strided: false };
        for s in body {
            r.stmt(s);
        }
        r.strided
    }

    fn count_ops(&mut self, ops: u64) {
        let n = ops.saturating_mul(self.times());
        let body = self.loops.last().map_or(&[][..], |l| &l.body[..]);
        if self.loops.len() > 1 && self.strided(body) {
            self.work.strided_flops = self.work.strided_flops.saturating_add(n);
        } else {
            self.work.unit_flops = self.work.unit_flops.saturating_add(n);
        }
    }

    fn contract(&mut self, c: &Contract) {
        let [m, n, k] = c.extents.map(|e| e.resolve(self.batch));
        self.work.gemms.push(Gemm { m, n, k, count: self.times() });
    }
}

impl<'k> Visitor<'k> for Count<'k> {
    fn stmt(&mut self, s: &'k Stmt) {
        match s {
            Stmt::Set { value, .. } => self.count_ops(ops(value)),
            Stmt::Store { value, accumulate, .. } => self.count_ops(ops(value) + u64::from(*accumulate)),
            Stmt::Contract(c) => self.contract(c),
            Stmt::Loop(_) => walk_stmt(self, s),
            Stmt::If { cond, then } => {
                let (num, den) = share(cond);
                self.mult.push(self.times().saturating_mul(num) / den);
                for s in then {
                    self.stmt(s);
                }
                self.mult.pop();
            }
        }
    }

    fn enter_loop(&mut self, l: &'k Loop) {
        let times = self.times().saturating_mul(l.extent.resolve(self.batch));
        self.mult.push(times);
        self.loops.push(l);
    }

    fn exit_loop(&mut self, _l: &'k Loop) {
        self.mult.pop();
        self.loops.pop();
    }
}

/// The float operations of one evaluation of `e`.
fn ops(e: &Expr) -> u64 {
    match e {
        Expr::Const(_) | Expr::Load { .. } | Expr::Acc(_) | Expr::Index(_) => 0,
        Expr::Unary(op, a) => {
            let own = match op {
                Unary::Exp | Unary::Log | Unary::Tanh | Unary::Erf => TRANSCENDENTAL,
                Unary::Neg | Unary::Sqrt | Unary::Abs => 1,
            };
            own + ops(a)
        }
        Expr::Binary(_, a, b) => 1 + ops(a) + ops(b),
        Expr::Select { then, otherwise, .. } => 1 + ops(then) + ops(otherwise),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{AccId, Affine, ArgId, Dim, Extent, LoopKind, Operand, VarId};

    fn arg(name: &str, dims: Vec<Dim>, mode: Mode) -> Arg {
        Arg { name: name.into(), dims, mode }
    }

    fn lp(var: u32, extent: Extent, body: Vec<Stmt>) -> Stmt {
        Stmt::Loop(Loop { var: VarId(var), extent, kind: LoopKind::Serial, body })
    }

    fn v(i: u32) -> Affine {
        Affine::var(VarId(i))
    }

    /// `y[n, i] = sum_j x[n, j, i]` with the sum over a strided read, and
    /// `z[n, i] = exp(y[n, i]) * 2` with unit-stride reads.
    fn kernel() -> Kernel {
        let x = ArgId(0);
        let y = ArgId(1);
        let z = ArgId(2);
        let acc = AccId(0);
        let sum = lp(
            2,
            Extent::Fixed(5),
            vec![Stmt::Set { acc, value: Expr::add(Expr::Acc(acc), Expr::load(x, vec![v(0), v(2), v(1)])) }],
        );
        let body = vec![
            lp(
                1,
                Extent::Fixed(3),
                vec![
                    Stmt::Set { acc, value: Expr::Const(0.0) },
                    sum,
                    Stmt::Store { arg: y, index: vec![v(0), v(1)], value: Expr::Acc(acc), accumulate: false },
                ],
            ),
            lp(
                1,
                Extent::Fixed(3),
                vec![Stmt::Store {
                    arg: z,
                    index: vec![v(0), v(1)],
                    value: Expr::mul(Expr::un(Unary::Exp, Expr::load(y, vec![v(0), v(1)])), Expr::Const(2.0)),
                    accumulate: true,
                }],
            ),
        ];
        Kernel {
            name: "k".into(),
            args: vec![
                arg("x", vec![Dim::Batch, Dim::Fixed(5), Dim::Fixed(3)], Mode::In),
                arg("y", vec![Dim::Batch, Dim::Fixed(3)], Mode::Out),
                arg("z", vec![Dim::Batch, Dim::Fixed(3)], Mode::InOut),
            ],
            vars: vec!["n".into(), "i".into(), "j".into()],
            accs: vec!["acc".into()],
            grid: Loop { var: VarId(0), extent: Extent::Batch, kind: LoopKind::Serial, body },
        }
    }

    #[test]
    fn loop_nests_count_their_operations_per_iteration_and_split_by_stride() {
        let w = work(&kernel(), 4);
        // The strided sum: 4 examples x 3 x 5 adds.
        assert_eq!(w.strided_flops, 4 * 3 * 5);
        // exp (10) + mul (1) + the accumulating store (1), 4 x 3 times.
        assert_eq!(w.unit_flops, 4 * 3 * (TRANSCENDENTAL + 2));
        // x read once, y written once, z read and written: (60 + 12 + 2·12) floats.
        assert_eq!(w.bytes, 4 * (60 + 12 + 24));
        assert!(w.gemms.is_empty());
    }

    #[test]
    fn contractions_report_their_shape_and_runs() {
        let mut k = kernel();
        let c = Contract {
            m: VarId(1),
            n: VarId(2),
            k: VarId(3),
            extents: [Extent::Fixed(3), Extent::Fixed(5), Extent::Batch],
            a: Operand { arg: ArgId(0), index: vec![v(3), v(2), v(1)] },
            b: Operand { arg: ArgId(0), index: vec![v(3), v(2), v(1)] },
            c: Operand { arg: ArgId(1), index: vec![v(0), v(1)] },
            accumulate: false,
        };
        k.vars.push("k".into());
        k.grid.body = vec![lp(4, Extent::Fixed(2), vec![Stmt::Contract(c)])];
        k.vars.push("g".into());
        let w = work(&k, 7);
        assert_eq!(w.gemms, vec![Gemm { m: 3, n: 5, k: 7, count: 7 * 2 }]);
        assert_eq!(w.flops(), 2 * 3 * 5 * 7 * 14);
        assert_eq!(w.unit_flops + w.strided_flops, 0);
        // Dealt to partial sums: `if g mod 2 == 0` keeps half of the loop's two runs; a
        // guard of any other form counts as always true.
        let Stmt::Loop(l) = &mut k.grid.body[0] else { unreachable!() };
        let contraction = l.body.pop().expect("the contraction");
        let residue = Affine::var(VarId(4)).plus_div(VarId(4), -2, 2);
        l.body = vec![Stmt::If { cond: Cond::InRange { index: residue, lo: 0, hi: 1 }, then: vec![contraction] }];
        assert_eq!(work(&k, 7).gemms, vec![Gemm { m: 3, n: 5, k: 7, count: 7 }]);
        let Stmt::Loop(l) = &mut k.grid.body[0] else { unreachable!() };
        let Stmt::If { cond: Cond::InRange { index, .. }, .. } = &mut l.body[0] else { unreachable!() };
        *index = Affine::var(VarId(4));
        assert_eq!(work(&k, 7).gemms, vec![Gemm { m: 3, n: 5, k: 7, count: 7 * 2 }]);
    }
}
