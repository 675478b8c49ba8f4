//! The reference interpreter: the test oracle every backend is compared against.
//!
//! It walks the kernel IR directly, with the semantics the [`crate::ir`] docs give, and
//! computes in f32 like the compiled backends do (the transcendental functions are the
//! very ones the CPU backend calls, so its scalar code agrees bit for bit). It needs no
//! verified kernel: buffer lengths, every access and every malformed piece are checked at
//! run time and reported as an [`InterpError`], never a panic.
//!
//! Details the IR leaves to the executor, shared with the CPU backend: accumulators start
//! every grid iteration at `0.0`; index arithmetic wraps in 64 bits; `Select` and
//! `Cond::And` evaluate all their operands (no short circuit), so a load in the arm not
//! taken must be in bounds too. A [`crate::ir::Contract`] runs as the loop nest that
//! defines it.

use thiserror::Error;

use crate::ir::{Affine, ArgId, Cond, Dim, Expr, Kernel, Loop, Mode, Stmt};
use crate::math;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InterpError {
    #[error("kernel `{kernel}`: {expected} buffers expected, {got} given")]
    BufferCount { kernel: String, expected: usize, got: usize },
    #[error("kernel `{kernel}`: buffer `{arg}` has {got} elements, batch {batch} needs {expected}")]
    BufferLen { kernel: String, arg: String, batch: u64, expected: String, got: usize },
    #[error("kernel `{kernel}`: grid range {lo}..{hi} is not within 0..{extent}")]
    GridRange { kernel: String, lo: u64, hi: u64, extent: u64 },
    #[error("kernel `{kernel}`, in `{stmt}`: index {index:?} of `{arg}` is out of bounds {dims:?}")]
    OutOfBounds { kernel: String, stmt: String, arg: String, index: Vec<i64>, dims: Vec<u64> },
    #[error("kernel `{kernel}`, in `{stmt}`: {message}")]
    Malformed { kernel: String, stmt: String, message: String },
}

/// Runs every grid iteration of `k` for `batch`, with `bufs[i]` the buffer of the `i`-th
/// bound argument ([`Kernel::bound`]).
pub fn run(k: &Kernel, bufs: &mut [&mut [f32]], batch: u64) -> Result<(), InterpError> {
    let extent = k.grid.extent.resolve(batch);
    run_range(k, bufs, batch, 0, extent)
}

/// Runs grid iterations `lo..hi` of `k`, as a compiled kernel's entry point does. Private
/// arguments get one slice per grid iteration, filled with NaN, so reading what the
/// iteration did not write shows in the results.
pub fn run_range(k: &Kernel, bufs: &mut [&mut [f32]], batch: u64, lo: u64, hi: u64) -> Result<(), InterpError> {
    let bound: Vec<_> = k.bound().collect();
    if bufs.len() != bound.len() {
        return Err(InterpError::BufferCount { kernel: k.name.clone(), expected: bound.len(), got: bufs.len() });
    }
    for a in &k.args {
        if let Some(i) = a.dims.iter().skip(1).position(|d| *d == Dim::Batch) {
            return Err(InterpError::Malformed {
                kernel: k.name.clone(),
                stmt: format!("argument `{}`", a.name),
                message: format!("the batch dim is dim {}; it may only be the first", i + 1),
            });
        }
        if a.mode == Mode::Private && a.dims.contains(&Dim::Batch) {
            return Err(InterpError::Malformed {
                kernel: k.name.clone(),
                stmt: format!("argument `{}`", a.name),
                message: "a private argument has a batch dim".into(),
            });
        }
    }
    for (a, b) in bound.iter().zip(bufs.iter()) {
        if let Some(expected) = a.len_mismatch(batch, b.len()) {
            return Err(InterpError::BufferLen {
                kernel: k.name.clone(),
                arg: a.name.clone(),
                batch,
                expected,
                got: b.len(),
            });
        }
    }
    let extent = k.grid.extent.resolve(batch);
    if lo > hi || hi > extent {
        return Err(InterpError::GridRange { kernel: k.name.clone(), lo, hi, extent });
    }
    // A contraction means the loop nest that defines it (`Kernel::desugared`); private
    // arguments are one slice per iteration (`Kernel::private_sliced`).
    let desugared = k.desugared();
    let sliced = desugared.private_sliced();
    let k: &Kernel = &sliced;
    // Each private argument's NaN-filled slices (`None` for a bound one, which takes the
    // next given buffer).
    let mut private = Vec::with_capacity(k.args.len());
    for (a, original) in k.args.iter().zip(&desugared.args) {
        private.push(match original.is_bound() {
            true => None,
            false => {
                let len = a.checked_len(batch).and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                    InterpError::Malformed {
                        kernel: k.name.clone(),
                        stmt: format!("argument `{}`", a.name),
                        message: "private memory larger than the address space".into(),
                    }
                })?;
                Some(vec![f32::NAN; len])
            }
        });
    }
    let mut given = bufs.iter_mut();
    let mut all: Vec<&mut [f32]> = private
        .iter_mut()
        .filter_map(|own| match own {
            Some(v) => Some(v.as_mut_slice()),
            None => given.next().map(|b| &mut **b),
        })
        .collect();
    let mut m = Machine {
        k,
        bufs: &mut all,
        batch,
        strides: k.args.iter().map(|a| a.strides()).collect(),
        vars: vec![None; k.vars.len()],
        accs: vec![0.0; k.accs.len()],
    };
    let grid = &k.grid;
    let slot = m.bind_slot(grid, "grid")?;
    for g in lo..hi {
        m.vars[slot] = Some(g as i64);
        m.accs.iter_mut().for_each(|a| *a = 0.0);
        m.stmts(&grid.body)?;
    }
    Ok(())
}

/// What went wrong while evaluating one statement; [`Machine::stmt`] adds the context.
enum Fault {
    OutOfBounds { arg: ArgId, index: Vec<i64> },
    Malformed(String),
}

struct Machine<'k, 'b, 'c> {
    k: &'k Kernel,
    bufs: &'b mut [&'c mut [f32]],
    batch: u64,
    strides: Vec<Vec<u64>>,
    /// The value of each bound loop variable.
    vars: Vec<Option<i64>>,
    accs: Vec<f32>,
}

impl Machine<'_, '_, '_> {
    fn malformed(&self, stmt: String, message: String) -> InterpError {
        InterpError::Malformed { kernel: self.k.name.clone(), stmt, message }
    }

    fn bind_slot(&self, l: &Loop, what: &str) -> Result<usize, InterpError> {
        let slot = l.var.0 as usize;
        if slot >= self.vars.len() {
            return Err(self.malformed(format!("{what} loop"), format!("loop variable v{} is out of range", l.var.0)));
        }
        Ok(slot)
    }

    fn stmts(&mut self, body: &[Stmt]) -> Result<(), InterpError> {
        for s in body {
            self.stmt(s)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), InterpError> {
        match s {
            Stmt::Loop(l) => {
                let slot = self.bind_slot(l, "a")?;
                let outer = self.vars[slot];
                for i in 0..l.extent.resolve(self.batch) {
                    self.vars[slot] = Some(i as i64);
                    self.stmts(&l.body)?;
                }
                self.vars[slot] = outer;
                Ok(())
            }
            Stmt::Set { acc, value } => {
                let v = self.expr(value).map_err(|f| self.fault(s, f))?;
                match self.accs.get_mut(acc.0 as usize) {
                    Some(a) => {
                        *a = v;
                        Ok(())
                    }
                    None => Err(self.fault(s, Fault::Malformed(format!("accumulator a{} is out of range", acc.0)))),
                }
            }
            Stmt::Store { arg, index, value, accumulate } => {
                let v = self.expr(value).map_err(|f| self.fault(s, f))?;
                let at = self.element(*arg, index, true).map_err(|f| self.fault(s, f))?;
                let cell = &mut self.bufs[arg.0 as usize][at];
                if *accumulate {
                    *cell += v;
                } else {
                    *cell = v;
                }
                Ok(())
            }
            Stmt::If { cond, then } => {
                if self.cond(cond).map_err(|f| self.fault(s, f))? {
                    self.stmts(then)?;
                }
                Ok(())
            }
            // `run_range` desugars every contraction before it runs a kernel.
            Stmt::Contract(_) => Err(self.malformed(self.k.stmt_head(s), "a contraction survived desugaring".into())),
        }
    }

    fn fault(&self, s: &Stmt, f: Fault) -> InterpError {
        let stmt = self.k.stmt_head(s);
        match f {
            Fault::Malformed(message) => self.malformed(stmt, message),
            Fault::OutOfBounds { arg, index } => {
                let a = &self.k.args[arg.0 as usize];
                let dims = a
                    .dims
                    .iter()
                    .map(|d| match d {
                        Dim::Batch => self.batch,
                        Dim::Fixed(n) => *n as u64,
                    })
                    .collect();
                InterpError::OutOfBounds { kernel: self.k.name.clone(), stmt, arg: a.name.clone(), index, dims }
            }
        }
    }

    fn affine(&self, a: &Affine) -> Result<i64, Fault> {
        let mut sum = a.offset;
        for t in &a.terms {
            let name = || self.k.vars.get(t.var.0 as usize).cloned().unwrap_or_else(|| format!("v{}", t.var.0));
            let v = match self.vars.get(t.var.0 as usize) {
                Some(Some(v)) => *v,
                Some(None) => return Err(Fault::Malformed(format!("variable `{}` is used outside its loop", name()))),
                None => return Err(Fault::Malformed(format!("variable v{} is out of range", t.var.0))),
            };
            if t.div <= 0 {
                return Err(Fault::Malformed(format!("a term of `{}` divides by {}", name(), t.div)));
            }
            // Loop variables are never negative: an unsigned division, as in the backends.
            let q = ((v as u64) / (t.div as u64)) as i64;
            sum = sum.wrapping_add(t.coef.wrapping_mul(q));
        }
        Ok(sum)
    }

    /// The flat element offset of an access, checked against the buffer's dims and mode.
    fn element(&self, arg: ArgId, index: &[Affine], store: bool) -> Result<usize, Fault> {
        let Some(a) = self.k.args.get(arg.0 as usize) else {
            return Err(Fault::Malformed(format!("argument {} is out of range", arg.0)));
        };
        match (store, a.mode) {
            (false, Mode::Out) => return Err(Fault::Malformed(format!("loads from `{}`, an `out` argument", a.name))),
            (true, Mode::In) => return Err(Fault::Malformed(format!("stores to `{}`, an `in` argument", a.name))),
            _ => {}
        }
        if index.len() != a.dims.len() {
            return Err(Fault::Malformed(format!(
                "`{}` has {} dims but is indexed with {}",
                a.name,
                a.dims.len(),
                index.len()
            )));
        }
        let values = index.iter().map(|ix| self.affine(ix)).collect::<Result<Vec<i64>, Fault>>()?;
        let mut flat = 0u64;
        for ((v, d), stride) in values.iter().zip(&a.dims).zip(&self.strides[arg.0 as usize]) {
            let n = match d {
                Dim::Batch => self.batch,
                Dim::Fixed(n) => *n as u64,
            };
            if *v < 0 || *v as u64 >= n {
                return Err(Fault::OutOfBounds { arg, index: values });
            }
            // In bounds in every dim, so the flat offset is below the (checked) length.
            flat += *v as u64 * stride;
        }
        Ok(flat as usize)
    }

    fn expr(&self, e: &Expr) -> Result<f32, Fault> {
        Ok(match e {
            Expr::Const(c) => *c,
            Expr::Load { arg, index } => self.load(*arg, index)?,
            Expr::Acc(a) => match self.accs.get(a.0 as usize) {
                Some(v) => *v,
                None => return Err(Fault::Malformed(format!("accumulator a{} is out of range", a.0))),
            },
            Expr::Index(a) => self.affine(a)? as f32,
            Expr::Unary(op, a) => math::unary(*op, self.expr(a)?),
            Expr::Binary(op, a, b) => math::binary(*op, self.expr(a)?, self.expr(b)?),
            Expr::Select { cond, then, otherwise } => {
                let c = self.cond(cond)?;
                let (t, o) = (self.expr(then)?, self.expr(otherwise)?);
                if c {
                    t
                } else {
                    o
                }
            }
        })
    }

    fn load(&self, arg: ArgId, index: &[Affine]) -> Result<f32, Fault> {
        let at = self.element(arg, index, false)?;
        Ok(self.bufs[arg.0 as usize][at])
    }

    fn cond(&self, c: &Cond) -> Result<bool, Fault> {
        Ok(match c {
            Cond::InRange { index, lo, hi } => {
                let v = self.affine(index)?;
                *lo <= v && v < *hi
            }
            Cond::Cmp { op, a, b } => math::compare(*op, self.expr(a)?, self.expr(b)?),
            Cond::And(cs) => {
                let mut all = true;
                for c in cs {
                    all &= self.cond(c)?;
                }
                all
            }
        })
    }
}
