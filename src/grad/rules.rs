//! The rule table: one entry per op, giving its forward definition in index notation and —
//! for ops that are not parameter contractions — its input-gradient rule. Parameter
//! gradients are never written here: they come from [`derive_contraction`].

use crate::graph::{Conv, Graph, LabelSpec, Loss, Node, Op, PoolKind};
use crate::index_layer::{IndexLayer, IndexStmt, IndexTerm, LocalKind, LocalTensor};

use super::index::{Access, Cmp, Equation, Expr, Func, Index, Reduction, Term, Var};
use super::{derive_contraction, Contraction, GradStep, ParamGrad};

const GENERIC: [Var; 8] = ["i0", "i1", "i2", "i3", "i4", "i5", "i6", "i7"];

/// Variable names for a per-example tensor of `rank` dims (the batch var `n` not included).
fn dim_vars(rank: usize) -> Vec<Var> {
    match rank {
        1 => vec!["i"],
        2 => vec!["c", "l"],
        3 => vec!["c", "h", "w"],
        r => GENERIC[..r.min(GENERIC.len())].to_vec(),
    }
}

fn with_n(vars: &[Var]) -> Vec<Var> {
    let mut v = vec!["n"];
    v.extend_from_slice(vars);
    v
}

fn shape(s: &[usize]) -> String {
    format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

fn eq(lhs: Access, rhs: Expr) -> Equation {
    Equation { lhs, accumulate: false, rhs }
}

fn scatter(lhs: Access, rhs: Expr) -> Equation {
    Equation { lhs, accumulate: true, rhs }
}

fn rd(a: &Access) -> Expr {
    Expr::Read(a.clone())
}

fn grad(a: &Access) -> Access {
    a.renamed(format!("d{}", a.tensor))
}

/// Builds the backward step of one node; `input_needs[i]` says whether input `i` needs a
/// gradient. Returns `None` for graph inputs (they have no backward).
pub fn define(graph: &Graph, node: &Node, input_needs: &[bool]) -> Option<GradStep> {
    let mut bindings = Vec::new();
    let in_shape = |i: usize| graph.node(node.inputs[i]).shape.clone();
    // A tensor's shape, and the view a grouped conv reads it through.
    let norm = norm_view(node);
    let shown = |s: &[usize], param: bool| match (&node.op, &norm) {
        (Op::Conv(conv), _) if conv.groups > 1 => format!("{} as {}", shape(s), shape(&grouped_view(conv, s))),
        (_, Some(view)) => match if param { view.param() } else { view.x.clone() } {
            v if v.as_slice() == s => shape(s),
            v => format!("{} as {}", shape(s), shape(&v)),
        },
        _ => shape(s),
    };
    for (i, id) in node.inputs.iter().enumerate() {
        let local = match (&node.op, i) {
            (Op::Add, 0) => "A",
            (Op::Add, _) => "B",
            _ => "X",
        };
        bindings.push(format!("{local} = {id} {}", shown(&in_shape(i), false)));
    }
    bindings.push(format!("Y = {} {}", node.id, shown(&node.shape, false)));
    let params: Vec<_> = graph.params_of(node.id).collect();
    for p in &params {
        let local = param_local(p.name.rsplit('.').next().unwrap_or_default());
        bindings.push(format!("{local} = {} {}", p.name, shown(&p.shape, true)));
    }
    let title = match &node.layer {
        Some(l) => format!("{l}: {}", node.op),
        None => node.op.to_string(),
    };
    let mut step = GradStep {
        node: node.id,
        title,
        bindings,
        forward: vec![],
        input_grads: vec![],
        param_grads: vec![],
        ranges: vec![],
    };
    let needs_x = input_needs.first().copied().unwrap_or(false);
    let param_name = |suffix: &str| format!("{}.{suffix}", node.layer.as_deref().unwrap_or("?"));

    // Contractions with a parameter: one generic derivation.
    let contraction = |step: &mut GradStep, c: Contraction| {
        let d = derive_contraction(&c);
        step.forward.push(d.forward);
        step.param_grads.push(ParamGrad { param: param_name("weight"), eq: d.dw });
        if let Some(db) = d.db {
            step.param_grads.push(ParamGrad { param: param_name("bias"), eq: db });
        }
        d.dx
    };

    match &node.op {
        Op::Input { .. } => return None,
        Op::Index(l) => super::layer::define(node, l, input_needs, &mut step),
        Op::Conv(conv) => {
            let c = conv_contraction(conv, &in_shape(0));
            let dx = contraction(&mut step, c);
            if needs_x {
                step.input_grads.push(dx);
            }
            step.ranges = conv_ranges(conv, &node.shape);
        }
        Op::Linear(l) => {
            let (c, ranges) = linear_contraction(l, &node.shape);
            let dx = contraction(&mut step, c);
            if needs_x {
                step.input_grads.push(dx);
            }
            step.ranges = ranges;
        }
        Op::Activation(act) => {
            let v = with_n(&dim_vars(node.shape.len()));
            let (x, y) = (Access::new("X", &v), Access::new("Y", &v));
            // The activation table (`crate::activation`) defines both directions.
            step.forward.push(eq(y.clone(), Expr::apply(Func::Activation(*act), vec![rd(&x)])));
            if needs_x {
                step.input_grads.push(eq(grad(&x), act.backward(rd(&x), rd(&y), rd(&grad(&y)))));
            }
        }
        Op::Pool(p) => {
            let spatial = p.kernel.len();
            let (ov, kv) = window_vars(spatial);
            let y = Access::new("Y", &[&["n", "c"][..], &ov].concat());
            let mut xi = vec![Index::var("n"), Index::var("c")];
            for a in 0..spatial {
                xi.push(Index::window(ov[a], p.stride[a], kv[a], 1, p.pad_lo[a]));
            }
            let x = Access { tensor: "X".into(), index: xi };
            let window: f64 = p.kernel.iter().product::<usize>() as f64;
            let (fwd, back) = match p.kind {
                PoolKind::Max => (
                    Expr::reduce(Reduction::Max, kv.clone(), rd(&x)),
                    Expr::mul(vec![rd(&grad(&y)), Expr::FirstMax(Box::new(rd(&x)), Box::new(rd(&y)))]),
                ),
                PoolKind::Avg => {
                    (Expr::reduce(Reduction::Mean, kv.clone(), rd(&x)), Expr::div(rd(&grad(&y)), Expr::num(window)))
                }
            };
            step.forward.push(eq(y.clone(), fwd));
            if needs_x {
                step.input_grads.push(scatter(grad(&x), back));
            }
            step.ranges = vec![("c", node.shape[0])];
            step.ranges.extend(ov.iter().copied().zip(node.shape[1..].iter().copied()));
            step.ranges.extend(kv.iter().copied().zip(p.kernel.iter().copied()));
        }
        Op::GlobalAvgPool => {
            let xv = with_n(&dim_vars(in_shape(0).len()));
            let (x, y) = (Access::new("X", &xv), Access::new("Y", &["n", xv[1]]));
            let positions: usize = in_shape(0)[1..].iter().product();
            step.forward.push(eq(y.clone(), Expr::reduce(Reduction::Mean, xv[2..].to_vec(), rd(&x))));
            if needs_x {
                step.input_grads.push(eq(grad(&x), Expr::div(rd(&grad(&y)), Expr::num(positions as f64))));
            }
            step.ranges = xv[1..].iter().copied().zip(in_shape(0)).collect();
        }
        Op::Flatten => {
            let s = in_shape(0);
            let xv = with_n(&dim_vars(s.len()));
            let x = Access::new("X", &xv);
            // Row-major offset: Σ var·(product of the dims after it).
            let terms = (0..s.len())
                .map(|i| Term { var: xv[i + 1], coef: s[i + 1..].iter().product::<usize>() as i64, div: 1 })
                .collect();
            let y = Access { tensor: "Y".into(), index: vec![Index::var("n"), Index { terms, offset: 0 }] };
            step.forward.push(eq(y.clone(), rd(&x)));
            if needs_x {
                step.input_grads.push(eq(grad(&x), rd(&grad(&y))));
            }
        }
        Op::Add => {
            let v = with_n(&dim_vars(node.shape.len()));
            let (a, b, y) = (Access::new("A", &v), Access::new("B", &v), Access::new("Y", &v));
            step.forward.push(eq(y.clone(), Expr::Add(vec![rd(&a), rd(&b)])));
            for (i, t) in [a, b].iter().enumerate() {
                if input_needs[i] {
                    step.input_grads.push(eq(grad(t), rd(&grad(&y))));
                }
            }
        }
        Op::GroupNorm(n) | Op::InstanceNorm(n) | Op::LayerNorm(n) => {
            let view = norm_view(node).expect("a norm");
            let x = Access::new("X", &with_n(&view.vars));
            let xhat = x.renamed("X̂");
            let y = x.renamed("Y");
            let (mean, rstd) = (Access::new("μ", &["n", "r"]), Access::new("σ⁻¹", &["n", "r"]));
            let centered = || Expr::sub(rd(&x), rd(&mean));
            let m = |over: &[Var], e: Expr| Expr::reduce(Reduction::Mean, over.to_vec(), e);
            step.forward.push(eq(mean.clone(), m(view.over(), rd(&x))));
            // Two passes (the mean first, then the centered squares): no cancellation.
            let variance = m(view.over(), Expr::mul(vec![centered(), centered()]));
            let root = Expr::apply(Func::Sqrt, vec![Expr::Add(vec![variance, Expr::num(n.eps)])]);
            step.forward.push(eq(rstd.clone(), Expr::div(Expr::num(1.0), root)));
            step.forward.push(eq(xhat.clone(), Expr::mul(vec![centered(), rd(&rstd)])));
            step.bindings.push(format!(
                "μ, σ⁻¹ = mean and 1/std of row r {}; X̂ {}",
                shape(&[view.rows()]),
                shape(&view.x)
            ));
            // `dX̂` at the variables `vars` (`view.vars` or their primed copies): the output
            // gradient through the affine part.
            let dxhat = |vars: &[Var]| {
                let at = |of: &[Var]| -> Vec<Var> {
                    of.iter().map(|p| vars[view.vars.iter().position(|v| v == p).expect("a row var")]).collect()
                };
                let dy = rd(&Access::new("dY", &with_n(vars)));
                match n.affine {
                    true => Expr::mul(vec![dy, rd(&Access::new("W", &at(&view.param_vars)))]),
                    false => dy,
                }
            };
            if n.affine {
                // The affine part Y = W·X̂ + b is a contraction with the parameters; its input
                // gradient `dY·W` is read in place inside `dX`'s (no `dX̂` tensor).
                let (w, b) = (Access::new("W", &view.param_vars), Access::new("b", &view.param_vars));
                let c = Contraction { y: y.clone(), w, x: xhat.clone(), bias: Some(b) };
                let _ = contraction(&mut step, c);
            } else {
                step.forward.push(eq(y.clone(), rd(&xhat)));
            }
            if needs_x {
                // dX = σ⁻¹·(dX̂ − mean(dX̂) − X̂·mean(dX̂·X̂)), the means over the row (primed).
                let primed: Vec<Var> =
                    view.vars.iter().map(|v| if view.over().contains(v) { prime(v) } else { *v }).collect();
                let over: Vec<Var> = view.over().iter().map(|v| prime(v)).collect();
                let xhat_p = Access::new("X̂", &with_n(&primed));
                step.input_grads.push(eq(
                    grad(&x),
                    Expr::mul(vec![
                        rd(&rstd),
                        Expr::sub(
                            Expr::sub(dxhat(&view.vars), m(&over, dxhat(&primed))),
                            Expr::mul(vec![rd(&xhat), m(&over, Expr::mul(vec![dxhat(&primed), rd(&xhat_p)]))]),
                        ),
                    ]),
                ));
            }
            step.ranges = view.vars.iter().copied().zip(view.x.iter().copied()).collect();
            step.ranges.extend(view.over().iter().map(|v| (prime(v), view.range(v))));
        }
    }
    Some(step)
}

/// The lead variables of a linear layer's rows (`Y[n, t, u, o]` for a rank-3 output).
const LINEAR_LEAD: [Var; 7] = ["t", "u", "v", "s", "r", "q", "m"];

/// `Y[n, lead.., o] = Σ_i W[o, i] · X[n, lead.., i] (+ b[o])` for a linear layer with output
/// shape `out_shape`, and the range of every variable but `n`.
fn linear_contraction(l: &crate::graph::Linear, out_shape: &[usize]) -> (Contraction, Vec<(Var, usize)>) {
    let lead: Vec<Var> = LINEAR_LEAD[..out_shape.len() - 1].to_vec();
    let mut yv = with_n(&lead);
    let mut xv = yv.clone();
    yv.push("o");
    xv.push("i");
    let c = Contraction {
        y: Access::new("Y", &yv),
        w: Access::new("W", &["o", "i"]),
        x: Access::new("X", &xv),
        bias: l.bias.then(|| Access::new("b", &["o"])),
    };
    let mut ranges: Vec<(Var, usize)> = lead.iter().copied().zip(out_shape.iter().copied()).collect();
    ranges.extend([("o", l.out_features), ("i", l.in_features)]);
    (c, ranges)
}

/// The local name (`W`, `b`) under which a built-in layer's derived equations read the
/// parameter whose full name ends in `suffix` (`weight`, `bias`).
pub fn param_local(suffix: &str) -> &'static str {
    if suffix == "weight" {
        "W"
    } else {
        "b"
    }
}

/// A built-in op whose every phase the generic lowering of derived equations handles
/// (`linear`; `conv1d`/`conv2d`, but for their `crb` and `direct` schedules; the norms), as
/// the layer in index notation those equations name (`X`, `W`, `b`, `Y`; the parameters'
/// full names end in `weight` and `bias`, see [`param_local`]; a norm's statistics `μ`,
/// `σ⁻¹` and `X̂` are temporaries). `None` for other ops.
pub fn as_index_layer(graph: &Graph, node: &Node) -> Option<IndexLayer> {
    let in_shape = graph.node(*node.inputs.first()?).shape.clone();
    let unpadded = |s: &[usize]| vec![(0, 0); s.len()];
    let local = |name: &str, kind: LocalKind, shape: &[usize]| LocalTensor {
        name: name.into(),
        kind,
        padding: unpadded(shape),
        shape: shape.to_vec(),
    };
    if let Some(view) = norm_view(node) {
        // A norm: its statistics and `X̂` are temporaries (see [`define`]), and its output
        // the affine part `Y = W·X̂ + b` (or `X̂`).
        let mut tensors = vec![local("X", LocalKind::Input(0), &view.x)];
        let params: Vec<_> = graph.params_of(node.id).collect();
        for p in &params {
            tensors.push(local(
                param_local(p.name.rsplit('.').next().unwrap_or_default()),
                LocalKind::Param,
                &view.param(),
            ));
        }
        for (t, shape) in
            [("μ", vec![view.rows()]), ("σ⁻¹", vec![view.rows()]), ("X̂", view.x.clone()), ("Y", view.x.clone())]
        {
            tensors.push(local(t, LocalKind::Temp, &shape));
        }
        let xhat = Expr::Read(Access::new("X̂", &view.vars));
        let terms = match params.is_empty() {
            true => vec![IndexTerm { sum: vec![], body: xhat }],
            false => vec![
                IndexTerm { sum: vec![], body: Expr::mul(vec![Expr::Read(Access::new("W", &view.param_vars)), xhat]) },
                IndexTerm { sum: vec![], body: Expr::Read(Access::new("b", &view.param_vars)) },
            ],
        };
        let ranges = view.vars.iter().copied().zip(view.x.iter().copied()).collect();
        let stmt = IndexStmt { lhs: "Y".into(), vars: view.vars.clone(), terms, ranges };
        return Some(IndexLayer { def: node.op.name().to_string(), tensors, stmts: vec![stmt] });
    }
    // The contraction, the variables it sums over and the input's zero padding.
    let (c, ranges, sum, padding) = match &node.op {
        Op::Linear(l) => {
            let (c, ranges) = linear_contraction(l, &node.shape);
            (c, ranges, vec!["i"], unpadded(&in_shape))
        }
        Op::Conv(conv) => {
            let c = conv_contraction(conv, &in_shape);
            let out = c.y.vars();
            let sum: Vec<Var> = c.w.vars().into_iter().filter(|v| !out.contains(v)).collect();
            let mut padding = vec![(0, 0); 1 + usize::from(conv.groups > 1)];
            padding.extend(conv.pad_lo.iter().copied().zip(conv.pad_hi.iter().copied()));
            (c, conv_ranges(conv, &node.shape), sum, padding)
        }
        _ => return None,
    };
    // A grouped conv's tensors are read as (group, channel) views (see [`conv_contraction`]).
    let view = |s: &[usize]| match &node.op {
        Op::Conv(conv) => grouped_view(conv, s),
        _ => s.to_vec(),
    };
    let strip = |a: &Access| Access { tensor: a.tensor.clone(), index: a.index[1..].to_vec() };
    let mut tensors =
        vec![LocalTensor { name: "X".into(), kind: LocalKind::Input(0), shape: view(&in_shape), padding }];
    for p in graph.params_of(node.id) {
        let suffix = p.name.rsplit('.').next().unwrap_or_default();
        let shape = view(&p.shape);
        tensors.push(LocalTensor {
            name: param_local(suffix).into(),
            kind: LocalKind::Param,
            padding: unpadded(&shape),
            shape,
        });
    }
    let out_shape = view(&node.shape);
    tensors.push(LocalTensor {
        name: "Y".into(),
        kind: LocalKind::Temp,
        padding: unpadded(&out_shape),
        shape: out_shape,
    });
    let mut terms = vec![IndexTerm { sum, body: Expr::mul(vec![Expr::Read(c.w.clone()), Expr::Read(strip(&c.x))]) }];
    if let Some(b) = &c.bias {
        terms.push(IndexTerm { sum: vec![], body: Expr::Read(b.clone()) });
    }
    let stmt = IndexStmt { lhs: "Y".into(), vars: strip(&c.y).vars(), terms, ranges };
    Some(IndexLayer { def: node.op.name().to_string(), tensors, stmts: vec![stmt] })
}

/// The variables of a window's output positions and of its taps, along `spatial` axes.
fn window_vars(spatial: usize) -> (Vec<Var>, Vec<Var>) {
    if spatial == 1 {
        (vec!["ol"], vec!["kl"])
    } else {
        (vec!["oh", "ow"], vec!["kh", "kw"])
    }
}

/// The range of every variable of [`conv_contraction`] but `n`, for output shape `out_shape`.
fn conv_ranges(conv: &Conv, out_shape: &[usize]) -> Vec<(Var, usize)> {
    let (ov, kv) = window_vars(conv.spatial());
    let mut ranges = if conv.groups == 1 { Vec::new() } else { vec![("g", conv.groups)] };
    ranges.extend([("co", conv.out_channels / conv.groups), ("ci", conv.in_channels / conv.groups)]);
    ranges.extend(kv.into_iter().zip(conv.kernel.iter().copied()));
    ranges.extend(ov.into_iter().zip(out_shape[1..].iter().copied()));
    ranges
}

/// A conv's contraction `Y[n, co, o..] = Σ W[co, ci, k..]·X[n, ci, s·o + d·k − p] + b[co]`.
/// A grouped conv (G > 1) reads every tensor as a (group, channel) view of the same memory
/// (see [`grouped_view`]): `Y[n, g, co, o..] = Σ W[g, co, ci, k..]·X[n, g, ci, window] +
/// b[g, co]`, so the group is one more free index of every product, shared by its two
/// factors: no cross-group term can arise in any derived equation (per-example gradients,
/// ghost norms).
fn conv_contraction(conv: &Conv, in_shape: &[usize]) -> Contraction {
    let spatial = conv.spatial();
    debug_assert_eq!(in_shape.len(), spatial + 1);
    let (ov, kv) = window_vars(spatial);
    let g: &[Var] = if conv.groups == 1 { &[] } else { &["g"] };
    let mut xi: Vec<Index> = ["n"].iter().chain(g).chain(&["ci"]).map(|v| Index::var(v)).collect();
    for a in 0..spatial {
        xi.push(Index::window(ov[a], conv.stride[a], kv[a], conv.dilation[a], conv.pad_lo[a]));
    }
    Contraction {
        y: Access::new("Y", &[&["n"][..], g, &["co"], &ov].concat()),
        w: Access::new("W", &[g, &["co", "ci"], &kv].concat()),
        x: Access { tensor: "X".into(), index: xi },
        bias: conv.bias.then(|| Access::new("b", &[g, &["co"]].concat())),
    }
}

/// The (group, channel) view of a grouped conv's tensor of per-example `shape` (its input,
/// output, weight or bias: each has the channels first): `[C, ..]` as `[G, C / G, ..]`, the
/// same elements in the same order. `shape` itself for a conv without groups.
pub fn grouped_view(conv: &Conv, shape: &[usize]) -> Vec<usize> {
    if conv.groups == 1 || shape.is_empty() {
        return shape.to_vec();
    }
    let mut view = vec![conv.groups, shape[0] / conv.groups];
    view.extend(&shape[1..]);
    view
}

/// How a norm layer's derived equations view its tensors: the input (and output) as rows
/// `r` of the elements one mean and variance cover — `[G, C/G, H·W]` (variables `r, c, s`)
/// for a group norm, `[C, H·W]` (`r, s`) for an instance norm, `[leading, normalized]`
/// (`r, s`) for a layer norm — and the affine parameters in the same terms (`[G, C/G]`,
/// `[C]`, `[normalized]`).
pub struct NormView {
    /// The input's view (rows first).
    pub x: Vec<usize>,
    /// The variables indexing it (`n` not included).
    pub vars: Vec<Var>,
    /// The variables indexing the parameters (a prefix or suffix of `vars`).
    pub param_vars: Vec<Var>,
}

impl NormView {
    /// The range of variable `v` of the view.
    pub fn range(&self, v: Var) -> usize {
        self.vars.iter().position(|u| *u == v).map_or(1, |i| self.x[i])
    }

    /// Rows per example.
    pub fn rows(&self) -> usize {
        self.x[0]
    }

    /// The variables one row's statistics average over (all but the row's).
    pub fn over(&self) -> &[Var] {
        &self.vars[1..]
    }

    /// The parameters' view.
    pub fn param(&self) -> Vec<usize> {
        self.param_vars.iter().map(|&p| self.range(p)).collect()
    }
}

/// The [`NormView`] of a norm node, `None` for other ops.
pub fn norm_view(node: &Node) -> Option<NormView> {
    let s = &node.shape;
    let total: usize = s.iter().product();
    let (x, vars, param_vars): (Vec<usize>, Vec<Var>, Vec<Var>) = match &node.op {
        Op::GroupNorm(n) => (vec![n.groups, s[0] / n.groups, total / s[0]], vec!["r", "c", "s"], vec!["r", "c"]),
        Op::InstanceNorm(_) => (vec![s[0], total / s[0]], vec!["r", "s"], vec!["r"]),
        Op::LayerNorm(n) => {
            let inner: usize = s[s.len() - n.groups..].iter().product();
            (vec![total / inner, inner], vec!["r", "s"], vec!["s"])
        }
        _ => return None,
    };
    Some(NormView { x, vars, param_vars })
}

/// `v′`: the name of a variable bound by a reduction inside an equation that uses `v` free.
fn prime(v: Var) -> Var {
    super::intern(&format!("{v}′"))
}

/// The name under which the loss's equations read the label: its own, unless that is one
/// of the names they give the network's output, its gradient and the loss (`Y`, `dY`, `ℓ`).
pub fn label_local(graph: &Graph) -> &str {
    match graph.label.name() {
        "Y" | "dY" | "ℓ" => "T",
        name => name,
    }
}

/// The per-example loss and its gradient with respect to the network output, and the
/// range of every variable they use but `n`.
pub fn loss(graph: &Graph) -> (Vec<Equation>, Vec<(Var, usize)>) {
    let out = graph.node(graph.loss.input());
    let loss = Access::new("ℓ", &["n"]);
    match (&graph.loss, &graph.label) {
        (Loss::CrossEntropy { .. }, LabelSpec::Classes { .. }) => {
            let y = Access::new("Y", &["n", "k"]);
            let onehot = Expr::select(
                Expr::Var("k"),
                Cmp::Eq,
                Expr::read(label_local(graph), &["n"]),
                Expr::num(1.0),
                Expr::num(0.0),
            );
            // softmax: exp(Y[n,k] − logsumexp_j Y[n,j])
            let softmax = Expr::apply(
                Func::Exp,
                vec![Expr::sub(rd(&y), Expr::reduce(Reduction::LogSumExp, vec!["j"], Expr::read("Y", &["n", "j"])))],
            );
            let classes = out.shape[0];
            let eqs = vec![
                eq(
                    loss,
                    Expr::sub(
                        Expr::reduce(Reduction::LogSumExp, vec!["k"], rd(&y)),
                        Expr::sum(vec!["k"], Expr::mul(vec![onehot.clone(), rd(&y)])),
                    ),
                ),
                eq(grad(&y), Expr::sub(softmax, onehot)),
            ];
            (eqs, vec![("k", classes), ("j", classes)])
        }
        _ => {
            let v = with_n(&dim_vars(out.shape.len()));
            let y = Access::new("Y", &v);
            let t = Access::new(label_local(graph), &v);
            let diff = Expr::sub(rd(&y), rd(&t));
            let count = out.shape.iter().product::<usize>() as f64;
            let eqs = vec![
                eq(loss, Expr::reduce(Reduction::Mean, v[1..].to_vec(), Expr::mul(vec![diff.clone(), diff.clone()]))),
                eq(grad(&y), Expr::div(Expr::mul(vec![Expr::num(2.0), diff]), Expr::num(count))),
            ];
            (eqs, v[1..].iter().copied().zip(out.shape.iter().copied()).collect())
        }
    }
}
