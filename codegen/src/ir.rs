//! The kernel IR: loop nests over f32 buffers whose shapes are known at compile time,
//! except the leading batch dimension, which is a run-time argument.
//!
//! Plain data throughout (Cranelift's entity style): buffers, loop variables and scalar
//! accumulators are `u32` index newtypes into the kernel's tables. A kernel has one `args`
//! list; every backend derives its signature from it, and a launch binds buffers in the
//! same order, so the two cannot drift.
//!
//! Execution model: `grid` is the outermost loop. Its iterations are independent (no two
//! write the same element, none reads what another writes), so a backend may split them
//! over threads or GPU blocks. Everything inside runs sequentially, in order. Stores with
//! `accumulate` add to the element; plain stores overwrite it. Accumulators are scalar
//! registers private to one grid iteration, and so are [`Mode::Private`] arguments.
//!
//! The entry point of a compiled kernel runs grid iterations `lo..hi` for a given `batch`:
//! `fn(bufs: *const *mut f32, batch: u64, lo: u64, hi: u64)`, with `bufs[i]` the buffer of
//! `args[i]`. A launch binds buffers to the [`Kernel::bound`] arguments only (every one but
//! the private ones), in order; the backend supplies the private ones.

use std::fmt;

use crate::visit::{walk_body, walk_body_mut, walk_stmt, walk_stmt_mut, Visitor, VisitorMut};

/// Index of an argument buffer in [`Kernel::args`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArgId(pub u32);

/// Index of a loop variable in [`Kernel::vars`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VarId(pub u32);

/// Index of a scalar accumulator in [`Kernel::accs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccId(pub u32);

/// A size known at compile time, or the run-time batch: a buffer's dimension (the batch
/// only as the leading one) or a loop's trip count ([`Extent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    Batch,
    Fixed(u32),
}

/// How a kernel uses an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    In,
    Out,
    InOut,
    /// Memory private to each grid iteration (an example's im2col columns between the gather
    /// and the product that reads them): its dims are all fixed, every iteration has its own
    /// copy, whose contents are undefined when the iteration starts and dead when it ends, so
    /// the iteration writes what it reads first. A launch binds no buffer for it: the backend
    /// provides the memory (the CPU one buffer per worker thread, kept in its cache; the
    /// interpreter and CUDA one slice per iteration, see [`Kernel::private_sliced`]).
    Private,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Arg {
    pub name: String,
    pub dims: Vec<Dim>,
    pub mode: Mode,
}

/// A loop's trip count: the same sizes as a buffer's [`Dim`].
pub type Extent = Dim;

/// A hint for backends; it never changes the meaning of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoopKind {
    Serial,
    /// The innermost loop along a unit-stride dimension: a candidate for SIMD lanes.
    Vector,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Loop {
    pub var: VarId,
    pub extent: Extent,
    pub kind: LoopKind,
    pub body: Vec<Stmt>,
}

/// `coef · ⌊var / div⌋`; loop variables are never negative, so the floor is a plain
/// unsigned division.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Term {
    pub var: VarId,
    pub coef: i64,
    pub div: i64,
}

/// An integer index: `Σ terms + offset`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Affine {
    pub terms: Vec<Term>,
    pub offset: i64,
}

impl Affine {
    pub fn var(v: VarId) -> Affine {
        Affine { terms: vec![Term { var: v, coef: 1, div: 1 }], offset: 0 }
    }

    pub fn constant(c: i64) -> Affine {
        Affine { terms: vec![], offset: c }
    }

    /// `coef · var` added to this index.
    pub fn plus(mut self, v: VarId, coef: i64) -> Affine {
        self.terms.push(Term { var: v, coef, div: 1 });
        self
    }

    /// `coef · ⌊var/div⌋` added to this index.
    pub fn plus_div(mut self, v: VarId, coef: i64, div: i64) -> Affine {
        self.terms.push(Term { var: v, coef, div });
        self
    }

    pub fn offset(mut self, c: i64) -> Affine {
        self.offset += c;
        self
    }

    /// The single variable this index is, if it is exactly one variable.
    pub fn as_var(&self) -> Option<VarId> {
        match self.terms.as_slice() {
            [Term { var, coef: 1, div: 1 }] if self.offset == 0 => Some(*var),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unary {
    Neg,
    Exp,
    Log,
    Tanh,
    Sqrt,
    Erf,
    Abs,
}

/// Binary float operations. `Max` and `Min` propagate NaN (IEEE 754-2019 `maximum` and
/// `minimum`, Cranelift's `fmax`/`fmin`): `max(NaN, x)` is NaN, so `max(x, 0)` keeps a NaN
/// visible as PyTorch's `relu` does; `max(-0, +0)` is `+0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Lt,
    Le,
    Eq,
    Ne,
    Gt,
    Ge,
}

/// A float expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Const(f32),
    Load {
        arg: ArgId,
        index: Vec<Affine>,
    },
    Acc(AccId),
    /// An integer index as a float (one-hot comparisons, counts).
    Index(Affine),
    Unary(Unary, Box<Expr>),
    Binary(Binary, Box<Expr>, Box<Expr>),
    Select {
        cond: Box<Cond>,
        then: Box<Expr>,
        otherwise: Box<Expr>,
    },
}

/// A condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    /// `lo <= index < hi`.
    InRange {
        index: Affine,
        lo: i64,
        hi: i64,
    },
    Cmp {
        op: CmpOp,
        a: Expr,
        b: Expr,
    },
    And(Vec<Cond>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    Loop(Loop),
    /// `acc = value`
    Set {
        acc: AccId,
        value: Expr,
    },
    /// `arg[index] = value` or, with `accumulate`, `arg[index] += value`.
    Store {
        arg: ArgId,
        index: Vec<Affine>,
        value: Expr,
        accumulate: bool,
    },
    If {
        cond: Cond,
        then: Vec<Stmt>,
    },
    /// A matrix product, see [`Contract`].
    Contract(Contract),
}

/// An operand of a [`Contract`]: `arg[index]`, the index affine in the contraction's own
/// variables and any enclosing loop variable.
#[derive(Debug, Clone, PartialEq)]
pub struct Operand {
    pub arg: ArgId,
    pub index: Vec<Affine>,
}

/// The contraction node: `C[m, n] (+)= Σ_k A[m, k] · B[k, n]` for every `m < M`, `n < N`,
/// where `A`, `B` and `C` are buffers read (and written) through affine index maps — so a
/// transposed operand, an im2col column block or one group of a grouped weight is a view,
/// not a copy. `m`, `n` and `k` are loop variables bound by this statement; their terms in
/// the operands' indices must have `div == 1` (each operand is then a strided matrix, which
/// is what lets a backend hand the whole product to a tuned GEMM).
///
/// Its meaning is defined by [`Contract::as_loops`]: for each `m`, each `n`, a fresh sum over
/// `k` in ascending order starting at `0.0`, then a store (or, with `accumulate`, an add)
/// into `C`. Backends that reassociate the sum (register tiles, vector lanes) agree with it
/// to rounding.
#[derive(Debug, Clone, PartialEq)]
pub struct Contract {
    pub m: VarId,
    pub n: VarId,
    pub k: VarId,
    /// The trip counts of `m`, `n` and `k`. Any of them may be the batch (its variable then
    /// indexes a batch dim, e.g. a linear layer's examples as GEMM rows).
    pub extents: [Extent; 3],
    pub a: Operand,
    pub b: Operand,
    pub c: Operand,
    pub accumulate: bool,
}

impl Contract {
    /// The loop nest that defines this statement's meaning; `acc` is the accumulator it
    /// sums in (the caller supplies one that nothing else uses).
    pub fn as_loops(&self, acc: AccId) -> Stmt {
        let product =
            Expr::mul(Expr::load(self.a.arg, self.a.index.clone()), Expr::load(self.b.arg, self.b.index.clone()));
        let lp = |var, extent, kind, body| Stmt::Loop(Loop { var, extent, kind, body });
        let sum = vec![
            Stmt::Set { acc, value: Expr::Const(0.0) },
            lp(
                self.k,
                self.extents[2],
                LoopKind::Serial,
                vec![Stmt::Set { acc, value: Expr::add(Expr::Acc(acc), product) }],
            ),
            Stmt::Store {
                arg: self.c.arg,
                index: self.c.index.clone(),
                value: Expr::Acc(acc),
                accumulate: self.accumulate,
            },
        ];
        lp(self.m, self.extents[0], LoopKind::Serial, vec![lp(self.n, self.extents[1], LoopKind::Serial, sum)])
    }
}

/// Whether any statement of `body`, at any depth, is a [`Contract`].
pub fn holds_contract(body: &[Stmt]) -> bool {
    struct Find(bool);
    impl<'k> Visitor<'k> for Find {
        fn stmt(&mut self, s: &'k Stmt) {
            self.0 |= matches!(s, Stmt::Contract(_));
            walk_stmt(self, s);
        }
    }
    let mut find = Find(false);
    walk_body(&mut find, body);
    find.0
}

impl Kernel {
    /// Whether any statement is a [`Contract`].
    pub fn has_contractions(&self) -> bool {
        holds_contract(&self.grid.body)
    }

    /// This kernel with every [`Contract`] replaced by the loop nest that defines it
    /// ([`Contract::as_loops`]), each with an accumulator of its own. Backends without a
    /// contraction of their own (the interpreter, CUDA C today) and the analyses (bounds,
    /// independence) work on this form, so a contraction means exactly what its loops mean.
    pub fn desugared(&self) -> std::borrow::Cow<'_, Kernel> {
        if !self.has_contractions() {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut k = self.clone();
        struct Desugar<'a>(&'a mut Vec<String>);
        impl VisitorMut for Desugar<'_> {
            fn stmt(&mut self, s: &mut Stmt) {
                if let Stmt::Contract(c) = s {
                    let acc = AccId(self.0.len() as u32);
                    self.0.push(format!("contract{}", acc.0));
                    *s = c.as_loops(acc);
                } else {
                    walk_stmt_mut(self, s);
                }
            }
        }
        walk_body_mut(&mut Desugar(&mut k.accs), &mut k.grid.body);
        std::borrow::Cow::Owned(k)
    }
}

impl Kernel {
    /// The arguments a launch binds a buffer to, in order: all but the [`Mode::Private`] ones.
    pub fn bound(&self) -> impl Iterator<Item = &Arg> {
        self.args.iter().filter(|a| a.is_bound())
    }

    /// Whether any argument is [`Mode::Private`].
    pub fn has_private(&self) -> bool {
        self.args.iter().any(|a| !a.is_bound())
    }

    /// This kernel with each [`Mode::Private`] argument made an `inout` buffer with one slice
    /// per grid iteration: a leading dim of the grid's extent, indexed by the grid variable.
    /// That is what private memory means when every iteration has its own (the interpreter
    /// and the CUDA C run this form, and the analyses prove bounds and independence on it);
    /// the CPU backend runs the kernel as it is, one slice per worker thread, which the
    /// iterations of one worker reuse in turn.
    pub fn private_sliced(&self) -> std::borrow::Cow<'_, Kernel> {
        if !self.has_private() {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut k = self.clone();
        for a in &mut k.args {
            if !a.is_bound() {
                a.mode = Mode::InOut;
                a.dims.insert(0, k.grid.extent);
            }
        }
        struct Slice<'a> {
            private: &'a [bool],
            grid: VarId,
        }
        impl VisitorMut for Slice<'_> {
            fn index(&mut self, arg: ArgId, index: &mut Vec<Affine>) {
                if self.private.get(arg.0 as usize).copied().unwrap_or(false) {
                    index.insert(0, Affine::var(self.grid));
                }
            }
        }
        let private: Vec<bool> = self.args.iter().map(|a| !a.is_bound()).collect();
        walk_body_mut(&mut Slice { private: &private, grid: k.grid.var }, &mut k.grid.body);
        std::borrow::Cow::Owned(k)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub args: Vec<Arg>,
    /// Loop variable names, indexed by [`VarId`].
    pub vars: Vec<String>,
    /// Accumulator names, indexed by [`AccId`].
    pub accs: Vec<String>,
    pub grid: Loop,
}

// ---------------------------------------------------------------------------------------
// Convenience constructors for building expressions.

impl Expr {
    pub fn load(arg: ArgId, index: Vec<Affine>) -> Expr {
        Expr::Load { arg, index }
    }

    pub fn un(op: Unary, a: Expr) -> Expr {
        Expr::Unary(op, Box::new(a))
    }

    pub fn bin(op: Binary, a: Expr, b: Expr) -> Expr {
        Expr::Binary(op, Box::new(a), Box::new(b))
    }

    pub fn add(a: Expr, b: Expr) -> Expr {
        Expr::bin(Binary::Add, a, b)
    }

    pub fn sub(a: Expr, b: Expr) -> Expr {
        Expr::bin(Binary::Sub, a, b)
    }

    pub fn mul(a: Expr, b: Expr) -> Expr {
        Expr::bin(Binary::Mul, a, b)
    }

    pub fn div(a: Expr, b: Expr) -> Expr {
        Expr::bin(Binary::Div, a, b)
    }

    pub fn select(cond: Cond, then: Expr, otherwise: Expr) -> Expr {
        Expr::Select { cond: Box::new(cond), then: Box::new(then), otherwise: Box::new(otherwise) }
    }
}

impl Dim {
    /// The size for a given batch size.
    pub fn resolve(self, batch: u64) -> u64 {
        match self {
            Extent::Batch => batch,
            Extent::Fixed(n) => n as u64,
        }
    }
}

impl Arg {
    /// Whether a launch binds a buffer to this argument: every mode but [`Mode::Private`],
    /// whose memory the backend supplies.
    pub fn is_bound(&self) -> bool {
        self.mode != Mode::Private
    }

    /// Element strides (row-major); the batch dim, if any, is the leading one, so every
    /// stride is a constant.
    pub fn strides(&self) -> Vec<u64> {
        let mut strides = vec![1u64; self.dims.len()];
        for i in (0..self.dims.len().saturating_sub(1)).rev() {
            let next = match self.dims[i + 1] {
                Dim::Fixed(n) => n as u64,
                Dim::Batch => 1,
            };
            strides[i] = strides[i + 1] * next;
        }
        strides
    }

    /// Elements for a given batch size, or `None` when the count overflows `u64` (a
    /// caller checking buffers uses this rather than [`Arg::len`], which would overflow).
    pub fn checked_len(&self, batch: u64) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |n, d| match d {
            Dim::Batch => n.checked_mul(batch),
            Dim::Fixed(m) => n.checked_mul(*m as u64),
        })
    }

    /// `None` when a buffer of `got` elements fits this argument at `batch`; otherwise
    /// the expected element count as text (for the backends' length errors).
    pub fn len_mismatch(&self, batch: u64, got: usize) -> Option<String> {
        match self.checked_len(batch) {
            Some(n) if n == got as u64 => None,
            Some(n) => Some(n.to_string()),
            None => Some("more than 2^64".to_string()),
        }
    }

    /// Elements for a given batch size.
    pub fn len(&self, batch: u64) -> u64 {
        self.dims
            .iter()
            .map(|d| match d {
                Dim::Batch => batch,
                Dim::Fixed(n) => *n as u64,
            })
            .product()
    }
}

// ---------------------------------------------------------------------------------------
// Text of single pieces, for diagnostics (the verifier and the interpreter name the
// offending statement with these).

impl Kernel {
    /// An index in the printer's notation, e.g. `2*oh+kh-1`.
    pub fn affine_text(&self, a: &Affine) -> String {
        Ctx(self).affine(a)
    }

    /// A buffer access in the printer's notation, e.g. `x[n, ci, 2*oh+kh-1]`.
    pub fn access_text(&self, arg: ArgId, index: &[Affine]) -> String {
        Ctx(self).index(arg, index)
    }

    pub fn expr_text(&self, e: &Expr) -> String {
        Ctx(self).expr(e)
    }

    pub fn cond_text(&self, c: &Cond) -> String {
        Ctx(self).cond(c)
    }

    /// A statement on one line: a loop or `if` header, or a whole `Set` or `Store`.
    pub fn stmt_head(&self, s: &Stmt) -> String {
        let ctx = Ctx(self);
        match s {
            Stmt::Loop(l) => {
                let vec = if l.kind == LoopKind::Vector { " vector" } else { "" };
                format!("for {} in 0..{}{vec}", ctx.var(l.var), Ctx::extent(l.extent))
            }
            Stmt::Set { acc, value } => {
                let name = self.accs.get(acc.0 as usize).map_or("?", String::as_str);
                format!("{name} = {}", ctx.expr(value))
            }
            Stmt::Store { arg, index, value, accumulate } => {
                let op = if *accumulate { "+=" } else { "=" };
                format!("{} {op} {}", ctx.index(*arg, index), ctx.expr(value))
            }
            Stmt::If { cond, .. } => format!("if {}", ctx.cond(cond)),
            Stmt::Contract(c) => ctx.contract(c),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Printer: a readable, deterministic text form (also what snapshots hold).

struct Ctx<'k>(&'k Kernel);

impl Ctx<'_> {
    fn var(&self, v: VarId) -> &str {
        self.0.vars.get(v.0 as usize).map_or("?", String::as_str)
    }

    fn affine(&self, a: &Affine) -> String {
        let mut s = String::new();
        for t in &a.terms {
            let base = if t.div == 1 { self.var(t.var).to_string() } else { format!("{}/{}", self.var(t.var), t.div) };
            let term = match t.coef {
                1 => base,
                -1 => format!("-{base}"),
                c => format!("{c}*{base}"),
            };
            if !s.is_empty() && !term.starts_with('-') {
                s.push('+');
            }
            s.push_str(&term);
        }
        if a.offset != 0 || s.is_empty() {
            if !s.is_empty() && a.offset > 0 {
                s.push('+');
            }
            s.push_str(&a.offset.to_string());
        }
        s
    }

    fn index(&self, arg: ArgId, index: &[Affine]) -> String {
        let name = self.0.args.get(arg.0 as usize).map_or("?", |a| a.name.as_str());
        let parts: Vec<String> = index.iter().map(|a| self.affine(a)).collect();
        format!("{name}[{}]", parts.join(", "))
    }

    fn expr(&self, e: &Expr) -> String {
        match e {
            Expr::Const(c) => format_f32(*c),
            Expr::Load { arg, index } => self.index(*arg, index),
            Expr::Acc(a) => self.0.accs.get(a.0 as usize).cloned().unwrap_or_else(|| "?".into()),
            Expr::Index(a) => format!("float({})", self.affine(a)),
            Expr::Unary(op, a) => format!("{}({})", format!("{op:?}").to_lowercase(), self.expr(a)),
            Expr::Binary(op, a, b) => match op {
                Binary::Max | Binary::Min => {
                    format!("{}({}, {})", format!("{op:?}").to_lowercase(), self.expr(a), self.expr(b))
                }
                _ => {
                    let sym = match op {
                        Binary::Add => "+",
                        Binary::Sub => "-",
                        Binary::Mul => "*",
                        _ => "/",
                    };
                    format!("({} {sym} {})", self.expr(a), self.expr(b))
                }
            },
            Expr::Select { cond, then, otherwise } => {
                format!("({} ? {} : {})", self.cond(cond), self.expr(then), self.expr(otherwise))
            }
        }
    }

    fn cond(&self, c: &Cond) -> String {
        match c {
            Cond::InRange { index, lo, hi } => format!("{lo} <= {} < {hi}", self.affine(index)),
            Cond::Cmp { op, a, b } => {
                let sym = match op {
                    CmpOp::Lt => "<",
                    CmpOp::Le => "<=",
                    CmpOp::Eq => "==",
                    CmpOp::Ne => "!=",
                    CmpOp::Gt => ">",
                    CmpOp::Ge => ">=",
                };
                format!("{} {sym} {}", self.expr(a), self.expr(b))
            }
            Cond::And(cs) => cs.iter().map(|c| format!("({})", self.cond(c))).collect::<Vec<_>>().join(" && "),
        }
    }

    fn extent(e: Extent) -> String {
        match e {
            Extent::Batch => "B".into(),
            Extent::Fixed(n) => n.to_string(),
        }
    }

    fn stmts(&self, f: &mut fmt::Formatter<'_>, body: &[Stmt], depth: usize) -> fmt::Result {
        let pad = "  ".repeat(depth);
        for s in body {
            match s {
                Stmt::Loop(l) => {
                    let vec = if l.kind == LoopKind::Vector { " vector" } else { "" };
                    writeln!(f, "{pad}for {} in 0..{}{vec} {{", self.var(l.var), Ctx::extent(l.extent))?;
                    self.stmts(f, &l.body, depth + 1)?;
                    writeln!(f, "{pad}}}")?;
                }
                Stmt::Set { acc, value } => {
                    let name = self.0.accs.get(acc.0 as usize).map_or("?", String::as_str);
                    writeln!(f, "{pad}{name} = {}", self.expr(value))?;
                }
                Stmt::Store { arg, index, value, accumulate } => {
                    let op = if *accumulate { "+=" } else { "=" };
                    writeln!(f, "{pad}{} {op} {}", self.index(*arg, index), self.expr(value))?;
                }
                Stmt::If { cond, then } => {
                    writeln!(f, "{pad}if {} {{", self.cond(cond))?;
                    self.stmts(f, then, depth + 1)?;
                    writeln!(f, "{pad}}}")?;
                }
                Stmt::Contract(c) => writeln!(f, "{pad}{}", self.contract(c))?,
            }
        }
        Ok(())
    }

    /// `contract m<M, n<N: c[..] += Σ_{k<K} a[..] * b[..]`
    fn contract(&self, c: &Contract) -> String {
        let op = if c.accumulate { "+=" } else { "=" };
        format!(
            "contract {}<{}, {}<{}: {} {op} sum {}<{} {} * {}",
            self.var(c.m),
            Ctx::extent(c.extents[0]),
            self.var(c.n),
            Ctx::extent(c.extents[1]),
            self.index(c.c.arg, &c.c.index),
            self.var(c.k),
            Ctx::extent(c.extents[2]),
            self.index(c.a.arg, &c.a.index),
            self.index(c.b.arg, &c.b.index),
        )
    }
}

/// Prints an f32 so that it parses back to the same bits (NaN and infinities spelled out).
pub fn format_f32(c: f32) -> String {
    if c.is_nan() {
        "nan".into()
    } else if c.is_infinite() {
        if c > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else {
        let s = format!("{c:?}");
        if s.contains('.') || s.contains('e') {
            s
        } else {
            format!("{s}.0")
        }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ctx = Ctx(self);
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                let dims: Vec<String> = a
                    .dims
                    .iter()
                    .map(|d| match d {
                        Dim::Batch => "B".to_string(),
                        Dim::Fixed(n) => n.to_string(),
                    })
                    .collect();
                let mode = match a.mode {
                    Mode::In => "in",
                    Mode::Out => "out",
                    Mode::InOut => "inout",
                    Mode::Private => "private",
                };
                format!("{mode} {}[{}]", a.name, dims.join(", "))
            })
            .collect();
        writeln!(f, "kernel {}({}) {{", self.name, args.join(", "))?;
        writeln!(f, "  grid {} in 0..{} {{", ctx.var(self.grid.var), Ctx::extent(self.grid.extent))?;
        ctx.stmts(f, &self.grid.body, 2)?;
        writeln!(f, "  }}")?;
        writeln!(f, "}}")
    }
}
