//! Parameter-gradient kernels of the layers not lowered from their derived equations (the
//! norms' non-private and `direct` gradients), and the DP-SGD tail of every layer (norms,
//! clip factors, weighted sums, book-keeping's rescaling).
//!
//! A per-example kernel may also write each example's squared norm of the gradient it
//! computes into `sqnorm[n, slot]` (one slot per parameter tensor): the norms' `direct`
//! fuses it into its epilogue; with `store: false` it computes norms without ever
//! writing the per-example gradient.

use pdgc_codegen::ir::{Binary, Expr, Extent, Kernel, Unary};

use super::builder::*;
use super::kernels::NormGeom;
use crate::error::Result;

/// Where a per-example kernel puts its results.
#[derive(Clone, Copy, Debug)]
pub struct Outputs {
    /// Write the per-example gradient `[B, ...]`.
    pub store: bool,
    /// Write `sqnorm[n, slot]` for the weight (and `slot + 1` for a bias), out of `slots`.
    pub norm: Option<(usize, usize)>,
}

/// `x[r, i] = 0` for a `rows × width` buffer (not batched), grid over the rows.
pub fn zero(name: &str, rows: usize, width: usize) -> Result<Kernel> {
    let mut kb = KernelBuilder::new(name);
    let x = kb.output("x", fixed(&[rows, width]));
    let [r, i] = [kb.var("r"), kb.var("i")];
    kb.finish(r, fx(rows), vec![vlp(i, width, vec![store(x, vec![v(r), v(i)], lit(0.0))])])
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
