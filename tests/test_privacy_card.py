"""The privacy card (`privacy.json`): every epsilon on it recomputes from the card alone with code
that is not fedgen's or Opacus's (Google's dp-accounting, and a numerical integral of the
subsampled Gaussian's Renyi divergence), and the largest patient's group epsilon is computed."""

import json
import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from opacus.accountants import RDPAccountant
from scipy import integrate
from test_update_checks import TINY, good_metrics

from fedgen.config import load_config
from fedgen.federation.coordinator import Coordinator
from fedgen.group_privacy import group_epsilon
from fedgen.privacy.accounting import epsilon_of
from fedgen.run_dir import RunDir

SIGMA, Q, STEPS, DELTA = 2.593, 0.492, 12, 1e-5  # the default demo's plan, 12 steps a round


def rdp_by_integration(q: float, sigma: float, alpha: float) -> float:
    """Renyi divergence of order alpha of one Poisson-subsampled Gaussian step, by quadrature:
    log E_{z~N(0,s^2)}[((1-q) + q exp((2z-1)/(2 s^2)))^alpha] / (alpha - 1) (Mironov et al. 2019)."""
    def integrand(z):  # in log space: the ratio's power overflows far out in the tail
        log_ratio = np.logaddexp(math.log(1 - q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
        return math.exp(-(z**2) / (2 * sigma**2) + alpha * log_ratio) / (sigma * math.sqrt(2 * math.pi))

    edge = 40 * sigma * alpha  # the integrand is below 1e-300 beyond
    value, _ = integrate.quad(integrand, -edge, edge, points=[0.0, 0.5, alpha * sigma], epsabs=0,
                              epsrel=1e-12, limit=500)
    return math.log(value) / (alpha - 1)


def independent_epsilon(history: list, delta: float) -> float:
    """The card's epsilon from its history alone: the RDP at the order Opacus finds optimal, by
    integration, converted by dp-accounting's own formula."""
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    _, order = accountant.get_privacy_spent(delta=delta)
    rdp = sum(n * rdp_by_integration(q, s, order) for s, q, n in history)
    epsilon, _ = compute_epsilon([order], [rdp], delta)
    return float(epsilon)


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("card")
    cfg = load_config([*TINY, f"runs_dir={root}", "name=card", "federation.min_train_nodes=1"])
    coordinator = Coordinator(cfg, RunDir(root / "card"), log=lambda _: None)
    for server_round in (1, 2, 3):
        coordinator.begin_round(server_round, sampled=2)
        for hospital, largest in ((0, 1), (1, 3)):
            steps = STEPS * server_round
            coordinator.record_train(hospital, {
                **good_metrics(hospital), "epsilon": epsilon_of([(SIGMA, Q, steps)], "rdp", DELTA),
                "delta": DELTA, "noise-multiplier": SIGMA, "sample-rate": Q, "steps": STEPS,
                "total-steps": steps, "reproducible-noise": 0, "largest-patient": largest})
        coordinator.end_round(server_round, coordinator.global_state())
    return json.loads(coordinator.run_dir.privacy_card.read_text())


def test_every_epsilon_on_the_card_recomputes_independently(card):
    assert card["dp"] and set(card["hospitals"]) == {"0", "1"}
    for entry in card["hospitals"].values():
        assert entry["history"] == [[SIGMA, Q, STEPS]] * 3 and entry["steps"] == 3 * STEPS
        assert entry["epsilon"] == pytest.approx(independent_epsilon(entry["history"], entry["delta"]), rel=1e-3)
        assert entry["epsilon_recomputed"] == pytest.approx(entry["epsilon"], rel=1e-12)
        # dp-accounting's own accountant agrees at the integer orders, where both are exact...
        orders = [float(a) for a in range(2, 65)]
        theirs = dpa.rdp.RdpAccountant(orders=orders)
        for s, q, n in entry["history"]:
            theirs.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), n)
        accountant = RDPAccountant()
        accountant.history = [tuple(h) for h in entry["history"]]
        ours, _ = accountant.get_privacy_spent(delta=entry["delta"], alphas=orders)
        assert theirs.get_epsilon(entry["delta"]) == pytest.approx(ours, rel=1e-9)
        # ...and the card's, which may also take fractional orders, is never above it.
        assert entry["epsilon"] <= theirs.get_epsilon(entry["delta"]) + 1e-9


def test_the_largest_patient_gets_its_group_epsilon(card):
    one, three = card["hospitals"]["0"], card["hospitals"]["1"]
    assert one["largest_patient_images"] == 1 and three["largest_patient_images"] == 3
    assert one["largest_patient_epsilon"] == pytest.approx(one["epsilon"], rel=0.02)  # orders >= 2 only
    # Three images are a group of 4 (c = 2): 9 e(4 beta), recomputed with dp-accounting's RDP.
    betas = [float(b) for b in range(2, 17)]
    theirs = dpa.rdp.RdpAccountant(orders=[4 * b for b in betas])
    theirs.compose(dpa.PoissonSampledDpEvent(Q, dpa.GaussianDpEvent(SIGMA)), 3 * STEPS)
    bound, _ = compute_epsilon(betas, [9 * r for r in theirs._rdp], DELTA)
    assert three["epsilon"] < three["largest_patient_epsilon"] <= bound + 1e-9
    assert three["largest_patient_epsilon"] == pytest.approx(bound, rel=0.05)


def test_group_epsilon_grows_with_the_group():
    history = [(SIGMA, Q, 3 * STEPS)]
    sizes = [group_epsilon(history, k, DELTA) for k in (1, 2, 3, 4, 5)]
    assert sizes[0] < sizes[1] < sizes[2] == sizes[3] < sizes[4]  # 3 and 4 are both a group of 4
    with pytest.raises(ValueError):
        group_epsilon(history, 0, DELTA)


def test_duplicated_members_are_held_to_their_group_epsilon(tmp_path):
    from attacks.audit import _alarms, alarm_epsilon
    from fedgen.run_dir import write_json

    run = RunDir(tmp_path / "dup")
    history = [[SIGMA, Q, 3 * STEPS]]
    example = epsilon_of([tuple(history[0])], "rdp", DELTA)
    write_json(run.privacy_card, {"hospitals": {"0": {"history": history, "delta": DELTA},
                                                "1": {"history": history, "delta": DELTA}}})
    write_json(run.hospital_home(0) / "records.json", {"duplicated": {"abc": 3, "def": 1}})  # 4 copies
    write_json(run.hospital_home(1) / "records.json", {"duplicated": {}})
    dup, plain = alarm_epsilon(run, 0, example), alarm_epsilon(run, 1, example)
    assert dup["copies"] == 4 and dup["alarm_epsilon"] == pytest.approx(group_epsilon(history, 4, DELTA))
    assert plain == {"copies": 1, "alarm_epsilon": example}
    between = (example + dup["alarm_epsilon"]) / 2  # above the per-example epsilon, below the group's
    hospitals = {0: {"epsilon_lb": between, "accountant_epsilon": example, **dup},
                 1: {"epsilon_lb": between, "accountant_epsilon": example, **plain}}
    alarms = _alarms({}, hospitals, example)
    assert len(alarms) == 1 and alarms[0].startswith("hospital 1")
