//! Sliding windows (convs, pools, crb): their geometry, the loop variables and input indices
//! of a window, and [`window_nest`], the loop nest over every pair of a kernel tap and an
//! output position that runs no bounds guard per element (index-set splitting).
//!
//! Along an axis whose windows reach the padding, the guard `0 ≤ o·stride + k·dilation − pad_lo < input` holds for
//! every tap on one contiguous range of output positions `o` (it fails only within about
//! `pad / stride` positions of either end). So [`window_nest`] runs the innermost output
//! axis as up to three loops: that range with no guard (with stride 1 or 2 a
//! [`LoopKind::Vector`](pdgc_codegen::ir::LoopKind) loop, which the CPU backend runs on SIMD
//! lanes), and the positions before and after it, which check the guard per element. The
//! guards of the other axes do not depend on the innermost output position: they run once
//! per row, around its loops.

use std::ops::Range;

use pdgc_codegen::ir::{Affine, Cond, Stmt, VarId};

use super::builder::*;
use crate::graph::Conv;

/// Sliding-window geometry along the spatial axes (conv, pool, crb).
pub struct Window {
    pub input: Vec<usize>,
    pub output: Vec<usize>,
    pub kernel: Vec<usize>,
    pub stride: Vec<usize>,
    /// Padding before the input along each axis.
    pub pad_lo: Vec<usize>,
    /// Padding after the input along each axis.
    pub pad_hi: Vec<usize>,
    pub dilation: Vec<usize>,
}

impl Window {
    pub fn of_conv(c: &Conv, in_shape: &[usize], out_shape: &[usize]) -> Window {
        Window {
            input: in_shape[1..].to_vec(),
            output: out_shape[1..].to_vec(),
            kernel: c.kernel.clone(),
            stride: c.stride.clone(),
            pad_lo: c.pad_lo.clone(),
            pad_hi: c.pad_hi.clone(),
            dilation: c.dilation.clone(),
        }
    }

    /// Whether the windows tile the input exactly: no padding, no overlap, no gap, nothing
    /// left over, so every input element lies in exactly one window.
    pub fn tiles(&self) -> bool {
        (0..self.spatial()).all(|a| {
            self.pad_lo[a] == 0
                && self.pad_hi[a] == 0
                && self.dilation[a] == 1
                && self.stride[a] == self.kernel[a]
                && self.input[a] == self.output[a] * self.stride[a]
        })
    }

    pub fn spatial(&self) -> usize {
        self.kernel.len()
    }

    /// `o·stride + k·dilation − pad_lo` along each axis.
    pub fn input_index(&self, o: &[VarId], k: &[VarId]) -> Vec<Affine> {
        (0..self.spatial())
            .map(|a| {
                v(o[a])
                    .plus(k[a], self.dilation[a] as i64)
                    .mul_first(self.stride[a] as i64)
                    .offset(-(self.pad_lo[a] as i64))
            })
            .collect()
    }

    /// Where the tap `k` of input channel `ci` (within its group) at the output position `o`
    /// lies in im2col's columns `U[n, g, r, t]`: the row `r = ci·Πkernel + Σ k_a·Π_{b>a}
    /// kernel_b` and the position `t = Σ o_a·Π_{b>a} output_b`. (The layout the tests'
    /// reference im2col writes; the lowering's columns follow their derived equations.)
    #[cfg(test)]
    pub fn column(&self, ci: VarId, k: &[VarId], o: &[VarId]) -> (Affine, Affine) {
        let mut r = Affine::default().plus(ci, self.kernel.iter().product::<usize>() as i64);
        let mut t = Affine::default();
        for a in 0..self.spatial() {
            r = r.plus(k[a], self.kernel[a + 1..].iter().product::<usize>() as i64);
            t = t.plus(o[a], self.output[a + 1..].iter().product::<usize>() as i64);
        }
        (r, t)
    }

    /// Whether axis `a` has padding on either side.
    pub fn padded(&self, a: usize) -> bool {
        self.pad_lo[a] > 0 || self.pad_hi[a] > 0
    }

    /// Bounds guards, only on axes with padding (without padding every window lies inside
    /// the input by the output-size formula).
    pub fn guards(&self, idx: &[Affine]) -> Vec<(Affine, usize)> {
        (0..self.spatial()).filter(|&a| self.padded(a)).map(|a| (idx[a].clone(), self.input[a])).collect()
    }

    /// The output positions `lo..hi` along axis `a` at which tap `k` reads inside the
    /// input: `0 ≤ o·stride + k·dilation − pad_lo < input` exactly there.
    pub fn inside(&self, a: usize, k: usize) -> (usize, usize) {
        let s = self.stride[a].max(1) as i64;
        let out = self.output[a] as i64;
        // The input index is `o·s + base`.
        let base = (k * self.dilation[a]) as i64 - self.pad_lo[a] as i64;
        let lo = ceil_div(-base, s).clamp(0, out);
        let hi = ceil_div(self.input[a] as i64 - base, s).clamp(lo, out);
        (lo as usize, hi as usize)
    }

    /// The smallest and largest input index along axis `a` over the output positions
    /// `positions` (not empty) and every tap.
    fn reach(&self, a: usize, positions: &Range<usize>) -> (i64, i64) {
        let first = (positions.start * self.stride[a]) as i64;
        let last = (positions.end.saturating_sub(1) * self.stride[a]
            + self.kernel[a].saturating_sub(1) * self.dilation[a]) as i64;
        let pad = self.pad_lo[a] as i64;
        (first - pad, last - pad)
    }

    /// Whether some output position and tap reads outside the input along axis `a`.
    fn reads_outside(&self, a: usize) -> bool {
        let (min, max) = self.reach(a, &(0..self.output[a]));
        min < 0 || max >= self.input[a] as i64
    }

    /// Every output position along each axis.
    fn positions(&self) -> Vec<Range<usize>> {
        self.output.iter().map(|&o| 0..o).collect()
    }

    /// The guards of `axes` as conditions.
    fn inside_conds(&self, axes: &[usize], idx: &[Affine]) -> Vec<Cond> {
        axes.iter().map(|&a| in_range(idx[a].clone(), 0, self.input[a] as i64)).collect()
    }

    /// Pairwise disjoint conditions that together hold exactly where one of the guards of
    /// `axes` fails at output positions within `positions` (one range per axis): the first
    /// failing axis reads before or after the input, the axes before it inside. A piece
    /// that no position reaches is left out.
    fn outside_conds(&self, axes: &[usize], idx: &[Affine], positions: &[Range<usize>]) -> Vec<Vec<Cond>> {
        let mut pieces = Vec::new();
        for (j, &a) in axes.iter().enumerate() {
            let (min, max) = self.reach(a, &positions[a]);
            let input = self.input[a] as i64;
            for (lo, hi) in [(min, 0), (input, max + 1)] {
                if lo < hi {
                    let mut piece = self.inside_conds(&axes[..j], idx);
                    piece.push(in_range(idx[a].clone(), lo, hi));
                    pieces.push(piece);
                }
            }
        }
        pieces
    }
}

/// `⌈x / s⌉` for `s > 0`.
fn ceil_div(x: i64, s: i64) -> i64 {
    -(-x).div_euclid(s)
}

trait MulFirst {
    fn mul_first(self, coef: i64) -> Self;
}

impl MulFirst for Affine {
    /// Multiplies the first term's coefficient (the output position's stride).
    fn mul_first(mut self, coef: i64) -> Affine {
        if let Some(t) = self.terms.first_mut() {
            t.coef *= coef;
        }
        self
    }
}

/// The loop variables of a window's output positions (`out`) or of its taps.
pub fn spatial_vars(kb: &mut KernelBuilder, spatial: usize, out: bool) -> Vec<VarId> {
    match (spatial, out) {
        (1, true) => kb.vars(&["ol"]),
        (1, false) => kb.vars(&["kl"]),
        (_, true) => kb.vars(&["oh", "ow"]),
        (_, false) => kb.vars(&["kh", "kw"]),
    }
}

/// The variables as indices.
pub fn idx(vars: &[VarId]) -> Vec<Affine> {
    vars.iter().map(|&x| v(x)).collect()
}

/// The loops over the taps `k` and output positions `o` (outermost first, the taps
/// outside) that run `inside` at each pair whose window reads inside the input, and
/// `outside` at every other pair (an im2col's zeros; nothing for col2im), in the order of
/// the plain nest `for k, o { if guards { inside } else { outside } }`. Both bodies are
/// written in the variables of `k` and `o`, and neither may bind them.
pub fn window_nest(w: &Window, k: &[VarId], o: &[VarId], inside: Vec<Stmt>, outside: Vec<Stmt>) -> Vec<Stmt> {
    nest(k, &w.kernel, window_rows(w, k, o, inside, outside))
}

/// The loops over the output positions `o` of [`window_nest`] for the taps `k`, which
/// enclosing loops bind (a kernel that reduces over the positions for each tap).
///
/// Along the innermost axis, the positions at which every tap reads inside the input form
/// one range: there `inside` runs with no guard (a vector loop when the stride is 1 or 2); only
/// the few positions before and after it check the guard per element. The guards of the
/// other axes check once per row. An axis is guarded only if some position and tap reads
/// outside the input along it. If the bodies' indices cannot be shifted to a range's start
/// (a term `⌊o/div⌋`), every element checks its guards.
pub fn window_rows(w: &Window, k: &[VarId], o: &[VarId], inside: Vec<Stmt>, outside: Vec<Stmt>) -> Vec<Stmt> {
    let xi = w.input_index(o, k);
    rows(w, o, &xi, &inside, &outside).unwrap_or_else(|| {
        let guarded: Vec<usize> = (0..w.spatial()).filter(|&a| w.reads_outside(a)).collect();
        nest(o, &w.output, split(w, &guarded, &xi, &w.positions(), inside, &outside))
    })
}

/// `inside` where the guards of `axes` hold, `outside` where one fails, at output positions
/// within `positions` (one range per axis).
fn split(
    w: &Window,
    axes: &[usize],
    xi: &[Affine],
    positions: &[Range<usize>],
    inside: Vec<Stmt>,
    outside: &[Stmt],
) -> Vec<Stmt> {
    let mut body = when(w.inside_conds(axes, xi), inside);
    if !outside.is_empty() {
        for piece in w.outside_conds(axes, xi, positions) {
            body.extend(when(piece, outside.to_vec()));
        }
    }
    body
}

/// The loops over the output positions (the taps bound outside): the rows, each with its
/// outer guards, and in each row the guard-free range of the innermost axis between its
/// guarded edges. `None` when a body's index cannot be shifted.
fn rows(w: &Window, o: &[VarId], xi: &[Affine], inside: &[Stmt], outside: &[Stmt]) -> Option<Vec<Stmt>> {
    let last = w.spatial() - 1;
    let (ol, extent) = (o[last], w.output[last]);
    let line = if w.reads_outside(last) {
        // Every tap reads inside from the largest start of a tap's range to the smallest end.
        let taps = (0..w.kernel[last]).map(|tap| w.inside(last, tap));
        let lo = taps.clone().map(|(lo, _)| lo).max().unwrap_or(0);
        let hi = taps.map(|(_, hi)| hi).min().unwrap_or(0).max(lo);
        let edge = |positions: Range<usize>| {
            let mut within = w.positions();
            within[last] = positions.clone();
            span(ol, positions.start, positions.end, &split(w, &[last], xi, &within, inside.to_vec(), outside), false)
        };
        // The inside loop moves the input index by the stride per step: SIMD lanes with
        // stride 1, or with 2 for reads (the even lanes of two loads).
        [edge(0..lo)?, span(ol, lo, hi, inside, lanes(w, ol, inside))?, edge(hi..extent)?].concat()
    } else {
        span(ol, 0, extent, inside, lanes(w, ol, inside))?
    };
    let outer: Vec<usize> = (0..last).filter(|&a| w.reads_outside(a)).collect();
    let row = split(w, &outer, xi, &w.positions(), line, &span(ol, 0, extent, outside, true)?);
    Some(nest(&o[..last], &w.output[..last], row))
}

/// Whether the innermost output axis's loops over `body` (at position variable `ol`) are
/// vector loops: where the taps move one element per output position (stride 1), or two
/// (stride 2) and only reads move that way, each store moving one element (im2col's
/// gather, not col2im's scatter); the CPU backend's vector analysis runs those on lanes.
pub fn lanes(w: &Window, ol: VarId, body: &[Stmt]) -> bool {
    let unit_store = |s: &Stmt| match s {
        Stmt::Store { index, .. } => index.split_last().is_some_and(|(last, rest)| {
            last.terms.iter().all(|t| t.var != ol || (t.coef == 1 && t.div == 1))
                && rest.iter().all(|ix| ix.terms.iter().all(|t| t.var != ol))
        }),
        _ => true,
    };
    match w.stride.last() {
        Some(1) => true,
        Some(2) => body.iter().all(unit_store),
        _ => false,
    }
}

/// `body` at the positions `lo..hi` of `var`: a loop over `0..hi-lo` with `var + lo` for
/// `var` (a vector loop when `vector`), the body alone at a single position, nothing for
/// none.
fn span(var: VarId, lo: usize, hi: usize, body: &[Stmt], vector: bool) -> Option<Vec<Stmt>> {
    if hi <= lo || body.is_empty() {
        return Some(Vec::new());
    }
    if hi - lo == 1 {
        return pinned(body.to_vec(), var, lo as i64);
    }
    let body = shifted(body.to_vec(), var, lo as i64)?;
    Some(vec![if vector { vlp(var, hi - lo, body) } else { lp(var, hi - lo, body) }])
}

#[cfg(test)]
mod tests {
    use pdgc_codegen::ir::{Extent, Mode};

    use super::*;

    fn window(input: usize, kernel: usize, stride: usize, pad: (usize, usize), dilation: usize) -> Window {
        let output = (input + pad.0 + pad.1 - dilation * (kernel - 1) - 1) / stride + 1;
        Window {
            input: vec![input],
            output: vec![output],
            kernel: vec![kernel],
            stride: vec![stride],
            pad_lo: vec![pad.0],
            pad_hi: vec![pad.1],
            dilation: vec![dilation],
        }
    }

    #[test]
    fn inside_is_exactly_the_positions_whose_tap_reads_the_input() {
        for (input, kernel, stride, pad, dilation) in [
            (32, 5, 1, (2, 2), 1),
            (7, 3, 2, (1, 0), 1),
            (9, 3, 3, (0, 4), 2),
            (5, 7, 1, (3, 3), 1),
            (4, 3, 2, (5, 1), 1),
        ] {
            let w = window(input, kernel, stride, pad, dilation);
            for k in 0..kernel {
                let (lo, hi) = w.inside(0, k);
                for o in 0..w.output[0] {
                    let x = (o * stride + k * dilation) as i64 - pad.0 as i64;
                    let reads_input = (0..input as i64).contains(&x);
                    assert_eq!(
                        reads_input,
                        (lo..hi).contains(&o),
                        "{input} {kernel} {stride} {pad:?} {dilation}: k {k} o {o}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_outside_pieces_cover_every_failing_index_once() {
        let w = Window {
            input: vec![4, 5],
            output: vec![5, 3],
            kernel: vec![3, 3],
            stride: vec![1, 2],
            pad_lo: vec![1, 1],
            pad_hi: vec![1, 0],
            dilation: vec![1, 1],
        };
        let mut kb = KernelBuilder::new("pieces");
        let o = spatial_vars(&mut kb, 2, true);
        let k = spatial_vars(&mut kb, 2, false);
        let xi = w.input_index(&o, &k);
        let pieces = w.outside_conds(&[0, 1], &xi, &w.positions());
        let holds = |c: &Cond, x: [i64; 2]| match c {
            Cond::InRange { index, lo, hi } => {
                let axis = if *index == xi[0] { 0 } else { 1 };
                (*lo..*hi).contains(&x[axis])
            }
            _ => false,
        };
        for (x0, x1) in (-1..=5).flat_map(|a| (-1..=5).map(move |b| (a, b))) {
            let inside = (0..4).contains(&x0) && (0..5).contains(&x1);
            let matching = pieces.iter().filter(|p| p.iter().all(|c| holds(c, [x0, x1]))).count();
            assert_eq!(matching, usize::from(!inside), "input index ({x0}, {x1})");
        }
    }

    /// The geometry, `(input, kernel, stride, pad_lo, pad_hi, dilation)` per axis, as a conv
    /// with 2 groups of 2 input channels, and its input and output shapes.
    fn conv(axes: &[(usize, usize, usize, usize, usize, usize)]) -> (Conv, Vec<usize>, Vec<usize>) {
        let pick = |f: fn(&(usize, usize, usize, usize, usize, usize)) -> usize| axes.iter().map(f).collect();
        let c = Conv {
            in_channels: 4,
            out_channels: 2,
            kernel: pick(|a| a.1),
            stride: pick(|a| a.2),
            pad_lo: pick(|a| a.3),
            pad_hi: pick(|a| a.4),
            dilation: pick(|a| a.5),
            groups: 2,
            bias: false,
        };
        let input: Vec<usize> = [vec![4], pick(|a| a.0)].concat();
        let output: Vec<usize> =
            [vec![2], axes.iter().map(|&(i, k, s, lo, hi, d)| (i + lo + hi - d * (k - 1) - 1) / s + 1).collect()]
                .concat();
        (c, input, output)
    }

    /// im2col and col2im as the plain nest over taps and positions with a guard on every
    /// element (what the generators wrote before index-set splitting).
    fn guarded_reference(c: &Conv, input: &[usize], output: &[usize]) -> [pdgc_codegen::ir::Kernel; 2] {
        let w = Window::of_conv(c, input, output);
        let cin_g = c.in_channels / c.groups;
        let kprod: usize = c.kernel.iter().product();
        let positions: usize = w.output.iter().product();
        let kernels = [true, false].map(|forward| {
            let mut kb = KernelBuilder::new("reference");
            let x = kb.arg("x", batched(input), if forward { Mode::In } else { Mode::InOut });
            let u =
                kb.arg("u", batched(&[c.groups, cin_g * kprod, positions]), if forward { Mode::Out } else { Mode::In });
            let [n, g, ci] = [kb.var("n"), kb.var("g"), kb.var("ci")];
            let k = spatial_vars(&mut kb, w.spatial(), false);
            let o = spatial_vars(&mut kb, w.spatial(), true);
            let xi = w.input_index(&o, &k);
            let (r, t) = w.column(ci, &k, &o);
            let xs = [vec![v(n), v(ci).plus(g, cin_g as i64)], xi.clone()].concat();
            let us = vec![v(n), v(g), r, t];
            let body = if forward {
                let mut b = vec![store(u, us.clone(), lit(0.0))];
                b.extend(guarded(w.guards(&xi), vec![store(u, us, load(x, xs))]));
                b
            } else {
                guarded(w.guards(&xi), vec![accumulate(x, xs, load(u, us))])
            };
            let nested =
                nest(&[&[g, ci][..], &k, &o].concat(), &[&[c.groups, cin_g][..], &c.kernel, &w.output].concat(), body);
            kb.finish(n, Extent::Batch, nested).expect("reference kernel")
        });
        kernels
    }

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 + seed) * 0.731).sin()).collect()
    }

    fn run(k: &pdgc_codegen::ir::Kernel, bufs: &mut [Vec<f32>]) {
        pdgc_codegen::verify::verify(k).expect("verifies");
        let mut slices: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        pdgc_codegen::interp::run(k, &mut slices, 2).expect("runs");
    }

    /// The im2col and col2im kernels the generic lowering makes (`lower::index`) for a grouped
    /// conv's window, read through its (group, channel) view: the derived gather
    /// `cols'[n, g, ci, k.., o..] = X[n, g, ci, window..]` and scatter `dX[n, g, ci, window..]
    /// += cols'[n, g, ci, k.., o..]`. Returns the two kernels, arguments `(X, cols')` and
    /// `(cols', dX)`.
    fn generic_kernels(c: &Conv, input: &[usize], output: &[usize]) -> [pdgc_codegen::ir::Kernel; 2] {
        use crate::grad::{intern, Access, Equation, Expr, Index, Var};
        use crate::lower::index::{equation_kernel, Batching, TensorInfo, COLUMNS};
        let spatial = c.kernel.len();
        let taps: Vec<Var> = (0..spatial).map(|a| intern(&format!("k{a}"))).collect();
        let outs: Vec<Var> = (0..spatial).map(|a| intern(&format!("o{a}"))).collect();
        let mut ranges = vec![("g", c.groups), ("ci", c.in_channels / c.groups)];
        ranges.extend(taps.iter().copied().zip(c.kernel.iter().copied()));
        ranges.extend(outs.iter().copied().zip(output[1..].iter().copied()));
        let mut window = vec![Index::var("n"), Index::var("g"), Index::var("ci")];
        for a in 0..spatial {
            window.push(Index::window(outs[a], c.stride[a], taps[a], c.dilation[a], c.pad_lo[a]));
        }
        let cols = Access::new(COLUMNS, &[&["n", "g", "ci"][..], &taps, &outs].concat());
        let view = [vec![c.groups, c.in_channels / c.groups], input[1..].to_vec()].concat();
        let padding: Vec<(usize, usize)> =
            [vec![(0, 0); 2], c.pad_lo.iter().copied().zip(c.pad_hi.clone()).collect()].concat();
        let cols_shape = [vec![c.groups, c.in_channels / c.groups], c.kernel.clone(), output[1..].to_vec()].concat();
        let info = |t: &str| match t {
            "X" => Some(TensorInfo { shape: view.clone(), batched: true, padding: padding.clone() }),
            "dX" => Some(TensorInfo::unpadded(view.clone())),
            COLUMNS => Some(TensorInfo::unpadded(cols_shape.clone())),
            _ => None,
        };
        let x = Access { tensor: "X".into(), index: window.clone() };
        let dx = Access { tensor: "dX".into(), index: window };
        let gather = Equation { lhs: cols.clone(), accumulate: false, rhs: Expr::Read(x) };
        let scatter = Equation { lhs: dx, accumulate: true, rhs: Expr::Read(cols) };
        [(gather, "im2col", true), (scatter, "col2im", false)].map(|(eq, name, first)| {
            let (k, tensors) =
                equation_kernel(name, &eq, &ranges, &info, first, Batching::PerExample).expect("a window copy");
            let want = if first { ["X", COLUMNS] } else { [COLUMNS, "dX"] };
            assert_eq!(tensors, want, "{name}'s arguments");
            k
        })
    }

    /// The split im2col writes the same bits as the guarded nest, and the split col2im adds
    /// the same contributions in the same order (bit for bit), on 1-D and 2-D windows with
    /// strides, dilations, asymmetric and unpadded axes, and outputs narrower than a kernel.
    #[test]
    fn split_window_kernels_match_the_guarded_nest_bit_for_bit() {
        let geometries: [&[(usize, usize, usize, usize, usize, usize)]; 7] = [
            &[(9, 5, 1, 2, 2, 1), (7, 3, 1, 1, 1, 1)],
            &[(8, 3, 2, 1, 0, 1), (9, 3, 2, 0, 2, 2)],
            &[(6, 3, 1, 0, 0, 1), (10, 5, 3, 4, 1, 1)],
            &[(5, 4, 1, 3, 2, 1), (4, 5, 1, 4, 4, 1)],
            &[(12, 5, 1, 4, 4, 2)],
            &[(11, 3, 2, 2, 1, 3)],
            &[(7, 1, 1, 0, 0, 1)],
        ];
        for axes in geometries {
            let (c, input, output) = conv(axes);
            let [ref_fwd, ref_bwd] = guarded_reference(&c, &input, &output);
            let [split_fwd, split_bwd] = generic_kernels(&c, &input, &output);
            let cols = 2 * c.in_channels * c.kernel.iter().product::<usize>() * output[1..].iter().product::<usize>();
            let x = values(2 * input.iter().product::<usize>(), 0.5);
            let (mut reference, mut split) = ([x.clone(), vec![f32::NAN; cols]], [x.clone(), vec![f32::NAN; cols]]);
            run(&ref_fwd, &mut reference);
            run(&split_fwd, &mut split);
            let bits = |b: &[f32]| b.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&reference[1]), bits(&split[1]), "im2col {axes:?}");
            let du = values(cols, 3.25);
            // col2im's arguments come in the order (dcols, dx).
            let (mut reference, mut split) = ([x.clone(), du.clone()], [du, x]);
            run(&ref_bwd, &mut reference);
            run(&split_bwd, &mut split);
            assert_eq!(bits(&reference[0]), bits(&split[1]), "col2im {axes:?}");
        }
    }
}
