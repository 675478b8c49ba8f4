"""Privacy accounting for DP-SGD (the sampled Gaussian mechanism), as `pdgc privacy` does it.

`epsilon` gives the ε spent by `steps` steps with noise multiplier σ and sampling rate q at a
given δ; `noise_multiplier` gives the smallest σ that keeps ε at or below a target. Both take
an `accountant` keyword: `"pld"` (privacy loss distributions, the default, as in `pdgc
privacy`: a tight upper bound) or `"rdp"` (Rényi DP, exactly Opacus' `RDPAccountant`).
Invalid arguments raise `pdgc.PrivacyError`; an unknown accountant raises
`pdgc.SettingError`.
"""

from . import _pdgc

__all__ = ["ACCOUNTANTS", "EPSILON_TOLERANCE", "epsilon", "epsilon_and_order", "noise_multiplier"]

#: The accountants this version knows.
ACCOUNTANTS = ("pld", "rdp")

#: The default ε precision of `noise_multiplier` (Opacus' `epsilon_tolerance`).
EPSILON_TOLERANCE = 0.01


def _check(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise _pdgc.SettingError(f"accountant {accountant!r}: one of {', '.join(ACCOUNTANTS)}")


def epsilon_and_order(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, *, accountant: str = "pld"
) -> "tuple[float, float]":
    """ε spent after `steps` steps, and the RDP order α whose bound gave it (NaN for PLD).

    Args:
        noise_multiplier: σ ≥ 0, the noise's standard deviation over the clip norm.
        sample_rate: q in [0, 1], the probability that a step takes an example (Poisson).
        steps: the number of steps T ≥ 0.
        delta: δ in (0, 1).
        accountant: `"pld"` (default) or `"rdp"`.

    Returns:
        `(epsilon, best_order)`. With RDP, ε is `inf` when σ = 0 and T > 0; PLD raises
        `pdgc.PrivacyError` for σ = 0.
    """
    _check(accountant)
    if accountant == "pld":
        eps = _pdgc._pld_epsilon(float(noise_multiplier), float(sample_rate), int(steps), float(delta))
        return eps, float("nan")
    return _pdgc._rdp_epsilon(float(noise_multiplier), float(sample_rate), int(steps), float(delta))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, *, accountant: str = "pld") -> float:
    """ε spent after `steps` steps of DP-SGD with noise multiplier σ and sampling rate q.

    Same arguments as `epsilon_and_order`; this is `pdgc privacy --noise σ`'s ε.
    """
    return epsilon_and_order(noise_multiplier, sample_rate, steps, delta, accountant=accountant)[0]


def noise_multiplier(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: str = "pld",
    tolerance: float = EPSILON_TOLERANCE,
) -> float:
    """The smallest σ whose ε after `steps` steps is at most `target_epsilon`.

    With RDP the search is Opacus' `get_noise_multiplier` (double σ from 10, then bisect): the
    returned σ's ε lies in `[target_epsilon - tolerance, target_epsilon]`, and it is 0 when
    no noise is needed (q = 0 or no steps). With PLD, σ is the smallest to within 0.001
    whose ε is at most the target (`tolerance` is not used). This is `pdgc privacy
    --epsilon ε`'s σ.
    """
    _check(accountant)
    if accountant == "pld":
        return _pdgc._pld_noise_multiplier(float(target_epsilon), float(sample_rate), int(steps), float(delta))
    return _pdgc._rdp_noise_multiplier(
        float(target_epsilon), float(sample_rate), int(steps), float(delta), float(tolerance)
    )
