//! The cost model's formulas: for one parameterized layer, one strategy and a batch size,
//! FLOPs, bytes moved, workspace, per-example memory held and launches — and their time on
//! a device profile. Pure functions of the shapes; the closed forms are the README's
//! strategy table ("`pdgc explain`") and are checked by the unit tests below.
//!
//! Notation (per layer): G groups, p = Cout, d = (Cin/G)·Πk (one group's fan-in), T output
//! positions (1 for a plain linear), P = p·d (+p with a bias) parameters, `a_in`/`a_out`
//! the input/output elements of one example. All tensors are f32 (4 bytes).

use serde::Serialize;

use crate::graph::{numel, Graph, Node, Op};
use crate::ops::Strategy;

use super::device::DeviceProfile;

const F32: u64 = 4;

/// What the per-example work is for; it decides which strategies apply and what follows
/// the per-example gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// Materialized per-example gradients `[B, ...]` (ghost cannot serve).
    Grads,
    /// Per-example gradient norms only.
    Norms,
    /// The DP-SGD clipped sum Σ_n c_n g_n.
    ClippedSum,
}

impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Goal::Grads => "grads",
            Goal::Norms => "norms",
            Goal::ClippedSum => "clipped-sum",
        })
    }
}

/// The shape facts of one parameterized layer that the formulas need.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerDims {
    pub kind: LayerKind,
    pub groups: u64,
    pub p: u64,
    pub d: u64,
    pub t: u64,
    pub params: u64,
    pub a_in: u64,
    pub a_out: u64,
    /// crb only: the positions its grouped convolution computes per (co, ci), ≥ Πk
    /// (the output is then truncated to the kernel size).
    pub crb_positions: u64,
    /// crb only: Cin/G.
    pub cin_per_group: u64,
    /// Layers written in index notation: the FLOPs of one example's ghost norms (Gram
    /// products of the derived gradients' factors), or 0 where some parameter's gradient has
    /// no ghost form.
    #[serde(skip_serializing_if = "is_zero")]
    pub ghost_flops: u64,
    /// Layers written in index notation: their parameter tensors (one kernel each per pass).
    #[serde(skip_serializing_if = "is_zero")]
    pub param_tensors: u64,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    Conv,
    Linear,
    Norm,
    /// A layer written in index notation: its parameter gradients are loop nests
    /// (`p = 1`, `d` = its parameters, `t` = forward FLOPs per parameter multiply-add).
    Index,
}

/// The fraction of peak a layer written in index notation reaches: its kernels are plain
/// loop nests, not tiled contractions.
const INDEX_EFFICIENCY: f64 = 0.02;

impl LayerDims {
    /// The dims of a parameterized node, `None` for ops without parameters.
    pub fn of(graph: &Graph, node: &Node) -> Option<LayerDims> {
        let params: u64 = graph.params_of(node.id).map(|p| numel(&p.shape)).sum();
        let input = &graph.node(*node.inputs.first()?).shape;
        let (a_in, a_out) = (numel(input), numel(&node.shape));
        match &node.op {
            Op::Conv(c) => {
                let t = numel(&node.shape[1..]);
                let cin_g = (c.in_channels / c.groups) as u64;
                // The weight gradient as a convolution of X by dY: stride = forward dilation,
                // dilation = forward stride, "kernel" = the output size.
                let crb_positions = (0..c.spatial())
                    .map(|a| {
                        let padded = (input[a + 1] + c.pad_lo[a] + c.pad_hi[a]) as u64;
                        let span = c.stride[a] as u64 * (node.shape[a + 1] as u64 - 1) + 1;
                        (padded - span) / c.dilation[a] as u64 + 1
                    })
                    .product();
                Some(LayerDims {
                    kind: LayerKind::Conv,
                    groups: c.groups as u64,
                    p: c.out_channels as u64,
                    d: cin_g * numel(&c.kernel),
                    t,
                    params,
                    a_in,
                    a_out,
                    crb_positions,
                    cin_per_group: cin_g,
                    ghost_flops: 0,
                    param_tensors: 0,
                })
            }
            Op::Linear(l) => Some(LayerDims {
                kind: LayerKind::Linear,
                groups: 1,
                p: l.out_features as u64,
                d: l.in_features as u64,
                t: a_out / l.out_features as u64,
                params,
                a_in,
                a_out,
                crb_positions: 1,
                cin_per_group: l.in_features as u64,
                ghost_flops: 0,
                param_tensors: 0,
            }),
            Op::GroupNorm(_) | Op::InstanceNorm(_) | Op::LayerNorm(_) if params > 0 => {
                let channels = (params / 2).max(1);
                Some(LayerDims {
                    kind: LayerKind::Norm,
                    groups: 1,
                    p: channels,
                    d: 1,
                    t: a_out / channels,
                    params,
                    a_in,
                    a_out,
                    crb_positions: 1,
                    cin_per_group: 1,
                    ghost_flops: 0,
                    param_tensors: 0,
                })
            }
            Op::Index(l) if params > 0 => Some(LayerDims {
                kind: LayerKind::Index,
                groups: 1,
                p: 1,
                d: params,
                t: (node.flops / (2 * params)).max(1),
                params,
                a_in,
                a_out,
                crb_positions: 1,
                cin_per_group: 1,
                ghost_flops: index_ghost_flops(node, l),
                param_tensors: graph.params_of(node.id).count() as u64,
            }),
            _ => None,
        }
    }

    /// The strategies that exist for this layer and goal.
    pub fn candidates(&self, goal: Goal) -> Vec<Strategy> {
        use Strategy::*;
        let all: &[Strategy] = match self.kind {
            LayerKind::Conv => &[Naive, Crb, Unfold, Direct, Ghost],
            LayerKind::Linear => &[Naive, Outer, Ghost],
            LayerKind::Norm => &[Direct],
            LayerKind::Index if self.ghost_flops > 0 => crate::ops::INDEX_STRATEGIES,
            LayerKind::Index => &[Naive, Direct],
        };
        all.iter().copied().filter(|s| !(goal == Goal::Grads && *s == Ghost)).collect()
    }

    /// 2·T·p·d: the FLOPs of one example's weight-gradient contraction.
    pub fn contraction_flops(&self) -> u64 {
        2 * self.t * self.p * self.d
    }
}

/// The estimated cost of one strategy on one layer for the whole batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cost {
    pub strategy: Strategy,
    pub flops: u64,
    pub bytes: u64,
    /// Scratch memory needed while the layer runs.
    pub workspace: u64,
    /// Memory held until the clip factors are known (materialized grads, book-keeping's
    /// stored output gradients), or the output itself for `Goal::Grads`.
    pub held: u64,
    pub launches: u64,
    /// Fraction of peak FLOP/s the main contraction reaches.
    pub efficiency: f64,
    pub seconds: f64,
}

impl Cost {
    fn timed(mut self, dev: &DeviceProfile) -> Cost {
        let compute = self.flops as f64 / (dev.peak_flops * self.efficiency.max(1e-3));
        let memory = self.bytes as f64 / dev.bandwidth;
        self.seconds = compute.max(memory) + self.launches as f64 * dev.launch_latency;
        self
    }
}

/// Where a strategy takes the squared norm of the per-example gradient it materializes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NormPass {
    Epilogue,
    InKernel,
    Separate,
}

/// The cost of computing what `goal` asks for this layer with `strategy`, batch `b`.
pub fn strategy_cost(l: &LayerDims, strategy: Strategy, goal: Goal, b: u64, dev: &DeviceProfile) -> Cost {
    let per_example = l.contraction_flops();
    let bias_launch = u64::from(l.params > l.p * l.d && l.kind != LayerKind::Norm);
    // What follows materialized per-example gradients: the squared norms — taken in the
    // contraction's epilogue (no extra read), in a pass inside the same kernel (one read of
    // B·P, no launch), or by kernels of their own (a read and a launch) — and, for the
    // clipped sum, the weighted sum (another read of B·P, a write of P, a launch).
    let after = |norm: NormPass| -> (u64, u64, u64) {
        let norm_read = if norm == NormPass::Epilogue { 0 } else { b * l.params * F32 };
        let norm_launch = u64::from(norm == NormPass::Separate);
        match goal {
            Goal::Grads => (0, 0, 0),
            Goal::Norms => (2 * b * l.params, norm_read, norm_launch),
            Goal::ClippedSum => (4 * b * l.params, norm_read + b * l.params * F32 + l.params * F32, 1 + norm_launch),
        }
    };
    let held_grads = b * l.params * F32;
    let io = b * (l.a_in + l.a_out) * F32;
    let eff_batched = |batch: u64| {
        let m = l.p / l.groups;
        dev.gemm_efficiency(m, l.d, l.t, (batch * l.groups * 2 * l.t * m * l.d) as f64)
    };
    let cost = match strategy {
        Strategy::Naive => {
            // One batch-of-one weight gradient per example; a conv's run on im2col columns,
            // recomputed for the whole batch first where the lowering does not keep them.
            let (f, by, la) = after(NormPass::Separate);
            let m = l.p / l.groups;
            let im2col = recomputes(l, b);
            Cost {
                strategy,
                flops: b * per_example + f,
                bytes: io + 2 * im2col * b * l.groups * l.d * l.t * F32 + held_grads + by,
                workspace: 0,
                held: held_grads,
                launches: im2col + b * (1 + bias_launch) * l.param_tensors.max(1) + la * l.param_tensors.max(1),
                efficiency: if l.kind == LayerKind::Index {
                    INDEX_EFFICIENCY
                } else {
                    dev.gemm_efficiency(m, l.d, l.t, (l.groups * 2 * l.t * m * l.d) as f64)
                },
                seconds: 0.0,
            }
        }
        Strategy::Crb => {
            let (f, by, la) = after(NormPass::Separate);
            let full = b * l.p * l.cin_per_group * l.crb_positions;
            let truncated = full > b * l.p * l.d;
            Cost {
                strategy,
                flops: 2 * b * l.t * l.p * l.cin_per_group * l.crb_positions + f,
                // The grouped conv re-reads X per output channel group and writes the
                // untruncated result, then copies the kernel-sized part out.
                bytes: io + full * F32 * if truncated { 2 } else { 1 } + held_grads + by,
                workspace: if truncated { full * F32 } else { 0 },
                held: held_grads,
                launches: 1 + u64::from(truncated) + bias_launch + la,
                // A grouped conv with B·G groups of one input channel each reuses little.
                efficiency: 0.5 * dev.window_efficiency * eff_batched(b),
                seconds: 0.0,
            }
        }
        Strategy::Unfold => {
            // unfold reads the im2col columns: the forward pass's where the lowering keeps
            // them, else recomputed (one more launch and write) into a workspace that takes
            // the place of the forward pass's: one set of columns is live at a time, counted
            // in the step's base memory. The contraction runs per example and group, then
            // the squared norm of what it wrote, in the same launch.
            let (f, by, la) = after(NormPass::InKernel);
            let unfolded = b * l.groups * l.d * l.t;
            let im2col = recomputes(l, b);
            Cost {
                strategy,
                flops: b * per_example + f,
                bytes: io + (1 + im2col) * unfolded * F32 + held_grads + by,
                workspace: 0,
                held: held_grads,
                launches: 1 + im2col + bias_launch + la,
                efficiency: eff_batched(b),
                seconds: 0.0,
            }
        }
        Strategy::Direct | Strategy::Outer => {
            // Fused: the norm is accumulated in the kernel's epilogue, and for the norms
            // goal the per-example gradient is never written at all — except for layers
            // written in index notation, whose gradients are stored and then normed.
            let index = l.kind == LayerKind::Index;
            let (f, by, la) = after(if index { NormPass::Separate } else { NormPass::Epilogue });
            let written = if goal == Goal::Norms && !index { 0 } else { held_grads };
            Cost {
                strategy,
                flops: b * per_example + f,
                bytes: io + written + by,
                workspace: 0,
                held: written,
                launches: (1 + la) * l.param_tensors.max(1),
                efficiency: match (l.kind, strategy) {
                    (LayerKind::Norm, _) => 1.0,
                    (LayerKind::Index, _) => INDEX_EFFICIENCY,
                    (LayerKind::Conv, _) => dev.window_efficiency * eff_batched(b),
                    _ => eff_batched(b),
                },
                seconds: 0.0,
            }
        }
        Strategy::Ghost if l.kind == LayerKind::Index => {
            // Gram products of the derived gradient's factors per example, then for the
            // clipped sum the gradient summed with the clip factors as weights (one loop
            // nest per parameter); nothing of size B·P is held.
            let gram = b * l.ghost_flops;
            let bk = if goal == Goal::ClippedSum { b * per_example + b } else { 0 };
            Cost {
                strategy,
                flops: gram + bk,
                bytes: io * if goal == Goal::ClippedSum { 2 } else { 1 },
                workspace: 0,
                held: 0,
                launches: l.param_tensors * if goal == Goal::ClippedSum { 2 } else { 1 },
                efficiency: INDEX_EFFICIENCY,
                seconds: 0.0,
            }
        }
        Strategy::Ghost => {
            // ‖dW_n‖² = Σ_g ⟨U_gᵀU_g, G_gᵀG_g⟩ with T×T Gram matrices; for T = 1 it is
            // ‖a‖²·‖g‖² (no Gram matrices). The Gram entries live in registers; a conv's
            // im2col columns are the forward pass's or recomputed (a write and a launch more)
            // into the one set of columns the step's base memory counts: no workspace.
            let (gram_flops, unfolded) = if l.t == 1 {
                (2 * b * (l.p + l.d), 0)
            } else {
                let unfolded = b * l.groups * l.d * l.t;
                (2 * b * l.t * l.t * (l.p + l.groups * l.d) + 2 * b * l.groups * l.t * l.t, unfolded)
            };
            let im2col = recomputes(l, b);
            let mut c = Cost {
                strategy,
                flops: gram_flops,
                bytes: io + (1 + im2col) * unfolded * F32,
                workspace: 0,
                held: 0,
                launches: 3 + im2col,
                efficiency: dev.gemm_efficiency(l.t, l.t, l.d.max(l.p), gram_flops as f64)
                    * if l.t > 1 { dev.gram_efficiency } else { 1.0 },
                seconds: 0.0,
            };
            if goal == Goal::ClippedSum {
                // Book-keeping (Bu et al. 2023): keep dY until the clip factors are known,
                // rescale it by c_n, then one ordinary weight-gradient GEMM over all B·T.
                let bk_flops = b * per_example;
                let bk_eff = dev.gemm_efficiency(l.p, l.d, b * l.t, bk_flops as f64);
                // Fold book-keeping's time into the efficiency of the combined FLOPs.
                let gram_time = gram_flops as f64 / c.efficiency.max(1e-3);
                let bk_time = bk_flops as f64 / bk_eff.max(1e-3);
                c.flops += bk_flops;
                c.efficiency = c.flops as f64 / (gram_time + bk_time);
                c.bytes += io + 2 * b * l.a_out * F32 + l.params * F32 + 2 * im2col * unfolded * F32;
                c.held = b * l.a_out * F32;
                c.launches += 2 + im2col;
            }
            c
        }
    };
    cost.timed(dev)
}

/// The FLOPs of one example's ghost norms for an index-notation layer: per parameter,
/// `G·T²·(2·A + 2·B + 2)` for its derived gradient's ghost form (see
/// `grad::layer::ghost_form`); 0 where a parameter's gradient has none.
fn index_ghost_flops(node: &Node, layer: &crate::index_layer::IndexLayer) -> u64 {
    let mut step = crate::grad::GradStep {
        node: node.id,
        title: String::new(),
        bindings: vec![],
        forward: vec![],
        input_grads: vec![],
        param_grads: vec![],
        ranges: vec![],
    };
    crate::grad::layer::define(node, layer, &vec![true; node.inputs.len()], &mut step);
    let size = |vars: &[&str]| -> u64 {
        vars.iter().map(|v| step.ranges.iter().find(|(u, _)| u == v).map_or(1, |(_, r)| *r as u64)).product()
    };
    let mut total = 0u64;
    for pg in &step.param_grads {
        let Some(f) = crate::grad::layer::ghost_form(&pg.eq) else { return 0 };
        let t = size(&f.t);
        total =
            total.saturating_add(size(&f.g).saturating_mul(t * t).saturating_mul(2 * size(&f.a) + 2 * size(&f.b) + 2));
    }
    total
}

/// Whether the lowering recomputes a conv's im2col columns for each use instead of keeping
/// the forward pass's (where the batch's columns exceed the chunk budget), as 1 or 0. The
/// lowering's cap on the columns kept over the whole net is not modelled.
fn recomputes(l: &LayerDims, b: u64) -> u64 {
    let per_example = l.groups * l.d * l.t * F32;
    let chunked = crate::lower::column_chunk_examples(per_example, b, crate::lower::CHUNK_BYTES).is_some();
    u64::from(l.kind == LayerKind::Conv && chunked)
}

/// The non-private weight gradient: one contraction over all B·T, summed over examples
/// (for a conv, on im2col columns it may recompute: a write, a read and a launch more).
pub fn nonprivate_cost(l: &LayerDims, b: u64, dev: &DeviceProfile) -> Cost {
    let flops = b * l.contraction_flops();
    let im2col = recomputes(l, b);
    let unfolded = im2col * b * l.groups * l.d * l.t;
    Cost {
        strategy: Strategy::Direct,
        flops,
        bytes: b * (l.a_in + l.a_out) * F32 + l.params * F32 + 2 * unfolded * F32,
        workspace: 0,
        held: 0,
        launches: 1 + im2col,
        efficiency: match l.kind {
            LayerKind::Norm => 1.0,
            LayerKind::Index => INDEX_EFFICIENCY,
            _ => dev.gemm_efficiency(l.p, l.d, b * l.t, flops as f64),
        },
        seconds: 0.0,
    }
    .timed(dev)
}

/// Forward plus input-gradient time of any node (the part of a step that every strategy
/// shares): FLOPs ×2 for nodes whose input needs a gradient, bytes in and out.
pub fn shared_node_seconds(graph: &Graph, node: &Node, needs_input_grad: bool, b: u64, dev: &DeviceProfile) -> f64 {
    let passes = if needs_input_grad { 2.0 } else { 1.0 };
    let flops = passes * (b * node.flops) as f64;
    let a_in: u64 = node.inputs.iter().map(|i| numel(&graph.node(*i).shape)).sum();
    let bytes = passes * (b * (a_in + numel(&node.shape)) * F32) as f64;
    let eff = match LayerDims::of(graph, node) {
        Some(l) if l.kind == LayerKind::Index => INDEX_EFFICIENCY,
        Some(l) if l.kind != LayerKind::Norm => dev.gemm_efficiency(l.p, l.d, b * l.t, flops),
        _ => 1.0,
    };
    (flops / (dev.peak_flops * eff.max(1e-3))).max(bytes / dev.bandwidth) + passes * dev.launch_latency
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(src: &str) -> LayerDims {
        let g = crate::compile_front(src).graph.expect("valid test model");
        let node = g.nodes.iter().find(|n| n.layer.as_deref() == Some("l")).expect("layer `l`");
        LayerDims::of(&g, node).expect("parameterized")
    }

    fn conv(input: &str, args: &str) -> LayerDims {
        dims(&format!(
            "model m {{ input x: {input}; label y: classes(2); h = l: conv2d(x, {args}); \
             logits = fc: linear(flatten(h), 2); loss cross_entropy(logits, y); }}"
        ))
    }

    /// The strategy table's closed forms, on shapes with stride, dilation,
    /// padding and groups.
    #[test]
    fn strategy_flops_match_the_closed_forms() {
        let dev = DeviceProfile::h200();
        let cases = [
            ("[3, 32, 32]", "16, 3, padding=1", 16u64, 27u64, 1024u64, 1u64),
            ("[8, 17, 15]", "12, 3, stride=2, dilation=2, padding=1", 12, 72, 8 * 7, 1),
            ("[8, 16, 16]", "8, 3, groups=4, padding=1", 8, 18, 256, 4),
            ("[4, 9, 9]", "6, (3, 2), stride=(2, 1)", 6, 24, 4 * 8, 1),
        ];
        let b = 32;
        for (input, args, p, d, t, g) in cases {
            let l = conv(input, args);
            assert_eq!((l.p, l.d, l.t, l.groups), (p, d, t, g), "{args}");
            let grads = |s| strategy_cost(&l, s, Goal::Grads, b, &dev);
            // naive, unfold, direct: 2BTpd.
            for s in [Strategy::Naive, Strategy::Unfold, Strategy::Direct] {
                assert_eq!(grads(s).flops, 2 * b * t * p * d, "{s} {args}");
            }
            // unfold reads the forward pass's im2col columns (B·G·d·T floats; small enough to
            // be kept here) instead of building its own: no workspace, one more read.
            assert_eq!(grads(Strategy::Unfold).workspace, 0, "{args}");
            assert_eq!(grads(Strategy::Unfold).bytes - grads(Strategy::Direct).bytes, 4 * b * g * d * t, "{args}");
            assert_eq!(grads(Strategy::Direct).workspace, 0);
            // Materialized grads hold B·P floats.
            assert_eq!(grads(Strategy::Direct).held, 4 * b * l.params);
            // ghost (norms): 2BT²(p + G·d) + 2BGT² FLOPs; the Gram entries stay in registers.
            let ghost = strategy_cost(&l, Strategy::Ghost, Goal::Norms, b, &dev);
            assert_eq!(ghost.flops, 2 * b * t * t * (p + g * d) + 2 * b * g * t * t, "{args}");
            assert_eq!(ghost.workspace, 0, "{args}");
            // book-keeping adds one ordinary weight-gradient contraction, 2BTpd.
            let bk = strategy_cost(&l, Strategy::Ghost, Goal::ClippedSum, b, &dev);
            assert_eq!(bk.flops, ghost.flops + 2 * b * t * p * d);
        }
    }

    #[test]
    fn crb_computes_a_truncated_grouped_convolution() {
        let dev = DeviceProfile::h200();
        // Stride 1: the grouped conv's output is exactly the kernel: crb = 2BTpd.
        let l = conv("[3, 32, 32]", "16, 3, padding=1");
        assert_eq!(l.crb_positions, 9);
        assert_eq!(strategy_cost(&l, Strategy::Crb, Goal::Grads, 8, &dev).flops, 2 * 8 * l.t * l.p * l.d);
        // Stride 2 on 32 with k=3, p=0: OH = 15, span 29, positions (32-29)+1 = 4 per axis:
        // 16 computed for 9 kept.
        let l = conv("[3, 32, 32]", "16, 3, stride=2");
        assert_eq!(l.crb_positions, 16);
        let c = strategy_cost(&l, Strategy::Crb, Goal::Grads, 8, &dev);
        assert_eq!(c.flops, 2 * 8 * l.t * l.p * 3 * 16);
        assert!(c.workspace > 0, "the untruncated output needs a buffer");
    }

    #[test]
    fn linear_ghost_is_the_product_of_two_norms() {
        let dev = DeviceProfile::cpu2();
        let l = dims(
            "model m { input x: [100]; label y: classes(10); logits = l: linear(x, 10); loss cross_entropy(logits, y); }",
        );
        assert_eq!((l.p, l.d, l.t), (10, 100, 1));
        assert_eq!(strategy_cost(&l, Strategy::Ghost, Goal::Norms, 4, &dev).flops, 2 * 4 * (10 + 100));
        assert_eq!(strategy_cost(&l, Strategy::Outer, Goal::Grads, 4, &dev).flops, 2 * 4 * 10 * 100);
    }
}
