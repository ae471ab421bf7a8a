"""`fedgen select`: a hospital's vote (its own noise, its ledger, one release per run), the
coordinator's checks of the replies, the release, and (slow) the whole run through Flower."""

import json
import subprocess
import sys
import time
from pathlib import Path

import dp_accounting as dpa
import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedgen.config import ConfigError, load_config
from fedgen.evaluation.card_check import card_problems
from fedgen.federation.hospital import Hospital, silos_for
from fedgen.federation.selection import (
    SelectionRelease,
    plan_selection,
    pool_cache,
    public_cells,
    selection_sigma,
)
from fedgen.privacy.accounting import LedgerError
from fedgen.privacy.lifetime import LIFETIME_FILE, LifetimeBudgetError, SiteLedger, lifetime_spend
from fedgen.privacy.private_selection import PublicCells, unit_weights
from fedgen.run_dir import RunDir, write_json
from fedgen.running.select import select
from server.selection import check_vote, selection_card

SILOS = ["model.init=null", "data.image_size=16", "data.num_patients=40", "federation.num_hospitals=2",
         "training.batch_size=8"]


def hospital(root: Path, *extra: str, name: str = "sel") -> Hospital:
    cfg = load_config([*SILOS, f"runs_dir={root}", f"name={name}", *extra])
    return Hospital(cfg, silos_for(cfg)[0], RunDir(root / name).hospital_home(0))


def cells(seed: int = 0, k: int = 4) -> PublicCells:
    pool = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return PublicCells.fit(pool, k)


def test_a_vote_is_noised_by_the_hospital_and_on_its_lifetime_ledger(tmp_path):
    h = hospital(tmp_path)
    c = cells()
    counts, metrics = h.vote(c)
    exact = c.votes(h.silo.train.images)
    sigma = selection_sigma(h.cfg)
    assert metrics["noise-multiplier"] == sigma > 0 and metrics["epsilon"] == pytest.approx(8.0, rel=0.01)
    assert not torch.equal(counts, exact)  # noised: the exact counts never leave the hospital
    assert (counts - exact).abs().max() < 8 * sigma
    entries = list(SiteLedger.load(h.lifetime_path).entries.values())
    assert [e["history"] for e in entries] == [[[sigma, 1.0, 1]]]
    # The lifetime epsilon recomputed from the ledger alone with Google's accountant.
    theirs = dpa.rdp.RdpAccountant()
    theirs.compose(dpa.GaussianDpEvent(sigma), 1)
    assert lifetime_spend(entries).epsilon == pytest.approx(theirs.get_epsilon(1e-5), rel=0.02)


def test_a_selection_run_has_a_privacy_card_that_checks_out(tmp_path):
    """privacy.json for a selection, as for a trained run: each voter's one release (sigma, q = 1,
    1 step), its epsilon recomputed from that alone, its site's lifetime spend."""
    cfg = load_config([*SILOS, f"runs_dir={tmp_path}", "name=sel", "privacy.unit=patient"])
    silos, c = silos_for(cfg), cells()
    reported = {h: Hospital(cfg, silos[h], RunDir(tmp_path / "sel").hospital_home(h)).vote(c)[1] for h in (0, 1)}
    run_dir = RunDir(tmp_path / "sel")
    write_json(run_dir.privacy_card, selection_card(cfg, run_dir, reported))
    card = json.loads(run_dir.privacy_card.read_text())
    assert card["dp"] and card["level"] == "patient-level private selection (one Gaussian release of its votes) at each hospital ('hospitals')"
    sigma = selection_sigma(cfg)
    for h in ("0", "1"):
        entry = card["hospitals"][h]
        assert entry["history"] == [[sigma, 1.0, 1]] and entry["steps"] == 1 and entry["sampling"].startswith("none")
        assert entry["epsilon_recomputed"] == entry["epsilon"] == reported[int(h)]["epsilon"] <= 8.0
        assert entry["largest_patient_images"] == 1  # patient level: a patient's images vote 1 in all
        assert card["lifetime"]["hospitals"][h]["epsilon"] == pytest.approx(8.0, rel=0.01)


def test_asked_again_a_hospital_resends_its_release_and_refuses_other_cells(tmp_path):
    h = hospital(tmp_path)
    first, _ = h.vote(cells(0))
    again, _ = h.vote(cells(0))
    assert torch.equal(first, again)  # no fresh noise: a repeat spends nothing
    before = SiteLedger.load(h.lifetime_path).entries
    with pytest.raises(LedgerError, match="already released its votes"):
        h.vote(cells(1))
    assert SiteLedger.load(h.lifetime_path).entries == before


def test_the_noise_differs_between_two_runs_of_the_same_config(tmp_path):
    a, _ = hospital(tmp_path / "a").vote(cells())
    b, _ = hospital(tmp_path / "b").vote(cells())
    assert not torch.equal(a, b)  # secret: not derived from the config's seed


def test_a_vote_past_the_lifetime_budget_is_refused_before_anything_is_released(tmp_path):
    h = hospital(tmp_path, "privacy.lifetime_budget=4")
    with pytest.raises(LifetimeBudgetError):
        h.vote(cells())
    assert not (h.home / "selection_vote.pt").exists()
    assert not SiteLedger.load(h.lifetime_path).entries


def test_a_hospital_votes_whatever_its_training_batch_size(tmp_path):
    counts, metrics = hospital(tmp_path, "training.batch_size=512").vote(cells())  # more than its silo
    assert counts.shape == (4,) and metrics["num-examples"] > 0


def test_without_privacy_the_votes_are_exact_and_say_so(tmp_path):
    h = hospital(tmp_path, "privacy=none")
    c = cells()
    counts, metrics = h.vote(c)
    assert torch.equal(counts, c.votes(h.silo.train.images)) and metrics["epsilon"] == float("inf")
    assert plan_selection(h.cfg, [10, 10]).sigma == 0.0


def test_patient_level_votes_move_the_counts_by_at_most_one_per_patient():
    units = torch.tensor([0, 0, 0, 1, 2, 2])
    w = unit_weights(units, 6)
    assert torch.allclose(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5], dtype=torch.float64))
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    c = cells()
    full = c.votes(images, w)
    for patient in range(3):
        keep = units != patient
        assert (full - c.votes(images[keep], w[keep])).norm() <= 1.0 + 1e-9
    assert unit_weights(None, 6) is None
    with pytest.raises(ValueError, match="unit ids"):
        unit_weights(units, 5)


def reply(hospital, counts) -> Message:
    metadata = Metadata(run_id=7, message_id="", src_node_id=1, dst_node_id=2, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type="query.select")
    content = RecordDict({"votes": ArrayRecord({"counts": counts}), "metrics": MetricRecord({"hospital": hospital})})
    return Message(content, reply_to=Message(RecordDict(), metadata=metadata))


def test_the_coordinator_drops_votes_it_cannot_use():
    good = torch.ones(4, dtype=torch.float64)
    assert check_vote(reply(0, good), 4, 2, set())[2] is None
    assert "shape" in check_vote(reply(0, torch.ones(5, dtype=torch.float64)), 4, 2, set())[2]
    assert "finite: False" in check_vote(reply(0, torch.tensor([1.0, float("nan"), 0, 0])), 4, 2, set())[2]
    assert "no new hospital" in check_vote(reply(0, good), 4, 2, {0})[2]
    assert "no new hospital" in check_vote(reply(7, good), 4, 2, set())[2]


def test_the_release_keeps_only_weighted_cells_and_survives_a_round_trip(tmp_path):
    c = cells(k=4)
    plan = plan_selection(load_config([*SILOS, f"runs_dir={tmp_path}"]), [20, 20])
    release = SelectionRelease.assemble(plan, "base", "sha", c, {0: torch.tensor([0.0, 5.0, -3.0, 0.0]),
                                                                   1: torch.tensor([0.0, 5.0, 0.0, 0.0])})
    assert release.weights.tolist() == [0.0, 1.0, 0.0, 0.0]
    release.save(tmp_path / "selection.pt")
    loaded = SelectionRelease.load(tmp_path / "selection.pt")
    assert torch.equal(loaded.weights, release.weights) and loaded.plan == plan
    pool = loaded.pool
    images, drawn = loaded.sample(lambda n, seed: pool[torch.randint(len(pool), (n,))], 10, seed=0)
    assert len(images) == 10 and drawn >= 10 and set(c.cell_of(images).tolist()) == {1}


def test_a_selection_without_a_base_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.init"):
        select([*SILOS, f"runs_dir={tmp_path}"], echo=lambda _: None)


@pytest.mark.slow
def test_fedgen_select_runs_one_private_round_through_flower(tmp_path):
    overrides = ["experiment=tradeoff", f"runs_dir={tmp_path}", "selection.pool_size=256", "selection.num_samples=16",
                 "selection.eval_samples=64",
                 "federation.sampling_steps=10", "pretrain.num_patients=128", "pretrain.epochs=1"]
    out = subprocess.run([str(Path(sys.executable).parent / "fedgen"), "select", *overrides],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "tradeoff-select"
    summary = json.loads((run / "selection.json").read_text())
    assert summary["hospitals_voted"] == [0, 1] and 7.9 < summary["epsilon_per_hospital"] <= 8.0
    assert len(summary["weights"]) == summary["cells"] and max(summary["weights"]) == 1.0
    for site in (tmp_path / "sites").iterdir():  # each hospital's release is on its own site's ledger
        entries = list(SiteLedger.load(site / LIFETIME_FILE).entries.values())
        assert [e["history"] for e in entries] == [[[summary["noise_multiplier"], 1.0, 1]]]
    assert card_problems(run, 2, 1) == []  # privacy.json: both voters, each epsilon recomputes, within budget
    measured = json.loads((run / "selection_eval.json").read_text())
    assert {"base", "selection", "attack", "acceptance"} <= set(measured)
    report = (run / "report.md").read_text()
    assert "private selection" in report and "| selection |" in report and "(8, 1e-05)" in report
    assert (run / "selection.png").exists() and (run / "selection_base.png").exists()
    assert list((run / "tb").glob("events.out.tfevents.*"))  # samples and scalars, beside the trained runs
    refused = subprocess.run([str(Path(sys.executable).parent / "fedgen"), "attack", str(run)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "private selection run" in refused.stderr


def test_the_public_pool_is_drawn_once_and_read_back_the_same(tmp_path):
    cfg = load_config([*SILOS, f"runs_dir={tmp_path}", "selection.pool_size=300"])
    drawn = []

    def draw(n, seed):
        drawn.append(n)
        return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    cache = pool_cache(cfg, "sha-of-the-base")
    first = public_cells(cfg, draw, 4, say=lambda _: None, cache=cache)
    assert sum(drawn) == 300 and cache.exists()
    again = public_cells(cfg, draw, 4, say=lambda _: None, cache=cache)
    assert sum(drawn) == 300  # read back, not drawn again
    assert torch.equal(first.pool, again.pool) and torch.equal(first.labels, again.labels)
    assert pool_cache(cfg, "another-base") != cache
