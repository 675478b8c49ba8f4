//! Shared by the integration tests: a small kernel builder, a deterministic RNG and the
//! backends every numeric test runs on.

#![allow(dead_code)]

use pdgc_codegen::cpu::{CpuBackend, CpuOptions};
use pdgc_codegen::interp;
use pdgc_codegen::ir::*;

pub const B: Dim = Dim::Batch;

pub fn f(n: u32) -> Dim {
    Dim::Fixed(n)
}

pub struct KernelBuilder {
    name: String,
    args: Vec<Arg>,
    vars: Vec<String>,
    accs: Vec<String>,
}

impl KernelBuilder {
    pub fn new(name: &str) -> KernelBuilder {
        KernelBuilder { name: name.into(), args: Vec::new(), vars: Vec::new(), accs: Vec::new() }
    }

    pub fn arg(&mut self, name: &str, dims: &[Dim], mode: Mode) -> ArgId {
        self.args.push(Arg { name: name.into(), dims: dims.to_vec(), mode });
        ArgId(self.args.len() as u32 - 1)
    }

    pub fn input(&mut self, name: &str, dims: &[Dim]) -> ArgId {
        self.arg(name, dims, Mode::In)
    }

    pub fn output(&mut self, name: &str, dims: &[Dim]) -> ArgId {
        self.arg(name, dims, Mode::Out)
    }

    pub fn var(&mut self, name: &str) -> VarId {
        self.vars.push(name.into());
        VarId(self.vars.len() as u32 - 1)
    }

    pub fn acc(&mut self, name: &str) -> AccId {
        self.accs.push(name.into());
        AccId(self.accs.len() as u32 - 1)
    }

    pub fn finish(self, grid: VarId, extent: Extent, body: Vec<Stmt>) -> Kernel {
        Kernel {
            name: self.name,
            args: self.args,
            vars: self.vars,
            accs: self.accs,
            grid: Loop { var: grid, extent, kind: LoopKind::Serial, body },
        }
    }
}

pub fn v(var: VarId) -> Affine {
    Affine::var(var)
}

pub fn lp(var: VarId, n: u32, body: Vec<Stmt>) -> Stmt {
    Stmt::Loop(Loop { var, extent: Extent::Fixed(n), kind: LoopKind::Serial, body })
}

pub fn vlp(var: VarId, n: u32, body: Vec<Stmt>) -> Stmt {
    Stmt::Loop(Loop { var, extent: Extent::Fixed(n), kind: LoopKind::Vector, body })
}

pub fn batch_lp(var: VarId, body: Vec<Stmt>) -> Stmt {
    Stmt::Loop(Loop { var, extent: Extent::Batch, kind: LoopKind::Serial, body })
}

pub fn ld(arg: ArgId, index: Vec<Affine>) -> Expr {
    Expr::load(arg, index)
}

pub fn c(x: f32) -> Expr {
    Expr::Const(x)
}

pub fn acc(a: AccId) -> Expr {
    Expr::Acc(a)
}

pub fn set(a: AccId, value: Expr) -> Stmt {
    Stmt::Set { acc: a, value }
}

pub fn add_to(a: AccId, value: Expr) -> Stmt {
    Stmt::Set { acc: a, value: Expr::add(Expr::Acc(a), value) }
}

pub fn store(arg: ArgId, index: Vec<Affine>, value: Expr) -> Stmt {
    Stmt::Store { arg, index, value, accumulate: false }
}

pub fn accumulate(arg: ArgId, index: Vec<Affine>, value: Expr) -> Stmt {
    Stmt::Store { arg, index, value, accumulate: true }
}

pub fn in_range(index: Affine, lo: i64, hi: i64) -> Cond {
    Cond::InRange { index, lo, hi }
}

pub fn cmp(op: CmpOp, a: Expr, b: Expr) -> Cond {
    Cond::Cmp { op, a, b }
}

pub fn when(cond: Cond, then: Vec<Stmt>) -> Stmt {
    Stmt::If { cond, then }
}

/// SplitMix64: deterministic, tiny, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// Where a numeric test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Interp,
    /// The Cranelift JIT with every loop scalar.
    Scalar,
    /// The Cranelift JIT with the F32X4 path (and FMA where the host has it).
    Vector,
    /// The CUDA C renderer's output compiled for the host (see `cuda::host`).
    CudaC,
}

pub const ALL: [Backend; 3] = [Backend::Interp, Backend::Scalar, Backend::Vector];

pub fn jit(vectorize: bool) -> CpuBackend {
    CpuBackend::with_options(CpuOptions { vectorize, fma: true }).expect("a Cranelift backend for the host")
}

/// Runs the whole grid of `k` on `be`, in place.
pub fn exec(be: Backend, k: &Kernel, bufs: &mut [Vec<f32>], batch: u64) {
    let mut views: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    match be {
        Backend::Interp => interp::run(k, &mut views, batch).expect("interpreter"),
        Backend::Scalar | Backend::Vector => {
            let compiled = jit(be == Backend::Vector).compile(std::slice::from_ref(k)).expect("compile");
            let extent = k.grid.extent.resolve(batch);
            compiled[0].run(&mut views, batch, 0, extent).expect("run");
        }
        Backend::CudaC => {
            let module = pdgc_codegen::cuda::render_module(std::slice::from_ref(k)).expect("renders");
            let host =
                pdgc_codegen::cuda::host::compile(&module, std::slice::from_ref(k)).unwrap_or_else(|e| panic!("{e}"));
            host.launch(0, &mut views, batch).expect("launch");
        }
    }
}

/// Buffers of the right length for `batch`, one per bound argument (private ones have
/// none): `In`/`InOut` ones from `rng` in `[lo, hi)`, `Out` ones zero.
pub fn random_bufs(k: &Kernel, batch: u64, rng: &mut Rng, lo: f32, hi: f32) -> Vec<Vec<f32>> {
    k.bound()
        .map(|a| {
            let n = a.len(batch) as usize;
            match a.mode {
                Mode::Out => vec![0.0; n],
                Mode::In | Mode::InOut | Mode::Private => rng.vec(n, lo, hi),
            }
        })
        .collect()
}

/// `|got - want| <= tol · max(1, |want|)` elementwise.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(err <= tol * w.abs().max(1.0), "{what}[{i}]: got {g}, want {w} (error {err:e})");
    }
}

pub fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{what}[{i}]: got {g}, want {w} bit for bit");
    }
}
