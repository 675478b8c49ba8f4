//! Kernel generators for the ops whose equations are not yet lowered generically (the
//! norms; activations and adds go through `lower::equation`; linears, convs, pools, the
//! losses and layers in index notation through `lower::index`): one function per (op,
//! phase). Each returns a complete kernel of the kernel IR; `lower`
//! decides which run, in what order, on which buffers. GEMM-shaped work is a contraction
//! node (`ir::Contract`), which each backend maps onto its best matrix-product code.
//!
//! Conventions: per-example buffers have a leading batch dim and are laid out row-major
//! in the node's shape; a kernel may view a buffer flattened (same element count).
//! Grids run over the batch (`n`), except the kernels that sum over the batch
//! (non-private gradients, clipped sums), whose grid runs over parameter rows.
//! `first` means "this kernel is the first to write this gradient": it overwrites
//! (gathers) or zero-fills before scattering; later contributions accumulate.

use pdgc_codegen::ir::{Affine, Expr, Extent, Kernel, Unary, VarId};

use super::builder::*;
use crate::error::Result;

// ---------------------------------------------------------------------------------------
// Forward

/// Normalization over contiguous rows: the input viewed as `[B, R, Cg, S]` has one
/// statistic per row `r` over its `Cg·S` elements. The affine parameter of an element is
/// `γ[r·Cg + cg]` (group/instance norm) or `γ[s]` (layer norm).
#[derive(Clone, Copy)]
pub struct NormGeom {
    pub rows: usize,
    pub cg: usize,
    pub s: usize,
    pub eps: f32,
    pub affine: bool,
    pub per_element_param: bool,
}

impl NormGeom {
    pub fn size(&self) -> usize {
        self.rows * self.cg * self.s
    }

    pub fn param_len(&self) -> usize {
        if self.per_element_param {
            self.s
        } else {
            self.rows * self.cg
        }
    }

    fn param_index(&self, r: VarId, cg: VarId, s: VarId) -> Affine {
        if self.per_element_param {
            v(s)
        } else {
            v(cg).plus(r, self.cg as i64)
        }
    }
}

/// Writes `y`, and saves `xhat` and `rstd` (1/σ per row) for the backward pass.
pub fn norm_forward(name: &str, g: &NormGeom) -> Result<Kernel> {
    let dims = batched(&[g.rows, g.cg, g.s]);
    let mut kb = KernelBuilder::new(name);
    let x = kb.input("x", dims.clone());
    let gamma =
        g.affine.then(|| (kb.input("gamma", fixed(&[g.param_len()])), kb.input("beta", fixed(&[g.param_len()]))));
    let y = kb.output("y", dims.clone());
    let xhat = kb.output("xhat", dims);
    let rstd = kb.output("rstd", batched(&[g.rows]));
    let [n, r, cg, s] = [kb.var("n"), kb.var("r"), kb.var("cg"), kb.var("s")];
    let [mean, var, rs] = [kb.acc("mean"), kb.acc("var"), kb.acc("rstd")];
    let m = (g.cg * g.s) as f32;
    let ix = vec![v(n), v(r), v(cg), v(s)];
    let xv = load(x, ix.clone());
    let centered = Expr::sub(xv.clone(), acc(mean));
    let normalized = Expr::mul(centered.clone(), acc(rs));
    let out = match gamma {
        Some((ga, be)) => Expr::add(
            Expr::mul(load(ga, vec![g.param_index(r, cg, s)]), normalized.clone()),
            load(be, vec![g.param_index(r, cg, s)]),
        ),
        None => normalized.clone(),
    };
    let body = vec![lp(
        r,
        g.rows,
        vec![
            set(mean, lit(0.0)),
            lp(cg, g.cg, vec![vlp(s, g.s, vec![add_to(mean, xv.clone())])]),
            set(mean, Expr::div(acc(mean), lit(m))),
            set(var, lit(0.0)),
            lp(cg, g.cg, vec![vlp(s, g.s, vec![add_to(var, Expr::mul(centered.clone(), centered))])]),
            set(rs, Expr::div(lit(1.0), Expr::un(Unary::Sqrt, Expr::add(Expr::div(acc(var), lit(m)), lit(g.eps))))),
            store(rstd, vec![v(n), v(r)], acc(rs)),
            lp(cg, g.cg, vec![vlp(s, g.s, vec![store(xhat, ix.clone(), normalized), store(y, ix.clone(), out)])]),
        ],
    )];
    kb.finish(n, Extent::Batch, body)
}

// ---------------------------------------------------------------------------------------
// Backward: input gradients.

/// `dX̂ = dY·γ`, `dX = rstd · (dX̂ − mean(dX̂) − X̂ · mean(dX̂·X̂))` per row.
pub fn norm_backward_input(name: &str, g: &NormGeom, first: bool) -> Result<Kernel> {
    let dims = batched(&[g.rows, g.cg, g.s]);
    let mut kb = KernelBuilder::new(name);
    let dy = kb.input("dy", dims.clone());
    let xhat = kb.input("xhat", dims.clone());
    let rstd = kb.input("rstd", batched(&[g.rows]));
    let gamma = g.affine.then(|| kb.input("gamma", fixed(&[g.param_len()])));
    let dx = kb.target("dx", dims, first);
    let [n, r, cg, s] = [kb.var("n"), kb.var("r"), kb.var("cg"), kb.var("s")];
    let [m1, m2] = [kb.acc("mean_dxhat"), kb.acc("mean_dxhat_xhat")];
    let ix = vec![v(n), v(r), v(cg), v(s)];
    let dxhat = match gamma {
        Some(ga) => Expr::mul(load(dy, ix.clone()), load(ga, vec![g.param_index(r, cg, s)])),
        None => load(dy, ix.clone()),
    };
    let xh = load(xhat, ix.clone());
    let m = (g.cg * g.s) as f32;
    let value = Expr::mul(
        load(rstd, vec![v(n), v(r)]),
        Expr::sub(Expr::sub(dxhat.clone(), acc(m1)), Expr::mul(xh.clone(), acc(m2))),
    );
    let body = vec![lp(
        r,
        g.rows,
        vec![
            set(m1, lit(0.0)),
            set(m2, lit(0.0)),
            lp(
                cg,
                g.cg,
                vec![vlp(s, g.s, vec![add_to(m1, dxhat.clone()), add_to(m2, Expr::mul(dxhat.clone(), xh.clone()))])],
            ),
            set(m1, Expr::div(acc(m1), lit(m))),
            set(m2, Expr::div(acc(m2), lit(m))),
            lp(cg, g.cg, vec![vlp(s, g.s, vec![put(dx, ix.clone(), value, first)])]),
        ],
    )];
    kb.finish(n, Extent::Batch, body)
}
