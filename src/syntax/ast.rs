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
