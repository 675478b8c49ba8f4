//! Stage 5, `lower`: Graph + plans to a [`Program`] of kernels.
//!
//! A program declares buffers (inputs, label, parameters, activations and their
//! gradients, saved statistics, per-example gradients, norms, clip factors, sums,
//! workspaces), holds every kernel once, and lists for each entry point (loss, batch
//! gradient, per-example grads, per-example norms, clipped sum) the launches that compute
//! it, in order. Nothing is computed outside kernels. Last, consecutive launches that pass
//! an activation (or its gradient) from one to the next and nowhere else are fused, the
//! tensor in private memory ([`chain`]).
//!
//! Sizes are never truncated: every size reaches the kernel IR through a checked conversion
//! (`builder::size`), and one that does not fit makes `lower` an [`crate::Error::Internal`]
//! (the size checks of `check::limits` keep every model that passes `check` within range).
//!
//! Invariants: every launch binds exactly one buffer per kernel argument, with the same
//! per-example element count (a kernel may view a buffer flattened); no launch binds one
//! buffer twice; within an entry, a gradient buffer's first writer overwrites it and the
//! later ones accumulate; every `sqnorm` slot (one per parameter tensor) is written
//! before `norms_and_clip` reads it.

mod builder;
pub mod chain;
pub mod equation;
pub mod fuse;
pub mod index;
pub mod param_grads;
pub mod window;

use std::collections::HashMap;
use std::fmt;

use pdgc_codegen::ir::Kernel;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::grad::layer as layer_grad;
use crate::grad::{Expr, GradGraph};
use crate::graph::{numel, Graph, LabelSpec, Loss, NodeId, Op};
use crate::index_layer::{IndexLayer, LocalKind};
use crate::ops::Strategy;
use index::Batching;

/// Index of a buffer in [`Program::buffers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BufId(pub u32);

/// What a buffer holds, for the runtime and for people reading a dump.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Input(String),
    Label,
    Param(String),
    Activation(u32),
    /// A temporary of a node's derived equations (a norm's `X̂`, a layer's own), by its
    /// local name: saved by the forward pass for the backward pass.
    Saved(u32, String),
    ActivationGrad(u32),
    Loss,
    PerExampleGrad(String),
    BatchGrad(String),
    SqNormParts,
    Norms,
    ClipFactors,
    ClipNorm,
    ClippedSum(String),
    Workspace(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BufferDecl {
    pub name: String,
    /// `true` if the leading dim is the batch.
    pub batched: bool,
    /// Per-example shape (without the batch dim).
    pub shape: Vec<usize>,
    pub role: Role,
    /// `Some(k)`: a workspace of one chunk group (see [`LaunchMode::Chunked`]), holding `k`
    /// examples however large the batch; every launch that binds it is in that group.
    #[serde(default)]
    pub chunk: Option<u32>,
}

impl BufferDecl {
    pub fn per_example_len(&self) -> u64 {
        numel(&self.shape)
    }

    /// Elements the buffer holds for a run on `batch` examples.
    pub fn len(&self, batch: u64) -> u64 {
        match (self.batched, self.chunk) {
            (true, Some(k)) => batch.min(u64::from(k)) * self.per_example_len(),
            (true, None) => batch * self.per_example_len(),
            (false, _) => self.per_example_len(),
        }
    }
}

/// How a derived parameter gradient that is a window product runs (its schedule).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Windows {
    /// im2col columns and a contraction (`unfold`; every batch-summed gradient).
    Columns,
    /// One loop nest that reads the window in place (`direct`).
    InPlace,
    /// Over every tap position the padded input admits (these, per window axis), then
    /// the kernel-sized corner (`crb`).
    Crb(Vec<usize>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaunchMode {
    /// The whole grid, split over threads.
    Grid,
    /// One launch per example, each seeing a batch of 1 (the `naive` strategy).
    PerExample,
    /// One launch of chunk group `group`: the group's launches (consecutive in the entry)
    /// run together on `examples` examples at a time, each seeing a batch of that many,
    /// so that the workspaces only they use (an im2col's columns) hold one chunk instead
    /// of the batch. Every kernel of a group computes each example on its own.
    Chunked { group: u32, examples: u32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    pub kernel: usize,
    pub args: Vec<BufId>,
    pub mode: LaunchMode,
    /// The graph node whose work this launch does (`None` for the norms and clip factors,
    /// which serve every layer): the planner reads each layer's costs by it.
    #[serde(default)]
    pub node: Option<NodeId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EntryKind {
    Loss,
    BatchGrad,
    PerExampleGrads,
    PerExampleNorms,
    ClippedSum,
}

impl EntryKind {
    pub const ALL: [EntryKind; 5] = [
        EntryKind::Loss,
        EntryKind::BatchGrad,
        EntryKind::PerExampleGrads,
        EntryKind::PerExampleNorms,
        EntryKind::ClippedSum,
    ];

    /// The step's name in messages, e.g. `clipped-sum`.
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::Loss => "loss",
            EntryKind::BatchGrad => "batch-gradient",
            EntryKind::PerExampleGrads => "per-example-gradient",
            EntryKind::PerExampleNorms => "per-example-norm",
            EntryKind::ClippedSum => "clipped-sum",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: EntryKind,
    pub launches: Vec<Launch>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    pub buffers: Vec<BufferDecl>,
    pub kernels: Vec<Kernel>,
    pub entries: Vec<Entry>,
}

impl Program {
    pub fn entry(&self, kind: EntryKind) -> &Entry {
        self.entries.iter().find(|e| e.kind == kind).expect("lower emits every entry kind")
    }

    pub fn buffer(&self, id: BufId) -> &BufferDecl {
        &self.buffers[id.0 as usize]
    }

    pub fn find(&self, role: &Role) -> Option<BufId> {
        self.buffers.iter().position(|b| &b.role == role).map(|i| BufId(i as u32))
    }
}

/// What `lower` needs from the plans: the largest batch the program runs, and each
/// parameterized layer's strategy for each per-example entry (they differ: `grads` cannot
/// use ghost, `norms` need not store, the clipped sum may book-keep). A layer missing from a
/// map runs `direct`.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub batch: usize,
    /// The most bytes of im2col columns a conv's launches hold at once (normally
    /// [`CHUNK_BYTES`]).
    pub chunk_bytes: u64,
    /// The most bytes of one example's im2col columns kept in private memory (normally
    /// [`PRIVATE_COLUMN_BYTES`]; see [`fuse`]).
    pub private_bytes: u64,
    pub grads: HashMap<NodeId, Strategy>,
    pub norms: HashMap<NodeId, Strategy>,
    pub clipped_sum: HashMap<NodeId, Strategy>,
}

struct Lowering<'g> {
    graph: &'g Graph,
    grads: &'g GradGraph,
    /// The nodes lowered generically from their derived equations, as layers in index
    /// notation: the graph's own and the built-in ops that have that form (`linear`).
    layers: &'g HashMap<NodeId, IndexLayer>,
    buffers: Vec<BufferDecl>,
    kernels: Vec<Kernel>,
    by_name: HashMap<String, usize>,
    act: Vec<BufId>,
    grad: Vec<BufId>,
    params: HashMap<String, BufId>,
    extra: HashMap<Role, BufId>,
    /// The largest batch the program runs (chunk groups smaller than it pay off).
    batch: usize,
    chunk_bytes: u64,
    private_bytes: u64,
    /// Chunk groups made so far.
    groups: u32,
    /// The convs, and the generically lowered nodes with window products, that keep their
    /// forward pass's columns (see [`Lowering::kept_columns`]).
    kept: Vec<NodeId>,
    /// The node whose launches are being made (see [`Launch::node`]).
    current: Option<NodeId>,
    /// Whether the forward pass is lowered (every entry runs it first, so the columns it
    /// gathers are there for the backward launches of the same entry).
    forward_done: bool,
    /// The im2col columns of generically lowered window products that the forward pass
    /// gathers for a node that keeps them, by node and gathering equation: a later window
    /// product of that node gathering the same columns reads these.
    window_columns: HashMap<(NodeId, String), BufId>,
    /// The factor of each node's book-keeping that [`index::CLIPPED`] stands for, the clip
    /// factors times it (see [`index::scaled_factor`]).
    clipped: HashMap<NodeId, String>,
}

/// Stage 5: the program of `graph`, whose per-example backward pass `differentiate`
/// derived as `grads`, with the strategies of `schedule`.
pub fn lower(graph: &Graph, grads: &GradGraph, schedule: &Schedule) -> Result<Program> {
    let layers: HashMap<NodeId, IndexLayer> = graph
        .nodes
        .iter()
        .filter_map(|n| match &n.op {
            Op::Index(l) => Some((n.id, (**l).clone())),
            _ => crate::grad::as_index_layer(graph, n).map(|l| (n.id, l)),
        })
        .collect();
    let mut l = Lowering {
        graph,
        grads,
        layers: &layers,
        buffers: Vec::new(),
        kernels: Vec::new(),
        by_name: HashMap::new(),
        act: Vec::new(),
        grad: Vec::new(),
        params: HashMap::new(),
        extra: HashMap::new(),
        batch: schedule.batch.max(1),
        chunk_bytes: schedule.chunk_bytes,
        private_bytes: schedule.private_bytes,
        groups: 0,
        kept: Vec::new(),
        current: None,
        forward_done: false,
        window_columns: HashMap::new(),
        clipped: HashMap::new(),
    };
    l.kept = l.kept_columns();
    l.declare_buffers();
    let forward = l.forward()?;
    l.forward_done = true;

    let mut entries = Vec::new();
    entries.push(Entry { kind: EntryKind::Loss, launches: forward.clone() });

    let mut launches = forward.clone();
    launches.extend(l.backward(ParamWork::Batch)?);
    entries.push(Entry { kind: EntryKind::BatchGrad, launches });

    for (kind, plan) in [
        (EntryKind::PerExampleGrads, &schedule.grads),
        (EntryKind::PerExampleNorms, &schedule.norms),
        (EntryKind::ClippedSum, &schedule.clipped_sum),
    ] {
        let mut launches = forward.clone();
        launches.extend(l.backward(ParamWork::PerExample(plan, kind))?);
        launches.extend(l.clip_and_sum(plan, kind)?);
        entries.push(Entry { kind, launches });
    }
    let mut program = Program { buffers: l.buffers, kernels: l.kernels, entries };
    if schedule.private_bytes > 0 {
        // The network's output, which a session reads after a forward run.
        let output: Vec<BufId> = program.find(&Role::Activation(graph.loss.input().0)).into_iter().collect();
        chain::fuse_chains(&mut program, &output, schedule.private_bytes);
    }
    // The kernels of launches fused into others (`in_sequence`, `fuse_chains`).
    chain::drop_unused_kernels(&mut program);
    Ok(program)
}

/// The most bytes of im2col columns a conv's launches hold at once by default: beyond it,
/// they run in chunks of examples (256 MiB keeps every GEMM of a chunk large: a 3x3 conv on
/// 224x224 with 64 input channels has 115 MB of columns per example, two examples a chunk).
pub const CHUNK_BYTES: u64 = 256 << 20;

/// The most bytes of im2col columns per example that a conv's launches keep in private
/// memory (one buffer per worker thread, see `fuse`) rather than in a workspace for the
/// batch: about what a core's cache holds.
pub const PRIVATE_COLUMN_BYTES: u64 = 4 << 20;

/// How many chunk budgets of columns the convs that keep their forward pass's columns may
/// hold together (see `Lowering::kept_columns`).
const KEPT_CHUNKS: u64 = 1;

/// Examples per chunk for the launches around a conv's columns of `per_example` bytes at
/// `batch` examples: as many as keep one chunk's columns within `chunk_bytes` (at least
/// one), or `None` when the whole batch fits, so small convs keep their batched launches.
/// The cost model asks it too, to charge recomputed columns where the lowering makes them.
pub fn column_chunk_examples(per_example: u64, batch: u64, chunk_bytes: u64) -> Option<u32> {
    let examples = (chunk_bytes / per_example.max(1)).max(1);
    (examples < batch).then(|| examples.min(u64::from(u32::MAX)) as u32)
}

/// The parameter gradients a backward pass computes, layer by layer as each layer's output
/// gradient is complete (so that gradients and columns die early).
#[derive(Clone, Copy)]
enum ParamWork<'p> {
    /// The non-private gradient, summed over the batch.
    Batch,
    /// Per-example gradients, their squared norms, or what the clipped sum needs, each
    /// layer by its planned strategy.
    PerExample(&'p Strategies, EntryKind),
}

/// Each layer's strategy for one entry.
type Strategies = HashMap<NodeId, Strategy>;

fn strategy_of(plan: &Strategies, node: NodeId) -> Strategy {
    plan.get(&node).copied().unwrap_or(Strategy::Direct)
}

impl<'g> Lowering<'g> {
    fn buffer(&mut self, name: String, batched: bool, shape: Vec<usize>, role: Role) -> BufId {
        self.buffers.push(BufferDecl { name, batched, shape, role, chunk: None });
        BufId(self.buffers.len() as u32 - 1)
    }

    /// The buffer for a role, declared on first use.
    fn extra(&mut self, role: Role, name: &str, batched: bool, shape: Vec<usize>) -> BufId {
        if let Some(id) = self.extra.get(&role) {
            return *id;
        }
        let id = self.buffer(name.to_string(), batched, shape, role.clone());
        self.extra.insert(role, id);
        id
    }

    fn declare_buffers(&mut self) {
        let g = self.graph;
        for p in &g.params {
            let id = self.buffer(p.name.clone(), false, p.shape.clone(), Role::Param(p.name.clone()));
            self.params.insert(p.name.clone(), id);
        }
        match &g.label {
            LabelSpec::Classes { name, .. } => {
                self.buffer(name.clone(), true, vec![], Role::Label);
            }
            LabelSpec::Target { name, shape } => {
                self.buffer(name.clone(), true, shape.clone(), Role::Label);
            }
        }
        for n in &g.nodes {
            let id = match &n.op {
                Op::Input { name } => self.buffer(name.clone(), true, n.shape.clone(), Role::Input(name.clone())),
                // A flatten is a view of its input.
                Op::Flatten => self.act[n.inputs[0].index()],
                _ => self.buffer(format!("act{}", n.id.0), true, n.shape.clone(), Role::Activation(n.id.0)),
            };
            self.act.push(id);
        }
        for n in &g.nodes {
            let id = match &n.op {
                Op::Flatten => self.grad[n.inputs[0].index()],
                _ => self.buffer(format!("grad{}", n.id.0), true, n.shape.clone(), Role::ActivationGrad(n.id.0)),
            };
            self.grad.push(id);
        }
        self.extra(Role::Loss, "loss", true, vec![]);
    }

    /// The nodes whose forward pass gathers window columns (convs, layers in index notation
    /// with window products) that keep their forward pass's columns for their later uses: those whose columns for
    /// the whole batch are not chunked and, with those of the nodes before them that keep
    /// theirs, take at most `KEPT_CHUNKS` chunk budgets. Small nets then pay no
    /// recomputation, and large ones hold a bounded amount.
    fn kept_columns(&self) -> Vec<NodeId> {
        let mut kept = (Vec::new(), 0u64);
        for n in &self.graph.nodes {
            let Some(per_example) = self.window_column_bytes(n.id) else { continue };
            if per_example <= self.private_bytes {
                continue; // gathered in private memory by each launch that reads them
            }
            let bytes = per_example * self.batch as u64;
            let chunked = column_chunk_examples(per_example, self.batch as u64, self.chunk_bytes).is_some();
            if !chunked && kept.1 + bytes <= KEPT_CHUNKS * self.chunk_bytes {
                kept.0.push(n.id);
                kept.1 += bytes;
            }
        }
        kept.0
    }

    /// The bytes per example of the columns that generically lowered `node`'s forward pass
    /// gathers for its window products; `None` where it gathers none.
    fn window_column_bytes(&self, node: NodeId) -> Option<u64> {
        let layer = self.layers.get(&node)?;
        let step = self.grads.step(node)?;
        let info = |t: &str| index::tensor_info(layer, t);
        let elements: usize = step
            .forward
            .iter()
            .filter_map(|eq| index::window_product(eq, &step.ranges, &info))
            .filter(|w| w.before.is_some())
            .map(|w| w.columns_shape.iter().product::<usize>())
            .sum();
        (elements > 0).then_some(elements as u64 * 4)
    }

    /// `launches` as one chunk group of `examples` examples, or as they are for `None`.
    fn chunked(&mut self, mut launches: Vec<Launch>, examples: Option<u32>) -> Vec<Launch> {
        if let Some(examples) = examples {
            for l in &mut launches {
                l.mode = LaunchMode::Chunked { group: self.groups, examples };
            }
            self.groups += 1;
        }
        launches
    }

    fn label(&self) -> BufId {
        BufId(self.buffers.iter().position(|b| b.role == Role::Label).expect("label declared") as u32)
    }

    fn kernel(&mut self, k: Kernel) -> usize {
        if let Some(i) = self.by_name.get(&k.name) {
            debug_assert_eq!(self.kernels[*i], k, "kernel names identify kernels");
            return *i;
        }
        self.by_name.insert(k.name.clone(), self.kernels.len());
        self.kernels.push(k);
        self.kernels.len() - 1
    }

    fn launch(&mut self, k: Kernel, args: Vec<BufId>) -> Launch {
        self.launch_as(k, args, LaunchMode::Grid)
    }

    /// A launch of `k` in `mode`, done for the current node.
    fn launch_as(&mut self, k: Kernel, args: Vec<BufId>, mode: LaunchMode) -> Launch {
        Launch { kernel: self.kernel(k), args, mode, node: self.current }
    }

    fn param(&self, node: NodeId, suffix: &str) -> Option<BufId> {
        let layer = self.graph.node(node).layer.as_ref()?;
        self.params.get(&format!("{layer}.{suffix}")).copied()
    }

    fn tag(&self, node: NodeId) -> String {
        let n = self.graph.node(node);
        match &n.layer {
            Some(l) => format!("n{}_{l}", node.0),
            None => format!("n{}_{}", node.0, n.op.name()),
        }
    }

    fn forward(&mut self) -> Result<Vec<Launch>> {
        let g = self.graph;
        let mut out = Vec::new();
        for n in &g.nodes {
            self.current = Some(n.id);
            let tag = self.tag(n.id);
            let launch = match &n.op {
                Op::Input { .. } | Op::Flatten => continue,
                _ if self.layers.contains_key(&n.id) => {
                    let eqs = self.grads.step(n.id).map(|s| s.forward.clone()).unwrap_or_default();
                    let mut launches = Vec::new();
                    for (i, eq) in eqs.iter().enumerate() {
                        let name = format!("{tag}_fwd{i}");
                        let per_example = (Batching::PerExample, LaunchMode::Grid);
                        launches.extend(self.index_launch(
                            n.id,
                            &name,
                            eq,
                            (true, true),
                            per_example,
                            &HashMap::new(),
                        )?);
                    }
                    out.extend(self.in_sequence(&format!("{tag}_fwd"), launches));
                    continue;
                }
                Op::Activation(_) | Op::Add => {
                    let eq = self.grads.step(n.id).and_then(|s| s.forward.first()).expect("a derived forward");
                    self.pointwise(n.id, &format!("{tag}_fwd"), eq, true)?
                }
                Op::Pool(_) | Op::GlobalAvgPool => {
                    let eq = self.grads.step(n.id).and_then(|s| s.forward.first()).expect("a derived forward");
                    self.derived(n.id, &format!("{tag}_fwd"), eq, true)?
                }
                _ => return Err(unlowered(n.id)),
            };
            out.push(launch);
        }
        // The per-example loss and its gradient w.r.t. the network output (no node's).
        self.current = None;
        let out_node = g.loss.input();
        let (z, dz, loss) = (self.act[out_node.index()], self.grad[out_node.index()], self.extra[&Role::Loss]);
        let kind = match &g.loss {
            Loss::CrossEntropy { .. } => "cross_entropy",
            Loss::Mse { .. } => "mse",
        };
        let (out_shape, label) = (g.node(out_node).shape.clone(), self.label());
        let label_shape = match &g.label {
            LabelSpec::Classes { .. } => Vec::new(),
            LabelSpec::Target { shape, .. } => shape.clone(),
        };
        let bindings = [
            ("Y", &out_shape, z),
            ("dY", &out_shape, dz),
            ("ℓ", &Vec::new(), loss),
            (crate::grad::label_local(g), &label_shape, label),
        ];
        for (i, eq) in self.grads.loss.iter().enumerate() {
            let name = if i == 0 { format!("loss_{kind}") } else { format!("loss_{kind}_grad{}", i - 1) };
            out.push(self.equation_launch(&name, eq, &self.grads.loss_ranges, &bindings, true)?);
        }
        Ok(out)
    }

    /// The backward pass, output to input: each node's parameter gradients (`work`) as soon
    /// as its output gradient is complete, then the input gradients of every node that
    /// needs them.
    fn backward(&mut self, work: ParamWork<'_>) -> Result<Vec<Launch>> {
        let g = self.graph;
        let mut needs = vec![false; g.nodes.len()];
        for n in &g.nodes {
            needs[n.id.index()] = g.params_of(n.id).next().is_some() || n.inputs.iter().any(|i| needs[i.index()]);
        }
        let mut written: Vec<BufId> = vec![self.grad[g.loss.input().index()]];
        let mut out = Vec::new();
        for n in g.nodes.iter().rev() {
            self.current = Some(n.id);
            if self.layers.contains_key(&n.id) && needs[n.id.index()] {
                // A layer's temporaries' gradients come first: its parameter gradients read
                // them. (A node that needs no gradient has no output gradient to start from.)
                out.extend(self.index_grads(n.id, None, true)?);
            }
            if n.layer.is_some() {
                out.extend(match work {
                    ParamWork::Batch => self.batch_grad_layer(n.id)?,
                    ParamWork::PerExample(plan, kind) => self.per_example_layer(plan, kind, n.id)?,
                });
            }
            for (slot, input) in n.inputs.iter().enumerate() {
                if !needs[input.index()] || matches!(n.op, Op::Flatten) {
                    continue;
                }
                let dx = self.grad[input.index()];
                let first = !written.contains(&dx);
                written.push(dx);
                let tag = format!("{}_bwd{slot}{}", self.tag(n.id), if first { "_first" } else { "" });
                let launch = match &n.op {
                    Op::Input { .. } | Op::Flatten => continue,
                    _ if self.layers.contains_key(&n.id) => {
                        out.extend(self.index_grads(n.id, Some(slot), first)?);
                        continue;
                    }
                    Op::Activation(_) | Op::Add => {
                        // The derived input gradient of this operand (`dX`, `dA` or `dB`).
                        let target = match (&n.op, slot) {
                            (Op::Add, 0) => "dA",
                            (Op::Add, _) => "dB",
                            _ => "dX",
                        };
                        let eq = self
                            .grads
                            .step(n.id)
                            .and_then(|s| s.input_grads.iter().find(|e| e.lhs.tensor == target))
                            .expect("a derived input gradient");
                        self.pointwise(n.id, &tag, eq, first)?
                    }
                    Op::Pool(_) | Op::GlobalAvgPool => {
                        let eq = self.grads.step(n.id).and_then(|s| s.input_grads.first()).expect("a derived dX");
                        self.derived(n.id, &tag, eq, first)?
                    }
                    _ => return Err(unlowered(n.id)),
                };
                out.push(launch);
            }
        }
        Ok(out)
    }

    /// The buffer a step's local tensor name stands for (`X`, `Y`, `dX`, `A`, `dB`, ...).
    fn local(&self, node: NodeId, tensor: &str) -> Option<BufId> {
        let n = self.graph.node(node);
        let input = |i: usize| n.inputs.get(i).map(|id| id.index());
        Some(match tensor {
            "Y" => self.act[node.index()],
            "dY" => self.grad[node.index()],
            "X" | "A" => self.act[input(0)?],
            "B" => self.act[input(1)?],
            "dX" | "dA" => self.grad[input(0)?],
            "dB" => self.grad[input(1)?],
            _ => return None,
        })
    }

    /// The launch of a pointwise derived equation of `node`'s step.
    fn pointwise(&mut self, node: NodeId, name: &str, eq: &crate::grad::Equation, first: bool) -> Result<Launch> {
        let size = numel(&self.graph.node(node).shape) as usize;
        let (k, tensors) =
            equation::pointwise(name, eq, size, first).expect("activation and add equations are pointwise");
        let args = tensors.iter().map(|t| self.local(node, t).expect("a step's tensors are bound")).collect();
        Ok(self.launch(k?, args))
    }

    /// The launch of a derived equation of `node`'s step, a node with no parameters read
    /// through windows or reduced (a pool); `first`: the kernel is its target's first writer.
    fn derived(&mut self, node: NodeId, name: &str, eq: &crate::grad::Equation, first: bool) -> Result<Launch> {
        let g = self.graph;
        let (n, input) = (g.node(node), g.node(node).inputs[0]);
        let (in_shape, shape) = (&g.node(input).shape, &n.shape);
        let bindings = [
            ("X", in_shape, self.act[input.index()]),
            ("dX", in_shape, self.grad[input.index()]),
            ("Y", shape, self.act[node.index()]),
            ("dY", shape, self.grad[node.index()]),
        ];
        self.equation_launch(name, eq, self.ranges(node), &bindings, first)
    }

    /// The range of every variable of `node`'s derived equations but `n` (see
    /// [`crate::grad::GradStep::ranges`]).
    fn ranges(&self, node: NodeId) -> &'g [(crate::grad::Var, usize)] {
        let grads = self.grads;
        grads.step(node).map(|s| s.ranges.as_slice()).unwrap_or_default()
    }

    /// The launch of derived equation `eq` over `ranges`, lowered as the equations of a
    /// layer in index notation are (see [`index::equation_kernel`]), each tensor it names
    /// bound (its name, per-example shape, buffer) in `bindings`.
    fn equation_launch(
        &mut self,
        name: &str,
        eq: &crate::grad::Equation,
        ranges: &[(crate::grad::Var, usize)],
        bindings: &[(&str, &Vec<usize>, BufId)],
        first: bool,
    ) -> Result<Launch> {
        let bound = |t: &str| bindings.iter().find(|(u, _, _)| *u == t);
        let info = |t: &str| bound(t).map(|(_, shape, _)| index::TensorInfo::unpadded(shape.to_vec()));
        let (k, tensors) = index::equation_kernel(name, eq, ranges, &info, first, Batching::PerExample)?;
        let args = tensors
            .iter()
            .map(|t| bound(t).map(|(_, _, b)| *b).ok_or_else(|| crate::Error::Internal(format!("`{t}` is not bound"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.launch(k, args))
    }

    /// The non-private gradient of one layer's parameters, summed over the batch.
    fn batch_grad_layer(&mut self, node: NodeId) -> Result<Vec<Launch>> {
        let g = self.graph;
        let targets: Vec<BufId> = g
            .params_of(node)
            .map(|p| {
                self.extra(Role::BatchGrad(p.name.clone()), &format!("batch_grad.{}", p.name), false, p.shape.clone())
            })
            .collect();
        if !self.layers.contains_key(&node) {
            return Err(unlowered(node));
        }
        let tag = self.tag(node);
        let how = (Batching::Summed, LaunchMode::Grid, Windows::Columns);
        self.index_param_grads(node, &tag, &targets, how, "batch_grad", None)
    }

    fn slot(&self, param: &str) -> usize {
        self.graph.params.iter().position(|p| p.name == param).expect("a parameter of the graph")
    }

    /// One layer's per-example gradients or squared norms (or both) by its planned strategy.
    fn per_example_layer(&mut self, plan: &Strategies, kind: EntryKind, node: NodeId) -> Result<Vec<Launch>> {
        let slots = self.graph.params.len();
        let sq = self.extra(Role::SqNormParts, "sqnorm", true, vec![slots]);
        let strategy = strategy_of(plan, node);
        if !self.layers.contains_key(&node) {
            return Err(unlowered(node));
        }
        self.index_per_example(node, strategy, kind, sq)
    }

    /// After the backward pass of a per-example entry: the norms and clip factors (unless
    /// only gradients are wanted), and for the clipped sum the clipped gradients summed,
    /// by a weighted sum of the stored per-example gradients or, for ghost layers, by
    /// book-keeping.
    fn clip_and_sum(&mut self, plan: &Strategies, kind: EntryKind) -> Result<Vec<Launch>> {
        let g = self.graph;
        let slots = g.params.len();
        if kind == EntryKind::PerExampleGrads {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let sq = self.extra(Role::SqNormParts, "sqnorm", true, vec![slots]);
        let norms = self.extra(Role::Norms, "norms", true, vec![]);
        let clip = self.extra(Role::ClipFactors, "clip", true, vec![]);
        let clip_norm = self.extra(Role::ClipNorm, "clip_norm", false, vec![1]);
        self.current = None;
        out.push(self.launch(param_grads::norms_and_clip("norms_and_clip", slots)?, vec![sq, clip_norm, norms, clip]));
        if kind != EntryKind::ClippedSum {
            return Ok(out);
        }
        for n in g.nodes.iter().filter(|n| n.layer.is_some()) {
            self.current = Some(n.id);
            let tag = self.tag(n.id);
            let sums: Vec<BufId> = g
                .params_of(n.id)
                .map(|p| {
                    self.extra(
                        Role::ClippedSum(p.name.clone()),
                        &format!("clipped_sum.{}", p.name),
                        false,
                        p.shape.clone(),
                    )
                })
                .collect();
            if strategy_of(plan, n.id) == Strategy::Ghost && self.layers.contains_key(&n.id) {
                // Book-keeping of a layer lowered from its derived equations: each derived
                // gradient weighted by the clip factors and summed over the batch.
                out.extend(self.index_clipped_sums(n.id, &tag, &sums)?);
            } else {
                for (p, sum) in g.params_of(n.id).zip(sums) {
                    let pe = self.extra[&Role::PerExampleGrad(p.name.clone())];
                    let rows = p.shape[0];
                    let width = (numel(&p.shape) / rows as u64) as usize;
                    let k = param_grads::weighted_sum(&format!("weighted_sum_{rows}x{width}"), rows, width)?;
                    out.push(self.launch(k, vec![pe, clip, sum]));
                }
            }
        }
        Ok(out)
    }
}

impl<'g> Lowering<'g> {
    /// The index-notation layer of `node` (see [`Lowering::layers`]).
    fn index_layer(&self, node: NodeId) -> Result<&'g IndexLayer> {
        self.layers
            .get(&node)
            .ok_or_else(|| crate::Error::Internal(format!("node {} is not lowered as an index-notation layer", node.0)))
    }

    /// What the lowering knows of each tensor `node`'s derived equations name, the
    /// book-keeping factor scaled by the clip factors ([`index::CLIPPED`]) included once
    /// [`Self::index_clipped_sums`] has chosen it.
    fn info(&self, node: NodeId) -> Result<impl Fn(&str) -> Option<index::TensorInfo> + 'g> {
        let layer = self.index_layer(node)?;
        let clipped = self.clipped.get(&node).cloned();
        Ok(move |t: &str| match (t, &clipped) {
            (index::CLIPPED, Some(f)) => index::tensor_info(layer, f),
            _ => index::tensor_info(layer, t),
        })
    }

    /// The buffer of the parameter that `node`'s derived equations read as `local`.
    fn local_param(&self, node: NodeId, local: &str) -> Option<BufId> {
        if let Op::Index(_) = &self.graph.node(node).op {
            return self.param(node, local);
        }
        let suffix = |name: &str| name.rsplit('.').next().unwrap_or_default().to_string();
        let p = self.graph.params_of(node).find(|p| crate::grad::param_local(&suffix(&p.name)) == local)?;
        self.params.get(&p.name).copied()
    }

    /// The buffer a tensor of `node`'s derived equations names: a local tensor of the layer
    /// or the gradient of one; a parameter's gradient is the caller's (`param_targets`).
    fn index_buffer(&mut self, node: NodeId, name: &str, param_targets: &HashMap<String, BufId>) -> Result<BufId> {
        if name == index::CLIP {
            return Ok(self.extra(Role::ClipFactors, "clip", true, vec![]));
        }
        if name == index::CLIPPED {
            return self.extra.get(&clipped_role(node)).copied().ok_or_else(|| {
                crate::Error::Internal(format!("node {}'s clipped factor is read before it is made", node.0))
            });
        }
        let layer = self.index_layer(node)?;
        let n = self.graph.node(node);
        let (t, grad) = layer_grad::resolve(layer, name)
            .ok_or_else(|| crate::Error::Internal(format!("`{name}` is not a tensor of node {}", node.0)))?;
        let output = t.name == layer.output().lhs;
        Ok(match (t.kind, grad) {
            (LocalKind::Input(slot), false) => self.act[n.inputs[slot].index()],
            (LocalKind::Input(slot), true) => self.grad[n.inputs[slot].index()],
            (LocalKind::Param, false) => self.local_param(node, &t.name).expect("a declared parameter"),
            (LocalKind::Param, true) => *param_targets
                .get(&t.name)
                .ok_or_else(|| crate::Error::Internal(format!("no target for the gradient of `{name}`")))?,
            (LocalKind::Temp, false) if output => self.act[node.index()],
            (LocalKind::Temp, true) if output => self.grad[node.index()],
            (LocalKind::Temp, false) => {
                let (role, shape) = (Role::Saved(node.0, t.name.clone()), t.shape.clone());
                self.extra(role, &format!("n{}_{}", node.0, t.name), true, shape)
            }
            (LocalKind::Temp, true) => {
                let (role, shape) = (Role::Workspace(format!("n{}_d{}", node.0, t.name)), t.shape.clone());
                self.extra(role, &format!("n{}_d{}", node.0, t.name), true, shape)
            }
        })
    }

    /// The buffers of a kernel's argument tensors, named as `node`'s derived equations name
    /// them, in order: `bound(t)` where that names the buffer (a workspace of the caller's),
    /// else the layer's tensor or gradient ([`Self::index_buffer`]).
    fn buffers_of(
        &mut self,
        node: NodeId,
        tensors: &[String],
        targets: &HashMap<String, BufId>,
        bound: impl Fn(&str) -> Option<BufId>,
    ) -> Result<Vec<BufId>> {
        tensors
            .iter()
            .map(|t| match bound(t) {
                Some(b) => Ok(b),
                None => self.index_buffer(node, t, targets),
            })
            .collect()
    }

    /// The launches of one derived equation of `node`'s layer: its kernel, after a kernel
    /// zeroing the target where the equation is a scatter and the target's first writer.
    /// With `columns`, a window product runs as im2col or col2im columns and contractions
    /// ([`Self::window_launches`]); without, as one loop nest that reads the window in place.
    fn index_launch(
        &mut self,
        node: NodeId,
        name: &str,
        eq: &crate::grad::Equation,
        (first, columns): (bool, bool),
        (batching, mode): (Batching, LaunchMode),
        param_targets: &HashMap<String, BufId>,
    ) -> Result<Vec<Launch>> {
        let ranges = self.ranges(node);
        let info = self.info(node)?;
        if let Some(w) = index::window_product(eq, ranges, &info).filter(|_| columns) {
            // A batch-summed gradient: the gather's columns, then every example's product
            // added into the target (a scatter or a bias is never summed).
            if batching == Batching::PerExample || (w.after.is_none() && w.gemm.bias.is_none()) {
                return self.window_launches(node, name, &w, ranges, first, (batching, mode), param_targets, None);
            }
        }
        let (k, tensors) = index::equation_kernel(name, eq, ranges, &info, first, batching)?;
        let args = self.buffers_of(node, &tensors, param_targets, |_| None)?;
        Ok(vec![self.launch_as(k, args, mode)])
    }

    /// Launches over one grid (the batch, or the same rows: more than one, none with a
    /// contraction) as one launch named `name` whose grid iteration runs each one's
    /// iteration in turn ([`fuse::sequence`]):
    /// what one writes for an example and a later one reads (a norm's row statistics, then
    /// its `X̂`) is read back while it is in cache, and what several read (the output
    /// gradient both parameter gradients of a layer read) is read from memory once. The
    /// launches as they are where that does not apply or `sequence` refuses (iterations
    /// that are not independent).
    fn in_sequence(&mut self, name: &str, launches: Vec<Launch>) -> Vec<Launch> {
        let Some(grid) = launches.first().map(|l| self.kernels[l.kernel].grid.extent) else { return launches };
        let fusable = |l: &Launch| {
            let k = &self.kernels[l.kernel];
            l.mode == LaunchMode::Grid && k.grid.extent == grid && !k.has_contractions()
        };
        if launches.len() < 2 || !launches.iter().all(fusable) {
            return launches;
        }
        // Each buffer named by its id, so that the parts name a buffer alike.
        let parts: Vec<(Kernel, Vec<String>)> = launches
            .iter()
            .map(|l| (self.kernels[l.kernel].clone(), l.args.iter().map(|b| b.0.to_string()).collect()))
            .collect();
        let Ok((k, bound)) = fuse::sequence(name, &parts) else { return launches };
        let args = bound.iter().map(|t| BufId(t.parse().expect("a buffer id"))).collect();
        vec![self.launch(k, args)]
    }

    /// crb's two launches of `pg`'s per-example gradient (see [`index::crb_kernels`]): the
    /// derived equation over every tap position into a workspace, then its kernel-sized
    /// corner into `targets`; `None` where the gradient is no window product.
    fn crb_launches(
        &mut self,
        node: NodeId,
        name: &str,
        pg: &crate::grad::ParamGrad,
        targets: &HashMap<String, BufId>,
        positions: &[usize],
    ) -> Result<Option<Vec<Launch>>> {
        let ranges = self.ranges(node);
        let info = self.info(node)?;
        let Some((kernels, full_shape)) = index::crb_kernels(name, &pg.eq, ranges, &info, positions)? else {
            return Ok(None);
        };
        let role = Role::Workspace(format!("crb{}", node.0));
        let full = self.extra(role, &format!("crb_full{}", node.0), true, full_shape);
        let mut out = Vec::new();
        for (k, tensors) in kernels {
            let args = self.buffers_of(node, &tensors, targets, |t| (t == index::CRB_FULL).then_some(full))?;
            out.push(self.launch(k, args));
        }
        Ok(Some(out))
    }

    /// The launches of a window product (see [`index::WindowProduct`]): the columns into a
    /// workspace of their own (gathered from the window, or computed by the contraction and
    /// then scattered through the window), and one contraction per example. Columns that
    /// the forward pass of a node that keeps them (see [`Self::kept_columns`]) gathered by
    /// the same equation are read where they are, with no gather. `first`: the equation's
    /// target is written first here. The launches run in `mode`: over the batch (in chunks
    /// where the columns exceed the chunk budget), or one example at a time (`naive`).
    #[allow(clippy::too_many_arguments)]
    fn window_launches(
        &mut self,
        node: NodeId,
        name: &str,
        w: &index::WindowProduct,
        ranges: &[(crate::grad::Var, usize)],
        first: bool,
        (batching, mode): (Batching, LaunchMode),
        param_targets: &HashMap<String, BufId>,
        norm: Option<(BufId, usize)>,
    ) -> Result<Vec<Launch>> {
        let shape = w.columns_shape.clone();
        let of_layer = self.info(node)?;
        let info = |t: &str| {
            if t == index::COLUMNS {
                Some(index::TensorInfo::unpadded(shape.clone()))
            } else {
                of_layer(t)
            }
        };
        // Columns the forward pass kept: read them (no gather).
        let key = w.before.as_ref().map(|eq| (node, eq.to_string()));
        let kept = key.as_ref().filter(|_| self.forward_done).and_then(|k| self.window_columns.get(k)).copied();
        // Columns for the whole batch beyond the chunk budget: the launches run in chunks
        // of examples, the columns a chunk workspace (as a built-in conv's).
        let per_example = shape.iter().product::<usize>() as u64 * 4;
        // Columns that only these kernels use, one example's small enough for a core's
        // cache: the kernels run as one, the columns in private memory (`fuse`), one
        // example's per worker thread, so they need no chunks.
        let keeps = !self.forward_done && self.kept.contains(&node);
        let private = mode == LaunchMode::Grid
            && kept.is_none()
            && !keeps
            && per_example <= self.private_bytes
            && w.before.is_some() != w.after.is_some();
        let chunk = match (kept, mode) {
            (None, LaunchMode::Grid) if !private => {
                column_chunk_examples(per_example, self.batch as u64, self.chunk_bytes)
            }
            _ => None,
        };
        // A batch-summed product in chunks adds every chunk's examples into its target,
        // zeroed once before them where it is the target's first writer.
        let zero_summed = chunk.is_some() && batching == Batching::Summed && first;
        let overwrite = (first && !zero_summed) || w.after.is_some();
        let gemm_name = if zero_summed { format!("{name}_chunked") } else { name.to_string() };
        // Each kernel, with whether its (batch-summed) target is zeroed before the chunks.
        let mut kernels = Vec::new();
        if let (Some(eq), None) = (&w.before, kept) {
            let im2col = format!("{name}_im2col");
            kernels.push((index::equation_kernel(&im2col, eq, ranges, &info, true, Batching::PerExample)?, false));
        }
        let slots = self.graph.params.len();
        // `naive`'s launches see one example each: nothing to split.
        // The target's rows over every group (`[G·M, N]`).
        let (m, n) = (w.gemm.groups * w.gemm.dims[0], w.gemm.dims[2]);
        let parts = if mode == LaunchMode::PerExample { 1 } else { index::summed_parts(self.batch, m * n) };
        let norm_slot = norm.map(|(_, s)| (s, slots));
        let gemms = index::flat_gemm(&gemm_name, &w.gemm, &info, overwrite, (batching, parts), norm_slot)?;
        // The zeroing belongs to the kernel that writes the target, the last.
        let last = gemms.len() - 1;
        kernels.extend(gemms.into_iter().enumerate().map(|(i, k)| (k, zero_summed && i == last)));
        if let Some(eq) = &w.after {
            // The scatter of the columns zeroes its target itself where it is the first writer.
            let col2im = format!("{name}_col2im{}", if first { "_first" } else { "" });
            kernels.push((index::equation_kernel(&col2im, eq, ranges, &info, first, Batching::PerExample)?, false));
        }
        if private {
            // The gather or scatter and the product; a product summed over the batch in
            // partial sums is two kernels, and the gather joins the first.
            if !(2..=3).contains(&kernels.len()) || kernels.iter().any(|(_, zero)| *zero) {
                return Err(crate::error::Error::Internal(format!("`{name}`: no product to fuse its columns with")));
            }
            let parts: Vec<_> = kernels.drain(..2).map(|(k, _)| k).collect();
            // Named after the product, the part with the contraction.
            let product = parts.iter().find(|(k, _)| k.has_contractions()).map_or(name, |(k, _)| k.name.as_str());
            let fused = fuse::fuse(&format!("{product}_fused"), &parts, index::COLUMNS)?;
            kernels.insert(0, (fused, false));
        }
        // The columns' workspace (none where they are private).
        let cols = match kept {
            Some(cols) => Some(cols),
            None if private => None,
            None => {
                let cols = self.extra(Role::Workspace(format!("{name}_cols")), &format!("{name}_cols"), true, shape);
                self.buffers[cols.0 as usize].chunk = chunk;
                Some(cols)
            }
        };
        if let (Some(key), true, Some(cols)) = (key, keeps, cols) {
            self.window_columns.insert(key, cols);
        }
        // The zeroing launch runs before the chunks.
        let (mut zeros, mut group) = (Vec::new(), Vec::new());
        for ((k, tensors), zero_first) in kernels {
            let mut args = Vec::new();
            let mut sq = None;
            for t in &tensors {
                match (t.as_str(), norm) {
                    (index::COLUMNS, _) => args.push(
                        cols.ok_or_else(|| crate::error::Error::Internal(format!("`{name}` binds private columns")))?,
                    ),
                    (index::PARTS, _) => {
                        let role = Role::Workspace(format!("{name}_parts"));
                        args.push(self.extra(role, &format!("{name}_parts"), false, vec![parts, m, n]));
                    }
                    (index::SQNORM, Some((buf, _))) => sq = Some(buf),
                    _ => args.push(self.index_buffer(node, t, param_targets)?),
                }
            }
            let target = *args.last().expect("a target");
            args.extend(sq);
            if zero_first {
                zeros.push(self.launch(param_grads::zero(&format!("zero_{m}x{n}"), m, n)?, vec![target]));
            }
            group.push(self.launch_as(k, args, mode));
        }
        zeros.extend(self.chunked(group, chunk));
        Ok(zeros)
    }

    /// Gradients of `node`'s layer other than its parameters': those of its temporaries
    /// (`slot = None`, written here first) or of its input `slot`, whose first equation
    /// overwrites when `first`.
    fn index_grads(&mut self, node: NodeId, slot: Option<usize>, first: bool) -> Result<Vec<Launch>> {
        let layer = self.index_layer(node)?;
        let wanted: Vec<String> = layer
            .tensors
            .iter()
            .filter(|t| match (t.kind, slot) {
                (LocalKind::Input(s), Some(want)) => s == want,
                (LocalKind::Temp, None) => t.name != layer.output().lhs,
                _ => false,
            })
            .map(|t| layer_grad::grad_name(layer, &t.name))
            .collect();
        let eqs: Vec<crate::grad::Equation> = self
            .grads
            .step(node)
            .map(|s| s.input_grads.iter().filter(|e| wanted.contains(&e.lhs.tensor)).cloned().collect())
            .unwrap_or_default();
        let tag = self.tag(node);
        let mut written: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for (i, eq) in eqs.iter().enumerate() {
            let is_first = !written.contains(&eq.lhs.tensor) && (slot.is_none() || first);
            written.push(eq.lhs.tensor.clone());
            let overwrites = is_first && !eq.accumulate;
            let name = format!("{tag}_bwd_{}{i}{}", eq.lhs.tensor, if overwrites { "_first" } else { "" });
            let per_example = (Batching::PerExample, LaunchMode::Grid);
            out.extend(self.index_launch(node, &name, eq, (is_first, true), per_example, &HashMap::new())?);
        }
        Ok(out)
    }

    /// The parameter gradients of `node`'s layer into `targets` (in the order of
    /// `graph.params_of`): summed over the batch, or per example, a gradient that is a
    /// window product run as `windows` says. With `norms`, each per-example gradient's
    /// squared norm goes into its slot of that buffer: taken as the gradient is stored
    /// where its equation is a plain gather or a window product run over the batch, else by
    /// a pass over the stored gradient after it; with `norms: (_, false)` (only the norms
    /// are wanted) a plain gather computes the norm without storing the gradient at all.
    fn index_param_grads(
        &mut self,
        node: NodeId,
        tag: &str,
        targets: &[BufId],
        (batching, mode, windows): (Batching, LaunchMode, Windows),
        suffix: &str,
        norms: Option<(BufId, bool)>,
    ) -> Result<Vec<Launch>> {
        let (norms, store) = (norms.map(|(sq, _)| sq), norms.is_none_or(|(_, store)| store));
        let pgs = self.grads.step(node).map(|s| s.param_grads.clone()).unwrap_or_default();
        let fusable = batching == Batching::PerExample && mode == LaunchMode::Grid;
        let columns = windows == Windows::Columns;
        let mut out = Vec::new();
        for pg in &pgs {
            let (local, at) = self.param_grad_target(node, pg)?;
            let name = format!("{tag}_{}_{suffix}", param_suffix(&pg.param));
            let map = HashMap::from([(local, targets[at])]);
            if let (Windows::Crb(positions), true) = (&windows, fusable) {
                if let Some(launches) = self.crb_launches(node, &name, pg, &map, positions)? {
                    out.extend(launches);
                    if let Some(sq) = norms {
                        out.push(self.sqnorm_launch(&pg.param, targets[at], sq)?);
                    }
                    continue;
                }
            }
            if let (Some(sq), true) = (norms, fusable) {
                let name = format!("{name}_norm");
                if let Some(launches) = self.gather_with_norm(node, &name, pg, &map, sq, (columns, store))? {
                    out.extend(launches);
                    continue;
                }
            }
            out.extend(self.index_launch(node, &name, &pg.eq, (true, columns), (batching, mode), &map)?);
            if let Some(sq) = norms {
                out.push(self.sqnorm_launch(&pg.param, targets[at], sq)?);
            }
        }
        // The parameters' per-example kernels of one layer as one launch where they run
        // over the batch (a layer's weight and bias gradients read its output gradient once).
        let name = match (norms, store) {
            (None, _) => format!("{tag}_{suffix}"),
            (Some(_), true) => format!("{tag}_{suffix}_norm"),
            (Some(_), false) => format!("{tag}_{suffix}_norm_only"),
        };
        Ok(self.in_sequence(&name, out))
    }

    /// The local tensor whose gradient `pg` derives, and the position of its parameter in
    /// `graph.params_of(node)`.
    fn param_grad_target(&self, node: NodeId, pg: &crate::grad::ParamGrad) -> Result<(String, usize)> {
        let layer = self.index_layer(node)?;
        let (local, _) = layer_grad::resolve(layer, &pg.eq.lhs.tensor)
            .ok_or_else(|| crate::Error::Internal(format!("`{}` names no tensor of node {}", pg.eq.lhs, node.0)))?;
        let at =
            self.graph.params_of(node).position(|p| p.name == pg.param).ok_or_else(|| {
                crate::Error::Internal(format!("`{}` is not a parameter of node {}", pg.param, node.0))
            })?;
        Ok((local.name.clone(), at))
    }

    /// The clipped sums of `node`'s parameters (`sums`, in the order of `graph.params_of`)
    /// without per-example gradients (book-keeping): the factor [`index::scaled_factor`]
    /// finds scaled by the clip factors once, and each derived gradient that reads it
    /// summed over the batch with it in place (a GEMM for a product of two matrices); any
    /// other derived gradient weighted by the clip factors in its own kernel.
    fn index_clipped_sums(&mut self, node: NodeId, tag: &str, sums: &[BufId]) -> Result<Vec<Launch>> {
        let layer = self.index_layer(node)?;
        let step = self.grads.step(node).ok_or_else(|| crate::Error::Internal("no derived step".into()))?;
        let info = |t: &str| index::tensor_info(layer, t);
        let eqs: Vec<&crate::grad::Equation> = step.param_grads.iter().map(|pg| &pg.eq).collect();
        let scaled = index::scaled_factor(&eqs, &info);
        let mut out = Vec::new();
        if let Some(f) = &scaled {
            let shape = info(f).expect("a tensor of the layer").shape;
            let size = shape.iter().product::<usize>();
            let source = self.index_buffer(node, f, &HashMap::new())?;
            let target = self.extra(clipped_role(node), &format!("n{}_{f}_clipped", node.0), true, shape);
            let clip = self.index_buffer(node, index::CLIP, &HashMap::new())?;
            let k = param_grads::scale_rows(&format!("{tag}_bookkeep_scale_{size}"), size)?;
            out.push(self.launch(k, vec![source, clip, target]));
        }
        if let Some(f) = &scaled {
            self.clipped.insert(node, f.clone());
        }
        for pg in &step.param_grads {
            let (local, at) = self.param_grad_target(node, pg)?;
            let targets = HashMap::from([(local, sums[at])]);
            let name = format!("{tag}_{}_bookkeep", param_suffix(&pg.param));
            if let Some(f) = scaled.as_deref().filter(|f| index::scales(&pg.eq, f)) {
                // The derived gradient summed over the batch as it is, reading the scaled
                // factor: a GEMM (on the kept columns for a window product).
                let eq = index::reading_clipped(&pg.eq, f);
                let summed = (Batching::Summed, LaunchMode::Grid);
                out.extend(self.index_launch(node, &name, &eq, (true, true), summed, &targets)?);
                continue;
            }
            let (k, tensors) = index::clipped_sum_kernel(&name, &pg.eq, &step.ranges, &info, index::CLIP)?;
            let args = self.buffers_of(node, &tensors, &targets, |_| None)?;
            out.push(self.launch(k, args));
        }
        Ok(out)
    }

    /// One index-notation layer's per-example gradients (always stored: the layer's norms
    /// are taken from them) and their squared norms when wanted.
    fn index_per_example(
        &mut self,
        node: NodeId,
        strategy: Strategy,
        kind: EntryKind,
        sq: BufId,
    ) -> Result<Vec<Launch>> {
        let g = self.graph;
        let tag = self.tag(node);
        if strategy == Strategy::Ghost {
            // Squared norms from Gram products of each derived gradient's factors.
            let step = self.grads.step(node).ok_or_else(|| crate::Error::Internal("no derived step".into()))?;
            let mut out = Vec::new();
            for pg in &step.param_grads {
                let form = layer_grad::ghost_form(&pg.eq)
                    .ok_or_else(|| crate::Error::Internal(format!("`{}` has no ghost form", pg.param)))?;
                let name = format!("{tag}_{}_ghost", param_suffix(&pg.param));
                out.extend(self.ghost_launches(node, &name, &pg.eq, &form, self.slot(&pg.param), sq)?);
            }
            return Ok(out);
        }
        let params: Vec<(String, Vec<usize>)> = g.params_of(node).map(|p| (p.name.clone(), p.shape.clone())).collect();
        let pe: Vec<BufId> = params
            .into_iter()
            .map(|(name, shape)| self.extra(Role::PerExampleGrad(name.clone()), &format!("grad.{name}"), true, shape))
            .collect();
        let (batching, mode, suffix) = match strategy {
            Strategy::Naive => (Batching::Summed, LaunchMode::PerExample, "naive"),
            _ => (Batching::PerExample, LaunchMode::Grid, strategy.name()),
        };
        let windows = match (&g.node(node).op, strategy) {
            (Op::Conv(c), Strategy::Crb) => {
                let in_shape = g.node(g.node(node).inputs[0]).shape.clone();
                Windows::Crb(crb_positions(c, &in_shape, &g.node(node).shape))
            }
            (_, Strategy::Direct | Strategy::Crb) => Windows::InPlace,
            _ => Windows::Columns,
        };
        let norms = (kind != EntryKind::PerExampleGrads).then_some((sq, kind != EntryKind::PerExampleNorms));
        self.index_param_grads(node, &tag, &pe, (batching, mode, windows), suffix, norms)
    }

    /// The squared norm of `node`'s derived gradient `eq`, by its ghost form `form`, into
    /// slot `slot` of `sq`. A factor read through a window is read from its im2col columns
    /// where that helps: the forward pass's where it kept them (plain, unguarded reads), else
    /// gathered here where that lets the Gram matrices be contractions. The Gram matrices are
    /// contractions where both factors are then plain matrices ([`index::ghost_gram_kernel`]),
    /// else one loop nest sums them in registers ([`index::ghost_kernel`]). Gathered columns
    /// and Gram matrices of the batch beyond the chunk budget run in chunks of examples.
    fn ghost_launches(
        &mut self,
        node: NodeId,
        name: &str,
        eq: &crate::grad::Equation,
        form: &layer_grad::GhostForm,
        slot: usize,
        sq: BufId,
    ) -> Result<Vec<Launch>> {
        let ranges = self.ranges(node);
        let of_layer = self.info(node)?;
        let slots = self.graph.params.len();
        // A window product's columns: their gather and per-example shape, and the form that
        // reads them instead of the window.
        let window = index::window_product(eq, ranges, &of_layer).and_then(|w| Some((w.before?, w.columns_shape)));
        let (before, shape) = window.unzip();
        let shape = shape.unwrap_or_default();
        let on_columns = before.as_ref().and_then(|b| {
            let Expr::Read(x) = &b.rhs else { return None };
            let mut f = form.clone();
            let mut swapped = false;
            for side in [&mut f.left, &mut f.right] {
                if *side == Expr::Read(x.clone()) {
                    *side = Expr::Read(b.lhs.clone());
                    swapped = true;
                }
            }
            swapped.then_some(f)
        });
        let kept = before.as_ref().and_then(|b| self.window_columns.get(&(node, b.to_string())).copied());
        let info = |t: &str| match t {
            index::COLUMNS => Some(index::TensorInfo::unpadded(shape.clone())),
            _ => of_layer(t),
        };
        let gram = match &on_columns {
            Some(f) => index::ghost_gram_kernel(name, f, ranges, &info, slot, slots)?,
            None => None,
        };
        let mut kernels = Vec::new();
        // Bytes per example of the workspaces: gathered columns and the Gram matrices.
        let mut per_example = 0;
        let (gather, positions) = match gram {
            Some((k, tensors, t)) => {
                let gather = kept.is_none();
                if let (true, Some(b)) = (gather, &before) {
                    let im2col = format!("{name}_im2col");
                    kernels.push(index::equation_kernel(&im2col, b, ranges, &info, true, Batching::PerExample)?);
                    per_example += shape.iter().product::<usize>();
                }
                per_example += 2 * t * t;
                kernels.push((k, tensors));
                (gather, t)
            }
            None => {
                // The loop nest reads kept columns, or the window itself.
                let f = on_columns.as_ref().filter(|_| kept.is_some()).unwrap_or(form);
                kernels.push(index::ghost_kernel(name, f, ranges, &info, slot, slots)?);
                (false, 0)
            }
        };
        let chunk = match per_example {
            0 => None,
            e => column_chunk_examples(e as u64 * 4, self.batch as u64, self.chunk_bytes),
        };
        let workspace = |l: &mut Self, what: &str, shape: Vec<usize>| {
            let id = l.extra(Role::Workspace(format!("{name}_{what}")), &format!("{name}_{what}"), true, shape);
            l.buffers[id.0 as usize].chunk = chunk;
            id
        };
        // Gathered columns that one example's fit a core's cache: the gather runs inside the
        // Gram kernel, the columns in private memory (`fuse`).
        let private = gather
            && chunk.is_none()
            && kernels.len() == 2
            && shape.iter().product::<usize>() as u64 * 4 <= self.private_bytes;
        if private {
            let fused = fuse::fuse(&format!("{name}_fused"), &kernels, index::COLUMNS)?;
            kernels = vec![fused];
        }
        let cols = if gather && !private { Some(workspace(self, "cols", shape.clone())) } else { kept };
        let grams = (positions > 0).then(|| workspace(self, "grams", vec![2, positions, positions]));
        let mut launches = Vec::new();
        for (k, tensors) in kernels {
            let args = self.buffers_of(node, &tensors, &HashMap::new(), |t| match (t, cols, grams) {
                (index::COLUMNS, Some(b), _) | (index::GRAMS, _, Some(b)) => Some(b),
                (index::SQNORM, _, _) => Some(sq),
                _ => None,
            })?;
            launches.push(self.launch(k, args));
        }
        Ok(self.chunked(launches, chunk))
    }

    /// A launch storing the squared norm of each example's stored gradient of `param` in
    /// its slot of `sq`.
    fn sqnorm_launch(&mut self, param: &str, grad: BufId, sq: BufId) -> Result<Launch> {
        let p = self.graph.params.iter().find(|p| p.name == param).expect("a parameter of the graph");
        let (slot, slots, size) = (self.slot(param), self.graph.params.len(), numel(&p.shape) as usize);
        let k = param_grads::sqnorm(&format!("sqnorm_{size}_slot{slot}of{slots}"), size, slot, slots)?;
        Ok(self.launch(k, vec![grad, sq]))
    }

    /// The launches of `pg`'s per-example gradient that also take each example's squared
    /// norm into `sq` as they store it into `targets`: a gather that sums it as it stores
    /// (see [`index::gather_with_norm`]; without `store`, one that never stores the
    /// gradient), or a window product whose contraction's kernel sums it over the product
    /// just written (see [`index::flat_gemm`]; only with `columns`, else a window product is
    /// a gather too); `None` for any other equation (a matrix product).
    fn gather_with_norm(
        &mut self,
        node: NodeId,
        name: &str,
        pg: &crate::grad::ParamGrad,
        targets: &HashMap<String, BufId>,
        sq: BufId,
        (columns, store): (bool, bool),
    ) -> Result<Option<Vec<Launch>>> {
        let layer = self.index_layer(node)?;
        let ranges = self.ranges(node);
        let info = |t: &str| index::tensor_info(layer, t);
        let (slot, slots) = (self.slot(&pg.param), self.graph.params.len());
        if let Some(w) = index::window_product(&pg.eq, ranges, &info).filter(|_| columns) {
            // A window product: the squared norm in its contraction's kernel.
            if w.after.is_some() || w.gemm.bias.is_some() {
                return Ok(None);
            }
            let norm = Some((sq, slot));
            let per_example = (Batching::PerExample, LaunchMode::Grid);
            return self.window_launches(node, name, &w, ranges, true, per_example, targets, norm).map(Some);
        }
        let name = if store { name.to_string() } else { format!("{name}_only") };
        let Some((k, tensors)) = index::gather_with_norm(&name, &pg.eq, ranges, &info, (slot, slots), store)? else {
            return Ok(None);
        };
        let args = self.buffers_of(node, &tensors, targets, |t| (t == index::SQNORM).then_some(sq))?;
        Ok(Some(vec![self.launch(k, args)]))
    }
}

/// The workspace of `node`'s book-keeping factor scaled by the clip factors
/// ([`index::CLIPPED`]).
fn clipped_role(node: NodeId) -> Role {
    Role::Workspace(format!("n{}_clipped", node.0))
}

/// The error for a node with parameters (or an op of the layer form) that the generic
/// lowering of derived equations did not take (`Lowering::layers` lacks it): a bug.
fn unlowered(node: NodeId) -> crate::Error {
    crate::Error::Internal(format!("node {} is not lowered from its derived equations", node.0))
}

/// `weight` for `conv1.weight`: the name a parameter's kernels carry.
fn param_suffix(param: &str) -> &str {
    param.rsplit('.').next().unwrap_or_default()
}

/// The positions per spatial axis crb's grouped convolution produces (≥ the kernel).
pub fn crb_positions(c: &crate::graph::Conv, in_shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    (0..c.kernel.len())
        .map(|a| {
            let padded = in_shape[a + 1] + c.pad_lo[a] + c.pad_hi[a];
            let span = c.stride[a] * (out_shape[a + 1] - 1) + 1;
            (padded - span) / c.dilation[a] + 1
        })
        .collect()
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "buffers")?;
        for (i, b) in self.buffers.iter().enumerate() {
            let dims: Vec<String> = b.shape.iter().map(|d| d.to_string()).collect();
            let batch = match (b.batched, b.chunk) {
                (true, Some(k)) => format!("min(B, {k}), "),
                (true, None) => "B, ".into(),
                (false, _) => String::new(),
            };
            writeln!(f, "  b{i} {} [{batch}{}] {:?}", b.name, dims.join(", "), b.role)?;
        }
        for e in &self.entries {
            writeln!(f, "entry {:?}", e.kind)?;
            for l in &e.launches {
                let args: Vec<String> = l.args.iter().map(|a| self.buffers[a.0 as usize].name.clone()).collect();
                let mode = match l.mode {
                    LaunchMode::Grid => String::new(),
                    LaunchMode::PerExample => " per-example".into(),
                    LaunchMode::Chunked { group, examples } => format!(" chunk{group} of {examples}"),
                };
                writeln!(f, "  {}({}){mode}", self.kernels[l.kernel].name, args.join(", "))?;
            }
        }
        for k in &self.kernels {
            writeln!(f)?;
            write!(f, "{k}")?;
        }
        Ok(())
    }
}
