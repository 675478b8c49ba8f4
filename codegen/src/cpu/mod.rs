//! The Cranelift CPU backend: kernels become native functions in one JIT module.
//!
//! A compiled kernel is `fn(bufs: *const *mut f32, batch: u64, lo: u64, hi: u64)` (see
//! [`crate::ir`]): it runs grid iterations `lo..hi`. Its loads and stores are unchecked,
//! which is sound because [`CpuBackend::compile`] refuses any kernel that
//! [`crate::verify`] rejects (the verifier proves every access in bounds) and
//! [`CompiledKernel::run`] checks every buffer's length before a call.
//!
//! Code map: this file owns the JIT module, the compiled-kernel handle and the safe
//! entry points; `translate` turns one kernel into a Cranelift function (scalar code,
//! the reference path); `vector` is the F32X4 path for `LoopKind::Vector` loops it can
//! prove lane-independent, falling back to scalar code for everything else; `vmath` emits
//! `exp`, `log`, `tanh` and `erf` on lanes, and `vmap` maps one of them over a contiguous
//! run (a vector loop that does only that) at the host's widest vectors; `gemm` runs
//! contractions ([`crate::ir::Contract`]) on the `gemm` crate's tuned micro-kernels.
//!
//! Floating point: scalar code computes exactly what [`crate::interp`] computes (same
//! operations, same order, the same functions for `exp`, `log`, `tanh`, `erf`, called as
//! JIT symbols). Vector code computes those four functions lane by lane with the very
//! operation sequence of the scalar functions (`crate::math::approx`), and so does `vmap`
//! (the same sequence, compiled without reassociation or fused multiply-adds), so they
//! agree bit for bit too. Vector code reassociates reductions (four lanes, several
//! vector accumulators) and, where the host has FMA (x86: AVX and FMA; always on aarch64),
//! fuses `acc + a·b` into one `fma`, so it agrees with the interpreter to rounding, not
//! to the bit. `Max`/`Min` are Cranelift's NaN-propagating `fmax`/`fmin`, the semantics
//! [`crate::ir::Binary`] defines.

mod gemm;
mod pool;
mod translate;
mod vector;
mod vmap;
mod vmath;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::{types, AbiParam, Signature};
use cranelift_codegen::isa::{CallConv, TargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::CodegenError;
use cranelift_codegen::Context;
use cranelift_frontend::FunctionBuilderContext;
use cranelift_jit::{JITBuilder, JITModule};

use crate::buffer::{AlignedBuf, ALIGN_FLOATS};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module, ModuleError};
use thiserror::Error;

use crate::analysis::launch::grid_independent;
use crate::ir::{Arg, Extent, Kernel, Mode, Unary};
use crate::math;
use crate::verify::{verify, VerifyError};

#[derive(Debug, Error)]
pub enum CpuError {
    #[error("this host is not supported by Cranelift: {0}")]
    UnsupportedHost(String),
    #[error("setting up Cranelift failed: {0}")]
    Setup(String),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Cranelift rejected a function we generated: always a bug in this backend.
    #[error("kernel `{kernel}`: Cranelift failed (a bug in the CPU backend): {message}")]
    Codegen { kernel: String, message: String },
    #[error("kernel `{kernel}`: {expected} buffers expected, {got} given")]
    BufferCount { kernel: String, expected: usize, got: usize },
    #[error("kernel `{kernel}`: buffer `{arg}` has {got} elements, batch {batch} needs {expected}")]
    BufferLen { kernel: String, arg: String, batch: u64, expected: String, got: usize },
    #[error("kernel `{kernel}`: grid range {lo}..{hi} is not within 0..{extent}")]
    GridRange { kernel: String, lo: u64, hi: u64, extent: u64 },
    #[error("kernel `{kernel}`: a worker thread failed")]
    Thread { kernel: String },
}

/// What the backend emits. The defaults use everything the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuOptions {
    /// Use F32X4 code for the `LoopKind::Vector` loops that allow it.
    pub vectorize: bool,
    /// Fuse multiply-adds in vector code, where the host has FMA. Turning it off makes the
    /// generated code the same on every x86-64 host (what CLIF snapshots want).
    pub fma: bool,
}

impl Default for CpuOptions {
    fn default() -> CpuOptions {
        CpuOptions { vectorize: true, fma: true }
    }
}

/// One worker thread's memory for private arguments, and the argument addresses of its
/// last call (reused so that a call allocates nothing once the thread has run a kernel).
#[derive(Default)]
struct Private {
    memory: AlignedBuf,
    ptrs: Vec<*mut f32>,
}

thread_local! {
    /// This thread's memory for the private arguments of the kernels it runs
    /// ([`Mode::Private`]): every grid iteration a thread runs reuses it, so it stays in
    /// the core's cache. Grown to the largest need seen, never shrunk.
    static PRIVATE: std::cell::RefCell<Private> =
        const { std::cell::RefCell::new(Private { memory: AlignedBuf::new(), ptrs: Vec::new() }) };
}

/// The elements a private argument takes in [`PRIVATE`]: its size rounded up to a 64-byte
/// cache line, so that two arguments never share one and each starts on one (the memory
/// is an [`AlignedBuf`]).
fn private_slot(a: &Arg) -> usize {
    (a.len(0) as usize).next_multiple_of(ALIGN_FLOATS)
}

/// The entry point of a compiled kernel (see [`crate::ir`]).
pub type KernelFn = unsafe extern "C" fn(bufs: *const *mut f32, batch: u64, lo: u64, hi: u64);

/// The JIT module. It frees its code when the last handle goes: the backend and every
/// [`CompiledKernel`] hold an `Arc` of it, so no function pointer outlives its code.
struct Jit(Mutex<Option<JITModule>>);

/// Numbers the JIT functions of the process, so that their names never collide.
static NEXT_FUNCTION: AtomicUsize = AtomicUsize::new(0);

impl Drop for Jit {
    fn drop(&mut self) {
        let module = match self.0.get_mut() {
            Ok(m) => m.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(module) = module {
            // SAFETY: this is the last handle, so no compiled kernel that could call into
            // this memory exists any more.
            unsafe { module.free_memory() };
        }
    }
}

/// The functions that are calls rather than instructions, in the order of
/// [`MATH_SYMBOLS`]: an op's position here is its slot there and its code for
/// `vmap::pdgc_vmap`.
const MATH_OPS: [Unary; 4] = [Unary::Exp, Unary::Log, Unary::Tanh, Unary::Erf];

/// `op`'s slot in [`MATH_OPS`], if it is one of those functions.
fn math_slot(op: Unary) -> Option<usize> {
    MATH_OPS.iter().position(|o| *o == op)
}

/// The scalar math functions compiled code calls, as `(symbol, address)`.
const MATH_SYMBOLS: [(&str, extern "C" fn(f32) -> f32); 4] = [
    ("pdgc_expf", math::pdgc_expf),
    ("pdgc_logf", math::pdgc_logf),
    ("pdgc_tanhf", math::pdgc_tanhf),
    ("pdgc_erff", math::pdgc_erff),
];

pub struct CpuBackend {
    jit: Arc<Jit>,
    cfg: translate::Config,
    host_fma: bool,
    options: CpuOptions,
}

impl CpuBackend {
    /// A backend for the host, with [`CpuOptions::default`].
    pub fn new() -> Result<CpuBackend, CpuError> {
        CpuBackend::with_options(CpuOptions::default())
    }

    pub fn with_options(options: CpuOptions) -> Result<CpuBackend, CpuError> {
        let mut flags = settings::builder();
        for (name, value) in [("opt_level", "speed"), ("is_pic", "false"), ("use_colocated_libcalls", "false")] {
            flags.set(name, value).map_err(|e| CpuError::Setup(format!("flag {name}={value}: {e}")))?;
        }
        let isa_builder = cranelift_native::builder().map_err(|m| CpuError::UnsupportedHost(m.to_string()))?;
        let isa = isa_builder.finish(settings::Flags::new(flags)).map_err(|e| CpuError::Setup(e.to_string()))?;
        if isa.pointer_type() != types::I64 {
            return Err(CpuError::UnsupportedHost(format!("{}-bit pointers", isa.pointer_bits())));
        }
        let host_fma = host_has_fma(&*isa);
        let call_conv = isa.default_call_conv();
        let frontend = isa.frontend_config();
        let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
        for (name, f) in MATH_SYMBOLS {
            builder.symbol(name, f as *const u8);
        }
        builder.symbol("pdgc_sgemm", gemm::pdgc_sgemm as *const u8);
        builder.symbol("pdgc_vmap", vmap::pdgc_vmap as *const u8);
        let mut module = JITModule::new(builder);
        let mut math = [FuncId::from_u32(0); MATH_SYMBOLS.len()];
        for (id, (name, _)) in math.iter_mut().zip(MATH_SYMBOLS) {
            *id = module
                .declare_function(name, Linkage::Import, &math_signature(call_conv))
                .map_err(|e| CpuError::Setup(format!("declaring {name}: {e}")))?;
        }
        let gemm = module
            .declare_function("pdgc_sgemm", Linkage::Import, &gemm_signature(call_conv))
            .map_err(|e| CpuError::Setup(format!("declaring pdgc_sgemm: {e}")))?;
        let vmap = module
            .declare_function("pdgc_vmap", Linkage::Import, &vmap_signature(call_conv))
            .map_err(|e| CpuError::Setup(format!("declaring pdgc_vmap: {e}")))?;
        let cfg = translate::Config {
            call_conv,
            frontend,
            fma: options.fma && host_fma,
            vectorize: options.vectorize,
            math,
            gemm,
            vmap,
        };
        Ok(CpuBackend { jit: Arc::new(Jit(Mutex::new(Some(module)))), cfg, host_fma, options })
    }

    /// Whether the host has fused multiply-add (x86-64: AVX and FMA; aarch64: always).
    pub fn host_has_fma(&self) -> bool {
        self.host_fma
    }

    /// The options asked for; `fma` is in effect only where [`Self::host_has_fma`].
    pub fn options(&self) -> CpuOptions {
        self.options
    }

    /// Verifies, translates and links `kernels`; nothing is compiled if one fails to
    /// verify.
    pub fn compile(&mut self, kernels: &[Kernel]) -> Result<Vec<CompiledKernel>, CpuError> {
        for k in kernels {
            verify(k)?;
        }
        let mut guard = self.jit.0.lock().map_err(|_| CpuError::Setup("the JIT module lock is poisoned".into()))?;
        let module = guard.as_mut().ok_or_else(|| CpuError::Setup("the JIT module is gone".into()))?;
        let mut fctx = FunctionBuilderContext::new();
        let mut ctx = module.make_context();
        let mut ids: Vec<FuncId> = Vec::with_capacity(kernels.len());
        for k in kernels {
            ctx.func = translate::function(k, &self.cfg, &mut fctx)?;
            // Named (uniquely: the module outlives many compiles) so that `perf record`,
            // which makes Cranelift write `/tmp/perf-<pid>.map`, names each kernel's code.
            let name = format!("pdgc:{}#{}", k.name, NEXT_FUNCTION.fetch_add(1, Ordering::Relaxed));
            let id = module
                .declare_function(&name, Linkage::Local, &ctx.func.signature)
                .map_err(|e| module_error(k, &ctx, e))?;
            module.define_function(id, &mut ctx).map_err(|e| module_error(k, &ctx, e))?;
            module.clear_context(&mut ctx);
            ids.push(id);
        }
        module.finalize_definitions().map_err(|e| CpuError::Codegen {
            kernel: kernels.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(", "),
            message: e.to_string(),
        })?;
        let compiled = kernels
            .iter()
            .zip(ids)
            .map(|(k, id)| {
                let code = module.get_finalized_function(id);
                // SAFETY: `code` is the finalized code of a function with the signature
                // `translate::function` gives every kernel, which is `KernelFn`'s ABI.
                let entry = unsafe { std::mem::transmute::<*const u8, KernelFn>(code) };
                CompiledKernel {
                    name: k.name.clone(),
                    args: k.args.clone(),
                    grid: k.grid.extent,
                    parallel: grid_independent(k),
                    private_len: k.args.iter().filter(|a| !a.is_bound()).map(private_slot).sum(),
                    entry,
                    _jit: Arc::clone(&self.jit),
                }
            })
            .collect();
        Ok(compiled)
    }

    /// The Cranelift IR of a kernel's function as [`Self::compile`] hands it to Cranelift
    /// (before optimization). Deterministic: it depends on the kernel, the options in
    /// effect and the host's calling convention only.
    pub fn clif_text(&self, k: &Kernel) -> Result<String, CpuError> {
        verify(k)?;
        let mut fctx = FunctionBuilderContext::new();
        let func = translate::function(k, &self.cfg, &mut fctx)?;
        Ok(func.display().to_string())
    }
}

impl CpuBackend {
    /// The machine code of a kernel's function as Cranelift's disassembly text, for
    /// reading what the inner loops became. Compiled on the side: nothing is linked.
    pub fn disassembly(&self, k: &Kernel) -> Result<String, CpuError> {
        verify(k)?;
        let mut fctx = FunctionBuilderContext::new();
        let mut ctx = Context::for_function(translate::function(k, &self.cfg, &mut fctx)?);
        ctx.set_disasm(true);
        let guard = self.jit.0.lock().map_err(|_| CpuError::Setup("the JIT module lock is poisoned".into()))?;
        let module = guard.as_ref().ok_or_else(|| CpuError::Setup("the JIT module is gone".into()))?;
        let code = ctx.compile(module.isa(), &mut ControlPlane::default()).map_err(|e| CpuError::Codegen {
            kernel: k.name.clone(),
            message: cranelift_codegen::print_errors::pretty_error(e.func, e.inner),
        })?;
        Ok(code.vcode.clone().unwrap_or_default())
    }
}

fn math_signature(call_conv: CallConv) -> Signature {
    let mut sig = Signature::new(call_conv);
    sig.params.push(AbiParam::new(types::F32));
    sig.returns.push(AbiParam::new(types::F32));
    sig
}

/// `pdgc_sgemm(m, n, k, c, c_rs, c_cs, a, a_rs, a_cs, b, b_rs, b_cs, accumulate)`: all i64.
fn gemm_signature(call_conv: CallConv) -> Signature {
    let mut sig = Signature::new(call_conv);
    sig.params.extend([AbiParam::new(types::I64); 13]);
    sig
}

/// `pdgc_vmap(op, x, y, len)`: all i64.
fn vmap_signature(call_conv: CallConv) -> Signature {
    let mut sig = Signature::new(call_conv);
    sig.params.extend([AbiParam::new(types::I64); 4]);
    sig
}

fn host_has_fma(isa: &dyn TargetIsa) -> bool {
    let flags = isa.isa_flags();
    let on = |name: &str| flags.iter().any(|v| v.name == name && v.as_bool() == Some(true));
    match isa.name() {
        "x64" => on("has_avx") && on("has_fma"),
        "aarch64" => true,
        _ => false,
    }
}

fn module_error(k: &Kernel, ctx: &Context, e: ModuleError) -> CpuError {
    let message = match e {
        ModuleError::Compilation(err @ CodegenError::Verifier(_)) => {
            cranelift_codegen::print_errors::pretty_error(&ctx.func, err)
        }
        other => other.to_string(),
    };
    CpuError::Codegen { kernel: k.name.clone(), message }
}

/// A kernel ready to run. Cheap to clone, `Send` and `Sync`; it keeps its JIT module
/// alive.
#[derive(Clone)]
pub struct CompiledKernel {
    name: String,
    args: Vec<Arg>,
    grid: Extent,
    /// Whether [`grid_independent`] holds, so that `run_parallel` may split the grid.
    parallel: bool,
    /// Elements of private memory a call needs (the [`private_slot`]s of its private
    /// arguments).
    private_len: usize,
    entry: KernelFn,
    _jit: Arc<Jit>,
}

impl std::fmt::Debug for CompiledKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledKernel").field("name", &self.name).field("args", &self.args).finish()
    }
}

/// Buffer pointers handed to worker threads.
struct SendPtrs(Vec<*mut f32>);

// SAFETY: the pointers come from `&mut [f32]` slices that the caller of `run_parallel`
// lends until the pool scope ends (it waits for every job it spawned, even when one
// panics), and each job runs a disjoint range of grid iterations. `run_parallel` splits
// only kernels for which `grid_independent` holds: every stored buffer is touched by
// iteration `g` only at elements whose coordinate in one fixed dim is `g`, so no element
// is written by one thread and read or written by another; buffers that are only read may
// be shared freely.
unsafe impl Send for SendPtrs {}
unsafe impl Sync for SendPtrs {}

impl CompiledKernel {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn args(&self) -> &[Arg] {
        &self.args
    }

    /// Whether [`Self::run_parallel`] splits this kernel's grid over threads (see
    /// [`crate::analysis::launch::grid_independent`]); otherwise it runs it on the calling thread.
    pub fn is_parallel(&self) -> bool {
        self.parallel
    }

    /// Calls the compiled code directly.
    ///
    /// # Safety
    ///
    /// `bufs` points to `args().len()` pointers, pointer `i` valid for reads and writes of
    /// `args()[i].len(batch)` f32s that nothing else accesses during the call, except
    /// concurrent calls of this kernel on the same buffers with disjoint `lo..hi` ranges
    /// where [`Self::is_parallel`] holds; and `lo <= hi <= ` the grid extent for `batch`.
    pub unsafe fn call_raw(&self, bufs: *const *mut f32, batch: u64, lo: u64, hi: u64) {
        // SAFETY: the caller upholds the contract above, which is the one the verified
        // code needs.
        unsafe { (self.entry)(bufs, batch, lo, hi) }
    }

    /// Checks the buffers against the bound arguments and returns the grid extent for
    /// `batch`.
    fn check(&self, bufs: &[&mut [f32]], batch: u64) -> Result<u64, CpuError> {
        let bound = self.args.iter().filter(|a| a.is_bound());
        let expected = bound.clone().count();
        if bufs.len() != expected {
            return Err(CpuError::BufferCount { kernel: self.name.clone(), expected, got: bufs.len() });
        }
        for (a, b) in bound.zip(bufs) {
            if let Some(expected) = a.len_mismatch(batch, b.len()) {
                return Err(CpuError::BufferLen {
                    kernel: self.name.clone(),
                    arg: a.name.clone(),
                    batch,
                    expected,
                    got: b.len(),
                });
            }
        }
        Ok(self.grid.resolve(batch))
    }

    /// Runs grid iterations `lo..hi` on the calling thread with `bound`, the bound buffers'
    /// addresses in order, and this thread's private memory for the private arguments
    /// (see [`PRIVATE`]).
    ///
    /// # Safety
    ///
    /// As [`Self::call_raw`] for the bound buffers.
    unsafe fn call_with_private(&self, bound: &[*mut f32], batch: u64, lo: u64, hi: u64) {
        if self.private_len == 0 {
            // SAFETY: as this function's contract; no private arguments.
            return unsafe { self.call_raw(bound.as_ptr(), batch, lo, hi) };
        }
        let run = |Private { memory, ptrs }: &mut Private| {
            memory.grow_or_abort(self.private_len, 0.0);
            let (mut given, mut offset) = (bound.iter(), 0);
            ptrs.clear();
            ptrs.extend(self.args.iter().map(|a| match a.mode {
                Mode::Private => {
                    // SAFETY: `private_len` covers every private argument, each rounded
                    // up to a cache line, so `offset + len` stays within `memory`.
                    let p = unsafe { memory.as_mut_ptr().add(offset) };
                    offset += private_slot(a);
                    p
                }
                _ => given.next().copied().unwrap_or(std::ptr::null_mut()),
            }));
            // SAFETY: the bound pointers as the contract says; each private argument gets
            // its own range of this thread's memory, which nothing else uses during the call.
            unsafe { self.call_raw(ptrs.as_ptr(), batch, lo, hi) }
        };
        // A kernel run inside another's call on this thread (never done today) gets fresh
        // memory rather than sharing the borrowed one.
        PRIVATE.with(|private| match private.try_borrow_mut() {
            Ok(mut private) => run(&mut private),
            Err(_) => run(&mut Private::default()),
        })
    }

    /// Runs grid iterations `lo..hi` on the calling thread.
    pub fn run(&self, bufs: &mut [&mut [f32]], batch: u64, lo: u64, hi: u64) -> Result<(), CpuError> {
        let extent = self.check(bufs, batch)?;
        if lo > hi || hi > extent {
            return Err(CpuError::GridRange { kernel: self.name.clone(), lo, hi, extent });
        }
        let ptrs: Vec<*mut f32> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        // SAFETY: one pointer per bound argument, each to a buffer of the checked length
        // that we borrow mutably (so exclusively) for the call; the range is checked.
        unsafe { self.call_with_private(&ptrs, batch, lo, hi) };
        Ok(())
    }

    /// Runs the whole grid, split into `threads` contiguous ranges when the kernel
    /// [`is_parallel`](Self::is_parallel), else on the calling thread. The first range
    /// runs on the calling thread, the others on the persistent pool of `threads` workers.
    pub fn run_parallel(&self, bufs: &mut [&mut [f32]], batch: u64, threads: usize) -> Result<(), CpuError> {
        let extent = self.check(bufs, batch)?;
        let split = (threads.max(1) as u64).min(extent.max(1));
        let pool = if split > 1 && self.parallel { pool::get(threads) } else { None };
        let Some(pool) = pool else {
            // One thread runs the grid: its contractions may use all the threads.
            return gemm::with_threads(threads, || self.run(bufs, batch, 0, extent));
        };
        let ptrs = SendPtrs(bufs.iter_mut().map(|b| b.as_mut_ptr()).collect());
        let chunk = extent.div_ceil(split);
        let range = |t: u64| ((t * chunk).min(extent), ((t + 1) * chunk).min(extent));
        let ptrs = &ptrs;
        // SAFETY: the buffers have the checked lengths and stay borrowed until the scope
        // has waited for every job; ranges are disjoint and within the grid, and the
        // kernel is grid-independent (see `SendPtrs`).
        let work = move |t: u64| {
            let (lo, hi) = range(t);
            unsafe { self.call_with_private(&ptrs.0, batch, lo, hi) }
        };
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.in_place_scope(|s| {
                for t in 1..split {
                    s.spawn(move |_| work(t));
                }
                work(0);
            })
        }));
        ran.map_err(|_| CpuError::Thread { kernel: self.name.clone() })
    }
}
