//! The abstract syntax tree of a `.pdg` file. Every node carries its byte [`Span`].
//!
//! The AST is exactly what was written: no names resolved, no defaults filled in, no
//! shapes. `check` turns it into the Graph IR. `Display` prints it back as source text, so
//! snapshots of the AST read like the file they came from (with explicit parentheses).

use std::fmt;

use crate::diag::Span;

#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub name: Ident,
    pub items: Vec<Item>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// `input x: [1, 28, 28];`
    Input { name: Ident, shape: Vec<Dim>, span: Span },
    /// `label y: classes(10);` or `label y: [4];`
    Label { name: Ident, kind: LabelKind, span: Span },
    /// `h = expr;`
    Bind { name: Ident, value: Expr, span: Span },
    /// `loss cross_entropy(logits, y);`
    Loss { call: Call, span: Span },
    /// `layer gated(x: [I], O) { ... }`: a layer written in index notation.
    Layer(LayerDef),
    /// A statement the parser could not read (already reported).
    Error { span: Span },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dim {
    pub value: i64,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LabelKind {
    /// `kind(count)`: normally `classes(10)`; the checker validates the keyword.
    Classes { kind: Ident, count: Dim },
    /// `[d, ...]`: a real-valued target.
    Target { shape: Vec<Dim> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    Name(Ident),
    Int(i64),
    Float(f64),
    Bool(bool),
    Tuple(Vec<Expr>),
    Call(Call),
    /// `a + b`, sugar for `add(a, b)`.
    Add(Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `@strategy(ghost)` and friends, written before a named layer.
    pub attrs: Vec<Attr>,
    /// `conv1` in `conv1: conv2d(...)`.
    pub layer: Option<Ident>,
    pub op: Ident,
    pub args: Vec<Arg>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Arg {
    pub key: Option<Ident>,
    pub value: Expr,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attr {
    pub name: Ident,
    pub args: Vec<Ident>,
    pub span: Span,
}

/// `layer NAME(SIGNATURE) { BODY }`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDef {
    pub name: Ident,
    pub sig: Vec<SigParam>,
    pub body: Vec<BodyItem>,
    pub span: Span,
}

/// One parameter of a layer definition's signature.
#[derive(Debug, Clone, PartialEq)]
pub enum SigParam {
    /// `x: [C, H, W] pad (0, 1, 1)`: a tensor input, its dims, its optional zero padding.
    Tensor { name: Ident, dims: Vec<SizeDim>, pad: Option<Vec<PadDim>>, span: Span },
    /// `O`: an integer argument, which is also a size symbol.
    Size(Ident),
}

/// A dim in a signature or a `param` shape: an integer or a size symbol.
#[derive(Debug, Clone, PartialEq)]
pub enum SizeDim {
    Int(Dim),
    Sym(Ident),
}

/// One dim's zero padding: `1` (the same before and after) or `(0, 1)` (before, after).
#[derive(Debug, Clone, PartialEq)]
pub enum PadDim {
    Same(Dim),
    Pair { lo: Dim, hi: Dim, span: Span },
}

#[derive(Debug, Clone, PartialEq)]
pub enum BodyItem {
    /// `param weight: [C, 3, 3];`
    Param { name: Ident, dims: Vec<SizeDim>, span: Span },
    /// `y[c, h, w] = ...;`
    Stmt(Stmt),
    /// A statement the parser could not read (already reported).
    Error { span: Span },
}

/// `lhs[index, ...] = rhs;`
#[derive(Debug, Clone, PartialEq)]
pub struct Stmt {
    pub lhs: Ident,
    pub index: Vec<BodyExpr>,
    pub rhs: BodyExpr,
    pub span: Span,
}

/// An expression of a layer body: a value on the right-hand side, an index inside `[...]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyExpr {
    pub kind: BodyExprKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BodyExprKind {
    Int(i64),
    Float(f64),
    /// A bare name: an index variable.
    Var(Ident),
    /// `t[i, j + 1]`
    Read(Ident, Vec<BodyExpr>),
    /// `sigmoid(e)`
    Call(Ident, Vec<BodyExpr>),
    /// `sum(i, j: e)`
    Sum(Vec<Ident>, Box<BodyExpr>),
    Neg(Box<BodyExpr>),
    Bin(BinOp, Box<BodyExpr>, Box<BodyExpr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BodyExpr {
    /// `a op b`, spanning `l..r`.
    pub fn bin(op: BinOp, a: BodyExpr, b: BodyExpr, l: usize, r: usize) -> BodyExpr {
        BodyExpr { kind: BodyExprKind::Bin(op, Box::new(a), Box::new(b)), span: Span::new(l, r) }
    }
}

impl SizeDim {
    pub fn span(&self) -> Span {
        match self {
            SizeDim::Int(d) => d.span,
            SizeDim::Sym(s) => s.span,
        }
    }
}

impl PadDim {
    pub fn span(&self) -> Span {
        match self {
            PadDim::Same(d) => d.span,
            PadDim::Pair { span, .. } => *span,
        }
    }
}

fn comma<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.value)
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model {} {{  // {}", self.name, self.span)?;
        for item in &self.items {
            writeln!(f, "    {item}")?;
        }
        writeln!(f, "}}")
    }
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::Input { name, shape, span } => {
                write!(f, "input {name}: [")?;
                comma(f, shape)?;
                write!(f, "];  // {span}")
            }
            Item::Label { name, kind: LabelKind::Classes { kind, count }, span } => {
                write!(f, "label {name}: {kind}({count});  // {span}")
            }
            Item::Label { name, kind: LabelKind::Target { shape }, span } => {
                write!(f, "label {name}: [")?;
                comma(f, shape)?;
                write!(f, "];  // {span}")
            }
            Item::Bind { name, value, span } => write!(f, "{name} = {value};  // {span}"),
            Item::Loss { call, span } => write!(f, "loss {call};  // {span}"),
            Item::Error { span } => write!(f, "<error>;  // {span}"),
            Item::Layer(def) => write!(f, "{def}"),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ExprKind::Name(n) => write!(f, "{n}"),
            ExprKind::Int(i) => write!(f, "{i}"),
            ExprKind::Float(x) => write!(f, "{x:?}"),
            ExprKind::Bool(b) => write!(f, "{b}"),
            ExprKind::Tuple(items) => {
                f.write_str("(")?;
                comma(f, items)?;
                f.write_str(")")
            }
            ExprKind::Call(c) => write!(f, "{c}"),
            ExprKind::Add(a, b) => write!(f, "({a} + {b})"),
        }
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for a in &self.attrs {
            write!(f, "{a} ")?;
        }
        if let Some(layer) = &self.layer {
            write!(f, "{layer}: ")?;
        }
        write!(f, "{}(", self.op)?;
        comma(f, &self.args)?;
        f.write_str(")")
    }
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(k) = &self.key {
            write!(f, "{k}=")?;
        }
        write!(f, "{}", self.value)
    }
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}(", self.name)?;
        comma(f, &self.args)?;
        f.write_str(")")
    }
}

impl fmt::Display for LayerDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {}(", self.name)?;
        comma(f, &self.sig)?;
        writeln!(f, ") {{  // {}", self.span)?;
        for item in &self.body {
            match item {
                BodyItem::Param { name, dims, span } => {
                    write!(f, "        param {name}: [")?;
                    comma(f, dims)?;
                    writeln!(f, "];  // {span}")?;
                }
                BodyItem::Stmt(s) => {
                    write!(f, "        {}[", s.lhs)?;
                    comma(f, &s.index)?;
                    writeln!(f, "] = {};  // {}", s.rhs, s.span)?;
                }
                BodyItem::Error { span } => writeln!(f, "        <error>;  // {span}")?,
            }
        }
        f.write_str("    }")
    }
}

impl fmt::Display for SigParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SigParam::Tensor { name, dims, pad, .. } => {
                write!(f, "{name}: [")?;
                comma(f, dims)?;
                f.write_str("]")?;
                if let Some(pad) = pad {
                    f.write_str(" pad (")?;
                    comma(f, pad)?;
                    f.write_str(")")?;
                }
                Ok(())
            }
            SigParam::Size(name) => write!(f, "{name}"),
        }
    }
}

impl fmt::Display for SizeDim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeDim::Int(d) => write!(f, "{d}"),
            SizeDim::Sym(s) => write!(f, "{s}"),
        }
    }
}

impl fmt::Display for PadDim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PadDim::Same(d) => write!(f, "{d}"),
            PadDim::Pair { lo, hi, .. } => write!(f, "({lo}, {hi})"),
        }
    }
}

impl fmt::Display for BodyExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            BodyExprKind::Int(i) => write!(f, "{i}"),
            BodyExprKind::Float(x) => write!(f, "{x:?}"),
            BodyExprKind::Var(v) => write!(f, "{v}"),
            BodyExprKind::Read(t, index) => {
                write!(f, "{t}[")?;
                comma(f, index)?;
                f.write_str("]")
            }
            BodyExprKind::Call(func, args) => {
                write!(f, "{func}(")?;
                comma(f, args)?;
                f.write_str(")")
            }
            BodyExprKind::Sum(vars, body) => {
                f.write_str("sum(")?;
                comma(f, vars)?;
                write!(f, ": {body})")
            }
            BodyExprKind::Neg(e) => write!(f, "(-{e})"),
            BodyExprKind::Bin(op, a, b) => {
                let sym = match op {
                    BinOp::Add => "+",
                    BinOp::Sub => "-",
                    BinOp::Mul => "*",
                    BinOp::Div => "/",
                };
                write!(f, "({a} {sym} {b})")
            }
        }
    }
}
