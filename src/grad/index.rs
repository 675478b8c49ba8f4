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

    /// `⌊var/div⌋·coef + inner`: the channel of a grouped conv (`group(co)·Cin/G + ci`).
    pub fn grouped(var: Var, div: usize, coef: usize, inner: Var) -> Index {
        Index {
            terms: vec![Term { var, coef: coef as i64, div: div as i64 }, Term { var: inner, coef: 1, div: 1 }],
            offset: 0,
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
    /// A named scalar function (`tanh`, `softmax_k`, `[·>0]`), applied elementwise.
    Call(&'static str, Vec<Expr>),
    /// `Σ_{vars} body`, `mean_{vars}(body)`, `max_{vars}(body)`, ...
    Reduce(Reduction, Vec<Var>, Box<Expr>),
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

    pub fn call(f: &'static str, args: Vec<Expr>) -> Expr {
        Expr::Call(f, args)
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
            Expr::Call(name, args) => {
                write!(f, "{name}(")?;
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
        assert_eq!(Index::grouped("co", 8, 4, "ci").to_string(), "⌊co/8⌋·4+ci");
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
