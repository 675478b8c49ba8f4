//! The CUDA renderer's launch decisions: which loops become GPU threads. Each kernel also
//! runs as CUDA C on the host (`cuda::host`) and must equal the interpreter.

mod common;

use common::*;
use pdgc_codegen::analysis::launch::{injective_over, parallel_nest, sunk_loops};
use pdgc_codegen::cuda::{render_module, LaunchMode};
use pdgc_codegen::ir::*;

/// Runs `k` on the interpreter and as CUDA C on the host; the results must agree.
fn same_as_interpreter(k: &Kernel, batch: u64) {
    let mut rng = Rng::new(7);
    let inputs = random_bufs(k, batch, &mut rng, -1.0, 1.0);
    let mut want = inputs.clone();
    exec(Backend::Interp, k, &mut want, batch);
    let mut got = inputs;
    exec(Backend::CudaC, k, &mut got, batch);
    for (i, a) in k.bound().enumerate() {
        let w: Vec<f64> = want[i].iter().map(|&x| x as f64).collect();
        assert_close(&format!("{} {}", k.name, a.name), &got[i], &w, 1e-5);
    }
}

/// The conv-forward shape the lowering emits: `y[n,co,t] = b[co] + Σ_r w[co,r]·x[n,r,t]`
/// as an init loop over t and an axpy loop over t inside the loop over r.
fn gemm_axpy() -> Kernel {
    let mut kb = KernelBuilder::new("gemm_axpy");
    let x = kb.input("x", &[B, f(5), f(7)]);
    let w = kb.input("w", &[f(3), f(5)]);
    let b = kb.input("b", &[f(3)]);
    let y = kb.output("y", &[B, f(3), f(7)]);
    let [n, co, t0, r, t1] = [kb.var("n"), kb.var("co"), kb.var("t"), kb.var("r"), kb.var("t")];
    let [bias, wr] = [kb.acc("bias"), kb.acc("w")];
    kb.finish(
        n,
        Extent::Batch,
        vec![lp(
            co,
            3,
            vec![
                set(bias, ld(b, vec![v(co)])),
                vlp(t0, 7, vec![store(y, vec![v(n), v(co), v(t0)], acc(bias))]),
                lp(
                    r,
                    5,
                    vec![
                        set(wr, ld(w, vec![v(co), v(r)])),
                        vlp(
                            t1,
                            7,
                            vec![accumulate(
                                y,
                                vec![v(n), v(co), v(t1)],
                                Expr::mul(acc(wr), ld(x, vec![v(n), v(r), v(t1)])),
                            )],
                        ),
                    ],
                ),
            ],
        )],
    )
}

#[test]
fn gemm_shaped_loops_become_one_thread_per_output() {
    let k = gemm_axpy();
    let nest = parallel_nest(&k);
    assert_eq!(nest.len(), 2, "the grid and the loop over co");
    let sunk = sunk_loops(&k, &nest[1].body).expect("both loops over t are sunk");
    assert_eq!(sunk.extent, Extent::Fixed(7));
    assert_eq!(sunk.vars.len(), 2);
    let m = render_module(std::slice::from_ref(&k)).expect("renders");
    assert_eq!(m.kernels[0].extents, vec![Extent::Batch, Extent::Fixed(3), Extent::Fixed(7)]);
    assert_eq!(m.kernels[0].dims(4).expect("fits"), Some((1, 128)), "4·3·7 = 84 threads");
    assert!(m.source.contains("const long long pdgc_t = pdgc_rest % 7;"), "{}", m.source);
    same_as_interpreter(&k, 4);
}

#[test]
fn a_launch_too_large_for_one_grid_is_an_error_not_a_truncated_grid() {
    use pdgc_codegen::cuda::{CudaError, MAX_LAUNCH_THREADS};
    let k = gemm_axpy();
    let m = render_module(std::slice::from_ref(&k)).expect("renders");
    let info = &m.kernels[0];
    // 21 threads per example: the largest batch that fits one launch, and one more.
    let fits = MAX_LAUNCH_THREADS / 21;
    let (blocks, _) = info.dims(fits).expect("fits").expect("something to run");
    assert_eq!(u64::from(blocks), (fits * 21).div_ceil(128));
    match info.dims(fits + 1) {
        Err(CudaError::TooManyThreads { threads, .. }) => assert_eq!(threads, ((fits + 1) * 21).to_string()),
        other => panic!("expected TooManyThreads, got {other:?}"),
    }
    assert!(matches!(info.dims(u64::MAX), Err(CudaError::TooManyThreads { .. })), "21·2^64 overflows");
}

#[test]
fn a_thread_count_of_fixed_extents_is_a_64_bit_product() {
    // A grid over 65536 rows, each row's 65536 elements independent: 2^32 threads, whose
    // count in 32-bit `int` arithmetic would wrap to 0.
    let mut kb = KernelBuilder::new("wide");
    let x = kb.input("x", &[f(65536), f(65536)]);
    let y = kb.output("y", &[f(65536), f(65536)]);
    let [r, cvar] = [kb.var("r"), kb.var("c")];
    let k = kb.finish(
        r,
        Extent::Fixed(65536),
        vec![vlp(cvar, 65536, vec![store(y, vec![v(r), v(cvar)], ld(x, vec![v(r), v(cvar)]))])],
    );
    let m = render_module(std::slice::from_ref(&k)).expect("renders");
    assert!(m.source.contains("if (pdgc_tid >= 65536LL * 65536) return;"), "{}", m.source);
    assert_eq!(m.kernels[0].dims(1).expect("fits"), Some((1 << 25, 128)));
}

#[test]
fn a_running_sum_is_not_sunk() {
    // y[n,t] = Σ_{u≤t} x[n,u]: the accumulator carries a value from one t to the next, so
    // the t iterations cannot be separate threads.
    let mut kb = KernelBuilder::new("cumsum");
    let x = kb.input("x", &[B, f(6)]);
    let y = kb.output("y", &[B, f(6)]);
    let [n, t] = [kb.var("n"), kb.var("t")];
    let s = kb.acc("s");
    let k = kb.finish(
        n,
        Extent::Batch,
        vec![set(s, c(0.0)), lp(t, 6, vec![add_to(s, ld(x, vec![v(n), v(t)])), store(y, vec![v(n), v(t)], acc(s))])],
    );
    let nest = parallel_nest(&k);
    assert_eq!(nest.len(), 1);
    assert_eq!(sunk_loops(&k, &nest[0].body), None);
    same_as_interpreter(&k, 3);
}

#[test]
fn a_loop_whose_result_is_read_after_it_runs_in_one_thread() {
    // out[n] = x[n, last t] via an accumulator read after the loop: a register set in a
    // nested loop and read after it is not proved set in every grid iteration, so the grid
    // runs in one thread, in order (and nothing is sunk).
    let mut kb = KernelBuilder::new("last");
    let x = kb.input("x", &[B, f(4)]);
    let tmp = kb.output("tmp", &[B, f(4)]);
    let out = kb.output("out", &[B]);
    let [n, t] = [kb.var("n"), kb.var("t")];
    let s = kb.acc("s");
    let k = kb.finish(
        n,
        Extent::Batch,
        vec![
            lp(t, 4, vec![set(s, ld(x, vec![v(n), v(t)])), store(tmp, vec![v(n), v(t)], acc(s))]),
            store(out, vec![v(n)], acc(s)),
        ],
    );
    assert!(parallel_nest(&k).is_empty());
    let m = render_module(std::slice::from_ref(&k)).expect("renders");
    assert_eq!(m.kernels[0].dims(2).expect("fits"), Some((1, 1)));
    same_as_interpreter(&k, 2);
}

#[test]
fn transposed_stores_are_not_sunk() {
    // The stored argument is indexed by the loop variable at two different positions.
    let mut kb = KernelBuilder::new("transpose");
    let x = kb.input("x", &[B, f(3), f(3)]);
    let y = kb.output("y", &[B, f(3), f(3)]);
    let [n, i, j, j2] = [kb.var("n"), kb.var("i"), kb.var("j"), kb.var("j")];
    let k = kb.finish(
        n,
        Extent::Batch,
        vec![lp(
            i,
            3,
            vec![
                lp(j, 3, vec![store(y, vec![v(n), v(i), v(j)], ld(x, vec![v(n), v(j), v(i)]))]),
                lp(j2, 3, vec![accumulate(y, vec![v(n), v(j2), v(i)], c(1.0))]),
            ],
        )],
    );
    let nest = parallel_nest(&k);
    assert_eq!(nest.len(), 1, "y is not indexed by i at one fixed position");
    assert_eq!(sunk_loops(&k, &nest[0].body), None);
    same_as_interpreter(&k, 2);
}

/// A conv-shaped kernel over the batch: columns into private memory (a flattened store),
/// the bias into `y`, `y[g, m, n] += Σ_k w[m, k] · cols[k, n]` (or `w` stored `[k, m]`),
/// then an elementwise epilogue reading `y`.
fn conv_shaped([m, kk, n]: [u32; 3], w_transposed: bool) -> Kernel {
    let mut kb = KernelBuilder::new("conv_shaped");
    let x = kb.input("x", &[B, f(kk), f(n)]);
    let w = kb.input("w", &if w_transposed { [f(kk), f(m)] } else { [f(m), f(kk)] });
    let bias = kb.input("bias", &[f(m)]);
    let cols = kb.arg("cols", &[f(kk * n)], Mode::Private);
    let y = kb.arg("y", &[B, f(m), f(n)], Mode::InOut);
    let z = kb.output("z", &[B, f(m), f(n)]);
    let [g, r, t, mi, ti, vm, vn, vk, e1, e2] =
        ["g", "r", "t", "mi", "ti", "m", "n", "k", "e1", "e2"].map(|s| kb.var(s));
    let flat = |a: VarId, b: VarId| Affine::default().plus(a, i64::from(n)).plus(b, 1);
    let body = vec![
        lp(
            r,
            kk,
            vec![vlp(t, n, vec![store(cols, vec![flat(r, t)], Expr::mul(c(2.0), ld(x, vec![v(g), v(r), v(t)])))])],
        ),
        lp(mi, m, vec![vlp(ti, n, vec![store(y, vec![v(g), v(mi), v(ti)], ld(bias, vec![v(mi)]))])]),
        Stmt::Contract(Contract {
            m: vm,
            n: vn,
            k: vk,
            extents: [Extent::Fixed(m), Extent::Fixed(n), Extent::Fixed(kk)],
            a: Operand { arg: w, index: if w_transposed { vec![v(vk), v(vm)] } else { vec![v(vm), v(vk)] } },
            b: Operand { arg: cols, index: vec![flat(vk, vn)] },
            c: Operand { arg: y, index: vec![v(g), v(vm), v(vn)] },
            accumulate: true,
        }),
        lp(
            e1,
            m,
            vec![vlp(
                e2,
                n,
                vec![store(
                    z,
                    vec![v(g), v(e1), v(e2)],
                    Expr::Unary(Unary::Tanh, Box::new(ld(y, vec![v(g), v(e1), v(e2)]))),
                )],
            )],
        ),
    ];
    kb.finish(g, Extent::Batch, body)
}

#[test]
fn a_grid_iteration_with_a_contraction_runs_in_one_cooperating_block() {
    // Shapes below, at and across the tiles' sizes (k not a multiple of the 16-step stage,
    // several stages, several block tiles in both directions), both layouts of the weight.
    for (shape, transposed) in [([1, 1, 1], false), ([5, 3, 7], true), ([32, 40, 25], false), ([70, 33, 130], true)] {
        let k = conv_shaped(shape, transposed);
        let m = render_module(std::slice::from_ref(&k)).expect("renders");
        let info = &m.kernels[0];
        assert_eq!(info.mode, LaunchMode::Block, "{shape:?}");
        assert_eq!(info.dims(3).expect("fits"), Some((3, 128)), "one block per example");
        assert_eq!(info.dims(0).expect("fits"), None);
        assert!(m.source.contains("__shared__ float pdgc_smem["), "{}", m.source);
        assert!(m.source.contains("// tiled: "), "{}", m.source);
        // The flattened column store, the bias and the epilogue are spread over the threads,
        // not left to thread 0.
        assert!(!m.source.contains("threadIdx.x == 0"), "{}", m.source);
        assert_eq!(m.source.matches("// Spread over the block's threads").count(), 3, "{}", m.source);
        same_as_interpreter(&k, 3);
    }
}

#[test]
fn a_contraction_inside_a_loop_runs_with_every_thread() {
    // A weight gradient summed over the examples of a part: the loop over examples holds
    // the contraction, so every thread runs it (a uniform loop) and the product is tiled
    // inside; the sum after it is split over the threads and added as a tree.
    let mut kb = KernelBuilder::new("parts");
    let dy = kb.input("dy", &[f(4), f(6), f(9)]);
    let x = kb.input("x", &[f(4), f(5), f(9)]);
    let parts = kb.arg("parts", &[f(2), f(6), f(5)], Mode::InOut);
    let total = kb.output("total", &[f(2)]);
    let [p, i, j, e, vm, vn, vk, q] = ["p", "i", "j", "e", "m", "n", "k", "q"].map(|s| kb.var(s));
    let s = kb.acc("s");
    let ex = Affine::default().plus(p, 2).plus(e, 1);
    let body = vec![
        lp(i, 6, vec![lp(j, 5, vec![store(parts, vec![v(p), v(i), v(j)], c(0.0))])]),
        lp(
            e,
            2,
            vec![Stmt::Contract(Contract {
                m: vm,
                n: vn,
                k: vk,
                extents: [Extent::Fixed(6), Extent::Fixed(5), Extent::Fixed(9)],
                a: Operand { arg: dy, index: vec![ex.clone(), v(vm), v(vk)] },
                b: Operand { arg: x, index: vec![ex, v(vn), v(vk)] },
                c: Operand { arg: parts, index: vec![v(p), v(vm), v(vn)] },
                accumulate: true,
            })],
        ),
        set(s, c(0.0)),
        lp(q, 5, vec![add_to(s, ld(parts, vec![v(p), Affine::constant(0), v(q)]))]),
        store(total, vec![v(p)], acc(s)),
    ];
    let k = kb.finish(p, Extent::Fixed(2), body);
    let m = render_module(std::slice::from_ref(&k)).expect("renders");
    assert_eq!(m.kernels[0].mode, LaunchMode::Block);
    assert!(m.source.contains("for (long long e = 0; e < 2; ++e) {"), "{}", m.source);
    assert!(m.source.contains("// The sum into s: split over the block's threads"), "{}", m.source);
    same_as_interpreter(&k, 1);
}

#[test]
fn a_register_shared_between_statements_keeps_the_one_thread_form() {
    // `s` is set by one statement and read by the next: per-thread registers would not
    // carry it from thread 0 to the others, so the kernel is not block-cooperative.
    let mut kb = KernelBuilder::new("shared_register");
    let x = kb.input("x", &[B, f(8)]);
    let y = kb.output("y", &[B, f(8)]);
    let [n, i] = [kb.var("n"), kb.var("i")];
    let s = kb.acc("s");
    let k = kb.finish(
        n,
        Extent::Batch,
        vec![
            set(s, ld(x, vec![v(n), Affine::constant(0)])),
            lp(i, 8, vec![store(y, vec![v(n), v(i)], Expr::mul(acc(s), ld(x, vec![v(n), v(i)])))]),
        ],
    );
    let m = render_module(std::slice::from_ref(&k)).expect("renders");
    assert_eq!(m.kernels[0].mode, LaunchMode::PerIteration);
    same_as_interpreter(&k, 3);
}

#[test]
fn flattened_stores_are_separate_when_their_index_is_injective() {
    // out[g, 12·a + 4·b + c] over a < 2, b < 3, c < 4: a mixed-radix number, injective.
    let build = |steps: [i64; 3], extents: [u32; 3], reread: bool| {
        let mut kb = KernelBuilder::new("flat");
        let x = kb.input("x", &[f(64)]);
        let out = kb.arg("out", &[f(2), f(64)], Mode::InOut);
        let [g, a, b, cv] = ["g", "a", "b", "c"].map(|s| kb.var(s));
        let flat = Affine::default().plus(a, steps[0]).plus(b, steps[1]).plus(cv, steps[2]);
        let value = if reread { ld(out, vec![v(g), Affine::constant(0)]) } else { ld(x, vec![flat.clone()]) };
        let body = vec![lp(
            a,
            extents[0],
            vec![lp(b, extents[1], vec![lp(cv, extents[2], vec![store(out, vec![v(g), flat], value)])])],
        )];
        kb.finish(g, Extent::Fixed(2), body)
    };
    let check = |k: &Kernel| {
        let Stmt::Loop(a) = &k.grid.body[0] else { unreachable!() };
        let Stmt::Loop(b) = &a.body[0] else { unreachable!() };
        let Stmt::Loop(cv) = &b.body[0] else { unreachable!() };
        injective_over(k, &k.grid.body, &[a, b, cv])
    };
    assert!(check(&build([12, 4, 1], [2, 3, 4], false)));
    assert!(check(&build([1, 2, 6], [2, 3, 4], false)), "any order of the steps");
    assert!(!check(&build([12, 4, 1], [2, 3, 5], false)), "b's step 4 ≤ c's span 4");
    assert!(!check(&build([12, 3, 1], [2, 3, 4], false)), "b's step 3 ≤ c's span 3");
    assert!(!check(&build([12, 4, 1], [2, 3, 4], true)), "another access to out uses another index");
    // Each iteration of `a` writes a row of `width` elements: element 0, elements 1..width-1
    // through an inner loop, the last one again (the taps of a padded im2col); rows `step`
    // apart are separate when the step exceeds the window.
    let taps = |step: i64, width: u32| {
        let mut kb = KernelBuilder::new("taps");
        let x = kb.input("x", &[f(64)]);
        let out = kb.output("out", &[f(2), f(64)]);
        let [g, a, j] = ["g", "a", "j"].map(|s| kb.var(s));
        let row = Affine::default().plus(a, step);
        let body = vec![lp(
            a,
            4,
            vec![
                store(out, vec![v(g), row.clone()], c(0.0)),
                lp(j, width - 1, vec![store(out, vec![v(g), row.clone().plus(j, 1).offset(1)], ld(x, vec![v(j)]))]),
                store(out, vec![v(g), row.clone().offset(i64::from(width) - 1)], c(1.0)),
            ],
        )];
        kb.finish(g, Extent::Fixed(2), body)
    };
    let spread = |k: &Kernel| {
        let Stmt::Loop(a) = &k.grid.body[0] else { unreachable!() };
        injective_over(k, &k.grid.body, &[a])
    };
    assert!(spread(&taps(8, 8)), "rows of 8, 8 apart");
    assert!(!spread(&taps(7, 8)), "rows of 8, 7 apart: the last tap of one is the first of the next");
    same_as_interpreter(&taps(8, 8), 1);
    // The loads of `out` at element 0 of another iteration: not spread, and the result
    // (every element is out[g, 0]'s old value, read in order) still matches.
    let k = build([12, 4, 1], [2, 3, 4], true);
    same_as_interpreter(&k, 1);
    same_as_interpreter(&build([1, 2, 6], [2, 3, 4], false), 1);
}

#[test]
fn the_host_harness_rejects_a_divergent_barrier() {
    // Hand-written: thread 0 leaves before the barrier the others wait at.
    use pdgc_codegen::cuda::{host, CudaModule, LaunchInfo, HELPERS};
    let mut kb = KernelBuilder::new("divergent");
    let y = kb.output("y", &[f(1)]);
    let g = kb.var("g");
    let k = kb.finish(g, Extent::Fixed(1), vec![store(y, vec![Affine::constant(0)], c(1.0))]);
    let source = format!(
        "{HELPERS}\nextern \"C\" __global__ void divergent(float* y, const unsigned long long batch) {{\n  \
         if (threadIdx.x == 0) return;\n  __syncthreads();\n  y[0] = 1.0f;\n}}\n"
    );
    let module = CudaModule {
        source,
        kernels: vec![LaunchInfo {
            symbol: "divergent".into(),
            mode: LaunchMode::Block,
            extents: vec![Extent::Fixed(1)],
            args: 1,
            max_batch: None,
        }],
    };
    let host = host::compile(&module, std::slice::from_ref(&k)).expect("compiles");
    let mut y = vec![0.0f32];
    let err = host.launch(0, &mut [y.as_mut_slice()], 1).expect_err("divergent");
    assert!(err.to_string().contains("a barrier that some threads of a block reached"), "{err}");
}

#[test]
fn a_per_example_squared_norm_is_a_block_reduction() {
    // g[n] = 2·x[n]; sq = Σ g²; out = sqrt(sq), with 40 terms per thread and a block of 128:
    // every thread has a share, and the tree adds them.
    let mut kb = KernelBuilder::new("norm");
    let x = kb.input("x", &[B, f(64), f(80)]);
    let g = kb.arg("g", &[B, f(64), f(80)], Mode::InOut);
    let out = kb.output("out", &[B]);
    let [n, i, j, i2, j2] = ["n", "i", "j", "i2", "j2"].map(|s| kb.var(s));
    let sq = kb.acc("sq");
    let gij = || ld(g, vec![v(n), v(i2), v(j2)]);
    let body = vec![
        lp(
            i,
            64,
            vec![vlp(j, 80, vec![store(g, vec![v(n), v(i), v(j)], Expr::mul(c(2.0), ld(x, vec![v(n), v(i), v(j)])))])],
        ),
        set(sq, c(0.0)),
        lp(i2, 64, vec![lp(j2, 80, vec![add_to(sq, Expr::mul(gij(), gij()))])]),
        store(out, vec![v(n)], Expr::Unary(Unary::Sqrt, Box::new(acc(sq)))),
    ];
    let k = kb.finish(n, Extent::Batch, body);
    let m = render_module(std::slice::from_ref(&k)).expect("renders");
    assert_eq!(m.kernels[0].mode, LaunchMode::Block);
    assert!(m.source.contains("__shared__ float pdgc_red[128];"), "{}", m.source);
    assert!(m.source.contains("// The sum into sq: split over the block's threads"), "{}", m.source);
    same_as_interpreter(&k, 3);
}

#[test]
fn a_contraction_over_the_batch_tiles_the_batch_rows() {
    // A linear layer's product, y[n, j] (+)= Σ_k x[n, k] · w[j, k], the batch as rows, tiled
    // for a batch of 256 (128 × 64 tiles): at batch 200 two block tiles of rows (the last
    // one partial) and one partial tile of columns, in one block.
    for accumulate in [false, true] {
        let mut kb = KernelBuilder::new("linear");
        let x = kb.input("x", &[B, f(37)]);
        let w = kb.input("w", &[f(45), f(37)]);
        let y = kb.arg("y", &[B, f(45)], Mode::InOut);
        let [g, vm, vn, vk] = ["g", "m", "n", "k"].map(|s| kb.var(s));
        let k = kb.finish(
            g,
            Extent::Fixed(1),
            vec![Stmt::Contract(Contract {
                m: vm,
                n: vn,
                k: vk,
                extents: [Extent::Batch, Extent::Fixed(45), Extent::Fixed(37)],
                a: Operand { arg: x, index: vec![v(vm), v(vk)] },
                b: Operand { arg: w, index: vec![v(vn), v(vk)] },
                c: Operand { arg: y, index: vec![v(vm), v(vn)] },
                accumulate,
            })],
        );
        let m = render_module(std::slice::from_ref(&k)).expect("renders");
        assert_eq!(m.kernels[0].mode, LaunchMode::Block);
        assert_eq!(m.kernels[0].dims(200).expect("fits"), Some((1, 128)));
        assert!(m.source.contains("pdgc_m0 < (long long)batch; pdgc_m0 += 128"), "{}", m.source);
        same_as_interpreter(&k, 200);
        same_as_interpreter(&k, 0);
    }
}

#[test]
fn indices_are_32_bit_where_every_value_fits_the_batch_rendered_for() {
    use pdgc_codegen::cuda::{index_bits, render_module_for, CudaError};
    // conv_shaped at [70, 33, 130]: y has 9100 elements per example, so 32-bit indices hold
    // up to about 236,000 examples.
    let k = conv_shaped([70, 33, 130], true);
    let desugared = k.private_sliced().desugared().into_owned();
    assert_eq!(index_bits(&desugared, &[Extent::Batch], 1000), 32);
    assert_eq!(index_bits(&desugared, &[Extent::Batch], 300_000), 64, "y alone passes 2^31");
    let narrow = render_module_for(std::slice::from_ref(&k), Some(5)).expect("renders");
    assert!(narrow.source.contains("for (int g = blockIdx.x; g < (int)batch; g += gridDim.x)"), "{}", narrow.source);
    assert_eq!(narrow.source.matches("long long").count(), 1, "the batch argument only: {}", narrow.source);
    assert_eq!(narrow.kernels[0].max_batch, Some(5));
    assert!(matches!(narrow.kernels[0].dims(6), Err(CudaError::BatchAboveIndexLimit { max: 5, .. })));
    let wide = render_module_for(std::slice::from_ref(&k), Some(300_000)).expect("renders");
    assert!(wide.source.contains("long long g = blockIdx.x"), "{}", wide.source);
    assert_eq!(wide.kernels[0].max_batch, None);
    // The 32-bit form computes what the interpreter does.
    let mut rng = Rng::new(5);
    let inputs = random_bufs(&k, 5, &mut rng, -1.0, 1.0);
    let mut want = inputs.clone();
    exec(Backend::Interp, &k, &mut want, 5);
    let host = pdgc_codegen::cuda::host::compile(&narrow, std::slice::from_ref(&k)).expect("compiles");
    let mut got = inputs;
    let mut views: Vec<&mut [f32]> = got.iter_mut().map(|b| b.as_mut_slice()).collect();
    host.launch(0, &mut views, 5).expect("launch");
    for (i, a) in k.bound().enumerate() {
        let w: Vec<f64> = want[i].iter().map(|&x| x as f64).collect();
        assert_close(&format!("32-bit {}", a.name), &got[i], &w, 1e-5);
    }
}
