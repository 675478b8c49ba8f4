//! One kernel to one Cranelift function: the scalar path, which is also the reference the
//! vector path falls back to.
//!
//! Shape of the generated code: the entry block loads the buffer pointers; every loop is
//! a rotated loop (a guard where the trip count may be zero, then a body block that ends
//! in the back edge), with its variable a Cranelift `Variable` (i64) and accumulators
//! `Variable`s (f32). An address is `base + Σ (4·stride·coef)·⌊var/div⌋ + 4·Σ
//! stride·offset` in wrapping i64 arithmetic, exact for every access the verifier proved
//! in bounds.
//! Loads and stores are `notrap` (the verifier proved them in bounds) but never
//! `readonly`, so Cranelift cannot hoist one out of the `If` that guards it.

use std::collections::HashMap;

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I64, I8};
use cranelift_codegen::ir::{
    AbiParam, ExtFuncData, ExternalName, FuncRef, Function, InstBuilder, MemFlagsData, Signature, UserExternalName,
    UserFuncName, Value,
};
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_module::FuncId;

use super::{gemm_signature, math_signature, math_slot, vmap_signature, CpuError};
use crate::analysis::vector;
use crate::ir::{
    AccId, Affine, ArgId, Binary, CmpOp, Cond, Contract, Expr, Extent, Kernel, Loop, LoopKind, Operand, Stmt, Unary,
    VarId,
};

/// A vector loop [`Translator::native_map`] runs as one `pdgc_vmap` call: the function's
/// slot (its code for the call) and the argument and index of the load and the store.
struct NativeMap<'s> {
    slot: usize,
    x: (ArgId, &'s [Affine]),
    y: (ArgId, &'s [Affine]),
}

/// What translation needs from the backend.
pub(super) struct Config {
    pub call_conv: CallConv,
    pub frontend: TargetFrontendConfig,
    /// Fuse multiply-adds in vector code.
    pub fma: bool,
    pub vectorize: bool,
    /// `pdgc_expf`, `pdgc_logf`, `pdgc_tanhf`, `pdgc_erff`, declared in the JIT module.
    pub math: [FuncId; 4],
    /// `pdgc_sgemm`, the contraction kernel (`gemm.rs`).
    pub gemm: FuncId,
    /// `pdgc_vmap`, a transcendental over a contiguous run (`vmap.rs`).
    pub vmap: FuncId,
}

/// The Cranelift function of a verified kernel, named after it.
pub(super) fn function(k: &Kernel, cfg: &Config, fctx: &mut FunctionBuilderContext) -> Result<Function, CpuError> {
    let mut sig = Signature::new(cfg.call_conv);
    // bufs, batch, lo, hi
    sig.params.extend([AbiParam::new(I64); 4]);
    let mut func = Function::with_name_signature(UserFuncName::testcase(k.name.as_str()), sig);
    let mut b = FunctionBuilder::new(&mut func, fctx);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    b.seal_block(entry);
    let &[bufs_ptr, batch, lo, hi] = b.block_params(entry) else {
        return Err(internal(k, "the entry block lacks the four parameters"));
    };
    let mut bufs = Vec::with_capacity(k.args.len());
    for i in 0..k.args.len() {
        let offset = i32::try_from(8 * i).map_err(|_| internal(k, "too many arguments"))?;
        bufs.push(b.ins().load(I64, MemFlagsData::trusted(), bufs_ptr, offset));
    }
    let vars = k.vars.iter().map(|_| b.declare_var(I64)).collect();
    let accs = k.accs.iter().map(|_| b.declare_var(F32)).collect();
    let mut t = Translator {
        k,
        cfg,
        b,
        bufs,
        strides: k.args.iter().map(|a| a.strides()).collect(),
        batch,
        vars,
        accs,
        math_refs: [None; 4],
        gemm_ref: None,
        vmap_ref: None,
        hoisted: HashMap::new(),
    };
    t.scalar_loop(k.grid.var, lo, hi, false, &k.grid.body, true)?;
    t.b.ins().return_(&[]);
    t.b.seal_all_blocks();
    let Translator { b, .. } = t;
    b.finalize(cfg.frontend);
    Ok(func)
}

pub(super) fn internal(k: &Kernel, message: &str) -> CpuError {
    CpuError::Codegen { kernel: k.name.clone(), message: message.to_string() }
}

pub(super) struct Translator<'k, 'f> {
    pub k: &'k Kernel,
    pub cfg: &'k Config,
    pub b: FunctionBuilder<'f>,
    /// Base address of each argument's buffer.
    bufs: Vec<Value>,
    pub strides: Vec<Vec<u64>>,
    pub batch: Value,
    vars: Vec<Variable>,
    accs: Vec<Variable>,
    math_refs: [Option<FuncRef>; 4],
    gemm_ref: Option<FuncRef>,
    vmap_ref: Option<FuncRef>,
    /// Scalar values of the loop-invariant subexpressions of the vector loop being
    /// emitted, computed once in front of it, by the address of the expression.
    pub hoisted: HashMap<*const Expr, Value>,
}

impl Translator<'_, '_> {
    pub fn var(&self, v: VarId) -> Result<Variable, CpuError> {
        self.vars.get(v.0 as usize).copied().ok_or_else(|| internal(self.k, "variable out of range"))
    }

    pub fn acc(&self, a: AccId) -> Result<Variable, CpuError> {
        self.accs.get(a.0 as usize).copied().ok_or_else(|| internal(self.k, "accumulator out of range"))
    }

    /// `for var in start..end { body }`; `nonempty` when `start < end` is known. The grid
    /// loop also zeroes every accumulator at the top of each iteration.
    pub fn scalar_loop(
        &mut self,
        var: VarId,
        start: Value,
        end: Value,
        nonempty: bool,
        body: &[Stmt],
        grid: bool,
    ) -> Result<(), CpuError> {
        let v = self.var(var)?;
        let body_block = self.b.create_block();
        let exit = self.b.create_block();
        self.b.def_var(v, start);
        if nonempty {
            self.b.ins().jump(body_block, &[]);
        } else {
            let go = self.b.ins().icmp(IntCC::UnsignedLessThan, start, end);
            self.b.ins().brif(go, body_block, &[], exit, &[]);
        }
        self.b.switch_to_block(body_block);
        if grid {
            for a in self.accs.clone() {
                let zero = self.b.ins().f32const(0.0f32);
                self.b.def_var(a, zero);
            }
        }
        self.stmts(body)?;
        let i = self.b.use_var(v);
        let next = self.b.ins().iadd_imm_s(i, 1);
        self.b.def_var(v, next);
        let more = self.b.ins().icmp(IntCC::UnsignedLessThan, next, end);
        self.b.ins().brif(more, body_block, &[], exit, &[]);
        // Sealing each block as soon as its predecessors are known lets Cranelift's SSA
        // construction see that outer loop variables are invariant here (no block
        // parameters for them), so address arithmetic can be hoisted out of the loop.
        self.b.seal_block(body_block);
        self.b.seal_block(exit);
        self.b.switch_to_block(exit);
        Ok(())
    }

    pub fn stmts(&mut self, body: &[Stmt]) -> Result<(), CpuError> {
        for s in body {
            self.stmt(s)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), CpuError> {
        match s {
            Stmt::Loop(l) => {
                if l.kind == LoopKind::Vector && self.cfg.vectorize {
                    if let Some(map) = self.native_map(l) {
                        return self.call_vmap(l, map);
                    }
                    if let Some(plan) = vector::plan(self.k, l) {
                        return self.vector_loop(l, &plan);
                    }
                }
                let (end, nonempty) = match l.extent {
                    // The body never runs.
                    Extent::Fixed(0) => return Ok(()),
                    Extent::Fixed(n) => (self.b.ins().iconst(I64, n as i64), true),
                    Extent::Batch => (self.batch, false),
                };
                let zero = self.b.ins().iconst(I64, 0);
                self.scalar_loop(l.var, zero, end, nonempty, &l.body, false)
            }
            Stmt::Set { acc, value } => {
                let v = self.expr(value)?;
                let a = self.acc(*acc)?;
                self.b.def_var(a, v);
                Ok(())
            }
            Stmt::Store { arg, index, value, accumulate } => {
                let mut v = self.expr(value)?;
                let addr = self.address(*arg, index)?;
                if *accumulate {
                    let old = self.b.ins().load(F32, MemFlagsData::trusted(), addr, 0);
                    v = self.b.ins().fadd(old, v);
                }
                self.b.ins().store(MemFlagsData::trusted(), v, addr, 0);
                Ok(())
            }
            Stmt::Contract(c) => self.contract(c),
            Stmt::If { cond, then } => {
                let c = self.cond(cond)?;
                let then_block = self.b.create_block();
                let merge = self.b.create_block();
                self.b.ins().brif(c, then_block, &[], merge, &[]);
                self.b.seal_block(then_block);
                self.b.switch_to_block(then_block);
                self.stmts(then)?;
                self.b.ins().jump(merge, &[]);
                self.b.seal_block(merge);
                self.b.switch_to_block(merge);
                Ok(())
            }
        }
    }

    /// A contraction as one call of `pdgc_sgemm`: each operand's address at `m = n = k = 0`
    /// and its element strides along the contraction's variables (constants: the verifier
    /// proved those variables appear with `div == 1`).
    fn contract(&mut self, c: &Contract) -> Result<(), CpuError> {
        let [cp, c_rs, c_cs] = self.operand(c, &c.c, c.m, c.n)?;
        let [ap, a_rs, a_cs] = self.operand(c, &c.a, c.m, c.k)?;
        let [bp, b_rs, b_cs] = self.operand(c, &c.b, c.k, c.n)?;
        let [m, n, k] = c.extents.map(|e| match e {
            Extent::Batch => self.batch,
            Extent::Fixed(x) => self.b.ins().iconst(I64, x as i64),
        });
        let acc = self.b.ins().iconst(I64, i64::from(c.accumulate));
        let func = match self.gemm_ref {
            Some(f) => f,
            None => {
                let f = self.import(self.cfg.gemm, gemm_signature(self.cfg.call_conv));
                self.gemm_ref = Some(f);
                f
            }
        };
        self.b.ins().call(func, &[m, n, k, cp, c_rs, c_cs, ap, a_rs, a_cs, bp, b_rs, b_cs, acc]);
        Ok(())
    }

    /// A vector loop that only maps a transcendental over a contiguous run, `y[.., i] =
    /// f(x[.., i])` with unit element strides along the loop's variable (and `y` either
    /// another argument or `x` at the same index).
    fn native_map<'s>(&self, l: &'s Loop) -> Option<NativeMap<'s>> {
        let [Stmt::Store { arg: y, index: yi, value: Expr::Unary(op, x), accumulate: false }] = &l.body[..] else {
            return None;
        };
        let slot = math_slot(*op)?;
        let Expr::Load { arg: xa, index: xi } = &**x else { return None };
        if xa == y && xi != yi {
            return None;
        }
        let unit = |arg: ArgId, index: &[Affine]| {
            let strides = self.strides.get(arg.0 as usize)?;
            let mut along = 0i64;
            for (ix, &s) in index.iter().zip(strides) {
                for t in ix.terms.iter().filter(|t| t.var == l.var) {
                    if t.div != 1 {
                        return None;
                    }
                    along = along.checked_add(t.coef.checked_mul(s as i64)?)?;
                }
            }
            Some(along == 1)
        };
        (unit(*xa, xi)? && unit(*y, yi)?).then_some(NativeMap { slot, x: (*xa, xi), y: (*y, yi) })
    }

    /// A [`Self::native_map`] loop as one call of `pdgc_vmap` from the loop variable's 0.
    fn call_vmap(&mut self, l: &Loop, map: NativeMap<'_>) -> Result<(), CpuError> {
        let len = match l.extent {
            Extent::Fixed(0) => return Ok(()),
            Extent::Fixed(n) => self.b.ins().iconst(I64, n as i64),
            Extent::Batch => self.batch,
        };
        let var = self.var(l.var)?;
        let zero = self.b.ins().iconst(I64, 0);
        self.b.def_var(var, zero);
        let (x, y) = (self.address(map.x.0, map.x.1)?, self.address(map.y.0, map.y.1)?);
        let op = self.b.ins().iconst(I64, map.slot as i64);
        let func = match self.vmap_ref {
            Some(f) => f,
            None => {
                let f = self.import(self.cfg.vmap, vmap_signature(self.cfg.call_conv));
                self.vmap_ref = Some(f);
                f
            }
        };
        self.b.ins().call(func, &[op, x, y, len]);
        Ok(())
    }

    /// One operand of a contraction: its address with the contraction's own variables at
    /// 0, and its element strides along `rows` and `cols`.
    fn operand(&mut self, c: &Contract, op: &Operand, rows: VarId, cols: VarId) -> Result<[Value; 3], CpuError> {
        let own = [c.m, c.n, c.k];
        let strides = self.strides.get(op.arg.0 as usize).ok_or_else(|| internal(self.k, "argument out of range"))?;
        let along = |v: VarId| -> i64 {
            op.index
                .iter()
                .zip(strides)
                .map(|(ix, &s)| {
                    let coef = ix.terms.iter().filter(|t| t.var == v).fold(0i64, |a, t| a.wrapping_add(t.coef));
                    coef.wrapping_mul(s as i64)
                })
                .fold(0i64, i64::wrapping_add)
        };
        let (rs, cs) = (along(rows), along(cols));
        let base: Vec<Affine> = op
            .index
            .iter()
            .map(|ix| Affine {
                terms: ix.terms.iter().filter(|t| !own.contains(&t.var)).copied().collect(),
                offset: ix.offset,
            })
            .collect();
        let addr = self.address(op.arg, &base)?;
        Ok([addr, self.b.ins().iconst(I64, rs), self.b.ins().iconst(I64, cs)])
    }

    /// `Σ coef·⌊var/div⌋ + offset` in wrapping i64 arithmetic, terms in the given order.
    fn linear(&mut self, terms: &[(VarId, i64, i64)], offset: i64) -> Result<Value, CpuError> {
        let mut sum: Option<Value> = None;
        for &(var, div, coef) in terms {
            if coef == 0 {
                continue;
            }
            let v = self.var(var)?;
            let mut x = self.b.use_var(v);
            if div != 1 {
                x = self.b.ins().udiv_imm_s(x, div);
            }
            if coef != 1 {
                x = self.b.ins().imul_imm_s(x, coef);
            }
            sum = Some(match sum {
                Some(s) => self.b.ins().iadd(s, x),
                None => x,
            });
        }
        Ok(match sum {
            Some(s) if offset != 0 => self.b.ins().iadd_imm_s(s, offset),
            Some(s) => s,
            None => self.b.ins().iconst(I64, offset),
        })
    }

    pub fn affine(&mut self, a: &Affine) -> Result<Value, CpuError> {
        let terms: Vec<(VarId, i64, i64)> = a.terms.iter().map(|t| (t.var, t.div, t.coef)).collect();
        self.linear(&terms, a.offset)
    }

    /// The address of `arg[index]`, with the loop variables' current values.
    pub fn address(&mut self, arg: ArgId, index: &[Affine]) -> Result<Value, CpuError> {
        let base = *self.bufs.get(arg.0 as usize).ok_or_else(|| internal(self.k, "argument out of range"))?;
        let strides = self.strides.get(arg.0 as usize).ok_or_else(|| internal(self.k, "argument out of range"))?;
        // One linear form in bytes over the distinct ⌊var/div⌋, in order of appearance.
        let mut terms: Vec<(VarId, i64, i64)> = Vec::new();
        let mut offset = 0i64;
        for (ix, &stride) in index.iter().zip(strides) {
            let bytes = (stride as i64).wrapping_mul(4);
            offset = offset.wrapping_add(ix.offset.wrapping_mul(bytes));
            for t in &ix.terms {
                let c = t.coef.wrapping_mul(bytes);
                match terms.iter_mut().find(|(v, d, _)| *v == t.var && *d == t.div) {
                    Some(term) => term.2 = term.2.wrapping_add(c),
                    None => terms.push((t.var, t.div, c)),
                }
            }
        }
        let off = self.linear(&terms, offset)?;
        Ok(self.b.ins().iadd(base, off))
    }

    pub fn expr(&mut self, e: &Expr) -> Result<Value, CpuError> {
        if let Some(v) = self.hoisted.get(&(e as *const Expr)) {
            return Ok(*v);
        }
        Ok(match e {
            Expr::Const(c) => self.b.ins().f32const(*c),
            Expr::Load { arg, index } => {
                let addr = self.address(*arg, index)?;
                self.b.ins().load(F32, MemFlagsData::trusted(), addr, 0)
            }
            Expr::Acc(a) => {
                let v = self.acc(*a)?;
                self.b.use_var(v)
            }
            Expr::Index(a) => {
                let i = self.affine(a)?;
                self.b.ins().fcvt_from_sint(F32, i)
            }
            Expr::Unary(op, a) => {
                let x = self.expr(a)?;
                self.unary(*op, x)?
            }
            Expr::Binary(op, a, b) => {
                let x = self.expr(a)?;
                let y = self.expr(b)?;
                self.binary(*op, x, y)
            }
            Expr::Select { cond, then, otherwise } => {
                // Both arms are evaluated: expressions have no side effects, and the
                // verifier proved the loads of both in bounds.
                let c = self.cond(cond)?;
                let t = self.expr(then)?;
                let o = self.expr(otherwise)?;
                // A float `select` lowers to a branch on x86-64, which mispredicts on data
                // (which tap of a max pool's window won); an integer one is a `cmov`.
                let [t, o] = [t, o].map(|x| self.b.ins().bitcast(I32, MemFlagsData::new(), x));
                let r = self.b.ins().select(c, t, o);
                self.b.ins().bitcast(F32, MemFlagsData::new(), r)
            }
        })
    }

    /// A unary operation on a scalar or (for `Neg`, `Abs`, `Sqrt`) a vector value.
    pub fn unary(&mut self, op: Unary, x: Value) -> Result<Value, CpuError> {
        Ok(match op {
            Unary::Neg => self.b.ins().fneg(x),
            Unary::Abs => self.b.ins().fabs(x),
            Unary::Sqrt => self.b.ins().sqrt(x),
            Unary::Exp | Unary::Log | Unary::Tanh | Unary::Erf => {
                let slot = math_slot(op).ok_or_else(|| internal(self.k, "a math function without its symbol"))?;
                self.call_math(slot, x)?
            }
        })
    }

    /// A binary operation on two scalars or two vectors.
    pub fn binary(&mut self, op: Binary, x: Value, y: Value) -> Value {
        match op {
            Binary::Add => self.b.ins().fadd(x, y),
            Binary::Sub => self.b.ins().fsub(x, y),
            Binary::Mul => self.b.ins().fmul(x, y),
            Binary::Div => self.b.ins().fdiv(x, y),
            // NaN-propagating, as `ir::Binary` defines `Max` and `Min`.
            Binary::Max | Binary::Min if self.b.func.dfg.value_type(x) == F32 => {
                // On lanes: the scalar instructions lower to compares and branches on
                // x86-64, which mispredict on data (a max pool over a ReLU's zeros); the
                // lane versions are branch-free, with the same meaning.
                let [x, y] = [x, y].map(|s| self.b.ins().scalar_to_vector(F32X4, s));
                let lanes = if op == Binary::Max { self.b.ins().fmax(x, y) } else { self.b.ins().fmin(x, y) };
                self.b.ins().extractlane(lanes, 0)
            }
            Binary::Max => self.b.ins().fmax(x, y),
            Binary::Min => self.b.ins().fmin(x, y),
        }
    }

    /// A function of the JIT module, imported into this one.
    fn import(&mut self, id: FuncId, signature: Signature) -> FuncRef {
        let signature = self.b.import_signature(signature);
        let name = self.b.func.declare_imported_user_function(UserExternalName::new(0, id.as_u32()));
        self.b.import_function(ExtFuncData {
            name: ExternalName::user(name),
            signature,
            colocated: false,
            patchable: false,
        })
    }

    fn call_math(&mut self, slot: usize, x: Value) -> Result<Value, CpuError> {
        let func = match self.math_refs[slot] {
            Some(f) => f,
            None => {
                let f = self.import(self.cfg.math[slot], math_signature(self.cfg.call_conv));
                self.math_refs[slot] = Some(f);
                f
            }
        };
        let call = self.b.ins().call(func, &[x]);
        self.b.inst_results(call).first().copied().ok_or_else(|| internal(self.k, "a math call returned nothing"))
    }

    /// A condition as an `i8` truth value. `And` evaluates every conjunct.
    pub fn cond(&mut self, c: &Cond) -> Result<Value, CpuError> {
        Ok(match c {
            Cond::InRange { index, lo, hi } => {
                let x = self.affine(index)?;
                if hi <= lo {
                    self.b.ins().iconst(I8, 0)
                } else {
                    // One unsigned comparison: `lo <= x < hi` exactly when `x - lo`, taken
                    // modulo 2^64, is below `hi - lo` (which fits in a u64).
                    let shifted = if *lo == 0 { x } else { self.b.ins().iadd_imm_s(x, lo.wrapping_neg()) };
                    self.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, shifted, hi.wrapping_sub(*lo))
                }
            }
            Cond::Cmp { op, a, b } => {
                let x = self.expr(a)?;
                let y = self.expr(b)?;
                self.b.ins().fcmp(float_cc(*op), x, y)
            }
            Cond::And(cs) => {
                let mut all: Option<Value> = None;
                for c in cs {
                    let v = self.cond(c)?;
                    all = Some(match all {
                        Some(a) => self.b.ins().band(a, v),
                        None => v,
                    });
                }
                match all {
                    Some(a) => a,
                    None => self.b.ins().iconst(I8, 1),
                }
            }
        })
    }
}

/// Cranelift's condition for a comparison: ordered for all but `Ne`, which is true on
/// NaN, as IEEE (and Rust) comparisons are.
pub(super) fn float_cc(op: CmpOp) -> FloatCC {
    match op {
        CmpOp::Lt => FloatCC::LessThan,
        CmpOp::Le => FloatCC::LessThanOrEqual,
        CmpOp::Eq => FloatCC::Equal,
        CmpOp::Ne => FloatCC::NotEqual,
        CmpOp::Gt => FloatCC::GreaterThan,
        CmpOp::Ge => FloatCC::GreaterThanOrEqual,
    }
}
