//! Scalar float semantics shared by the interpreter and the CPU backend, so that both
//! compute bit-identical results: the transcendental functions (`approx`: one definition
//! of each, which the JIT's vector code runs on four lanes and the JIT's scalar code calls
//! as these very functions) and NaN-propagating `max`/`min` (see [`crate::ir::Binary`]).

pub(crate) mod approx;

use crate::ir::{Binary, CmpOp, Unary};
use approx::Scalar;

pub(crate) extern "C" fn pdgc_expf(x: f32) -> f32 {
    approx::exp(&mut Scalar, x)
}

pub(crate) extern "C" fn pdgc_logf(x: f32) -> f32 {
    approx::log(&mut Scalar, x)
}

pub(crate) extern "C" fn pdgc_tanhf(x: f32) -> f32 {
    approx::tanh(&mut Scalar, x)
}

pub(crate) extern "C" fn pdgc_erff(x: f32) -> f32 {
    approx::erf(&mut Scalar, x)
}

/// IEEE 754-2019 `maximum`: NaN if either operand is NaN, and `+0 > -0`.
pub(crate) fn maximum(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a == b {
        // Equal values differ at most in the sign of zero; the positive one wins.
        if a.is_sign_positive() {
            a
        } else {
            b
        }
    } else if a > b {
        a
    } else {
        b
    }
}

/// IEEE 754-2019 `minimum`: NaN if either operand is NaN, and `-0 < +0`.
pub(crate) fn minimum(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a == b {
        if a.is_sign_negative() {
            a
        } else {
            b
        }
    } else if a < b {
        a
    } else {
        b
    }
}

pub(crate) fn unary(op: Unary, x: f32) -> f32 {
    match op {
        Unary::Neg => -x,
        Unary::Exp => pdgc_expf(x),
        Unary::Log => pdgc_logf(x),
        Unary::Tanh => pdgc_tanhf(x),
        Unary::Sqrt => x.sqrt(),
        Unary::Erf => pdgc_erff(x),
        Unary::Abs => x.abs(),
    }
}

pub(crate) fn binary(op: Binary, a: f32, b: f32) -> f32 {
    match op {
        Binary::Add => a + b,
        Binary::Sub => a - b,
        Binary::Mul => a * b,
        Binary::Div => a / b,
        Binary::Max => maximum(a, b),
        Binary::Min => minimum(a, b),
    }
}

/// IEEE comparisons: every one but `Ne` is false when an operand is NaN.
pub(crate) fn compare(op: CmpOp, a: f32, b: f32) -> bool {
    match op {
        CmpOp::Lt => a < b,
        CmpOp::Le => a <= b,
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
        CmpOp::Gt => a > b,
        CmpOp::Ge => a >= b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maximum_and_minimum_propagate_nan_and_order_zeros() {
        assert!(maximum(f32::NAN, 1.0).is_nan());
        assert!(maximum(1.0, f32::NAN).is_nan());
        assert!(minimum(f32::NAN, 1.0).is_nan());
        assert_eq!(maximum(-0.0, 0.0).to_bits(), 0.0f32.to_bits());
        assert_eq!(maximum(0.0, -0.0).to_bits(), 0.0f32.to_bits());
        assert_eq!(minimum(-0.0, 0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(minimum(0.0, -0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(maximum(-3.0, 2.0), 2.0);
        assert_eq!(minimum(-3.0, 2.0), -3.0);
    }

    #[test]
    fn erf_is_accurate_to_f32() {
        // Reference values of erf to 12 digits (Abramowitz & Stegun, table 7.1, and
        // mpmath for the tails).
        let cases = [
            (0.0f64, 0.0f64),
            (0.1, 0.112462916018),
            (0.5, 0.520499877813),
            (1.0, 0.842700792950),
            (1.5, 0.966105146475),
            (2.0, 0.995322265019),
            (3.0, 0.999977909503),
            (-0.7, -0.677801193837),
        ];
        for (x, want) in cases {
            let got = pdgc_erff(x as f32) as f64;
            assert!(
                (got - want).abs() <= 2.0 * f32::EPSILON as f64 * want.abs().max(1e-3),
                "erf({x}) = {got}, want {want}"
            );
        }
    }
}
