//! The node walk: ONNX nodes, in graph order, to `.pdg` statements (one per node, or one per
//! recognized pattern: MatMul + Add is a `linear`, PyTorch's group-norm decomposition is a
//! `group_norm`, the erf form of GELU is a `gelu`), with each layer's parameters in PyTorch's
//! layout and under its PyTorch name.

use std::collections::{HashMap, HashSet};

use super::names::{decode, encode};
use super::proto::{attr_float, attr_int, attr_ints, attr_string, Const, NodeProto};
use super::ImportError;

/// A tensor computed from the input, bound to a `.pdg` variable.
#[derive(Debug, Clone)]
pub(super) struct Act {
    pub var: String,
    /// The per-example shape in the `.pdg` model.
    pub shape: Vec<usize>,
    /// The per-example shape ONNX sees: the same elements in the same order, with size-1
    /// dims the `.pdg` shape lacks (`GlobalAveragePool` keeps `[C, 1, 1]` where
    /// `global_avg_pool` gives `[C]`; `Unsqueeze` adds some). Only reshaping ops (`Flatten`,
    /// `Reshape`, `Squeeze`, `Unsqueeze`, `ReduceMean`) accept a tensor whose view differs.
    pub view: Vec<usize>,
}

/// A parameter found while converting: its PyTorch name, shape and values (absent when
/// the model's weights are stored outside the file that was read).
#[derive(Debug, Clone)]
pub(super) struct Param {
    pub torch_name: String,
    pub pdg_name: String,
    pub shape: Vec<usize>,
    pub data: Option<Vec<f32>>,
}

pub(super) struct Converter<'a> {
    pub path: &'a str,
    pub nodes: &'a [NodeProto],
    pub opset: i64,
    pub consts: HashMap<String, Const>,
    pub acts: HashMap<String, Act>,
    /// Outputs of `Shape` nodes: the value whose shape they hold.
    shape_of: HashMap<String, String>,
    consumers: HashMap<String, Vec<usize>>,
    used: Vec<bool>,
    pub lines: Vec<String>,
    pub params: Vec<Param>,
    layers: HashSet<String>,
    /// Variable names that are taken (the inputs').
    pub reserved: HashSet<String>,
    next: usize,
}

/// `3` when every axis has the same size, else `(3, 2)`.
fn sizes(v: &[usize]) -> String {
    if v.iter().all(|&x| x == v[0]) {
        return v[0].to_string();
    }
    format!("({})", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "))
}

/// Padding as `.pdg` writes it: a size when symmetric, else `((lo, hi), ...)`.
fn pads_text(lo: &[usize], hi: &[usize]) -> String {
    if lo == hi {
        return sizes(lo);
    }
    let pairs: Vec<String> = lo.iter().zip(hi).map(|(l, h)| format!("({l}, {h})")).collect();
    if pairs.len() == 1 {
        format!("({},)", pairs[0])
    } else {
        format!("({})", pairs.join(", "))
    }
}

/// An f32 attribute as `.pdg` source: the shortest text that reads back as the same f32.
fn float_text(x: f32) -> String {
    let s = format!("{x:?}");
    if s.contains('.') || s.contains('e') {
        s
    } else {
        format!("{s}.0")
    }
}

/// A `, eps=...` argument unless `eps` is PyTorch's default 1e-5.
fn eps_arg(eps: f32, keyword: bool) -> String {
    if (eps as f64 - 1e-5).abs() < 1e-12 {
        String::new()
    } else if keyword {
        format!(", eps={}", float_text(eps))
    } else {
        format!(", {}", float_text(eps))
    }
}

/// The PyTorch module path a node came from, as the exporter recorded it: the dynamo
/// exporter's `pkg.torch.onnx.name_scopes` metadata (`['', 'layer1', 'layer1.0', 'layer1.0.gn1',
/// 'group_norm']`), or the TorchScript exporter's node name (`/layer1/layer1.0/gn1/Mul`).
fn scope(node: &NodeProto) -> Option<String> {
    if let Some(p) = node.metadata_props.iter().find(|p| p.key() == "pkg.torch.onnx.name_scopes") {
        let items: Vec<&str> = p.value().split('\'').skip(1).step_by(2).collect();
        if items.len() >= 2 {
            let path = items[items.len() - 2];
            return (!path.is_empty()).then(|| path.to_string());
        }
        return None;
    }
    let name = node.name();
    if !name.starts_with('/') {
        return None;
    }
    let segments: Vec<&str> = name.split('/').filter(|s| !s.is_empty()).collect();
    let mut path = String::new();
    for seg in &segments[..segments.len().saturating_sub(1)] {
        if path.is_empty() || seg.starts_with(&format!("{path}.")) {
            path = seg.to_string();
        } else {
            path = format!("{path}.{seg}");
        }
    }
    (!path.is_empty()).then_some(path)
}

impl<'a> Converter<'a> {
    pub fn new(path: &'a str, nodes: &'a [NodeProto], opset: i64, consts: HashMap<String, Const>) -> Self {
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        // Exporters may place a `Shape` after the nodes that read it in a pattern.
        let shape_of = nodes
            .iter()
            .filter(|n| n.op_type() == "Shape" && n.attribute.iter().all(|a| a.name() == "start" && a.i() == 0))
            .filter_map(|n| Some((n.output.first()?.clone(), n.input.first()?.clone())))
            .collect();
        for (i, n) in nodes.iter().enumerate() {
            for input in n.input.iter().filter(|s| !s.is_empty()) {
                consumers.entry(input.clone()).or_default().push(i);
            }
        }
        Converter {
            path,
            nodes,
            opset,
            consts,
            acts: HashMap::new(),
            shape_of,
            consumers,
            used: vec![false; nodes.len()],
            lines: Vec::new(),
            params: Vec::new(),
            layers: HashSet::new(),
            reserved: HashSet::new(),
            next: 1,
        }
    }

    fn node_label(&self, node: &NodeProto) -> String {
        if node.name().is_empty() {
            let i = self.nodes.iter().position(|n| std::ptr::eq(n, node)).unwrap_or(0);
            format!("#{i}")
        } else {
            node.name().to_string()
        }
    }

    fn unsupported(&self, node: &NodeProto, message: impl Into<String>, help: impl Into<String>) -> ImportError {
        ImportError::Unsupported {
            path: self.path.to_string(),
            node: self.node_label(node),
            op_type: node.op_type().to_string(),
            message: message.into(),
            help: help.into(),
        }
    }

    fn unsupported_op(&self, node: &NodeProto, help: impl Into<String>) -> ImportError {
        ImportError::UnsupportedOp {
            path: self.path.to_string(),
            node: self.node_label(node),
            op_type: node.op_type().to_string(),
            help: help.into(),
        }
    }

    /// The activation read by input `i` of `node`.
    fn act(&self, node: &NodeProto, i: usize) -> Result<Act, ImportError> {
        let name = node.input.get(i).map(String::as_str).unwrap_or("");
        if let Some(a) = self.acts.get(name) {
            return Ok(a.clone());
        }
        if self.consts.contains_key(name) {
            return Err(self.unsupported(
                node,
                format!("input {i} (`{name}`) is a constant, where pdgc expects a tensor computed from the model's input"),
                "pdgc imports layers whose data input comes from the network's input; fold constant subgraphs away before exporting",
            ));
        }
        Err(self.unsupported(
            node,
            format!("input {i} (`{name}`) is not computed by any node pdgc imported"),
            "the graph reads a value pdgc does not know; is the file complete?",
        ))
    }

    /// The constant (initializer or `Constant` node) read by input `i` of `node`, if given.
    fn konst(&self, node: &NodeProto, i: usize, what: &str) -> Result<Option<&Const>, ImportError> {
        let name = node.input.get(i).map(String::as_str).unwrap_or("");
        if name.is_empty() {
            return Ok(None);
        }
        match self.consts.get(name) {
            Some(c) => Ok(Some(c)),
            None => Err(self.unsupported(
                node,
                format!("{what} (`{name}`) is computed at run time, not a constant"),
                "pdgc imports layers whose weights are initializers; export the model with export_params=True",
            )),
        }
    }

    fn required_konst(&self, node: &NodeProto, i: usize, what: &str) -> Result<&Const, ImportError> {
        self.konst(node, i, what)?
            .ok_or_else(|| self.unsupported(node, format!("{what} is missing"), "the node lacks a required input"))
    }

    fn fresh_var(&mut self) -> String {
        loop {
            let v = format!("h{}", self.next);
            self.next += 1;
            if !self.reserved.contains(&v) {
                return v;
            }
        }
    }

    /// Adds the statement `var = expr;` for output `out` of a node.
    fn emit(&mut self, out: &str, expr: String, shape: Vec<usize>, view: Vec<usize>) {
        let var = self.fresh_var();
        self.lines.push(format!("{var} = {expr};"));
        self.acts.insert(out.to_string(), Act { var, shape, view });
    }

    /// Output `out` is the same tensor as `a` (no statement).
    fn alias(&mut self, out: &str, a: Act) {
        self.acts.insert(out.to_string(), a);
    }

    /// The nodes reading `value`.
    fn readers(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The single node reading `value`, if exactly one does and it has op type `op`.
    fn only_reader(&self, value: &str, op: &str) -> Option<usize> {
        match self.readers(value) {
            [j] if !self.used[*j] && self.nodes[*j].op_type() == op => Some(*j),
            _ => None,
        }
    }

    /// The layer name of a node with parameters: the PyTorch module path from the weight's
    /// or the bias's `state_dict` name (`features.0.weight`), else from the exporter's scope
    /// of the node, else `{fallback}{k}`.
    fn layer_name(
        &mut self,
        node: &NodeProto,
        weight: Option<&Const>,
        bias: Option<&Const>,
        fallback: &str,
    ) -> Result<String, ImportError> {
        let from_params = weight
            .and_then(|w| w.name.strip_suffix(".weight"))
            .or_else(|| bias.and_then(|b| b.name.strip_suffix(".bias")))
            .map(str::to_string);
        let candidate = from_params.clone().or_else(|| scope(node));
        let name = match candidate {
            Some(path) => match encode(&path) {
                Ok(name) => Some(name),
                Err(why) if from_params.is_some() => {
                    return Err(ImportError::Model {
                        path: self.path.to_string(),
                        message: format!(
                            "node `{}`: the module name `{path}` cannot be a .pdg layer name: {why}; rename the module in PyTorch",
                            self.node_label(node)
                        ),
                    })
                }
                Err(_) => None,
            },
            None => None,
        };
        let name = match name {
            Some(n) => n,
            None => (1..).map(|k| format!("{fallback}{k}")).find(|n| !self.layers.contains(n)).expect("unbounded"),
        };
        if !self.layers.insert(name.clone()) {
            return Err(self.unsupported(
                node,
                format!("the layer `{}` is used a second time (shared weights)", decode(&name)),
                "each .pdg layer has its own parameters; export a model that does not reuse a module",
            ));
        }
        Ok(name)
    }

    fn param(&mut self, layer: &str, suffix: &str, shape: Vec<usize>, data: Option<Vec<f32>>) {
        self.params.push(Param {
            torch_name: format!("{}.{suffix}", decode(layer)),
            pdg_name: format!("{layer}.{suffix}"),
            shape,
            data,
        });
    }

    /// Converts every node, in order.
    pub fn run(&mut self) -> Result<(), ImportError> {
        // Constants have no inputs: read them all first, since a pattern may look ahead at a
        // node whose constant comes later in the file.
        for i in 0..self.nodes.len() {
            if self.nodes[i].op_type() == "Constant" && matches!(self.nodes[i].domain(), "" | "ai.onnx") {
                self.used[i] = true;
                self.constant(&self.nodes[i])?;
            }
        }
        for i in 0..self.nodes.len() {
            if self.used[i] {
                continue;
            }
            self.used[i] = true;
            let node = &self.nodes[i];
            if !matches!(node.domain(), "" | "ai.onnx") {
                return Err(self.unsupported_op(
                    node,
                    format!("the op comes from the domain `{}`; pdgc imports only standard ONNX ops", node.domain()),
                ));
            }
            self.node(node)?;
        }
        Ok(())
    }

    fn node(&mut self, node: &'a NodeProto) -> Result<(), ImportError> {
        let out = node.output.first().cloned().unwrap_or_default();
        match node.op_type() {
            "Constant" => self.constant(node),
            "Identity" | "Dropout" => {
                let a = self.act(node, 0)?;
                self.alias(&out, a);
                Ok(())
            }
            // Read by the patterns that use it (see `Converter::new`).
            "Shape" => Ok(()),
            "Conv" => self.conv(node),
            "Gemm" => self.gemm(node),
            "MatMul" => self.matmul(node),
            "Relu" | "Tanh" | "Sigmoid" => {
                let a = self.act(node, 0)?;
                let f = node.op_type().to_lowercase();
                self.emit(&out, format!("{f}({})", a.var), a.shape, a.view);
                Ok(())
            }
            "Gelu" => {
                let approx = attr_string(node, "approximate").unwrap_or_else(|| "none".into());
                if approx != "none" {
                    return Err(self.unsupported(
                        node,
                        format!("GELU with approximate=\"{approx}\""),
                        "pdgc's gelu is the exact erf form: use nn.GELU() without approximate='tanh'",
                    ));
                }
                let a = self.act(node, 0)?;
                self.emit(&out, format!("gelu({})", a.var), a.shape, a.view);
                Ok(())
            }
            "LeakyRelu" => {
                let a = self.act(node, 0)?;
                let slope = attr_float(node, "alpha").unwrap_or(0.01);
                let arg = if slope == 0.01 { String::new() } else { format!(", slope={}", float_text(slope)) };
                self.emit(&out, format!("leaky_relu({}{arg})", a.var), a.shape, a.view);
                Ok(())
            }
            "Div" => self.erf_gelu(node),
            "MaxPool" | "AveragePool" => self.pool(node),
            "GlobalAveragePool" => {
                let a = self.act(node, 0)?;
                if a.shape.len() < 2 || a.view != a.shape {
                    return Err(self.unsupported(node, "the input is not [C, ...] per example", "pool a feature map"));
                }
                let mut view = vec![1; a.shape.len()];
                view[0] = a.shape[0];
                self.emit(&out, format!("global_avg_pool({})", a.var), vec![a.shape[0]], view);
                Ok(())
            }
            "ReduceMean" => self.reduce_mean(node),
            "Squeeze" | "Unsqueeze" => self.squeeze(node),
            "Flatten" => {
                let a = self.act(node, 0)?;
                let axis = attr_int(node, "axis").unwrap_or(1);
                let rank = a.view.len() + 1;
                if axis != 1 && axis != 1 - rank as i64 {
                    return Err(self.unsupported(
                        node,
                        format!("Flatten with axis={axis}"),
                        "pdgc flattens each example: use torch.flatten(x, 1) (axis 1)",
                    ));
                }
                self.flatten(&out, a);
                Ok(())
            }
            "Reshape" => self.reshape(node),
            "GroupNormalization" => self.group_norm_op(node),
            "InstanceNormalization" => self.instance_norm(node),
            "LayerNormalization" => self.layer_norm(node),
            "Add" => {
                let (a, b) = (self.act(node, 0)?, self.act(node, 1)?);
                if a.shape != b.shape || a.view != b.view {
                    return Err(self.unsupported(
                        node,
                        format!("adds tensors of shapes {:?} and {:?} (broadcasting)", a.shape, b.shape),
                        "pdgc adds tensors of equal shapes (residual connections)",
                    ));
                }
                self.emit(&out, format!("{} + {}", a.var, b.var), a.shape, a.view);
                Ok(())
            }
            "BatchNormalization" => {
                let (_, why, fix) =
                    crate::ops::REJECTED.iter().find(|(n, _, _)| *n == "batch_norm").expect("batch_norm is rejected");
                Err(self.unsupported_op(node, format!("{why}; {fix} (nn.GroupNorm in PyTorch)")))
            }
            "Softmax" | "LogSoftmax" => Err(self.unsupported_op(
                node,
                "export the logits: pdgc's loss cross_entropy applies the softmax itself, so remove the final softmax from the model you export",
            )),
            _ => Err(self.unsupported_op(node, SUPPORTED_HELP)),
        }
    }

    fn constant(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let out = node.output.first().cloned().unwrap_or_default();
        let c = if let Some(t) = super::proto::attr(node, "value").and_then(|a| a.t.as_ref()) {
            super::proto::read_tensor(t, None).map_err(|m| self.unsupported(node, m, "a damaged constant"))?
        } else if let Some(v) = attr_ints(node, "value_ints") {
            Const { name: out.clone(), dims: vec![v.len()], data: super::proto::Data::I64(v) }
        } else if let Some(v) = attr_int(node, "value_int") {
            Const { name: out.clone(), dims: vec![], data: super::proto::Data::I64(vec![v]) }
        } else if let Some(v) = attr_float(node, "value_float") {
            Const { name: out.clone(), dims: vec![], data: super::proto::Data::F32(vec![v]) }
        } else {
            return Err(self.unsupported(node, "a Constant of a kind pdgc does not read", SUPPORTED_HELP));
        };
        self.consts.insert(out.clone(), Const { name: out, ..c });
        Ok(())
    }

    /// The axes of a reduce or (un)squeeze: input 1 (a constant) or the `axes` attribute
    /// (before opset 13/18), normalized to a rank of `rank` (batch included).
    fn axes(&self, node: &NodeProto, rank: usize) -> Result<Option<Vec<usize>>, ImportError> {
        let axes = match node.input.get(1).filter(|s| !s.is_empty()) {
            Some(name) => match self.consts.get(name).and_then(|c| c.i64()) {
                Some(v) => Some(v.to_vec()),
                None => return Err(self.unsupported(node, "axes computed at run time", "use constant axes")),
            },
            None => attr_ints(node, "axes"),
        };
        let Some(axes) = axes else { return Ok(None) };
        let mut out = Vec::new();
        for a in axes {
            let n = if a < 0 { a + rank as i64 } else { a };
            if n < 1 || n >= rank as i64 {
                return Err(self.unsupported(
                    node,
                    format!("axis {a} of a rank-{rank} tensor"),
                    "pdgc works on each example: the batch axis (0) stays as it is",
                ));
            }
            out.push(n as usize - 1);
        }
        out.sort_unstable();
        out.dedup();
        Ok(Some(out))
    }

    /// `ReduceMean` over every axis but the channels: a global average pool.
    fn reduce_mean(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let a = self.act(node, 0)?;
        let rank = a.view.len() + 1;
        let axes = self.axes(node, rank)?.unwrap_or_else(|| (0..a.view.len()).collect());
        let keep = attr_int(node, "keepdims").unwrap_or(1) != 0;
        let spatial: Vec<usize> = (1..a.view.len()).collect();
        if axes != spatial || a.shape.len() < 2 || a.shape[0] != a.view[0] {
            return Err(self.unsupported(
                node,
                format!("a mean over axes {axes:?} of a {:?} tensor per example", a.view),
                "pdgc's mean is a global average pool over every axis but the channels (adaptive_avg_pool to 1)",
            ));
        }
        let c = a.shape[0];
        let view = if keep { [vec![c], vec![1; a.view.len() - 1]].concat() } else { vec![c] };
        let out = node.output[0].clone();
        self.emit(&out, format!("global_avg_pool({})", a.var), vec![c], view);
        Ok(())
    }

    /// `Squeeze` and `Unsqueeze` remove and insert size-1 dims: the same tensor, another view.
    fn squeeze(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let a = self.act(node, 0)?;
        let unsqueeze = node.op_type() == "Unsqueeze";
        let rank =
            a.view.len() + 1 + if unsqueeze { self.axes(node, usize::MAX / 2)?.map_or(0, |v| v.len()) } else { 0 };
        let axes = self.axes(node, rank)?;
        let mut view = a.view.clone();
        if unsqueeze {
            for &ax in axes.as_deref().unwrap_or(&[]) {
                if ax > view.len() {
                    return Err(self.unsupported(node, format!("axis {ax}"), "a malformed Unsqueeze"));
                }
                view.insert(ax, 1);
            }
        } else {
            let axes = axes.unwrap_or_else(|| (0..view.len()).filter(|&i| view[i] == 1).collect());
            if axes.iter().any(|&ax| view.get(ax) != Some(&1)) {
                return Err(self.unsupported(node, format!("squeezing axes {axes:?} of {view:?}"), "only size-1 axes"));
            }
            view = view.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, &d)| d).collect();
        }
        let out = node.output[0].clone();
        self.alias(&out, Act { view, ..a });
        Ok(())
    }

    fn flatten(&mut self, out: &str, a: Act) {
        if a.shape.len() == 1 {
            self.alias(out, Act { view: a.shape.clone(), ..a });
        } else {
            let n: usize = a.shape.iter().product();
            self.emit(out, format!("flatten({})", a.var), vec![n], vec![n]);
        }
    }

    /// The spatial input of a conv or pool: `[C, L]` or `[C, H, W]` per example.
    fn spatial_input(&self, node: &NodeProto) -> Result<Act, ImportError> {
        let a = self.act(node, 0)?;
        if !(2..=3).contains(&a.shape.len()) || a.view != a.shape {
            return Err(self.unsupported(
                node,
                format!("a {}-D input per example", a.view.len()),
                "pdgc has 1-D and 2-D convolutions and pools ([C, L] or [C, H, W] per example)",
            ));
        }
        Ok(a)
    }

    /// An `ints` attribute with one entry per spatial axis, or `default` on every axis.
    fn per_axis(
        &self,
        node: &NodeProto,
        name: &str,
        spatial: usize,
        default: usize,
    ) -> Result<Vec<usize>, ImportError> {
        match attr_ints(node, name) {
            None => Ok(vec![default; spatial]),
            Some(v) if v.len() == spatial && v.iter().all(|&x| x >= 1) => Ok(v.iter().map(|&x| x as usize).collect()),
            Some(v) => Err(self.unsupported(
                node,
                format!("`{name}` = {v:?} (expected {spatial} positive values)"),
                "a malformed or unusual convolution or pool",
            )),
        }
    }

    /// Per-side padding from `pads` or `auto_pad`.
    fn pads(
        &self,
        node: &NodeProto,
        input: &[usize],
        kernel: &[usize],
        stride: &[usize],
        dilation: &[usize],
    ) -> Result<(Vec<usize>, Vec<usize>), ImportError> {
        let spatial = kernel.len();
        let auto = attr_string(node, "auto_pad").unwrap_or_default();
        match auto.as_str() {
            "" | "NOTSET" => match attr_ints(node, "pads") {
                None => Ok((vec![0; spatial], vec![0; spatial])),
                Some(p) if p.len() == 2 * spatial && p.iter().all(|&x| x >= 0) => {
                    let p: Vec<usize> = p.iter().map(|&x| x as usize).collect();
                    Ok((p[..spatial].to_vec(), p[spatial..].to_vec()))
                }
                Some(p) => Err(self.unsupported(
                    node,
                    format!("`pads` = {p:?} (expected {} non-negative values)", 2 * spatial),
                    "negative padding (cropping) is not supported",
                )),
            },
            "VALID" => Ok((vec![0; spatial], vec![0; spatial])),
            "SAME_UPPER" | "SAME_LOWER" => {
                let mut lo = Vec::new();
                let mut hi = Vec::new();
                for a in 0..spatial {
                    let out = input[a].div_ceil(stride[a]);
                    let need = (out - 1) * stride[a] + (kernel[a] - 1) * dilation[a] + 1;
                    let total = need.saturating_sub(input[a]);
                    let small = total / 2;
                    let (l, h) = if auto == "SAME_UPPER" { (small, total - small) } else { (total - small, small) };
                    lo.push(l);
                    hi.push(h);
                }
                Ok((lo, hi))
            }
            other => Err(self.unsupported(node, format!("auto_pad=\"{other}\""), "an unknown auto_pad mode")),
        }
    }

    /// Output sizes of a sliding window.
    fn window_out(
        &self,
        node: &NodeProto,
        input: &[usize],
        kernel: &[usize],
        stride: &[usize],
        (lo, hi): (&[usize], &[usize]),
        dilation: &[usize],
    ) -> Result<Vec<usize>, ImportError> {
        (0..kernel.len())
            .map(|a| {
                let padded = input[a] + lo[a] + hi[a];
                let extent = dilation[a] * (kernel[a] - 1) + 1;
                if extent > padded {
                    Err(self.unsupported(
                        node,
                        format!("the window ({extent}) is larger than the padded input ({padded}) on axis {a}"),
                        "the output would be empty",
                    ))
                } else {
                    Ok((padded - extent) / stride[a] + 1)
                }
            })
            .collect()
    }

    fn conv(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let x = self.spatial_input(node)?;
        let spatial = x.shape.len() - 1;
        let w = self.required_konst(node, 1, "the weight")?.clone();
        let b = self.konst(node, 2, "the bias")?.cloned();
        let group = attr_int(node, "group").unwrap_or(1);
        if w.dims.len() != spatial + 2 || group < 1 {
            return Err(self.unsupported(
                node,
                format!("a weight of shape {:?} for a {spatial}-D convolution", w.dims),
                "a malformed convolution",
            ));
        }
        let group = group as usize;
        let out_ch = w.dims[0];
        if w.dims[1] * group != x.shape[0] {
            return Err(self.unsupported(
                node,
                format!("the weight {:?} with group={group} does not fit {} input channels", w.dims, x.shape[0]),
                "a malformed convolution",
            ));
        }
        let kernel = w.dims[2..].to_vec();
        if let Some(k) = attr_ints(node, "kernel_shape") {
            if k.iter().map(|&v| v as usize).collect::<Vec<_>>() != kernel {
                return Err(self.unsupported(
                    node,
                    format!("kernel_shape {k:?} disagrees with the weight {:?}", w.dims),
                    "a malformed convolution",
                ));
            }
        }
        let stride = self.per_axis(node, "strides", spatial, 1)?;
        let dilation = self.per_axis(node, "dilations", spatial, 1)?;
        let (lo, hi) = self.pads(node, &x.shape[1..], &kernel, &stride, &dilation)?;
        let out_sp = self.window_out(node, &x.shape[1..], &kernel, &stride, (&lo, &hi), &dilation)?;
        if let Some(b) = &b {
            if b.numel() != out_ch {
                return Err(self.unsupported(node, format!("a bias of shape {:?}", b.dims), "a malformed convolution"));
            }
        }
        let layer = self.layer_name(node, Some(&w), b.as_ref(), "conv")?;
        let mut args = format!("{}, {out_ch}, kernel={}", x.var, sizes(&kernel));
        if stride.iter().any(|&s| s != 1) {
            args += &format!(", stride={}", sizes(&stride));
        }
        if lo.iter().chain(&hi).any(|&p| p != 0) {
            args += &format!(", padding={}", pads_text(&lo, &hi));
        }
        if dilation.iter().any(|&d| d != 1) {
            args += &format!(", dilation={}", sizes(&dilation));
        }
        if group != 1 {
            args += &format!(", groups={group}");
        }
        if b.is_none() {
            args += ", bias=false";
        }
        self.param(&layer, "weight", w.dims.clone(), w.f32().map(<[f32]>::to_vec));
        if let Some(b) = &b {
            self.param(&layer, "bias", vec![out_ch], b.f32().map(<[f32]>::to_vec));
        }
        let mut shape = vec![out_ch];
        shape.extend(out_sp);
        let out = node.output[0].clone();
        self.emit(&out, format!("{layer}: conv{spatial}d({args})"), shape.clone(), shape);
        Ok(())
    }

    fn linear(
        &mut self,
        node: &NodeProto,
        x: Act,
        weight: (&Const, Option<Vec<f32>>),
        bias: Option<&Const>,
        out: &str,
    ) -> Result<(), ImportError> {
        let (w, data) = weight;
        let out_f = w.dims[0];
        let in_f = *x.shape.last().expect("rank >= 1");
        if x.view != x.shape {
            return Err(self.unsupported(node, "a pooled tensor used before flattening", "flatten it first"));
        }
        if let Some(b) = bias {
            if b.numel() != out_f {
                return Err(self.unsupported(
                    node,
                    format!("a bias of shape {:?}", b.dims),
                    "a malformed linear layer",
                ));
            }
        }
        let layer = self.layer_name(node, Some(w), bias, "fc")?;
        self.param(&layer, "weight", vec![out_f, in_f], data);
        if let Some(b) = bias {
            self.param(&layer, "bias", vec![out_f], b.f32().map(<[f32]>::to_vec));
        }
        let arg = if bias.is_none() { ", bias=false" } else { "" };
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("rank >= 1") = out_f;
        self.emit(out, format!("{layer}: linear({}, {out_f}{arg})", x.var), shape.clone(), shape);
        Ok(())
    }

    fn gemm(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let x = self.act(node, 0)?;
        let w = self.required_konst(node, 1, "the weight")?.clone();
        let c = self.konst(node, 2, "the bias")?.cloned();
        let alpha = attr_float(node, "alpha").unwrap_or(1.0);
        let beta = attr_float(node, "beta").unwrap_or(1.0);
        let trans_a = attr_int(node, "transA").unwrap_or(0);
        let trans_b = attr_int(node, "transB").unwrap_or(0);
        if alpha != 1.0 || (beta != 1.0 && c.is_some()) || trans_a != 0 {
            return Err(self.unsupported(
                node,
                format!("Gemm with alpha={alpha}, beta={beta}, transA={trans_a}"),
                "pdgc imports Gemm as nn.Linear exports it (alpha = beta = 1, transA = 0)",
            ));
        }
        if w.dims.len() != 2 || x.shape.len() != 1 {
            return Err(self.unsupported(
                node,
                format!("Gemm of a {:?} input and a {:?} weight", x.shape, w.dims),
                "a linear layer on a flattened input",
            ));
        }
        let (w, data) = if trans_b == 1 { (w.clone(), w.f32().map(<[f32]>::to_vec)) } else { transposed(&w) };
        if w.dims[1] != x.shape[0] {
            return Err(self.unsupported(
                node,
                format!("a weight {:?} for {} input features", w.dims, x.shape[0]),
                "a malformed linear layer",
            ));
        }
        let out = node.output[0].clone();
        self.linear(node, x, (&w, data), c.as_ref(), &out)
    }

    /// MatMul by a constant `[in, out]`, with the following Add of a constant `[out]` folded
    /// in as the bias.
    fn matmul(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let x = self.act(node, 0)?;
        let w = self.required_konst(node, 1, "the weight")?.clone();
        if w.dims.len() != 2 || x.shape.last() != Some(&w.dims[0]) {
            return Err(self.unsupported(
                node,
                format!("MatMul of a {:?} input by a {:?} constant", x.shape, w.dims),
                "pdgc imports MatMul by a 2-D constant [in, out] (a linear layer)",
            ));
        }
        let (wt, data) = transposed(&w);
        let mut out = node.output[0].clone();
        let mut bias = None;
        if let Some(j) = self.only_reader(&out, "Add") {
            let add = &self.nodes[j];
            let other = add.input.iter().find(|s| **s != out).cloned().unwrap_or_default();
            if let Some(b) = self.consts.get(&other) {
                if b.numel() == wt.dims[0] && b.dims.iter().rev().skip(1).all(|&d| d == 1) {
                    bias = Some(b.clone());
                    self.used[j] = true;
                    out = add.output[0].clone();
                }
            }
        }
        // The weight's name is the transposed constant's; the bias's names the layer.
        let named = Const { name: if w.name.ends_with(".weight") { w.name.clone() } else { String::new() }, ..wt };
        self.linear(node, x, (&named, data), bias.as_ref(), &out)
    }

    /// The erf form of GELU as the TorchScript exporter writes it before opset 20:
    /// `Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5)`.
    fn erf_gelu(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let not_gelu = || self.unsupported_op(node, SUPPORTED_HELP);
        let x_name = node.input.first().cloned().unwrap_or_default();
        let sqrt2 = node.input.get(1).and_then(|n| self.consts.get(n)).and_then(|c| c.f32().map(<[f32]>::to_vec));
        if !matches!(sqrt2.as_deref(), Some([v]) if (v - std::f32::consts::SQRT_2).abs() < 1e-6) {
            return Err(not_gelu());
        }
        let is_const = |c: &Converter, name: &str, value: f32| {
            c.consts.get(name).and_then(|c| c.f32().map(<[f32]>::to_vec)).is_some_and(|v| v == [value])
        };
        let other = |n: &NodeProto, known: &str| n.input.iter().find(|s| *s != known).cloned().unwrap_or_default();
        let chain = (|| {
            let erf = self.only_reader(&node.output[0], "Erf")?;
            let add = self.only_reader(&self.nodes[erf].output[0], "Add")?;
            if !is_const(self, &other(&self.nodes[add], &self.nodes[erf].output[0]), 1.0) {
                return None;
            }
            let mul = self.only_reader(&self.nodes[add].output[0], "Mul")?;
            if other(&self.nodes[mul], &self.nodes[add].output[0]) != x_name {
                return None;
            }
            let half = self.only_reader(&self.nodes[mul].output[0], "Mul")?;
            if !is_const(self, &other(&self.nodes[half], &self.nodes[mul].output[0]), 0.5) {
                return None;
            }
            Some([erf, add, mul, half])
        })();
        let Some(chain) = chain else { return Err(not_gelu()) };
        let x = self.act(node, 0)?;
        for j in chain {
            self.used[j] = true;
        }
        let out = self.nodes[chain[3]].output[0].clone();
        self.emit(&out, format!("gelu({})", x.var), x.shape, x.view);
        Ok(())
    }

    fn pool(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let x = self.spatial_input(node)?;
        let spatial = x.shape.len() - 1;
        let max = node.op_type() == "MaxPool";
        let kernel = match attr_ints(node, "kernel_shape") {
            Some(k) if k.len() == spatial && k.iter().all(|&v| v >= 1) => k.iter().map(|&v| v as usize).collect(),
            k => {
                return Err(self.unsupported(
                    node,
                    format!("kernel_shape {k:?}"),
                    "a pool needs one positive kernel size per axis",
                ))
            }
        };
        let kernel: Vec<usize> = kernel;
        let stride = self.per_axis(node, "strides", spatial, 1)?;
        let dilation = self.per_axis(node, "dilations", spatial, 1)?;
        if dilation.iter().any(|&d| d != 1) {
            return Err(self.unsupported(node, "a dilated pool", "pdgc's pools have no dilation"));
        }
        if attr_int(node, "ceil_mode").unwrap_or(0) != 0 {
            return Err(self.unsupported(
                node,
                "ceil_mode=1",
                "export the pool with ceil_mode=False (PyTorch's default)",
            ));
        }
        if max && node.output.get(1).is_some_and(|o| !o.is_empty() && !self.readers(o).is_empty()) {
            return Err(self.unsupported(
                node,
                "the indices output is used",
                "pdgc's max pool returns only the values",
            ));
        }
        let (lo, hi) = self.pads(node, &x.shape[1..], &kernel, &stride, &dilation)?;
        let padded = lo.iter().chain(&hi).any(|&p| p != 0);
        if !max && padded && attr_int(node, "count_include_pad").unwrap_or(0) == 0 {
            return Err(self.unsupported(
                node,
                "padding with count_include_pad=0",
                "pdgc's average pool counts the padding, as PyTorch's default count_include_pad=True does: export it with count_include_pad=True",
            ));
        }
        let out_sp = self.window_out(node, &x.shape[1..], &kernel, &stride, (&lo, &hi), &dilation)?;
        let mut args = format!("{}, kernel={}", x.var, sizes(&kernel));
        if stride != kernel {
            args += &format!(", stride={}", sizes(&stride));
        }
        if padded {
            args += &format!(", padding={}", pads_text(&lo, &hi));
        }
        let op = if max { "maxpool" } else { "avgpool" };
        let mut shape = vec![x.shape[0]];
        shape.extend(out_sp);
        let out = node.output[0].clone();
        self.emit(&out, format!("{op}{spatial}d({args})"), shape.clone(), shape);
        Ok(())
    }

    fn reshape(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        if self.group_norm_pattern(node)? {
            return Ok(());
        }
        let x = self.act(node, 0)?;
        let target = node.input.get(1).and_then(|n| self.consts.get(n)).and_then(|c| c.i64().map(<[i64]>::to_vec));
        let n = x.shape.iter().product::<usize>() as i64;
        let flat = match target.as_deref() {
            Some([b, m]) => *m == n || (*m == -1 && *b != -1),
            _ => false,
        };
        if !flat {
            return Err(self.unsupported(
                node,
                match target {
                    Some(t) => format!("a reshape to {t:?} of a {:?} input", x.shape),
                    None => "a reshape to a shape computed at run time".into(),
                },
                format!("pdgc imports only reshapes to [batch, {n}] (a flatten): use torch.flatten(x, 1)"),
            ));
        }
        let out = node.output[0].clone();
        self.flatten(&out, x);
        Ok(())
    }

    /// PyTorch's group norm as both exporters write it: `Reshape(x, [0, G, -1])`, an
    /// `InstanceNormalization` with unit scale and zero bias, `Reshape` back to `Shape(x)`,
    /// then (with affine parameters) `Mul` by the weight `[C, 1, ...]` and `Add` of the bias.
    fn group_norm_pattern(&mut self, node: &NodeProto) -> Result<bool, ImportError> {
        let Some(x) = node.input.first().and_then(|n| self.acts.get(n)).cloned() else {
            return Ok(false);
        };
        let target = node.input.get(1).and_then(|n| self.consts.get(n)).and_then(|c| c.i64().map(<[i64]>::to_vec));
        let Some(&[_, g, -1]) = target.as_deref() else {
            return Ok(false);
        };
        if g < 1 || x.view != x.shape || x.shape.len() < 2 || x.shape[0] % g as usize != 0 {
            return Ok(false);
        }
        let g = g as usize;
        let channels = x.shape[0];
        let x_name = node.input[0].clone();
        let found = (|| {
            let inorm = self.only_reader(&node.output[0], "InstanceNormalization")?;
            let n = &self.nodes[inorm];
            let unit =
                n.input.get(1).and_then(|s| self.consts.get(s)).is_some_and(|c| c.numel() == g && c.all_equal(1.0));
            let zero =
                n.input.get(2).and_then(|s| self.consts.get(s)).is_some_and(|c| c.numel() == g && c.all_equal(0.0));
            if !unit || !zero {
                return None;
            }
            let back = self.only_reader(&n.output[0], "Reshape")?;
            let shape_src = self.nodes[back].input.get(1)?;
            let full: Vec<i64> = std::iter::once(0).chain(x.shape.iter().map(|&d| d as i64)).collect();
            let same_shape = self.shape_of.get(shape_src) == Some(&x_name)
                || self
                    .consts
                    .get(shape_src)
                    .and_then(|c| c.i64())
                    .is_some_and(|v| v.len() == full.len() && v[1..] == full[1..]);
            if !same_shape {
                return None;
            }
            let eps = attr_float(n, "epsilon").unwrap_or(1e-5);
            let back_out = self.nodes[back].output[0].clone();
            let affine = self.only_reader(&back_out, "Mul").and_then(|mul| {
                let w = self.nodes[mul].input.iter().find(|s| **s != back_out)?;
                let w = self.consts.get(w).filter(|c| c.numel() == channels)?;
                let mul_out = &self.nodes[mul].output[0];
                let add = self.only_reader(mul_out, "Add")?;
                let b = self.nodes[add].input.iter().find(|s| *s != mul_out)?;
                let b = self.consts.get(b).filter(|c| c.numel() == channels)?;
                Some((mul, add, w.clone(), b.clone()))
            });
            Some((inorm, back, eps, affine))
        })();
        let Some((inorm, back, eps, affine)) = found else {
            return Ok(false);
        };
        for j in [inorm, back] {
            self.used[j] = true;
        }
        let (out, expr) = match affine {
            Some((mul, add, w, b)) => {
                self.used[mul] = true;
                self.used[add] = true;
                let mul_node = &self.nodes[mul];
                let layer = self.layer_name(mul_node, Some(&w), Some(&b), "gn")?;
                self.param(&layer, "weight", vec![channels], w.f32().map(<[f32]>::to_vec));
                self.param(&layer, "bias", vec![channels], b.f32().map(<[f32]>::to_vec));
                (
                    self.nodes[add].output[0].clone(),
                    format!("{layer}: group_norm({}, {g}{})", x.var, eps_arg(eps, false)),
                )
            }
            None => {
                let e =
                    if eps_arg(eps, true).is_empty() { String::new() } else { format!(", eps={}", float_text(eps)) };
                (self.nodes[back].output[0].clone(), format!("group_norm({}, {g}{e}, affine=false)", x.var))
            }
        };
        self.emit(&out, expr, x.shape.clone(), x.shape.clone());
        Ok(true)
    }

    fn norm_input(&self, node: &NodeProto) -> Result<Act, ImportError> {
        let a = self.act(node, 0)?;
        if a.shape.len() < 2 || a.view != a.shape {
            return Err(self.unsupported(
                node,
                format!("a {:?} input per example", a.shape),
                "normalize a [C, ...] tensor",
            ));
        }
        Ok(a)
    }

    fn group_norm_op(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let x = self.norm_input(node)?;
        let channels = x.shape[0];
        let g = attr_int(node, "num_groups").unwrap_or(0);
        let eps = attr_float(node, "epsilon").unwrap_or(1e-5);
        let scale = self.required_konst(node, 1, "the scale")?.clone();
        let bias = self.required_konst(node, 2, "the bias")?.clone();
        if g < 1 || channels % g as usize != 0 {
            return Err(self.unsupported(
                node,
                format!("num_groups={g} for {channels} channels"),
                "a malformed group norm",
            ));
        }
        let g = g as usize;
        if scale.numel() != channels || bias.numel() != channels {
            return Err(self.unsupported(
                node,
                format!("a per-group scale of shape {:?} (opset {})", scale.dims, self.opset),
                "GroupNormalization before opset 21 scales per group; export with opset 21 or newer (per-channel scale, as nn.GroupNorm)",
            ));
        }
        let layer = self.layer_name(node, Some(&scale), Some(&bias), "gn")?;
        self.param(&layer, "weight", vec![channels], scale.f32().map(<[f32]>::to_vec));
        self.param(&layer, "bias", vec![channels], bias.f32().map(<[f32]>::to_vec));
        let out = node.output[0].clone();
        self.emit(
            &out,
            format!("{layer}: group_norm({}, {g}{})", x.var, eps_arg(eps, false)),
            x.shape.clone(),
            x.shape,
        );
        Ok(())
    }

    /// Whether a norm's scale and bias are PyTorch parameters (a state_dict name, or values
    /// other than ones and zeros) rather than the constants of `affine=False`.
    fn affine(&self, scale: &Const, bias: Option<&Const>) -> bool {
        scale.name.ends_with(".weight")
            || bias.is_some_and(|b| b.name.ends_with(".bias"))
            || !scale.all_equal(1.0)
            || bias.is_some_and(|b| !b.all_equal(0.0))
    }

    fn instance_norm(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let x = self.norm_input(node)?;
        let channels = x.shape[0];
        let eps = attr_float(node, "epsilon").unwrap_or(1e-5);
        let scale = self.required_konst(node, 1, "the scale")?.clone();
        let bias = self.required_konst(node, 2, "the bias")?.clone();
        if scale.numel() != channels || bias.numel() != channels {
            return Err(self.unsupported(
                node,
                format!("a scale of shape {:?}", scale.dims),
                "a malformed instance norm",
            ));
        }
        let out = node.output[0].clone();
        if self.affine(&scale, Some(&bias)) {
            let layer = self.layer_name(node, Some(&scale), Some(&bias), "norm")?;
            self.param(&layer, "weight", vec![channels], scale.f32().map(<[f32]>::to_vec));
            self.param(&layer, "bias", vec![channels], bias.f32().map(<[f32]>::to_vec));
            self.emit(
                &out,
                format!("{layer}: instance_norm({}{}, affine=true)", x.var, eps_arg(eps, true)),
                x.shape.clone(),
                x.shape,
            );
        } else {
            self.emit(&out, format!("instance_norm({}{})", x.var, eps_arg(eps, true)), x.shape.clone(), x.shape);
        }
        Ok(())
    }

    fn layer_norm(&mut self, node: &NodeProto) -> Result<(), ImportError> {
        let x = self.act(node, 0)?;
        if x.view != x.shape {
            return Err(self.unsupported(node, "a pooled tensor before flattening", "flatten it first"));
        }
        let rank = x.shape.len() as i64 + 1;
        let axis = attr_int(node, "axis").unwrap_or(-1);
        let axis = if axis < 0 { axis + rank } else { axis };
        if axis < 1 || axis >= rank {
            return Err(self.unsupported(
                node,
                format!("normalizing from axis {axis} of a rank-{rank} tensor"),
                "pdgc normalizes each example over its last dims (axis ≥ 1)",
            ));
        }
        if node.output.iter().skip(1).any(|o| !o.is_empty() && !self.readers(o).is_empty()) {
            return Err(self.unsupported(node, "the mean or inverse-deviation output is used", "use only the output"));
        }
        let dims = (rank - axis) as usize;
        let normalized = x.shape[x.shape.len() - dims..].to_vec();
        let eps = attr_float(node, "epsilon").unwrap_or(1e-5);
        let scale = self.required_konst(node, 1, "the scale")?.clone();
        let bias = self.konst(node, 2, "the bias")?.cloned();
        let n: usize = normalized.iter().product();
        if scale.numel() != n || bias.as_ref().is_some_and(|b| b.numel() != n) {
            return Err(self.unsupported(node, format!("a scale of shape {:?}", scale.dims), "a malformed layer norm"));
        }
        let dims_arg = if dims == x.shape.len() { String::new() } else { format!(", dims={dims}") };
        let out = node.output[0].clone();
        if self.affine(&scale, bias.as_ref()) {
            let Some(bias) = bias else {
                return Err(self.unsupported(
                    node,
                    "a layer norm with a scale but no bias",
                    "pdgc's affine layer_norm has both weight and bias: use nn.LayerNorm(..., bias=True)",
                ));
            };
            let layer = self.layer_name(node, Some(&scale), Some(&bias), "ln")?;
            self.param(&layer, "weight", normalized.clone(), scale.f32().map(<[f32]>::to_vec));
            self.param(&layer, "bias", normalized, bias.f32().map(<[f32]>::to_vec));
            self.emit(
                &out,
                format!("{layer}: layer_norm({}{dims_arg}{})", x.var, eps_arg(eps, true)),
                x.shape.clone(),
                x.shape,
            );
        } else {
            self.emit(
                &out,
                format!("layer_norm({}{dims_arg}{}, affine=false)", x.var, eps_arg(eps, true)),
                x.shape.clone(),
                x.shape,
            );
        }
        Ok(())
    }
}

/// A 2-D constant transposed (`[in, out]` to PyTorch's `[out, in]`), with its values.
fn transposed(w: &Const) -> (Const, Option<Vec<f32>>) {
    let (r, c) = (w.dims[0], w.dims[1]);
    let data = w.f32().map(|v| (0..c).flat_map(|j| (0..r).map(move |i| v[i * c + j])).collect());
    (Const { name: w.name.clone(), dims: vec![c, r], data: super::proto::Data::Absent }, data)
}

/// The help for an op pdgc does not import.
pub const SUPPORTED_HELP: &str =
    "pdgc imports Conv, Gemm, MatMul (+ Add), Relu, Tanh, Sigmoid, Gelu (and its erf form), \
LeakyRelu, MaxPool, AveragePool, GlobalAveragePool, Flatten, Reshape to [batch, N], GroupNormalization, \
InstanceNormalization, LayerNormalization and Add; rewrite this part of the model with those layers";
