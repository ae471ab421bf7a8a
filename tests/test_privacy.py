"""Accounting: values against independent references, the ledger across restarts, the budget guard."""

import dataclasses
import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from scipy.stats import norm

from fedgen.config import ConfigError, PrivacyConfig
from fedgen.privacy.accounting import (
    BudgetExceededError,
    EpsilonLedger,
    calibrate_noise,
    epsilon_of,
    make_plan,
)

# Opacus RDP accountant, delta 1e-5, sigma 1.0, q 0.05 (values recorded on this stack).
OPACUS_REFERENCE = [(5, 1.9323), (10, 2.1559), (15, 2.3301)]


@pytest.mark.parametrize("steps,expected", OPACUS_REFERENCE)
def test_epsilon_matches_opacus_reference_values(steps, expected):
    assert epsilon_of([(1.0, 0.05, steps)], "rdp", 1e-5) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_rdp_epsilon_equals_closed_form_without_subsampling(sigma, steps):
    """q = 1: the Gaussian mechanism's RDP is steps * alpha / (2 sigma^2); convert by Balle et al. 2020."""
    delta = 1e-5
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS)
    rdp = steps * alphas / (2 * sigma**2)
    eps = rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    assert epsilon_of([(sigma, 1.0, steps)], "rdp", delta) == pytest.approx(eps.min(), rel=1e-9)


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Tight (eps, delta) of a mu-GDP mechanism (Dong, Roth & Su 2019), by bisection."""
    lo, hi = 0.0, 100.0
    for _ in range(200):
        eps = (lo + hi) / 2
        d = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        lo, hi = (eps, hi) if d > delta else (lo, eps)
    return hi


@pytest.mark.parametrize("sigma,steps", [(2.0, 4), (5.0, 50)])
def test_prv_is_tight_and_rdp_is_an_upper_bound_without_subsampling(sigma, steps):
    exact = _exact_gaussian_epsilon(math.sqrt(steps) / sigma, 1e-5)
    prv = epsilon_of([(sigma, 1.0, steps)], "prv", 1e-5)
    rdp = epsilon_of([(sigma, 1.0, steps)], "rdp", 1e-5)
    assert prv == pytest.approx(exact, rel=0.02)
    assert exact <= rdp <= 1.3 * exact


def _ledger(tmp_path, budget=3.5):
    cfg = PrivacyConfig(target_epsilon=budget, delta=1e-5, noise_multiplier=1.0)
    plan = make_plan(num_examples=640, batch_size=32, local_epochs=1, num_rounds=3)
    return cfg, plan


def test_ledger_restored_across_three_rounds_equals_one_accountant(tmp_path):
    cfg, plan = _ledger(tmp_path)
    assert plan.sample_rate == 0.05 and plan.steps_per_round == 20
    path = tmp_path / "ledger.json"
    for server_round in (1, 2, 3):
        # A new process each round: nothing survives but the file.
        ledger = EpsilonLedger.open(path, cfg, plan)
        accountant = ledger.make_accountant()
        for _ in range(plan.steps_per_round):
            accountant.step(noise_multiplier=ledger.noise_multiplier, sample_rate=plan.sample_rate)
        ledger.record(accountant, server_round, plan.steps_per_round, reproducible_noise=False)
        ledger.save(path)
    final = EpsilonLedger.load(path)
    one = RDPAccountant()
    for _ in range(60):
        one.step(noise_multiplier=1.0, sample_rate=0.05)
    assert final.steps == 60
    assert final.epsilon == pytest.approx(one.get_epsilon(delta=1e-5), rel=1e-12)
    eps_by_round = [r["epsilon"] for r in final.rounds]
    assert eps_by_round == sorted(eps_by_round) and eps_by_round[0] < eps_by_round[-1]
    assert eps_by_round[0] == pytest.approx(epsilon_of([(1.0, 0.05, 20)], "rdp", 1e-5))


def test_budget_guard_refuses_to_cross_the_budget(tmp_path):
    cfg, plan = _ledger(tmp_path)
    ledger = EpsilonLedger.start(cfg, plan)
    acc = ledger.make_accountant()
    for _ in range(plan.total_steps):
        acc.step(noise_multiplier=1.0, sample_rate=plan.sample_rate)
    ledger.record(acc, 3, plan.total_steps, reproducible_noise=False)
    with pytest.raises(BudgetExceededError, match="Refusing to train"):
        ledger.check_budget(plan.steps_per_round)


def test_calibration_spends_the_whole_budget_over_the_whole_plan():
    cfg = PrivacyConfig(target_epsilon=4.0, delta=1e-5)
    plan = make_plan(num_examples=500, batch_size=50, local_epochs=2, num_rounds=5)
    sigma = calibrate_noise(cfg, plan)
    whole = epsilon_of([(sigma, plan.sample_rate, plan.total_steps)], "rdp", 1e-5)
    one_round = epsilon_of([(sigma, plan.sample_rate, plan.steps_per_round)], "rdp", 1e-5)
    assert 3.95 <= whole <= 4.0
    assert one_round < 0.6 * whole  # each round spends only part of the budget
    one_round_plan = make_plan(num_examples=500, batch_size=50, local_epochs=2, num_rounds=1)
    assert calibrate_noise(cfg, one_round_plan) < 0.8 * sigma  # per-round calibration: less noise


def test_fixed_noise_multiplier_that_overspends_is_refused():
    plan = make_plan(num_examples=500, batch_size=50, local_epochs=1, num_rounds=50)
    with pytest.raises(ConfigError, match="privacy.noise_multiplier"):
        calibrate_noise(PrivacyConfig(target_epsilon=1.0, noise_multiplier=0.5), plan)


def test_delta_must_be_below_one_over_n():
    plan = make_plan(num_examples=100, batch_size=10, local_epochs=1, num_rounds=1)
    with pytest.raises(ConfigError, match="privacy.delta"):
        calibrate_noise(PrivacyConfig(delta=0.01), plan)


def test_restored_ledger_refuses_a_changed_plan(tmp_path):
    cfg, plan = _ledger(tmp_path)
    path = tmp_path / "ledger.json"
    EpsilonLedger.start(cfg, plan).save(path)
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        EpsilonLedger.open(path, dataclasses.replace(cfg, target_epsilon=10.0), plan)


def test_impossible_budget_is_a_config_error():
    plan = make_plan(num_examples=100, batch_size=100, local_epochs=100, num_rounds=100)
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        calibrate_noise(PrivacyConfig(target_epsilon=1e-6, delta=1e-5), plan)
