//! The F32X4 code for `LoopKind::Vector` loops that `analysis::vector` found can run on
//! lanes (its module doc says which).
//!
//! Code: the body runs on four lanes at a time, unrolled up to four times (independent
//! vector accumulators per reduction hide the add latency; at most 8 in all), then the
//! leftover whole chunks run straight-line, then the remaining `n % 4` iterations run
//! as the scalar loop. Reductions fold lanes pairwise
//! and add the result to the accumulator's value from before the loop. With FMA,
//! `acc + a*b` and `arg[..] += a*b` become one `fma`. Anything else runs as scalar code.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32X4, I32, I32X4, I64, I8, I8X16};
use cranelift_codegen::ir::{ConstantData, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::Variable;

use super::translate::{float_cc, internal, Translator};
use super::vmath::{self, lane_order};
use super::CpuError;
use crate::analysis::vector::{Item, Plan, Reduction, Step, LANES};
use crate::ir::{Binary, Cond, Expr, Loop, Unary};

/// A value in vector code: one scalar for all lanes, or four lanes.
#[derive(Clone, Copy)]
enum Lanes {
    Scalar(Value),
    Vector(Value),
}

/// A condition in vector code: one `i8` truth value, or an `I32X4` lane mask.
#[derive(Clone, Copy)]
enum LaneCond {
    Scalar(Value),
    Mask(Value),
}

impl Translator<'_, '_> {
    pub(super) fn vector_loop(&mut self, l: &Loop, plan: &Plan) -> Result<(), CpuError> {
        let n = plan.n as i64;
        let chunks = n / LANES as i64;
        let step = (LANES * plan.unroll) as i64;
        let unrolled = n / step;

        // The loop runs at least once and has no `If`, so every loop-invariant piece would
        // be evaluated in its first iteration anyway: computing it up front reads nothing
        // the scalar loop would not.
        for item in &plan.items {
            self.hoist(plan, item.value())?;
        }

        let mut vaccs: Vec<Vec<Variable>> = Vec::new();
        for item in &plan.items {
            if let Item::Reduce { op, .. } = item {
                let identity = match op {
                    Reduction::Add | Reduction::Sub => 0.0f32,
                    Reduction::Max => f32::NEG_INFINITY,
                    Reduction::Min => f32::INFINITY,
                };
                let s = self.b.ins().f32const(identity);
                let v = self.b.ins().splat(F32X4, s);
                let vars: Vec<Variable> = (0..plan.unroll).map(|_| self.b.declare_var(F32X4)).collect();
                for &var in &vars {
                    self.b.def_var(var, v);
                }
                vaccs.push(vars);
            }
        }

        let var = self.var(plan.var)?;
        if unrolled > 0 {
            let counter = self.b.declare_var(I64);
            let zero = self.b.ins().iconst(I64, 0);
            self.b.def_var(counter, zero);
            let end = self.b.ins().iconst(I64, unrolled * step);
            let body = self.b.create_block();
            let exit = self.b.create_block();
            self.b.ins().jump(body, &[]);
            self.b.switch_to_block(body);
            for u in 0..plan.unroll as usize {
                let base = self.b.use_var(counter);
                let at = self.b.ins().iadd_imm_s(base, (u as u32 * LANES) as i64);
                self.b.def_var(var, at);
                self.chunk(plan, &vaccs, u)?;
            }
            let base = self.b.use_var(counter);
            let next = self.b.ins().iadd_imm_s(base, step);
            self.b.def_var(counter, next);
            let more = self.b.ins().icmp(IntCC::UnsignedLessThan, next, end);
            self.b.ins().brif(more, body, &[], exit, &[]);
            self.b.seal_block(body);
            self.b.seal_block(exit);
            self.b.switch_to_block(exit);
        }
        for (u, c) in (unrolled * plan.unroll as i64..chunks).enumerate() {
            let at = self.b.ins().iconst(I64, c * LANES as i64);
            self.b.def_var(var, at);
            self.chunk(plan, &vaccs, u)?;
        }

        let reductions = plan.items.iter().filter_map(|item| match item {
            Item::Reduce { acc, op, .. } => Some((*acc, *op)),
            Item::Store { .. } => None,
        });
        for ((acc, op), vars) in reductions.zip(&vaccs) {
            let mut v = self.b.use_var(vars[0]);
            for var in &vars[1..] {
                let w = self.b.use_var(*var);
                v = self.fold(op, v, w);
            }
            let lanes: Vec<Value> = (0..LANES as u8).map(|i| self.b.ins().extractlane(v, i)).collect();
            let low = self.fold(op, lanes[0], lanes[1]);
            let high = self.fold(op, lanes[2], lanes[3]);
            let h = self.fold(op, low, high);
            let a = self.acc(acc)?;
            let before = self.b.use_var(a);
            let after = match op {
                Reduction::Add => self.b.ins().fadd(before, h),
                Reduction::Sub => self.b.ins().fsub(before, h),
                Reduction::Max => self.b.ins().fmax(before, h),
                Reduction::Min => self.b.ins().fmin(before, h),
            };
            self.b.def_var(a, after);
        }

        let done = chunks * LANES as i64;
        if done < n {
            let start = self.b.ins().iconst(I64, done);
            let end = self.b.ins().iconst(I64, n);
            self.scalar_loop(l.var, start, end, true, &l.body, false)?;
        }
        self.hoisted.clear();
        Ok(())
    }

    /// Combines two partial results of a reduction (lanes or vectors alike).
    fn fold(&mut self, op: Reduction, a: Value, b: Value) -> Value {
        match op {
            Reduction::Add | Reduction::Sub => self.b.ins().fadd(a, b),
            Reduction::Max => self.b.ins().fmax(a, b),
            Reduction::Min => self.b.ins().fmin(a, b),
        }
    }

    /// Computes the maximal loop-invariant subexpressions of `e` (but constants) now.
    fn hoist(&mut self, plan: &Plan, e: &Expr) -> Result<(), CpuError> {
        if !plan.depends(e) {
            if !matches!(e, Expr::Const(_)) {
                let v = self.expr(e)?;
                self.hoisted.insert(e as *const Expr, v);
            }
            return Ok(());
        }
        match e {
            Expr::Unary(_, x) => self.hoist(plan, x),
            Expr::Binary(_, a, b) => {
                self.hoist(plan, a)?;
                self.hoist(plan, b)
            }
            Expr::Select { cond, then, otherwise } => {
                self.hoist_cond(plan, cond)?;
                self.hoist(plan, then)?;
                self.hoist(plan, otherwise)
            }
            Expr::Const(_) | Expr::Load { .. } | Expr::Acc(_) | Expr::Index(_) => Ok(()),
        }
    }

    fn hoist_cond(&mut self, plan: &Plan, c: &Cond) -> Result<(), CpuError> {
        match c {
            Cond::InRange { .. } => Ok(()),
            Cond::Cmp { a, b, .. } => {
                self.hoist(plan, a)?;
                self.hoist(plan, b)
            }
            Cond::And(cs) => {
                for c in cs {
                    self.hoist_cond(plan, c)?;
                }
                Ok(())
            }
        }
    }

    /// One step of four lanes, starting at the loop variable's current value; `u`
    /// picks the vector accumulators.
    fn chunk(&mut self, plan: &Plan, vaccs: &[Vec<Variable>], u: usize) -> Result<(), CpuError> {
        let mut reduction = 0;
        for item in &plan.items {
            match item {
                Item::Reduce { op, value, .. } => {
                    let vacc =
                        vaccs.get(reduction).map(|v| v[u]).ok_or_else(|| internal(self.k, "vector accumulator"))?;
                    reduction += 1;
                    let cur = self.b.use_var(vacc);
                    let next = match (op, self.fusable(value)) {
                        (Reduction::Add | Reduction::Sub, Some((a, b))) => {
                            let x = self.lanes(plan, a)?;
                            let y = self.lanes(plan, b)?;
                            let (x, y) = (self.vector(x), self.vector(y));
                            self.b.ins().fma(x, y, cur)
                        }
                        _ => {
                            let e = self.lanes(plan, value)?;
                            let e = self.vector(e);
                            self.fold(*op, cur, e)
                        }
                    };
                    self.b.def_var(vacc, next);
                }
                Item::Store { arg, index, value, accumulate } => {
                    let fused = if *accumulate { self.fusable(value) } else { None };
                    let new = match fused {
                        Some((a, b)) => {
                            let x = self.lanes(plan, a)?;
                            let y = self.lanes(plan, b)?;
                            let (x, y) = (self.vector(x), self.vector(y));
                            let addr = self.address(*arg, index)?;
                            let old = self.b.ins().load(F32X4, vector_flags(), addr, 0);
                            self.b.ins().fma(x, y, old)
                        }
                        None => {
                            let e = self.lanes(plan, value)?;
                            let mut v = self.vector(e);
                            if *accumulate {
                                let addr = self.address(*arg, index)?;
                                let old = self.b.ins().load(F32X4, vector_flags(), addr, 0);
                                v = self.b.ins().fadd(old, v);
                            }
                            v
                        }
                    };
                    let addr = self.address(*arg, index)?;
                    self.b.ins().store(vector_flags(), new, addr, 0);
                }
            }
        }
        Ok(())
    }

    /// The factors of a product to fuse into an `fma`: only with FMA, and only for a
    /// product that varies along the loop.
    fn fusable<'e>(&self, e: &'e Expr) -> Option<(&'e Expr, &'e Expr)> {
        match e {
            Expr::Binary(Binary::Mul, a, b) if self.cfg.fma && !self.hoisted.contains_key(&(e as *const Expr)) => {
                Some((a, b))
            }
            _ => None,
        }
    }

    fn vector(&mut self, x: Lanes) -> Value {
        match x {
            Lanes::Vector(v) => v,
            Lanes::Scalar(s) => self.b.ins().splat(F32X4, s),
        }
    }

    /// An expression of a vectorizable loop body (see [`plan`]) on four lanes.
    fn lanes(&mut self, plan: &Plan, e: &Expr) -> Result<Lanes, CpuError> {
        if let Some(v) = self.hoisted.get(&(e as *const Expr)) {
            return Ok(Lanes::Scalar(*v));
        }
        Ok(match e {
            Expr::Load { arg, index } => {
                let addr = self.address(*arg, index)?;
                match plan.step(*arg, index) {
                    Step::Pair => Lanes::Vector(self.even_lanes(addr)),
                    _ => Lanes::Vector(self.b.ins().load(F32X4, vector_flags(), addr, 0)),
                }
            }
            Expr::Const(_) | Expr::Acc(_) | Expr::Index(_) => Lanes::Scalar(self.expr(e)?),
            Expr::Unary(op, x) => match self.lanes(plan, x)? {
                Lanes::Scalar(s) => Lanes::Scalar(self.unary(*op, s)?),
                Lanes::Vector(v) => match op {
                    Unary::Neg | Unary::Abs | Unary::Sqrt => Lanes::Vector(self.unary(*op, v)?),
                    Unary::Exp | Unary::Log | Unary::Tanh | Unary::Erf => Lanes::Vector(
                        vmath::unary(&mut self.b, *op, v).ok_or_else(|| internal(self.k, "a function on lanes"))?,
                    ),
                },
            },
            Expr::Binary(op, a, b) => match (self.lanes(plan, a)?, self.lanes(plan, b)?) {
                (Lanes::Scalar(x), Lanes::Scalar(y)) => Lanes::Scalar(self.binary(*op, x, y)),
                (x, y) => {
                    let (x, y) = (self.vector(x), self.vector(y));
                    Lanes::Vector(self.binary(*op, x, y))
                }
            },
            Expr::Select { cond, then, otherwise } => {
                let c = self.lane_cond(plan, cond)?;
                let t = self.lanes(plan, then)?;
                let o = self.lanes(plan, otherwise)?;
                match (c, t, o) {
                    (LaneCond::Scalar(c), Lanes::Scalar(t), Lanes::Scalar(o)) => {
                        Lanes::Scalar(self.b.ins().select(c, t, o))
                    }
                    (LaneCond::Scalar(c), t, o) => {
                        let (t, o) = (self.vector(t), self.vector(o));
                        Lanes::Vector(self.b.ins().select(c, t, o))
                    }
                    (LaneCond::Mask(m), t, o) => {
                        let (t, o) = (self.vector(t), self.vector(o));
                        let m = self.b.ins().bitcast(F32X4, lane_order(), m);
                        Lanes::Vector(self.b.ins().bitselect(m, t, o))
                    }
                }
            }
        })
    }

    /// Elements 0, 2, 4 and 6 from `addr` (a stride-2 load): elements 0–3 and 3–6 loaded,
    /// lanes 0 and 2 of the first and 1 and 3 of the second shuffled together. Nothing
    /// past element 6, the last the lanes need, is read.
    fn even_lanes(&mut self, addr: Value) -> Value {
        let low = self.b.ins().load(F32X4, vector_flags(), addr, 0);
        let high = self.b.ins().load(F32X4, vector_flags(), addr, 12);
        let low = self.b.ins().bitcast(I8X16, lane_order(), low);
        let high = self.b.ins().bitcast(I8X16, lane_order(), high);
        // Bytes 0–15 name the first vector's, 16–31 the second's.
        let bytes: Vec<u8> = [0u8, 8, 20, 28].iter().flat_map(|&b| b..b + 4).collect();
        let mask = self.b.func.dfg.immediates.push(ConstantData::from(bytes));
        let even = self.b.ins().shuffle(low, high, mask);
        self.b.ins().bitcast(F32X4, lane_order(), even)
    }

    fn lane_cond(&mut self, plan: &Plan, c: &Cond) -> Result<LaneCond, CpuError> {
        Ok(match c {
            Cond::InRange { .. } => LaneCond::Scalar(self.cond(c)?),
            Cond::Cmp { op, a, b } => match (self.lanes(plan, a)?, self.lanes(plan, b)?) {
                (Lanes::Scalar(x), Lanes::Scalar(y)) => LaneCond::Scalar(self.b.ins().fcmp(float_cc(*op), x, y)),
                (x, y) => {
                    let (x, y) = (self.vector(x), self.vector(y));
                    LaneCond::Mask(self.b.ins().fcmp(float_cc(*op), x, y))
                }
            },
            Cond::And(cs) => {
                let mut all = LaneCond::Scalar(self.b.ins().iconst(I8, 1));
                for c in cs {
                    let next = self.lane_cond(plan, c)?;
                    all = match (all, next) {
                        (LaneCond::Scalar(a), LaneCond::Scalar(b)) => LaneCond::Scalar(self.b.ins().band(a, b)),
                        (LaneCond::Mask(a), LaneCond::Mask(b)) => LaneCond::Mask(self.b.ins().band(a, b)),
                        (LaneCond::Scalar(s), LaneCond::Mask(m)) | (LaneCond::Mask(m), LaneCond::Scalar(s)) => {
                            let wide = self.b.ins().bmask(I32, s);
                            let s = self.b.ins().splat(I32X4, wide);
                            LaneCond::Mask(self.b.ins().band(s, m))
                        }
                    };
                }
                all
            }
        })
    }
}

/// Vector loads and stores: in bounds (verified), but only 4-byte aligned.
fn vector_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}
