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
  probability 1/2 each, scored after a single training run; and its f-DP counterpart for a
  Gaussian trade-off curve (Mahloujifar et al. 2024). Both live in `fedgen.audit_bounds`, below
  every layer that uses them (the white-box DP-SGD audit too), and are re-exported here.

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
from scipy.stats import beta as beta_dist
from scipy.stats import norm

from attacks.scores import confusion_counts
from fedgen.audit_bounds import (  # noqa: F401  (the one-run bounds live below attacks, re-exported)
    DEFAULT_GUESS_FRACTIONS,
    GdpOneRunBound,
    OneRunBound,
    check_delta_confidence,
    gdp_delta,
    gdp_epsilon,
    one_run_epsilon_lb,
    one_run_epsilon_lb_best,
    one_run_gdp_lb_best,
    one_run_guess_grid,
    one_run_p_value,
)

THRESHOLD_CORRECTIONS = ("bonferroni", "none")


class ThresholdBound(NamedTuple):
    epsilon: float  # lower bound on epsilon, >= 0
    threshold: float  # score threshold that achieved it (NaN when epsilon == 0)


class GdpBound(NamedTuple):
    epsilon: float
    mu: float  # lower bound on mu (may be <= 0: no evidence)
    threshold: float


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
    check_delta_confidence(delta, confidence)
    thresholds, fpr_ub, fnr_ub = _rate_upper_bounds(scores, is_member, confidence,
                                                    threshold_correction)
    eps = np.maximum(_log_positive(1 - delta - fnr_ub) - np.log(fpr_ub),
                     _log_positive(1 - delta - fpr_ub) - _log_positive(fnr_ub))
    i = int(np.argmax(eps))
    if not eps[i] > 0:
        return ThresholdBound(0.0, math.nan)
    return ThresholdBound(float(eps[i]), float(thresholds[i]))


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
    check_delta_confidence(delta, confidence)
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
