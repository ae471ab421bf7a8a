"""The f-DP one-run bound (Mahloujifar et al. 2024) in fedgen.audit_bounds: a closed form, its
monotonicity, its validity on mechanisms that are exactly mu-GDP, and that it beats Steinke et al.
(The Steinke et al. bound and the GDP conversion are tested in test_empirical_epsilon.py.)"""

import numpy as np
import pytest
from scipy.stats import norm

from fedgen.audit_bounds import (
    MU_GRID,
    gdp_claims_rejected,
    gdp_epsilon,
    one_run_epsilon_lb_best,
    one_run_gdp_lb_best,
)

DELTA = 1e-5


def _gaussian_canaries(mu: float, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scores of an exactly mu-GDP mechanism: N(mu, 1) for included canaries, N(0, 1) otherwise."""
    included = rng.random(m) < 0.5
    return rng.standard_normal(m) + mu * included, included


@pytest.mark.parametrize("m", [1, 10, 1000])
def test_one_correct_guess_matches_the_closed_form(m):
    """One guess, right: with probability tau it needs correct mass tau/m on a random canary, and
    mu-GDP then needs wrong mass >= Phi(Phi^-1(tau/m) - mu); both must fit in the 1/m guessed."""
    tau = 0.05
    expected = tau / m + norm.cdf(norm.ppf(tau / m) - MU_GRID) > 1 / m
    np.testing.assert_array_equal(gdp_claims_rejected(MU_GRID, m, 1, 1, tau), expected)


def test_rejected_claims_are_the_smaller_mus():
    for m, r, v in [(1000, 100, 100), (1000, 400, 380), (5000, 2500, 1900), (200, 200, 101)]:
        rejected = gdp_claims_rejected(MU_GRID, m, r, v, 0.05 / 7)
        assert not rejected[-1]  # mu = 50 explains anything
        assert np.all(np.diff(rejected.astype(int)) <= 0), (m, r, v)  # True... then False...


def test_more_correct_guesses_reject_more():
    mu = [gdp_claims_rejected(MU_GRID, 1000, 200, v, 0.05).sum() for v in (120, 160, 190, 200)]
    assert mu == sorted(mu) and mu[0] < mu[-1]


def test_bound_holds_on_exactly_gaussian_mechanisms():
    """Over repeated runs of a mu-GDP mechanism, the 95% bound never exceeds the true mu (it may
    be conservative; it must not be optimistic)."""
    rng = np.random.default_rng(0)
    for mu in (0.5, 2.0):
        bounds = [one_run_gdp_lb_best(*_gaussian_canaries(mu, 500, rng), DELTA).mu for _ in range(20)]
        assert max(bounds) <= mu
        assert np.mean(bounds) > 0.2 * mu  # and it does find something


def test_no_signal_gives_no_bound():
    rng = np.random.default_rng(1)
    assert [one_run_gdp_lb_best(*_gaussian_canaries(0.0, 1000, rng), DELTA).epsilon for _ in range(5)] == [0.0] * 5


def test_f_dp_bound_is_tighter_than_steinke_and_reports_its_guesses():
    scores, included = _gaussian_canaries(2.0, 4000, np.random.default_rng(2))
    fdp = one_run_gdp_lb_best(scores, included, DELTA)
    steinke = one_run_epsilon_lb_best(scores, included, DELTA)
    assert fdp.epsilon > steinke.epsilon + 0.5
    assert fdp.epsilon == pytest.approx(gdp_epsilon(fdp.mu, DELTA))
    assert 0 < fdp.num_correct <= fdp.num_guesses <= 4000
