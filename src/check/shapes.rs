//! Shape rules: for each op, from its bound arguments and input shapes, the output shape,
//! the parameters (PyTorch layouts) and the forward FLOPs per example — or a diagnostic
//! pointing at the argument at fault.
//!
//! FLOP convention: a multiply-add is 2 FLOPs; an elementwise op is 1 per element; a
//! normalization is 5 per element (mean, variance, normalize) plus 2 with an affine.

use crate::diag::{Diagnostic, Span};
use crate::graph::{numel, Activation, Conv, Linear, Norm, Op, Pool, PoolKind};
use crate::ops::{Default, OpKind, OpSig};

use super::limits::MAX_DIM;
use super::Value;

/// A call's arguments bound to its signature: `slots[i]` holds `sig.args[i]`.
#[derive(Debug, Clone)]
pub struct Args {
    pub sig: &'static OpSig,
    pub slots: Vec<Option<(Value, Span)>>,
    pub call_span: Span,
}

/// What a layer turns into.
#[derive(Debug)]
pub struct Built {
    pub op: Op,
    pub shape: Vec<usize>,
    pub flops: u64,
    /// `("weight", shape)`, `("bias", shape)`.
    pub params: Vec<(String, Vec<usize>)>,
}

impl Args {
    pub fn new(sig: &'static OpSig, slots: Vec<Option<(Value, Span)>>, call_span: Span) -> Args {
        Args { sig, slots, call_span }
    }

    fn index(&self, name: &str) -> usize {
        self.sig.args.iter().position(|a| a.name == name).expect("argument name is in the op table")
    }

    /// Where an argument was written, or the call if it was left to its default.
    pub fn span_of(&self, index: usize) -> Span {
        self.slots[index].as_ref().map_or(self.call_span, |(_, s)| *s)
    }

    fn span(&self, name: &str) -> Span {
        self.span_of(self.index(name))
    }

    /// The value written or the default (`None` for an absent optional argument).
    fn value(&self, name: &str) -> Option<Value> {
        let i = self.index(name);
        match &self.slots[i] {
            Some((v, _)) => Some(v.clone()),
            None => match self.sig.args[i].default {
                Default::Int(v) => Some(Value::Int(v)),
                Default::Float(v) => Some(Value::Float(v)),
                Default::Bool(v) => Some(Value::Bool(v)),
                Default::SameAs(other) => self.value(other),
                Default::Required | Default::Absent => None,
            },
        }
    }

    /// An integer argument that must be at least `min`.
    fn int(&self, name: &str, min: i64) -> Result<Option<usize>, Diagnostic> {
        match self.value(name) {
            Some(Value::Int(v)) if v as u64 > MAX_DIM && v >= min => Err(self.too_large(name, v)),
            Some(Value::Int(v)) if v >= min => Ok(Some(v as usize)),
            Some(Value::Int(v)) => Err(too_small(self.sig.name, name, v, min, self.span(name))),
            _ => Ok(None),
        }
    }

    fn required_int(&self, name: &str, min: i64) -> Result<usize, Diagnostic> {
        Ok(self.int(name, min)?.expect("required argument was bound"))
    }

    /// A size: an integer (the same on every spatial axis) or one integer per axis.
    fn size(&self, name: &str, spatial: usize, min: i64) -> Result<Vec<usize>, Diagnostic> {
        let values = match self.value(name) {
            Some(Value::Int(v)) => vec![v; spatial],
            Some(Value::Tuple(v)) if v.len() == spatial => v,
            Some(Value::Tuple(v)) => {
                return Err(Diagnostic::error(
                    "E0115",
                    format!("`{name}` of `{}` needs {spatial} sizes, found {}", self.sig.name, v.len()),
                    self.span(name),
                )
                .with_label(format!("expected one integer, or a tuple of {spatial}")))
            }
            _ => unreachable!("type-checked by the binder"),
        };
        for &v in &values {
            if v < min {
                return Err(too_small(self.sig.name, name, v, min, self.span(name)));
            }
            if v as u64 > MAX_DIM {
                return Err(self.too_large(name, v));
            }
        }
        Ok(values.into_iter().map(|v| v as usize).collect())
    }

    /// Padding: a size (the same on both sides) or one `(lo, hi)` pair per axis. Returns
    /// the padding before (`lo`) and after (`hi`) the input along each axis.
    fn padding(&self, name: &str, spatial: usize) -> Result<(Vec<usize>, Vec<usize>), Diagnostic> {
        let pairs = match self.value(name) {
            Some(Value::Pairs(p)) if p.len() == spatial => p,
            Some(Value::Pairs(p)) => {
                return Err(Diagnostic::error(
                    "E0115",
                    format!("`{name}` of `{}` needs {spatial} (lo, hi) pairs, found {}", self.sig.name, p.len()),
                    self.span(name),
                )
                .with_label(format!("expected one (lo, hi) pair per spatial dim ({spatial})")))
            }
            _ => {
                let sym = self.size(name, spatial, 0)?;
                return Ok((sym.clone(), sym));
            }
        };
        for &(lo, hi) in &pairs {
            for v in [lo, hi] {
                if v < 0 {
                    return Err(too_small(self.sig.name, name, v, 0, self.span(name)));
                }
                if v as u64 > MAX_DIM {
                    return Err(self.too_large(name, v));
                }
            }
        }
        Ok(pairs.iter().map(|&(lo, hi)| (lo as usize, hi as usize)).unzip())
    }

    /// An integer argument above [`MAX_DIM`].
    fn too_large(&self, name: &str, v: i64) -> Diagnostic {
        super::limits::too_large_value(&format!("`{name}` of `{}`:", self.sig.name), v, self.span(name))
    }

    fn float(&self, name: &str) -> f64 {
        match self.value(name) {
            Some(Value::Float(v)) => v,
            Some(Value::Int(v)) => v as f64,
            _ => unreachable!("float arguments have defaults"),
        }
    }

    fn positive_float(&self, name: &str) -> Result<f64, Diagnostic> {
        let v = self.float(name);
        if v > 0.0 && v.is_finite() {
            Ok(v)
        } else {
            Err(Diagnostic::error(
                "E0116",
                format!("`{name}` of `{}` must be a positive number", self.sig.name),
                self.span(name),
            )
            .with_label(format!("found {v}")))
        }
    }

    fn bool(&self, name: &str) -> bool {
        matches!(self.value(name), Some(Value::Bool(true)))
    }

    /// The span of the `i`-th tensor argument (for shape errors).
    fn tensor_span(&self, i: usize) -> Span {
        self.span_of(i)
    }
}

fn too_small(op: &str, name: &str, v: i64, min: i64, span: Span) -> Diagnostic {
    let need = if min == 0 { "non-negative" } else { "at least 1" };
    Diagnostic::error("E0116", format!("`{name}` of `{op}` must be {need}"), span).with_label(format!("found {v}"))
}

fn fmt_shape(s: &[usize]) -> String {
    format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

fn rank_error(op: &str, expected: &str, found: &[usize], span: Span) -> Diagnostic {
    Diagnostic::error(
        "E0200",
        format!("`{op}` expects a {expected} input per example, found {}", fmt_shape(found)),
        span,
    )
    .with_label(format!("this has shape {}", fmt_shape(found)))
    .with_note("shapes are per example; the batch dim is implicit")
}

fn spatial_names(spatial: usize) -> &'static str {
    if spatial == 1 {
        "[C, L]"
    } else {
        "[C, H, W]"
    }
}

/// How the padding of one axis reads in a message: `2·p` when symmetric, `lo + hi` otherwise.
fn pad_terms(lo: usize, hi: usize) -> String {
    if lo == hi {
        format!("2·{lo}")
    } else {
        format!("{lo} + {hi}")
    }
}

/// Output sizes of a sliding window (conv or pool) along each spatial axis, with the
/// "kernel larger than padded input" and "non-positive output" diagnostics. The padded
/// input of an axis is `input + lo + hi`.
fn window(
    args: &Args,
    input: &[usize],
    kernel: &[usize],
    stride: &[usize],
    (lo, hi): (&[usize], &[usize]),
    dilation: &[usize],
) -> Result<Vec<usize>, Diagnostic> {
    let mut out = Vec::new();
    for axis in 0..kernel.len() {
        let padded = input[axis] + lo[axis] + hi[axis];
        let pads = pad_terms(lo[axis], hi[axis]);
        if kernel[axis] > padded {
            return Err(Diagnostic::error(
                "E0205",
                format!(
                    "`{}` kernel {} is larger than its padded input {} (= {} + {pads})",
                    args.sig.name, kernel[axis], padded, input[axis]
                ),
                args.span("kernel"),
            )
            .with_label("kernel too large")
            .with_note("use a smaller kernel, more padding, or remove a downsampling layer before this one"));
        }
        let extent = dilation[axis] * (kernel[axis] - 1) + 1;
        if extent > padded {
            return Err(Diagnostic::error(
                "E0206",
                format!(
                    "`{}` would have a non-positive output size: its dilated kernel spans {extent}, its padded input only {padded}",
                    args.sig.name
                ),
                args.call_span,
            )
            .with_label(format!(
                "{} + {pads} - ({}·({} - 1) + 1) < 0",
                input[axis], dilation[axis], kernel[axis]
            ))
            .with_note("reduce the dilation or the kernel, or add padding"));
        }
        out.push((padded - extent) / stride[axis] + 1);
    }
    Ok(out)
}

/// Builds one layer. `inputs` are the shapes of the tensor arguments, in signature order.
pub fn build(sig: &'static OpSig, args: &Args, inputs: &[&[usize]]) -> Result<Built, Diagnostic> {
    let x = inputs[0];
    let elementwise =
        |act: Activation| Built { op: Op::Activation(act), shape: x.to_vec(), flops: numel(x), params: vec![] };
    match sig.kind {
        OpKind::Conv { spatial } => conv(args, x, spatial),
        OpKind::Linear => linear(args, x),
        OpKind::Activation(Activation::LeakyRelu { .. }) => {
            Ok(elementwise(Activation::LeakyRelu { slope: args.float("slope") }))
        }
        OpKind::Activation(a) => Ok(elementwise(a)),
        OpKind::MaxPool { spatial } => pool(args, x, spatial, PoolKind::Max),
        OpKind::AvgPool { spatial } => pool(args, x, spatial, PoolKind::Avg),
        OpKind::GlobalAvgPool => {
            if x.len() < 2 {
                return Err(rank_error(sig.name, "[C, ...]", x, args.tensor_span(0)));
            }
            Ok(Built { op: Op::GlobalAvgPool, shape: vec![x[0]], flops: numel(x), params: vec![] })
        }
        OpKind::Flatten => Ok(Built { op: Op::Flatten, shape: vec![numel(x) as usize], flops: 0, params: vec![] }),
        OpKind::GroupNorm | OpKind::InstanceNorm | OpKind::LayerNorm => norm(args, x, sig.kind),
        OpKind::Add => {
            let y = inputs[1];
            if x != y {
                return Err(Diagnostic::error(
                    "E0207",
                    format!("cannot add tensors of shapes {} and {}", fmt_shape(x), fmt_shape(y)),
                    args.call_span,
                )
                .with_label("shapes differ")
                .with_secondary(args.tensor_span(0), format!("shape {}", fmt_shape(x)))
                .with_secondary(args.tensor_span(1), format!("shape {}", fmt_shape(y)))
                .with_note("a residual add needs equal shapes: match the shortcut with a 1x1 conv (downsample)"));
            }
            Ok(Built { op: Op::Add, shape: x.to_vec(), flops: numel(x), params: vec![] })
        }
        OpKind::CrossEntropy | OpKind::Mse => {
            unreachable!("losses are checked by the loss statement")
        }
    }
}

fn conv(args: &Args, x: &[usize], spatial: usize) -> Result<Built, Diagnostic> {
    let name = args.sig.name;
    if x.len() != spatial + 1 {
        return Err(rank_error(name, spatial_names(spatial), x, args.tensor_span(0)));
    }
    let in_channels = x[0];
    let out_channels = args.required_int("out", 1)?;
    let kernel = args.size("kernel", spatial, 1)?;
    let stride = args.size("stride", spatial, 1)?;
    let (pad_lo, pad_hi) = args.padding("padding", spatial)?;
    let dilation = args.size("dilation", spatial, 1)?;
    let groups = args.required_int("groups", 1)?;
    let bias = args.bool("bias");
    if let Some(declared) = args.int("in", 1)? {
        if declared != in_channels {
            return Err(Diagnostic::error(
                "E0201",
                format!("`{name}` declares in={declared} but its input has {in_channels} channels"),
                args.span("in"),
            )
            .with_label(format!("the input is {}", fmt_shape(x)))
            .with_note(format!("write `in={in_channels}`, or drop `in=` and let pdgc infer it")));
        }
    }
    if in_channels % groups != 0 {
        return Err(Diagnostic::error(
            "E0203",
            format!("`{name}` input channels ({in_channels}) are not divisible by groups ({groups})"),
            args.span("groups"),
        )
        .with_label(format!("{in_channels} channels cannot be split into {groups} groups"))
        .with_note("groups must divide both the input and the output channels"));
    }
    if out_channels % groups != 0 {
        return Err(Diagnostic::error(
            "E0204",
            format!("`{name}` output channels ({out_channels}) are not divisible by groups ({groups})"),
            args.span("out"),
        )
        .with_label(format!("{out_channels} channels cannot be split into {groups} groups"))
        .with_note("groups must divide both the input and the output channels"));
    }
    let out_sp = window(args, &x[1..], &kernel, &stride, (&pad_lo, &pad_hi), &dilation)?;
    let positions = numel(&out_sp);
    let kprod = numel(&kernel);
    let fan_in = kprod.saturating_mul((in_channels / groups) as u64);
    let outputs = positions.saturating_mul(out_channels as u64);
    let flops = outputs.saturating_mul(fan_in).saturating_mul(2).saturating_add(if bias { outputs } else { 0 });
    let mut wshape = vec![out_channels, in_channels / groups];
    wshape.extend(&kernel);
    let mut params = vec![("weight".to_string(), wshape)];
    if bias {
        params.push(("bias".to_string(), vec![out_channels]));
    }
    let mut shape = vec![out_channels];
    shape.extend(out_sp);
    let op = Op::Conv(Conv { in_channels, out_channels, kernel, stride, pad_lo, pad_hi, dilation, groups, bias });
    Ok(Built { op, shape, flops, params })
}

fn linear(args: &Args, x: &[usize]) -> Result<Built, Diagnostic> {
    let in_features = *x.last().expect("shapes have rank >= 1");
    let out_features = args.required_int("out", 1)?;
    let bias = args.bool("bias");
    if let Some(declared) = args.int("in", 1)? {
        if declared != in_features {
            let mut d = Diagnostic::error(
                "E0202",
                format!("`linear` declares in={declared} but its input has {in_features} features"),
                args.span("in"),
            )
            .with_label(format!("the input is {}", fmt_shape(x)));
            if x.len() > 1 {
                d = d.with_note(format!(
                    "linear acts on the last dim; to use all {} values, `flatten` the input first",
                    numel(x)
                ));
            } else {
                d = d.with_note(format!("write `in={in_features}`, or drop `in=` and let pdgc infer it"));
            }
            return Err(d);
        }
    }
    let rows = numel(&x[..x.len() - 1]);
    let per_row = (in_features as u64 * out_features as u64).saturating_mul(2).saturating_add(if bias {
        out_features as u64
    } else {
        0
    });
    let flops = rows.saturating_mul(per_row);
    let mut params = vec![("weight".to_string(), vec![out_features, in_features])];
    if bias {
        params.push(("bias".to_string(), vec![out_features]));
    }
    let mut shape = x.to_vec();
    *shape.last_mut().expect("rank >= 1") = out_features;
    Ok(Built { op: Op::Linear(Linear { in_features, out_features, bias }), shape, flops, params })
}

fn pool(args: &Args, x: &[usize], spatial: usize, kind: PoolKind) -> Result<Built, Diagnostic> {
    if x.len() != spatial + 1 {
        return Err(rank_error(args.sig.name, spatial_names(spatial), x, args.tensor_span(0)));
    }
    let kernel = args.size("kernel", spatial, 1)?;
    let stride = args.size("stride", spatial, 1)?;
    let (pad_lo, pad_hi) = args.padding("padding", spatial)?;
    let too_much =
        (0..spatial).find_map(|a| [pad_lo[a], pad_hi[a]].into_iter().find(|&p| 2 * p > kernel[a]).map(|p| (a, p)));
    if let Some((axis, p)) = too_much {
        return Err(Diagnostic::error(
            "E0210",
            format!("`{}` padding {} is more than half its kernel {}", args.sig.name, p, kernel[axis]),
            args.span("padding"),
        )
        .with_label("too much padding")
        .with_note("a window could then lie entirely in the padding (PyTorch rejects this too)"));
    }
    let out_sp = window(args, &x[1..], &kernel, &stride, (&pad_lo, &pad_hi), &vec![1; spatial])?;
    let mut shape = vec![x[0]];
    shape.extend(out_sp);
    let flops = numel(&shape).saturating_mul(numel(&kernel));
    Ok(Built { op: Op::Pool(Pool { kind, kernel, stride, pad_lo, pad_hi }), shape, flops, params: vec![] })
}

fn norm(args: &Args, x: &[usize], kind: OpKind) -> Result<Built, Diagnostic> {
    let name = args.sig.name;
    let eps = args.positive_float("eps")?;
    let affine = args.bool("affine");
    let (op, param_shape) = match kind {
        OpKind::GroupNorm | OpKind::InstanceNorm => {
            if x.len() < 2 {
                return Err(rank_error(name, "[C, ...]", x, args.tensor_span(0)));
            }
            let channels = x[0];
            if kind == OpKind::InstanceNorm {
                (Op::InstanceNorm(Norm { groups: channels, eps, affine }), vec![channels])
            } else {
                let groups = args.required_int("groups", 1)?;
                if channels % groups != 0 {
                    return Err(Diagnostic::error(
                        "E0208",
                        format!("group_norm: {channels} channels are not divisible into {groups} groups"),
                        args.span("groups"),
                    )
                    .with_label(format!("{groups} does not divide {channels}"))
                    .with_note(format!(
                        "choose a divisor of {channels}, e.g. {}",
                        largest_divisor_up_to(channels, groups)
                    )));
                }
                (Op::GroupNorm(Norm { groups, eps, affine }), vec![channels])
            }
        }
        OpKind::LayerNorm => {
            let dims = args.int("dims", 1)?.unwrap_or(x.len());
            if dims > x.len() {
                return Err(Diagnostic::error(
                    "E0209",
                    format!("layer_norm over {dims} dims, but the input has only {}", x.len()),
                    args.span("dims"),
                )
                .with_label(format!("the input is {}", fmt_shape(x))));
            }
            (Op::LayerNorm(Norm { groups: dims, eps, affine }), x[x.len() - dims..].to_vec())
        }
        _ => unreachable!("norm() is called for norm ops"),
    };
    let params = if affine {
        vec![("weight".to_string(), param_shape.clone()), ("bias".to_string(), param_shape)]
    } else {
        vec![]
    };
    let flops = numel(x).saturating_mul(if affine { 7 } else { 5 });
    Ok(Built { op, shape: x.to_vec(), flops, params })
}

fn largest_divisor_up_to(n: usize, limit: usize) -> usize {
    (1..=limit.min(n)).rev().find(|d| n % d == 0).unwrap_or(1)
}
