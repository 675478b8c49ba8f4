//! Numeric tests, written once and run on every backend: the interpreter, the JIT's
//! scalar code and the JIT's vector code. Expected values come from plain f64 Rust
//! beside each kernel; on random inputs the JIT's scalar code must also equal the
//! interpreter bit for bit.

mod common;

use common::*;
use pdgc_codegen::ir::*;

/// One test function per backend for each case: `interp::matmul`, `jit_scalar::matmul`,
/// `jit_vector::matmul`, ...
macro_rules! backend_tests {
    ($($case:ident),* $(,)?) => {
        mod interp {
            $(#[test] fn $case() { super::$case(super::Backend::Interp) })*
        }
        mod jit_scalar {
            $(#[test] fn $case() { super::$case(super::Backend::Scalar) })*
        }
        mod jit_vector {
            $(#[test] fn $case() { super::$case(super::Backend::Vector) })*
        }
    };
}

backend_tests!(
    matmul,
    matmul_vector_reduction,
    conv2d_padding_stride_dilation_groups,
    grouped_index,
    batch_extent_inner_loop,
    accumulate_stores,
    relu_backward_and_leaky_relu,
    argmax_first_one_hot,
    unary_ops,
    vector_reductions_and_maps,
    grid_subrange,
    nan_semantics,
    vector_selects_and_invariants,
    stride_two_loads,
    private_memory,
);

/// The generated CUDA C, compiled for the host (`cuda::host`), on the same cases: what the
/// CUDA renderer writes, checked without a GPU. (`grid_subrange` has no CUDA form: a launch
/// always covers the whole grid.)
mod cuda_c {
    macro_rules! cuda_c_tests {
        ($($case:ident),* $(,)?) => {
            $(#[test] fn $case() { super::$case(super::Backend::CudaC) })*
        };
    }
    cuda_c_tests!(
        matmul,
        matmul_vector_reduction,
        conv2d_padding_stride_dilation_groups,
        grouped_index,
        batch_extent_inner_loop,
        accumulate_stores,
        relu_backward_and_leaky_relu,
        argmax_first_one_hot,
        unary_ops,
        vector_reductions_and_maps,
        nan_semantics,
        vector_selects_and_invariants,
        stride_two_loads,
        private_memory,
    );
}

// ---------------------------------------------------------------------------------------
// Kernels and their references.

/// `C[i,j] = Σ_k A[i,k]·B[k,j]` with serial loops; the grid runs over rows.
fn matmul_kernel(m: u32, kk: u32, n: u32) -> Kernel {
    let mut kb = KernelBuilder::new("matmul");
    let a = kb.input("a", &[f(m), f(kk)]);
    let b = kb.input("b", &[f(kk), f(n)]);
    let out = kb.output("c", &[f(m), f(n)]);
    let [i, j, k] = [kb.var("i"), kb.var("j"), kb.var("k")];
    let s = kb.acc("s");
    let body = vec![lp(
        j,
        n,
        vec![
            set(s, c(0.0)),
            lp(k, kk, vec![add_to(s, Expr::mul(ld(a, vec![v(i), v(k)]), ld(b, vec![v(k), v(j)])))]),
            store(out, vec![v(i), v(j)], acc(s)),
        ],
    )];
    kb.finish(i, Extent::Fixed(m), body)
}

/// `C[i,j] = Σ_k A[i,k]·Bt[j,k]`: the reduction runs along unit stride in both loads.
fn matmul_nt_kernel(m: u32, kk: u32, n: u32) -> Kernel {
    let mut kb = KernelBuilder::new("matmul_nt");
    let a = kb.input("a", &[f(m), f(kk)]);
    let bt = kb.input("bt", &[f(n), f(kk)]);
    let out = kb.output("c", &[f(m), f(n)]);
    let [i, j, k] = [kb.var("i"), kb.var("j"), kb.var("k")];
    let s = kb.acc("s");
    let body = vec![lp(
        j,
        n,
        vec![
            set(s, c(0.0)),
            vlp(k, kk, vec![add_to(s, Expr::mul(ld(a, vec![v(i), v(k)]), ld(bt, vec![v(j), v(k)])))]),
            store(out, vec![v(i), v(j)], acc(s)),
        ],
    )];
    kb.finish(i, Extent::Fixed(m), body)
}

struct ConvGeom {
    cin: u32,
    cout: u32,
    groups: u32,
    h: u32,
    w: u32,
    k: u32,
    stride: u32,
    pad: u32,
    dil: u32,
}

impl ConvGeom {
    fn out(&self, size: u32) -> u32 {
        (size + 2 * self.pad - self.dil * (self.k - 1) - 1) / self.stride + 1
    }
}

const CONV: ConvGeom = ConvGeom { cin: 4, cout: 6, groups: 2, h: 7, w: 6, k: 3, stride: 2, pad: 2, dil: 2 };

/// A grouped 2-D convolution with bias; the grid runs over examples.
fn conv2d_kernel(g: &ConvGeom) -> Kernel {
    let (oh_n, ow_n) = (g.out(g.h), g.out(g.w));
    let cin_g = g.cin / g.groups;
    let cout_g = g.cout / g.groups;
    let mut kb = KernelBuilder::new("conv2d");
    let x = kb.input("x", &[B, f(g.cin), f(g.h), f(g.w)]);
    let w = kb.input("w", &[f(g.cout), f(cin_g), f(g.k), f(g.k)]);
    let bias = kb.input("b", &[f(g.cout)]);
    let y = kb.output("y", &[B, f(g.cout), f(oh_n), f(ow_n)]);
    let [n, co, oh, ow, ci, kh, kw] = ["n", "co", "oh", "ow", "ci", "kh", "kw"].map(|s| kb.var(s));
    let a = kb.acc("acc");
    let ih = Affine::default().plus(oh, g.stride as i64).plus(kh, g.dil as i64).offset(-(g.pad as i64));
    let iw = Affine::default().plus(ow, g.stride as i64).plus(kw, g.dil as i64).offset(-(g.pad as i64));
    // Input channel: ci + ⌊co / (Cout/G)⌋ · (Cin/G).
    let chan = v(ci).plus_div(co, cin_g as i64, cout_g as i64);
    let read = Expr::mul(ld(w, vec![v(co), v(ci), v(kh), v(kw)]), ld(x, vec![v(n), chan, ih.clone(), iw.clone()]));
    let guarded =
        when(Cond::And(vec![in_range(ih, 0, g.h as i64), in_range(iw, 0, g.w as i64)]), vec![add_to(a, read)]);
    let body = vec![lp(
        co,
        g.cout,
        vec![lp(
            oh,
            oh_n,
            vec![lp(
                ow,
                ow_n,
                vec![
                    set(a, ld(bias, vec![v(co)])),
                    lp(ci, cin_g, vec![lp(kh, g.k, vec![lp(kw, g.k, vec![guarded])])]),
                    store(y, vec![v(n), v(co), v(oh), v(ow)], acc(a)),
                ],
            )],
        )],
    )];
    kb.finish(n, Extent::Batch, body)
}

fn conv2d_reference(g: &ConvGeom, batch: usize, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f64> {
    let (oh_n, ow_n) = (g.out(g.h) as usize, g.out(g.w) as usize);
    let (cin, cout, h, wd, k) = (g.cin as usize, g.cout as usize, g.h as i64, g.w as i64, g.k as usize);
    let (cin_g, cout_g) = (cin / g.groups as usize, cout / g.groups as usize);
    let mut y = vec![0.0f64; batch * cout * oh_n * ow_n];
    for n in 0..batch {
        for co in 0..cout {
            let group = co / cout_g;
            for oh in 0..oh_n {
                for ow in 0..ow_n {
                    let mut s = b[co] as f64;
                    for ci in 0..cin_g {
                        for kh in 0..k {
                            for kw in 0..k {
                                let ih = (oh * g.stride as usize + kh * g.dil as usize) as i64 - g.pad as i64;
                                let iw = (ow * g.stride as usize + kw * g.dil as usize) as i64 - g.pad as i64;
                                if ih < 0 || ih >= h || iw < 0 || iw >= wd {
                                    continue;
                                }
                                let xc = group * cin_g + ci;
                                let xv = x[((n * cin + xc) * h as usize + ih as usize) * wd as usize + iw as usize];
                                let wv = w[((co * cin_g + ci) * k + kh) * k + kw];
                                s += xv as f64 * wv as f64;
                            }
                        }
                    }
                    y[((n * cout + co) * oh_n + oh) * ow_n + ow] = s;
                }
            }
        }
    }
    y
}

// ---------------------------------------------------------------------------------------
// Cases, each run on every backend.

fn matmul(be: Backend) {
    let k = matmul_kernel(2, 3, 2);
    // A = [[1,2,3],[4,5,6]], B = [[1,0],[0,1],[2,-1]]: C = [[7,-1],[16,-1]].
    let mut bufs = vec![vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![1.0, 0.0, 0.0, 1.0, 2.0, -1.0], vec![0.0; 4]];
    exec(be, &k, &mut bufs, 1);
    assert_eq!(bufs[2], vec![7.0, -1.0, 16.0, -1.0]);
}

fn matmul_vector_reduction(be: Backend) {
    // K = 13: one unrolled step (8), one leftover chunk (4), one scalar iteration.
    for kk in [3u32, 4, 7, 8, 13, 21, 40] {
        let (m, n) = (3u32, 5u32);
        let k = matmul_nt_kernel(m, kk, n);
        let mut rng = Rng::new(kk as u64);
        let mut bufs = random_bufs(&k, 1, &mut rng, -1.0, 1.0);
        let (a, bt) = (bufs[0].clone(), bufs[1].clone());
        exec(be, &k, &mut bufs, 1);
        let mut want = vec![0.0f64; (m * n) as usize];
        for i in 0..m as usize {
            for j in 0..n as usize {
                want[i * n as usize + j] =
                    (0..kk as usize).map(|p| a[i * kk as usize + p] as f64 * bt[j * kk as usize + p] as f64).sum();
            }
        }
        assert_close(&format!("matmul_nt K={kk}"), &bufs[2], &want, 1e-5);
    }
}

fn conv2d_padding_stride_dilation_groups(be: Backend) {
    let k = conv2d_kernel(&CONV);
    let batch = 3;
    let mut rng = Rng::new(7);
    let mut bufs = random_bufs(&k, batch, &mut rng, -1.0, 1.0);
    let want = conv2d_reference(&CONV, batch as usize, &bufs[0], &bufs[1], &bufs[2]);
    exec(be, &k, &mut bufs, batch);
    assert_close("conv2d", &bufs[3], &want, 1e-5);
}

fn grouped_index(be: Backend) {
    // y[n,i] = x[n, ⌊i/3⌋] (nearest upsampling) and z[n,i] = float(2·⌊i/3⌋ − i + 1).
    let mut kb = KernelBuilder::new("upsample");
    let x = kb.input("x", &[B, f(4)]);
    let y = kb.output("y", &[B, f(12)]);
    let z = kb.output("z", &[B, f(12)]);
    let [n, i] = [kb.var("n"), kb.var("i")];
    let body = vec![lp(
        i,
        12,
        vec![
            store(y, vec![v(n), v(i)], ld(x, vec![v(n), Affine::default().plus_div(i, 1, 3)])),
            store(z, vec![v(n), v(i)], Expr::Index(Affine::default().plus_div(i, 2, 3).plus(i, -1).offset(1))),
        ],
    )];
    let k = kb.finish(n, Extent::Batch, body);
    let mut bufs = vec![vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], vec![0.0; 24], vec![0.0; 24]];
    exec(be, &k, &mut bufs, 2);
    let want_y: Vec<f32> = (0..24).map(|e| ((e / 12) * 4 + (e % 12) / 3 + 1) as f32).collect();
    let want_z: Vec<f32> = (0..24).map(|e| (2 * ((e % 12) / 3) - (e % 12) + 1) as f32).collect();
    assert_eq!(bufs[1], want_y);
    assert_eq!(bufs[2], want_z);
}

fn batch_sum_kernel() -> Kernel {
    // s[j] = Σ_n x[n, j]: the grid runs over features, the inner loop over the batch.
    let mut kb = KernelBuilder::new("batch_sum");
    let x = kb.input("x", &[B, f(3)]);
    let s = kb.output("s", &[f(3)]);
    let [j, n] = [kb.var("j"), kb.var("n")];
    let a = kb.acc("a");
    let body =
        vec![set(a, c(0.0)), batch_lp(n, vec![add_to(a, ld(x, vec![v(n), v(j)]))]), store(s, vec![v(j)], acc(a))];
    kb.finish(j, Extent::Fixed(3), body)
}

fn batch_extent_inner_loop(be: Backend) {
    let k = batch_sum_kernel();
    let mut bufs = vec![(1..=15).map(|x| x as f32).collect(), vec![9.0; 3]];
    exec(be, &k, &mut bufs, 5);
    assert_eq!(bufs[1], vec![35.0, 40.0, 45.0]);
    // An empty batch: the loop does not run, the sums are zero.
    let mut bufs = vec![vec![], vec![9.0; 3]];
    exec(be, &k, &mut bufs, 0);
    assert_eq!(bufs[1], vec![0.0; 3]);
}

fn accumulate_stores(be: Backend) {
    // y[n,i] += 2·x[n,i] (serial) and z[n,i] += x[n,i]·w[i] (a vector loop, length 6).
    let mut kb = KernelBuilder::new("axpy");
    let x = kb.input("x", &[B, f(6)]);
    let w = kb.input("w", &[f(6)]);
    let y = kb.arg("y", &[B, f(6)], Mode::InOut);
    let z = kb.arg("z", &[B, f(6)], Mode::InOut);
    let [n, i, t] = [kb.var("n"), kb.var("i"), kb.var("t")];
    let body = vec![
        lp(i, 6, vec![accumulate(y, vec![v(n), v(i)], Expr::mul(c(2.0), ld(x, vec![v(n), v(i)])))]),
        vlp(t, 6, vec![accumulate(z, vec![v(n), v(t)], Expr::mul(ld(x, vec![v(n), v(t)]), ld(w, vec![v(t)])))]),
    ];
    let k = kb.finish(n, Extent::Batch, body);
    let x_vals: Vec<f32> = (0..12).map(|e| e as f32 * 0.5).collect();
    let w_vals: Vec<f32> = vec![1.0, -1.0, 2.0, 0.5, 3.0, -2.0];
    let mut bufs = vec![x_vals.clone(), w_vals.clone(), vec![1.0; 12], vec![10.0; 12]];
    exec(be, &k, &mut bufs, 2);
    let want_y: Vec<f32> = x_vals.iter().map(|x| 1.0 + 2.0 * x).collect();
    let want_z: Vec<f32> = x_vals.iter().enumerate().map(|(e, x)| 10.0 + x * w_vals[e % 6]).collect();
    assert_eq!(bufs[2], want_y);
    assert_eq!(bufs[3], want_z);
}

fn relu_backward_and_leaky_relu(be: Backend) {
    // dx = x > 0 ? dy : 0 and y = x > 0 ? x : 0.1·x, both vector loops of length 11.
    let mut kb = KernelBuilder::new("relu");
    let x = kb.input("x", &[B, f(11)]);
    let dy = kb.input("dy", &[B, f(11)]);
    let dx = kb.output("dx", &[B, f(11)]);
    let y = kb.output("y", &[B, f(11)]);
    let [n, i] = [kb.var("n"), kb.var("i")];
    let ix = vec![v(n), v(i)];
    let positive = || cmp(CmpOp::Gt, ld(x, vec![v(n), v(i)]), c(0.0));
    let body = vec![vlp(
        i,
        11,
        vec![
            store(dx, ix.clone(), Expr::select(positive(), ld(dy, ix.clone()), c(0.0))),
            store(y, ix.clone(), Expr::select(positive(), ld(x, ix.clone()), Expr::mul(c(0.1), ld(x, ix)))),
        ],
    )];
    let k = kb.finish(n, Extent::Batch, body);
    let mut rng = Rng::new(3);
    let mut bufs = random_bufs(&k, 2, &mut rng, -1.0, 1.0);
    bufs[0][3] = 0.0; // exactly zero: not positive
    let (xs, dys) = (bufs[0].clone(), bufs[1].clone());
    exec(be, &k, &mut bufs, 2);
    let want_dx: Vec<f32> = xs.iter().zip(&dys).map(|(x, d)| if *x > 0.0 { *d } else { 0.0 }).collect();
    let want_y: Vec<f32> = xs.iter().map(|x| if *x > 0.0 { *x } else { 0.1 * x }).collect();
    assert_eq!(bufs[2], want_dx);
    assert_eq!(bufs[3], want_y);
}

/// One-hot of the first maximum of each row: `max` reduction (a vector loop), then the
/// first index attaining it, then the one-hot store.
fn argmax_kernel(rows: u32, cols: u32) -> Kernel {
    let mut kb = KernelBuilder::new("argmax_first");
    let x = kb.input("x", &[B, f(rows), f(cols)]);
    let out = kb.output("onehot", &[B, f(rows), f(cols)]);
    let [n, r, j1, j2, j3] = ["n", "r", "j1", "j2", "j3"].map(|s| kb.var(s));
    let [m, idx] = [kb.acc("m"), kb.acc("idx")];
    let body = vec![lp(
        r,
        rows,
        vec![
            set(m, c(f32::NEG_INFINITY)),
            vlp(j1, cols, vec![set(m, Expr::bin(Binary::Max, acc(m), ld(x, vec![v(n), v(r), v(j1)])))]),
            set(idx, c(f32::INFINITY)),
            lp(
                j2,
                cols,
                vec![set(
                    idx,
                    Expr::select(
                        cmp(CmpOp::Eq, ld(x, vec![v(n), v(r), v(j2)]), acc(m)),
                        Expr::bin(Binary::Min, acc(idx), Expr::Index(v(j2))),
                        acc(idx),
                    ),
                )],
            ),
            vlp(
                j3,
                cols,
                vec![store(
                    out,
                    vec![v(n), v(r), v(j3)],
                    Expr::select(cmp(CmpOp::Eq, Expr::Index(v(j3)), acc(idx)), c(1.0), c(0.0)),
                )],
            ),
        ],
    )];
    kb.finish(n, Extent::Batch, body)
}

fn argmax_first_one_hot(be: Backend) {
    let (rows, cols) = (4u32, 9u32);
    let k = argmax_kernel(rows, cols);
    let mut rng = Rng::new(11);
    // Small integers, so that rows have ties.
    let mut bufs = random_bufs(&k, 2, &mut rng, 0.0, 4.0);
    bufs[0].iter_mut().for_each(|x| *x = x.floor());
    let xs = bufs[0].clone();
    exec(be, &k, &mut bufs, 2);
    let mut want = vec![0.0f32; xs.len()];
    for row in 0..(2 * rows) as usize {
        let r = &xs[row * cols as usize..(row + 1) * cols as usize];
        let max = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let first = r.iter().position(|x| *x == max).unwrap();
        want[row * cols as usize + first] = 1.0;
    }
    assert_eq!(bufs[1], want);
}

const UNARY: [Unary; 7] = [Unary::Neg, Unary::Exp, Unary::Log, Unary::Tanh, Unary::Sqrt, Unary::Erf, Unary::Abs];

fn unary_kernel(len: u32) -> Kernel {
    // y[n, op, i] = op(x[n,i] − 1.5), but log and sqrt take x[n,i] itself.
    let mut kb = KernelBuilder::new("unary");
    let x = kb.input("x", &[B, f(len)]);
    let y = kb.output("y", &[B, f(UNARY.len() as u32), f(len)]);
    let [n, i] = [kb.var("n"), kb.var("i")];
    let stores = UNARY
        .iter()
        .enumerate()
        .map(|(o, op)| {
            let arg = match op {
                Unary::Log | Unary::Sqrt => ld(x, vec![v(n), v(i)]),
                _ => Expr::sub(ld(x, vec![v(n), v(i)]), c(1.5)),
            };
            store(y, vec![v(n), Affine::constant(o as i64), v(i)], Expr::un(*op, arg))
        })
        .collect();
    kb.finish(n, Extent::Batch, vec![vlp(i, len, stores)])
}

fn unary_ops(be: Backend) {
    let len = 10u32;
    let k = unary_kernel(len);
    let mut rng = Rng::new(5);
    let mut bufs = random_bufs(&k, 2, &mut rng, 0.1, 3.0);
    let xs = bufs[0].clone();
    exec(be, &k, &mut bufs, 2);
    let mut want = vec![0.0f64; bufs[1].len()];
    for n in 0..2 {
        for (o, op) in UNARY.iter().enumerate() {
            for i in 0..len as usize {
                let x = xs[n * len as usize + i];
                let shifted = (x - 1.5) as f64;
                want[(n * UNARY.len() + o) * len as usize + i] = match op {
                    Unary::Neg => -shifted,
                    Unary::Exp => shifted.exp(),
                    Unary::Log => (x as f64).ln(),
                    Unary::Tanh => shifted.tanh(),
                    Unary::Sqrt => (x as f64).sqrt(),
                    Unary::Erf => libm::erf(shifted),
                    Unary::Abs => shifted.abs(),
                };
            }
        }
    }
    // f32 functions: within a few ulps of the f64 values.
    assert_close("unary", &bufs[1], &want, 4.0 * f32::EPSILON as f64);
}

/// Four reductions in one vector loop (add, sub, max, min), then a map and an
/// accumulating map that reads a loop-invariant accumulator.
fn reductions_kernel(len: u32) -> Kernel {
    let mut kb = KernelBuilder::new("reductions");
    let a = kb.input("a", &[B, f(len)]);
    let b = kb.input("b", &[B, f(len)]);
    let out = kb.output("out", &[B, f(4)]);
    let y = kb.output("y", &[B, f(len)]);
    let z = kb.arg("z", &[B, f(len)], Mode::InOut);
    let [n, v1, v2] = [kb.var("n"), kb.var("v1"), kb.var("v2")];
    let [dot, neg, hi, lo, scale] = ["dot", "neg", "hi", "lo", "scale"].map(|s| kb.acc(s));
    let la = |w| ld(a, vec![v(n), v(w)]);
    let lb = |w| ld(b, vec![v(n), v(w)]);
    let body = vec![
        set(dot, c(0.0)),
        set(neg, c(1.0)),
        set(hi, c(f32::NEG_INFINITY)),
        set(lo, c(f32::INFINITY)),
        set(scale, c(0.5)),
        vlp(
            v1,
            len,
            vec![
                add_to(dot, Expr::mul(la(v1), lb(v1))),
                set(neg, Expr::sub(acc(neg), la(v1))),
                set(hi, Expr::bin(Binary::Max, acc(hi), Expr::mul(la(v1), lb(v1)))),
                set(lo, Expr::bin(Binary::Min, la(v1), acc(lo))),
            ],
        ),
        store(out, vec![v(n), Affine::constant(0)], acc(dot)),
        store(out, vec![v(n), Affine::constant(1)], acc(neg)),
        store(out, vec![v(n), Affine::constant(2)], acc(hi)),
        store(out, vec![v(n), Affine::constant(3)], acc(lo)),
        vlp(
            v2,
            len,
            vec![
                store(y, vec![v(n), v(v2)], Expr::add(Expr::mul(la(v2), acc(scale)), lb(v2))),
                accumulate(
                    z,
                    vec![v(n), v(v2)],
                    Expr::mul(Expr::un(Unary::Sqrt, Expr::un(Unary::Abs, la(v2))), lb(v2)),
                ),
            ],
        ),
    ];
    kb.finish(n, Extent::Batch, body)
}

fn vector_reductions_and_maps(be: Backend) {
    for len in [1u32, 3, 4, 7, 8, 12, 13, 21] {
        let k = reductions_kernel(len);
        let batch = 2u64;
        let mut rng = Rng::new(100 + len as u64);
        let mut bufs = random_bufs(&k, batch, &mut rng, -2.0, 2.0);
        let (a, b, z0) = (bufs[0].clone(), bufs[1].clone(), bufs[4].clone());
        exec(be, &k, &mut bufs, batch);
        let l = len as usize;
        let mut out = Vec::new();
        let (mut y, mut z) = (Vec::new(), Vec::new());
        for n in 0..batch as usize {
            let a = &a[n * l..(n + 1) * l];
            let b = &b[n * l..(n + 1) * l];
            let prods = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64);
            out.push(prods.clone().sum::<f64>());
            out.push(1.0 - a.iter().map(|x| *x as f64).sum::<f64>());
            out.push(prods.fold(f64::NEG_INFINITY, f64::max));
            out.push(a.iter().map(|x| *x as f64).fold(f64::INFINITY, f64::min));
            for i in 0..l {
                y.push(a[i] as f64 * 0.5 + b[i] as f64);
                z.push(z0[n * l + i] as f64 + (a[i] as f64).abs().sqrt() * b[i] as f64);
            }
        }
        assert_close(&format!("reductions len={len}"), &bufs[2], &out, 1e-5);
        assert_close(&format!("map len={len}"), &bufs[3], &y, 1e-6);
        assert_close(&format!("accumulating map len={len}"), &bufs[4], &z, 1e-6);
    }
}

fn grid_subrange(be: Backend) {
    // Only grid iterations 1..3 of 4 run; the others leave their outputs alone.
    let mut kb = KernelBuilder::new("copy_rows");
    let x = kb.input("x", &[B, f(2)]);
    let y = kb.output("y", &[B, f(2)]);
    let [n, i] = [kb.var("n"), kb.var("i")];
    let k = kb.finish(n, Extent::Batch, vec![lp(i, 2, vec![store(y, vec![v(n), v(i)], ld(x, vec![v(n), v(i)]))])]);
    let mut bufs = [(1..=8).map(|e| e as f32).collect::<Vec<f32>>(), vec![0.0; 8]];
    let mut views: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    match be {
        Backend::Interp => pdgc_codegen::interp::run_range(&k, &mut views, 4, 1, 3).unwrap(),
        Backend::Scalar | Backend::Vector => {
            let compiled = jit(be == Backend::Vector).compile(&[k]).unwrap();
            compiled[0].run(&mut views, 4, 1, 3).unwrap();
        }
        Backend::CudaC => unreachable!("not run on CUDA C (see mod cuda_c)"),
    }
    assert_eq!(bufs[1], vec![0.0, 0.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]);
}

fn nan_semantics(be: Backend) {
    // `max`/`min` propagate NaN (also through a vector max reduction), `!=` is the only
    // comparison true on NaN, and `max(-0, +0)` is `+0`.
    let mut kb = KernelBuilder::new("nan");
    let x = kb.input("x", &[f(9)]);
    let y = kb.output("y", &[f(8)]);
    let [g, j] = [kb.var("g"), kb.var("j")];
    let m = kb.acc("m");
    let x0 = || ld(x, vec![Affine::constant(0)]);
    let flag = |cond: Cond| Expr::select(cond, c(1.0), c(0.0));
    let at = |i: i64| vec![Affine::constant(i)];
    let body = vec![
        store(y, at(0), Expr::bin(Binary::Max, x0(), c(0.0))),
        store(y, at(1), Expr::bin(Binary::Min, c(0.0), x0())),
        store(y, at(2), flag(cmp(CmpOp::Ne, x0(), x0()))),
        store(y, at(3), flag(cmp(CmpOp::Eq, x0(), x0()))),
        store(y, at(4), flag(cmp(CmpOp::Lt, x0(), c(0.0)))),
        store(y, at(5), Expr::bin(Binary::Max, c(-0.0), c(0.0))),
        set(m, c(f32::NEG_INFINITY)),
        vlp(j, 9, vec![set(m, Expr::bin(Binary::Max, acc(m), ld(x, vec![v(j)])))]),
        store(y, at(6), acc(m)),
        store(y, at(7), Expr::bin(Binary::Min, c(0.0), c(-0.0))),
    ];
    let k = kb.finish(g, Extent::Fixed(1), body);
    let mut xs = vec![1.0f32; 9];
    xs[0] = f32::NAN;
    let mut bufs = vec![xs, vec![7.0; 8]];
    exec(be, &k, &mut bufs, 0);
    let y = &bufs[1];
    assert!(y[0].is_nan() && y[1].is_nan() && y[6].is_nan(), "{y:?}");
    assert_eq!(&y[2..5], &[1.0, 0.0, 0.0]);
    assert_eq!(y[5].to_bits(), 0.0f32.to_bits());
    assert_eq!(y[7].to_bits(), (-0.0f32).to_bits());
    // Without the NaN, the vector max reduction finds the maximum.
    let mut xs: Vec<f32> = (0..9).map(|e| (e as f32 - 4.0).abs()).collect();
    xs[0] = 0.5;
    let mut bufs = vec![xs, vec![7.0; 8]];
    exec(be, &k, &mut bufs, 0);
    assert_eq!(bufs[1][6], 4.0);
}

/// Vector loops with lane masks mixed with loop-invariant conditions, invariant indices
/// and loads, a fused subtracting reduction, and a loop-carried dependence that must
/// stay scalar.
fn selects_kernel() -> Kernel {
    let mut kb = KernelBuilder::new("selects");
    let x = kb.input("x", &[f(2), f(9)]);
    let w = kb.input("w", &[f(2)]);
    let y = kb.output("y", &[f(2), f(9)]);
    let z = kb.output("z", &[f(2), f(9)]);
    let out = kb.output("out", &[f(2)]);
    let chain = kb.arg("chain", &[f(2), f(9)], Mode::InOut);
    let [g, j, k, m] = ["g", "j", "k", "m"].map(|s| kb.var(s));
    let s = kb.acc("s");
    let xj = || ld(x, vec![v(g), v(j)]);
    let body = vec![
        vlp(
            j,
            9,
            vec![
                store(
                    y,
                    vec![v(g), v(j)],
                    Expr::select(
                        Cond::And(vec![in_range(v(g), 0, 1), cmp(CmpOp::Gt, xj(), c(0.0))]),
                        xj(),
                        Expr::un(Unary::Neg, xj()),
                    ),
                ),
                store(
                    z,
                    vec![v(g), v(j)],
                    Expr::select(
                        in_range(v(g), 1, 2),
                        Expr::mul(xj(), ld(w, vec![v(g)])),
                        Expr::add(Expr::Index(v(g)), c(1.0)),
                    ),
                ),
            ],
        ),
        set(s, c(0.0)),
        vlp(k, 9, vec![set(s, Expr::sub(acc(s), Expr::mul(ld(x, vec![v(g), v(k)]), ld(x, vec![v(g), v(k)]))))]),
        store(out, vec![v(g)], acc(s)),
        // chain[g, m+1] = 2·chain[g, m]: each step reads the previous step's store.
        vlp(m, 8, vec![store(chain, vec![v(g), v(m).offset(1)], Expr::mul(c(2.0), ld(chain, vec![v(g), v(m)])))]),
    ];
    kb.finish(g, Extent::Fixed(2), body)
}

fn vector_selects_and_invariants(be: Backend) {
    let k = selects_kernel();
    let mut rng = Rng::new(21);
    let mut bufs = random_bufs(&k, 0, &mut rng, -1.0, 1.0);
    let (x, w) = (bufs[0].clone(), bufs[1].clone());
    bufs[5] = vec![1.0; 18];
    exec(be, &k, &mut bufs, 0);
    let mut want_y = Vec::new();
    let mut want_z = Vec::new();
    let mut want_out = Vec::new();
    for g in 0..2 {
        let row = &x[g * 9..(g + 1) * 9];
        for &xv in row {
            want_y.push(if g == 0 && xv > 0.0 { xv } else { -xv });
            want_z.push(if g == 1 { xv * w[g] } else { g as f32 + 1.0 });
        }
        want_out.push(-row.iter().map(|xv| *xv as f64 * *xv as f64).sum::<f64>());
    }
    assert_eq!(bufs[2], want_y);
    assert_eq!(bufs[3], want_z);
    assert_close("fused subtracting reduction", &bufs[4], &want_out, 1e-5);
    let powers: Vec<f32> = (0..9).map(|e| (1u32 << e) as f32).collect();
    assert_eq!(bufs[5], [powers.clone(), powers].concat());
    if be == Backend::Vector {
        // The masked selects did take the vector path.
        let text = jit(true).clif_text(&k).unwrap();
        assert!(text.contains("bitselect") && text.contains("bmask"), "{text}");
    }
}

/// Loads that move two elements per step of a vector loop (a stride-2 pool's taps): a map
/// `y[g, j] = max(x[g, 2j], x[g, 2j+1]) + w[g]·x[g, 2j+2]` over 11 outputs (two chunks of
/// four lanes and a scalar tail; the last tap reads the row's last element) and a reduction
/// `out[g] = Σ_j x[g, 2j+1]`.
fn stride_two_kernel() -> Kernel {
    let mut kb = KernelBuilder::new("stride_two");
    let x = kb.input("x", &[f(2), f(23)]);
    let w = kb.input("w", &[f(2)]);
    let y = kb.output("y", &[f(2), f(11)]);
    let out = kb.output("out", &[f(2)]);
    let [g, j, k] = ["g", "j", "k"].map(|s| kb.var(s));
    let s = kb.acc("s");
    let tap = |var: VarId, offset: i64| ld(x, vec![v(g), Affine::default().plus(var, 2).offset(offset)]);
    let body = vec![
        vlp(
            j,
            11,
            vec![store(
                y,
                vec![v(g), v(j)],
                Expr::add(Expr::bin(Binary::Max, tap(j, 0), tap(j, 1)), Expr::mul(ld(w, vec![v(g)]), tap(j, 2))),
            )],
        ),
        set(s, c(0.0)),
        vlp(k, 11, vec![set(s, Expr::add(acc(s), tap(k, 1)))]),
        store(out, vec![v(g)], acc(s)),
    ];
    kb.finish(g, Extent::Fixed(2), body)
}

fn stride_two_loads(be: Backend) {
    let k = stride_two_kernel();
    let mut rng = Rng::new(7);
    let mut bufs = random_bufs(&k, 0, &mut rng, -1.0, 1.0);
    let (x, w) = (bufs[0].clone(), bufs[1].clone());
    exec(be, &k, &mut bufs, 0);
    let mut want_y = Vec::new();
    let mut want_out = Vec::new();
    for g in 0..2 {
        let row = &x[g * 23..(g + 1) * 23];
        for j in 0..11 {
            want_y.push((row[2 * j].max(row[2 * j + 1]) + w[g] * row[2 * j + 2]) as f64);
        }
        want_out.push((0..11).map(|j| row[2 * j + 1] as f64).sum::<f64>());
    }
    assert_close("stride-2 map", &bufs[2], &want_y, 1e-6);
    assert_close("stride-2 reduction", &bufs[3], &want_out, 1e-5);
    if be == Backend::Vector {
        // Both loops took the vector path, with the even-lane shuffle.
        let text = jit(true).clif_text(&k).unwrap();
        assert!(text.matches("shuffle").count() >= 2, "{text}");
    }
}

/// Private memory (an im2col's columns between the gather and the product): per example,
/// `t[i, j] = 2·x[n, i + j]` (a vector loop) for `i < 3`, `j < 6`; then `y[n, j] =
/// t[2, 5 - j] - t[0, j]` and the product `z[n, m, j] = Σ_i W[m, i]·t[i, j]`. Every
/// iteration overwrites all of `t` before it reads it, and the workers reuse their memory,
/// so a stale or shared `t` shows in `y` and `z`.
fn private_kernel() -> Kernel {
    let mut kb = KernelBuilder::new("private");
    let x = kb.input("x", &[Dim::Batch, f(8)]);
    let w = kb.input("W", &[f(4), f(3)]);
    let t = kb.arg("t", &[f(3), f(6)], Mode::Private);
    let y = kb.output("y", &[Dim::Batch, f(6)]);
    let z = kb.output("z", &[Dim::Batch, f(4), f(6)]);
    let [n, i, j, jj, m, kk, jz] = ["n", "i", "j", "jj", "m", "k", "jz"].map(|s| kb.var(s));
    let body = vec![
        lp(
            i,
            3,
            vec![vlp(j, 6, vec![store(t, vec![v(i), v(j)], Expr::mul(c(2.0), ld(x, vec![v(n), v(i).plus(j, 1)])))])],
        ),
        vlp(
            jj,
            6,
            vec![store(
                y,
                vec![v(n), v(jj)],
                Expr::sub(
                    ld(t, vec![Affine::constant(2), Affine::constant(5).plus(jj, -1)]),
                    ld(t, vec![Affine::constant(0), v(jj)]),
                ),
            )],
        ),
        Stmt::Contract(Contract {
            m,
            n: jz,
            k: kk,
            extents: [Extent::Fixed(4), Extent::Fixed(6), Extent::Fixed(3)],
            a: Operand { arg: w, index: vec![v(m), v(kk)] },
            b: Operand { arg: t, index: vec![v(kk), v(jz)] },
            c: Operand { arg: z, index: vec![v(n), v(m), v(jz)] },
            accumulate: false,
        }),
    ];
    kb.finish(n, Extent::Batch, body)
}

fn private_memory(be: Backend) {
    let k = private_kernel();
    let batch = 5;
    let mut rng = Rng::new(11);
    let mut bufs = random_bufs(&k, batch, &mut rng, -1.0, 1.0);
    assert_eq!(bufs.len(), 4, "no buffer is bound to the private argument");
    let (x, w) = (bufs[0].clone(), bufs[1].clone());
    exec(be, &k, &mut bufs, batch);
    let (mut want_y, mut want_z) = (Vec::new(), Vec::new());
    for e in 0..batch as usize {
        let t = |i: usize, j: usize| 2.0 * x[e * 8 + i + j] as f64;
        want_y.extend((0..6).map(|j| t(2, 5 - j) - t(0, j)));
        for m in 0..4 {
            want_z.extend((0..6).map(|j| (0..3).map(|i| w[m * 3 + i] as f64 * t(i, j)).sum::<f64>()));
        }
    }
    assert_close("y", &bufs[2], &want_y, 1e-6);
    assert_close("z", &bufs[3], &want_z, 1e-5);
    if matches!(be, Backend::Scalar | Backend::Vector) {
        // Split over threads, each with its own private memory.
        let compiled = jit(be == Backend::Vector).compile(std::slice::from_ref(&k)).unwrap();
        assert!(compiled[0].is_parallel(), "private memory does not stand in the way of the split");
        let mut again = random_bufs(&k, batch, &mut Rng::new(11), -1.0, 1.0);
        let mut views: Vec<&mut [f32]> = again.iter_mut().map(|b| b.as_mut_slice()).collect();
        compiled[0].run_parallel(&mut views, batch, 2).unwrap();
        assert_close("y on 2 threads", &again[2], &want_y, 1e-6);
        assert_close("z on 2 threads", &again[3], &want_z, 1e-5);
    }
}

/// A private buffer read before the iteration writes it gives NaN in the interpreter (its
/// memory starts as NaN in every iteration), so tests see such a read.
#[test]
fn the_interpreter_shows_a_read_of_unwritten_private_memory() {
    let mut kb = KernelBuilder::new("stale");
    let t = kb.arg("t", &[f(2)], Mode::Private);
    let y = kb.output("y", &[Dim::Batch]);
    let n = kb.var("n");
    let body =
        vec![store(y, vec![v(n)], ld(t, vec![Affine::constant(1)])), store(t, vec![Affine::constant(1)], c(1.0))];
    let k = kb.finish(n, Extent::Batch, body);
    let mut bufs = vec![vec![0.0f32; 3]];
    exec(Backend::Interp, &k, &mut bufs, 3);
    assert!(bufs[0].iter().all(|x| x.is_nan()), "{:?}", bufs[0]);
}

// ---------------------------------------------------------------------------------------
// Cross-checks on random inputs: scalar JIT == interpreter bit for bit, vector JIT close.

fn cross_check(k: &Kernel, batch: u64, lo: f32, hi: f32, tol: f64) {
    let mut rng = Rng::new(42);
    let inputs = random_bufs(k, batch, &mut rng, lo, hi);
    let mut results = Vec::new();
    for be in ALL {
        let mut bufs = inputs.clone();
        exec(be, k, &mut bufs, batch);
        results.push(bufs);
    }
    for (i, a) in k.bound().enumerate() {
        if a.mode == Mode::In {
            continue;
        }
        let what = format!("{}: {}", k.name, a.name);
        assert_bits_eq(&format!("{what} (scalar JIT vs interpreter)"), &results[1][i], &results[0][i]);
        let want: Vec<f64> = results[0][i].iter().map(|x| *x as f64).collect();
        assert_close(&format!("{what} (vector JIT vs interpreter)"), &results[2][i], &want, tol);
    }
}

#[test]
fn backends_agree_on_random_inputs() {
    cross_check(&matmul_kernel(5, 11, 6), 1, -1.0, 1.0, 1e-5);
    cross_check(&matmul_nt_kernel(5, 29, 6), 1, -1.0, 1.0, 1e-5);
    cross_check(&conv2d_kernel(&CONV), 4, -1.0, 1.0, 1e-5);
    cross_check(
        &conv2d_kernel(&ConvGeom { cin: 3, cout: 3, groups: 3, h: 9, w: 5, k: 2, stride: 1, pad: 1, dil: 3 }),
        2,
        -1.0,
        1.0,
        1e-5,
    );
    cross_check(&batch_sum_kernel(), 9, -1.0, 1.0, 1e-6);
    cross_check(&argmax_kernel(3, 17), 3, -1.0, 1.0, 0.0);
    cross_check(&unary_kernel(13), 2, 0.1, 3.0, 0.0);
    cross_check(&reductions_kernel(37), 3, -2.0, 2.0, 1e-5);
    cross_check(&selects_kernel(), 0, -1.0, 1.0, 1e-5);
    cross_check(&stride_two_kernel(), 0, -1.0, 1.0, 1e-5);
}

/// Inputs for the math functions, `batch × len` of them: special values first, then
/// floats from every binade and dense ones in `[-12, 12]`.
fn math_inputs(batch: u64, len: u32) -> Vec<f32> {
    let specials = [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        -f32::from_bits(1),
        f32::MAX,
        f32::MIN,
        88.72,
        88.73,
        -87.5,
        -103.5,
        -104.5,
        0.625,
        -0.625,
        0.927_734_4,
        4.0,
        -4.5,
        1.0,
        -1.0,
        0.5,
    ];
    let mut rng = Rng::new(17);
    let mut xs: Vec<f32> = specials.to_vec();
    while xs.len() < (batch * len as u64) as usize {
        // A random sign, binade and mantissa.
        let x = f32::from_bits((rng.next_u64() >> 32) as u32);
        xs.push(if x.is_nan() { 1.5 } else { x });
        xs.push(rng.vec(1, -12.0, 12.0)[0]);
    }
    xs.truncate((batch * len as u64) as usize);
    xs
}

/// `exp`, `log`, `tanh`, `erf` on vector lanes are the scalar functions' very operation
/// sequences: on special values and inputs spread over every binade, the vector JIT, the
/// scalar JIT and the interpreter agree bit for bit, and the vector loop makes no calls.
#[test]
fn vector_functions_agree_bit_for_bit() {
    const OPS: [Unary; 4] = [Unary::Exp, Unary::Log, Unary::Tanh, Unary::Erf];
    let len = 64u32;
    let mut kb = KernelBuilder::new("functions");
    let x = kb.input("x", &[B, f(len)]);
    // One output per function: a vector loop stores to each argument at one index only.
    let ys = OPS.map(|op| kb.output(&format!("{op:?}"), &[B, f(len)]));
    let [n, i] = [kb.var("n"), kb.var("i")];
    let stores =
        OPS.iter().zip(ys).map(|(op, y)| store(y, vec![v(n), v(i)], Expr::un(*op, ld(x, vec![v(n), v(i)])))).collect();
    let k = kb.finish(n, Extent::Batch, vec![vlp(i, len, stores)]);
    let text = jit(true).clif_text(&k).unwrap();
    assert!(!text.contains("call "), "the vector loop still calls a function:\n{text}");

    let batch = 40u64;
    let xs = math_inputs(batch, len);
    let mut results = Vec::new();
    for be in ALL {
        let mut bufs = vec![xs.clone(); 1 + OPS.len()];
        exec(be, &k, &mut bufs, batch);
        results.push(bufs.split_off(1));
    }
    for (o, op) in OPS.iter().enumerate() {
        assert_bits_eq(&format!("{op:?}: scalar JIT vs interpreter"), &results[1][o], &results[0][o]);
        assert_bits_eq(&format!("{op:?}: vector JIT vs interpreter"), &results[2][o], &results[0][o]);
    }
    let at = |o: usize, j: usize| results[2][o][j];
    // exp, log, tanh, erf of NaN, inf, -inf, 0, -0 (the first row holds the specials).
    for (o, op) in OPS.iter().enumerate() {
        assert!(at(o, 0).is_nan() && at(o, 1).is_nan(), "{op:?} of NaN");
    }
    assert_eq!([at(0, 2), at(0, 3), at(0, 4), at(0, 12)], [f32::INFINITY, 0.0, 1.0, f32::INFINITY]);
    assert_eq!([at(1, 2), at(1, 4), at(1, 5)], [f32::INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY]);
    assert!(at(1, 3).is_nan() && at(1, 10).is_nan(), "log of a negative number");
    for o in [2, 3] {
        assert_eq!([at(o, 2), at(o, 3), at(o, 9), at(o, 10)], [1.0, -1.0, 1.0, -1.0]);
        assert_eq!([at(o, 4).to_bits(), at(o, 5).to_bits()], [0.0f32.to_bits(), (-0.0f32).to_bits()]);
    }
}

/// A vector loop that only maps `exp`, `log`, `tanh` or `erf` over a contiguous run runs as
/// one call of the natively compiled map (the widest vectors the host has), in place or
/// into another buffer, and gives the interpreter's bits on every input.
#[test]
fn native_maps_agree_bit_for_bit() {
    const OPS: [Unary; 4] = [Unary::Exp, Unary::Log, Unary::Tanh, Unary::Erf];
    let (batch, len) = (40u64, 67u32);
    let xs = math_inputs(batch, len);
    for op in OPS {
        for in_place in [false, true] {
            let mut kb = KernelBuilder::new("map");
            let x = kb.arg("x", &[B, f(len)], Mode::InOut);
            let y = kb.output("y", &[B, f(len)]);
            let [n, i] = [kb.var("n"), kb.var("i")];
            let target = if in_place { x } else { y };
            let body = store(target, vec![v(n), v(i)], Expr::un(op, ld(x, vec![v(n), v(i)])));
            let k = kb.finish(n, Extent::Batch, vec![vlp(i, len, vec![body])]);
            let text = jit(true).clif_text(&k).unwrap();
            assert!(text.contains("call "), "{op:?}: the map is not one call:\n{text}");
            let mut results = Vec::new();
            for be in ALL {
                let mut bufs = vec![xs.clone(), vec![0.0; xs.len()]];
                exec(be, &k, &mut bufs, batch);
                results.push(bufs.remove(usize::from(!in_place)));
            }
            for (be, r) in ALL.iter().zip(&results).skip(1) {
                assert_bits_eq(&format!("{op:?} (in place {in_place}): {be:?} vs interpreter"), r, &results[0]);
            }
        }
    }
}
#[test]
fn run_parallel_matches_a_single_thread() {
    let k = conv2d_kernel(&CONV);
    let batch = 7;
    let compiled = jit(true).compile(std::slice::from_ref(&k)).unwrap().remove(0);
    assert!(compiled.is_parallel());
    let mut rng = Rng::new(9);
    let inputs = random_bufs(&k, batch, &mut rng, -1.0, 1.0);
    let mut single = inputs.clone();
    let mut views: Vec<&mut [f32]> = single.iter_mut().map(|b| b.as_mut_slice()).collect();
    compiled.run(&mut views, batch, 0, batch).unwrap();
    for threads in [1, 2, 3, 16] {
        let mut multi = inputs.clone();
        let mut views: Vec<&mut [f32]> = multi.iter_mut().map(|b| b.as_mut_slice()).collect();
        compiled.run_parallel(&mut views, batch, threads).unwrap();
        assert_bits_eq(&format!("conv2d on {threads} threads"), &multi[3], &single[3]);
    }
}

/// One grid iteration of `c[m, n] (+)= Σ_k a[m, k] · b[.., ..]`, with `b` stored `[n, k]`
/// where `b_by_rows` (both operands contiguous along `k`), else `[k, n]`; `c` is read and
/// written (random at the start) so that an accumulating product adds to it.
fn contraction_kernel([m, k, n]: [u32; 3], b_by_rows: bool, accumulate: bool) -> Kernel {
    let mut kb = KernelBuilder::new("gemm");
    let a = kb.input("a", &[f(m), f(k)]);
    let b = kb.input("b", &if b_by_rows { [f(n), f(k)] } else { [f(k), f(n)] });
    let c_arg = kb.arg("c", &[f(m), f(n)], Mode::InOut);
    let [g, vm, vn, vk] = [kb.var("g"), kb.var("m"), kb.var("n"), kb.var("k")];
    let contract = Stmt::Contract(Contract {
        m: vm,
        n: vn,
        k: vk,
        extents: [Extent::Fixed(m), Extent::Fixed(n), Extent::Fixed(k)],
        a: Operand { arg: a, index: vec![v(vm), v(vk)] },
        b: Operand { arg: b, index: if b_by_rows { vec![v(vn), v(vk)] } else { vec![v(vk), v(vn)] } },
        c: Operand { arg: c_arg, index: vec![v(vm), v(vn)] },
        accumulate,
    });
    kb.finish(g, Extent::Fixed(1), vec![contract])
}

/// Runs `kernel` (a [`contraction_kernel`]) on each of `threads` pools: every result close
/// to the interpreter's and all of them the same bits.
fn check_contraction(what: &str, kernel: &Kernel, threads: &[usize]) {
    // One grid iteration, so the kernel runs on the calling thread and its GEMM on the
    // pool of the thread count asked for; the GEMM never splits the sum over k.
    let compiled = jit(true).compile(std::slice::from_ref(kernel)).unwrap().remove(0);
    let mut rng = Rng::new(3);
    let inputs = random_bufs(kernel, 0, &mut rng, -1.0, 1.0);
    let mut want = inputs.clone();
    exec(Backend::Interp, kernel, &mut want, 0);
    let wanted: Vec<f64> = want[2].iter().map(|x| *x as f64).collect();
    let mut first: Option<Vec<f32>> = None;
    for &threads in threads {
        let mut bufs = inputs.clone();
        let mut views: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        compiled.run_parallel(&mut views, 0, threads).unwrap();
        let what = format!("{what} on {threads} threads");
        assert_close(&format!("{what} vs interpreter"), &bufs[2], &wanted, 1e-5);
        match &first {
            Some(f) => assert_bits_eq(&what, &bufs[2], f),
            None => first = Some(bufs[2].clone()),
        }
    }
}

#[test]
fn a_contraction_gives_the_same_bits_on_any_number_of_pool_threads() {
    check_contraction("gemm", &contraction_kernel([96, 200, 130], false, false), &[1, 2, 4, 2]);
}

#[test]
fn a_dot_shaped_contraction_matches_the_interpreter_on_any_number_of_threads() {
    // Both operands contiguous along a long `k` (a weight gradient's layout), which the
    // CPU backend runs through a column-major scratch matrix; overwritten and accumulated.
    for accumulate in [false, true] {
        let kernel = contraction_kernel([37, 700, 45], true, accumulate);
        check_contraction(&format!("dot-shaped gemm (accumulate {accumulate})"), &kernel, &[1, 2, 4]);
    }
}

#[test]
fn run_parallel_keeps_a_kernel_it_cannot_prove_independent_on_one_thread() {
    // The grid writes y[2g] and y[2g+1]: independent, but not in the form the check
    // recognizes, so the kernel runs serially (and correctly).
    let mut kb = KernelBuilder::new("pairs");
    let x = kb.input("x", &[f(8)]);
    let y = kb.output("y", &[f(8)]);
    let [g, i] = [kb.var("g"), kb.var("i")];
    let idx = Affine::default().plus(g, 2).plus(i, 1);
    let k = kb.finish(
        g,
        Extent::Fixed(4),
        vec![lp(i, 2, vec![store(y, vec![idx.clone()], Expr::mul(c(3.0), ld(x, vec![idx])))])],
    );
    let compiled = jit(true).compile(&[k]).unwrap().remove(0);
    assert!(!compiled.is_parallel());
    let mut bufs = [(0..8).map(|e| e as f32).collect::<Vec<f32>>(), vec![0.0; 8]];
    let mut views: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    compiled.run_parallel(&mut views, 0, 4).unwrap();
    assert_eq!(bufs[1], (0..8).map(|e| 3.0 * e as f32).collect::<Vec<f32>>());
}
