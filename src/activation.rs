//! The activation table: every pointwise nonlinearity of the language, defined once.
//!
//! Each activation gives its name, its forward value and its vector-Jacobian product
//! (`dX` from `X`, `Y = f(X)` and `dY`) as expressions of the index notation
//! ([`crate::grad::Expr`]). `differentiate` prints these equations, and `lower` turns the
//! very same equations into kernels (`lower::equation`), so an activation's derivative is
//! written here and nowhere else but in the f64 reference evaluator, which is a separate
//! oracle on purpose. Adding an activation: a variant of [`Activation`], its arms here, its
//! row in `ops::OPS`, and its oracle in `reference.rs`.
//!
//! Kinks follow PyTorch: relu's gradient is 0 at 0, leaky_relu's is `slope` at 0,
//! hardswish's is `x/3 + 1/2` on `[-3, 3]` and 0 below, 1 above.

use crate::grad::{Cmp, Expr, Func};
use crate::graph::Activation;

impl Activation {
    /// Every activation, with leaky_relu at its default slope (a table for tests and docs).
    pub const ALL: [Activation; 6] = [
        Activation::Relu,
        Activation::LeakyRelu { slope: 0.01 },
        Activation::Tanh,
        Activation::Sigmoid,
        Activation::Gelu,
        Activation::Hardswish,
    ];

    /// The name in `.pdg` source.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::LeakyRelu { .. } => "leaky_relu",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::Gelu => "gelu",
            Activation::Hardswish => "hardswish",
        }
    }

    /// `f(x)`.
    pub fn forward(self, x: Expr) -> Expr {
        match self {
            Activation::Relu => Expr::apply(Func::Max, vec![x, num(0.0)]),
            Activation::LeakyRelu { slope } => {
                Expr::select(x.clone(), Cmp::Gt, num(0.0), x.clone(), Expr::mul(vec![num(slope), x]))
            }
            Activation::Tanh => Expr::apply(Func::Tanh, vec![x]),
            Activation::Sigmoid => Expr::div(num(1.0), Expr::Add(vec![num(1.0), Expr::apply(Func::Exp, vec![neg(x)])])),
            // The exact (erf) form, PyTorch's default.
            Activation::Gelu => Expr::mul(vec![num(0.5), x.clone(), Expr::Add(vec![num(1.0), erf_scaled(x)])]),
            // x · relu6(x + 3) / 6
            Activation::Hardswish => {
                let relu6 = Expr::apply(
                    Func::Min,
                    vec![Expr::apply(Func::Max, vec![Expr::Add(vec![x.clone(), num(3.0)]), num(0.0)]), num(6.0)],
                );
                Expr::div(Expr::mul(vec![x, relu6]), num(6.0))
            }
        }
    }

    /// The vector-Jacobian product `dX = dY · f'(X)` (written with `Y = f(X)` where that is
    /// cheaper, and with selects where PyTorch's backward is piecewise).
    pub fn backward(self, x: Expr, y: Expr, dy: Expr) -> Expr {
        match self {
            // y > 0 exactly where x > 0, and the backward then needs only the output.
            Activation::Relu => Expr::select(y, Cmp::Gt, num(0.0), dy, num(0.0)),
            Activation::LeakyRelu { slope } => {
                Expr::select(x, Cmp::Gt, num(0.0), dy.clone(), Expr::mul(vec![num(slope), dy]))
            }
            Activation::Tanh => Expr::mul(vec![dy, Expr::sub(num(1.0), Expr::mul(vec![y.clone(), y]))]),
            Activation::Sigmoid => Expr::mul(vec![dy, Expr::mul(vec![y.clone(), Expr::sub(num(1.0), y)])]),
            Activation::Gelu => {
                // Φ(x) + x·φ(x)
                let cdf = Expr::mul(vec![num(0.5), Expr::Add(vec![num(1.0), erf_scaled(x.clone())])]);
                let pdf = Expr::mul(vec![
                    num(0.398_942_280_401_432_7),
                    Expr::apply(Func::Exp, vec![Expr::mul(vec![num(-0.5), x.clone(), x.clone()])]),
                ]);
                Expr::mul(vec![dy, Expr::Add(vec![cdf, Expr::mul(vec![x, pdf])])])
            }
            Activation::Hardswish => {
                let middle = Expr::mul(vec![dy.clone(), Expr::Add(vec![Expr::div(x.clone(), num(3.0)), num(0.5)])]);
                Expr::select(x.clone(), Cmp::Lt, num(-3.0), num(0.0), Expr::select(x, Cmp::Le, num(3.0), middle, dy))
            }
        }
    }
}

fn num(v: f64) -> Expr {
    Expr::num(v)
}

fn neg(x: Expr) -> Expr {
    Expr::mul(vec![num(-1.0), x])
}

/// `erf(x / √2)`
fn erf_scaled(x: Expr) -> Expr {
    Expr::apply(Func::Erf, vec![Expr::mul(vec![x, num(std::f64::consts::FRAC_1_SQRT_2)])])
}
