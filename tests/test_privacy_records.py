"""Privacy records that cannot be lost: ledgers verify, a hospital whose ledger holds less than the
coordinator recorded refuses before spending, rejected updates' epsilon is counted, checkpoints
verify before a resume, and a run that lost rounds does not end 'completed'."""

import hashlib
import json

import pytest
import torch
from test_privacy import _ledger
from test_update_checks import TINY, good_metrics, instruction, make, shifted, train_reply

from fedgen.config import load_config
from fedgen.federation.coordinator import Coordinator, RunFailed
from fedgen.federation.hospital import Hospital, silos_for
from fedgen.model import build_unet
from fedgen.privacy.accounting import EpsilonLedger, LedgerError
from fedgen.run_dir import CheckpointError, RunDir, write_json
from server.app import make_strategy

HOSPITAL = [*TINY, "data.num_patients=40", "federation.num_hospitals=2", "training.batch_size=8",
            "federation.num_rounds=2", "privacy.target_epsilon=20"]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_edited_ledger_does_not_verify_and_is_never_replaced(tmp_path):
    cfg, plan = _ledger(tmp_path)
    path = tmp_path / "ledger.json"
    ledger = EpsilonLedger.open(path, cfg, plan)
    acc = ledger.make_accountant()
    acc.step(noise_multiplier=ledger.noise_multiplier, sample_rate=ledger.sample_rate)
    ledger.record(acc, server_round=1, steps=1, reproducible_noise=False)
    ledger.save(path)
    assert EpsilonLedger.open(path, cfg, plan).steps == 1  # an untouched ledger verifies
    raw = json.loads(path.read_text())
    raw["history"] = []  # "start over" by hand
    path.write_text(json.dumps(raw))
    before = digest(path)
    with pytest.raises(LedgerError, match="sha256 does not match"):
        EpsilonLedger.open(path, cfg, plan)
    assert digest(path) == before


@pytest.fixture(scope="module")
def trained_hospital(tmp_path_factory):
    """A hospital after round 1, with a copy of its ledger then."""
    cfg = load_config(HOSPITAL)
    home = tmp_path_factory.mktemp("hospital")
    torch.manual_seed(0)
    state = build_unet(cfg.model, cfg.data.image_size).state_dict()
    hospital = Hospital(cfg, silos_for(cfg)[0], home)
    _, metrics = hospital.train(state, server_round=1)
    recorded = {"steps": metrics["total-steps"], "epsilon": metrics["epsilon"], "rounds": [1]}
    return cfg, home, state, recorded


@pytest.mark.parametrize("damage", ["deleted", "rolled back"])
def test_a_hospital_whose_ledger_holds_less_than_recorded_refuses_before_spending(trained_hospital, tmp_path, damage):
    cfg, home, state, recorded = trained_hospital
    hospital = Hospital(cfg, silos_for(cfg)[0], tmp_path)
    if damage == "rolled back":  # an older copy: the coordinator saw one more round reported
        (tmp_path / "ledger.json").write_bytes((home / "ledger.json").read_bytes())
        recorded = {**recorded, "steps": recorded["steps"] + 5, "rounds": [1, 2]}
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    with pytest.raises(LedgerError, match=r"hospital 0: its ledger .* coordinator recorded") as err:
        hospital.train(state, server_round=3, recorded=recorded)
    assert str(recorded["steps"]) in str(err.value)
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before  # nothing spent, nothing written
    assert hospital.account()["steps"] < recorded["steps"]


def test_a_hospital_whose_ledger_matches_the_record_trains(trained_hospital):
    cfg, home, state, recorded = trained_hospital
    hospital = Hospital(cfg, silos_for(cfg)[0], home)
    assert hospital.account(recorded)["rounds"] == [1]
    _, metrics = hospital.train(state, server_round=2, recorded=recorded)
    assert metrics["total-steps"] > recorded["steps"] and metrics["epsilon"] > recorded["epsilon"]


def test_rejected_updates_count_toward_the_reported_epsilon(tmp_path):
    coordinator, strategy = make(tmp_path)
    before = coordinator.global_state()
    ins = [instruction(node) for node in (11, 12)]
    strategy.instructions = ins
    bad = {k: v + float("nan") if torch.is_floating_point(v) else v for k, v in before.items()}
    spent = {**good_metrics(1), "epsilon": 4.5, "total-steps": 9}
    coordinator.begin_round(1, sampled=2)
    arrays, _ = strategy.aggregate_train(1, [train_reply(ins[0], 0, shifted(before, 1e-3)),
                                             train_reply(ins[1], 1, bad, metrics=spent)])
    coordinator.end_round(1, strategy.state_of(arrays))
    ledgers = coordinator.ledgers()
    assert ledgers["1"]["epsilon"] == 4.5 and ledgers["1"]["total_steps"] == 9
    assert coordinator.summary()["epsilon_max"] == 4.5
    assert coordinator.recorded_accounts()["1"] == {"steps": 9, "epsilon": 4.5, "rounds": [1]}


def test_a_round_short_of_updates_leaves_the_model_and_the_run_is_incomplete(tmp_path):
    cfg = load_config([*TINY, f"runs_dir={tmp_path}", "name=short"])  # default: every sampled hospital
    coordinator = Coordinator(cfg, RunDir(tmp_path / "short"), log=lambda _: None)
    strategy = make_strategy(cfg, coordinator)
    before = coordinator.global_state()
    strategy.instructions = [instruction(11), instruction(12)]
    coordinator.begin_round(1, sampled=2)
    arrays, _ = strategy.aggregate_train(1, [train_reply(strategy.instructions[0], 0, shifted(before, 1e-3))])
    assert arrays is None
    coordinator.end_round(1, before)
    coordinator.finish()
    metrics = json.loads(coordinator.run_dir.metrics.read_text())
    assert metrics["status"] == "incomplete"
    assert metrics["summary"]["rounds_model_unchanged"] == [1]
    assert metrics["summary"]["lost"] == ["node 12 in round(s) 1 (no reply within federation.round_timeout (3600 s))"]


def test_a_non_finite_global_model_is_never_released(tmp_path):
    coordinator, _ = make(tmp_path, name="nan")
    with torch.no_grad():
        next(coordinator.unet.parameters()).fill_(float("nan"))
    with pytest.raises(RunFailed, match="non-finite"):
        coordinator.finish()
    assert not coordinator.run_dir.pipeline.exists()
    assert json.loads(coordinator.run_dir.metrics.read_text())["status"] == "failed"


def _checkpointed(tmp_path, state) -> RunDir:
    run = RunDir(tmp_path / "run")
    sha = run.save_checkpoint(1, state, [])
    write_json(run.metrics, {"status": "running", "checkpoints": {"1": sha}})
    return run


def test_checkpoints_verify_before_a_resume(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(TINY)
    state = build_unet(cfg.model, cfg.data.image_size).state_dict()
    run = _checkpointed(tmp_path, state)
    assert run.latest_checkpoint()["round"] == 1
    run.save_checkpoint(2, state, [])  # written just before a crash: no hash in metrics.json yet
    assert run.latest_checkpoint()["round"] == 2  # it verifies by the hash it carries

    path = run.checkpoint_path(2)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match=r"round-0002.pt: unreadable checkpoint"):
        run.latest_checkpoint()
    path.unlink()
    path = run.checkpoint_path(1)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")  # modified on disk
    with pytest.raises(CheckpointError, match=r"round-0001.pt: its sha256 does not match"):
        run.latest_checkpoint()

    nan = {k: torch.full_like(v, float("nan")) if torch.is_floating_point(v) else v for k, v in state.items()}
    run = _checkpointed(tmp_path / "nan", nan)  # its hashes are on record, its weights are NaN
    with pytest.raises(CheckpointError, match="non-finite weights"):
        run.latest_checkpoint()

    edited = RunDir(tmp_path / "edited")  # weights replaced, file hash never recorded
    edited.save_checkpoint(1, state, [])
    saved = torch.load(edited.checkpoint_path(1), weights_only=False)
    saved["model"] = shifted(state, 1e-3)
    torch.save(saved, edited.checkpoint_path(1))
    with pytest.raises(CheckpointError, match="do not match the hash it carries"):
        edited.latest_checkpoint()

    old = RunDir(tmp_path / "old")  # an older fedgen's checkpoint carries no hash
    old.checkpoints.mkdir(parents=True)
    torch.save({"round": 1, "model": state, "history": []}, old.checkpoint_path(1))
    with pytest.raises(CheckpointError, match="carries no weights hash"):
        old.latest_checkpoint()
