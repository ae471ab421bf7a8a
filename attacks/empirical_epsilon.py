"""Empirical lower bounds on epsilon from membership scores (privacy auditing).

A mechanism that is (eps, delta)-DP forces every membership test to satisfy
FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta (Kairouz et al. 2015), so measured
error rates give a lower bound on eps. An empirical bound above the accountant's epsilon means the
implementation (or the accountant) is broken.

Three bounds, all with the `metrics` convention (higher score = member):
- Clopper-Pearson (Jagielski et al., NeurIPS 2020): exact binomial upper bounds on FPR and FNR.
- Gaussian DP (Nasr et al., USENIX 2023, arXiv 2302.07956): the same bounds read as a mu-GDP
  lower bound, converted to epsilon at delta.
- One run (Steinke, Nasr & Jagielski, NeurIPS 2023, arXiv 2305.08846): canaries included with
  probability 1/2 each, scored after a single training run.

Validity. The first two treat each score as an independent trial (one model per trial, or
canaries whose scores do not interact); the one-run bound needs only the random 1/2 inclusion.
With `threshold_correction="bonferroni"` (default) the bound holds with probability >= confidence
even though the threshold is picked after seeing the scores. `"none"` reproduces the common
practice of maximising over thresholds at the nominal level: optimistic, not a valid confidence
statement. Cross-checked against google-deepmind/jax_privacy `auditing.py`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import beta as beta_dist
from scipy.stats import binom, norm

from attacks.scores import confusion_counts, validate_scores

THRESHOLD_CORRECTIONS = ("bonferroni", "none")
# Fractions of the m canaries guessed on (half "in" from the top, half "out" from the bottom) that
# `one_run_epsilon_lb_best` tries; fixed here, before any scores are seen.
DEFAULT_GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class ThresholdBound(NamedTuple):
    epsilon: float  # lower bound on epsilon, >= 0
    threshold: float  # score threshold that achieved it (NaN when epsilon == 0)


class GdpBound(NamedTuple):
    epsilon: float
    mu: float  # lower bound on mu (may be <= 0: no evidence)
    threshold: float


class OneRunBound(NamedTuple):
    epsilon: float
    k_plus: int
    k_minus: int
    num_guesses: int  # r = k_plus + k_minus
    num_correct: int  # v


def _check_delta_confidence(delta: float, confidence: float) -> None:
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def clopper_pearson_upper(k: Any, n: int, significance: float) -> np.ndarray:
    """One-sided upper bound p on a binomial rate from k of n: P[Bin(n, p) <= k] = significance.

    p = Beta^-1(1 - significance; k + 1, n - k), and 1 when k = n. For k = 0: 1 - significance^(1/n).
    """
    k = np.asarray(k)
    return np.where(k < n, beta_dist.ppf(1 - significance, k + 1, np.maximum(n - k, 1)), 1.0)


def _rate_upper_bounds(
    scores: Any, is_member: Any, confidence: float, threshold_correction: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, FPR_ub, FNR_ub), each (T + 1,), for the rule "member if score >= t"."""
    if threshold_correction not in THRESHOLD_CORRECTIONS:
        raise ValueError(f"threshold_correction must be one of {THRESHOLD_CORRECTIONS}, "
                         f"got {threshold_correction!r}")
    thresholds, tp, fp = confusion_counts(scores, is_member)
    n_pos, n_neg = int(tp[-1]), int(fp[-1])
    # Half the failure probability to each rate (union bound): members' and non-members' scores
    # come from the same model(s), so we do not assume the two bounds fail independently.
    sig_fpr = sig_fnr = (1.0 - confidence) / 2
    if threshold_correction == "bonferroni":
        # Simultaneous over all thresholds: FP(t) and FPR(t) both fall as t grows, so a miss at any
        # t with FP(t) = k implies a miss at one fixed, data-independent threshold (the last t with
        # FPR(t) >= ub(k)). Counts k = 0..n-1 can miss (k = n has bound 1): n events per rate.
        sig_fpr /= n_neg
        sig_fnr /= n_pos
    fpr_ub = clopper_pearson_upper(fp, n_neg, sig_fpr)
    fnr_ub = clopper_pearson_upper(n_pos - tp, n_pos, sig_fnr)
    return thresholds, fpr_ub, fnr_ub


def _log_positive(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), -np.inf)


def epsilon_lb_clopper_pearson(
    scores: Any,
    is_member: Any,
    delta: float,
    confidence: float = 0.95,
    *,
    threshold_correction: str = "bonferroni",
) -> ThresholdBound:
    """Jagielski et al. 2020: eps_LB = max_t max(ln((1 - delta - FNR_ub) / FPR_ub),
    ln((1 - delta - FPR_ub) / FNR_ub)), clipped at 0.

    FPR_ub and FNR_ub are one-sided Clopper-Pearson upper bounds, each at significance
    (1 - confidence) / 2, further divided by #non-members (resp. #members) under the Bonferroni
    correction. Both ratios use the same two bounds, so the swapped form costs nothing extra.
    scores, is_member: (N,). Returns the bound and the threshold that achieved it.
    """
    _check_delta_confidence(delta, confidence)
    thresholds, fpr_ub, fnr_ub = _rate_upper_bounds(scores, is_member, confidence,
                                                    threshold_correction)
    eps = np.maximum(_log_positive(1 - delta - fnr_ub) - np.log(fpr_ub),
                     _log_positive(1 - delta - fpr_ub) - _log_positive(fnr_ub))
    i = int(np.argmax(eps))
    if not eps[i] > 0:
        return ThresholdBound(0.0, math.nan)
    return ThresholdBound(float(eps[i]), float(thresholds[i]))


def gdp_delta(mu: float, eps: float) -> float:
    """delta(eps) of mu-GDP (Dong, Roth & Su 2022, Cor. 2.13):
    delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).

    Equal to the tight delta of the Gaussian mechanism with sensitivity 1 and sigma = 1/mu
    (Balle & Wang 2018). Computed in log space so tiny deltas keep their precision.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if mu <= 0:
        return 0.0
    return math.exp(_log_gdp_delta(mu, eps))


def _log_gdp_delta(mu: float, eps: float) -> float:
    log_a = norm.logcdf(-eps / mu + mu / 2)
    log_b = eps + norm.logcdf(-eps / mu - mu / 2)
    diff = min(log_b - log_a, -1e-300)  # log_b < log_a for mu > 0; guard the rounding
    return float(log_a + math.log(-math.expm1(diff)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest eps >= 0 with gdp_delta(mu, eps) <= delta (the eps of mu-GDP at delta).

    0 for mu <= 0. delta in (0, 1): at delta = 0 every mu > 0 gives eps = inf.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1) for the GDP conversion, got {delta}")
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    log_delta = math.log(delta)
    lo, hi = 0.0, 1.0
    # delta(eps) falls monotonically in eps: bracket by doubling, then solve in log space.
    while _log_gdp_delta(mu, hi) > log_delta:
        lo, hi = hi, 2 * hi
    return float(brentq(lambda e: _log_gdp_delta(mu, e) - log_delta, lo, hi, xtol=1e-12))


def epsilon_lb_gdp(
    scores: Any,
    is_member: Any,
    delta: float,
    confidence: float = 0.95,
    *,
    threshold_correction: str = "bonferroni",
) -> GdpBound:
    """Nasr et al. 2023: mu_LB = max_t Phi^-1(1 - FPR_ub) - Phi^-1(FNR_ub), then eps = gdp_epsilon.

    Same FPR_ub, FNR_ub (and correction) as `epsilon_lb_clopper_pearson`. mu_LB is symmetric in
    the two bounds, so the swapped test adds nothing. Caveat: mu_LB is a valid lower bound on the
    mu of any mu-GDP mechanism; the epsilon is a lower bound only for mechanisms whose privacy
    profile is Gaussian-shaped (as DP-SGD's nearly is), not a distribution-free one.
    delta in (0, 1). Returns (epsilon, mu_LB, threshold).
    """
    _check_delta_confidence(delta, confidence)
    if delta == 0:
        raise ValueError("delta must be > 0 for the GDP conversion")
    thresholds, fpr_ub, fnr_ub = _rate_upper_bounds(scores, is_member, confidence,
                                                    threshold_correction)
    mu = norm.isf(fpr_ub) - norm.ppf(fnr_ub)
    i = int(np.argmax(mu))
    mu_lb = float(mu[i])
    if not mu_lb > 0:
        return GdpBound(0.0, mu_lb, math.nan)
    eps = gdp_epsilon(mu_lb, delta)
    return GdpBound(eps, mu_lb, float(thresholds[i]) if eps > 0 else math.nan)


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al. 2023, Thm 5.2: for an (eps, delta)-DP mechanism, P[W >= v] is at most

        f(v) + 2 m delta max_{i=1..v} (f(v - i) - f(v)) / i,   f(u) = P[Binomial(r, q) >= u],

    q = e^eps / (1 + e^eps), with m canaries, r guesses and W correct guesses (delta = 0: f(v)).
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = float(expit(eps))
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return tail
    i = np.arange(1, v + 1)
    window = binom.sf(v - i - 1, r, q) - tail  # P[v - i <= Binomial(r, q) < v]
    return min(1.0, tail + float(np.max(window / i)) * delta * 2 * m)


def _largest_rejected_eps(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """Largest eps (to ~1e-10) whose (eps, delta)-DP claim the test rejects at `significance`."""

    def rejects(eps: float) -> bool:
        return one_run_p_value(m, r, v, eps, delta) < significance

    if not rejects(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejects(hi):
        lo, hi = hi, 2 * hi
    # Bisection keeps `lo` rejected, so the answer is a rejected claim even if the p-value is not
    # monotone in eps; rejecting eps also rejects every smaller one (DP is monotone in eps).
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejects(mid) else (lo, mid)
    return lo


def _ranked(scores: Any, is_included: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    s, inc = validate_scores(scores, is_included, require_both_classes=False)
    # Ties are broken at random: breaking them by position would leak the labels whenever the
    # caller lists included canaries first.
    perm = np.random.default_rng(seed).permutation(s.size)
    order = perm[np.argsort(-s[perm], kind="stable")]
    return order, inc


def _count_correct(order: np.ndarray, inc: np.ndarray, k_plus: int, k_minus: int) -> int:
    guess_in, guess_out = order[:k_plus], order[order.size - k_minus:]
    return int(inc[guess_in].sum() + (~inc[guess_out]).sum())


def _check_ks(m: int, k_plus: int, k_minus: int) -> None:
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus == 0 or k_plus + k_minus > m:
        raise ValueError(f"need k_plus, k_minus >= 0 and 1 <= k_plus + k_minus <= m = {m}, "
                         f"got {k_plus}, {k_minus}")


def one_run_epsilon_lb(
    scores: Any,
    is_included: Any,
    k_plus: int,
    k_minus: int,
    delta: float,
    confidence: float = 0.95,
    *,
    seed: int = 0,
) -> OneRunBound:
    """One-run audit (Steinke, Nasr & Jagielski 2023): guess "in" for the k_plus highest scores,
    "out" for the k_minus lowest, abstain on the rest; v correct of r = k_plus + k_minus.

    eps_LB = the largest eps with one_run_p_value(m, r, v, eps, delta) < 1 - confidence; for
    delta = 0, P[Binomial(r, e^eps/(1+e^eps)) >= v] < 1 - confidence. Requires that each of the
    m canaries was included independently with probability 1/2 and that k_plus, k_minus were fixed
    before looking at the scores. scores, is_included: (m,). `seed` breaks score ties.
    """
    _check_delta_confidence(delta, confidence)
    order, inc = _ranked(scores, is_included, seed)
    m = inc.size
    _check_ks(m, k_plus, k_minus)
    r, v = k_plus + k_minus, _count_correct(order, inc, k_plus, k_minus)
    eps = _largest_rejected_eps(m, r, v, delta, 1.0 - confidence)
    return OneRunBound(eps, k_plus, k_minus, r, v)


def one_run_guess_grid(m: int, fractions: tuple[float, ...] = DEFAULT_GUESS_FRACTIONS
                       ) -> list[tuple[int, int]]:
    """(k_plus, k_minus) = (k, k) with k = max(1, floor(f m / 2)) per fraction f, duplicates dropped."""
    grid: list[tuple[int, int]] = []
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"guess fractions must be in (0, 1], got {f}")
        k = max(1, math.floor(f * m / 2))
        if 2 * k <= m and (k, k) not in grid:
            grid.append((k, k))
    if not grid:
        raise ValueError(f"no (k_plus, k_minus) fits m = {m} canaries")
    return grid


def one_run_epsilon_lb_best(
    scores: Any,
    is_included: Any,
    delta: float,
    confidence: float = 0.95,
    *,
    fractions: tuple[float, ...] = DEFAULT_GUESS_FRACTIONS,
    seed: int = 0,
) -> OneRunBound:
    """Best one-run bound over `one_run_guess_grid(m, fractions)`, Bonferroni-corrected.

    Picking k after seeing the outcome is a multiple test: each of the G grid points is tested at
    significance (1 - confidence) / G, so the maximum still holds with probability >= confidence.
    The grid depends on m only, never on the scores.
    """
    _check_delta_confidence(delta, confidence)
    order, inc = _ranked(scores, is_included, seed)
    grid = one_run_guess_grid(inc.size, fractions)
    significance = (1.0 - confidence) / len(grid)
    best: OneRunBound | None = None
    for k_plus, k_minus in grid:
        r, v = k_plus + k_minus, _count_correct(order, inc, k_plus, k_minus)
        eps = _largest_rejected_eps(inc.size, r, v, delta, significance)
        if best is None or eps > best.epsilon:
            best = OneRunBound(eps, k_plus, k_minus, r, v)
    assert best is not None  # the grid is never empty
    return best
