//! The transcendental functions `exp`, `log`, `tanh` and `erf`, each written once as a
//! straight-line sequence of float and integer operations over an [`Arith`]: the same
//! sequence runs as scalar Rust ([`Scalar`], what the interpreter and the JIT's scalar
//! code call) and as Cranelift vector code (the CPU backend's lanes), so every executor
//! gets the same bits. No branches: both sides of a range split are computed and one is
//! selected, and no fused multiply-add, which scalar Rust would not do.
//!
//! The approximations:
//!
//! - `exp`: Cephes' `expf` — `x = n·ln 2 + r` with `n` rounded to nearest and `ln 2` in
//!   two parts, a degree-5 polynomial for `e^r` on `|r| <= ln 2 / 2`, then `2^n` applied as
//!   two exact power-of-two factors so gradual underflow and overflow come out right.
//! - `log`: Cephes' `logf` — `x = 2^e·m` with `m` in `[√½, √2)`, a degree-8 polynomial for
//!   `log(m)`, `e·ln 2` added in two parts; subnormal inputs are scaled by `2^23` first.
//! - `tanh`: Cephes' `tanhf` — an odd polynomial below `|x| = 0.625`, `1 − 2/(e^{2|x|} + 1)`
//!   above (through `exp` here), the sign put back last.
//! - `erf`: Norbert Juffa's minimax pair (published with a bound under 1 ulp when computed
//!   with fused multiply-adds) — an odd polynomial below `|x| = 0.927734375`,
//!   `1 − e^{p(|x|)}` above with `|x|` clamped to 4, where `erf` is 1 in f32; sign put back last.
//!
//! Measured against f64 (`std`, and `libm::erf` for `erf`) on a dense sweep of each useful
//! domain (200,001 evenly spaced points plus every float whose bit pattern is a multiple
//! of 4099; the tests below assert the bounds in the last column):
//!
//! | function | domain | max error measured | asserted |
//! |---|---|---|---|
//! | `exp` | `[-87.3, 88.7]` (normal results) | 0.95 ulp | 1 ulp |
//! | `log` | `[1e-37, 1e38]` | 0.75 ulp | 1 ulp |
//! | `tanh` | `[-10, 10]` | 1.28 ulp | 1.5 ulp |
//! | `erf` | `[-4, 4]` | 1.17 ulp | 1.5 ulp |
//! | `sigmoid`, lowered as `1/(1 + exp(-x))` | `[-87, 87]` | 2.18 ulp | 2.5 ulp |
//!
//! Special values: NaN in gives NaN out; `exp(+∞) = +∞` and results past `f32::MAX`
//! overflow to `+∞`, `exp(−∞) = 0` and tiny results underflow (gradually) to 0;
//! `log(±0) = −∞`, `log(+∞) = +∞`, `log` of a negative number is NaN; `tanh` and `erf`
//! saturate at ±1 and keep the sign of zero.

use crate::ir::CmpOp;

/// The operations the approximations are written in. `F` is a float value, `I` an `i32`
/// value of the same shape (bit patterns, exponents) and `M` a comparison's truth value;
/// integer operations wrap.
pub(crate) trait Arith {
    type F: Copy;
    type I: Copy;
    type M: Copy;
    fn float(&mut self, c: f32) -> Self::F;
    fn int(&mut self, c: i32) -> Self::I;
    fn add(&mut self, a: Self::F, b: Self::F) -> Self::F;
    fn sub(&mut self, a: Self::F, b: Self::F) -> Self::F;
    fn mul(&mut self, a: Self::F, b: Self::F) -> Self::F;
    fn div(&mut self, a: Self::F, b: Self::F) -> Self::F;
    fn abs(&mut self, a: Self::F) -> Self::F;
    fn cmp(&mut self, op: CmpOp, a: Self::F, b: Self::F) -> Self::M;
    /// `a` where `m` holds, else `b`.
    fn select(&mut self, m: Self::M, a: Self::F, b: Self::F) -> Self::F;
    fn to_bits(&mut self, a: Self::F) -> Self::I;
    fn of_bits(&mut self, a: Self::I) -> Self::F;
    fn to_float(&mut self, a: Self::I) -> Self::F;
    fn iadd(&mut self, a: Self::I, b: Self::I) -> Self::I;
    fn isub(&mut self, a: Self::I, b: Self::I) -> Self::I;
    fn and(&mut self, a: Self::I, b: Self::I) -> Self::I;
    fn or(&mut self, a: Self::I, b: Self::I) -> Self::I;
    fn shl(&mut self, a: Self::I, bits: u8) -> Self::I;
    /// Arithmetic shift right.
    fn sshr(&mut self, a: Self::I, bits: u8) -> Self::I;
}

/// `c[0]·x^(n−1) + … + c[n−1]` by Horner's rule.
fn horner<A: Arith>(a: &mut A, x: A::F, c: &[f32]) -> A::F {
    let mut r = a.float(c[0]);
    for &k in &c[1..] {
        let p = a.mul(r, x);
        let k = a.float(k);
        r = a.add(p, k);
    }
    r
}

/// `a` with the sign bit of `x` or-ed in (`a` has its sign bit clear).
fn with_sign_of<A: Arith>(a: &mut A, magnitude: A::F, x: A::F) -> A::F {
    let xb = a.to_bits(x);
    let sign = a.int(i32::MIN);
    let sign = a.and(xb, sign);
    let m = a.to_bits(magnitude);
    let r = a.or(m, sign);
    a.of_bits(r)
}

/// An odd function from its two approximations at `t = |x|`: `above` where `t op split`
/// holds (for NaN it does not), else `below`, with the sign of `x` put back.
fn odd_split<A: Arith>(a: &mut A, x: A::F, t: A::F, op: CmpOp, split: f32, above: A::F, below: A::F) -> A::F {
    let split = a.float(split);
    let m = a.cmp(op, t, split);
    let r = a.select(m, above, below);
    with_sign_of(a, r, x)
}

/// `where m { then } else { x }` for a constant `then`.
fn select_const<A: Arith>(a: &mut A, m: A::M, then: f32, x: A::F) -> A::F {
    let t = a.float(then);
    a.select(m, t, x)
}

/// `1.5·2^23`: adding it rounds a float below `2^22` in magnitude to an integer, which
/// then sits in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;

/// `e^x`.
pub(crate) fn exp<A: Arith>(a: &mut A, x: A::F) -> A::F {
    // Past these bounds the result is +inf or 0 anyway; clamping keeps `n` in [-150, 128].
    let hi = a.float(89.0);
    let over = a.cmp(CmpOp::Gt, x, hi);
    let x = a.select(over, hi, x);
    let lo = a.float(-104.0);
    let under = a.cmp(CmpOp::Lt, x, lo);
    let x = a.select(under, lo, x);
    // n = round(x / ln 2), as a float and as an integer.
    let log2e = a.float(std::f32::consts::LOG2_E);
    let v = a.mul(x, log2e);
    let round = a.float(ROUND);
    let shifted = a.add(v, round);
    let n = a.sub(shifted, round);
    let bits = a.to_bits(shifted);
    let round_bits = a.int(ROUND.to_bits() as i32);
    let ni = a.isub(bits, round_bits);
    // r = x − n·ln 2, ln 2 in two parts (the first exact in a few bits).
    let c1 = a.float(0.693_359_4);
    let t = a.mul(n, c1);
    let r = a.sub(x, t);
    let c2 = a.float(-2.121_944_4e-4);
    let t = a.mul(n, c2);
    let r = a.sub(r, t);
    // e^r = 1 + r + r²·p(r).
    let z = a.mul(r, r);
    let p = horner(a, r, &[1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1]);
    let p = a.mul(p, z);
    let p = a.add(p, r);
    let one = a.float(1.0);
    let y = a.add(p, one);
    // 2^n = 2^h · 2^(n−h) with h = n >> 1: both factors are normal floats.
    let h = a.sshr(ni, 1);
    let l = a.isub(ni, h);
    let bias = a.int(127);
    let h = a.iadd(h, bias);
    let h = a.shl(h, 23);
    let h = a.of_bits(h);
    let l = a.iadd(l, bias);
    let l = a.shl(l, 23);
    let l = a.of_bits(l);
    let y = a.mul(y, h);
    a.mul(y, l)
}

/// The natural logarithm.
pub(crate) fn log<A: Arith>(a: &mut A, x: A::F) -> A::F {
    // Subnormal inputs: scale into the normal range and take 23 off the exponent.
    let min_normal = a.float(f32::MIN_POSITIVE);
    let sub = a.cmp(CmpOp::Lt, x, min_normal);
    let scale = a.float(8_388_608.0);
    let scaled = a.mul(x, scale);
    let xs = a.select(sub, scaled, x);
    let zero = a.float(0.0);
    let e_adjust = select_const(a, sub, 23.0, zero);
    // x = 2^e · m with m in [0.5, 1).
    let bits = a.to_bits(xs);
    let exponent = a.sshr(bits, 23);
    let bias = a.int(126);
    let exponent = a.isub(exponent, bias);
    let e = a.to_float(exponent);
    let e = a.sub(e, e_adjust);
    let mantissa = a.int(0x007f_ffff);
    let m = a.and(bits, mantissa);
    let half = a.int(0x3f00_0000);
    let m = a.or(m, half);
    let m = a.of_bits(m);
    // m in [√½, √2): below √½ double it and take one off the exponent.
    let sqrt_half = a.float(std::f32::consts::FRAC_1_SQRT_2);
    let low = a.cmp(CmpOp::Lt, m, sqrt_half);
    let one = a.float(1.0);
    let e_low = a.sub(e, one);
    let e = a.select(low, e_low, e);
    let doubled = a.add(m, m);
    let m = a.select(low, doubled, m);
    let m = a.sub(m, one);
    // log(1 + m) = m − m²/2 + m³·p(m).
    let z = a.mul(m, m);
    let p = horner(
        a,
        m,
        &[
            7.037_683_6e-2,
            -1.151_461e-1,
            1.167_699_9e-1,
            -1.242_014_1e-1,
            1.424_932_3e-1,
            -1.666_805_8e-1,
            2.000_071_4e-1,
            -2.499_999_4e-1,
            3.333_333e-1,
        ],
    );
    let p = a.mul(p, m);
    let y = a.mul(p, z);
    let c2 = a.float(-2.121_944_4e-4);
    let t = a.mul(e, c2);
    let y = a.add(y, t);
    let minus_half = a.float(-0.5);
    let t = a.mul(z, minus_half);
    let y = a.add(y, t);
    let r = a.add(m, y);
    let c1 = a.float(0.693_359_4);
    let t = a.mul(e, c1);
    let r = a.add(r, t);
    // log(+inf) = +inf, log(±0) = −inf, log(x < 0) = log(NaN) = NaN.
    let inf = a.float(f32::INFINITY);
    let is_inf = a.cmp(CmpOp::Eq, x, inf);
    let r = a.select(is_inf, inf, r);
    let is_zero = a.cmp(CmpOp::Eq, x, zero);
    let r = select_const(a, is_zero, f32::NEG_INFINITY, r);
    let ok = a.cmp(CmpOp::Ge, x, zero);
    let nan = a.float(f32::NAN);
    a.select(ok, r, nan)
}

/// The hyperbolic tangent.
pub(crate) fn tanh<A: Arith>(a: &mut A, x: A::F) -> A::F {
    let t = a.abs(x);
    // |x| < 0.625: t + t·z·p(z) with z = t².
    let z = a.mul(t, t);
    let p = horner(a, z, &[-5.704_988_7e-3, 2.063_909e-2, -5.373_971_6e-2, 1.333_144_2e-1, -3.333_328e-1]);
    let p = a.mul(p, z);
    let p = a.mul(p, t);
    let small = a.add(p, t);
    // Otherwise 1 − 2/(e^{2t} + 1), which is 1 once e^{2t} overflows.
    let twice = a.add(t, t);
    let e = exp(a, twice);
    let one = a.float(1.0);
    let d = a.add(e, one);
    let two = a.float(2.0);
    let q = a.div(two, d);
    let large = a.sub(one, q);
    odd_split(a, x, t, CmpOp::Ge, 0.625, large, small)
}

/// The error function.
pub(crate) fn erf<A: Arith>(a: &mut A, x: A::F) -> A::F {
    let t = a.abs(x);
    let four = a.float(4.0);
    let over = a.cmp(CmpOp::Gt, t, four);
    let t = a.select(over, four, t);
    let s = a.mul(t, t);
    // |x| <= 0.927734375: t + t·p(s).
    let p = horner(
        a,
        s,
        &[-5.967_617e-4, 4.991_194_2e-3, -2.676_813_5e-2, 1.128_199_3e-1, -3.761_253_4e-1, 1.283_791_7e-1],
    );
    let p = a.mul(p, t);
    let small = a.add(p, t);
    // Otherwise 1 − e^{q(t)}.
    let r = horner(a, t, &[-1.728_534_7e-5, 3.831_971_3e-4]);
    let u = horner(a, t, &[-3.883_964_4e-3, 2.425_462_2e-2]);
    let r = a.mul(r, s);
    let r = a.add(r, u);
    let mut r = r;
    for c in [-1.067_778_8e-1, -6.348_467e-1, -1.287_175_1e-1] {
        let m = a.mul(r, t);
        let c = a.float(c);
        r = a.add(m, c);
    }
    let m = a.mul(r, t);
    let r = a.sub(m, t);
    let e = exp(a, r);
    let one = a.float(1.0);
    let large = a.sub(one, e);
    odd_split(a, x, t, CmpOp::Gt, 0.927_734_4, large, small)
}

/// Plain Rust `f32` arithmetic: the approximations as scalar functions.
pub(crate) struct Scalar;

impl Arith for Scalar {
    type F = f32;
    type I = i32;
    type M = bool;
    fn float(&mut self, c: f32) -> f32 {
        c
    }
    fn int(&mut self, c: i32) -> i32 {
        c
    }
    fn add(&mut self, a: f32, b: f32) -> f32 {
        a + b
    }
    fn sub(&mut self, a: f32, b: f32) -> f32 {
        a - b
    }
    fn mul(&mut self, a: f32, b: f32) -> f32 {
        a * b
    }
    fn div(&mut self, a: f32, b: f32) -> f32 {
        a / b
    }
    fn abs(&mut self, a: f32) -> f32 {
        a.abs()
    }
    fn cmp(&mut self, op: CmpOp, a: f32, b: f32) -> bool {
        super::compare(op, a, b)
    }
    fn select(&mut self, m: bool, a: f32, b: f32) -> f32 {
        if m {
            a
        } else {
            b
        }
    }
    fn to_bits(&mut self, a: f32) -> i32 {
        a.to_bits() as i32
    }
    fn of_bits(&mut self, a: i32) -> f32 {
        f32::from_bits(a as u32)
    }
    fn to_float(&mut self, a: i32) -> f32 {
        a as f32
    }
    fn iadd(&mut self, a: i32, b: i32) -> i32 {
        a.wrapping_add(b)
    }
    fn isub(&mut self, a: i32, b: i32) -> i32 {
        a.wrapping_sub(b)
    }
    fn and(&mut self, a: i32, b: i32) -> i32 {
        a & b
    }
    fn or(&mut self, a: i32, b: i32) -> i32 {
        a | b
    }
    fn shl(&mut self, a: i32, bits: u8) -> i32 {
        a.wrapping_shl(bits as u32)
    }
    fn sshr(&mut self, a: i32, bits: u8) -> i32 {
        a.wrapping_shr(bits as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The distance from `got` to `want` in units of the last place of `want` as an f32
    /// (a subnormal's ulp is the smallest subnormal).
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want.abs();
        let ulp = if w < f32::MIN_POSITIVE as f64 {
            f64::from(f32::from_bits(1))
        } else {
            2f64.powi(w.log2().floor() as i32 - 23)
        };
        (got as f64 - want).abs() / ulp
    }

    /// The largest error of `f` against `reference` on `points` points evenly spread over
    /// `[lo, hi]`, plus every float in `[lo, hi]` whose bit pattern is a multiple of 4099
    /// (which samples every binade), and the argument where it occurs.
    fn max_ulps(f: fn(f32) -> f32, reference: fn(f64) -> f64, lo: f32, hi: f32, points: u32) -> (f64, f32) {
        let mut worst = (0.0, lo);
        let mut check = |x: f32| {
            let e = ulps(f(x), reference(x as f64));
            if e > worst.0 || e.is_nan() {
                worst = (e, x);
            }
        };
        for i in 0..=points {
            check(lo + (hi - lo) * (i as f32 / points as f32));
        }
        for bits in (0..u32::MAX).step_by(4099) {
            let x = f32::from_bits(bits);
            if x >= lo && x <= hi {
                check(x);
            }
        }
        worst
    }

    fn exp32(x: f32) -> f32 {
        exp(&mut Scalar, x)
    }
    fn log32(x: f32) -> f32 {
        log(&mut Scalar, x)
    }
    fn tanh32(x: f32) -> f32 {
        tanh(&mut Scalar, x)
    }
    fn erf32(x: f32) -> f32 {
        erf(&mut Scalar, x)
    }
    /// Sigmoid as the front end lowers it: `1 / (1 + exp(−x))`.
    fn sigmoid32(x: f32) -> f32 {
        1.0 / (1.0 + exp32(-x))
    }

    #[test]
    fn measured_error_bounds_hold() {
        type Case = (&'static str, fn(f32) -> f32, fn(f64) -> f64, f32, f32, f64);
        let cases: [Case; 5] = [
            ("exp", exp32, f64::exp, -87.3, 88.7, 1.0),
            ("log", log32, f64::ln, 1e-37, 1e38, 1.0),
            ("tanh", tanh32, f64::tanh, -10.0, 10.0, 1.5),
            ("erf", erf32, libm::erf, -4.0, 4.0, 1.5),
            ("sigmoid", sigmoid32, |x| 1.0 / (1.0 + (-x).exp()), -87.0, 87.0, 2.5),
        ];
        for (name, f, reference, lo, hi, bound) in cases {
            let (err, at) = max_ulps(f, reference, lo, hi, 200_000);
            eprintln!("{name}: max error {err:.3} ulp at {at:e}");
            assert!(err <= bound, "{name}: {err} ulp at {at:e}, bound {bound}");
        }
    }

    #[test]
    fn special_values() {
        let inf = f32::INFINITY;
        for f in [exp32, log32, tanh32, erf32] {
            assert!(f(f32::NAN).is_nan());
            assert!(f(-f32::NAN).is_nan());
        }
        assert_eq!(exp32(inf), inf);
        assert_eq!(exp32(-inf), 0.0);
        assert_eq!(exp32(88.8), inf);
        assert_eq!(exp32(-104.0), 0.0);
        assert_eq!(exp32(0.0), 1.0);
        // Gradual underflow: e^-100 ≈ 3.72e-44 is subnormal.
        assert!(ulps(exp32(-100.0), (-100f64).exp()) <= 1.0);
        assert_eq!(log32(0.0), -inf);
        assert_eq!(log32(-0.0), -inf);
        assert_eq!(log32(inf), inf);
        assert!(log32(-1.0).is_nan());
        assert!(log32(-inf).is_nan());
        assert_eq!(log32(1.0), 0.0);
        let tiny = f32::from_bits(1);
        assert!(ulps(log32(tiny), (tiny as f64).ln()) <= 1.0);
        for f in [tanh32, erf32] {
            assert_eq!(f(inf), 1.0);
            assert_eq!(f(-inf), -1.0);
            assert_eq!(f(1e30), 1.0);
            assert_eq!(f(-50.0), -1.0);
            assert_eq!(f(0.0).to_bits(), 0.0f32.to_bits());
            assert_eq!(f(-0.0).to_bits(), (-0.0f32).to_bits());
        }
        assert_eq!(sigmoid32(-inf), 0.0);
        assert_eq!(sigmoid32(inf), 1.0);
        assert_eq!(sigmoid32(-200.0), 0.0);
    }

    #[test]
    fn odd_functions_are_exactly_odd() {
        for i in 0..10_000 {
            let x = i as f32 * 1e-3;
            assert_eq!(tanh32(-x), -tanh32(x));
            assert_eq!(erf32(-x), -erf32(x));
        }
    }
}
