"""Lower bounds on epsilon from one training run with canaries: the statistics, nothing else.

m canaries are each included in training independently with probability 1/2; after the run an
auditor scores them (higher = more likely included), guesses "in" for the top scores and "out"
for the bottom ones, abstains on the rest, and counts its correct guesses. Few mistakes among many
guesses are unlikely under a private mechanism, which bounds its epsilon from below:

- Steinke, Nasr & Jagielski (NeurIPS 2023, arXiv 2305.08846): rejects an (eps, delta)-DP claim.
  Distribution-free; its delta term grows with m (2 m delta), so at delta = 1e-5 more canaries
  stop helping near m ~ 10^4, and r guesses can never certify more than about ln(r / 3).
- Mahloujifar, Melis & Chaudhuri (ICML 2025, arXiv 2410.22235, "Auditing f-DP in one run"):
  rejects a mu-GDP claim using the whole Gaussian trade-off curve, which is far tighter; the
  largest rejected mu is converted to epsilon at delta. A lower bound on epsilon for mechanisms
  whose trade-off curve is Gaussian (DP-SGD's is close to one after many steps, by the central
  limit theorem of Dong, Roth & Su 2022; exactly Gaussian at q = 1), not distribution-free.

Both fix their numbers of guesses before the scores are seen (a grid, or any pre-registered
tests) and pay for trying several with a Bonferroni correction. Pure numpy/scipy: `attacks` (black-box canaries) and
`fedgen.privacy.dp_audit` (white-box gradient canaries) both build on it. Cross-checked against
google-deepmind/jax_privacy `auditing.py` and facebookresearch/PrivacyGuard `fdp_analysis_node.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit, ndtr, ndtri
from scipy.stats import binom, norm

# Fractions of the m canaries guessed on (half "in" from the top, half "out" from the bottom) that
# the `_best` bounds try; fixed here, before any scores are seen.
DEFAULT_GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# The mu-GDP claims the f-DP bound tests: its answer is the largest rejected one (1% steps).
MU_GRID = np.geomspace(0.01, 50.0, 857)


class OneRunBound(NamedTuple):
    epsilon: float
    k_plus: int
    k_minus: int
    num_guesses: int  # r = k_plus + k_minus
    num_correct: int  # v


class GdpOneRunBound(NamedTuple):
    epsilon: float  # epsilon at delta of mu-GDP (0 when no mu is rejected)
    mu: float  # the largest mu whose mu-GDP claim the test rejects (0: none)
    num_guesses: int
    num_correct: int


def validate_scores(
    scores: Any, is_member: Any, *, require_both_classes: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores float64 (N,), is_member bool (N,)), or raise ValueError on bad input."""
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if m.shape != s.shape:
        raise ValueError(f"scores and labels differ in shape: {s.shape} vs {m.shape}")
    if s.size == 0:
        raise ValueError("scores is empty")
    if m.dtype != np.bool_:
        if not np.all((m == 0) | (m == 1)):
            raise ValueError("membership labels must be boolean or 0/1")
        m = m.astype(bool)
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(f"scores contain {bad.size} NaN/inf values (first at index {bad[0]})")
    n_pos = int(m.sum())
    if require_both_classes and n_pos in (0, m.size):
        raise ValueError(
            f"need both members and non-members, got {n_pos} members of {m.size} scores"
        )
    return s, m


def check_delta_confidence(delta: float, confidence: float) -> None:
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


# --- Gaussian DP -----------------------------------------------------------------------------------
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


# --- one run: guesses on the ranked canaries --------------------------------------------------------
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


# --- Steinke, Nasr & Jagielski 2023: an (eps, delta) claim ------------------------------------------
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
    check_delta_confidence(delta, confidence)
    order, inc = _ranked(scores, is_included, seed)
    m = inc.size
    _check_ks(m, k_plus, k_minus)
    r, v = k_plus + k_minus, _count_correct(order, inc, k_plus, k_minus)
    eps = _largest_rejected_eps(m, r, v, delta, 1.0 - confidence)
    return OneRunBound(eps, k_plus, k_minus, r, v)


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
    check_delta_confidence(delta, confidence)
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


# --- Mahloujifar, Melis & Chaudhuri 2024: a mu-GDP claim ---------------------------------------------
def gdp_claims_rejected(mus: np.ndarray, m: int, r: int, v: int, significance: float) -> np.ndarray:
    """For each mu in `mus`: does v or more correct of r guesses on m canaries reject mu-GDP at
    `significance`? (Mahloujifar et al. 2024, guessing with abstentions, alphabet of 2.)

    Suppose a mu-GDP mechanism gave >= v correct with probability tau = significance. Per canary
    (a random one of the m), that outcome needs a mass of correct guesses, and f-DP ties each
    mass of correct guesses to a least mass of wrong ones: wrong >= Phi(Phi^-1(correct) - mu)
    (the inverse of 1 - f for the Gaussian trade-off f). The recursion walks the count of
    correct guesses down from v, adding the least masses each count needs; if they exceed r/m,
    the mass of guesses there is, the supposition is impossible and the claim is rejected.
    """
    mus = np.asarray(mus, dtype=np.float64)
    correct = np.full(mus.shape, significance * v / m)
    wrong = np.full(mus.shape, significance * (r - v) / m)
    for i in range(v - 1, -1, -1):
        needed = ndtr(ndtri(np.clip(correct, 0.0, 1.0)) - mus)
        more_wrong = np.maximum(wrong, needed)
        correct = correct + i / (r - i) * (more_wrong - wrong)
        wrong = more_wrong
    return correct + wrong > r / m


def one_run_gdp_lb(
    scores: Any,
    is_included: Any,
    delta: float,
    tests: Sequence[tuple[int, float]],
    *,
    seed: int = 0,
) -> GdpOneRunBound:
    """The f-DP one-run bound for a Gaussian trade-off curve over pre-registered tests: each
    (r, significance) guesses "in" on the r/2 highest scores and "out" on the r/2 lowest, and
    rejects mu-GDP claims at its own significance (`gdp_claims_rejected`). The largest mu on MU_GRID
    that any test rejects is a lower bound with probability >= 1 - sum of the significances
    (a weighted Bonferroni correction), provided the tests were fixed before the scores were seen.
    Rejecting mu rejects every smaller mu too (a mu'-GDP mechanism with mu' < mu is mu-GDP). The
    epsilon is that of mu-GDP at `delta` (`gdp_epsilon`).
    """
    order, inc = _ranked(scores, is_included, seed)
    best = GdpOneRunBound(0.0, 0.0, 0, 0)
    for r, significance in tests:
        _check_ks(inc.size, r // 2, r // 2)
        if r % 2 or not 0 < significance < 1:
            raise ValueError(f"need an even number of guesses and a significance in (0, 1), got {r}, {significance}")
        v = _count_correct(order, inc, r // 2, r // 2)
        rejected = MU_GRID[gdp_claims_rejected(MU_GRID, inc.size, r, v, significance)]
        mu = float(rejected.max()) if rejected.size else 0.0
        if mu > best.mu:
            best = GdpOneRunBound(gdp_epsilon(mu, delta) if delta > 0 else math.inf, mu, r, v)
    return best


def one_run_gdp_lb_best(
    scores: Any,
    is_included: Any,
    delta: float,
    confidence: float = 0.95,
    *,
    fractions: tuple[float, ...] = DEFAULT_GUESS_FRACTIONS,
    seed: int = 0,
) -> GdpOneRunBound:
    """`one_run_gdp_lb` over the same grid of guess counts as `one_run_epsilon_lb_best`, the
    error budget 1 - confidence split evenly between its points."""
    check_delta_confidence(delta, confidence)
    grid = one_run_guess_grid(len(np.asarray(scores)), fractions)
    significance = (1.0 - confidence) / len(grid)
    return one_run_gdp_lb(scores, is_included, delta, [(2 * k, significance) for k, _ in grid], seed=seed)
