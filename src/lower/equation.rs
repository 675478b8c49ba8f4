//! Lowering of derived equations: the generic path from an equation of the index notation
//! ([`crate::grad::Equation`]) to a kernel, with no knowledge of the op it came from.
//!
//! Today it covers pointwise equations — every tensor read at exactly the left-hand side's
//! index, as in `Y[n,c,h,w] = tanh(X[n,c,h,w])` or `dX[n,i] = (X[n,i] > 0 ? dY[n,i] : 0)` —
//! which become one vector loop over the example's elements. Activations (whose forward and
//! backward come from the activation table) and residual adds are lowered this way, so
//! their derivatives are written once, in `crate::activation`.

use pdgc_codegen::ir::{self, Binary, CmpOp, Cond, Extent, Kernel, Unary};

use super::builder::*;
use crate::error::Result;
use crate::grad::{Access, Cmp, Equation, Expr, Func};

/// A kernel computing `eq` over `size` elements per example, and the tensors it reads, in
/// the order of its arguments (the left-hand side's tensor is the last argument). `first`:
/// the kernel is the first writer of its target (it overwrites; later ones accumulate, as
/// does any equation written with `+=`). `None` when the equation is not pointwise; the
/// kernel is an internal error when a size does not fit the IR (see `builder::size`).
pub fn pointwise(name: &str, eq: &Equation, size: usize, first: bool) -> Option<(Result<Kernel>, Vec<String>)> {
    let mut reads = Vec::new();
    collect_reads(&eq.rhs, eq, &mut reads)?;
    let overwrite = first && !eq.accumulate;
    let mut kb = KernelBuilder::new(name);
    let args: Vec<ir::ArgId> = reads.iter().map(|t| kb.input(t, batched(&[size]))).collect();
    let out = kb.target(&eq.lhs.tensor, batched(&[size]), overwrite);
    let [n, i] = [kb.var("n"), kb.var("i")];
    let ix = vec![v(n), v(i)];
    let load_of = |a: &Access| -> Option<ir::Expr> {
        let at = reads.iter().position(|t| *t == a.tensor)?;
        Some(load(args[at], ix.clone()))
    };
    let value = scalar(&eq.rhs, &load_of)?;
    let body = vec![vlp(i, size, vec![put(out, ix.clone(), value, overwrite)])];
    let mut tensors = reads;
    tensors.push(eq.lhs.tensor.clone());
    Some((kb.finish(n, Extent::Batch, body), tensors))
}

/// The distinct tensors `e` reads, in order of first appearance; `None` if a read is not at
/// the left-hand side's index or `e` is not elementwise.
fn collect_reads(e: &Expr, eq: &Equation, out: &mut Vec<String>) -> Option<()> {
    match e {
        Expr::Read(a) => {
            if a.index != eq.lhs.index || !eq.lhs.is_plain() {
                return None;
            }
            if !out.contains(&a.tensor) {
                out.push(a.tensor.clone());
            }
            Some(())
        }
        Expr::Num(_) => Some(()),
        Expr::Mul(items) | Expr::Add(items) | Expr::Apply(_, items) => {
            items.iter().try_for_each(|x| collect_reads(x, eq, out))
        }
        Expr::Sub(a, b) | Expr::Div(a, b) => {
            collect_reads(a, eq, out)?;
            collect_reads(b, eq, out)
        }
        Expr::Select { a, b, then, otherwise, .. } => {
            [a, b, then, otherwise].into_iter().try_for_each(|x| collect_reads(x, eq, out))
        }
        Expr::Var(_) | Expr::FirstMax(..) | Expr::Reduce(..) => None,
    }
}

/// The kernel-IR value of an expression without reductions, each read's value given by
/// `load_of`; an activation is expanded through its definition in the activation table.
pub fn scalar(e: &Expr, load_of: &impl Fn(&Access) -> Option<ir::Expr>) -> Option<ir::Expr> {
    let fold = |items: &[Expr], op: Binary| -> Option<ir::Expr> {
        let mut it = items.iter();
        let mut acc = scalar(it.next()?, load_of)?;
        for x in it {
            acc = ir::Expr::bin(op, acc, scalar(x, load_of)?);
        }
        Some(acc)
    };
    Some(match e {
        Expr::Read(a) => load_of(a)?,
        Expr::Num(x) => lit(*x as f32),
        // `-1 · x` is a negation, exactly.
        Expr::Mul(items) if items.len() == 2 && items[0] == Expr::Num(-1.0) => {
            ir::Expr::un(Unary::Neg, scalar(&items[1], load_of)?)
        }
        Expr::Mul(items) => fold(items, Binary::Mul)?,
        Expr::Add(items) => fold(items, Binary::Add)?,
        Expr::Sub(a, b) => ir::Expr::sub(scalar(a, load_of)?, scalar(b, load_of)?),
        Expr::Div(a, b) => ir::Expr::div(scalar(a, load_of)?, scalar(b, load_of)?),
        Expr::Apply(f, args) => {
            let arg = |i: usize| scalar(args.get(i)?, load_of);
            match f {
                Func::Exp => ir::Expr::un(Unary::Exp, arg(0)?),
                Func::Log => ir::Expr::un(Unary::Log, arg(0)?),
                Func::Tanh => ir::Expr::un(Unary::Tanh, arg(0)?),
                Func::Sqrt => ir::Expr::un(Unary::Sqrt, arg(0)?),
                Func::Erf => ir::Expr::un(Unary::Erf, arg(0)?),
                Func::Max => ir::Expr::bin(Binary::Max, arg(0)?, arg(1)?),
                Func::Min => ir::Expr::bin(Binary::Min, arg(0)?, arg(1)?),
                Func::Activation(a) => scalar(&a.forward(args.first()?.clone()), load_of)?,
            }
        }
        Expr::Select { a, op, b, then, otherwise } => {
            let op = match op {
                Cmp::Lt => CmpOp::Lt,
                Cmp::Le => CmpOp::Le,
                Cmp::Eq => CmpOp::Eq,
                Cmp::Gt => CmpOp::Gt,
                Cmp::Ge => CmpOp::Ge,
            };
            let cond = Cond::Cmp { op, a: scalar(a, load_of)?, b: scalar(b, load_of)? };
            ir::Expr::select(cond, scalar(then, load_of)?, scalar(otherwise, load_of)?)
        }
        Expr::Var(_) | Expr::FirstMax(..) | Expr::Reduce(..) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Activation;

    fn eq(lhs: &str, rhs: Expr) -> Equation {
        Equation { lhs: Access::new(lhs, &["n", "i"]), accumulate: false, rhs }
    }

    fn read(t: &str) -> Expr {
        Expr::read(t, &["n", "i"])
    }

    /// Runs a lowered pointwise equation on the interpreter; `inputs` in the kernel's
    /// argument order (its `tensors` but the last).
    fn run(eq: &Equation, inputs: &[(&str, &[f32])]) -> Vec<f32> {
        let size = inputs[0].1.len();
        let (k, tensors) = pointwise("t", eq, size, true).expect("pointwise");
        let k = k.expect("sizes fit");
        let mut bufs: Vec<Vec<f32>> = tensors[..tensors.len() - 1]
            .iter()
            .map(|t| inputs.iter().find(|(n, _)| n == t).expect("bound").1.to_vec())
            .collect();
        bufs.push(vec![0.0; size]);
        let mut slices: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        pdgc_codegen::interp::run(&k, &mut slices, 1).expect("runs");
        bufs.pop().expect("output")
    }

    /// Every activation's lowered backward equals central finite differences of its lowered
    /// forward, on both sides of every kink (hardswish's ±3, relu's 0).
    #[test]
    fn lowered_activation_derivatives_match_finite_differences() {
        let xs: Vec<f32> = (0..64).map(|i| -5.9 + 0.19 * i as f32).collect();
        let h = 1e-2f32;
        for act in Activation::ALL {
            let fwd = eq("Y", Expr::apply(Func::Activation(act), vec![read("X")]));
            let y = run(&fwd, &[("X", &xs)]);
            let ones = vec![1.0f32; xs.len()];
            let dx =
                run(&eq("dX", act.backward(read("X"), read("Y"), read("dY"))), &[("X", &xs), ("Y", &y), ("dY", &ones)]);
            let plus: Vec<f32> = xs.iter().map(|x| x + h).collect();
            let minus: Vec<f32> = xs.iter().map(|x| x - h).collect();
            let (yp, ym) = (run(&fwd, &[("X", &plus)]), run(&fwd, &[("X", &minus)]));
            for i in 0..xs.len() {
                let fd = (yp[i] - ym[i]) / (2.0 * h);
                assert!(
                    (dx[i] - fd).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{}: x = {}: {} vs {fd}",
                    act.name(),
                    xs[i],
                    dx[i]
                );
            }
        }
    }

    #[test]
    fn reductions_are_not_pointwise() {
        let sum = eq("Y", Expr::sum(vec!["j"], Expr::read("X", &["n", "j"])));
        assert!(pointwise("t", &sum, 4, true).is_none());
    }
}
