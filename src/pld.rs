//! Privacy accounting with privacy loss distributions (PLD): a numerical (ε, δ) accountant
//! for T steps of the Poisson-subsampled Gaussian mechanism, tighter than RDP's conversion.
//! It owns no training state; callers pass the noise multiplier σ, the sampling rate q, the
//! number of steps T and δ. [`crate::privacy`] holds the RDP accountant and chooses between
//! the two ([`crate::privacy::Accountant`]).
//!
//! One step's output is x ~ μ₀ = N(0, σ²) without the example and x ~ μ = (1 − q)μ₀ + q N(1, σ²)
//! with it (sensitivity 1 after clipping, one coordinate suffices). Under add-or-remove
//! adjacency both orders of the pair matter:
//!
//! * *remove*: the loss L = log(μ/μ₀)(x) = log(1 − q + q e^{(2x − 1)/(2σ²)}) for x ~ μ;
//! * *add*: the loss L = log(μ₀/μ)(x), the same expression negated, for x ~ μ₀.
//!
//! The (ε, δ) guarantee of T steps is δ(ε) = E[(1 − e^{ε − L_T})₊] + P(L_T = ∞), L_T the sum
//! of T independent losses (the hockey-stick divergence of the composed pair); each
//! direction gives an ε for the target δ and the larger one is reported.
//!
//! Discretization ("connect the dots", Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022,
//! arXiv:2207.04380): one step's exact δ(ε) is evaluated in closed form (normal tails, see
//! [`step_delta`]) at the grid εᵢ = i·h; as a function of e^ε the hockey-stick curve is
//! convex, so the polyline through those points lies above it, and it is itself the curve of
//! a loss distribution supported on the grid (the mass of the losses between two grid points
//! split between them, see `step_pmf`; the mass δ(ε_max) at +∞). That distribution *dominates* the true one: every ε it
//! reports for a δ is an upper bound on the true ε, after any number of compositions. Unlike
//! rounding each loss up to the grid (which shifts a T-fold composition's losses by up to
//! T·h, 1.4 for T = 14062 at h = 10⁻⁴), its error does not add up step by step.
//!
//! Composition is convolution on the grid, done by FFT (`rustfft`), T-fold by repeated
//! squaring. The FFT's rounding noise (about 10⁻¹⁶ of the largest mass) drowns the true
//! tails, so they are bounded rather than summed: after every convolution of k steps the
//! result is cut to the window outside which Chernoff bounds from one step's moment
//! generating function (`TailBounds`) leave at most [`TAIL_MASS`]/2 per side, and that
//! bound goes to the +∞ mass (pessimistic whatever was cut). One step's grid leaves out x
//! beyond 9σ and folds its outermost 10⁻¹⁸ of mass up (onto the lowest loss kept, or to
//! +∞). All of this adds at most 2·log₂(T)·[`TAIL_MASS`] + 2·10⁻¹⁸·T to δ: below 3·10⁻¹³
//! at T = 10⁵, 2·10⁻⁹ at T = 10⁹.
//!
//! Bad arguments (σ ≤ 0, q ∉ (0, 1], δ ∉ (0, 1), T = 0, NaN, a target ε ≤ 0) are
//! [`Error::Privacy`], never a panic.

use rustfft::num_complex::Complex;
use rustfft::FftPlanner;

use crate::error::{Error, Result};

/// The loss grid spacing h (what `dp_accounting` uses by default).
pub const DEFAULT_DISCRETIZATION: f64 = 1e-4;

/// The mass each convolution may move out of its two tails (half per tail).
pub const TAIL_MASS: f64 = 1e-15;

/// [`noise_multiplier`]'s precision: the σ it returns is at most this much above the
/// smallest σ whose ε is within the target.
pub const SIGMA_TOLERANCE: f64 = 1e-3;

/// [`noise_multiplier`] gives up above this σ (as the RDP search does).
pub const MAX_NOISE_MULTIPLIER: f64 = 1e6;

/// The mass of one step's lowest losses folded onto the lowest loss kept, and (with the
/// mass beyond the grid) the most moved to +∞; T steps add at most T times this to δ.
const STEP_TAIL: f64 = 1e-18;

/// One step's grid covers x within this many σ of the two means; Φ̄(9) ≈ 1.1·10⁻¹⁹.
const NOISE_TAILS: f64 = 9.0;

/// The most grid points T composed steps may take; a grid that would need more is coarsened
/// (only where ε is in the hundreds), which keeps the bound valid.
const MAX_COMPOSED_BINS: f64 = (1 << 20) as f64;

/// The most grid points one step may take; a finer grid is coarsened to this many (only
/// for σ below about 0.2, where ε is large anyway), which keeps the bound valid.
const MAX_STEP_BINS: f64 = (1 << 20) as f64;

/// The two orders of the pair (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Loss of the run with the example against the run without it.
    Remove,
    /// Loss of the run without the example against the run with it.
    Add,
}

/// A discretized privacy loss distribution: mass `probs[i]` at the loss (lowest + i)·h and
/// `infinity` at +∞.
#[derive(Debug, Clone)]
struct Pmf {
    lowest: i64,
    probs: Vec<f64>,
    infinity: f64,
}

/// ε spent after `steps` steps of the Poisson-subsampled Gaussian mechanism at δ, with the
/// default grid spacing.
pub fn epsilon(noise_multiplier: f64, sample_rate: f64, steps: u64, delta: f64) -> Result<f64> {
    epsilon_with(noise_multiplier, sample_rate, steps, delta, DEFAULT_DISCRETIZATION)
}

/// [`epsilon`] on a grid of spacing `discretization` (> 0): finer is tighter and slower.
pub fn epsilon_with(
    noise_multiplier: f64,
    sample_rate: f64,
    steps: u64,
    delta: f64,
    discretization: f64,
) -> Result<f64> {
    check(noise_multiplier, sample_rate, steps, delta)?;
    if !(discretization > 0.0 && discretization.is_finite()) {
        return Err(Error::Privacy(format!("the PLD grid spacing must be a positive number, got {discretization}")));
    }
    let mut planner = FftPlanner::new();
    let mut worst: f64 = 0.0;
    for direction in [Direction::Remove, Direction::Add] {
        let (mut step, mut h) = step_pmf(noise_multiplier, sample_rate, direction, discretization);
        let (low, high) = TailBounds::new(&step, h).window(steps, h);
        let bins = ((high - low) as f64).min(step.probs.len() as f64 * steps as f64);
        if bins > MAX_COMPOSED_BINS {
            (step, h) = step_pmf(noise_multiplier, sample_rate, direction, h * bins / MAX_COMPOSED_BINS);
        }
        let composed = self_compose(&step, h, steps, &mut planner);
        worst = worst.max(epsilon_for_delta(&composed, h, delta));
    }
    Ok(worst)
}

/// The smallest σ whose PLD ε after `steps` steps is at most `target_epsilon`, within
/// [`SIGMA_TOLERANCE`]: bracketed from RDP's σ for the target (or by doubling from σ = 1
/// where RDP finds none), shrinking by 3/4 until ε exceeds the target, then bisected. The
/// returned σ's ε is at most the target.
pub fn noise_multiplier(target_epsilon: f64, sample_rate: f64, steps: u64, delta: f64) -> Result<f64> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(Error::Privacy(format!("the target ε must be a positive finite number, got {target_epsilon}")));
    }
    check(1.0, sample_rate, steps, delta)?;
    let within = |sigma: f64| epsilon(sigma, sample_rate, steps, delta).map(|e| e <= target_epsilon);
    // Invariant once bracketed: ε(high) ≤ target < ε(low). RDP's σ for the target bounds the
    // answer from above (its ε is never below PLD's), which saves most of the bracketing.
    let mut high = match crate::privacy::noise_multiplier(target_epsilon, sample_rate, steps, delta) {
        Ok(sigma) if sigma > 0.0 && within(sigma)? => sigma,
        _ => {
            let mut sigma = 1.0;
            while !within(sigma)? {
                sigma *= 2.0;
                if sigma > MAX_NOISE_MULTIPLIER {
                    return Err(Error::Privacy(format!(
                        "ε = {target_epsilon} at δ = {delta:e} is out of reach: even σ = {MAX_NOISE_MULTIPLIER:e} \
                         spends more (sample rate {sample_rate}, {steps} steps)"
                    )));
                }
            }
            sigma
        }
    };
    let mut low;
    loop {
        let lower = high * 0.75;
        if high - lower <= SIGMA_TOLERANCE || !within(lower)? {
            low = lower;
            break;
        }
        high = lower;
    }
    while high - low > SIGMA_TOLERANCE {
        let mid = (low + high) / 2.0;
        if within(mid)? {
            high = mid;
        } else {
            low = mid;
        }
    }
    Ok(high)
}

/// One step's exact δ(ε) in one direction: ∫ (P − e^ε Q)₊ with (P, Q) = (μ, μ₀) for
/// [`Direction::Remove`] and (μ₀, μ) for [`Direction::Add`], from normal tail
/// probabilities. The set where P/Q > e^ε is a half-line x > x* (remove) or x < x* (add).
pub fn step_delta(sigma: f64, q: f64, direction: Direction, eps: f64) -> f64 {
    let em1 = eps.exp_m1(); // e^ε − 1, exact near ε = 0.
    let x = threshold(sigma, q, direction, eps);
    let delta = match direction {
        // μ/μ₀ = 1 − q + q e^{(2x − 1)/(2σ²)} > e^ε everywhere if e^ε ≤ 1 − q.
        Direction::Remove if x == f64::NEG_INFINITY => -em1,
        Direction::Remove => q * upper_tail((x - 1.0) / sigma) - (em1 + q) * upper_tail(x / sigma),
        // μ₀/μ > e^ε nowhere if e^{−ε} ≤ 1 − q.
        Direction::Add if x == f64::NEG_INFINITY => 0.0,
        // Φ(x/σ)·(1 − e^ε(1 − q)) − q e^ε Φ((x − 1)/σ), with 1 − e^ε(1 − q) = q − (1 − q)(e^ε − 1).
        Direction::Add => {
            (q - (1.0 - q) * em1) * upper_tail(-x / sigma) - q * eps.exp() * upper_tail((1.0 - x) / sigma)
        }
    };
    delta.clamp(0.0, 1.0)
}

fn check(sigma: f64, q: f64, steps: u64, delta: f64) -> Result<()> {
    if !(sigma > 0.0 && sigma.is_finite()) {
        return Err(Error::Privacy(format!("the noise multiplier σ must be a finite number > 0, got {sigma}")));
    }
    if !(q > 0.0 && q <= 1.0) {
        return Err(Error::Privacy(format!("the sample rate q must be in (0, 1], got {q}")));
    }
    if steps == 0 {
        return Err(Error::Privacy("the number of steps must be at least 1".into()));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(Error::Privacy(format!("δ must be in (0, 1), got {delta}")));
    }
    Ok(())
}

/// P(Z > z) for a standard normal Z, accurate in the far tail.
fn upper_tail(z: f64) -> f64 {
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

/// The remove direction's loss log(1 − q + q e^t), t = (2x − 1)/(2σ²), without overflow.
fn remove_loss(sigma: f64, q: f64, x: f64) -> f64 {
    let t = (2.0 * x - 1.0) / (2.0 * sigma * sigma);
    if t > 0.0 {
        t + (q + (1.0 - q) * (-t).exp()).ln()
    } else {
        (q * t.exp_m1()).ln_1p()
    }
}

/// One step's dominating PLD on the grid (connect the dots, see the module doc), and the
/// grid spacing used (`discretization`, or coarser where the grid would be too long).
///
/// The masses come interval by interval rather than from second differences of δ (which
/// lose every digit where δ is close to 1): a loss ℓ in Iᵢ = (εᵢ, εᵢ₊₁] with P-mass P(Iᵢ)
/// and Q-mass Q(Iᵢ) sends Dᵢ/(1 − e^{−h}) to εᵢ₊₁, Dᵢ = P(Iᵢ) − e^{εᵢ} Q(Iᵢ), and the rest
/// to εᵢ; the two lines (1 − x e^{−εᵢ})₊ and (1 − x e^{−εᵢ₊₁})₊ so weighted meet the loss's
/// own curve at x = 0 and x = e^{εᵢ} and lie above it in between. Losses below the grid go
/// up to its first point; above it, δ(ε_max) goes to +∞ and the rest to ε_max.
fn step_pmf(sigma: f64, q: f64, direction: Direction, discretization: f64) -> (Pmf, f64) {
    let (x_low, x_high) = (-NOISE_TAILS * sigma, 1.0 + NOISE_TAILS * sigma);
    let (loss_low, loss_high) = match direction {
        Direction::Remove => (remove_loss(sigma, q, x_low), remove_loss(sigma, q, x_high)),
        Direction::Add => (-remove_loss(sigma, q, x_high), -remove_loss(sigma, q, x_low)),
    };
    let mut h = discretization;
    if (loss_high - loss_low) / h > MAX_STEP_BINS {
        h = (loss_high - loss_low) / MAX_STEP_BINS;
    }
    let (first, last) = ((loss_low / h).floor() as i64, (loss_high / h).ceil() as i64);
    let n = (last - first + 1) as usize;
    // The x where the loss crosses each grid point (remove: increasing in x, add: decreasing).
    let xs: Vec<f64> = (first..=last).map(|i| threshold(sigma, q, direction, i as f64 * h)).collect();
    // (P, Q) masses of the losses in (a, b], given the x thresholds of a and b.
    let (z0, z1) = (|x: f64| x / sigma, |x: f64| (x - 1.0) / sigma);
    let masses = |xa: f64, xb: f64| -> (f64, f64) {
        let (lo, hi) = match direction {
            Direction::Remove => (xa, xb),
            Direction::Add => (xb, xa),
        };
        let null = normal_mass(z0(lo), z0(hi));
        let mixture = (1.0 - q) * null + q * normal_mass(z1(lo), z1(hi));
        match direction {
            Direction::Remove => (mixture, null),
            Direction::Add => (null, mixture),
        }
    };
    let inf = match direction {
        Direction::Remove => f64::INFINITY,
        Direction::Add => f64::NEG_INFINITY,
    };
    let shrink = -(-h).exp_m1(); // 1 − e^{−h}
    let mut probs = vec![0.0; n];
    probs[0] = masses(-inf, xs[0]).0;
    for i in 0..n - 1 {
        let (p, q_mass) = masses(xs[i], xs[i + 1]);
        let eps = (first + i as i64) as f64 * h;
        let up = ((p - eps.exp() * q_mass) / shrink).clamp(0.0, p);
        probs[i] += p - up;
        probs[i + 1] += up;
    }
    let top = last as f64 * h;
    let (p_above, q_above) = masses(xs[n - 1], inf);
    let infinity = (p_above - top.exp() * q_above).clamp(0.0, p_above);
    probs[n - 1] += p_above - infinity;
    // Fold the far tails: the lowest mass up onto the first loss kept, the highest to +∞.
    let (mut below, mut start) = (0.0, 0);
    while start + 1 < n && below + probs[start] <= STEP_TAIL {
        below += probs[start];
        start += 1;
    }
    let (mut above, mut end) = (infinity, n);
    while end > start + 1 && above + probs[end - 1] <= 2.0 * STEP_TAIL {
        above += probs[end - 1];
        end -= 1;
    }
    let mut kept = probs[start..end].to_vec();
    kept[0] += below;
    (Pmf { lowest: first + start as i64, probs: kept, infinity: above }, h)
}

/// The x at which one step's loss equals `eps`: the loss exceeds `eps` for x above it
/// (remove) or below it (add); −∞ where it does for every x or for none.
fn threshold(sigma: f64, q: f64, direction: Direction, eps: f64) -> f64 {
    let em1 = match direction {
        Direction::Remove => eps.exp_m1(),
        Direction::Add => (-eps).exp_m1(),
    };
    if em1 <= -q {
        return f64::NEG_INFINITY;
    }
    sigma * sigma * (em1 / q).ln_1p() + 0.5
}

/// P(a < Z ≤ b) for a standard normal Z, from the tail on the side away from 0 so that
/// small masses keep their digits.
fn normal_mass(a: f64, b: f64) -> f64 {
    if b <= a {
        0.0
    } else if a >= 0.0 {
        upper_tail(a) - upper_tail(b)
    } else if b <= 0.0 {
        upper_tail(-b) - upper_tail(-a)
    } else {
        1.0 - upper_tail(b) - upper_tail(-a)
    }
}

/// Chernoff bounds on the tails of one step's loss composed k times: with
/// M(λ) = Σᵢ pᵢ e^{λεᵢ} (the finite part only), P(L_k ≥ b) ≤ M(λ)^k e^{−λb} and
/// P(L_k ≤ a) ≤ M(−λ)^k e^{λa} for every λ > 0. The same bounds hold for compositions of
/// pieces already cut (they hold less finite mass), so they tell where a convolution's
/// result can be cut without looking at its tails, which FFT rounding drowns in noise.
struct TailBounds {
    /// (λ, log M(λ)) for λ > 0, and (λ, log M(−λ)).
    upper: Vec<(f64, f64)>,
    lower: Vec<(f64, f64)>,
}

impl TailBounds {
    fn new(step: &Pmf, h: f64) -> TailBounds {
        let log_mgf = |lambda: f64| {
            let terms: Vec<f64> = step
                .probs
                .iter()
                .enumerate()
                .filter(|(_, &p)| p > 0.0)
                .map(|(i, &p)| p.ln() + lambda * (step.lowest + i as i64) as f64 * h)
                .collect();
            let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln()
        };
        let lambdas: Vec<f64> = (0..14).map(|j| f64::from(1u32 << j) / 16.0).collect();
        TailBounds {
            upper: lambdas.iter().map(|&l| (l, log_mgf(l))).collect(),
            lower: lambdas.iter().map(|&l| (l, log_mgf(-l))).collect(),
        }
    }

    /// Grid indices [low, high] outside which `k` composed steps hold at most
    /// [`TAIL_MASS`]/2 on each side.
    fn window(&self, k: u64, h: f64) -> (i64, i64) {
        let (k, log_tail) = (k as f64, (TAIL_MASS / 2.0).ln());
        let high = self.upper.iter().map(|&(l, m)| (k * m - log_tail) / l).fold(f64::INFINITY, f64::min);
        let low = self.lower.iter().map(|&(l, m)| (log_tail - k * m) / l).fold(f64::NEG_INFINITY, f64::max);
        let clamp = |x: f64| x.clamp(-1e15, 1e15) as i64;
        (clamp((low / h).floor()), clamp((high / h).ceil()))
    }
}

/// Keeps the grid indices in `window` (at least one entry); each side cut moves its bound,
/// [`TAIL_MASS`]/2, to +∞ (more than it held: pessimistic whatever the losses cut were).
fn cut(pmf: Pmf, (low, high): (i64, i64)) -> Pmf {
    let Pmf { lowest, probs, mut infinity } = pmf;
    let last = lowest + probs.len() as i64 - 1;
    let start = (low.max(lowest) - lowest).min(probs.len() as i64 - 1) as usize;
    let end = ((high.min(last) - lowest + 1).max(start as i64 + 1)) as usize;
    if start > 0 {
        infinity += TAIL_MASS / 2.0;
    }
    if end < probs.len() {
        infinity += TAIL_MASS / 2.0;
    }
    Pmf { lowest: lowest + start as i64, probs: probs[start..end].to_vec(), infinity }
}

/// The PLD of `a` and `b` composed: the convolution of their grids (one complex FFT carries
/// both, `a` in the real part and `b` in the imaginary part), cut to `window`.
fn convolve(a: &Pmf, b: &Pmf, window: (i64, i64), planner: &mut FftPlanner<f64>) -> Pmf {
    let len = a.probs.len() + b.probs.len() - 1;
    let n = fft_len(len);
    let mut z: Vec<Complex<f64>> = (0..n)
        .map(|k| Complex::new(a.probs.get(k).copied().unwrap_or(0.0), b.probs.get(k).copied().unwrap_or(0.0)))
        .collect();
    planner.plan_fft_forward(n).process(&mut z);
    // With W_k = conj(Z_{n−k}): A_k = (Z_k + W_k)/2 and B_k = (Z_k − W_k)/(2i), so
    // A_k·B_k = (Z_k² − W_k²)/(4i).
    let quarter_over_i = Complex::new(0.0, -0.25 / n as f64);
    let mut product: Vec<Complex<f64>> = (0..n)
        .map(|k| {
            let (zk, wk) = (z[k], z[(n - k) % n].conj());
            (zk * zk - wk * wk) * quarter_over_i
        })
        .collect();
    planner.plan_fft_inverse(n).process(&mut product);
    let probs = product[..len].iter().map(|c| c.re).collect();
    let infinity = a.infinity + b.infinity - a.infinity * b.infinity;
    cut(Pmf { lowest: a.lowest + b.lowest, probs, infinity }, window)
}

/// The smallest 2ᵃ·3ᵇ ≥ `len` (sizes rustfft transforms fastest).
fn fft_len(len: usize) -> usize {
    let mut best = len.next_power_of_two();
    let mut three = 1usize;
    while three < best {
        let candidate = three * (len.div_ceil(three)).next_power_of_two();
        best = best.min(candidate);
        three *= 3;
    }
    best
}

/// `step` composed with itself `times` ≥ 1 times, by repeated squaring, each result cut to
/// its [`TailBounds`] window.
fn self_compose(step: &Pmf, h: f64, times: u64, planner: &mut FftPlanner<f64>) -> Pmf {
    let bounds = TailBounds::new(step, h);
    let mut result: Option<(Pmf, u64)> = None;
    let mut power = (cut(step.clone(), bounds.window(1, h)), 1u64);
    let mut rest = times;
    loop {
        if rest & 1 == 1 {
            result = Some(match result {
                None => power.clone(),
                Some((r, k)) => (convolve(&r, &power.0, bounds.window(k + power.1, h), planner), k + power.1),
            });
        }
        rest >>= 1;
        if rest == 0 {
            break;
        }
        power = (convolve(&power.0, &power.0, bounds.window(2 * power.1, h), planner), 2 * power.1);
    }
    result.map_or(power.0, |(r, _)| r)
}

/// The smallest ε ≥ 0 with δ(ε) = P(∞) + Σᵢ pᵢ (1 − e^{ε − εᵢ})₊ ≤ `delta`; ∞ if the +∞
/// mass alone exceeds `delta`. Between two grid losses δ(ε) = U − e^ε·W, with U and W the
/// masses above under the two distributions; the scan goes down from the top.
fn epsilon_for_delta(pmf: &Pmf, h: f64, delta: f64) -> f64 {
    if pmf.infinity > delta {
        return f64::INFINITY;
    }
    // W is kept as its logarithm: e^{−εᵢ} underflows where losses pass 745.
    let (mut upper, mut log_lower) = (pmf.infinity, f64::NEG_INFINITY);
    for (i, &p) in pmf.probs.iter().enumerate().rev() {
        let loss = (pmf.lowest + i as i64) as f64 * h;
        if upper > delta && (upper - delta).ln() - log_lower >= loss {
            break;
        }
        if p > 0.0 {
            upper += p;
            let term = p.ln() - loss;
            let (a, b) = if term > log_lower { (log_lower, term) } else { (term, log_lower) };
            log_lower = b + (a - b).exp().ln_1p();
        }
    }
    if upper <= delta {
        return 0.0;
    }
    ((upper - delta).ln() - log_lower).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fft_lengths_are_smooth_and_long_enough() {
        for len in [1, 2, 3, 5, 7, 100, 1000, 4097, 100_001] {
            let n = fft_len(len);
            let mut m = n;
            while m.is_multiple_of(2) {
                m /= 2;
            }
            while m.is_multiple_of(3) {
                m /= 3;
            }
            assert!(n >= len && m == 1 && n < 2 * len.max(2), "{len} → {n}");
        }
    }

    #[test]
    fn convolution_matches_the_direct_sum() {
        let a = Pmf { lowest: -2, probs: vec![0.1, 0.2, 0.3, 0.4], infinity: 0.0 };
        let b = Pmf { lowest: 5, probs: vec![0.5, 0.25, 0.25], infinity: 0.0 };
        let c = convolve(&a, &b, (i64::MIN / 2, i64::MAX / 2), &mut FftPlanner::new());
        let mut want = vec![0.0; 6];
        for (i, x) in a.probs.iter().enumerate() {
            for (j, y) in b.probs.iter().enumerate() {
                want[i + j] += x * y;
            }
        }
        assert_eq!(c.lowest, 3);
        assert_eq!(c.probs.len(), 6);
        for (got, want) in c.probs.iter().zip(&want) {
            assert!((got - want).abs() < 1e-15, "{:?} vs {want:?}", c.probs);
        }
    }

    #[test]
    fn step_pmf_has_unit_mass_and_matches_delta_on_the_grid() {
        for (sigma, q) in [(1.0, 0.01), (0.8, 0.3), (2.0, 1.0)] {
            for direction in [Direction::Remove, Direction::Add] {
                let (pmf, h) = step_pmf(sigma, q, direction, 1e-3);
                let total: f64 = pmf.probs.iter().sum::<f64>() + pmf.infinity;
                assert!((total - 1.0).abs() < 1e-9, "σ={sigma} q={q} {direction:?}: mass {total}");
                // The discretized δ(ε) equals the exact one at grid points (connect the dots).
                for eps in [0.0, 0.1, 0.5, 1.0] {
                    let exact = step_delta(sigma, q, direction, eps);
                    let grid: f64 = pmf.infinity
                        + pmf
                            .probs
                            .iter()
                            .enumerate()
                            .map(|(i, p)| p * (-(eps - (pmf.lowest + i as i64) as f64 * h).exp_m1()).max(0.0))
                            .sum::<f64>();
                    assert!((grid - exact).abs() < 1e-9, "σ={sigma} q={q} {direction:?} ε={eps}: {grid} vs {exact}");
                }
            }
        }
    }
}
