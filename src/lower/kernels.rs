//! Kernel generators for the ops whose equations are not yet lowered generically (pools,
//! norms, losses; activations and adds go through `lower::equation`, linears, convs and
//! layers in index notation through `lower::index`): one
//! function per (op, phase). Each returns a complete kernel of the kernel IR; `lower`
//! decides which run, in what order, on which buffers. GEMM-shaped work is a contraction
//! node (`ir::Contract`), which each backend maps onto its best matrix-product code.
//!
//! Conventions: per-example buffers have a leading batch dim and are laid out row-major
//! in the node's shape; a kernel may view a buffer flattened (same element count).
//! Grids run over the batch (`n`), except the kernels that sum over the batch
//! (non-private gradients, clipped sums), whose grid runs over parameter rows.
//! `first` means "this kernel is the first to write this gradient": it overwrites
//! (gathers) or zero-fills before scattering; later contributions accumulate.

use pdgc_codegen::ir::{Affine, Binary, CmpOp, Cond, Expr, Extent, Kernel, Stmt, Unary, VarId};

use super::builder::*;
use super::window::{idx, lanes, spatial_vars, Window};
use crate::error::Result;
use crate::graph::PoolKind;

fn cat(a: Vec<Affine>, b: Vec<Affine>) -> Vec<Affine> {
    let mut a = a;
    a.extend(b);
    a
}

// ---------------------------------------------------------------------------------------
// Forward

pub struct PoolGeom {
    pub kind: PoolKind,
    pub channels: usize,
    pub window: Window,
}

pub fn pool_forward(name: &str, p: &PoolGeom) -> Result<Kernel> {
    let w = &p.window;
    let mut kb = KernelBuilder::new(name);
    let xs: Vec<usize> = [&[p.channels][..], &w.input].concat();
    let ys: Vec<usize> = [&[p.channels][..], &w.output].concat();
    let x = kb.input("x", batched(&xs));
    let y = kb.output("y", batched(&ys));
    let n = kb.var("n");
    let ch = kb.var("c");
    let o = spatial_vars(&mut kb, w.spatial(), true);
    let k = spatial_vars(&mut kb, w.spatial(), false);
    let a = kb.acc("acc");
    let xi = w.input_index(&o, &k);
    let xv = load(x, cat(vec![v(n), v(ch)], xi.clone()));
    let (init, update, finish) = match p.kind {
        PoolKind::Max => (lit(f32::NEG_INFINITY), Expr::bin(Binary::Max, acc(a), xv), acc(a)),
        PoolKind::Avg => {
            let count = w.kernel.iter().product::<usize>() as f32;
            (lit(0.0), Expr::add(acc(a), xv), Expr::div(acc(a), lit(count)))
        }
    };
    let out_ix = cat(vec![v(n), v(ch)], idx(&o));
    let outer = [&[ch][..], &o].concat();
    let extents = [&[p.channels][..], &w.output].concat();
    let body = match unrolled_taps(w, &o, UNROLLED_TAPS) {
        // No padding: the taps' reads as one expression (no loop, no register per tap).
        Some(taps) => {
            let mut reads = taps.into_iter().map(|t| load(x, cat(vec![v(n), v(ch)], t)));
            let first = reads.next().expect("a window has taps");
            let value = match p.kind {
                PoolKind::Max => reads.fold(first, |m, r| Expr::bin(Binary::Max, m, r)),
                PoolKind::Avg => {
                    let count = w.kernel.iter().product::<usize>() as f32;
                    Expr::div(reads.fold(first, Expr::add), lit(count))
                }
            };
            // One store per output: a vector loop along the last output axis where the
            // window rule allows (taps moving one or two elements per output).
            let per_output = vec![store(y, out_ix, value)];
            match o.last() {
                Some(&last) if lanes(w, last, &per_output) => vnest(&outer, &extents, per_output),
                _ => nest(&outer, &extents, per_output),
            }
        }
        None => {
            let mut s = vec![set(a, init)];
            s.extend(nest(&k, &w.kernel, guarded(w.guards(&xi), vec![set(a, update)])));
            s.push(store(y, out_ix, finish));
            nest(&outer, &extents, s)
        }
    };
    kb.finish(n, Extent::Batch, body)
}

/// Windows of at most this many taps are unrolled (no padding only): a max pool's
/// backward then tests tap `i` against the `i` before it, so the work grows as its square.
const UNROLLED_TAPS: usize = 9;

/// The input index of every tap of a window without padding and with at most `most` taps,
/// in the loop nest's order (the last axis fastest), at output position `o`; `None` for
/// any other window.
fn unrolled_taps(w: &Window, o: &[VarId], most: usize) -> Option<Vec<Vec<Affine>>> {
    let taps: usize = w.kernel.iter().product();
    if taps > most || (0..w.spatial()).any(|a| w.pad_lo[a] > 0 || w.pad_hi[a] > 0) {
        return None;
    }
    let mut all = vec![Vec::new()];
    for a in 0..w.spatial() {
        let along = |k: usize| Affine::default().plus(o[a], w.stride[a] as i64).offset((k * w.dilation[a]) as i64);
        all = all
            .into_iter()
            .flat_map(|t: Vec<Affine>| (0..w.kernel[a]).map(move |k| cat(t.clone(), vec![along(k)])))
            .collect();
    }
    Some(all)
}

/// Whether the windows tile the input exactly: no padding, no overlap, no gap, nothing
/// left over, so every input element lies in exactly one window.
fn tiles(w: &Window) -> bool {
    (0..w.spatial()).all(|a| {
        w.pad_lo[a] == 0
            && w.pad_hi[a] == 0
            && w.dilation[a] == 1
            && w.stride[a] == w.kernel[a]
            && w.input[a] == w.output[a] * w.stride[a]
    })
}

pub fn global_avg_pool_forward(name: &str, channels: usize, positions: usize) -> Result<Kernel> {
    let mut kb = KernelBuilder::new(name);
    let x = kb.input("x", batched(&[channels, positions]));
    let y = kb.output("y", batched(&[channels]));
    let [n, ch, s] = [kb.var("n"), kb.var("c"), kb.var("s")];
    let a = kb.acc("acc");
    let body = vec![lp(
        ch,
        channels,
        vec![
            set(a, lit(0.0)),
            vlp(s, positions, vec![add_to(a, load(x, vec![v(n), v(ch), v(s)]))]),
            store(y, vec![v(n), v(ch)], Expr::div(acc(a), lit(positions as f32))),
        ],
    )];
    kb.finish(n, Extent::Batch, body)
}

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
// Loss: per-example loss and its gradient w.r.t. the network output.

/// Softmax cross-entropy: `loss[n] = logsumexp(z) − z[y_n]`, `dz = softmax(z) − onehot`.
/// Labels arrive as floats (class indices are exact in f32 up to 2^24).
pub fn cross_entropy(name: &str, classes: usize) -> Result<Kernel> {
    let mut kb = KernelBuilder::new(name);
    let z = kb.input("logits", batched(&[classes]));
    let y = kb.input("label", batched(&[]));
    let loss = kb.output("loss", batched(&[]));
    let dz = kb.output("dlogits", batched(&[classes]));
    let [n, k] = [kb.var("n"), kb.var("k")];
    let [mx, sum, picked] = [kb.acc("max"), kb.acc("sumexp"), kb.acc("picked")];
    let zk = load(z, vec![v(n), v(k)]);
    let is_label = Cond::Cmp { op: CmpOp::Eq, a: Expr::Index(v(k)), b: load(y, vec![v(n)]) };
    let onehot = Expr::select(is_label, lit(1.0), lit(0.0));
    let lse = Expr::add(acc(mx), Expr::un(Unary::Log, acc(sum)));
    let body = vec![
        set(mx, lit(f32::NEG_INFINITY)),
        lp(k, classes, vec![set(mx, Expr::bin(Binary::Max, acc(mx), zk.clone()))]),
        set(sum, lit(0.0)),
        set(picked, lit(0.0)),
        lp(
            k,
            classes,
            vec![
                add_to(sum, Expr::un(Unary::Exp, Expr::sub(zk.clone(), acc(mx)))),
                add_to(picked, Expr::mul(onehot.clone(), zk.clone())),
            ],
        ),
        store(loss, vec![v(n)], Expr::sub(lse.clone(), acc(picked))),
        lp(k, classes, vec![store(dz, vec![v(n), v(k)], Expr::sub(Expr::un(Unary::Exp, Expr::sub(zk, lse)), onehot))]),
    ];
    kb.finish(n, Extent::Batch, body)
}

/// `loss[n] = mean_i (p − t)²`, `dp = 2(p − t)/D`.
pub fn mse(name: &str, size: usize) -> Result<Kernel> {
    let mut kb = KernelBuilder::new(name);
    let p = kb.input("pred", batched(&[size]));
    let t = kb.input("target", batched(&[size]));
    let loss = kb.output("loss", batched(&[]));
    let dp = kb.output("dpred", batched(&[size]));
    let [n, i] = [kb.var("n"), kb.var("i")];
    let a = kb.acc("sq");
    let diff = Expr::sub(load(p, vec![v(n), v(i)]), load(t, vec![v(n), v(i)]));
    let body = vec![
        set(a, lit(0.0)),
        vlp(
            i,
            size,
            vec![
                add_to(a, Expr::mul(diff.clone(), diff.clone())),
                store(dp, vec![v(n), v(i)], Expr::mul(lit(2.0 / size as f32), diff)),
            ],
        ),
        store(loss, vec![v(n)], Expr::div(acc(a), lit(size as f32))),
    ];
    kb.finish(n, Extent::Batch, body)
}

// ---------------------------------------------------------------------------------------
// Backward: input gradients.

/// Whether tap `i` (its value `xv`) of an unrolled window holds the window's maximum
/// `ymax` and no tap before it does: the tap that takes the gradient.
fn first_max(taps: &[(Vec<Affine>, Expr)], i: usize, xv: &Expr, ymax: &Expr) -> Cond {
    let mut conds = vec![Cond::Cmp { op: CmpOp::Eq, a: xv.clone(), b: ymax.clone() }];
    conds.extend(taps[..i].iter().map(|(_, e)| Cond::Cmp { op: CmpOp::Ne, a: e.clone(), b: ymax.clone() }));
    if conds.len() == 1 {
        conds.remove(0)
    } else {
        Cond::And(conds)
    }
}

/// Max pool: the gradient goes to the first maximum of each window (PyTorch's choice);
/// average pool: spread evenly (padding counted, as PyTorch's default).
pub fn pool_backward(name: &str, p: &PoolGeom, first: bool) -> Result<Kernel> {
    let w = &p.window;
    let mut kb = KernelBuilder::new(name);
    let xs: Vec<usize> = [&[p.channels][..], &w.input].concat();
    let ys: Vec<usize> = [&[p.channels][..], &w.output].concat();
    let x = kb.input("x", batched(&xs));
    let y = kb.input("y", batched(&ys));
    let dy = kb.input("dy", batched(&ys));
    let dx = kb.target("dx", batched(&xs), first);
    let n = kb.var("n");
    let ch = kb.var("c");
    let o = spatial_vars(&mut kb, w.spatial(), true);
    let k = spatial_vars(&mut kb, w.spatial(), false);
    let xi = w.input_index(&o, &k);
    let target = cat(vec![v(n), v(ch)], xi.clone());
    let out_ix = cat(vec![v(n), v(ch)], idx(&o));
    // An unpadded max pool's small window, unrolled: tap `i` takes the gradient where it
    // holds the maximum and no tap before it does. Where the windows tile the input, each
    // element of `dx` is written once, so the first writer stores (no zeroing first).
    let unrolled = if p.kind == PoolKind::Max { unrolled_taps(w, &o, UNROLLED_TAPS) } else { None };
    let stores = first && unrolled.is_some() && tiles(w);
    let mut body = Vec::new();
    if first && !stores {
        let zero_vars: Vec<VarId> = (0..xs.len()).map(|a| kb.var(&format!("z{a}"))).collect();
        let zero_ix = cat(vec![v(n)], idx(&zero_vars));
        body.extend(vnest(&zero_vars, &xs, vec![store(dx, zero_ix, lit(0.0))]));
    }
    let outer = [&[ch][..], &o].concat();
    let extents = [&[p.channels][..], &w.output].concat();
    // Where a tap's writes are vector lanes by the window rule (stride 1: the windows
    // overlap), one loop nest per tap, whose last loop writes distinct elements of `dx`.
    // Each element of `dx` still receives its windows' contributions, in tap order rather
    // than window order. Otherwise one nest for all taps (a stride-2 pool's four passes
    // were slower).
    let per_out = match (p.kind, unrolled) {
        (PoolKind::Max, Some(taps)) => {
            let ymax = load(y, out_ix.clone());
            let xs: Vec<(Vec<Affine>, Expr)> = taps
                .into_iter()
                .map(|t| (cat(vec![v(n), v(ch)], t.clone()), load(x, cat(vec![v(n), v(ch)], t))))
                .collect();
            let per_tap: Vec<Stmt> = xs
                .iter()
                .enumerate()
                .map(|(i, (at, xv))| {
                    let grad = Expr::select(first_max(&xs, i, xv, &ymax), load(dy, out_ix.clone()), lit(0.0));
                    put(dx, at.clone(), grad, stores)
                })
                .collect();
            if o.last().is_some_and(|&last| lanes(w, last, &per_tap)) {
                body.extend(per_tap.into_iter().flat_map(|s| vnest(&outer, &extents, vec![s])));
                return kb.finish(n, Extent::Batch, body);
            }
            let g = kb.acc("g");
            let mut s = vec![set(g, load(dy, out_ix.clone()))];
            for (i, (at, xv)) in xs.iter().enumerate() {
                s.push(put(dx, at.clone(), Expr::select(first_max(&xs, i, xv, &ymax), acc(g), lit(0.0)), stores));
            }
            s
        }
        (PoolKind::Max, None) => {
            let g = kb.acc("g");
            let found = kb.acc("found");
            let xv = load(x, target.clone());
            let is_max = Cond::Cmp { op: CmpOp::Eq, a: xv.clone(), b: load(y, out_ix.clone()) };
            let take = Cond::And(vec![is_max.clone(), Cond::Cmp { op: CmpOp::Eq, a: acc(found), b: lit(0.0) }]);
            let mut s = vec![set(found, lit(0.0)), set(g, load(dy, out_ix.clone()))];
            s.extend(nest(
                &k,
                &w.kernel,
                guarded(
                    w.guards(&xi),
                    vec![
                        accumulate(dx, target.clone(), Expr::select(take, acc(g), lit(0.0))),
                        set(found, Expr::bin(Binary::Max, acc(found), Expr::select(is_max, lit(1.0), lit(0.0)))),
                    ],
                ),
            ));
            s
        }
        (PoolKind::Avg, _) => {
            let g = kb.acc("g");
            let count = w.kernel.iter().product::<usize>() as f32;
            let mut s = vec![set(g, Expr::div(load(dy, out_ix.clone()), lit(count)))];
            s.extend(nest(&k, &w.kernel, guarded(w.guards(&xi), vec![accumulate(dx, target.clone(), acc(g))])));
            s
        }
    };
    body.extend(nest(&outer, &extents, per_out));
    kb.finish(n, Extent::Batch, body)
}

pub fn global_avg_pool_backward(name: &str, channels: usize, positions: usize, first: bool) -> Result<Kernel> {
    let mut kb = KernelBuilder::new(name);
    let dy = kb.input("dy", batched(&[channels]));
    let dx = kb.target("dx", batched(&[channels, positions]), first);
    let [n, ch, s] = [kb.var("n"), kb.var("c"), kb.var("s")];
    let value = Expr::div(load(dy, vec![v(n), v(ch)]), lit(positions as f32));
    let body = vec![lp(ch, channels, vec![vlp(s, positions, vec![put(dx, vec![v(n), v(ch), v(s)], value, first)])])];
    kb.finish(n, Extent::Batch, body)
}

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
