"""attacks.empirical_epsilon against closed forms, independent numerics and known mechanisms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.optimize import brentq
from scipy.stats import beta, binom, norm

from attacks.empirical_epsilon import (
    clopper_pearson_upper,
    epsilon_lb_clopper_pearson,
    epsilon_lb_gdp,
    gdp_delta,
    gdp_epsilon,
    one_run_epsilon_lb,
    one_run_epsilon_lb_best,
    one_run_guess_grid,
    one_run_p_value,
)

DELTA = 1e-5


def _separated(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n members scoring 1, n non-members scoring 0: a perfect attack."""
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    return member.astype(float), member


def _hockey_stick_delta(mu: float, eps: float) -> float:
    """delta(eps) between N(mu, 1) and N(0, 1) by numerical integration of (p - e^eps q)_+."""

    def gap(x: float) -> float:
        return max(norm.pdf(x, mu) - math.exp(eps) * norm.pdf(x), 0.0)

    kink = eps / mu + mu / 2  # where the densities cross: helps quad, not the answer
    return quad(gap, -30, 30 + mu, points=[kink], limit=500, epsabs=1e-14)[0]


# ---- Clopper-Pearson -------------------------------------------------------------------------

@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (9, 10), (0, 1000), (17, 1000)])
def test_clopper_pearson_upper_definition(k: int, n: int) -> None:
    ub = float(clopper_pearson_upper(k, n, 0.05))
    assert binom.cdf(k, n, ub) == pytest.approx(0.05, rel=1e-9)
    if k == 0:
        assert ub == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-12)
    assert float(clopper_pearson_upper(n, n, 0.05)) == 1.0


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_clopper_pearson_perfect_separation_by_hand(n: int) -> None:
    scores, member = _separated(n)
    # Uncorrected: each rate at significance 0.05 / 2, zero errors -> ub = 1 - 0.025^(1/n).
    ub = 1 - 0.025 ** (1 / n)
    assert ub == pytest.approx(beta.ppf(0.975, 1, n), rel=1e-12)
    expected = math.log((1 - DELTA - ub) / ub)
    got = epsilon_lb_clopper_pearson(scores, member, DELTA, threshold_correction="none")
    assert got.epsilon == pytest.approx(expected, rel=1e-10)
    assert got.threshold == 1.0
    # Bonferroni over the n possible error counts of each rate: ub = 1 - (0.025 / n)^(1/n).
    ub_b = 1 - (0.025 / n) ** (1 / n)
    expected_b = max(0.0, math.log((1 - DELTA - ub_b) / ub_b))
    got_b = epsilon_lb_clopper_pearson(scores, member, DELTA)
    assert got_b.epsilon == pytest.approx(expected_b, rel=1e-10)
    assert got_b.epsilon < got.epsilon


def test_clopper_pearson_values_n100() -> None:
    scores, member = _separated(100)
    assert epsilon_lb_clopper_pearson(scores, member, DELTA, threshold_correction="none").epsilon \
        == pytest.approx(3.28134, abs=1e-5)
    assert epsilon_lb_clopper_pearson(scores, member, DELTA).epsilon == pytest.approx(2.44786, abs=1e-5)


def test_clopper_pearson_swapped_form_is_used() -> None:
    # 100 members, 100 non-members; threshold between them: FP = 0, FN = 10.
    member = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    scores = np.r_[np.ones(90), np.zeros(10), np.zeros(100)]
    fpr_ub = 1 - 0.025 ** (1 / 100)
    fnr_ub = beta.ppf(0.975, 11, 90)
    direct = math.log((1 - DELTA - fnr_ub) / fpr_ub)
    swapped = math.log((1 - DELTA - fpr_ub) / fnr_ub)
    got = epsilon_lb_clopper_pearson(scores, member, DELTA, threshold_correction="none")
    assert got.epsilon == pytest.approx(max(direct, swapped), rel=1e-10)
    # Mirror image: FN = 0, FP = 10; now the swapped ratio is the larger one for the same rule.
    scores_m = np.r_[np.ones(100), np.ones(10), np.zeros(90)]
    got_m = epsilon_lb_clopper_pearson(scores_m, member, DELTA, threshold_correction="none")
    assert got_m.epsilon == pytest.approx(got.epsilon, rel=1e-10)


@pytest.mark.parametrize("fn", [epsilon_lb_clopper_pearson, epsilon_lb_gdp])
def test_no_signal_gives_zero(fn) -> None:
    member = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    assert fn(np.zeros(100), member, DELTA).epsilon == 0.0  # all scores tied
    assert fn(-member.astype(float), member, DELTA).epsilon == 0.0  # all wrong


def test_clopper_pearson_delta_and_confidence_monotone() -> None:
    scores, member = _separated(200)
    e = [epsilon_lb_clopper_pearson(scores, member, d).epsilon for d in (0.0, 1e-3, 0.1)]
    assert e[0] > e[1] > e[2] > 0
    assert epsilon_lb_clopper_pearson(scores, member, 0.0, 0.99).epsilon < e[0]


@pytest.mark.parametrize("fn", [epsilon_lb_clopper_pearson, epsilon_lb_gdp])
def test_bonferroni_bound_rarely_positive_under_null(fn) -> None:
    positives = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        member = rng.random(100) < 0.5
        positives += fn(rng.normal(size=100), member, DELTA).epsilon > 0
    assert positives <= 10  # at most 5% expected; 10 of 200 leaves binomial slack


def test_bounds_stay_below_true_epsilon_of_gaussian_mechanism() -> None:
    # Scores of a Gaussian mechanism with sensitivity 1 and sigma = 1/mu: exactly mu-GDP.
    mu, n = 2.0, 3000
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(mu, 1, n), rng.normal(0, 1, n)]
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    true_eps = gdp_epsilon(mu, DELTA)
    cp = epsilon_lb_clopper_pearson(scores, member, DELTA).epsilon
    gdp = epsilon_lb_gdp(scores, member, DELTA)
    assert 0 < cp < true_eps
    assert 0 < gdp.mu < mu
    assert 0 < gdp.epsilon < true_eps
    assert gdp.epsilon == pytest.approx(gdp_epsilon(gdp.mu, DELTA))


# ---- Gaussian DP -----------------------------------------------------------------------------

def test_gdp_delta_known_value_mu1_eps1() -> None:
    # Phi(-0.5) - e Phi(-1.5) = 0.308538 - 2.718282 * 0.066807 = 0.126937
    assert gdp_delta(1.0, 1.0) == pytest.approx(norm.cdf(-0.5) - math.e * norm.cdf(-1.5), rel=1e-12)
    assert gdp_delta(1.0, 1.0) == pytest.approx(0.1269367, abs=1e-7)
    assert gdp_epsilon(1.0, gdp_delta(1.0, 1.0)) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(("mu", "eps"), [(0.5, 0.1), (1.0, 1.0), (2.0, 3.0), (4.0, 6.0)])
def test_gdp_matches_tight_gaussian_mechanism(mu: float, eps: float) -> None:
    # The Gaussian mechanism with sensitivity 1 and sigma = 1/mu is mu-GDP; its exact delta(eps)
    # is the hockey-stick divergence between N(1/sigma, 1) and N(0, 1), integrated numerically.
    assert gdp_delta(mu, eps) == pytest.approx(_hockey_stick_delta(mu, eps), rel=1e-6, abs=1e-13)


@pytest.mark.parametrize("mu", [0.3, 1.0, 3.0, 8.0])
@pytest.mark.parametrize("delta", [1e-2, 1e-5, 1e-10])
def test_gdp_epsilon_round_trip(mu: float, delta: float) -> None:
    eps = gdp_epsilon(mu, delta)
    if eps > 0:
        assert gdp_delta(mu, eps) == pytest.approx(delta, rel=1e-8)
    else:
        assert gdp_delta(mu, 0.0) <= delta


def test_gdp_epsilon_edge_cases() -> None:
    assert gdp_epsilon(0.0, 1e-5) == 0.0
    assert gdp_epsilon(-1.0, 1e-5) == 0.0
    assert gdp_epsilon(0.01, 0.5) == 0.0  # delta(0) = 2 Phi(mu/2) - 1 < 0.5
    assert gdp_epsilon(1.0, 1e-5) < gdp_epsilon(2.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        gdp_epsilon(1.0, 0.0)


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_gdp_perfect_separation_by_hand(n: int) -> None:
    scores, member = _separated(n)
    ub = 1 - (0.025 / n) ** (1 / n)  # Bonferroni, as in the Clopper-Pearson test
    mu = norm.isf(ub) - norm.ppf(ub)  # = 2 Phi^-1(1 - ub)
    # Solve delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) directly, without log space.
    expected = brentq(
        lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - DELTA,
        0.0, 200.0, xtol=1e-13,
    )
    got = epsilon_lb_gdp(scores, member, DELTA)
    assert got.mu == pytest.approx(mu, rel=1e-12)
    assert got.epsilon == pytest.approx(expected, rel=1e-8)
    assert got.threshold == 1.0


# ---- One run ---------------------------------------------------------------------------------

def _canaries(m: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(m) < 0.5


@pytest.mark.parametrize("r", [2, 6, 20, 100])
def test_one_run_all_correct_closed_form(r: int) -> None:
    inc = _canaries(1000, seed=0)
    scores = inc + 0.01 * np.random.default_rng(1).random(1000)  # members on top
    got = one_run_epsilon_lb(scores, inc, r // 2, r // 2, delta=0.0)
    assert (got.num_guesses, got.num_correct) == (r, r)
    # P[Binomial(r, p) >= r] = p^r = 0.05  ->  p = 0.05^(1/r), eps = ln(p / (1 - p)); clipped at
    # 0 (for r = 2, p = 0.224 < 1/2: two right guesses are no evidence at 95%).
    p = 0.05 ** (1 / r)
    assert got.epsilon == pytest.approx(max(0.0, math.log(p / (1 - p))), abs=1e-8)


def test_one_run_hand_value_r20() -> None:
    inc = _canaries(100, seed=2)
    got = one_run_epsilon_lb(inc.astype(float), inc, 10, 10, delta=0.0)
    assert got.epsilon == pytest.approx(1.822716, abs=1e-6)  # logit(0.05^(1/20))


def test_one_run_all_wrong_is_zero() -> None:
    inc = _canaries(200, seed=3)
    assert one_run_epsilon_lb(-inc.astype(float), inc, 50, 50, delta=0.0).epsilon == 0.0


def test_one_run_ties_cannot_leak_labels() -> None:
    # Included canaries listed first and every score tied: breaking ties by position would
    # "guess" perfectly. Random tie-breaking must leave no evidence.
    inc = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    assert one_run_epsilon_lb(np.zeros(200), inc, 50, 50, delta=0.0).epsilon == 0.0


def test_one_run_valid_under_null() -> None:
    positives = 0
    for seed in range(200):
        inc = _canaries(200, seed)
        scores = np.random.default_rng(10_000 + seed).normal(size=200)
        positives += one_run_epsilon_lb(scores, inc, 20, 20, delta=0.0).epsilon > 0
    assert positives <= 20  # 5% expected (10 of 200); the binomial test is also conservative


def test_one_run_p_value_matches_paper_loop() -> None:
    # Transcription of the paper's reference p-value (Steinke et al. 2023, Algorithm / Thm 5.2).
    def reference(m, r, v, eps, delta):
        q = 1 / (1 + math.exp(-eps))
        tail = binom.sf(v - 1, r, q)
        alpha, total = 0.0, 0.0
        for i in range(1, v + 1):
            total += binom.pmf(v - i, r, q)
            alpha = max(alpha, total / i)
        return min(tail + alpha * delta * 2 * m, 1.0)

    for m, r, v, eps, delta in [(1000, 100, 90, 1.0, 1e-5), (1000, 100, 90, 1.5, 1e-4),
                                (50, 20, 20, 2.0, 1e-3), (500, 40, 10, 0.5, 1e-5)]:
        assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
            reference(m, r, v, eps, delta), rel=1e-9)


def test_one_run_delta_term_lowers_bound() -> None:
    inc = _canaries(1000, seed=4)
    scores = inc.astype(float)
    e0 = one_run_epsilon_lb(scores, inc, 100, 100, delta=0.0).epsilon
    e5 = one_run_epsilon_lb(scores, inc, 100, 100, delta=1e-5).epsilon
    e3 = one_run_epsilon_lb(scores, inc, 100, 100, delta=1e-3).epsilon
    assert e0 > e5 > e3 > 0
    p = one_run_p_value(1000, 200, 200, e5, 1e-5)
    assert p == pytest.approx(0.05, rel=1e-4)  # the bound sits where the test stops rejecting


def test_one_run_below_randomized_response_epsilon() -> None:
    # Randomized response: report the inclusion bit truthfully with prob e^eps0 / (1 + e^eps0).
    eps0, m = 1.0, 4000
    inc = _canaries(m, seed=5)
    truthful = np.random.default_rng(6).random(m) < 1 / (1 + math.exp(-eps0))
    scores = np.where(truthful, inc, ~inc).astype(float)
    got = one_run_epsilon_lb(scores, inc, m // 2, m // 2, delta=0.0)
    assert 0.7 < got.epsilon < eps0


def test_one_run_best_is_bonferroni_max_over_grid() -> None:
    inc = _canaries(1000, seed=7)
    scores = inc + np.random.default_rng(8).normal(0, 0.6, 1000)
    grid = one_run_guess_grid(1000)
    assert grid[0] == (5, 5) and grid[-1] == (500, 500)
    best = one_run_epsilon_lb_best(scores, inc, DELTA)
    per_k = [one_run_epsilon_lb(scores, inc, kp, km, DELTA, 1 - 0.05 / len(grid)).epsilon
             for kp, km in grid]
    assert best.epsilon == pytest.approx(max(per_k)) and best.epsilon > 0
    uncorrected = max(one_run_epsilon_lb(scores, inc, kp, km, DELTA).epsilon for kp, km in grid)
    assert best.epsilon < uncorrected
    single = one_run_epsilon_lb_best(scores, inc, DELTA, fractions=(0.2,))
    assert single == one_run_epsilon_lb(scores, inc, 100, 100, DELTA)


# ---- Bad input -------------------------------------------------------------------------------

def test_bad_input_raises() -> None:
    scores, member = _separated(10)
    with pytest.raises(ValueError, match="delta"):
        epsilon_lb_clopper_pearson(scores, member, 1.0)
    with pytest.raises(ValueError, match="delta"):
        epsilon_lb_gdp(scores, member, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lb_clopper_pearson(scores, member, DELTA, confidence=0.0)
    with pytest.raises(ValueError, match="threshold_correction"):
        epsilon_lb_gdp(scores, member, DELTA, threshold_correction="holm")
    with pytest.raises(ValueError, match="both members"):
        epsilon_lb_clopper_pearson(scores, np.ones(20, bool), DELTA)
    with pytest.raises(ValueError, match="NaN"):
        epsilon_lb_gdp(np.r_[scores[:-1], np.nan], member, DELTA)
    with pytest.raises(ValueError, match="k_plus"):
        one_run_epsilon_lb(scores, member, 15, 10, DELTA)
    with pytest.raises(ValueError, match="k_plus"):
        one_run_epsilon_lb(scores, member, 0, 0, DELTA)
    with pytest.raises(ValueError, match="differ in shape"):
        one_run_epsilon_lb(scores, member[:-1], 5, 5, DELTA)
    with pytest.raises(ValueError, match="v <= r"):
        one_run_p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError, match="fractions"):
        one_run_guess_grid(100, (0.0,))
