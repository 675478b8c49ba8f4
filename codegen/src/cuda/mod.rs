//! The CUDA backend: kernel IR → CUDA C (this file), compiled to a cubin by NVRTC
//! ([`nvrtc`]), loaded and launched through the CUDA driver ([`device`]). All three go
//! through cudarc, which loads `libnvrtc` and `libcuda` at run time, so nothing here needs
//! CUDA at build time, and a machine without it gets a typed error, never a panic.
//!
//! Rendering is one `match` per IR node writing text. A module is one translation unit:
//! the helpers of `pdgc.cuh` (NaN-propagating max/min, NaN and infinity constants), then one
//! `extern "C" __global__` function per kernel. Signature and launch arguments both come
//! from the kernel's `args` (one `float*` per argument, in order, then the batch), so the two
//! cannot drift.
//!
//! Launch model: when [`crate::analysis::launch::grid_independent`] proves the grid's iterations touch disjoint
//! elements, the grid and the perfectly nested loops directly inside it that are proved
//! independent too ([`parallel_nest`]) become one flat thread index (blocks of [`BLOCK`]
//! threads; the innermost of those loops varies fastest between neighbouring threads, so
//! unit-stride accesses along it coalesce). Inside that nest, loops that hold every access to
//! the stored buffers, all indexed by the loop variable at a fixed position, are sunk into
//! the thread index too ([`sunk_loops`]): a GEMM-shaped axpy nest becomes one thread per
//! output element that reduces in its own registers. Otherwise one thread runs the whole
//! grid loop in order, which is what the IR's sequential semantics asks for. Everything inside runs
//! sequentially in the thread, exactly in IR order; accumulators are registers. Where that
//! would leave a whole grid iteration to one thread (nothing nested in the grid joins the
//! thread index), a kernel whose grid iterations are independent is rendered
//! block-cooperative instead ([`block`]): one block per grid iteration, its threads sharing
//! each statement (tiled contractions, spread loop nests, tree reductions) with a barrier
//! after each. [`LaunchMode`] says which form a kernel got.
//!
//! Floating point: constants print so that they parse back to the same bits; `exp`, `log`,
//! `tanh`, `erf` are CUDA's `expf`, `logf`, `tanhf`, `erff` (within a few ulps of the
//! approximations the interpreter uses, `math::approx`, not bit-equal); NVRTC may contract
//! `a·b + c` into an FMA.
//! So CUDA results agree with the interpreter to rounding, as the CPU's vector code does.
//!
//! Integer indices are 64-bit (`long long`) unless the module is rendered for a largest
//! batch ([`render_module_for`], what sessions do) and [`index_bits`] proves every index
//! value of the kernel below 2^31 there; then they are `int`, and a launch at a larger batch
//! is refused. A product of extents is never formed in a narrower type than the indices.

pub mod block;
pub mod device;
pub mod host;
pub mod nvrtc;

use std::collections::HashSet;
use std::fmt::Write;

use crate::analysis::launch::{parallel_nest, sunk_loops, Sunk};
use crate::ir::{Affine, Arg, Binary, CmpOp, Cond, Expr, Extent, Kernel, Loop, Mode, Stmt, Unary, VarId};
use crate::verify::{verify, VerifyError};
use crate::visit::{walk_body, Visitor};

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("NVRTC is not available: {0}")]
    NvrtcMissing(String),
    #[error("no CUDA driver: {0}")]
    DriverMissing(String),
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    /// The generated CUDA C did not compile: always a bug in the renderer. Carries the log
    /// and the source it refers to.
    #[error(
        "NVRTC could not compile the generated module for {arch} ({status}):\n{log}\n--- generated source ---\n{}",
        nvrtc::numbered(code)
    )]
    Compile { arch: String, status: String, log: String, code: String },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("CUDA C on the host: {0}")]
    Host(String),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("kernel `{kernel}`: {expected} buffers expected, {got} given")]
    BufferCount { kernel: String, expected: usize, got: usize },
    #[error("kernel `{kernel}`: buffer `{arg}` has {got} elements, batch {batch} needs {expected}")]
    BufferLen { kernel: String, arg: String, batch: u64, expected: String, got: usize },
    /// A launch would need more threads than one CUDA grid holds ([`MAX_LAUNCH_THREADS`]).
    #[error(
        "kernel `{kernel}` at batch {batch} needs {threads} threads, more than the {} one CUDA launch holds: use a smaller batch",
        MAX_LAUNCH_THREADS
    )]
    TooManyThreads { kernel: String, batch: u64, threads: String },
    /// A launch of a kernel rendered with 32-bit indices at a batch above the one they were
    /// proved for.
    #[error("kernel `{kernel}` has 32-bit indices, proved for batches up to {max}; batch {batch} needs the module rendered for it")]
    BatchAboveIndexLimit { kernel: String, batch: u64, max: u64 },
}

/// The file names cudarc tries for a library, without repeats, for error messages.
fn candidates(lib: &str) -> String {
    let mut seen = Vec::new();
    for c in cudarc::get_lib_name_candidates(lib) {
        if !seen.contains(&c) {
            seen.push(c);
        }
    }
    seen.join(", ")
}

/// Threads per block for grid-parallel kernels.
pub const BLOCK: u32 = 128;

/// The most blocks one launch has: CUDA's limit on `gridDim.x`, 2^31 − 1.
pub const MAX_BLOCKS: u64 = i32::MAX as u64;

/// The most threads one launch has (`MAX_BLOCKS` blocks of [`BLOCK`]), about 2^38. A
/// grid-parallel kernel runs one thread per iteration of its parallel nest, and such a nest
/// writes a distinct element of a stored buffer in each iteration, so a buffer of at most
/// this many elements (at the launch's batch) always fits one launch; a launch that would
/// need more is a [`CudaError::TooManyThreads`], never a truncated grid.
pub const MAX_LAUNCH_THREADS: u64 = MAX_BLOCKS * BLOCK as u64;

/// The helpers every module starts with.
pub const HELPERS: &str = include_str!("pdgc.cuh");

/// How a kernel's iterations map onto GPU threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchMode {
    /// One thread runs the whole grid in order: its iterations are not proved independent.
    Serial,
    /// One thread per iteration of the parallel nest (and of the loops sunk into it).
    PerIteration,
    /// One block of [`BLOCK`] threads per grid iteration, its threads running each statement
    /// together ([`block`]): tiled contractions, spread loop nests.
    Block,
}

/// How a rendered kernel is launched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchInfo {
    /// The `extern "C"` symbol in the module.
    pub symbol: String,
    /// How its iterations map onto threads; [`Self::dims`] sizes the grid from it.
    pub mode: LaunchMode,
    /// The extents of the parallel nest, outermost (the grid) first; just the grid for the
    /// other modes.
    pub extents: Vec<Extent>,
    /// Argument count (buffers, private ones included); the batch follows them.
    pub args: usize,
    /// With 32-bit indices: the largest batch they were proved for ([`render_module_for`]).
    pub max_batch: Option<u64>,
}

impl LaunchInfo {
    /// The grid's extent: the outermost of [`Self::extents`].
    pub fn grid(&self) -> Extent {
        self.extents.first().copied().unwrap_or(Extent::Fixed(1))
    }
}

impl LaunchInfo {
    /// `(blocks, threads per block)` for a batch, or `None` when there is nothing to run;
    /// an error when the parallel nest has more iterations than one launch has threads. A
    /// block-cooperative kernel gets one block per grid iteration, at most [`MAX_BLOCKS`]
    /// (its blocks then take several iterations each).
    pub fn dims(&self, batch: u64) -> Result<Option<(u32, u32)>, CudaError> {
        if let Some(max) = self.max_batch.filter(|&m| batch > m) {
            return Err(CudaError::BatchAboveIndexLimit { kernel: self.symbol.clone(), batch, max });
        }
        let extent = self.extents.iter().try_fold(1u64, |n, e| n.checked_mul(e.resolve(batch)));
        let too_many = |threads: String| CudaError::TooManyThreads { kernel: self.symbol.clone(), batch, threads };
        match (extent, self.mode) {
            (Some(0), _) => Ok(None),
            (_, LaunchMode::Serial) => Ok(Some((1, 1))),
            (_, LaunchMode::Block) => {
                let blocks = self.grid().resolve(batch).min(MAX_BLOCKS);
                Ok(Some((u32::try_from(blocks).expect("MAX_BLOCKS fits u32"), BLOCK)))
            }
            (None, _) => Err(too_many("more than 2^64".into())),
            (Some(n), _) if n > MAX_LAUNCH_THREADS => Err(too_many(n.to_string())),
            (Some(n), _) => {
                let blocks = u32::try_from(n.div_ceil(BLOCK as u64)).map_err(|_| too_many(n.to_string()))?;
                Ok(Some((blocks, BLOCK)))
            }
        }
    }
}

/// A rendered module: the CUDA C of every kernel, and how to launch each.
#[derive(Debug, Clone)]
pub struct CudaModule {
    pub source: String,
    pub kernels: Vec<LaunchInfo>,
}

/// Checks a launch's buffer lengths (in the order of the bound arguments,
/// [`Kernel::bound`]) against the kernel's arguments at `batch`: what both the device and
/// the host launch must hold before running code that does not check its accesses.
fn check_lengths(kernel: &str, args: &[Arg], lens: &[usize], batch: u64) -> Result<(), CudaError> {
    let bound: Vec<&Arg> = args.iter().filter(|a| a.is_bound()).collect();
    if lens.len() != bound.len() {
        return Err(CudaError::BufferCount { kernel: kernel.to_string(), expected: bound.len(), got: lens.len() });
    }
    for (a, &got) in bound.iter().zip(lens) {
        if let Some(expected) = a.len_mismatch(batch, got) {
            return Err(CudaError::BufferLen { kernel: kernel.to_string(), arg: a.name.clone(), batch, expected, got });
        }
    }
    Ok(())
}

/// The elements of each private argument's memory at `batch` (one slice per grid
/// iteration, as [`Kernel::private_sliced`] renders it), in argument order; `grid` is the
/// kernel's grid extent.
fn private_lens(kernel: &str, args: &[Arg], grid: Extent, batch: u64) -> Result<Vec<usize>, CudaError> {
    args.iter()
        .filter(|a| !a.is_bound())
        .map(|a| {
            let len = a.checked_len(batch).and_then(|n| n.checked_mul(grid.resolve(batch)));
            len.and_then(|n| usize::try_from(n).ok()).ok_or_else(|| CudaError::BufferLen {
                kernel: kernel.to_string(),
                arg: a.name.clone(),
                batch,
                expected: "more than the address space".into(),
                got: 0,
            })
        })
        .collect()
}

/// The symbol of kernel `index`: unique in a module, a valid C identifier.
pub fn symbol(index: usize, k: &Kernel) -> String {
    format!("pdgc_k{index}_{}", sanitize(&k.name))
}

/// Verifies and renders `kernels` into one translation unit, with 64-bit indices: what runs
/// at any batch.
pub fn render_module(kernels: &[Kernel]) -> Result<CudaModule, VerifyError> {
    render_module_for(kernels, None)
}

/// [`render_module`] for launches of at most `max_batch` examples (a module's compiled
/// batch): a kernel whose every index, loop bound, buffer length and thread count provably
/// stays below 2^31 at that batch ([`index_bits`]) gets 32-bit `int` indices, which GPUs
/// compute natively (64-bit multiplies take several instructions), and its launches refuse
/// a larger batch ([`CudaError::BatchAboveIndexLimit`]).
pub fn render_module_for(kernels: &[Kernel], max_batch: Option<u64>) -> Result<CudaModule, VerifyError> {
    let mut source = String::new();
    source.push_str("// Generated by pdgc from the kernel IR. Do not edit.\n");
    source.push_str(HELPERS);
    let mut infos = Vec::with_capacity(kernels.len());
    for (i, k) in kernels.iter().enumerate() {
        verify(k)?;
        let sym = symbol(i, k);
        let (code, mode, extents, bits) = render_one(k, &sym, max_batch);
        source.push('\n');
        source.push_str(&code);
        let max_batch = if bits == 32 { max_batch } else { None };
        infos.push(LaunchInfo { symbol: sym, mode, extents, args: k.args.len(), max_batch });
    }
    Ok(CudaModule { source, kernels: infos })
}

/// The CUDA C of one kernel as a `__global__` function named `symbol` (no helpers; see
/// [`render_module`]). Assumes a verified kernel.
pub fn render_kernel(k: &Kernel, symbol: &str) -> String {
    render_one(k, symbol, None).0
}

/// One kernel's function, launch mode and launch extents. Private arguments become one
/// slice per grid iteration, which the launch allocates. Where the one-thread-per-iteration
/// form would leave a grid iteration's work to one thread (no loop nested in the grid, no
/// sunk loops), the block-cooperative form ([`block`]) renders it if it applies; otherwise
/// a contraction renders as the loop nest that defines it.
fn render_one(k: &Kernel, symbol: &str, max_batch: Option<u64>) -> (String, LaunchMode, Vec<Extent>, u32) {
    let sliced = k.private_sliced();
    let desugared = sliced.desugared();
    let threads = Threads::of(&desugared);
    let bits = |extents: &[Extent]| max_batch.map_or(64, |b| index_bits(&desugared, extents, b));
    if threads.nest.len() <= 1 && threads.sunk.is_none() {
        if let Some(plan) = block::plan(&sliced) {
            let extents = vec![sliced.grid.extent];
            let bits = bits(&extents);
            let r = Renderer::new(&sliced, plan.sunk.clone(), bits);
            let mut out = header(&r, symbol, BLOCK);
            r.block_body(&mut out, &plan);
            out.push_str("}\n");
            return (out, LaunchMode::Block, extents, bits);
        }
    }
    let (mode, extents) = match threads.nest.is_empty() {
        true => (LaunchMode::Serial, vec![desugared.grid.extent]),
        false => (
            LaunchMode::PerIteration,
            threads.nest.iter().map(|l| l.extent).chain(threads.sunk.as_ref().map(|s| s.extent)).collect(),
        ),
    };
    let bits = bits(&extents);
    (render_with(&desugared, symbol, &threads, bits), mode, extents, bits)
}

/// The most any index, loop bound, buffer length or thread count of a kernel rendered with
/// 32-bit indices may reach, below 2^31 by a margin for the tiles' overhang.
const INDEX_LIMIT_32: u128 = (1 << 31) - (1 << 16);

/// 32 when every value the rendered indices take in `k` (desugared, private arguments
/// sliced) at batch `batch` stays below [`INDEX_LIMIT_32`], else 64: each buffer's length,
/// each loop's extent, twice the threads of the launch (`threads`, the extents of its
/// thread dims) and twice the iterations of every nest below the grid (flattened indices
/// stride past their end by up to a block or a grid), and for every access, guard and index
/// expression the sum of the absolute values of its terms at their variables' largest
/// values (which bounds every partial sum the generated arithmetic forms, whatever the
/// signs).
pub fn index_bits(k: &Kernel, threads: &[Extent], batch: u64) -> u32 {
    struct Bound<'a> {
        k: &'a Kernel,
        batch: u64,
        max: Vec<u128>,
        /// Iterations of the loops enclosing the current one, below the grid.
        nested: Vec<u128>,
        ok: bool,
    }
    impl Bound<'_> {
        fn affine(&self, a: &Affine) -> u128 {
            a.terms.iter().fold(u128::from(a.offset.unsigned_abs()), |sum, t| {
                let v = self.max.get(t.var.0 as usize).copied().unwrap_or(u128::MAX / 4);
                let div = u128::from(t.div.unsigned_abs().max(1));
                sum.saturating_add(u128::from(t.coef.unsigned_abs()).saturating_mul(v).div_ceil(div))
            })
        }
        fn check(&mut self, value: u128) {
            self.ok &= value <= INDEX_LIMIT_32;
        }
    }
    impl<'a> Visitor<'a> for Bound<'_> {
        fn enter_loop(&mut self, l: &'a Loop) {
            let n = u128::from(l.extent.resolve(self.batch));
            self.check(n);
            self.max[l.var.0 as usize] = n.saturating_sub(1);
            // A nest below the grid may run as one flattened index that strides past its
            // end by a block (spread loops, reductions): twice its iterations must fit.
            let product = self.nested.last().map_or(1, |p| p.saturating_mul(n));
            self.check(product.saturating_mul(2));
            self.nested.push(product);
        }
        fn exit_loop(&mut self, _: &'a Loop) {
            self.nested.pop();
        }
        fn access(&mut self, arg: crate::ir::ArgId, index: &'a [Affine], _: bool) {
            let strides = self.k.args[arg.0 as usize].strides();
            let flat = index
                .iter()
                .zip(&strides)
                .fold(0u128, |sum, (a, &st)| sum.saturating_add(self.affine(a).saturating_mul(u128::from(st))));
            self.check(flat);
        }
        fn expr(&mut self, e: &'a Expr) {
            if let Expr::Index(a) = e {
                let b = self.affine(a);
                self.check(b);
            }
            crate::visit::walk_expr(self, e);
        }
        fn cond(&mut self, c: &'a Cond) {
            if let Cond::InRange { index, lo, hi } = c {
                let b = self.affine(index);
                self.check(b);
                self.check(u128::from(lo.unsigned_abs()));
                self.check(u128::from(hi.unsigned_abs()));
            }
            crate::visit::walk_cond(self, c);
        }
    }
    let mut b = Bound { k, batch, max: vec![u128::MAX / 4; k.vars.len()], nested: Vec::new(), ok: true };
    for a in &k.args {
        b.check(a.checked_len(batch).map_or(u128::MAX, u128::from));
    }
    // The launch's threads; a block-cooperative grid loop strides past its end by up to the
    // grid's own extent.
    let total = threads.iter().fold(1u128, |n, e| n.saturating_mul(u128::from(e.resolve(batch))));
    b.check(total.saturating_mul(2));
    let grid = u128::from(k.grid.extent.resolve(batch));
    b.check(grid);
    b.max[k.grid.var.0 as usize] = grid.saturating_sub(1);
    walk_body(&mut b, &k.grid.body);
    if b.ok {
        32
    } else {
        64
    }
}

/// How a kernel's iterations map onto GPU threads: the parallel nest ([`parallel_nest`];
/// empty: one thread runs the grid) and the loops sunk into it ([`sunk_loops`]).
struct Threads<'k> {
    nest: Vec<&'k Loop>,
    sunk: Option<Sunk>,
}

impl<'k> Threads<'k> {
    fn of(k: &'k Kernel) -> Threads<'k> {
        let nest = parallel_nest(k);
        let sunk = nest.last().and_then(|inner| sunk_loops(k, &inner.body));
        Threads { nest, sunk }
    }
}

/// The IR as a comment, then the function's signature and opening brace.
fn header(r: &Renderer<'_>, symbol: &str, bounds: u32) -> String {
    let k = r.k;
    let mut out = String::new();
    // The IR text as a comment: what this function computes, in the notation of the
    // kernel snapshots.
    for line in k.to_string().lines() {
        let _ = writeln!(out, "// {line}");
    }
    let params: Vec<String> = k
        .args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let constness = if a.mode == Mode::In { "const " } else { "" };
            format!("{constness}float* __restrict__ {}", r.args[i])
        })
        .chain(std::iter::once("const unsigned long long batch".to_string()))
        .collect();
    let _ = writeln!(out, "extern \"C\" __global__ void __launch_bounds__({bounds}) {symbol}(");
    let _ = writeln!(out, "    {}) {{", params.join(",\n    "));
    let _ = writeln!(out, "  (void)batch;");
    out
}

fn render_with(k: &Kernel, symbol: &str, threads: &Threads<'_>, bits: u32) -> String {
    let Threads { nest, sunk } = threads;
    let r = Renderer::new(k, sunk.as_ref().map(|s| s.vars.clone()).unwrap_or_default(), bits);
    let bounds = if nest.is_empty() { 1 } else { BLOCK };
    let mut out = header(&r, symbol, bounds);
    match nest.as_slice() {
        [] => {
            let g = r.var(k.grid.var);
            let extent = r.extent(k.grid.extent);
            let _ =
                writeln!(out, "  // The grid's iterations are not proved independent: one thread runs them in order.");
            let _ = writeln!(out, "  if (blockIdx.x != 0 || threadIdx.x != 0) return;");
            let _ = writeln!(out, "  for ({} {g} = 0; {g} < {extent}; ++{g}) {{", r.it);
            r.locals(&mut out, 2);
            r.stmts(&mut out, &k.grid.body, 2);
            let _ = writeln!(out, "  }}");
        }
        [grid] if sunk.is_none() => {
            let g = r.var(grid.var);
            let it = r.it;
            let _ = writeln!(out, "  const {it} {g} = ({it})blockIdx.x * blockDim.x + threadIdx.x;");
            let _ = writeln!(out, "  if ({g} >= {}) return;", r.extent(grid.extent));
            r.locals(&mut out, 1);
            r.stmts(&mut out, &grid.body, 1);
        }
        [.., inner] => {
            // Thread dimensions, outermost first: the nest's loops, then the sunk loops.
            let mut dims: Vec<(String, Extent)> = nest.iter().map(|l| (r.var(l.var).to_string(), l.extent)).collect();
            if let Some(sunk) = &sunk {
                let _ = writeln!(
                    out,
                    "  // Sunk into the thread index (pdgc_t): the loops over {}.",
                    sunk.vars.iter().map(|v| r.var(*v)).collect::<Vec<_>>().join(", ")
                );
                dims.push(("pdgc_t".to_string(), sunk.extent));
            }
            let it = r.it;
            let _ = writeln!(out, "  const {it} pdgc_tid = ({it})blockIdx.x * blockDim.x + threadIdx.x;");
            let _ = writeln!(out, "  if (pdgc_tid >= {}) return;", r.product(&dims));
            r.decompose(&mut out, &dims, "pdgc_tid", 1);
            r.locals(&mut out, 1);
            r.stmts(&mut out, &inner.body, 1);
        }
    }
    out.push_str("}\n");
    out
}

/// A C identifier from any text: other characters become `_`.
fn sanitize(name: &str) -> String {
    let mut s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

/// C and CUDA words a variable must not be named.
const RESERVED: &[&str] = &[
    "auto",
    "batch",
    "blockDim",
    "blockIdx",
    "break",
    "case",
    "char",
    "const",
    "continue",
    "default",
    "do",
    "double",
    "else",
    "enum",
    "extern",
    "float",
    "for",
    "goto",
    "gridDim",
    "if",
    "int",
    "long",
    "register",
    "return",
    "short",
    "signed",
    "sizeof",
    "static",
    "struct",
    "switch",
    "threadIdx",
    "typedef",
    "union",
    "unsigned",
    "void",
    "volatile",
    "while",
    "warpSize",
    "bool",
    "true",
    "false",
    "new",
    "delete",
    "this",
    "class",
    "template",
    "namespace",
    "operator",
    "private",
    "public",
    "protected",
    "virtual",
    "inline",
];

struct Renderer<'k> {
    k: &'k Kernel,
    vars: Vec<String>,
    accs: Vec<String>,
    args: Vec<String>,
    /// Loops sunk into the thread index: rendered as their one iteration `pdgc_t`.
    sunk: Vec<VarId>,
    /// The C type of indices and loop counters (`long long`, or `int` where
    /// [`index_bits`] proves 32 bits enough), and the suffix of its literals.
    it: &'static str,
    ll: &'static str,
}

impl<'k> Renderer<'k> {
    /// Gives every variable, accumulator and argument a distinct C name, as close to its
    /// IR name as possible.
    fn new(k: &'k Kernel, sunk: Vec<VarId>, bits: u32) -> Renderer<'k> {
        let mut taken: HashSet<String> = RESERVED.iter().map(|s| s.to_string()).collect();
        let mut name = |base: String, prefix: &str, id: usize| {
            let mut n = base;
            if n.starts_with("pdgc_") || taken.contains(&n) {
                n = format!("{prefix}{id}_{n}");
            }
            taken.insert(n.clone());
            n
        };
        let args = k.args.iter().enumerate().map(|(i, a)| name(sanitize(&a.name), "a", i)).collect();
        let vars = k.vars.iter().enumerate().map(|(i, v)| name(sanitize(v), "v", i)).collect();
        let accs = k.accs.iter().enumerate().map(|(i, a)| name(sanitize(a), "s", i)).collect();
        let (it, ll) = if bits == 32 { ("int", "") } else { ("long long", "LL") };
        Renderer { k, vars, accs, args, sunk, it, ll }
    }

    fn var(&self, v: VarId) -> &str {
        &self.vars[v.0 as usize]
    }

    fn extent(&self, e: Extent) -> String {
        match e {
            Extent::Batch => format!("({})batch", self.it),
            Extent::Fixed(n) => n.to_string(),
        }
    }

    /// Declares the accumulators (zero) at the top of a grid iteration.
    fn locals(&self, out: &mut String, depth: usize) {
        if !self.accs.is_empty() {
            let decls: Vec<String> = self.accs.iter().map(|a| format!("{a} = 0.0f")).collect();
            let _ = writeln!(out, "{}float {};", pad(depth), decls.join(", "));
        }
    }

    fn affine(&self, a: &Affine) -> String {
        let ll = self.ll;
        let mut s = String::new();
        for t in &a.terms {
            let v = self.var(t.var);
            let base = if t.div == 1 { v.to_string() } else { format!("({v} / {}{ll})", t.div) };
            let term = match t.coef {
                1 => base,
                c => format!("{c}{ll} * {base}"),
            };
            if !s.is_empty() {
                s.push_str(" + ");
            }
            s.push_str(&term);
        }
        if a.offset != 0 || s.is_empty() {
            if s.is_empty() {
                s = format!("{}{ll}", a.offset);
            } else if a.offset > 0 {
                let _ = write!(s, " + {}{ll}", a.offset);
            } else {
                let _ = write!(s, " - {}{ll}", a.offset.unsigned_abs());
            }
        }
        s
    }

    /// `name[flat index]`, row-major with the argument's constant strides.
    fn access(&self, arg: crate::ir::ArgId, index: &[Affine]) -> String {
        let a = &self.k.args[arg.0 as usize];
        let strides = a.strides();
        let parts: Vec<String> = index
            .iter()
            .zip(&strides)
            .map(|(ix, &st)| {
                let e = self.affine(ix);
                if st == 1 {
                    e
                } else if ix.terms.len() + usize::from(ix.offset != 0) > 1 {
                    format!("({e}) * {st}{}", self.ll)
                } else {
                    format!("{e} * {st}{}", self.ll)
                }
            })
            .collect();
        let flat = if parts.is_empty() { "0".to_string() } else { parts.join(" + ") };
        format!("{}[{flat}]", self.args[arg.0 as usize])
    }

    fn expr(&self, e: &Expr) -> String {
        match e {
            Expr::Const(c) => float_literal(*c),
            Expr::Load { arg, index } => self.access(*arg, index),
            Expr::Acc(a) => self.accs[a.0 as usize].clone(),
            Expr::Index(a) => format!("(float)({})", self.affine(a)),
            Expr::Unary(op, a) => {
                let x = self.expr(a);
                match op {
                    Unary::Neg => format!("(-({x}))"),
                    Unary::Exp => format!("expf({x})"),
                    Unary::Log => format!("logf({x})"),
                    Unary::Tanh => format!("tanhf({x})"),
                    Unary::Sqrt => format!("sqrtf({x})"),
                    Unary::Erf => format!("erff({x})"),
                    Unary::Abs => format!("fabsf({x})"),
                }
            }
            Expr::Binary(op, a, b) => {
                let (x, y) = (self.expr(a), self.expr(b));
                match op {
                    Binary::Add => format!("({x} + {y})"),
                    Binary::Sub => format!("({x} - {y})"),
                    Binary::Mul => format!("({x} * {y})"),
                    Binary::Div => format!("({x} / {y})"),
                    Binary::Max => format!("pdgc_max({x}, {y})"),
                    Binary::Min => format!("pdgc_min({x}, {y})"),
                }
            }
            Expr::Select { cond, then, otherwise } => {
                format!("({} ? {} : {})", self.cond(cond), self.expr(then), self.expr(otherwise))
            }
        }
    }

    fn cond(&self, c: &Cond) -> String {
        match c {
            Cond::InRange { index, lo, hi } => {
                let i = self.affine(index);
                let ll = self.ll;
                format!("({lo}{ll} <= {i} && {i} < {hi}{ll})")
            }
            Cond::Cmp { op, a, b } => {
                let sym = match op {
                    CmpOp::Lt => "<",
                    CmpOp::Le => "<=",
                    CmpOp::Eq => "==",
                    CmpOp::Ne => "!=",
                    CmpOp::Gt => ">",
                    CmpOp::Ge => ">=",
                };
                format!("({} {sym} {})", self.expr(a), self.expr(b))
            }
            Cond::And(cs) if cs.is_empty() => "true".into(),
            Cond::And(cs) => format!("({})", cs.iter().map(|c| self.cond(c)).collect::<Vec<_>>().join(" && ")),
        }
    }

    fn stmts(&self, out: &mut String, body: &[Stmt], depth: usize) {
        let p = pad(depth);
        for s in body {
            match s {
                Stmt::Loop(l) if self.sunk.contains(&l.var) => {
                    let _ = writeln!(out, "{p}{{");
                    let _ = writeln!(out, "{p}  const {} {} = pdgc_t;", self.it, self.var(l.var));
                    self.stmts(out, &l.body, depth + 1);
                    let _ = writeln!(out, "{p}}}");
                }
                Stmt::Loop(l) => {
                    let v = self.var(l.var);
                    let it = self.it;
                    let _ = writeln!(out, "{p}for ({it} {v} = 0; {v} < {}; ++{v}) {{", self.extent(l.extent));
                    self.stmts(out, &l.body, depth + 1);
                    let _ = writeln!(out, "{p}}}");
                }
                Stmt::Set { acc, value } => {
                    let _ = writeln!(out, "{p}{} = {};", self.accs[acc.0 as usize], self.expr(value));
                }
                Stmt::Store { arg, index, value, accumulate } => {
                    let op = if *accumulate { "+=" } else { "=" };
                    let _ = writeln!(out, "{p}{} {op} {};", self.access(*arg, index), self.expr(value));
                }
                Stmt::If { cond, then } => {
                    let _ = writeln!(out, "{p}if {} {{", self.cond(cond));
                    self.stmts(out, then, depth + 1);
                    let _ = writeln!(out, "{p}}}");
                }
                // Block-cooperative kernels render their contractions as units of their own
                // (`block`); the others are rendered desugared, a contraction as its loop nest.
                Stmt::Contract(_) => {
                    let _ = writeln!(out, "{p}#error \"contraction not desugared\"");
                }
            }
        }
    }
}

fn pad(depth: usize) -> String {
    "  ".repeat(depth)
}

/// An f32 as C text that parses back to the same bits.
pub fn float_literal(c: f32) -> String {
    if c.is_nan() {
        "PDGC_NAN".into()
    } else if c.is_infinite() {
        if c > 0.0 {
            "PDGC_INF".into()
        } else {
            "(-PDGC_INF)".into()
        }
    } else {
        // The printer's shortest decimal that rounds back to `c`; C's parser rounds
        // correctly, so the literal is exact.
        format!("{}f", crate::ir::format_f32(c))
    }
}
