//! Parameter-gradient kernels of the layers not lowered from their derived equations (the
//! norms' non-private and `direct` gradients; every conv's `crb` and `direct` schedules),
//! and the DP-SGD tail of every layer (norms, clip factors, weighted sums, book-keeping's
//! rescaling).
//!
//! A per-example kernel may also write each example's squared norm of the gradient it
//! computes into `sqnorm[n, slot]` (one slot per parameter tensor): `direct` fuses it
//! into its epilogue; with `store: false` they compute norms without ever
//! writing the per-example gradient.

use pdgc_codegen::ir::{Binary, Expr, Extent, Kernel, Unary, VarId};

use super::builder::*;
use super::kernels::NormGeom;
use super::window::{idx as ix, spatial_vars as spatial, window_rows, Window};
use crate::error::Result;
use crate::graph::Conv;

/// Where a per-example kernel puts its results.
#[derive(Clone, Copy, Debug)]
pub struct Outputs {
    /// Write the per-example gradient `[B, ...]`.
    pub store: bool,
    /// Write `sqnorm[n, slot]` for the weight (and `slot + 1` for a bias), out of `slots`.
    pub norm: Option<(usize, usize)>,
}

fn wshape(c: &Conv) -> Vec<usize> {
    let mut s = vec![c.out_channels, c.in_channels / c.groups];
    s.extend(&c.kernel);
    s
}

fn channel(c: &Conv, co: VarId, ci: VarId) -> pdgc_codegen::ir::Affine {
    if c.groups == 1 {
        v(ci)
    } else {
        v(ci).plus_div(co, (c.in_channels / c.groups) as i64, (c.out_channels / c.groups) as i64)
    }
}

/// `x[r, i] = 0` for a `rows × width` buffer (not batched), grid over the rows.
pub fn zero(name: &str, rows: usize, width: usize) -> Result<Kernel> {
    let mut kb = KernelBuilder::new(name);
    let x = kb.output("x", fixed(&[rows, width]));
    let [r, i] = [kb.var("r"), kb.var("i")];
    kb.finish(r, fx(rows), vec![vlp(i, width, vec![store(x, vec![v(r), v(i)], lit(0.0))])])
}

/// Per-example bias gradient `db[n,co] = Σ_t dY[n,co,t]` (and its squared norm).
pub fn bias_per_example(name: &str, channels: usize, positions: usize, out: Outputs) -> Result<Kernel> {
    let mut kb = KernelBuilder::new(name);
    let dy = kb.input("dy", batched(&[channels, positions]));
    let db = out.store.then(|| kb.output("db", batched(&[channels])));
    let part = out.norm.map(|(_, slots)| kb.arg("sqnorm", batched(&[slots]), pdgc_codegen::ir::Mode::InOut));
    let [n, ch, t] = [kb.var("n"), kb.var("c"), kb.var("t")];
    let [a, sq] = [kb.acc("acc"), kb.acc("sq")];
    let mut per_c = vec![set(a, lit(0.0)), vlp(t, positions, vec![add_to(a, load(dy, vec![v(n), v(ch), v(t)]))])];
    if let Some(db) = db {
        per_c.push(store(db, vec![v(n), v(ch)], acc(a)));
    }
    per_c.push(add_to(sq, Expr::mul(acc(a), acc(a))));
    let mut body = vec![set(sq, lit(0.0)), lp(ch, channels, per_c)];
    if let (Some(part), Some((slot, _))) = (part, out.norm) {
        body.push(store(part, vec![v(n), pdgc_codegen::ir::Affine::constant(slot as i64)], acc(sq)));
    }
    kb.finish(n, Extent::Batch, body)
}

/// `direct`: the fused per-example conv weight gradient, no im2col buffer; the weight's
/// squared norm (and the bias's) accumulated in the epilogue.
pub fn conv_direct(name: &str, c: &Conv, in_shape: &[usize], out_shape: &[usize], out: Outputs) -> Result<Kernel> {
    let w = Window::of_conv(c, in_shape, out_shape);
    let mut kb = KernelBuilder::new(name);
    let x = kb.input("x", batched(in_shape));
    let dy = kb.input("dy", batched(out_shape));
    let gw = out.store.then(|| kb.output("gw", batched(&wshape(c))));
    let gb = (out.store && c.bias).then(|| kb.output("gb", batched(&[c.out_channels])));
    let part = out.norm.map(|(_, slots)| kb.arg("sqnorm", batched(&[slots]), pdgc_codegen::ir::Mode::InOut));
    let n = kb.var("n");
    let co = kb.var("co");
    let ci = kb.var("ci");
    let k = spatial(&mut kb, w.spatial(), false);
    let o = spatial(&mut kb, w.spatial(), true);
    let [a, sq, bsq] = [kb.acc("acc"), kb.acc("sq"), kb.acc("bias_sq")];
    let xi = w.input_index(&o, &k);
    let prod = Expr::mul(
        load(dy, [vec![v(n), v(co)], ix(&o)].concat()),
        load(x, [vec![v(n), channel(c, co, ci)], xi].concat()),
    );
    let mut per_w = vec![set(a, lit(0.0))];
    per_w.extend(window_rows(&w, &k, &o, vec![add_to(a, prod)], Vec::new()));
    if let Some(gw) = gw {
        per_w.push(store(gw, [vec![v(n), v(co), v(ci)], ix(&k)].concat(), acc(a)));
    }
    per_w.push(add_to(sq, Expr::mul(acc(a), acc(a))));
    let mut per_co = nest(&[&[ci][..], &k].concat(), &[&[c.in_channels / c.groups][..], &c.kernel].concat(), per_w);
    if c.bias {
        let o2 = spatial(&mut kb, w.spatial(), true);
        per_co.push(set(a, lit(0.0)));
        per_co.extend(vnest(&o2, &w.output, vec![add_to(a, load(dy, [vec![v(n), v(co)], ix(&o2)].concat()))]));
        if let Some(gb) = gb {
            per_co.push(store(gb, vec![v(n), v(co)], acc(a)));
        }
        per_co.push(add_to(bsq, Expr::mul(acc(a), acc(a))));
    }
    let mut body = vec![set(sq, lit(0.0)), set(bsq, lit(0.0)), lp(co, c.out_channels, per_co)];
    if let (Some(part), Some((slot, _))) = (part, out.norm) {
        body.push(store(part, vec![v(n), pdgc_codegen::ir::Affine::constant(slot as i64)], acc(sq)));
        if c.bias {
            body.push(store(part, vec![v(n), pdgc_codegen::ir::Affine::constant(slot as i64 + 1)], acc(bsq)));
        }
    }
    kb.finish(n, Extent::Batch, body)
}

/// crb (Rochette et al. 2019): the weight gradient as a convolution of X by dY with
/// stride and dilation swapped, computed over every position the grouped convolution
/// produces (`positions` per axis, ≥ the kernel) into `full`; [`crb_truncate`] keeps the
/// kernel-sized part.
pub fn crb_conv(name: &str, c: &Conv, in_shape: &[usize], out_shape: &[usize], positions: &[usize]) -> Result<Kernel> {
    // The grouped conv's taps are its output positions `q`, which read X at
    // q·dilation + o·stride − pad_lo: a window like the conv's with `positions` taps.
    let w = Window { kernel: positions.to_vec(), ..Window::of_conv(c, in_shape, out_shape) };
    let mut kb = KernelBuilder::new(name);
    let x = kb.input("x", batched(in_shape));
    let dy = kb.input("dy", batched(out_shape));
    let mut full_shape = vec![c.out_channels, c.in_channels / c.groups];
    full_shape.extend(positions);
    let full = kb.output("full", batched(&full_shape));
    let n = kb.var("n");
    let co = kb.var("co");
    let ci = kb.var("ci");
    let q = spatial(&mut kb, w.spatial(), false);
    let o = spatial(&mut kb, w.spatial(), true);
    let a = kb.acc("acc");
    let xi = w.input_index(&o, &q);
    let prod = Expr::mul(
        load(dy, [vec![v(n), v(co)], ix(&o)].concat()),
        load(x, [vec![v(n), channel(c, co, ci)], xi].concat()),
    );
    let mut per_q = vec![set(a, lit(0.0))];
    per_q.extend(window_rows(&w, &q, &o, vec![add_to(a, prod)], Vec::new()));
    per_q.push(store(full, [vec![v(n), v(co), v(ci)], ix(&q)].concat(), acc(a)));
    let body = nest(
        &[&[co, ci][..], &q].concat(),
        &[&[c.out_channels, c.in_channels / c.groups][..], positions].concat(),
        per_q,
    );
    kb.finish(n, Extent::Batch, body)
}

/// Copies the kernel-sized corner of crb's output into the per-example gradient.
pub fn crb_truncate(name: &str, c: &Conv, positions: &[usize]) -> Result<Kernel> {
    let mut kb = KernelBuilder::new(name);
    let mut full_shape = vec![c.out_channels, c.in_channels / c.groups];
    full_shape.extend(positions);
    let full = kb.input("full", batched(&full_shape));
    let gw = kb.output("gw", batched(&wshape(c)));
    let n = kb.var("n");
    let vars: Vec<VarId> = (0..2 + c.kernel.len()).map(|i| kb.var(&format!("i{i}"))).collect();
    let index = [vec![v(n)], ix(&vars)].concat();
    let body = vnest(&vars, &wshape(c), vec![store(gw, index.clone(), load(full, index))]);
    kb.finish(n, Extent::Batch, body)
}

fn slot_ix(slot: usize) -> pdgc_codegen::ir::Affine {
    pdgc_codegen::ir::Affine::constant(slot as i64)
}

/// Per-example affine-norm gradients `gγ[n,p] = Σ dY·X̂`, `gβ[n,p] = Σ dY` (direct).
pub fn norm_per_example(name: &str, g: &NormGeom, out: Outputs) -> Result<Kernel> {
    let dims = batched(&[g.rows, g.cg, g.s]);
    let mut kb = KernelBuilder::new(name);
    let dy = kb.input("dy", dims.clone());
    let xhat = kb.input("xhat", dims);
    let gg = out.store.then(|| kb.output("ggamma", batched(&[g.param_len()])));
    let gb = out.store.then(|| kb.output("gbeta", batched(&[g.param_len()])));
    let part = out.norm.map(|(_, slots)| kb.arg("sqnorm", batched(&[slots]), pdgc_codegen::ir::Mode::InOut));
    let [n, r, cg, s] = [kb.var("n"), kb.var("r"), kb.var("cg"), kb.var("s")];
    let [a, b, sqa, sqb] = [kb.acc("dgamma"), kb.acc("dbeta"), kb.acc("sq_gamma"), kb.acc("sq_beta")];
    let ixs = vec![v(n), v(r), v(cg), v(s)];
    let dyv = load(dy, ixs.clone());
    let prod = Expr::mul(dyv.clone(), load(xhat, ixs));
    let mut body = vec![set(sqa, lit(0.0)), set(sqb, lit(0.0))];
    let finish = |p: pdgc_codegen::ir::Affine| {
        let mut s = Vec::new();
        if let (Some(gg), Some(gb)) = (gg, gb) {
            s.push(store(gg, vec![v(n), p.clone()], acc(a)));
            s.push(store(gb, vec![v(n), p], acc(b)));
        }
        s.push(add_to(sqa, Expr::mul(acc(a), acc(a))));
        s.push(add_to(sqb, Expr::mul(acc(b), acc(b))));
        s
    };
    if g.per_element_param {
        // Layer norm: parameter s, summed over the rows.
        let mut per_s = vec![set(a, lit(0.0)), set(b, lit(0.0))];
        per_s.push(lp(r, g.rows, vec![lp(cg, g.cg, vec![add_to(a, prod), add_to(b, dyv)])]));
        per_s.extend(finish(v(s)));
        body.push(lp(s, g.s, per_s));
    } else {
        let mut per_p = vec![set(a, lit(0.0)), set(b, lit(0.0))];
        per_p.push(vlp(s, g.s, vec![add_to(a, prod), add_to(b, dyv)]));
        per_p.extend(finish(v(cg).plus(r, g.cg as i64)));
        body.push(lp(r, g.rows, vec![lp(cg, g.cg, per_p)]));
    }
    if let (Some(part), Some((slot, _))) = (part, out.norm) {
        body.push(store(part, vec![v(n), slot_ix(slot)], acc(sqa)));
        body.push(store(part, vec![v(n), slot_ix(slot + 1)], acc(sqb)));
    }
    kb.finish(n, Extent::Batch, body)
}

/// The non-private affine-norm gradients, summed over the batch (grid over rows `r`
/// for group/instance norm, over `s` for layer norm).
pub fn norm_batch_grad(name: &str, g: &NormGeom) -> Result<Kernel> {
    let dims = batched(&[g.rows, g.cg, g.s]);
    let mut kb = KernelBuilder::new(name);
    let dy = kb.input("dy", dims.clone());
    let xhat = kb.input("xhat", dims);
    let gg = kb.output("dgamma", fixed(&[g.param_len()]));
    let gb = kb.output("dbeta", fixed(&[g.param_len()]));
    let [n, r, cg, s] = [kb.var("n"), kb.var("r"), kb.var("cg"), kb.var("s")];
    let [a, b] = [kb.acc("dgamma"), kb.acc("dbeta")];
    let ixs = vec![v(n), v(r), v(cg), v(s)];
    let dyv = load(dy, ixs.clone());
    let prod = Expr::mul(dyv.clone(), load(xhat, ixs));
    let acc_both = vec![add_to(a, prod), add_to(b, dyv)];
    let (grid, extent, body) = if g.per_element_param {
        let body = vec![
            set(a, lit(0.0)),
            set(b, lit(0.0)),
            batch_loop(n, vec![lp(r, g.rows, vec![lp(cg, g.cg, acc_both)])]),
            store(gg, vec![v(s)], acc(a)),
            store(gb, vec![v(s)], acc(b)),
        ];
        (s, g.s, body)
    } else {
        let p = v(cg).plus(r, g.cg as i64);
        let body = vec![lp(
            cg,
            g.cg,
            vec![
                set(a, lit(0.0)),
                set(b, lit(0.0)),
                batch_loop(n, vec![vlp(s, g.s, acc_both)]),
                store(gg, vec![p.clone()], acc(a)),
                store(gb, vec![p], acc(b)),
            ],
        )];
        (r, g.rows, body)
    };
    kb.finish(grid, fx(extent), body)
}

/// `sqnorm[n, slot] = Σ_j g[n, j]²` of a materialized per-example gradient.
pub fn sqnorm(name: &str, size: usize, slot: usize, slots: usize) -> Result<Kernel> {
    let mut kb = KernelBuilder::new(name);
    let g = kb.input("g", batched(&[size]));
    let part = kb.arg("sqnorm", batched(&[slots]), pdgc_codegen::ir::Mode::InOut);
    let [n, j] = [kb.var("n"), kb.var("j")];
    let a = kb.acc("sq");
    let gv = load(g, vec![v(n), v(j)]);
    let body = vec![
        set(a, lit(0.0)),
        vlp(j, size, vec![add_to(a, Expr::mul(gv.clone(), gv))]),
        store(part, vec![v(n), slot_ix(slot)], acc(a)),
    ];
    kb.finish(n, Extent::Batch, body)
}

/// `norm[n] = sqrt(Σ_slot sqnorm[n, slot])`, then `clip[n] = min(1, C / (norm[n] + 1e-6))`
/// (Opacus' clip factor) with `C = clip_norm[0]`.
pub fn norms_and_clip(name: &str, slots: usize) -> Result<Kernel> {
    let mut kb = KernelBuilder::new(name);
    let part = kb.input("sqnorm", batched(&[slots]));
    let clip_norm = kb.input("clip_norm", fixed(&[1]));
    let norms = kb.output("norms", batched(&[]));
    let clip = kb.output("clip", batched(&[]));
    let [n, s] = [kb.var("n"), kb.var("s")];
    let a = kb.acc("sq");
    let body = vec![
        set(a, lit(0.0)),
        lp(s, slots, vec![add_to(a, load(part, vec![v(n), v(s)]))]),
        set(a, Expr::un(Unary::Sqrt, acc(a))),
        store(norms, vec![v(n)], acc(a)),
        store(
            clip,
            vec![v(n)],
            Expr::bin(Binary::Min, lit(1.0), Expr::div(load(clip_norm, vec![c0()]), Expr::add(acc(a), lit(1e-6)))),
        ),
    ];
    kb.finish(n, Extent::Batch, body)
}

/// `sum[j] = Σ_n clip[n] · g[n, j]`: the clipped sum of materialized gradients, grid over
/// rows of `width` elements.
pub fn weighted_sum(name: &str, rows: usize, width: usize) -> Result<Kernel> {
    let mut kb = KernelBuilder::new(name);
    let g = kb.input("g", batched(&[rows, width]));
    let clip = kb.input("clip", batched(&[]));
    let sum = kb.output("sum", fixed(&[rows, width]));
    let [row, j, n] = [kb.var("row"), kb.var("j"), kb.var("n")];
    let w = kb.acc("w");
    let body = vec![
        vlp(j, width, vec![store(sum, vec![v(row), v(j)], lit(0.0))]),
        batch_loop(
            n,
            vec![
                set(w, load(clip, vec![v(n)])),
                vlp(
                    j,
                    width,
                    vec![accumulate(sum, vec![v(row), v(j)], Expr::mul(acc(w), load(g, vec![v(n), v(row), v(j)])))],
                ),
            ],
        ),
    ];
    kb.finish(row, fx(rows), body)
}

/// Book-keeping's rescaling (Bu et al. 2023): `dy_clipped[n, i] = clip[n] · dy[n, i]`.
pub fn scale_rows(name: &str, size: usize) -> Result<Kernel> {
    let mut kb = KernelBuilder::new(name);
    let dy = kb.input("dy", batched(&[size]));
    let clip = kb.input("clip", batched(&[]));
    let out = kb.output("dy_clipped", batched(&[size]));
    let [n, i] = [kb.var("n"), kb.var("i")];
    let w = kb.acc("w");
    let body = vec![
        set(w, load(clip, vec![v(n)])),
        vlp(i, size, vec![store(out, vec![v(n), v(i)], Expr::mul(acc(w), load(dy, vec![v(n), v(i)])))]),
    ];
    kb.finish(n, Extent::Batch, body)
}
