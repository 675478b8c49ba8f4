//! Index notation: the small expression language in which ops are defined and their
//! gradients derived and printed (`dW[n,co,ci,kh,kw] = Σ_{oh,ow} dY[n,co,oh,ow] · X[...]`).
//!
//! An index is an affine form of loop variables, `Σ coef·⌊var/div⌋ + offset`, which covers
//! strides, dilations, padding and group offsets. A tensor read is an [`Access`]; a right-
//! hand side is an [`Expr`] tree; a statement is an [`Equation`].

use std::fmt;

use serde::Serialize;

/// A loop variable, by name (`n`, `co`, `oh`, ...). `n` is always the batch index.
pub type Var = &'static str;

/// A name written in a source file (an index variable or a layer definition of a layer
/// written in index notation) as a [`Var`]: each distinct name is stored once for the
/// life of the process, so a long-running program that compiles many models holds each
/// name it ever saw once.
pub fn intern(name: &str) -> Var {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(|| Mutex::new(HashSet::new())).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = names.get(name) {
        return v;
    }
    let v: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.insert(v);
    v
}

/// `coef · ⌊var / div⌋`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Term {
    pub var: Var,
    pub coef: i64,
    pub div: i64,
}

/// An affine index: `Σ terms + offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Index {
    pub terms: Vec<Term>,
    pub offset: i64,
}

impl Index {
    pub fn var(var: Var) -> Index {
        Index { terms: vec![Term { var, coef: 1, div: 1 }], offset: 0 }
    }

    /// `var·stride + other·dilation − padding`: a sliding-window input position (`padding`
    /// is the padding before the input).
    pub fn window(var: Var, stride: usize, kvar: Var, dilation: usize, padding: usize) -> Index {
        Index {
            terms: vec![Term { var, coef: stride as i64, div: 1 }, Term { var: kvar, coef: dilation as i64, div: 1 }],
            offset: -(padding as i64),
        }
    }

    /// The single variable this index is, if it is a plain variable.
    pub fn as_var(&self) -> Option<Var> {
        match self.terms.as_slice() {
            [Term { var, coef: 1, div: 1 }] if self.offset == 0 => Some(var),
            _ => None,
        }
    }

    pub fn vars(&self) -> impl Iterator<Item = Var> + '_ {
        self.terms.iter().map(|t| t.var)
    }

    /// This index with `var` fixed at `value` (a loop over `var` unrolled).
    pub fn pinned(&self, var: Var, value: i64) -> Index {
        let mut out = Index { terms: Vec::with_capacity(self.terms.len()), offset: self.offset };
        for t in &self.terms {
            if t.var == var {
                out.offset += t.coef * value.div_euclid(t.div);
            } else {
                out.terms.push(t.clone());
            }
        }
        out
    }
}

/// A read of `tensor[index, ...]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Access {
    pub tensor: String,
    pub index: Vec<Index>,
}

impl Access {
    pub fn new(tensor: impl Into<String>, vars: &[Var]) -> Access {
        Access { tensor: tensor.into(), index: vars.iter().map(|v| Index::var(v)).collect() }
    }

    pub fn vars(&self) -> Vec<Var> {
        let mut out: Vec<Var> = Vec::new();
        for v in self.index.iter().flat_map(Index::vars) {
            if !out.contains(&v) {
                out.push(v);
            }
        }
        out
    }

    /// True if every index is a distinct plain variable (a "gather" target).
    pub fn is_plain(&self) -> bool {
        let plain: Vec<Var> = self.index.iter().filter_map(Index::as_var).collect();
        plain.len() == self.index.len() && plain.iter().enumerate().all(|(i, v)| !plain[..i].contains(v))
    }

    pub fn renamed(&self, tensor: impl Into<String>) -> Access {
        Access { tensor: tensor.into(), index: self.index.clone() }
    }

    /// This access with `var` fixed at `value` in every index.
    pub fn pinned(&self, var: Var, value: i64) -> Access {
        Access { tensor: self.tensor.clone(), index: self.index.iter().map(|ix| ix.pinned(var, value)).collect() }
    }
}

/// A right-hand side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Expr {
    Read(Access),
    Num(f64),
    Mul(Vec<Expr>),
    Add(Vec<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    /// A scalar function, applied elementwise.
    Apply(Func, Vec<Expr>),
    /// `a op b ? then : otherwise` (an Iverson bracket when the arms are 1 and 0).
    Select {
        a: Box<Expr>,
        op: Cmp,
        b: Box<Expr>,
        then: Box<Expr>,
        otherwise: Box<Expr>,
    },
    /// The value of a loop variable (one-hot comparisons: `k = y[n]`).
    Var(Var),
    /// Max pooling's routing: 1 where `x` is the first (row-major) maximum `y` of its
    /// window, else 0. Not a pure function of one element: it needs the window's order.
    FirstMax(Box<Expr>, Box<Expr>),
    /// `Σ_{vars} body`, `mean_{vars}(body)`, `max_{vars}(body)`, ...
    Reduce(Reduction, Vec<Var>, Box<Expr>),
}

/// Scalar functions of the index notation. An activation prints by its name and means its
/// definition in the activation table (`crate::activation`), which is the one place that
/// defines it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Func {
    Exp,
    Log,
    Tanh,
    Sqrt,
    Erf,
    /// NaN-propagating maximum of two values.
    Max,
    /// NaN-propagating minimum of two values.
    Min,
    Activation(crate::graph::Activation),
}

impl Func {
    pub fn name(self) -> &'static str {
        match self {
            Func::Exp => "exp",
            Func::Log => "log",
            Func::Tanh => "tanh",
            Func::Sqrt => "sqrt",
            Func::Erf => "erf",
            Func::Max => "max",
            Func::Min => "min",
            Func::Activation(a) => a.name(),
        }
    }
}

/// Comparisons in [`Expr::Select`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Cmp {
    Lt,
    Le,
    Eq,
    Gt,
    Ge,
}

impl Cmp {
    pub fn symbol(self) -> &'static str {
        match self {
            Cmp::Lt => "<",
            Cmp::Le => "≤",
            Cmp::Eq => "=",
            Cmp::Gt => ">",
            Cmp::Ge => "≥",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Reduction {
    Sum,
    Mean,
    Max,
    LogSumExp,
}

impl Expr {
    pub fn read(tensor: impl Into<String>, vars: &[Var]) -> Expr {
        Expr::Read(Access::new(tensor, vars))
    }

    pub fn mul(items: Vec<Expr>) -> Expr {
        Expr::Mul(items)
    }

    pub fn sub(a: Expr, b: Expr) -> Expr {
        Expr::Sub(Box::new(a), Box::new(b))
    }

    pub fn div(a: Expr, b: Expr) -> Expr {
        Expr::Div(Box::new(a), Box::new(b))
    }

    pub fn apply(f: Func, args: Vec<Expr>) -> Expr {
        Expr::Apply(f, args)
    }

    /// `a op b ? then : otherwise`
    pub fn select(a: Expr, op: Cmp, b: Expr, then: Expr, otherwise: Expr) -> Expr {
        Expr::Select { a: Box::new(a), op, b: Box::new(b), then: Box::new(then), otherwise: Box::new(otherwise) }
    }

    /// `Σ_{vars} body`, or the body itself when there is nothing to sum.
    pub fn sum(vars: Vec<Var>, body: Expr) -> Expr {
        if vars.is_empty() {
            body
        } else {
            Expr::Reduce(Reduction::Sum, vars, Box::new(body))
        }
    }

    pub fn reduce(r: Reduction, vars: Vec<Var>, body: Expr) -> Expr {
        Expr::Reduce(r, vars, Box::new(body))
    }

    pub fn num(x: f64) -> Expr {
        Expr::Num(x)
    }

    /// This expression with every read replaced by `f(read)` and every variable (of
    /// [`Expr::Var`] and of reductions) by `var(v)`: the one rewriting walk of the index
    /// notation (renaming variables, adding the batch index, ...).
    pub fn map(&self, f: &impl Fn(&Access) -> Access, var: &impl Fn(Var) -> Var) -> Expr {
        let m = |e: &Expr| e.map(f, var);
        match self {
            Expr::Read(a) => Expr::Read(f(a)),
            Expr::Num(x) => Expr::Num(*x),
            Expr::Var(v) => Expr::Var(var(v)),
            Expr::Mul(items) => Expr::Mul(items.iter().map(m).collect()),
            Expr::Add(items) => Expr::Add(items.iter().map(m).collect()),
            Expr::Apply(func, items) => Expr::Apply(*func, items.iter().map(m).collect()),
            Expr::Sub(a, b) => Expr::sub(m(a), m(b)),
            Expr::Div(a, b) => Expr::div(m(a), m(b)),
            Expr::FirstMax(a, b) => Expr::FirstMax(Box::new(m(a)), Box::new(m(b))),
            Expr::Select { a, op, b, then, otherwise } => Expr::select(m(a), *op, m(b), m(then), m(otherwise)),
            Expr::Reduce(r, vars, body) => Expr::Reduce(*r, vars.iter().map(|v| var(v)).collect(), Box::new(m(body))),
        }
    }
}

impl Expr {
    /// Every variable this expression reads or names, those its reductions sum over
    /// included, in order of first appearance (never the batch's `n`).
    pub fn vars(&self) -> Vec<Var> {
        let mut out = Vec::new();
        self.walk_vars(true, &mut Vec::new(), &mut out);
        out
    }

    /// The variables this expression depends on: [`Expr::vars`] less those its reductions
    /// sum over.
    pub fn free_vars(&self) -> Vec<Var> {
        let mut out = Vec::new();
        self.walk_vars(false, &mut Vec::new(), &mut out);
        out
    }

    fn walk_vars(&self, summed_too: bool, bound: &mut Vec<Var>, out: &mut Vec<Var>) {
        let add = |v: Var, bound: &[Var], out: &mut Vec<Var>| {
            if v != "n" && !bound.contains(&v) && !out.contains(&v) {
                out.push(v);
            }
        };
        match self {
            Expr::Read(a) => a.vars().into_iter().for_each(|v| add(v, bound, out)),
            Expr::Var(v) => add(v, bound, out),
            Expr::Num(_) => {}
            Expr::Mul(items) | Expr::Add(items) | Expr::Apply(_, items) => {
                items.iter().for_each(|x| x.walk_vars(summed_too, bound, out))
            }
            Expr::Sub(a, b) | Expr::Div(a, b) | Expr::FirstMax(a, b) => {
                a.walk_vars(summed_too, bound, out);
                b.walk_vars(summed_too, bound, out);
            }
            Expr::Select { a, b, then, otherwise, .. } => {
                [a, b, then, otherwise].into_iter().for_each(|x| x.walk_vars(summed_too, bound, out))
            }
            Expr::Reduce(_, vars, body) => {
                let before = bound.len();
                if summed_too {
                    vars.iter().for_each(|v| add(v, bound, out));
                } else {
                    bound.extend(vars.iter().copied());
                }
                body.walk_vars(summed_too, bound, out);
                bound.truncate(before);
            }
        }
    }
}

/// `lhs = rhs` or, for a scatter (an affine left-hand side), `lhs += rhs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Equation {
    pub lhs: Access,
    pub accumulate: bool,
    pub rhs: Expr,
}

impl fmt::Display for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for t in &self.terms {
            if t.coef == 0 {
                continue;
            }
            let base = if t.div == 1 { t.var.to_string() } else { format!("⌊{}/{}⌋", t.var, t.div) };
            let mag = t.coef.abs();
            let text = if mag == 1 { base } else { format!("{base}·{mag}") };
            match (first, t.coef < 0) {
                (true, false) => write!(f, "{text}")?,
                (true, true) => write!(f, "−{text}")?,
                (false, false) => write!(f, "+{text}")?,
                (false, true) => write!(f, "−{text}")?,
            }
            first = false;
        }
        match (first, self.offset) {
            (true, o) => write!(f, "{o}"),
            (false, 0) => Ok(()),
            (false, o) if o > 0 => write!(f, "+{o}"),
            (false, o) => write!(f, "−{}", -o),
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.tensor)?;
        for (i, ix) in self.index.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{ix}")?;
        }
        f.write_str("]")
    }
}

fn vars_list(vars: &[Var]) -> String {
    vars.join(",")
}

impl Expr {
    fn needs_parens(&self) -> bool {
        matches!(self, Expr::Add(_) | Expr::Sub(..) | Expr::Reduce(Reduction::Sum, ..))
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let paren = |f: &mut fmt::Formatter<'_>, e: &Expr| {
            if e.needs_parens() {
                write!(f, "({e})")
            } else {
                write!(f, "{e}")
            }
        };
        match self {
            Expr::Read(a) => write!(f, "{a}"),
            Expr::Num(x) => write!(f, "{x}"),
            Expr::Mul(items) => {
                for (i, e) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" · ")?;
                    }
                    paren(f, e)?;
                }
                Ok(())
            }
            Expr::Add(items) => {
                for (i, e) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" + ")?;
                    }
                    write!(f, "{e}")?;
                }
                Ok(())
            }
            Expr::Sub(a, b) => {
                write!(f, "{a} − ")?;
                paren(f, b)
            }
            Expr::Div(a, b) => {
                paren(f, a)?;
                f.write_str(" / ")?;
                paren(f, b)
            }
            Expr::Select { a, op, b, then, otherwise } => {
                write!(f, "({a} {} {b} ? {then} : {otherwise})", op.symbol())
            }
            Expr::Var(v) => write!(f, "{v}"),
            Expr::FirstMax(x, y) => write!(f, "first_max({x}, {y})"),
            Expr::Apply(func, args) => {
                write!(f, "{}(", func.name())?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                f.write_str(")")
            }
            Expr::Reduce(Reduction::Sum, vars, body) => {
                write!(f, "Σ_{{{}}} {body}", vars_list(vars))
            }
            Expr::Reduce(r, vars, body) => {
                let name = match r {
                    Reduction::Mean => "mean",
                    Reduction::Max => "max",
                    Reduction::LogSumExp => "logsumexp",
                    Reduction::Sum => unreachable!("matched above"),
                };
                write!(f, "{name}_{{{}}}({body})", vars_list(vars))
            }
        }
    }
}

impl fmt::Display for Equation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.accumulate { "+=" } else { "=" };
        write!(f, "{} {op} {}", self.lhs, self.rhs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_print_like_the_math() {
        assert_eq!(Index::window("oh", 2, "kh", 1, 3).to_string(), "oh·2+kh−3");
        assert_eq!(Index::window("oh", 1, "kh", 2, 0).to_string(), "oh+kh·2");
        let grouped =
            Index { terms: vec![Term { var: "co", coef: 4, div: 8 }, Term { var: "ci", coef: 1, div: 1 }], offset: 0 };
        assert_eq!(grouped.to_string(), "⌊co/8⌋·4+ci");
        assert_eq!(Index::var("n").to_string(), "n");
    }

    #[test]
    fn plain_accesses_are_gather_targets() {
        assert!(Access::new("X", &["n", "i"]).is_plain());
        assert!(!Access::new("X", &["n", "n"]).is_plain());
        let a = Access { tensor: "X".into(), index: vec![Index::var("n"), Index::window("oh", 1, "kh", 1, 1)] };
        assert!(!a.is_plain());
        assert_eq!(a.vars(), vec!["n", "oh", "kh"]);
    }
}
