//! The CUDA renderer's launch decisions: which loops become GPU threads. Each kernel also
//! runs as CUDA C on the host (`cuda::host`) and must equal the interpreter.

mod common;

use common::*;
use pdgc_codegen::analysis::launch::{parallel_nest, sunk_loops};
use pdgc_codegen::cuda::render_module;
use pdgc_codegen::ir::*;

/// Runs `k` on the interpreter and as CUDA C on the host; the results must agree.
fn same_as_interpreter(k: &Kernel, batch: u64) {
    let mut rng = Rng::new(7);
    let inputs = random_bufs(k, batch, &mut rng, -1.0, 1.0);
    let mut want = inputs.clone();
    exec(Backend::Interp, k, &mut want, batch);
    let mut got = inputs;
    exec(Backend::CudaC, k, &mut got, batch);
    for (i, a) in k.args.iter().enumerate() {
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
