//! The cost model: for one parameterized layer, one strategy and a batch size, the FLOPs,
//! bytes moved, workspace, per-example memory held and launches of its kernels — read off
//! the programs that `lower` makes with that strategy — and their time on a device profile.
//!
//! How (see [`measure`]): for each strategy, the graph is lowered with every layer that can
//! take it taking it, and each launch of the goal's entry is costed from its kernel's IR
//! ([`pdgc_codegen::analysis::work`]): contractions at the GEMM efficiency of their shape, loop-nest
//! operations at the device's loop-nest efficiencies, bytes at its bandwidth, plus a launch
//! latency per run. A layer's cost under a strategy is the sum over the launches done for
//! it (its forward pass, input gradients and per-example work: what the strategy changes
//! and what it does not, so layers compare as the step runs). Only the device's efficiency
//! curves live here and in [`DeviceProfile`]; every count comes from the kernels, so the
//! estimates cannot drift from what runs.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::error::Result;
use crate::grad::GradGraph;
use crate::graph::{numel, Graph, Node, NodeId, Op};
use crate::lower::{lower, EntryKind, LaunchMode, Program, Role, Schedule};
use crate::ops::Strategy;

use super::device::DeviceProfile;

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

impl Goal {
    /// The program entry that computes what this goal asks for.
    pub fn entry(self) -> EntryKind {
        match self {
            Goal::Grads => EntryKind::PerExampleGrads,
            Goal::Norms => EntryKind::PerExampleNorms,
            Goal::ClippedSum => EntryKind::ClippedSum,
        }
    }
}

/// The shape facts of one parameterized layer that `explain` shows and the strategy
/// rules need.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerDims {
    pub kind: LayerKind,
    pub groups: u64,
    pub p: u64,
    pub d: u64,
    pub t: u64,
    pub params: u64,
    /// Layers written in index notation: whether every parameter's derived gradient has a
    /// ghost form (`grad::layer::ghost_form`), so ghost norms exist for it.
    #[serde(skip_serializing_if = "is_false")]
    pub ghost_form: bool,
    /// Layers written in index notation: whether a statement reads through a window, so
    /// that `unfold` and `direct` differ (`IndexLayer::reads_windows`).
    #[serde(skip_serializing_if = "is_false")]
    pub windows: bool,
}

fn is_false(x: &bool) -> bool {
    !*x
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    Conv,
    Linear,
    Norm,
    /// A layer written in index notation (`p = 1`, `d` = its parameters, `t` = forward
    /// FLOPs per parameter multiply-add).
    Index,
}

impl LayerDims {
    /// The dims of a parameterized node, `None` for ops without parameters.
    pub fn of(graph: &Graph, grads: &GradGraph, node: &Node) -> Option<LayerDims> {
        let params: u64 = graph.params_of(node.id).map(|p| numel(&p.shape)).sum();
        let a_out = numel(&node.shape);
        let dims =
            |kind, groups, p, d, t| LayerDims { kind, groups, p, d, t, params, ghost_form: false, windows: false };
        match &node.op {
            Op::Conv(c) => {
                let cin_g = (c.in_channels / c.groups) as u64;
                Some(dims(
                    LayerKind::Conv,
                    c.groups as u64,
                    c.out_channels as u64,
                    cin_g * numel(&c.kernel),
                    numel(&node.shape[1..]),
                ))
            }
            Op::Linear(l) => Some(dims(
                LayerKind::Linear,
                1,
                l.out_features as u64,
                l.in_features as u64,
                a_out / l.out_features as u64,
            )),
            Op::GroupNorm(_) | Op::InstanceNorm(_) | Op::LayerNorm(_) if params > 0 => {
                let channels = (params / 2).max(1);
                Some(dims(LayerKind::Norm, 1, channels, 1, a_out / channels))
            }
            Op::Index(l) if params > 0 => {
                let ghost_form = grads.step(node.id).is_some_and(|s| {
                    !s.param_grads.is_empty()
                        && s.param_grads.iter().all(|pg| crate::grad::layer::ghost_form(&pg.eq).is_some())
                });
                Some(LayerDims {
                    ghost_form,
                    windows: l.reads_windows(),
                    ..dims(LayerKind::Index, 1, 1, params, (node.flops / (2 * params)).max(1))
                })
            }
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
            LayerKind::Index if self.windows => crate::ops::INDEX_STRATEGIES,
            LayerKind::Index => crate::ops::PLAIN_INDEX_STRATEGIES,
        };
        let ghost = self.kind != LayerKind::Index || self.ghost_form;
        all.iter().copied().filter(|s| *s != Ghost || (goal != Goal::Grads && ghost)).collect()
    }
}

/// The estimated cost of one strategy on one layer for the whole batch: the launches done
/// for the layer in the goal's entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cost {
    pub strategy: Strategy,
    pub flops: u64,
    pub bytes: u64,
    /// Scratch memory its launches bind (im2col columns, book-keeping's rescaled output
    /// gradient, crb's untruncated output), at its largest.
    pub workspace: u64,
    /// Memory held until the clip factors are known (materialized grads, book-keeping's
    /// stored output gradients), or the output itself for `Goal::Grads`.
    pub held: u64,
    pub launches: u64,
    /// The fraction of peak FLOP/s its operations reach on the whole.
    pub efficiency: f64,
    pub seconds: f64,
}

/// Every candidate's cost at one batch size, read from lowered programs.
pub struct Measured {
    /// Per layer and strategy: its launches in the goal's entry.
    pub layers: HashMap<(NodeId, Strategy), Cost>,
    /// Per layer: its launches in the non-private batch-gradient entry.
    pub nonprivate: HashMap<NodeId, Cost>,
    /// Seconds of the goal's launches done for no layer with parameters (activations,
    /// pools, the loss, the norms and clip factors), which no strategy changes.
    pub shared_private: f64,
    /// The same for the non-private entry.
    pub shared_nonprivate: f64,
}

/// Lowers `graph` once per strategy (each layer that can take it does, the others take
/// their first candidate) at batch `b`, and reads every layer's cost under each of its
/// candidates from the launches of the goal's entry. A strategy whose program cannot be
/// lowered (a buffer too large for the kernel IR) is left out of every layer's candidates.
pub fn measure(
    graph: &Graph,
    grads: &GradGraph,
    layers: &[(NodeId, LayerDims)],
    goal: Goal,
    b: u64,
    (chunk_bytes, private_bytes): (u64, u64),
    dev: &DeviceProfile,
) -> Result<Measured> {
    let mut measured =
        Measured { layers: HashMap::new(), nonprivate: HashMap::new(), shared_private: 0.0, shared_nonprivate: 0.0 };
    let mut first_error = None;
    let mut shared_done = false;
    for s in Strategy::ALL {
        let takes: Vec<NodeId> =
            layers.iter().filter(|(_, d)| d.candidates(goal).contains(&s)).map(|(n, _)| *n).collect();
        if takes.is_empty() {
            continue;
        }
        // Every entry is lowered, each with strategies that apply to its goal.
        let strategies = |g: Goal| -> HashMap<NodeId, Strategy> {
            layers
                .iter()
                .map(|(n, d)| {
                    let c = d.candidates(g);
                    (*n, if c.contains(&s) { s } else { c[0] })
                })
                .collect()
        };
        let schedule = Schedule {
            batch: b as usize,
            chunk_bytes,
            private_bytes,
            grads: strategies(Goal::Grads),
            norms: strategies(Goal::Norms),
            clipped_sum: strategies(Goal::ClippedSum),
        };
        let program = match lower(graph, grads, &schedule) {
            Ok(p) => p,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        let private = read_entry(&program, goal.entry(), b, dev);
        for n in &takes {
            let mut c = private.by_node.get(&Some(*n)).cloned().unwrap_or_default().into_cost(s);
            c.held = held(&program, goal.entry(), *n, b);
            c.workspace = workspace(&program, goal.entry(), *n, b);
            measured.layers.insert((*n, s), c);
        }
        if !shared_done {
            shared_done = true;
            let batch = read_entry(&program, EntryKind::BatchGrad, b, dev);
            let is_layer = |n: &Option<NodeId>| n.is_some_and(|n| layers.iter().any(|(l, _)| *l == n));
            measured.shared_private =
                private.by_node.iter().filter(|(n, _)| !is_layer(n)).map(|(_, t)| t.seconds).sum();
            measured.shared_nonprivate =
                batch.by_node.iter().filter(|(n, _)| !is_layer(n)).map(|(_, t)| t.seconds).sum();
            for (n, _) in layers {
                let mut c = batch.by_node.get(&Some(*n)).cloned().unwrap_or_default().into_cost(Strategy::Direct);
                c.workspace = workspace(&program, EntryKind::BatchGrad, *n, b);
                measured.nonprivate.insert(*n, c);
            }
        }
    }
    match (shared_done, first_error) {
        (false, Some(e)) => Err(e),
        (false, None) => {
            // No layer has parameters: the whole step is shared.
            let empty = Schedule {
                batch: b as usize,
                chunk_bytes,
                private_bytes,
                grads: HashMap::new(),
                norms: HashMap::new(),
                clipped_sum: HashMap::new(),
            };
            let program = lower(graph, grads, &empty)?;
            let total = |kind| read_entry(&program, kind, b, dev).by_node.values().map(|t| t.seconds).sum();
            measured.shared_private = total(goal.entry());
            measured.shared_nonprivate = total(EntryKind::BatchGrad);
            Ok(measured)
        }
        (true, _) => Ok(measured),
    }
}

/// The launches of one entry, costed and summed per node.
struct EntryCosts {
    /// In node order, so that sums over it are the same from run to run.
    by_node: BTreeMap<Option<NodeId>, Tally>,
}

#[derive(Debug, Clone, Default)]
struct Tally {
    flops: u64,
    bytes: u64,
    launches: u64,
    /// Seconds of compute at peak, for the efficiency.
    at_peak: f64,
    compute: f64,
    seconds: f64,
}

impl Tally {
    fn into_cost(self, strategy: Strategy) -> Cost {
        Cost {
            strategy,
            flops: self.flops,
            bytes: self.bytes,
            workspace: 0,
            held: 0,
            launches: self.launches,
            efficiency: if self.compute > 0.0 { self.at_peak / self.compute } else { 1.0 },
            seconds: self.seconds,
        }
    }
}

fn read_entry(program: &Program, kind: EntryKind, b: u64, dev: &DeviceProfile) -> EntryCosts {
    let mut by_node: BTreeMap<Option<NodeId>, Tally> = BTreeMap::new();
    for launch in &program.entry(kind).launches {
        let kernel = &program.kernels[launch.kernel];
        // (examples per run, runs) for each distinct run size.
        let runs: Vec<(u64, u64)> = match launch.mode {
            LaunchMode::Grid => vec![(b, 1)],
            LaunchMode::PerExample => vec![(1, b)],
            LaunchMode::Chunked { examples, .. } => {
                let e = u64::from(examples).clamp(1, b.max(1));
                vec![(e, b / e), (b % e, 1)]
            }
        };
        let t = by_node.entry(launch.node).or_default();
        for (examples, count) in runs.into_iter().filter(|&(e, c)| e > 0 && c > 0) {
            let w = pdgc_codegen::analysis::work::work(kernel, examples);
            let gemm: f64 = w
                .gemms
                .iter()
                .map(|g| g.flops() as f64 / (dev.peak_flops * dev.gemm_efficiency(g.m, g.n, g.k, g.flops() as f64)))
                .sum();
            let loops = w.unit_flops as f64 / (dev.peak_flops * dev.window_efficiency)
                + w.strided_flops as f64 / (dev.peak_flops * dev.gram_efficiency);
            let compute = gemm + loops;
            let memory = w.bytes as f64 / dev.bandwidth;
            let c = count as f64;
            t.flops = t.flops.saturating_add(w.flops().saturating_mul(count));
            t.bytes = t.bytes.saturating_add(w.bytes.saturating_mul(count));
            t.launches += count;
            t.at_peak += c * w.flops() as f64 / dev.peak_flops;
            t.compute += c * compute;
            t.seconds += c * (compute.max(memory) + dev.launch_latency);
        }
    }
    EntryCosts { by_node }
}

/// Bytes of a buffer at batch `b` (a chunk workspace holds one chunk).
fn bytes_of(program: &Program, id: crate::lower::BufId, b: u64) -> u64 {
    program.buffer(id).len(b) * 4
}

/// What layer `node`'s launches in `kind` hold until the clip factors are known: its
/// per-example gradients, and the batched buffers (other than activations, which every
/// step keeps) that its launches after the norms read: book-keeping's output gradient.
fn held(program: &Program, kind: EntryKind, node: NodeId, b: u64) -> u64 {
    let launches = &program.entry(kind).launches;
    // The launch that computes the clip factors (the first to bind them).
    let clip = launches.iter().position(|l| l.args.iter().any(|&id| program.buffer(id).role == Role::ClipFactors));
    let mut seen = HashSet::new();
    let mut total = 0;
    for (i, l) in launches.iter().enumerate().filter(|(_, l)| l.node == Some(node)) {
        for &id in &l.args {
            let buf = program.buffer(id);
            let keep = match &buf.role {
                Role::PerExampleGrad(_) => true,
                Role::ActivationGrad(_) => clip.is_some_and(|c| i > c),
                _ => false,
            };
            if keep && seen.insert(id) {
                total += bytes_of(program, id, b);
            }
        }
    }
    total
}

/// The most scratch memory one of layer `node`'s launches in `kind` binds: im2col columns
/// (one chunk where they are chunked) and workspaces. Each use's scratch buffer lives only
/// around its launches, so the largest set bound at once is what the layer adds.
fn workspace(program: &Program, kind: EntryKind, node: NodeId, b: u64) -> u64 {
    program
        .entry(kind)
        .launches
        .iter()
        .filter(|l| l.node == Some(node))
        .map(|l| {
            let scratch: HashSet<_> =
                l.args.iter().filter(|&&id| matches!(program.buffer(id).role, Role::Workspace(_))).collect();
            scratch.into_iter().map(|&id| bytes_of(program, id, b)).sum::<u64>()
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The costs of every candidate of layer `l` (a first layer: no input gradient) of
    /// `src` for `goal` at batch `b`.
    fn costs(src: &str, goal: Goal, b: u64) -> (LayerDims, HashMap<Strategy, Cost>) {
        let g = crate::compile_front(src).graph.expect("valid test model");
        let grads = crate::grad::differentiate(&g);
        let layers: Vec<(NodeId, LayerDims)> =
            g.nodes.iter().filter_map(|n| Some((n.id, LayerDims::of(&g, &grads, n)?))).collect();
        let dev = DeviceProfile::h200();
        let m = measure(
            &g,
            &grads,
            &layers,
            goal,
            b,
            (crate::lower::CHUNK_BYTES, crate::lower::PRIVATE_COLUMN_BYTES),
            &dev,
        )
        .expect("lowers");
        let node = g.nodes.iter().find(|n| n.layer.as_deref() == Some("l")).expect("layer `l`").id;
        let dims = layers.iter().find(|(n, _)| *n == node).expect("parameterized").1.clone();
        let by = m.layers.iter().filter(|((n, _), _)| *n == node).map(|((_, s), c)| (*s, c.clone())).collect();
        (dims, by)
    }

    fn conv(input: &str, args: &str) -> String {
        format!(
            "model m {{ input x: {input}; label y: classes(2); h = l: conv2d(x, {args}, bias=false); \
             logits = fc: linear(flatten(h), 2); loss cross_entropy(logits, y); }}"
        )
    }

    /// The FLOPs read off the kernels are the strategy table's closed forms, on shapes with
    /// stride, dilation, padding and groups: the forward contraction (2BTpd) plus
    /// naive/unfold/direct's weight gradient (2BTpd), or ghost's Gram products
    /// (2BT²(p + G·d) + 2BGT²), and book-keeping's one more contraction (2BTpd, plus the
    /// adds of its partial sums).
    #[test]
    fn kernel_flops_are_the_closed_forms() {
        let cases = [
            ("[3, 32, 32]", "16, 3, padding=1", 16u64, 27u64, 1024u64, 1u64),
            ("[8, 17, 15]", "12, 3, stride=2, dilation=2, padding=1", 12, 72, 8 * 7, 1),
            ("[8, 16, 16]", "8, 3, groups=4, padding=1", 8, 18, 256, 4),
            ("[4, 9, 9]", "6, (3, 2), stride=(2, 1)", 6, 24, 4 * 8, 1),
        ];
        let b = 4;
        for (input, args, p, d, t, g) in cases {
            let src = conv(input, args);
            let (l, grads) = costs(&src, Goal::Grads, b);
            assert_eq!((l.p, l.d, l.t, l.groups), (p, d, t, g), "{args}");
            let contraction = 2 * b * t * p * d;
            for s in [Strategy::Naive, Strategy::Unfold, Strategy::Direct] {
                // The weight gradient, and the input gradient (no squared norms: only the
                // gradients are wanted).
                assert_eq!(grads[&s].flops, 2 * contraction, "{s} {args}");
                // The per-example gradients are the output: B·P floats held.
                assert_eq!(grads[&s].held, 4 * b * l.params, "{s} {args}");
            }
            // naive: one launch per example.
            assert!(grads[&Strategy::Naive].launches >= b, "{args}");
            assert!(grads[&Strategy::Naive].launches > grads[&Strategy::Unfold].launches + b / 2, "{args}");
            let (_, norms) = costs(&src, Goal::Norms, b);
            // The Gram products, then the clamp of each example's sum at 0.
            let gram = 2 * b * t * t * (p + g * d) + 2 * b * g * t * t + b;
            assert_eq!(norms[&Strategy::Ghost].flops, contraction + gram, "{args}");
            assert_eq!(norms[&Strategy::Ghost].held, 0, "{args}");
            let (_, sum) = costs(&src, Goal::ClippedSum, b);
            // Book-keeping: one factor rescaled (one multiply per element), then one ordinary
            // weight-gradient contraction; it holds the output gradient until then. A conv is
            // lowered from its derived equations, whose book-keeping scales the smaller factor
            // (these convs have no bias): here the input where it is smaller.
            let input_len: u64 =
                input.trim_matches(['[', ']']).split(", ").map(|d| d.parse::<u64>().unwrap()).product();
            let rescale = b * (t * p).min(input_len);
            // Its batch-summed contraction runs in partial sums over the examples, then one
            // add per partial sum and element.
            let parts = crate::lower::index::summed_parts(b as usize, (p * d) as usize) as u64;
            let reduce = parts * p * d;
            assert_eq!(sum[&Strategy::Ghost].flops, contraction + gram + rescale + contraction + reduce, "{args}");
            assert_eq!(sum[&Strategy::Ghost].held, 4 * b * t * p, "{args}");
        }
    }

    #[test]
    fn crb_computes_a_truncated_grouped_convolution() {
        // Stride 1: the grouped conv's output is exactly the kernel, nothing to copy out.
        let (l, c) = costs(&conv("[3, 32, 32]", "16, 3, padding=1"), Goal::Grads, 8);
        assert_eq!(c[&Strategy::Crb].flops, 2 * 2 * 8 * l.t * l.p * l.d);
        // Stride 2 on 32 with k=3, p=0: OH = 15, span 29, positions (32-29)+1 = 4 per axis:
        // 16 computed for 9 kept, in a workspace.
        let (l, c) = costs(&conv("[3, 32, 32]", "16, 3, stride=2"), Goal::Grads, 8);
        assert_eq!(c[&Strategy::Crb].flops - 2 * 8 * l.t * l.p * l.d, 2 * 8 * l.t * l.p * 3 * 16);
        assert!(c[&Strategy::Crb].workspace >= 4 * 8 * l.p * 3 * 16, "the untruncated output needs a buffer");
    }

    #[test]
    fn linear_ghost_is_the_product_of_two_norms() {
        let src = "model m { input x: [100]; label y: classes(10); logits = l: linear(x, 10, bias=false); \
                   loss cross_entropy(logits, y); }";
        let (l, norms) = costs(src, Goal::Norms, 4);
        assert_eq!((l.p, l.d, l.t), (10, 100, 1));
        let forward = 2 * 4 * 10 * 100;
        // ‖x‖²·‖dy‖²: one multiply-add per element of each, their product added to the sum,
        // and the sum's clamp at 0.
        assert_eq!(norms[&Strategy::Ghost].flops, forward + 2 * 4 * (10 + 100) + 3 * 4);
        let (_, grads) = costs(src, Goal::Grads, 4);
        // With T = 1 the per-example gradient is an outer product: one multiply per element.
        assert_eq!(grads[&Strategy::Outer].flops, forward + 4 * 10 * 100);
    }
}
