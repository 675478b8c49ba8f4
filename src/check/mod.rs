//! Stage 2, `check`: AST to [`Graph`], with every diagnostic the source deserves.
//!
//! The checker walks the statements in order with a scope of bound names, evaluates each
//! expression to a [`Value`], binds call arguments against the op table ([`crate::ops`])
//! and lets [`shapes`] infer each layer's output shape, parameters and FLOPs. An error
//! turns the value into [`Value::Poison`], which later uses accept silently, so one
//! mistake yields one diagnostic, not a cascade; checking always runs to the end.
//!
//! Layers written in index notation (`layer NAME(...) { ... }`, [`index`]) are checked
//! where they are defined, before the statements, and instantiated at each call into an
//! `Op::Index` node.
//!
//! Every size a model creates — dimensions, integer arguments, tensors, parameters, a conv's
//! im2col columns, the label's classes — is checked here against what the kernel IR and the
//! backends can address ([`limits`], which documents the limits); one that is too large is an
//! `E0211` diagnostic at the layer or argument that makes it so.

mod index;
pub mod limits;
mod shapes;

use std::collections::{HashMap, HashSet};

use crate::diag::{did_you_mean, Diagnostic, Span};
use crate::graph::{Graph, LabelSpec, Loss, Node, NodeId, Op, ParamSpec};
use crate::ops::{self, ArgTy, Default, OpKind, OpSig, Strategy};
use crate::syntax::ast::{self, Expr, ExprKind, Ident, Item, LabelKind};

pub use shapes::Args;

/// The value of an expression while checking.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Tensor(NodeId),
    /// The model's label; only the loss may read it.
    Label,
    Int(i64),
    Float(f64),
    Bool(bool),
    Tuple(Vec<i64>),
    /// A tuple of `(lo, hi)` pairs: per-side padding, one pair per spatial dim.
    Pairs(Vec<(i64, i64)>),
    /// Something already reported; accepted anywhere without further errors.
    Poison,
}

impl Value {
    fn describe(&self) -> &'static str {
        match self {
            Value::Tensor(_) => "a tensor",
            Value::Label => "the label",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Bool(_) => "a boolean",
            Value::Tuple(_) => "a tuple",
            Value::Pairs(_) => "a tuple of pairs",
            Value::Poison => "an invalid value",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BindingKind {
    Input,
    Label,
    Tensor,
}

#[derive(Debug)]
struct Binding {
    value: Value,
    span: Span,
    kind: BindingKind,
    used: bool,
}

/// Checks a parsed model. Returns the graph when there were no errors (warnings allowed).
pub fn check(model: &ast::Model) -> (Option<Graph>, Vec<Diagnostic>) {
    let mut c = Checker::default();
    // Layer definitions come first, so that a layer may be used above its definition.
    for item in &model.items {
        if let Item::Layer(def) = item {
            c.define(def);
        }
    }
    for item in &model.items {
        c.item(item);
    }
    c.finish(model)
}

#[derive(Default)]
struct Checker {
    nodes: Vec<Node>,
    params: Vec<ParamSpec>,
    diags: Vec<Diagnostic>,
    scope: HashMap<String, Binding>,
    layer_names: HashMap<String, Span>,
    label: Option<(LabelSpec, Span)>,
    loss: Option<(Option<Loss>, Span)>,
    /// The layers written in index notation, by name.
    defs: HashMap<String, index::DefEntry>,
    /// Diagnostics of a definition's body already reported at an earlier call (code,
    /// span, message), so that a layer used twice does not report its mistake twice.
    reported: HashSet<(&'static str, Span, String)>,
}

impl Checker {
    fn error(&mut self, d: Diagnostic) -> Value {
        self.diags.push(d);
        Value::Poison
    }

    fn item(&mut self, item: &Item) {
        match item {
            Item::Input { name, shape, .. } => {
                let dims = self.dims(shape);
                let value = match dims {
                    Some(dims) => {
                        let id = self.push_node(Op::Input { name: name.name.clone() }, vec![], dims, 0, name.span);
                        Value::Tensor(id)
                    }
                    None => Value::Poison,
                };
                self.declare(name, value, BindingKind::Input);
            }
            Item::Label { name, kind, span } => self.label(name, kind, *span),
            Item::Bind { name, value, .. } => {
                let v = self.expr(value);
                let v = match v {
                    Value::Tensor(_) | Value::Poison => v,
                    other => self.error(
                        Diagnostic::error("E0114", format!("`{}` must be bound to a tensor", name.name), value.span)
                            .with_label(format!("this is {}", other.describe()))
                            .with_note("bindings hold layer outputs; constants go directly into a layer's arguments"),
                    ),
                };
                self.declare(name, v, BindingKind::Tensor);
            }
            Item::Loss { call, span } => self.loss(call, *span),
            // Checked before the walk (`define`); each call instantiates it.
            Item::Layer(_) => {}
            Item::Error { .. } => {}
        }
    }

    /// Validates an input or target shape: every dim at least 1.
    fn dims(&mut self, shape: &[ast::Dim]) -> Option<Vec<usize>> {
        let mut ok = true;
        for d in shape {
            if d.value as u64 > limits::MAX_DIM && d.value > 0 {
                self.error(limits::too_large_value("dimension", d.value, d.span));
                ok = false;
            } else if d.value < 1 {
                self.error(
                    Diagnostic::error("E0116", format!("dimension {} is not positive", d.value), d.span)
                        .with_label("every dimension must be at least 1"),
                );
                ok = false;
            }
        }
        if shape.is_empty() {
            return None;
        }
        let dims: Vec<usize> = shape.iter().map(|d| d.value as usize).collect();
        let count = crate::graph::numel(&dims);
        if ok && count > limits::MAX_TENSOR_ELEMENTS {
            self.error(
                Diagnostic::error(
                    "E0211",
                    format!("a tensor of shape {dims:?} is too large"),
                    shape[0].span.to(shape[shape.len() - 1].span),
                )
                .with_label(format!(
                    "{} elements per example (at most {})",
                    crate::report::thousands(count),
                    limits::MAX_TENSOR_ELEMENTS
                ))
                .with_note(limits::LIMITS_NOTE),
            );
            ok = false;
        }
        ok.then_some(dims)
    }

    fn declare(&mut self, name: &ast::Ident, value: Value, kind: BindingKind) {
        if let Some(prev) = self.scope.get(&name.name) {
            let clash = prev.kind != BindingKind::Tensor || kind != BindingKind::Tensor;
            // Rebinding a tensor name (`h = f(h)`) is fine; reusing an input's or the
            // label's name for something else is not.
            if clash && !(kind == BindingKind::Tensor && prev.kind == BindingKind::Input) {
                let what = match prev.kind {
                    BindingKind::Input => "an input",
                    BindingKind::Label => "the label",
                    BindingKind::Tensor => "a tensor",
                };
                let prev_span = prev.span;
                self.error(
                    Diagnostic::error("E0104", format!("`{}` is already defined as {what}", name.name), name.span)
                        .with_label("defined again here")
                        .with_secondary(prev_span, "first defined here")
                        .with_note("inputs and the label need names of their own"),
                );
                return;
            }
            if prev.kind == BindingKind::Tensor && !prev.used {
                self.diags.extend(unused(&name.name, prev.span));
            }
        }
        self.scope.insert(name.name.clone(), Binding { value, span: name.span, kind, used: false });
    }

    fn label(&mut self, name: &ast::Ident, kind: &LabelKind, span: Span) {
        if let Some((_, prev)) = &self.label {
            let prev = *prev;
            self.error(
                Diagnostic::error("E0312", "a model has exactly one label", span)
                    .with_label("second label")
                    .with_secondary(prev, "first label"),
            );
            return;
        }
        let spec = match kind {
            LabelKind::Classes { kind, count } => {
                if kind.name != "classes" {
                    self.error(
                        Diagnostic::error("E0313", format!("unknown label kind `{}`", kind.name), kind.span)
                            .with_label("expected `classes(K)` or a shape like `[4]`"),
                    );
                    return;
                }
                if count.value < 2 {
                    self.error(
                        Diagnostic::error("E0116", "a classification label needs at least 2 classes", count.span)
                            .with_label(format!("found {}", count.value)),
                    );
                    return;
                }
                if count.value as u64 > limits::MAX_CLASSES {
                    self.error(
                        Diagnostic::error("E0211", format!("{} classes are too many", count.value), count.span)
                            .with_label(format!("at most {}", limits::MAX_CLASSES))
                            .with_note("class indices reach the kernels as f32, which is exact only up to 2^24"),
                    );
                }
                LabelSpec::Classes { name: name.name.clone(), classes: count.value as usize }
            }
            LabelKind::Target { shape } => match self.dims(shape) {
                Some(dims) => LabelSpec::Target { name: name.name.clone(), shape: dims },
                None => return,
            },
        };
        self.label = Some((spec, span));
        self.declare(name, Value::Label, BindingKind::Label);
    }

    fn lookup(&mut self, name: &ast::Ident) -> Value {
        if let Some(b) = self.scope.get_mut(&name.name) {
            b.used = true;
            return b.value.clone();
        }
        let mut d = Diagnostic::error("E0103", format!("unknown name `{}`", name.name), name.span)
            .with_label("not defined before this point");
        if let Some(s) = did_you_mean(&name.name, self.scope.keys().map(String::as_str)) {
            d = d.with_note(format!("did you mean `{s}`?"));
        }
        self.error(d)
    }

    fn expr(&mut self, e: &Expr) -> Value {
        match &e.kind {
            ExprKind::Name(n) => self.lookup(n),
            ExprKind::Int(i) => Value::Int(*i),
            ExprKind::Float(x) => Value::Float(*x),
            ExprKind::Bool(b) => Value::Bool(*b),
            ExprKind::Tuple(items) => self.tuple(items),
            ExprKind::Add(a, b) => {
                let va = self.expr(a);
                let vb = self.expr(b);
                let (Some(ia), Some(ib)) = (self.tensor(&va, a.span), self.tensor(&vb, b.span)) else {
                    return Value::Poison;
                };
                let sig = ops::lookup("add").expect("add is in the op table");
                let args = Args::new(sig, vec![Some((va, a.span)), Some((vb, b.span))], e.span);
                self.layer(sig, &args, vec![ia, ib], None, &[], e.span)
            }
            ExprKind::Call(call) => self.call(call),
        }
    }

    /// A tuple of integers (sizes), or a tuple of `(lo, hi)` integer pairs (per-side padding).
    fn tuple(&mut self, items: &[Expr]) -> Value {
        let nested = items.iter().any(|i| matches!(i.kind, ExprKind::Tuple(_)));
        let mut ints = Vec::new();
        let mut pairs = Vec::new();
        for item in items {
            match (nested, self.expr(item)) {
                (_, Value::Poison) => return Value::Poison,
                (false, Value::Int(i)) => ints.push(i),
                (true, Value::Tuple(pair)) if pair.len() == 2 => pairs.push((pair[0], pair[1])),
                (true, Value::Tuple(other)) => {
                    return self.error(
                        Diagnostic::error("E0114", "a padding pair holds exactly two integers", item.span)
                            .with_label(format!("this tuple has {} integers", other.len()))
                            .with_note("write `(lo, hi)`: the padding before and after the input on this axis"),
                    )
                }
                (true, other) => return self.error(
                    Diagnostic::error("E0114", "a tuple of pairs holds only `(lo, hi)` pairs", item.span)
                        .with_label(format!("this is {}", other.describe()))
                        .with_note(
                            "per-side padding is one `(lo, hi)` pair per spatial dim, e.g. `padding=((0, 1), (1, 1))`",
                        ),
                ),
                (false, other) => {
                    return self.error(
                        Diagnostic::error("E0114", "tuples hold integers (sizes)", item.span)
                            .with_label(format!("this is {}", other.describe())),
                    )
                }
            }
        }
        if nested {
            Value::Pairs(pairs)
        } else {
            Value::Tuple(ints)
        }
    }

    /// The node of a tensor-valued argument, or a diagnostic.
    fn tensor(&mut self, v: &Value, span: Span) -> Option<NodeId> {
        match v {
            Value::Tensor(id) => Some(*id),
            Value::Poison => None,
            Value::Label => {
                self.error(
                    Diagnostic::error("E0114", "the label can only be used in the `loss` statement", span)
                        .with_label("this is the label"),
                );
                None
            }
            other => {
                self.error(
                    Diagnostic::error("E0114", "expected a tensor", span)
                        .with_label(format!("this is {}", other.describe())),
                );
                None
            }
        }
    }

    /// Evaluates a call's arguments and binds them to the op's signature.
    fn bind(&mut self, sig: &'static OpSig, call: &ast::Call) -> Option<Args> {
        let mut slots: Vec<Option<(Value, Span)>> = vec![None; sig.args.len()];
        let mut arg_spans: Vec<Option<Span>> = vec![None; sig.args.len()];
        let mut ok = true;
        let mut positional = 0;
        for arg in &call.args {
            let value = self.expr(&arg.value);
            let index = match &arg.key {
                None => {
                    let i = positional;
                    positional += 1;
                    let n_pos = sig.args.iter().filter(|a| !a.keyword_only).count();
                    if i >= n_pos {
                        let names: Vec<&str> = sig.args.iter().filter(|a| !a.keyword_only).map(|a| a.name).collect();
                        self.error(too_many_arguments(sig.name, &names, arg.span));
                        ok = false;
                        continue;
                    }
                    i
                }
                Some(key) => match sig.args.iter().position(|a| a.name == key.name) {
                    Some(i) => i,
                    None => {
                        let names: Vec<&str> = sig.args.iter().map(|a| a.name).collect();
                        self.error(unknown_argument(sig.name, &names, key));
                        ok = false;
                        continue;
                    }
                },
            };
            if let Some(prev) = arg_spans[index] {
                self.error(given_twice(sig.name, sig.args[index].name, arg.span, prev));
                ok = false;
                continue;
            }
            arg_spans[index] = Some(arg.span);
            if !self.type_ok(sig, index, &value, arg.value.span) {
                ok = false;
            }
            slots[index] = Some((value, arg.value.span));
        }
        for (i, a) in sig.args.iter().enumerate() {
            if slots[i].is_none() && a.default == Default::Required {
                self.error(missing_argument(sig.name, a.name, call.op.span, signature_note(sig)));
                ok = false;
            }
        }
        if slots.iter().flatten().any(|(v, _)| *v == Value::Poison) {
            ok = false;
        }
        ok.then(|| Args::new(sig, slots, call.span))
    }

    fn type_ok(&mut self, sig: &OpSig, index: usize, value: &Value, span: Span) -> bool {
        let a = &sig.args[index];
        let fits = match (a.ty, value) {
            (_, Value::Poison) => true,
            (ArgTy::Tensor, Value::Tensor(_)) => true,
            (ArgTy::Tensor, Value::Label) => sig.kind.is_loss(),
            (ArgTy::Int, Value::Int(_)) => true,
            (ArgTy::Size, Value::Int(_) | Value::Tuple(_)) => true,
            (ArgTy::Padding, Value::Int(_) | Value::Tuple(_) | Value::Pairs(_)) => true,
            (ArgTy::Float, Value::Float(_) | Value::Int(_)) => true,
            (ArgTy::Bool, Value::Bool(_)) => true,
            _ => false,
        };
        if !fits {
            let mut d = Diagnostic::error("E0114", format!("`{}` of `{}` expects {}", a.name, sig.name, a.ty), span)
                .with_label(format!("this is {}", value.describe()));
            if *value == Value::Label {
                d = d.with_note("the label can only be used in the `loss` statement");
            }
            self.error(d);
        }
        fits
    }

    fn call(&mut self, call: &ast::Call) -> Value {
        if let Some(entry) = self.defs.get_mut(&call.op.name) {
            entry.used = true;
            let def = entry.def.clone();
            return match def {
                Some(def) => self.index_call(&def, call),
                None => {
                    // The definition is wrong (already reported): check the arguments only.
                    for arg in &call.args {
                        self.expr(&arg.value);
                    }
                    Value::Poison
                }
            };
        }
        let Some(sig) = ops::lookup(&call.op.name) else {
            for arg in &call.args {
                self.expr(&arg.value); // still report problems inside the arguments
            }
            let mut d = unknown_op(&call.op);
            if d.code == "E0100" && d.notes.is_empty() {
                // A misspelt layer in index notation.
                if let Some(s) = did_you_mean(&call.op.name, self.defs.keys().map(String::as_str)) {
                    d = d.with_note(format!("did you mean `{s}`?"));
                }
            }
            return self.error(d);
        };
        if sig.kind.is_loss() {
            return self.error(
                Diagnostic::error("E0102", format!("`{}` is a loss, not a layer", sig.name), call.op.span)
                    .with_label("used inside an expression")
                    .with_note(format!("write it as its own statement: `loss {}(logits, y);`", sig.name)),
            );
        }
        let Some(args) = self.bind(sig, call) else {
            return Value::Poison;
        };
        let mut inputs = Vec::new();
        for (i, a) in sig.args.iter().enumerate() {
            if a.ty == ArgTy::Tensor {
                if let Some((Value::Tensor(id), _)) = &args.slots[i] {
                    inputs.push(*id);
                }
            }
        }
        self.layer(sig, &args, inputs, call.layer.as_ref(), &call.attrs, call.span)
    }

    /// Infers the layer's shape and parameters, checks its name and attributes, and adds it.
    fn layer(
        &mut self,
        sig: &'static OpSig,
        args: &Args,
        inputs: Vec<NodeId>,
        layer: Option<&ast::Ident>,
        attrs: &[ast::Attr],
        span: Span,
    ) -> Value {
        let in_shapes: Vec<&[usize]> = inputs.iter().map(|i| self.nodes[i.index()].shape.as_slice()).collect();
        let built = match shapes::build(sig, args, &in_shapes) {
            Ok(b) => b,
            Err(d) => return self.error(d),
        };
        self.add_layer(sig.name, built, inputs, layer, attrs, span)
    }

    /// Checks a built layer's sizes, name and attributes, and adds it with its parameters.
    /// `op` is the op's name as written: a built-in op or a layer in index notation.
    fn add_layer(
        &mut self,
        op: &str,
        built: shapes::Built,
        inputs: Vec<NodeId>,
        layer: Option<&Ident>,
        attrs: &[ast::Attr],
        span: Span,
    ) -> Value {
        let first_input = inputs.first().map_or(&[][..], |i| self.nodes[i.index()].shape.as_slice());
        if let Err(d) = limits::check_layer(op, &built, first_input, span) {
            return self.error(d);
        }
        let builtin = ops::lookup(op).is_some();
        let name = match (layer, built.params.is_empty()) {
            (None, false) => {
                let note = if builtin {
                    format!(
                        "write `fc1: {op}(...)`; its parameters are then `fc1.weight` and `fc1.bias`, as in a PyTorch state_dict"
                    )
                } else {
                    let names: Vec<String> = built.params.iter().map(|(p, _)| format!("`l1.{p}`")).collect();
                    format!("write `l1: {op}(...)`; its parameters are then {}", names.join(", "))
                };
                return self.error(
                    Diagnostic::error("E0120", format!("this `{op}` layer has parameters and needs a name"), span)
                        .with_label("unnamed layer with parameters")
                        .with_note(note),
                );
            }
            (Some(l), true) => {
                let note = if builtin {
                    "only layers with parameters (conv, linear, affine norms) are named".to_string()
                } else {
                    format!("only layers with parameters are named, and `{op}` declares no `param`")
                };
                return self.error(
                    Diagnostic::error("E0121", format!("`{op}` has no parameters, so it takes no name"), l.span)
                        .with_label("remove this name")
                        .with_note(note),
                );
            }
            (None, true) => None,
            (Some(l), false) => {
                if let Some(prev) = self.layer_names.get(&l.name) {
                    let prev = *prev;
                    return self.error(
                        Diagnostic::error("E0122", format!("the layer name `{}` is used twice", l.name), l.span)
                            .with_label("second layer with this name")
                            .with_secondary(prev, "first used here")
                            .with_note("parameter names (`NAME.weight`) must be unique"),
                    );
                }
                self.layer_names.insert(l.name.clone(), l.span);
                Some(l.name.clone())
            }
        };
        let strategies = match &built.op {
            Op::Index(_) => ops::strategies(&built.op),
            _ => ops::lookup(op).map_or(&[][..], |sig| sig.kind.strategies()),
        };
        let strategy = match self.attrs(op, strategies, attrs) {
            Ok(s) => s,
            Err(()) => return Value::Poison,
        };
        let id = self.push_node(built.op, inputs, built.shape, built.flops, span);
        self.nodes[id.index()].strategy = strategy;
        if let Some(layer) = &name {
            for (suffix, shape) in built.params {
                self.params.push(ParamSpec { name: format!("{layer}.{suffix}"), shape, node: id });
            }
        }
        self.nodes[id.index()].layer = name;
        Value::Tensor(id)
    }

    /// The strategy an `@strategy(...)` attribute sets; `op` accepts `strategies`.
    fn attrs(&mut self, op: &str, strategies: &[Strategy], attrs: &[ast::Attr]) -> Result<Option<Strategy>, ()> {
        let mut strategy = None;
        for a in attrs {
            if a.name.name != "strategy" {
                let mut d = Diagnostic::error("E0130", format!("unknown attribute `@{}`", a.name.name), a.name.span)
                    .with_label("unknown attribute");
                if did_you_mean(&a.name.name, ["strategy"]).is_some() {
                    d = d.with_note("did you mean `@strategy`?");
                }
                self.error(d.with_note("the only attribute is `@strategy(NAME)`"));
                return Err(());
            }
            let valid: Vec<&str> = strategies.iter().map(|s| s.name()).collect();
            let [arg] = a.args.as_slice() else {
                self.error(
                    Diagnostic::error("E0131", "`@strategy` takes exactly one strategy name", a.span)
                        .with_note(format!("strategies for `{op}`: {}", valid.join(", "))),
                );
                return Err(());
            };
            let Some(s) = Strategy::from_name(&arg.name) else {
                let mut d = Diagnostic::error("E0131", format!("unknown strategy `{}`", arg.name), arg.span)
                    .with_label("not a strategy");
                if let Some(s) = did_you_mean(&arg.name, Strategy::ALL.iter().map(|s| s.name())) {
                    d = d.with_note(format!("did you mean `{s}`?"));
                }
                self.error(d.with_note(format!("strategies for `{op}`: {}", valid.join(", "))));
                return Err(());
            };
            if !strategies.contains(&s) {
                let note = if valid.is_empty() {
                    format!("`{op}` has no parameters, so it has no per-example gradient strategy")
                } else {
                    format!("strategies for `{op}`: {}", valid.join(", "))
                };
                self.error(
                    Diagnostic::error("E0132", format!("strategy `{s}` does not apply to `{op}`"), arg.span)
                        .with_label(format!("not available for `{op}`"))
                        .with_note(note),
                );
                return Err(());
            }
            strategy = Some(s);
        }
        Ok(strategy)
    }

    fn loss(&mut self, call: &ast::Call, span: Span) {
        if let Some((_, prev)) = &self.loss {
            let prev = *prev;
            self.error(
                Diagnostic::error("E0301", "a model has exactly one loss", span)
                    .with_label("second loss")
                    .with_secondary(prev, "first loss")
                    .with_note("per-example gradients are of one scalar loss per example"),
            );
            return;
        }
        self.loss = Some((None, span));
        let sig = match ops::lookup(&call.op.name) {
            Some(sig) if sig.kind.is_loss() => sig,
            Some(sig) => {
                self.error(
                    Diagnostic::error("E0302", format!("`{}` is a layer, not a loss", sig.name), call.op.span)
                        .with_label("expected `cross_entropy` or `mse`"),
                );
                return;
            }
            None => {
                let mut d = Diagnostic::error("E0302", format!("unknown loss `{}`", call.op.name), call.op.span)
                    .with_label("expected `cross_entropy` or `mse`");
                if let Some(s) = did_you_mean(&call.op.name, ["cross_entropy", "mse"]) {
                    d = d.with_note(format!("did you mean `{s}`?"));
                }
                self.error(d);
                return;
            }
        };
        let Some(args) = self.bind(sig, call) else {
            return;
        };
        let (input, input_span) = match &args.slots[0] {
            Some((Value::Tensor(id), s)) => (*id, *s),
            Some((Value::Label, s)) => {
                self.error(
                    Diagnostic::error(
                        "E0305",
                        format!("the first argument of `{}` must be the network's output", sig.name),
                        *s,
                    )
                    .with_label("this is the label"),
                );
                return;
            }
            _ => return,
        };
        let label_span = args.span_of(1);
        if args.slots[1].as_ref().map(|(v, _)| v) != Some(&Value::Label) {
            self.error(
                Diagnostic::error(
                    "E0305",
                    format!("the second argument of `{}` must be the label", sig.name),
                    label_span,
                )
                .with_label("not the label"),
            );
            return;
        }
        let Some((label, _)) = self.label.clone() else {
            return;
        };
        let shape = self.nodes[input.index()].shape.clone();
        let loss = match (sig.kind, &label) {
            (OpKind::CrossEntropy, LabelSpec::Classes { classes, .. }) => {
                if shape != [*classes] {
                    self.error(
                        Diagnostic::error(
                            "E0303",
                            format!("the logits have shape {shape:?} but the label has {classes} classes"),
                            input_span,
                        )
                        .with_label(format!("expected shape [{classes}]"))
                        .with_note("cross_entropy takes one logit per class: end the network with `linear(h, K)`"),
                    );
                    return;
                }
                Loss::CrossEntropy { logits: input }
            }
            (OpKind::Mse, LabelSpec::Target { shape: target, .. }) => {
                if &shape != target {
                    self.error(
                        Diagnostic::error(
                            "E0303",
                            format!("the prediction has shape {shape:?} but the target has shape {target:?}"),
                            input_span,
                        )
                        .with_label(format!("expected shape {target:?}")),
                    );
                    return;
                }
                Loss::Mse { pred: input }
            }
            (OpKind::CrossEntropy, LabelSpec::Target { .. }) => {
                self.error(
                    Diagnostic::error("E0304", "cross_entropy needs a class label", call.op.span)
                        .with_label("the label is a real-valued target")
                        .with_note("declare `label y: classes(K);`, or use `loss mse(pred, y);` for regression"),
                );
                return;
            }
            _ => {
                self.error(
                    Diagnostic::error("E0304", "mse needs a real-valued target label", call.op.span)
                        .with_label("the label holds class indices")
                        .with_note("declare `label y: [D];`, or use `loss cross_entropy(logits, y);` for classes"),
                );
                return;
            }
        };
        self.loss = Some((Some(loss), span));
    }

    fn push_node(&mut self, op: Op, inputs: Vec<NodeId>, shape: Vec<usize>, flops: u64, span: Span) -> NodeId {
        let id = NodeId(self.nodes.len() as u32);
        self.nodes.push(Node { id, op, inputs, shape, layer: None, strategy: None, flops, span });
        id
    }

    fn finish(mut self, model: &ast::Model) -> (Option<Graph>, Vec<Diagnostic>) {
        if !self.nodes.iter().any(|n| matches!(n.op, Op::Input { .. }))
            && !self.scope.values().any(|b| b.kind == BindingKind::Input)
        {
            self.error(
                Diagnostic::error("E0310", format!("model `{}` has no input", model.name.name), model.name.span)
                    .with_label("no `input` statement")
                    .with_note("declare one, e.g. `input x: [3, 32, 32];` (shape without the batch dim)"),
            );
        }
        if self.label.is_none() {
            self.error(
                Diagnostic::error("E0311", format!("model `{}` has no label", model.name.name), model.name.span)
                    .with_label("no `label` statement")
                    .with_note("declare `label y: classes(K);` for classification or `label y: [D];` for regression"),
            );
        }
        if self.loss.is_none() {
            self.error(
                Diagnostic::error("E0300", format!("model `{}` has no loss", model.name.name), model.name.span)
                    .with_label("no `loss` statement")
                    .with_note("end the model with e.g. `loss cross_entropy(logits, y);`"),
            );
        }
        // Without a loss every binding looks unused; the missing loss is the one thing to say.
        let has_loss = self.loss.is_some();
        let mut warnings: Vec<Diagnostic> = self
            .scope
            .iter()
            .filter(|(_, b)| has_loss && !b.used && b.kind != BindingKind::Label)
            .filter_map(|(name, b)| match b.kind {
                BindingKind::Input => Some(
                    Diagnostic::warning("W0002", format!("input `{name}` is never used"), b.span)
                        .with_label("declared here")
                        .with_note("the loss does not depend on it"),
                ),
                _ => unused(name, b.span),
            })
            .collect();
        for (name, entry) in &self.defs {
            if has_loss && !entry.used && entry.def.is_some() && !name.starts_with('_') {
                warnings.push(
                    Diagnostic::warning("W0003", format!("layer `{name}` is defined but never used"), entry.span)
                        .with_label("never called")
                        .with_note(format!("call it (`h = {name}(...);`), remove it, or rename it `_{name}`")),
                );
            }
        }
        warnings.sort_by_key(|d| d.span().start);
        self.diags.extend(warnings);

        let errors = crate::diag::has_errors(&self.diags);
        let graph = match (errors, self.label, self.loss) {
            (false, Some((label, _)), Some((Some(loss), _))) => {
                Some(Graph { name: model.name.name.clone(), nodes: self.nodes, label, loss, params: self.params })
            }
            _ => None,
        };
        (graph, self.diags)
    }
}

/// The warning for a binding that is never read; `_name` bindings are intentionally unused.
fn unused(name: &str, span: Span) -> Option<Diagnostic> {
    (!name.starts_with('_')).then(|| {
        Diagnostic::warning("W0001", format!("`{name}` is bound but never used"), span)
            .with_label("this value does not reach the loss")
            .with_note(format!("remove the statement, use `{name}`, or rename it `_{name}` to keep it"))
    })
}

fn unknown_op(op: &ast::Ident) -> Diagnostic {
    if let Some((_, why, fix)) = ops::REJECTED.iter().find(|(n, _, _)| *n == op.name) {
        return Diagnostic::error("E0101", format!("`{}` is not supported", op.name), op.span)
            .with_label("not supported for per-example gradients")
            .with_note(*why)
            .with_note(format!("help: {fix}"));
    }
    let mut d = Diagnostic::error("E0100", format!("unknown layer `{}`", op.name), op.span).with_label("unknown layer");
    let names = ops::OPS.iter().filter(|o| !o.kind.is_loss()).map(|o| o.name);
    if let Some(s) = did_you_mean(&op.name, names) {
        d = d.with_note(format!("did you mean `{s}`?"));
    }
    d
}

fn too_many_arguments(op: &str, positional: &[&str], span: Span) -> Diagnostic {
    Diagnostic::error("E0111", format!("too many arguments to `{op}`"), span)
        .with_label(format!("`{op}` takes at most {} positional arguments", positional.len()))
        .with_note(format!("positional order: {}", positional.join(", ")))
}

fn unknown_argument(op: &str, names: &[&str], key: &Ident) -> Diagnostic {
    let mut d = Diagnostic::error("E0110", format!("`{op}` has no argument `{}`", key.name), key.span)
        .with_label("unknown argument");
    if let Some(s) = did_you_mean(&key.name, names.iter().copied()) {
        d = d.with_note(format!("did you mean `{s}`?"));
    }
    d.with_note(format!("`{op}` takes: {}", names.join(", ")))
}

fn given_twice(op: &str, arg: &str, span: Span, prev: Span) -> Diagnostic {
    Diagnostic::error("E0112", format!("argument `{arg}` of `{op}` is given twice"), span)
        .with_label("given again here")
        .with_secondary(prev, "first given here")
}

fn missing_argument(op: &str, arg: &str, span: Span, usage: String) -> Diagnostic {
    Diagnostic::error("E0113", format!("`{op}` needs the argument `{arg}`"), span)
        .with_label(format!("`{arg}` is missing"))
        .with_note(usage)
}

fn signature_note(sig: &OpSig) -> String {
    let parts: Vec<String> = sig
        .args
        .iter()
        .map(|a| match a.default {
            Default::Required => a.name.to_string(),
            Default::Int(i) => format!("{}={i}", a.name),
            Default::Float(x) => format!("{}={x:e}", a.name),
            Default::Bool(b) => format!("{}={b}", a.name),
            Default::SameAs(o) => format!("{}={o}", a.name),
            Default::Absent => format!("{}=<optional>", a.name),
        })
        .collect();
    format!("usage: {}({})", sig.name, parts.join(", "))
}
