//! The DP-SGD tail of every layer, after its per-example gradients: squared norms of
//! stored gradients, norms and clip factors, weighted sums, book-keeping's rescaling; and
//! the zeroing of a buffer. (Every gradient itself comes from the derived equations,
//! through `lower::index`.)

use pdgc_codegen::ir::{Binary, Expr, Extent, Kernel, Unary};

use super::builder::*;
use crate::error::Result;

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
