"""A hospital's lifetime budget (`fedgen.privacy.lifetime`): every run on the same patients is on one
site ledger, the lifetime epsilon recomputes from its records alone with Google's dp-accounting,
and a run whose plan would pass `privacy.lifetime_budget` is refused before it trains, in
simulation and at a deployed site."""

import hashlib
import json
import math

import dp_accounting as dpa
import pytest
import torch

from fedgen.cli import main as cli_main
from fedgen.config import ConfigError, load_config
from fedgen.federation.hospital import Hospital, silos_for
from fedgen.federation.site import site_budget, site_home, site_silo
from fedgen.group_privacy import group_epsilon
from fedgen.model import build_unet
from fedgen.privacy.accounting import LedgerError, epsilon_of
from fedgen.privacy.lifetime import (
    LIFETIME_FILE,
    LifetimeBudgetError,
    SiteLedger,
    lifetime_spend,
    run_lifetimes,
    spent_history,
)
from fedgen.privacy.privacy_card import privacy_card
from fedgen.run_dir import RunDir
from fedgen.running.deploy import DeploymentError, node_config
from fedgen.running.simulate import simulate

SILOS = ["model.init=null", "data.image_size=16", "data.num_patients=40", "federation.num_hospitals=2",
         "federation.local_epochs=1", "federation.num_rounds=1", "training.batch_size=8"]


def dp_accounting_epsilon(entries: list[dict], delta: float) -> float:
    """The lifetime epsilon from the ledger's records alone, with Google's accountant (its default
    orders, fractional ones included)."""
    theirs = dpa.rdp.RdpAccountant()
    for entry in entries:
        for s, q, n in [*entry["history"], *entry["reserved"]]:
            theirs.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), int(n))
    return theirs.get_epsilon(delta)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_run(root, name: str, *extra: str) -> Hospital:
    """Hospital 0 of a simulated run `name` under runs dir `root`, one round, at its run's home."""
    cfg = load_config([*SILOS, f"runs_dir={root}", f"name={name}", *extra])
    hospital = Hospital(cfg, silos_for(cfg)[0], RunDir(root / name).hospital_home(0))
    torch.manual_seed(0)
    hospital.train(build_unet(cfg.model, cfg.data.image_size).state_dict(), server_round=1)
    return hospital


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    first = train_run(root, "a", "privacy.target_epsilon=20")
    second = train_run(root, "b", "privacy.target_epsilon=10", "privacy.delta=1e-6")
    return root, first, second


@pytest.mark.usefixtures("one_torch_thread")
def test_two_runs_on_the_same_silos_add_up(two_runs, capsys):
    root, first, second = two_runs
    assert first.site == second.site == root.resolve() / "sites" / first.data_fingerprint
    ledger = json.loads((first.site / LIFETIME_FILE).read_text())
    entries = list(ledger["runs"].values())
    assert [e["name"] for e in entries] == ["a", "b"] and all(not e["reserved"] for e in entries)
    alone = [epsilon_of(spent_history(e), "rdp", 1e-6) for e in entries]
    assert entries[0]["history"][0][0] != entries[1]["history"][0][0]  # two budgets, two sigmas
    # The lifetime is stated at the smallest delta of its runs, and recomputes from the records.
    assert ledger["lifetime_delta"] == 1e-6
    assert ledger["lifetime_epsilon"] > max(alone)
    assert ledger["lifetime_epsilon"] == pytest.approx(dp_accounting_epsilon(entries, 1e-6), rel=5e-3)
    assert ledger["lifetime_epsilon"] == pytest.approx(epsilon_of([h for e in entries for h in spent_history(e)],
                                                                   "rdp", 1e-6), rel=1e-12)
    # The privacy card of run b carries the lifetime with every run's history.
    card = privacy_card(True, "rdp", {}, "example", run_lifetimes(root / "b"))["lifetime"]["hospitals"]
    assert set(card) == {"0"} and card["0"]["epsilon"] == ledger["lifetime_epsilon"]
    assert [r["history"] for r in card["0"]["runs"]] == [e["history"] for e in entries]
    assert cli_main(["budget", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{ledger['lifetime_epsilon']:.3f}" in out and "lifetime (2 runs)" in out
    assert all(f"{a:.3f}" in out for a in alone)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_past_the_lifetime_budget_is_refused_before_it_trains(two_runs, capsys):
    root, first, _ = two_runs
    site = first.site / LIFETIME_FILE
    so_far = json.loads(site.read_text())["lifetime_epsilon"]
    budget = round(so_far + 0.5, 1)  # room left, less than the third run's whole plan
    overrides = [*SILOS, f"runs_dir={root}", "name=c", "privacy.target_epsilon=8", f"privacy.lifetime_budget={budget}"]
    before = digest(site)
    with pytest.raises(LifetimeBudgetError) as err:  # the simulation's check, before Flower starts
        simulate(overrides, argv=["test"], echo=lambda *_: None)
    message = str(err.value)
    assert f"spent epsilon {so_far:.3f}" in message and "2 earlier run(s) (a, b)" in message
    assert f"privacy.lifetime_budget {budget:g}" in message and "Refusing to train" in message
    assert not (root / "c").exists() and digest(site) == before
    assert cli_main(["simulate", *overrides]) == 1
    assert "lifetime budget" in capsys.readouterr().err

    # The hospital refuses too (a Flower worker builds it from the run's config), spending nothing.
    cfg = load_config(overrides)
    home = RunDir(root / "c").hospital_home(0)
    hospital = Hospital(cfg, silos_for(cfg)[0], home)
    with pytest.raises(LifetimeBudgetError, match=r"2 earlier run\(s\)"):
        hospital.train(build_unet(cfg.model, cfg.data.image_size).state_dict(), server_round=1)
    assert sorted(p.name for p in home.iterdir()) == ["records.json"]  # no ledger, no update
    assert digest(site) == before

    # Within the budget, the same check lets a run through.
    roomy = load_config([*overrides[:-1], f"privacy.lifetime_budget={budget + 20}"])
    Hospital(roomy, silos_for(roomy)[0], home).check_lifetime(None)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_deployed_site_keeps_one_ledger_and_refuses_likewise(tmp_path, capsys):
    data_dir = tmp_path / "hospital-a"
    node = {"partition-id": 0, "num-partitions": 2, "data-dir": str(data_dir)}

    def at_site(name: str, *extra: str, site_budget=None) -> Hospital:
        cfg = load_config([*SILOS, f"name={name}", "privacy.target_epsilon=20", *extra])
        return Hospital(cfg, site_silo(cfg, 0, node), site_home(data_dir, name), site_budget=site_budget)

    first = at_site("first")
    torch.manual_seed(0)
    state = build_unet(first.cfg.model, first.cfg.data.image_size).state_dict()
    first.train(state, server_round=1)
    assert first.lifetime_path == data_dir.resolve() / "fedgen" / LIFETIME_FILE
    spent = SiteLedger.load(first.lifetime_path)
    so_far = lifetime_spend(list(spent.entries.values())).epsilon
    before = digest(first.lifetime_path)
    # The site's own budget (its node config) holds even when the run's config sets none.
    second = at_site("second", site_budget=so_far + 1.0)
    with pytest.raises(LifetimeBudgetError, match=rf"spent epsilon {so_far:.3f} .* 1 earlier run\(s\) \(first\)"):
        second.train(state, server_round=1)
    assert not second.ledger_path.exists() and not (second.home / "last_update.pt").exists()
    assert digest(first.lifetime_path) == before
    third = at_site("third", f"privacy.lifetime_budget={so_far + 1.0}")
    with pytest.raises(LifetimeBudgetError):
        third.train(state, server_round=1)
    assert cli_main(["budget", str(data_dir), "--budget", "100"]) == 0
    out = capsys.readouterr().out
    assert "first" in out and f"left {100 - so_far:.3f}" in out


def test_a_site_sets_its_own_budget_in_its_node_config(tmp_path):
    from flwr.common.config import parse_config_args

    # What `fedgen deploy supernode --lifetime-budget 6` hands Flower, as the SuperNode parses it.
    parsed = parse_config_args([node_config(0, 2, tmp_path, lifetime_budget=6.0)])
    assert site_budget(parsed) == 6.0
    assert site_budget(parse_config_args([node_config(0, 2, tmp_path)])) is None
    for bad in (-1, 0, "many", float("inf")):
        with pytest.raises(ConfigError, match="lifetime-budget"):
            site_budget({"lifetime-budget": bad})
    with pytest.raises(DeploymentError, match="--lifetime-budget"):
        node_config(0, 2, tmp_path, lifetime_budget=0.0)


def test_an_edited_site_ledger_does_not_verify(two_runs, tmp_path, capsys):
    root, first, _ = two_runs
    path = tmp_path / LIFETIME_FILE
    raw = json.loads((first.site / LIFETIME_FILE).read_text())
    raw["runs"].popitem()  # "forget" a run by hand
    path.write_text(json.dumps(raw))
    with pytest.raises(LedgerError, match="sha256 does not match"):
        SiteLedger.load(path)
    assert cli_main(["budget", str(tmp_path)]) == 1  # says so, in one line
    assert "sha256 does not match" in capsys.readouterr().err
    assert cli_main(["budget", str(tmp_path / "nowhere")]) == 2
    assert "no hospital lifetime ledger" in capsys.readouterr().err


def entry(unit: str, history, delta=1e-5, largest=1, dp=True, reserved=()) -> dict:
    return {"unit": unit, "history": [list(h) for h in history], "reserved": [list(h) for h in reserved],
            "delta": delta, "largest_patient": largest, "dp": dp}


def test_lifetime_units_delta_reservations_and_runs_without_dp():
    h = [(1.5, 0.2, 40)]
    # Reserved steps (a round in progress) count.
    assert lifetime_spend([entry("example", h, reserved=h)]).epsilon == pytest.approx(
        epsilon_of(h * 2, "rdp", 1e-5), rel=1e-12)
    # The smallest delta states the lifetime.
    assert lifetime_spend([entry("example", h, 1e-5), entry("example", h, 1e-7)]).delta == 1e-7
    # Mixed units: per patient, the example-level run by group privacy for its largest patient.
    mixed = lifetime_spend([entry("patient", h), entry("example", h, largest=3)])
    assert mixed.unit == "patient"
    assert mixed.epsilon > group_epsilon(h, 3, 1e-5) > epsilon_of(h * 2, "rdp", 1e-5)
    ones = lifetime_spend([entry("patient", h), entry("example", h, largest=1)])
    assert ones.epsilon == pytest.approx(group_epsilon(h * 2, 1, 1e-5), rel=1e-9)  # orders >= 2
    # A run without DP spends without bound.
    assert math.isinf(lifetime_spend([entry("example", h), entry("example", [], dp=False)]).epsilon)


def test_a_long_lifetime_ledger_costs_one_rdp_curve_per_noise_setting(monkeypatch):
    """A site's ledger grows by a run each time; its lifetime epsilon (three times a round) must
    not recompute Opacus's slow fractional-order RDP for every run: one curve per (sigma, q),
    and the same epsilon as Opacus's own RDP accountant, to the last bit."""
    from opacus.accountants import RDPAccountant

    import fedgen.group_privacy as gp

    calls = []
    original = gp.compute_rdp
    monkeypatch.setattr(gp, "compute_rdp", lambda **kw: calls.append(kw) or original(**kw))
    gp._one_step_rdp.cache_clear()
    sigma, q = 1.37, 0.4923  # the demo's: q < 1 takes the slow fractional orders
    runs = [entry("example", [(sigma, q, 6), (sigma, q, 6 + i)], 1e-5) for i in range(12)]
    spend = lifetime_spend(runs)
    assert len(calls) == 1  # 24 (sigma, q, steps) entries, one curve
    reference = RDPAccountant()
    reference.history = [h for run in runs for h in spent_history(run)]
    assert spend.epsilon == reference.get_epsilon(delta=1e-5)
    lifetime_spend([*runs, entry("example", [(sigma, q, 7)], 1e-5)])  # a new run: its steps only
    assert len(calls) == 1


@pytest.mark.slow
def test_patient_level_dp_end_to_end_and_its_lifetime(tmp_path):
    """A real simulation with privacy.unit=patient and two images per patient: its card says
    patient, its epsilon is the accountant's over patients (q = batch / patients), dp-accounting
    agrees, and the next run on the same silos that would pass the lifetime budget is refused."""
    from test_simulation import run_fedgen

    overrides = [*SILOS, f"runs_dir={tmp_path}", "name=patients", "federation.num_rounds=2",
                 "federation.num_samples=4", "federation.sampling_steps=5", "data.num_patients=48",
                 "data.images_per_patient=2", "privacy.unit=patient"]
    done = run_fedgen(overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((tmp_path / "patients" / "privacy.json").read_text())
    cfg = load_config(overrides)
    for silo in silos_for(cfg):
        entry = card["hospitals"][str(silo.hospital)]
        patients = len(set(silo.train.patient_ids))
        assert patients < len(silo.train)  # two images each: the units are patients
        q, steps = cfg.training.batch_size / patients, 2 * math.ceil(patients / cfg.training.batch_size)
        assert entry["unit"].startswith("patient") and entry["largest_patient_images"] == 1
        assert [h[1] for h in entry["history"]] == [q, q] and entry["steps"] == steps
        sigma = entry["history"][0][0]
        assert entry["epsilon"] == pytest.approx(epsilon_of([(sigma, q, steps)], "rdp", cfg.privacy.delta), rel=1e-12)
        theirs = dpa.rdp.RdpAccountant()
        theirs.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
        assert entry["epsilon"] == pytest.approx(theirs.get_epsilon(cfg.privacy.delta), rel=5e-3)
        lifetime = card["lifetime"]["hospitals"][str(silo.hospital)]
        assert lifetime["unit"] == "patient" and lifetime["epsilon"] == pytest.approx(entry["epsilon"], rel=1e-12)
    again = run_fedgen([*overrides[:-1], "name=again", "privacy.unit=patient",
                        f"privacy.lifetime_budget={card['lifetime']['hospitals']['0']['epsilon'] + 1:.3f}"])
    assert again.returncode == 1 and "lifetime budget" in again.stderr and "(patients)" in again.stderr
    assert not (tmp_path / "again").exists()


def test_the_sweep_prints_its_total_spend(two_runs, tmp_path):
    from fedgen.running.sweep import log_spend

    root, first, _ = two_runs
    lines: list[str] = []
    log_spend(root, lines.append)
    total = json.loads((first.site / LIFETIME_FILE).read_text())["lifetime_epsilon"]
    assert "total spend per hospital" in lines[0] and f"{total:.3f}" in lines[0]
    log_spend(tmp_path, lines.append)  # nothing trained: said, not raised
    assert "no hospital lifetime ledger" in lines[-1]
