//! Stage 4, `plan`: per parameterized layer, the strategy that computes the per-example
//! work fastest on a device within a memory budget, from the cost model ([`cost`]).
//!
//! Pure and deterministic: the same graph, batch, goal, profile and budget always give
//! the same plan (ties break by strategy order). The algorithm:
//! 1. each layer takes its cheapest strategy (or its `@strategy` override);
//! 2. if the step does not fit the budget, the batch is split into the largest micro-batch
//!    that fits with those strategies (per-example work is linear in the batch, so smaller
//!    runs cost little time, while a leaner strategy can cost several times more);
//! 3. only if even one example does not fit are strategies given up for memory: the layer
//!    switch that saves memory at the least added time per byte is made until it fits
//!    (overrides are never switched).
//!
//! Invariants: every parameterized node of the graph has exactly one [`LayerPlan`], in
//! graph order; `chosen` is one of the layer's candidates for the goal; `micro_batch`
//! divides the work into `ceil(batch / micro_batch)` runs.

pub mod cost;
pub mod device;

use std::fmt;

use serde::Serialize;

use crate::error::Result;
use crate::grad::GradGraph;
use crate::graph::{numel, Graph, NodeId};
use crate::ops::Strategy;
use crate::report::{secs, si};
use cost::{measure, Cost, LayerDims};
pub use cost::{Goal, LayerKind};
pub use device::DeviceProfile;

#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub batch: usize,
    pub goal: Goal,
    pub device: DeviceProfile,
    /// Bytes; `None` means the device's memory.
    pub memory_budget: Option<u64>,
    /// Per-layer overrides from the command line (`layer=strategy`), on top of `@strategy`.
    pub overrides: Vec<(String, Strategy)>,
    /// The most bytes of im2col columns a conv's launches hold at once (as `lower` is
    /// told; normally [`crate::lower::CHUNK_BYTES`]).
    pub chunk_bytes: u64,
    /// The most bytes of one example's im2col columns kept in private memory (as `lower` is
    /// told; normally [`crate::lower::PRIVATE_COLUMN_BYTES`]).
    pub private_bytes: u64,
}

impl PlanOptions {
    pub fn new(batch: usize, device: DeviceProfile) -> PlanOptions {
        PlanOptions {
            batch,
            goal: Goal::ClippedSum,
            device,
            memory_budget: None,
            overrides: Vec::new(),
            chunk_bytes: crate::lower::CHUNK_BYTES,
            private_bytes: crate::lower::PRIVATE_COLUMN_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub model: String,
    pub batch: usize,
    pub goal: Goal,
    pub device: String,
    pub memory_budget: u64,
    /// The examples processed at once; `< batch` when the batch had to be split.
    pub micro_batch: usize,
    pub layers: Vec<LayerPlan>,
    pub totals: Totals,
    /// Plain-language remarks: budget switches, micro-batching.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerPlan {
    pub node: NodeId,
    pub layer: String,
    pub op: &'static str,
    pub dims: LayerDims,
    pub chosen: Strategy,
    /// Chosen by `@strategy` or `--strategy`, not by the cost model.
    pub overridden: bool,
    /// Switched away from the fastest strategy to fit the memory budget.
    pub budget_forced: bool,
    /// Every candidate's cost at the micro-batch size, fastest first.
    pub costs: Vec<Cost>,
    /// The non-private weight gradient of this layer, for comparison.
    pub nonprivate: Cost,
    pub why: String,
    /// The fastDP / private_vision rule: ghost iff 2T² ≤ p·d.
    pub fastdp_ghost: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Totals {
    /// Estimated seconds of one private step (forward, input gradients, every layer's
    /// chosen per-example work), over all micro-batches.
    pub private_seconds: f64,
    /// The same step computing the ordinary batch gradient.
    pub nonprivate_seconds: f64,
    pub ratio: f64,
    /// Peak bytes of the private step for one micro-batch.
    pub peak_memory: u64,
    pub nonprivate_memory: u64,
}

impl Plan {
    /// Each layer's chosen strategy, as `lower` takes them.
    pub fn strategies(&self) -> std::collections::HashMap<NodeId, Strategy> {
        self.layers.iter().map(|l| (l.node, l.chosen)).collect()
    }
}

impl LayerPlan {
    pub fn chosen_cost(&self) -> &Cost {
        self.costs.iter().find(|c| c.strategy == self.chosen).expect("chosen is a candidate")
    }

    pub fn runner_up(&self) -> Option<&Cost> {
        self.costs.iter().find(|c| c.strategy != self.chosen)
    }
}

/// Layers with their candidate costs at batch `b`, each at its fastest (or overridden)
/// strategy, and the seconds of the private and non-private steps' work outside the layers.
fn initial_layers(graph: &Graph, grads: &GradGraph, opts: &PlanOptions, b: u64) -> Result<(Vec<LayerPlan>, f64, f64)> {
    let dims: Vec<(NodeId, LayerDims)> =
        graph.nodes.iter().filter_map(|n| Some((n.id, LayerDims::of(graph, grads, n)?))).collect();
    let m = measure(graph, grads, &dims, opts.goal, b, (opts.chunk_bytes, opts.private_bytes), &opts.device)?;
    let mut layers = Vec::new();
    for (id, dims) in dims {
        let node = graph.node(id);
        let name = node.layer.clone().unwrap_or_default();
        let mut costs: Vec<Cost> =
            dims.candidates(opts.goal).into_iter().filter_map(|s| m.layers.get(&(id, s)).cloned()).collect();
        if costs.is_empty() {
            return Err(crate::Error::Internal(format!("no strategy of layer {name} could be lowered")));
        }
        costs.sort_by(|a, c| a.seconds.total_cmp(&c.seconds).then(a.strategy.cmp(&c.strategy)));
        let forced = opts.overrides.iter().find(|(l, _)| *l == name).map(|(_, s)| *s).or(node.strategy);
        let (chosen, overridden) = match forced {
            Some(s) if costs.iter().any(|c| c.strategy == s) => (s, true),
            _ => (costs[0].strategy, false),
        };
        let fastdp_ghost = 2 * dims.t * dims.t <= dims.p * dims.d;
        layers.push(LayerPlan {
            node: id,
            layer: name,
            op: node.op.name(),
            nonprivate: m.nonprivate.get(&id).cloned().expect("every layer has a non-private cost"),
            dims,
            chosen,
            overridden,
            budget_forced: false,
            costs,
            why: String::new(),
            fastdp_ghost,
        });
    }
    Ok((layers, m.shared_private, m.shared_nonprivate))
}

/// Bytes every step needs whatever the strategies: parameters, their gradient, and the
/// activations kept for the backward pass. (Columns and other scratch buffers are the
/// layers' workspaces.)
fn base_memory(graph: &Graph, b: u64) -> u64 {
    let params = graph.param_count() * 4;
    let activations: u64 = graph.nodes.iter().map(|n| numel(&n.shape)).sum::<u64>() * b * 4;
    2 * params + activations
}

fn peak_memory(base: u64, layers: &[LayerPlan]) -> u64 {
    let held: u64 = layers.iter().map(|l| l.chosen_cost().held).sum();
    let workspace = layers.iter().map(|l| l.chosen_cost().workspace).max().unwrap_or(0);
    base + held + workspace
}

/// Makes the cheapest-per-byte switches until the layers fit `budget`. Returns whether
/// they fit.
fn fit_budget(layers: &mut [LayerPlan], base: u64, budget: u64) -> bool {
    while peak_memory(base, layers) > budget {
        let current = peak_memory(base, layers);
        let mut best: Option<(f64, usize, Strategy)> = None;
        for (i, l) in layers.iter().enumerate() {
            if l.overridden {
                continue;
            }
            let now = l.chosen_cost().clone();
            for c in &l.costs {
                let mut trial = layers.to_vec();
                trial[i].chosen = c.strategy;
                let saved = current.saturating_sub(peak_memory(base, &trial));
                if c.strategy == now.strategy || saved == 0 {
                    continue;
                }
                let per_byte = (c.seconds - now.seconds).max(0.0) / saved as f64;
                if best.is_none_or(|(b, _, _)| per_byte < b) {
                    best = Some((per_byte, i, c.strategy));
                }
            }
        }
        match best {
            Some((_, i, s)) => {
                layers[i].chosen = s;
                layers[i].budget_forced = true;
            }
            None => return false,
        }
    }
    true
}

/// Stage 4: the plan of `graph`, whose backward pass `differentiate` derived as `grads`,
/// for `opts`. The costs come from the kernels `lower` makes for each candidate strategy
/// ([`cost::measure`]); an error is a lowering that failed for every strategy.
pub fn plan(graph: &Graph, grads: &GradGraph, opts: &PlanOptions) -> Result<Plan> {
    let dev = &opts.device;
    let budget = opts.memory_budget.unwrap_or(dev.memory);
    let batch = opts.batch.max(1);
    let mut notes = Vec::new();

    // Fitting is monotone in the batch size: the largest micro-batch that fits the
    // fastest strategies, by bisection. Each batch size is measured once (measuring lowers
    // the graph once per strategy).
    let measured = |m: usize| initial_layers(graph, grads, opts, m as u64);
    let fits = |layers: &[LayerPlan], m: usize| peak_memory(base_memory(graph, m as u64), layers) <= budget;
    let whole = measured(batch)?;
    let (micro, (mut layers, shared_private, shared_nonprivate)) = if fits(&whole.0, batch) {
        (batch, whole)
    } else {
        let (mut lo, mut hi) = (0usize, batch);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(&measured(mid)?.0, mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let micro = lo.max(1);
        (micro, measured(micro)?)
    };
    if micro < batch {
        let runs = batch.div_ceil(micro);
        notes.push(format!(
            "the batch of {batch} does not fit in {}B: it runs as {runs} micro-batches of {micro}",
            si(budget)
        ));
    }
    if !fits(&layers, micro) && !fit_budget(&mut layers, base_memory(graph, micro as u64), budget) {
        notes.push(format!(
            "even one example exceeds the memory budget of {}B; planned at micro-batch 1 anyway",
            si(budget)
        ));
    }
    for l in &mut layers {
        l.why = explain_choice(l);
        if l.budget_forced {
            notes.push(format!(
                "{}: {} instead of the faster {} to fit the memory budget",
                l.layer, l.chosen, l.costs[0].strategy
            ));
        }
    }

    let runs = batch.div_ceil(micro) as f64;
    let private: f64 = shared_private + layers.iter().map(|l| l.chosen_cost().seconds).sum::<f64>();
    let nonprivate: f64 = shared_nonprivate + layers.iter().map(|l| l.nonprivate.seconds).sum::<f64>();
    let base = base_memory(graph, micro as u64);
    let totals = Totals {
        private_seconds: private * runs,
        nonprivate_seconds: nonprivate * runs,
        ratio: private / nonprivate,
        peak_memory: peak_memory(base, &layers),
        nonprivate_memory: base + layers.iter().map(|l| l.nonprivate.workspace).max().unwrap_or(0),
    };
    Ok(Plan {
        model: graph.name.clone(),
        batch,
        goal: opts.goal,
        device: dev.name.clone(),
        memory_budget: budget,
        micro_batch: micro,
        layers,
        totals,
        notes,
    })
}

/// One sentence on why the chosen strategy beat the runner-up: the cost term in which
/// the runner-up is worst.
fn explain_choice(l: &LayerPlan) -> String {
    let chosen = l.chosen_cost();
    if l.overridden {
        return format!("override: {} forced by @strategy/--strategy", l.chosen);
    }
    let Some(other) = l.runner_up() else {
        return format!("the only strategy for {}", l.op);
    };
    if l.budget_forced {
        return format!(
            "memory: holds {}B instead of {}B",
            si(chosen.held + chosen.workspace),
            si(other.held + other.workspace)
        );
    }
    let slower = other.seconds / chosen.seconds.max(1e-12);
    let reason = if other.flops as f64 > 1.5 * chosen.flops as f64 {
        let detail = match other.strategy {
            Strategy::Ghost => format!(" (Gram matrices over T={})", l.dims.t),
            Strategy::Crb => " (untruncated grouped conv)".to_string(),
            _ => String::new(),
        };
        format!("{}FLOP more{detail}", si(other.flops - chosen.flops))
    } else if other.bytes as f64 > 1.2 * chosen.bytes as f64 {
        let detail = match other.strategy {
            Strategy::Unfold => " (im2col buffer)",
            Strategy::Naive | Strategy::Crb | Strategy::Direct | Strategy::Outer => " (B per-example grads)",
            Strategy::Ghost => " (im2col + Gram matrices)",
        };
        format!("{}B more traffic{detail}", si(other.bytes - chosen.bytes))
    } else if other.launches > chosen.launches + 2 {
        format!("{} launches instead of {}", other.launches, chosen.launches)
    } else {
        format!("lower efficiency ({:.0}% vs {:.0}% of peak)", other.efficiency * 100.0, chosen.efficiency * 100.0)
    };
    format!("{} is {slower:.1}x slower: {reason}", other.strategy)
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "plan {}  batch={} micro_batch={} goal={} device={} budget={}B",
            self.model,
            self.batch,
            self.micro_batch,
            self.goal,
            self.device,
            si(self.memory_budget)
        )?;
        for l in &self.layers {
            let c = l.chosen_cost();
            let mark = if l.overridden {
                " (override)"
            } else if l.budget_forced {
                " (memory)"
            } else {
                ""
            };
            writeln!(
                f,
                "  {} {} {}: {}{mark}  T={} p={} d={} G={}  flops={} bytes={} held={} workspace={} launches={} est={}",
                l.node,
                l.layer,
                l.op,
                l.chosen,
                l.dims.t,
                l.dims.p,
                l.dims.d,
                l.dims.groups,
                si(c.flops),
                si(c.bytes),
                si(c.held),
                si(c.workspace),
                c.launches,
                secs(c.seconds),
            )?;
            let others: Vec<String> = l
                .costs
                .iter()
                .filter(|o| o.strategy != l.chosen)
                .map(|o| format!("{} {}", o.strategy, secs(o.seconds)))
                .collect();
            writeln!(f, "      others: {}", if others.is_empty() { "-".into() } else { others.join(", ") })?;
            writeln!(f, "      why: {}", l.why)?;
            writeln!(
                f,
                "      fastDP rule (2T² ≤ p·d → ghost): {}",
                if l.fastdp_ghost { "ghost" } else { "materialize" }
            )?;
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        let t = &self.totals;
        writeln!(
            f,
            "  total: private {} vs non-private {} ({:.2}x), peak memory {}B vs {}B",
            secs(t.private_seconds),
            secs(t.nonprivate_seconds),
            t.ratio,
            si(t.peak_memory),
            si(t.nonprivate_memory)
        )?;
        Ok(())
    }
}
