//! The CPU backend's API: what it refuses, what it checks before running, what it shows.
//! (Numbers are in `backends.rs`.)

mod common;

use common::*;
use pdgc_codegen::cpu::{CompiledKernel, CpuBackend, CpuError, CpuOptions};
use pdgc_codegen::interp::{self, InterpError};
use pdgc_codegen::ir::*;

/// `y[n,i] = 2·x[n,i]` over a batch, with the given loop kind for `i`.
fn double(len: u32, kind: LoopKind) -> Kernel {
    let mut kb = KernelBuilder::new("double");
    let x = kb.input("x", &[B, f(len)]);
    let y = kb.output("y", &[B, f(len)]);
    let [n, i] = [kb.var("n"), kb.var("i")];
    let body = vec![Stmt::Loop(Loop {
        var: i,
        extent: Extent::Fixed(len),
        kind,
        body: vec![store(y, vec![v(n), v(i)], Expr::mul(c(2.0), ld(x, vec![v(n), v(i)])))],
    })];
    kb.finish(n, Extent::Batch, body)
}

/// `s = Σ_k a[k]·b[k]` as a vector reduction.
fn dot(len: u32) -> Kernel {
    let mut kb = KernelBuilder::new("dot");
    let a = kb.input("a", &[f(len)]);
    let b = kb.input("b", &[f(len)]);
    let s = kb.output("s", &[f(1)]);
    let [g, k] = [kb.var("g"), kb.var("k")];
    let sum = kb.acc("sum");
    let body = vec![
        set(sum, c(0.0)),
        vlp(k, len, vec![add_to(sum, Expr::mul(ld(a, vec![v(k)]), ld(b, vec![v(k)])))]),
        store(s, vec![Affine::constant(0)], acc(sum)),
    ];
    kb.finish(g, Extent::Fixed(1), body)
}

/// Reads `x[i+1]` for `i` in `0..4` from a buffer of 4: out of bounds, unguarded.
fn out_of_bounds() -> Kernel {
    let mut kb = KernelBuilder::new("shift");
    let x = kb.input("x", &[f(4)]);
    let y = kb.output("y", &[f(4)]);
    let [g, i] = [kb.var("g"), kb.var("i")];
    kb.finish(g, Extent::Fixed(1), vec![lp(i, 4, vec![store(y, vec![v(i)], ld(x, vec![v(i).offset(1)]))])])
}

#[test]
fn kernels_and_backends_are_send_and_sync() {
    fn assert_traits<T: Send + Sync + Clone + 'static>() {}
    assert_traits::<CompiledKernel>();
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CpuBackend>();
}

#[test]
fn compile_refuses_a_kernel_the_verifier_rejects() {
    let mut be = CpuBackend::new().unwrap();
    let err = be.compile(&[double(4, LoopKind::Serial), out_of_bounds()]).unwrap_err();
    let CpuError::Verify(e) = &err else { panic!("expected a verifier error, got {err}") };
    assert_eq!(e.kernel, "shift");
    assert!(err.to_string().contains("kernel `shift` is invalid"), "{err}");
    assert!(be.clif_text(&out_of_bounds()).is_err());
}

#[test]
fn run_checks_buffers_and_grid_range() {
    let k = double(3, LoopKind::Serial);
    let compiled = CpuBackend::new().unwrap().compile(&[k]).unwrap().remove(0);
    assert_eq!(compiled.name(), "double");
    assert_eq!(compiled.args().len(), 2);
    let mut x = vec![1.0f32; 6];
    let mut y = vec![0.0f32; 6];
    let mut short = vec![0.0f32; 5];

    let err = compiled.run(&mut [&mut x], 2, 0, 2).unwrap_err();
    assert!(matches!(err, CpuError::BufferCount { expected: 2, got: 1, .. }), "{err}");
    let err = compiled.run(&mut [&mut x, &mut short], 2, 0, 2).unwrap_err();
    assert!(matches!(&err, CpuError::BufferLen { arg, got: 5, .. } if arg == "y"), "{err}");
    assert_eq!(err.to_string(), "kernel `double`: buffer `y` has 5 elements, batch 2 needs 6");
    let err = compiled.run(&mut [&mut x, &mut y], 2, 0, 3).unwrap_err();
    assert!(matches!(err, CpuError::GridRange { lo: 0, hi: 3, extent: 2, .. }), "{err}");
    let err = compiled.run(&mut [&mut x, &mut y], 2, 2, 1).unwrap_err();
    assert!(matches!(err, CpuError::GridRange { .. }), "{err}");
    let err = compiled.run_parallel(&mut [&mut x, &mut short], 2, 2).unwrap_err();
    assert!(matches!(err, CpuError::BufferLen { .. }), "{err}");
    // A batch whose buffer size overflows is a length error, not a panic.
    let err = compiled.run(&mut [&mut x, &mut y], u64::MAX, 0, 0).unwrap_err();
    assert!(matches!(err, CpuError::BufferLen { .. }), "{err}");

    compiled.run(&mut [&mut x, &mut y], 2, 0, 2).unwrap();
    assert_eq!(y, vec![2.0; 6]);
    // An empty range and an empty batch run nothing.
    compiled.run(&mut [&mut x, &mut y], 2, 1, 1).unwrap();
    compiled.run(&mut [&mut [], &mut []], 0, 0, 0).unwrap();
    compiled.run_parallel(&mut [&mut [], &mut []], 0, 4).unwrap();
}

#[test]
fn kernels_outlive_their_backend_and_names_may_repeat() {
    let mut be = CpuBackend::new().unwrap();
    let first = be.compile(&[double(5, LoopKind::Vector), double(5, LoopKind::Serial)]).unwrap();
    let again = be.compile(&[double(5, LoopKind::Vector)]).unwrap();
    drop(be);
    let copy = again[0].clone();
    for k in first.iter().chain(&again).chain([&copy]) {
        let mut x: Vec<f32> = (0..10).map(|e| e as f32).collect();
        let mut y = vec![0.0f32; 10];
        k.run(&mut [&mut x, &mut y], 2, 0, 2).unwrap();
        assert_eq!(y, (0..10).map(|e| 2.0 * e as f32).collect::<Vec<f32>>());
    }
    // A kernel used from another thread.
    let handle = std::thread::spawn(move || {
        let mut x = vec![1.5f32; 5];
        let mut y = vec![0.0f32; 5];
        copy.run(&mut [&mut x, &mut y], 1, 0, 1).unwrap();
        y
    });
    assert_eq!(handle.join().unwrap(), vec![3.0; 5]);
}

#[test]
fn clif_text_is_deterministic_and_shows_the_vector_path() {
    let portable = CpuOptions { vectorize: true, fma: false };
    let a = CpuBackend::with_options(portable).unwrap();
    let b = CpuBackend::with_options(portable).unwrap();
    let text = a.clif_text(&dot(13)).unwrap();
    assert_eq!(text, b.clif_text(&dot(13)).unwrap());
    assert_eq!(text, a.clif_text(&dot(13)).unwrap());
    assert!(text.starts_with("function %dot(i64, i64, i64, i64)"), "{text}");
    assert!(text.contains("load.f32x4") && text.contains("fadd"), "{text}");
    assert!(!text.contains("fma"), "{text}");

    let fused = CpuBackend::new().unwrap();
    assert_eq!(fused.clif_text(&dot(13)).unwrap().contains(" fma "), fused.host_has_fma());

    let scalar = CpuBackend::with_options(CpuOptions { vectorize: false, fma: true }).unwrap();
    assert!(!scalar.clif_text(&dot(13)).unwrap().contains("f32x4"));
    // Too short to vectorize.
    assert!(!a.clif_text(&dot(3)).unwrap().contains("f32x4"));
    // A map through `exp` runs on lanes, with no call; scalar code calls the JIT symbol.
    let mut k = double(8, LoopKind::Vector);
    if let Stmt::Loop(l) = &mut k.grid.body[0] {
        if let Stmt::Store { value, .. } = &mut l.body[0] {
            *value = Expr::un(Unary::Exp, value.clone());
        }
    }
    let text = a.clif_text(&k).unwrap();
    assert!(text.contains("f32x4") && !text.contains("call fn0"), "{text}");
    let text = scalar.clif_text(&k).unwrap();
    assert!(!text.contains("f32x4") && text.contains("call fn0"), "{text}");
}

#[test]
fn disassembly_shows_the_machine_code() {
    let be = CpuBackend::new().unwrap();
    let text = be.disassembly(&dot(16)).unwrap();
    assert!(!text.is_empty());
    if be.host_has_fma() && cfg!(target_arch = "x86_64") {
        assert!(text.contains("vfmadd"), "{text}");
    }
}

#[test]
fn interpreter_reports_bad_accesses_and_buffers_without_panicking() {
    // The verifier rejects this kernel; the interpreter runs it and reports the access.
    let k = out_of_bounds();
    let mut x = vec![0.0f32; 4];
    let mut y = vec![0.0f32; 4];
    let err = interp::run(&k, &mut [&mut x, &mut y], 0).unwrap_err();
    assert_eq!(
        err,
        InterpError::OutOfBounds {
            kernel: "shift".into(),
            stmt: "y[i] = x[i+1]".into(),
            arg: "x".into(),
            index: vec![4],
            dims: vec![4],
        }
    );
    assert_eq!(err.to_string(), "kernel `shift`, in `y[i] = x[i+1]`: index [4] of `x` is out of bounds [4]");

    let err = interp::run(&k, &mut [&mut x], 0).unwrap_err();
    assert!(matches!(err, InterpError::BufferCount { .. }), "{err}");
    let err = interp::run(&k, &mut [&mut x, &mut [0.0; 3]], 0).unwrap_err();
    assert!(matches!(err, InterpError::BufferLen { .. }), "{err}");
    let err = interp::run_range(&k, &mut [&mut x, &mut y], 0, 0, 2).unwrap_err();
    assert!(matches!(err, InterpError::GridRange { .. }), "{err}");

    // A variable used outside its loop, an accumulator out of range, a store to an input.
    let mut bad = double(2, LoopKind::Serial);
    bad.grid.body.push(store(ArgId(1), vec![v(VarId(0)), v(VarId(1))], c(0.0)));
    let err = interp::run(&bad, &mut [&mut [0.0; 2], &mut [0.0; 2]], 1).unwrap_err();
    assert_eq!(err.to_string(), "kernel `double`, in `y[n, i] = 0.0`: variable `i` is used outside its loop");
    bad.grid.body = vec![set(AccId(3), c(1.0))];
    let err = interp::run(&bad, &mut [&mut [0.0; 2], &mut [0.0; 2]], 1).unwrap_err();
    assert!(err.to_string().contains("accumulator a3 is out of range"), "{err}");
    bad.grid.body = vec![store(ArgId(0), vec![v(VarId(0)), Affine::constant(0)], c(1.0))];
    let err = interp::run(&bad, &mut [&mut [0.0; 2], &mut [0.0; 2]], 1).unwrap_err();
    assert!(err.to_string().contains("stores to `x`, an `in` argument"), "{err}");
}
