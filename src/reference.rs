//! The f64 reference evaluator: the test suite's numerical oracle.
//!
//! It runs a checked [`Graph`] straight from its definition, one example at a time, with
//! plain loops in `f64`: a forward pass that keeps every node's activation, the example's own
//! loss, then a backward pass that propagates the loss gradient node by node (accumulating
//! where an activation feeds several consumers, e.g. residual adds) and collects the gradient
//! of every parameter. There are no strategies, no kernels and no batching tricks here, so the
//! numbers are easy to trust; the compiled kernels are tested against them (and these loops
//! are tested against central finite differences and against vectors written by PyTorch
//! autograd, see `tests/reference.rs`). It is never used on the fast path.
//!
//! Semantics follow PyTorch exactly:
//! - conv1d/conv2d: zero padding (per side: `pad_lo` before, `pad_hi` after), stride, dilation, groups, optional bias; weights
//!   `[out, in/groups, k...]`.
//! - linear: over the last dim (extra leading dims are rows); weight `[out, in]`.
//! - relu (gradient 0 at 0), leaky_relu (gradient `slope` at 0), tanh, sigmoid, gelu (exact
//!   erf form), hardswish (gradient x/3 + 1/2 on [-3, 3], 0 below, 1 above).
//! - maxpool: padding acts as -inf; the gradient goes to the *first* maximum of the window in
//!   row-major order. avgpool: `count_include_pad=True` (PyTorch's default), `ceil_mode=False`.
//! - global_avg_pool: mean over all non-channel dims, `[C, ...] -> [C]`. flatten: row-major.
//! - group_norm/instance_norm: biased variance, `eps` inside the square root, affine per
//!   channel. layer_norm: over the last `Norm::groups` dims, affine params of those dims.
//! - cross_entropy: `logsumexp(logits) - logits[label]`; mse: mean over the example's elements
//!   of `(pred - target)^2`. Each example's loss is its own (no `1/B`).
//!
//! 1-D convs and pools are run as 2-D ones with a height of 1.

mod index;

use std::collections::BTreeMap;

use thiserror::Error;

use crate::graph::{numel, Activation, Conv, Graph, LabelSpec, Linear, Loss, Node, Norm, Op, Pool, PoolKind};

/// The labels of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Labels {
    /// One class index per example (for `cross_entropy`).
    Classes(Vec<usize>),
    /// `[B × numel(label shape)]`, row-major (for `mse`).
    Target(Vec<f64>),
}

/// A batch: every model input by name, `[B × numel(shape)]` row-major, and the labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub inputs: BTreeMap<String, Vec<f64>>,
    pub labels: Labels,
    pub size: usize,
}

/// Parameters by PyTorch name (`conv1.weight`), in PyTorch's layout, row-major.
pub type Params = BTreeMap<String, Vec<f64>>;

/// What [`evaluate`] computes.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// `[B]`: each example's own loss.
    pub loss: Vec<f64>,
    /// `[B × numel(loss input)]`: the logits / prediction the loss reads.
    pub output: Vec<f64>,
    /// Parameter name -> `[B × numel(param)]`: the gradient of each example's own loss
    /// (not divided by B, not summed).
    pub grads: BTreeMap<String, Vec<f64>>,
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum ReferenceError {
    #[error("missing parameter `{0}`")]
    MissingParam(String),
    #[error("parameter `{name}` has {got} values, expected {expected}")]
    ParamLength { name: String, expected: usize, got: usize },
    #[error("missing input `{0}`")]
    MissingInput(String),
    #[error("input `{name}` has {got} values, expected {expected} (batch × per-example size)")]
    InputLength { name: String, expected: usize, got: usize },
    #[error("the model's label `{name}` is {expected}, but the batch holds the other kind")]
    LabelKind { name: String, expected: &'static str },
    #[error("label `{name}` has {got} values, expected {expected}")]
    LabelLength { name: String, expected: usize, got: usize },
    #[error("label {label} of example {example} is out of range: the model has {classes} classes")]
    LabelOutOfRange { example: usize, label: usize, classes: usize },
    #[error("index {index} is out of range for parameter `{name}` with {len} values")]
    ParamIndex { name: String, index: usize, len: usize },
    #[error("finite-difference direction for `{name}` has {got} values, expected {expected}")]
    DirectionLength { name: String, expected: usize, got: usize },
}

/// Forward, per-example loss and per-example parameter gradients.
pub fn evaluate(graph: &Graph, params: &Params, batch: &Batch) -> Result<Output, ReferenceError> {
    let prep = Prepared::new(graph, params, batch)?;
    let loss_node = graph.loss.input().index();
    let out_len = graph.nodes[loss_node].shape.iter().product::<usize>();
    let mut out = Output {
        loss: Vec::with_capacity(batch.size),
        output: Vec::with_capacity(batch.size * out_len),
        grads: graph
            .params
            .iter()
            .map(|p| (p.name.clone(), vec![0.0; batch.size * numel(&p.shape) as usize]))
            .collect(),
    };
    let mut acts = vec![Vec::new(); graph.nodes.len()];
    for n in 0..batch.size {
        prep.forward(n, &mut acts, 0..graph.nodes.len());
        let (loss, dout) = prep.loss(n, &acts[loss_node], true);
        out.loss.push(loss);
        out.output.extend_from_slice(&acts[loss_node]);
        let pgrads = prep.backward(&acts, dout.expect("asked for the loss gradient"));
        for p in &graph.params {
            let g = &pgrads[&p.name];
            let len = g.len();
            out.grads.get_mut(&p.name).expect("allocated above")[n * len..(n + 1) * len].copy_from_slice(g);
        }
    }
    Ok(out)
}

/// The forward pass only: each example's loss `[B]`.
pub fn loss_only(graph: &Graph, params: &Params, batch: &Batch) -> Result<Vec<f64>, ReferenceError> {
    let prep = Prepared::new(graph, params, batch)?;
    let loss_node = graph.loss.input().index();
    let mut acts = vec![Vec::new(); graph.nodes.len()];
    Ok((0..batch.size)
        .map(|n| {
            prep.forward(n, &mut acts, 0..graph.nodes.len());
            prep.loss(n, &acts[loss_node], false).0
        })
        .collect())
}

/// Central difference of every example's loss with respect to one element of one
/// parameter: `(ℓ_n(θ + ε e_i) − ℓ_n(θ − ε e_i)) / (2ε)`, `[B]`. (The divisor is the step
/// actually taken in floating point.)
pub fn finite_difference(
    graph: &Graph,
    params: &Params,
    batch: &Batch,
    param: &str,
    index: usize,
    eps: f64,
) -> Result<Vec<f64>, ReferenceError> {
    Ok(finite_differences(graph, params, batch, param, &[index], eps)?.remove(0))
}

/// [`finite_difference`] for several elements of one parameter: `[indices.len()][B]`. The
/// activations before the parameter's layer are computed once for all of them.
pub fn finite_differences(
    graph: &Graph,
    params: &Params,
    batch: &Batch,
    param: &str,
    indices: &[usize],
    eps: f64,
) -> Result<Vec<Vec<f64>>, ReferenceError> {
    let len = params.get(param).ok_or_else(|| ReferenceError::MissingParam(param.to_string()))?.len();
    if let Some(&index) = indices.iter().find(|&&i| i >= len) {
        return Err(ReferenceError::ParamIndex { name: param.to_string(), index, len });
    }
    central_differences(graph, params, batch, param, indices.len(), eps, |k| {
        let mut d = vec![0.0; len];
        d[indices[k]] = 1.0;
        d
    })
}

/// Central difference of every example's loss along a direction `v` in one parameter
/// tensor: `(ℓ_n(θ + ε v) − ℓ_n(θ − ε v)) / (2ε)`, which should equal `⟨∇_θ ℓ_n, v⟩`. `[B]`.
pub fn finite_difference_along(
    graph: &Graph,
    params: &Params,
    batch: &Batch,
    param: &str,
    direction: &[f64],
    eps: f64,
) -> Result<Vec<f64>, ReferenceError> {
    let len = params.get(param).ok_or_else(|| ReferenceError::MissingParam(param.to_string()))?.len();
    if direction.len() != len {
        return Err(ReferenceError::DirectionLength { name: param.to_string(), expected: len, got: direction.len() });
    }
    let mut out = central_differences(graph, params, batch, param, 1, eps, |_| direction.to_vec())?;
    Ok(out.remove(0))
}

/// `count` central differences of every example's loss along directions `d_k` in the
/// parameter tensor `param`: `(ℓ_n(θ + ε d_k) − ℓ_n(θ − ε d_k)) / h_k`, where
/// `h_k = ⟨(θ + ε d_k) − (θ − ε d_k), d_k⟩ / ⟨d_k, d_k⟩` is the step actually taken in floating
/// point (2ε up to rounding; exactly the step of the element for a unit vector). `[count][B]`.
fn central_differences(
    graph: &Graph,
    params: &Params,
    batch: &Batch,
    param: &str,
    count: usize,
    eps: f64,
    direction: impl Fn(usize) -> Vec<f64>,
) -> Result<Vec<Vec<f64>>, ReferenceError> {
    let prep = Prepared::new(graph, params, batch)?;
    let spec =
        graph.params.iter().find(|p| p.name == param).ok_or_else(|| ReferenceError::MissingParam(param.to_string()))?;
    let base = &params[param];
    let loss_node = graph.loss.input().index();
    // Nodes before the parameter's node do not depend on it (topological order): they are
    // computed once per example, and the perturbed passes start at the parameter's node.
    let from = spec.node.index();
    let all = graph.nodes.len();
    let mut prefixes: Vec<Vec<Vec<f64>>> = (0..batch.size)
        .map(|n| {
            let mut acts = vec![Vec::new(); all];
            prep.forward(n, &mut acts, 0..from);
            acts
        })
        .collect();
    let mut result = Vec::with_capacity(count);
    for k in 0..count {
        let d = direction(k);
        let plus: Vec<f64> = base.iter().zip(&d).map(|(t, v)| t + eps * v).collect();
        let minus: Vec<f64> = base.iter().zip(&d).map(|(t, v)| t - eps * v).collect();
        let (mut num, mut den) = (0.0, 0.0);
        for ((p, m), v) in plus.iter().zip(&minus).zip(&d) {
            num += (p - m) * v;
            den += v * v;
        }
        let step = if den > 0.0 { num / den } else { 2.0 * eps };
        let prep_plus = prep.with_param(spec.node.index(), &spec.name, &plus);
        let prep_minus = prep.with_param(spec.node.index(), &spec.name, &minus);
        let diffs = prefixes
            .iter_mut()
            .enumerate()
            .map(|(n, acts)| {
                prep_plus.forward(n, acts, from..all);
                let lp = prep_plus.loss(n, &acts[loss_node], false).0;
                prep_minus.forward(n, acts, from..all);
                let lm = prep_minus.loss(n, &acts[loss_node], false).0;
                (lp - lm) / step
            })
            .collect();
        result.push(diffs);
    }
    Ok(result)
}

/// The graph with its parameters and batch checked and looked up per node.
struct Prepared<'a> {
    graph: &'a Graph,
    batch: &'a Batch,
    weight: Vec<Option<&'a [f64]>>,
    bias: Vec<Option<&'a [f64]>>,
    /// Every parameter by its full name (layers written in index notation read these).
    named: BTreeMap<String, &'a [f64]>,
}

impl<'a> Prepared<'a> {
    fn new(graph: &'a Graph, params: &'a Params, batch: &'a Batch) -> Result<Self, ReferenceError> {
        let mut weight = vec![None; graph.nodes.len()];
        let mut bias = vec![None; graph.nodes.len()];
        let mut named = BTreeMap::new();
        for spec in &graph.params {
            let values = params.get(&spec.name).ok_or_else(|| ReferenceError::MissingParam(spec.name.clone()))?;
            let expected = numel(&spec.shape) as usize;
            if values.len() != expected {
                return Err(ReferenceError::ParamLength { name: spec.name.clone(), expected, got: values.len() });
            }
            named.insert(spec.name.clone(), values.as_slice());
            let slot = if spec.name.ends_with(".bias") { &mut bias } else { &mut weight };
            slot[spec.node.index()] = Some(values.as_slice());
        }
        for node in graph.inputs() {
            let Op::Input { name } = &node.op else { unreachable!("inputs() yields input nodes") };
            let values = batch.inputs.get(name).ok_or_else(|| ReferenceError::MissingInput(name.clone()))?;
            let expected = batch.size * numel(&node.shape) as usize;
            if values.len() != expected {
                return Err(ReferenceError::InputLength { name: name.clone(), expected, got: values.len() });
            }
        }
        match (&graph.label, &batch.labels) {
            (LabelSpec::Classes { name, classes }, Labels::Classes(ys)) => {
                if ys.len() != batch.size {
                    return Err(ReferenceError::LabelLength {
                        name: name.clone(),
                        expected: batch.size,
                        got: ys.len(),
                    });
                }
                if let Some((example, &label)) = ys.iter().enumerate().find(|(_, &y)| y >= *classes) {
                    return Err(ReferenceError::LabelOutOfRange { example, label, classes: *classes });
                }
            }
            (LabelSpec::Target { name, shape }, Labels::Target(ts)) => {
                let expected = batch.size * numel(shape) as usize;
                if ts.len() != expected {
                    return Err(ReferenceError::LabelLength { name: name.clone(), expected, got: ts.len() });
                }
            }
            (LabelSpec::Classes { name, .. }, Labels::Target(_)) => {
                return Err(ReferenceError::LabelKind { name: name.clone(), expected: "a class index (classes)" })
            }
            (LabelSpec::Target { name, .. }, Labels::Classes(_)) => {
                return Err(ReferenceError::LabelKind { name: name.clone(), expected: "a real-valued target" })
            }
        }
        Ok(Prepared { graph, batch, weight, bias, named })
    }

    /// The same, with one parameter tensor (of node `node`) replaced by `values`.
    fn with_param<'b>(&self, node: usize, name: &str, values: &'b [f64]) -> Prepared<'b>
    where
        'a: 'b,
    {
        let mut p = Prepared {
            graph: self.graph,
            batch: self.batch,
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            named: self.named.clone(),
        };
        p.named.insert(name.to_string(), values);
        if name.ends_with(".bias") {
            p.bias[node] = Some(values);
        } else {
            p.weight[node] = Some(values);
        }
        p
    }

    /// The inputs and parameters of index-notation layer `l` at `node`, by local name, for
    /// one example whose input `k` is `input(k)`.
    fn index_values<'v>(
        &'v self,
        node: &Node,
        l: &crate::index_layer::IndexLayer,
        input: impl Fn(usize) -> &'v [f64],
    ) -> index::Values<'v> {
        let layer = node.layer.as_deref().unwrap_or_default();
        let mut values = index::Values::new();
        for t in &l.tensors {
            match t.kind {
                crate::index_layer::LocalKind::Input(slot) => {
                    values.insert(t.name.clone(), input(slot).into());
                }
                crate::index_layer::LocalKind::Param => {
                    values.insert(t.name.clone(), self.named[&format!("{layer}.{}", t.name)].into());
                }
                crate::index_layer::LocalKind::Temp => {}
            }
        }
        values
    }

    /// Runs the nodes `range` of example `n`, writing `acts[i]`; `acts[..range.start]` must
    /// hold this example's activations already.
    fn forward(&self, n: usize, acts: &mut [Vec<f64>], range: std::ops::Range<usize>) {
        for i in range {
            let node = &self.graph.nodes[i];
            let (done, rest) = acts.split_at_mut(i);
            rest[0] = self.forward_node(n, node, done);
        }
    }

    fn forward_node(&self, n: usize, node: &Node, acts: &[Vec<f64>]) -> Vec<f64> {
        let i = node.id.index();
        let input = |k: usize| -> &[f64] { &acts[node.inputs[k].index()] };
        let in_shape = |k: usize| -> &[usize] { &self.graph.node(node.inputs[k]).shape };
        match &node.op {
            Op::Input { name } => {
                let len = numel(&node.shape) as usize;
                self.batch.inputs[name][n * len..(n + 1) * len].to_vec()
            }
            Op::Conv(c) => {
                conv_forward(c, in_shape(0), &node.shape, input(0), self.weight[i].expect("conv weight"), self.bias[i])
            }
            Op::Linear(l) => linear_forward(l, input(0), self.weight[i].expect("linear weight"), self.bias[i]),
            Op::Activation(a) => input(0).iter().map(|&x| act(*a, x)).collect(),
            Op::Pool(p) => pool_forward(p, in_shape(0), &node.shape, input(0)),
            Op::GlobalAvgPool => {
                let x = input(0);
                let c = node.shape[0];
                let s = x.len() / c;
                (0..c).map(|ch| x[ch * s..(ch + 1) * s].iter().sum::<f64>() / s as f64).collect()
            }
            Op::Flatten => input(0).to_vec(),
            Op::GroupNorm(nm) | Op::InstanceNorm(nm) | Op::LayerNorm(nm) => {
                let layout = NormLayout::of(&node.op, nm, &node.shape);
                norm_forward(&layout, nm.eps, input(0), self.weight[i], self.bias[i])
            }
            Op::Add => input(0).iter().zip(input(1)).map(|(a, b)| a + b).collect(),
            Op::Index(l) => index::forward(l, &mut self.index_values(node, l, |k| input(k))),
        }
    }

    /// The loss of example `n` given the loss node's activation, and optionally its gradient
    /// with respect to that activation.
    fn loss(&self, n: usize, out: &[f64], want_grad: bool) -> (f64, Option<Vec<f64>>) {
        match (&self.graph.loss, &self.batch.labels) {
            (Loss::CrossEntropy { .. }, Labels::Classes(ys)) => {
                let y = ys[n];
                let m = out.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = out.iter().map(|&z| (z - m).exp()).sum();
                let lse = m + sum.ln();
                let grad = want_grad.then(|| {
                    out.iter().enumerate().map(|(k, &z)| (z - lse).exp() - if k == y { 1.0 } else { 0.0 }).collect()
                });
                (lse - out[y], grad)
            }
            (Loss::Mse { .. }, Labels::Target(ts)) => {
                let len = out.len();
                let t = &ts[n * len..(n + 1) * len];
                let loss = out.iter().zip(t).map(|(p, t)| (p - t) * (p - t)).sum::<f64>() / len as f64;
                let grad = want_grad.then(|| out.iter().zip(t).map(|(p, t)| 2.0 * (p - t) / len as f64).collect());
                (loss, grad)
            }
            _ => unreachable!("Prepared::new checked the label kind"),
        }
    }

    /// Backpropagates `dout` (the loss gradient at the loss node) through one example whose
    /// activations are `acts`; returns every parameter's gradient by name.
    fn backward(&self, acts: &[Vec<f64>], dout: Vec<f64>) -> BTreeMap<String, Vec<f64>> {
        let graph = self.graph;
        let mut pgrads: BTreeMap<String, Vec<f64>> =
            graph.params.iter().map(|p| (p.name.clone(), vec![0.0; numel(&p.shape) as usize])).collect();
        let loss_node = graph.loss.input().index();
        let mut grads: Vec<Option<Vec<f64>>> = vec![None; graph.nodes.len()];
        grads[loss_node] = Some(dout);
        for i in (0..=loss_node).rev() {
            let Some(g) = grads[i].take() else { continue };
            let node = &graph.nodes[i];
            let x = |k: usize| -> &[f64] { &acts[node.inputs[k].index()] };
            let in_shape = |k: usize| -> &[usize] { &graph.node(node.inputs[k]).shape };
            let mut dw: Option<Vec<f64>> = None;
            let mut db: Option<Vec<f64>> = None;
            let dinputs: Vec<Vec<f64>> = match &node.op {
                Op::Input { .. } => vec![],
                Op::Conv(c) => {
                    let (dx, w, b) =
                        conv_backward(c, in_shape(0), &node.shape, x(0), self.weight[i].expect("conv weight"), &g);
                    dw = Some(w);
                    db = c.bias.then_some(b);
                    vec![dx]
                }
                Op::Linear(l) => {
                    let (dx, w, b) = linear_backward(l, x(0), self.weight[i].expect("linear weight"), &g);
                    dw = Some(w);
                    db = l.bias.then_some(b);
                    vec![dx]
                }
                Op::Activation(a) => {
                    vec![x(0).iter().zip(&g).map(|(&x, &g)| g * act_grad(*a, x)).collect()]
                }
                Op::Pool(p) => vec![pool_backward(p, in_shape(0), &node.shape, x(0), &g)],
                Op::GlobalAvgPool => {
                    let len = x(0).len();
                    let s = len / node.shape[0];
                    vec![(0..len).map(|e| g[e / s] / s as f64).collect()]
                }
                Op::Flatten => vec![g.clone()],
                Op::GroupNorm(nm) | Op::InstanceNorm(nm) | Op::LayerNorm(nm) => {
                    let layout = NormLayout::of(&node.op, nm, &node.shape);
                    let (dx, w, b) = norm_backward(&layout, nm.eps, x(0), self.weight[i], &g);
                    if nm.affine {
                        dw = Some(w);
                        db = Some(b);
                    }
                    vec![dx]
                }
                Op::Add => vec![g.clone(), g.clone()],
                Op::Index(l) => {
                    let mut values = self.index_values(node, l, x);
                    index::forward(l, &mut values);
                    let grads = index::backward(l, &values, &g);
                    let layer = node.layer.as_deref().unwrap_or_default();
                    for p in l.params() {
                        pgrads.insert(format!("{layer}.{}", p.name), grads[&p.name].clone());
                    }
                    let mut dinputs = vec![Vec::new(); node.inputs.len()];
                    for t in l.inputs() {
                        if let crate::index_layer::LocalKind::Input(slot) = t.kind {
                            dinputs[slot] = grads[&t.name].clone();
                        }
                    }
                    dinputs
                }
            };
            for (k, d) in dinputs.into_iter().enumerate() {
                let j = node.inputs[k].index();
                match &mut grads[j] {
                    Some(acc) => acc.iter_mut().zip(&d).for_each(|(a, d)| *a += d),
                    slot @ None => *slot = Some(d),
                }
            }
            for spec in graph.params_of(node.id) {
                let d = if spec.name.ends_with(".bias") { db.take() } else { dw.take() };
                if let Some(d) = d {
                    pgrads.insert(spec.name.clone(), d);
                }
            }
        }
        pgrads
    }
}

/// A 1-D or 2-D per-example shape `[C, L]` / `[C, H, W]` as `(C, H, W)` (H = 1 for 1-D).
fn chw(shape: &[usize]) -> (usize, usize, usize) {
    match shape {
        [c, l] => (*c, 1, *l),
        [c, h, w] => (*c, *h, *w),
        _ => panic!("conv/pool on a tensor of rank {} (the checker rejects this)", shape.len()),
    }
}

/// A per-spatial-axis size as `(height, width)`, with `one` as the height of 1-D ops.
fn hw(v: &[usize], one: usize) -> (usize, usize) {
    match v {
        [l] => (one, *l),
        [h, w] => (*h, *w),
        _ => panic!("a size with {} entries (the checker rejects this)", v.len()),
    }
}

/// Input coordinate of output position `o`, kernel tap `k`: `o*stride + k*dilation − pad`,
/// or `None` in the padding.
fn tap(o: usize, k: usize, stride: usize, dilation: usize, pad: usize, size: usize) -> Option<usize> {
    (o * stride + k * dilation).checked_sub(pad).filter(|&i| i < size)
}

/// The output positions `o < outputs` whose tap `k` lands inside the input (not in the
/// padding): those with `0 ≤ o*stride + k*dilation − pad < size`. The same set as
/// `(0..outputs).filter(|&o| tap(o, k, ...).is_some())`, as a range (it is contiguous).
fn valid(outputs: usize, k: usize, stride: usize, dilation: usize, pad: usize, size: usize) -> std::ops::Range<usize> {
    let off = k * dilation;
    let hi = if size + pad > off { (size + pad - off).div_ceil(stride).min(outputs) } else { 0 };
    let lo = if pad > off { (pad - off).div_ceil(stride) } else { 0 };
    lo.min(hi)..hi
}

fn conv_forward(
    c: &Conv,
    in_shape: &[usize],
    out_shape: &[usize],
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
) -> Vec<f64> {
    let (ci, ih, iw) = chw(in_shape);
    let (co, oh, ow) = chw(out_shape);
    let (kh, kw) = hw(&c.kernel, 1);
    let (sh, sw) = hw(&c.stride, 1);
    let (ph, pw) = hw(&c.pad_lo, 0);
    let (dh, dw) = hw(&c.dilation, 1);
    let (cig, cog) = (ci / c.groups, co / c.groups);
    let mut y = vec![0.0; co * oh * ow];
    for o in 0..co {
        let g = o / cog;
        let bias = b.map_or(0.0, |b| b[o]);
        y[o * oh * ow..(o + 1) * oh * ow].fill(bias);
        for cl in 0..cig {
            let cin = g * cig + cl;
            for ky in 0..kh {
                for kx in 0..kw {
                    let wv = w[((o * cig + cl) * kh + ky) * kw + kx];
                    let xs = valid(ow, kx, sw, dw, pw, iw);
                    if xs.is_empty() {
                        continue; // this tap lies in the padding for every output column
                    }
                    for oy in valid(oh, ky, sh, dh, ph, ih) {
                        let iy = oy * sh + ky * dh - ph;
                        let yrow = &mut y[(o * oh + oy) * ow..(o * oh + oy + 1) * ow];
                        let xrow = &x[(cin * ih + iy) * iw..(cin * ih + iy + 1) * iw];
                        // (A `while` loop: this is the hot loop of the unoptimized test build.)
                        let (mut ox, mut ix) = (xs.start, xs.start * sw + kx * dw - pw);
                        while ox < xs.end {
                            yrow[ox] += wv * xrow[ix];
                            ox += 1;
                            ix += sw;
                        }
                    }
                }
            }
        }
    }
    y
}

/// Returns (dx, dweight, dbias) of a conv given the output gradient `gy`.
fn conv_backward(
    c: &Conv,
    in_shape: &[usize],
    out_shape: &[usize],
    x: &[f64],
    w: &[f64],
    gy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (ci, ih, iw) = chw(in_shape);
    let (co, oh, ow) = chw(out_shape);
    let (kh, kw) = hw(&c.kernel, 1);
    let (sh, sw) = hw(&c.stride, 1);
    let (ph, pw) = hw(&c.pad_lo, 0);
    let (dh, dw) = hw(&c.dilation, 1);
    let (cig, cog) = (ci / c.groups, co / c.groups);
    let mut dx = vec![0.0; x.len()];
    let mut dwt = vec![0.0; w.len()];
    let mut db = vec![0.0; co];
    for o in 0..co {
        let g = o / cog;
        db[o] = gy[o * oh * ow..(o + 1) * oh * ow].iter().sum();
        for cl in 0..cig {
            let cin = g * cig + cl;
            for ky in 0..kh {
                for kx in 0..kw {
                    let widx = ((o * cig + cl) * kh + ky) * kw + kx;
                    let wv = w[widx];
                    let mut acc = 0.0;
                    let xs = valid(ow, kx, sw, dw, pw, iw);
                    if xs.is_empty() {
                        continue; // this tap lies in the padding for every output column
                    }
                    for oy in valid(oh, ky, sh, dh, ph, ih) {
                        let iy = oy * sh + ky * dh - ph;
                        let grow = &gy[(o * oh + oy) * ow..(o * oh + oy + 1) * ow];
                        let xrow = &x[(cin * ih + iy) * iw..(cin * ih + iy + 1) * iw];
                        let dxrow = &mut dx[(cin * ih + iy) * iw..(cin * ih + iy + 1) * iw];
                        let (mut ox, mut ix) = (xs.start, xs.start * sw + kx * dw - pw);
                        while ox < xs.end {
                            acc += grow[ox] * xrow[ix];
                            dxrow[ix] += grow[ox] * wv;
                            ox += 1;
                            ix += sw;
                        }
                    }
                    dwt[widx] = acc;
                }
            }
        }
    }
    (dx, dwt, db)
}

fn linear_forward(l: &Linear, x: &[f64], w: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    let (fi, fo) = (l.in_features, l.out_features);
    let rows = x.len() / fi;
    let mut y = vec![0.0; rows * fo];
    for r in 0..rows {
        let xr = &x[r * fi..(r + 1) * fi];
        for o in 0..fo {
            let wo = &w[o * fi..(o + 1) * fi];
            let mut s = b.map_or(0.0, |b| b[o]);
            for k in 0..fi {
                s += wo[k] * xr[k];
            }
            y[r * fo + o] = s;
        }
    }
    y
}

/// Returns (dx, dweight, dbias) of a linear layer given the output gradient `gy`.
fn linear_backward(l: &Linear, x: &[f64], w: &[f64], gy: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (fi, fo) = (l.in_features, l.out_features);
    let rows = x.len() / fi;
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    let mut db = vec![0.0; fo];
    for r in 0..rows {
        let xr = &x[r * fi..(r + 1) * fi];
        for o in 0..fo {
            let go = gy[r * fo + o];
            db[o] += go;
            for k in 0..fi {
                dw[o * fi + k] += go * xr[k];
                dx[r * fi + k] += go * w[o * fi + k];
            }
        }
    }
    (dx, dw, db)
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn act(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Relu => x.max(0.0),
        Activation::LeakyRelu { slope } => {
            if x > 0.0 {
                x
            } else {
                x * slope
            }
        }
        Activation::Tanh => x.tanh(),
        Activation::Sigmoid => sigmoid(x),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        Activation::Hardswish => x * (x + 3.0).clamp(0.0, 6.0) / 6.0,
    }
}

/// d act(x) / dx, with PyTorch's choices at the kinks (relu: 0 at 0; leaky_relu: slope at 0).
fn act_grad(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::LeakyRelu { slope } => {
            if x > 0.0 {
                1.0
            } else {
                slope
            }
        }
        Activation::Tanh => 1.0 - x.tanh() * x.tanh(),
        Activation::Sigmoid => sigmoid(x) * (1.0 - sigmoid(x)),
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x * pdf
        }
        // PyTorch's hardswish_backward: 0 below -3, x/3 + 1/2 on [-3, 3], 1 above.
        Activation::Hardswish => {
            if x < -3.0 {
                0.0
            } else if x <= 3.0 {
                x / 3.0 + 0.5
            } else {
                1.0
            }
        }
    }
}

/// PyTorch's pooling divisor for `count_include_pad=True`: the window clipped to the padded
/// extent (not to the input). With `ceil_mode=False` this is always the full kernel.
/// `padded` is the input size plus the padding on both sides.
fn pool_extent(o: usize, k: usize, stride: usize, padded: usize) -> usize {
    let start = o * stride; // in padded coordinates
    (start + k).min(padded) - start
}

/// The input index of the first maximum of window (c, oy, ox) in row-major order.
#[allow(clippy::too_many_arguments)]
fn argmax_window(
    x: &[f64],
    (ih, iw): (usize, usize),
    (kh, kw): (usize, usize),
    (sh, sw): (usize, usize),
    (ph, pw): (usize, usize),
    c: usize,
    oy: usize,
    ox: usize,
) -> usize {
    let mut best = f64::NEG_INFINITY;
    let mut arg = None;
    for ky in 0..kh {
        let Some(iy) = tap(oy, ky, sh, 1, ph, ih) else {
            continue;
        };
        for kx in 0..kw {
            let Some(ix) = tap(ox, kx, sw, 1, pw, iw) else {
                continue;
            };
            let i = (c * ih + iy) * iw + ix;
            // Strictly greater: ties keep the first maximum. A NaN wins, as in PyTorch.
            if arg.is_none() || x[i] > best || x[i].is_nan() {
                best = x[i];
                arg = Some(i);
            }
        }
    }
    arg.expect("every pooling window holds an input element (padding ≤ kernel / 2)")
}

fn pool_forward(p: &Pool, in_shape: &[usize], out_shape: &[usize], x: &[f64]) -> Vec<f64> {
    let (_, ih, iw) = chw(in_shape);
    let (c, oh, ow) = chw(out_shape);
    let k = hw(&p.kernel, 1);
    let s = hw(&p.stride, 1);
    let pd = hw(&p.pad_lo, 0);
    let ph = hw(&p.pad_hi, 0);
    let padded = (ih + pd.0 + ph.0, iw + pd.1 + ph.1);
    let mut y = vec![0.0; c * oh * ow];
    for ch in 0..c {
        for oy in 0..oh {
            for ox in 0..ow {
                y[(ch * oh + oy) * ow + ox] = match p.kind {
                    PoolKind::Max => x[argmax_window(x, (ih, iw), k, s, pd, ch, oy, ox)],
                    PoolKind::Avg => {
                        let mut sum = 0.0;
                        for ky in 0..k.0 {
                            let Some(iy) = tap(oy, ky, s.0, 1, pd.0, ih) else {
                                continue;
                            };
                            for kx in 0..k.1 {
                                let Some(ix) = tap(ox, kx, s.1, 1, pd.1, iw) else {
                                    continue;
                                };
                                sum += x[(ch * ih + iy) * iw + ix];
                            }
                        }
                        let count = pool_extent(oy, k.0, s.0, padded.0) * pool_extent(ox, k.1, s.1, padded.1);
                        sum / count as f64
                    }
                };
            }
        }
    }
    y
}

fn pool_backward(p: &Pool, in_shape: &[usize], out_shape: &[usize], x: &[f64], gy: &[f64]) -> Vec<f64> {
    let (_, ih, iw) = chw(in_shape);
    let (c, oh, ow) = chw(out_shape);
    let k = hw(&p.kernel, 1);
    let s = hw(&p.stride, 1);
    let pd = hw(&p.pad_lo, 0);
    let ph = hw(&p.pad_hi, 0);
    let padded = (ih + pd.0 + ph.0, iw + pd.1 + ph.1);
    let mut dx = vec![0.0; x.len()];
    for ch in 0..c {
        for oy in 0..oh {
            for ox in 0..ow {
                let g = gy[(ch * oh + oy) * ow + ox];
                match p.kind {
                    PoolKind::Max => dx[argmax_window(x, (ih, iw), k, s, pd, ch, oy, ox)] += g,
                    PoolKind::Avg => {
                        let count = pool_extent(oy, k.0, s.0, padded.0) * pool_extent(ox, k.1, s.1, padded.1);
                        for ky in 0..k.0 {
                            let Some(iy) = tap(oy, ky, s.0, 1, pd.0, ih) else {
                                continue;
                            };
                            for kx in 0..k.1 {
                                let Some(ix) = tap(ox, kx, s.1, 1, pd.1, iw) else {
                                    continue;
                                };
                                dx[(ch * ih + iy) * iw + ix] += g / count as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    dx
}

/// How a norm layer splits one example's tensor: `blocks` contiguous blocks of `size`
/// elements are normalized separately; the affine parameter of element `e` (flat index in
/// the example) is `e / per_channel` (group/instance norm: per channel) or `e % size`
/// (layer norm: per position in the normalized dims).
struct NormLayout {
    size: usize,
    blocks: usize,
    /// `Some(spatial size)` for per-channel affine, `None` for layer norm.
    per_channel: Option<usize>,
}

impl NormLayout {
    fn of(op: &Op, nm: &Norm, shape: &[usize]) -> Self {
        let total = numel(shape) as usize;
        match op {
            Op::GroupNorm(_) | Op::InstanceNorm(_) => {
                let spatial = total / shape[0];
                NormLayout { size: total / nm.groups, blocks: nm.groups, per_channel: Some(spatial) }
            }
            Op::LayerNorm(_) => {
                let size = numel(&shape[shape.len() - nm.groups..]) as usize;
                NormLayout { size, blocks: total / size, per_channel: None }
            }
            _ => unreachable!("NormLayout of a norm op"),
        }
    }

    fn affine_index(&self, e: usize) -> usize {
        match self.per_channel {
            Some(spatial) => e / spatial,
            None => e % self.size,
        }
    }

    /// Mean and 1/sqrt(biased variance + eps) of block `k`.
    fn stats(&self, x: &[f64], k: usize, eps: f64) -> (f64, f64) {
        let xs = &x[k * self.size..(k + 1) * self.size];
        let m = self.size as f64;
        let mean = xs.iter().sum::<f64>() / m;
        let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / m;
        (mean, 1.0 / (var + eps).sqrt())
    }
}

fn norm_forward(l: &NormLayout, eps: f64, x: &[f64], w: Option<&[f64]>, b: Option<&[f64]>) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for k in 0..l.blocks {
        let (mean, rstd) = l.stats(x, k, eps);
        for e in k * l.size..(k + 1) * l.size {
            let xhat = (x[e] - mean) * rstd;
            let a = l.affine_index(e);
            y[e] = xhat * w.map_or(1.0, |w| w[a]) + b.map_or(0.0, |b| b[a]);
        }
    }
    y
}

/// Returns (dx, dweight, dbias) of a norm layer (the param grads are zero-length-safe and
/// only meaningful when affine).
fn norm_backward(l: &NormLayout, eps: f64, x: &[f64], w: Option<&[f64]>, gy: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let nparams = match l.per_channel {
        Some(spatial) => x.len() / spatial,
        None => l.size,
    };
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; nparams];
    let mut db = vec![0.0; nparams];
    let m = l.size as f64;
    for k in 0..l.blocks {
        let (mean, rstd) = l.stats(x, k, eps);
        let range = k * l.size..(k + 1) * l.size;
        let xhat = |e: usize| (x[e] - mean) * rstd;
        // dxhat = dy * gamma; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
        let dxhat = |e: usize| gy[e] * w.map_or(1.0, |w| w[l.affine_index(e)]);
        let mut sum_d = 0.0;
        let mut sum_dx = 0.0;
        for e in range.clone() {
            sum_d += dxhat(e);
            sum_dx += dxhat(e) * xhat(e);
            let a = l.affine_index(e);
            dw[a] += gy[e] * xhat(e);
            db[a] += gy[e];
        }
        for e in range {
            dx[e] = rstd * (dxhat(e) - sum_d / m - xhat(e) * sum_dx / m);
        }
    }
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(kind: PoolKind, kernel: usize, stride: usize, padding: usize) -> Pool {
        Pool { kind, kernel: vec![kernel], stride: vec![stride], pad_lo: vec![padding], pad_hi: vec![padding] }
    }

    #[test]
    fn valid_is_the_set_of_taps_inside_the_input() {
        for outputs in 1..6 {
            for k in 0..4 {
                for stride in 1..4 {
                    for dilation in 1..3 {
                        for pad in 0..4 {
                            for size in 1..8 {
                                let want: Vec<usize> = (0..outputs)
                                    .filter(|&o| tap(o, k, stride, dilation, pad, size).is_some())
                                    .collect();
                                let got: Vec<usize> = valid(outputs, k, stride, dilation, pad, size).collect();
                                assert_eq!(got, want, "{outputs} {k} {stride} {dilation} {pad} {size}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn maxpool_ties_go_to_the_first_maximum_and_padding_is_minus_infinity() {
        let p = pool(PoolKind::Max, 2, 1, 0);
        let x = [1.0, 1.0, 0.0, 1.0];
        assert_eq!(pool_forward(&p, &[1, 4], &[1, 3], &x), vec![1.0, 1.0, 1.0]);
        assert_eq!(pool_backward(&p, &[1, 4], &[1, 3], &x, &[1.0, 10.0, 100.0]), vec![1.0, 10.0, 0.0, 100.0]);
        let p = pool(PoolKind::Max, 3, 1, 1);
        let x = [-5.0, -3.0];
        assert_eq!(pool_forward(&p, &[1, 2], &[1, 2], &x), vec![-3.0, -3.0]);
    }

    #[test]
    fn avgpool_counts_the_padding() {
        let p = pool(PoolKind::Avg, 3, 1, 1);
        let x = [1.0, 2.0];
        assert_eq!(pool_forward(&p, &[1, 2], &[1, 2], &x), vec![1.0, 1.0]);
        assert_eq!(pool_backward(&p, &[1, 2], &[1, 2], &x, &[3.0, 6.0]), vec![3.0, 3.0]);
    }

    #[test]
    fn gelu_matches_known_values() {
        // 0.5·x·(1 + erf(x/√2)) at x = 1: 0.8413447460685429.
        assert!((act(Activation::Gelu, 1.0) - 0.841_344_746_068_542_9).abs() < 1e-15);
        assert!((act(Activation::Gelu, -1.0) + 0.158_655_253_931_457_05).abs() < 1e-15);
    }
}
