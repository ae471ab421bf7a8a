"""Bad updates: each kind is rejected by `update_problem`, and through the ServerApp's strategy it
never reaches the global model; the record names the hospital (and node) that sent it."""

import json
import math
import time

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedgen.config import load_config
from fedgen.federation.coordinator import Coordinator
from fedgen.federation.update_checks import TRAIN_METRIC_KEYS, metrics_problem, update_problem
from fedgen.run_dir import RunDir
from server.app import make_strategy

TINY = ["model.init=null", "data.image_size=16", "data.num_patients=48", "federation.num_hospitals=3", "federation.local_epochs=1",
        "federation.num_samples=1", "federation.sampling_steps=2", "federation.max_update_norm=50"]


def shifted(state: dict, by: float) -> dict:
    return {k: v + by if torch.is_floating_point(v) else v.clone() for k, v in state.items()}


def poisoned(state: dict, kind: str) -> dict:
    """A copy of `state` broken in one way."""
    bad = {k: v.clone() for k, v in state.items()}
    first = next(k for k, v in bad.items() if torch.is_floating_point(v) and v.dim() > 1)
    if kind == "nan":
        bad[first].view(-1)[0] = float("nan")
    elif kind == "inf":
        bad[first].view(-1)[-1] = float("-inf")
    elif kind == "shape":
        bad[first] = torch.zeros(*bad[first].shape[:-1], bad[first].shape[-1] + 1)
    elif kind == "missing key":
        del bad[first]
    elif kind == "extra key":
        bad["backdoor.weight"] = torch.zeros(3)
    elif kind == "norm":
        bad[first] = bad[first] + 1e4
    return bad


KINDS = {
    "nan": "non-finite",
    "inf": "non-finite",
    "shape": "wrong shape",
    "missing key": "wrong keys",
    "extra key": "wrong keys",
    "norm": "exceeds the bound",
}


@pytest.fixture(scope="module")
def global_state() -> dict:
    from fedgen.model import build_unet

    cfg = load_config(TINY)
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in build_unet(cfg.model, cfg.data.image_size).state_dict().items()}


@pytest.mark.parametrize("kind", KINDS)
def test_update_problem_names_each_kind(global_state, kind):
    problem = update_problem(global_state, poisoned(global_state, kind), max_update_norm=50.0)
    assert problem is not None and KINDS[kind] in problem


def test_update_problem_accepts_a_normal_update(global_state):
    assert update_problem(global_state, shifted(global_state, 1e-3), max_update_norm=50.0) is None
    assert update_problem(global_state, poisoned(global_state, "norm"), max_update_norm=0.0) is None  # bound off


def good_metrics(hospital: int) -> dict:
    metrics = {key: 1.0 for key in TRAIN_METRIC_KEYS}
    metrics.update({"hospital": hospital, "num-examples": 10, "steps": 3, "total-steps": 3})
    return metrics


def test_metrics_problem():
    assert metrics_problem(good_metrics(0), num_hospitals=3) is None
    assert "wrong metrics" in metrics_problem({**good_metrics(0), "extra": 1.0}, 3)
    assert "wrong metrics" in metrics_problem({k: v for k, v in good_metrics(0).items() if k != "epsilon"}, 3)
    assert "not in [0, 3)" in metrics_problem(good_metrics(7), 3)
    assert "positive" in metrics_problem({**good_metrics(0), "num-examples": math.nan}, 3)
    assert "positive" in metrics_problem({**good_metrics(0), "num-examples": 0}, 3)


def instruction(node: int) -> Message:
    metadata = Metadata(run_id=7, message_id="", src_node_id=1, dst_node_id=node, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    msg = Message(RecordDict(), metadata=metadata)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's Grid does when it sends it
    return msg


def train_reply(ins: Message, hospital: int, state: dict, metrics: dict | None = None) -> Message:
    metrics = metrics if metrics is not None else good_metrics(hospital)
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=ins)


def superlink_error(ins: Message) -> Message:
    """What the SuperLink answers for a node that stopped sending heartbeats: from its own id."""
    metadata = Metadata(run_id=ins.metadata.run_id, message_id="", src_node_id=1, dst_node_id=1,
                        reply_to_message_id=ins.metadata.message_id, group_id="", created_at=time.time(),
                        ttl=60.0, message_type="train")
    return Message(Error(code=1, reason="Node Unavailable"), metadata=metadata)


def make(tmp_path, name="bad"):
    # One good update suffices here: these tests are about which updates are kept.
    cfg = load_config([*TINY, f"runs_dir={tmp_path}", f"name={name}", "federation.min_train_nodes=1"])
    coordinator = Coordinator(cfg, RunDir(tmp_path / name), log=lambda _: None)
    return coordinator, make_strategy(cfg, coordinator)


def test_bad_updates_never_reach_the_global_model(tmp_path, global_state):
    coordinator, strategy = make(tmp_path)
    before = coordinator.global_state()
    assert all(torch.equal(before[k], global_state[k]) for k in before)
    kinds = list(KINDS)
    strategy.instructions = [instruction(100 + i) for i in range(len(kinds))]
    replies = [train_reply(ins, i % 3, poisoned(before, kind))
               for i, (ins, kind) in enumerate(zip(strategy.instructions, kinds))]
    coordinator.begin_round(1, sampled=len(replies))

    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is None  # nothing to aggregate: Flower keeps the current global model
    rejected = coordinator.current["rejected"]
    assert [r["node"] for r in rejected] == [100 + i for i in range(len(kinds))]
    assert [r["hospital"] for r in rejected] == [i % 3 for i in range(len(kinds))]
    for record, kind in zip(rejected, kinds):
        assert KINDS[kind] in record["reason"]
    coordinator.end_round(1, before)  # what the ServerApp does with the unchanged model
    after = coordinator.global_state()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit-identical
    saved = json.loads((tmp_path / "bad" / "metrics.json").read_text())["history"][0]
    assert len(saved["rejected"]) == len(kinds) and saved["train"] == {}


def test_a_good_update_is_averaged_without_the_bad_ones(tmp_path):
    coordinator, strategy = make(tmp_path)
    before = coordinator.global_state()
    good = shifted(before, 1e-3)
    ins = {node: instruction(node) for node in range(11, 20)}
    strategy.instructions = list(ins.values())
    replies = [
        train_reply(ins[11], 0, good),
        train_reply(ins[12], 1, poisoned(before, "nan")),
        train_reply(ins[13], 2, poisoned(before, "norm")),
        train_reply(ins[14], 1, good, metrics={**good_metrics(1), "num-examples": 1e12, "extra": 1.0}),
        train_reply(ins[15], 0, shifted(before, 2e-3)),  # a second update claiming hospital 0
        Message(RecordDict({"metrics": MetricRecord(good_metrics(2))}), reply_to=ins[16]),  # no arrays
        train_reply(ins[17], 2, good, metrics={**good_metrics(2), "num-examples": -5}),
        Message(Error(code=0, reason="ledger unreadable"), reply_to=ins[18]),
        superlink_error(ins[19]),
    ]
    replies = replies[:-2] + replies[-1:]  # node 18 never answers
    coordinator.begin_round(1, sampled=len(ins))

    arrays, _ = strategy.aggregate_train(1, replies)

    averaged = strategy.state_of(arrays)  # packed on the wire (fedgen.federation.flat_state)
    for key, value in good.items():
        assert torch.allclose(averaged[key].to(value.dtype), value, rtol=0, atol=1e-6), key
    record = coordinator.current
    assert set(record["train"]) == {0}
    assert sorted(r["node"] for r in record["rejected"]) == [12, 13, 14, 15, 16, 17]
    assert {f["node"]: f["reason"] for f in record["failures"]} == {
        18: "no reply within federation.round_timeout (3600 s)", 19: "Node Unavailable"}


def test_fewer_usable_updates_than_min_train_nodes_leave_the_model_unchanged(tmp_path):
    cfg = load_config([*TINY, f"runs_dir={tmp_path}", "name=few", "federation.min_train_nodes=2"])
    coordinator = Coordinator(cfg, RunDir(tmp_path / "few"), log=lambda _: None)
    strategy = make_strategy(cfg, coordinator)
    before = coordinator.global_state()
    strategy.instructions = [instruction(1), instruction(2)]
    replies = [train_reply(strategy.instructions[0], 0, shifted(before, 1e-3)),
               train_reply(strategy.instructions[1], 1, poisoned(before, "inf"))]
    coordinator.begin_round(1, sampled=2)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None
    assert set(coordinator.current["train"]) == {0}  # its epsilon was spent: it stays on record
