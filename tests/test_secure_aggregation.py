"""Secure aggregation (SecAgg+): the coordinator never holds a hospital's unmasked update, and
the aggregate equals plain FedAvg of the same updates within the stated quantisation bound.

The fast tests run Flower's real `SecAggPlusWorkflow` (through `server/secure_aggregation.py`)
against real `ClientApp`s with fedgen's `secure_aggregation_mod` and `secaggplus_mod`, connected
in-process by a loopback Grid that keeps every reply the coordinator receives. The hospitals'
training is replaced by known updates, so the reference FedAvg (Flower's own `FedAvg`, on the
same updates sent in the clear) is independent of the code under test.
"""

from __future__ import annotations

import copy
import json
import subprocess
import uuid

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp.strategy import FedAvg

from clients.app import UpdateRefused, secure_aggregation_mod
from fedgen.config import ConfigError, load_config
from fedgen.federation.coordinator import Coordinator
from fedgen.federation.secure_aggregation import SecAggSettings, masking_problem
from fedgen.federation.update_checks import TRAIN_METRIC_KEYS
from fedgen.run_dir import RunDir
from server.app import make_strategy

SIZES = {0: 260, 1: 100, 2: 37}  # num-examples: unequal, so the weighting is tested too


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    # What Flower's runtime sets in a ServerApp or ClientApp process before messages are made.
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def overrides_for(tmp_path, *extra: str) -> list[str]:
    return [f"runs_dir={tmp_path}", "name=secagg", "model.init=null", "privacy=none", "federation.num_hospitals=3",
            "federation.secure_aggregation=true", "federation.sample_every=0", "data.num_patients=48",
            "data.image_size=16", "training.batch_size=8", *extra]


def known_update(global_state: dict, hospital: int) -> dict:
    """A hospital's 'trained' weights: the global model plus a fixed, hospital-specific step."""
    gen = torch.Generator().manual_seed(100 + hospital)
    return {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in global_state.items()}


def fake_hospital_app(bad: int | None = None) -> ClientApp:
    """fedgen's mod in front of a train handler that returns `known_update` (NaN for `bad`)."""
    app = ClientApp()

    @app.train(mods=[secure_aggregation_mod])
    def train(msg: Message, context: Context) -> Message:
        h = int(context.node_config["partition-id"])
        new = known_update(msg.content.array_records["arrays"].to_torch_state_dict(), h)
        if h == bad:
            new = {k: torch.full_like(v, float("nan")) for k, v in new.items()}
        metrics = dict.fromkeys(TRAIN_METRIC_KEYS, 0.0) | {"hospital": h, "num-examples": SIZES[h], "epsilon": 1.5 + h}
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        h = int(context.node_config["partition-id"])
        metrics = {"hospital": h, "num-examples": 4, "val-loss": 0.1}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


class LoopbackGrid:
    """Delivers each message to its node's ClientApp in this process, as a SuperLink would: an
    exception in the app becomes an error reply. Keeps every reply the coordinator receives."""

    def __init__(self, app: ClientApp, overrides: list[str], run_dir: str):
        run_config = {"overrides": json.dumps(overrides), "run-dir": run_dir}
        self.app = app
        self.contexts = {
            10 + h: Context(run_id=1, node_id=10 + h, node_config={"partition-id": h, "num-partitions": 3},
                            state=RecordDict(), run_config=run_config)
            for h in range(3)
        }
        self.received: list[tuple[Message, Message]] = []  # (instruction, reply)

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            try:  # a copy, as if it had crossed the network (the workflow shares content between messages)
                reply = copy.deepcopy(self.app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id]))
            except Exception as err:
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            self.received.append((msg, reply))
            replies.append(reply)
        return replies


def secure_round(tmp_path, *extra: str, bad: int | None = None):
    overrides = overrides_for(tmp_path, *extra)
    cfg = load_config(overrides)
    run_dir = RunDir(str(tmp_path / "secagg"))
    coordinator = Coordinator(cfg, run_dir, log=lambda *_: None)
    strategy = make_strategy(cfg, coordinator)
    seen_by_strategy: list[list[Message]] = []

    class SpyFedAvg(FedAvg):  # what reaches the aggregation
        def aggregate_train(self, server_round, replies):
            seen_by_strategy.append(list(replies))
            return FedAvg.aggregate_train(self, server_round, replies)

    strategy.base = SpyFedAvg
    grid = LoopbackGrid(fake_hospital_app(bad), overrides, str(run_dir.root))
    global_state = coordinator.global_state()
    new = strategy.train_securely(grid, 1, ArrayRecord(global_state), timeout=60.0)
    return cfg, coordinator, global_state, new, grid, seen_by_strategy


def fedavg(global_state: dict, hospitals: list[int]) -> dict:
    """Flower's FedAvg of the same updates, sent in the clear: the independent reference."""
    replies = [Message(RecordDict({"arrays": ArrayRecord(known_update(global_state, h)),
                                   "metrics": MetricRecord({"num-examples": SIZES[h]})}),
                       dst_node_id=0, message_type="train") for h in hospitals]
    arrays, _ = FedAvg().aggregate_train(1, replies)
    return arrays.to_torch_state_dict()


def assert_matches_fedavg(new: ArrayRecord, reference: dict, bound: float) -> float:
    released = new.to_torch_state_dict()
    worst = max(float((released[k].double() - reference[k].double()).abs().max()) for k in reference)
    largest = max(float(v.abs().max()) for v in reference.values())
    # The stated bound, plus float32 rounding of the weights (FedAvg's and ours, half an ulp each).
    assert worst <= bound + largest * float(np.finfo(np.float32).eps), (worst, bound)
    return worst


def test_the_coordinator_sees_only_the_sum_and_it_is_fedavg(tmp_path):
    cfg, coordinator, global_state, new, grid, seen = secure_round(tmp_path)
    record = coordinator.current
    info = record["secure_aggregation"]
    assert info["summed"] == [0, 1, 2] and info["threshold"] == 3  # every hospital required by default
    settings = SecAggSettings.from_config(cfg)
    assert info["error_bound"] == pytest.approx(settings.error_bound(list(SIZES.values())))
    # The stated bound: n * 2C/Q / sum(n_i / max_weight) = 3 * 2/2^26 / (397/10^4) = 2.25e-6 here.
    assert info["error_bound"] == pytest.approx(3 * 2 / 2**26 / (397 / 1e4), rel=1e-6)

    # Not one reply the coordinator received holds an array in the clear, at any stage.
    assert len(grid.received) == 3 * 4  # setup, share keys, masked vectors, unmask
    for _, reply in grid.received:
        assert not reply.has_error(), reply.error.reason
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
    # The masked vectors are not the hospitals' quantised updates: the masks cover them.
    C, Q, M = settings.clipping_range, settings.quantization_range, settings.modulus_range
    for instruction, reply in grid.received:
        if str(instruction.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "")) != "collect_masked_vectors":
            continue
        h = int(reply.content.config_records["fitres.metrics"]["hospital"])
        masked = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        update = known_update(global_state, h)
        r = settings.share(SIZES[h])
        quantised = np.concatenate([((r * (update[k] - global_state[k]).double().numpy().ravel() + C) * Q / (2 * C))
                                    for k in global_state])
        sent = np.concatenate([m.ravel() for m in masked[1:]]).astype(np.float64)  # [0]: the weight share
        assert sent.shape == quantised.shape
        assert np.mean(np.abs(sent - quantised) <= 1) < 1e-3  # a plain update would match everywhere
        assert sent.min() >= 0 and sent.max() < M and sent.std() > M / 4  # spread over the whole ring

    # What reaches the aggregation: one reply, the mean of the three updates, and no hospital's.
    assert len(seen) == 1 and len(seen[0]) == 1
    mean = seen[0][0].content.array_records["arrays"].to_torch_state_dict()
    for h in SIZES:
        update = known_update(global_state, h)
        assert max(float((mean[k] - update[k]).abs().max()) for k in update) > 1e-3
    # ... and it is FedAvg of the same updates, within the bound.
    assert_matches_fedavg(new, fedavg(global_state, [0, 1, 2]), info["error_bound"])
    # The hospitals' metrics arrived in the clear: the coordinator accounts every epsilon.
    assert {h: m["epsilon"] for h, m in record["train"].items()} == {0: 1.5, 1: 2.5, 2: 3.5}
    coordinator.write_metrics(status="running")
    assert json.loads(coordinator.run_dir.metrics.read_text())["secure_aggregation"] is True


def test_a_refusing_hospital_drops_out_and_the_threshold_recovers_the_rest(tmp_path):
    # Hospital 2's update is NaN: it refuses before masking; two updates suffice for the round.
    _, coordinator, global_state, new, grid, _ = secure_round(tmp_path, "federation.min_train_nodes=2", bad=2)
    record = coordinator.current
    assert record["secure_aggregation"]["summed"] == [0, 1] and record["secure_aggregation"]["threshold"] == 2
    assert len(record["failures"]) == 1 and "refuses to send its update" in record["failures"][0]["reason"]
    assert "non-finite" in record["failures"][0]["reason"] and set(record["train"]) == {0, 1}
    assert new is not None and not record["model_unchanged"]
    assert_matches_fedavg(new, fedavg(global_state, [0, 1]), record["secure_aggregation"]["error_bound"])


def test_by_default_a_dropout_leaves_the_model_unchanged(tmp_path):
    _, coordinator, _, new, _, seen = secure_round(tmp_path, bad=1)
    assert new is None and coordinator.current["model_unchanged"] and seen == []
    assert "refuses to send its update" in coordinator.current["failures"][0]["reason"]


def test_a_hospital_refuses_a_plain_instruction_in_a_secure_run(tmp_path):
    overrides = overrides_for(tmp_path)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={"overrides": json.dumps(overrides), "run-dir": str(tmp_path / "secagg")})
    plain = Message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"fedgen-round": 1})}),
                    dst_node_id=1, message_type="train")
    with pytest.raises(UpdateRefused, match="unmasked"):
        secure_aggregation_mod(plain, context, lambda m, c: pytest.fail("trained"))
    # Without secure aggregation the mod is a pass-through: the default path is as before.
    context.run_config["overrides"] = json.dumps([o for o in overrides if "secure_aggregation" not in o])
    assert secure_aggregation_mod(plain, context, lambda m, c: "trained") == "trained"


def test_what_a_hospital_refuses_to_mask(tmp_path):
    cfg = load_config(overrides_for(tmp_path))
    g = {"w": torch.zeros(4), "b": torch.zeros(2)}
    ok = {"w": torch.full((4,), 0.5), "b": torch.zeros(2)}
    assert masking_problem(g, ok, 260, cfg) is None
    assert "non-finite" in masking_problem(g, {**ok, "b": torch.tensor([0.0, float("nan")])}, 260, cfg)
    assert "secagg_max_weight" in masking_problem(g, ok, 20000, cfg)
    # |r * delta| above the clipping range would be clipped: the sum would be silently wrong.
    assert "secagg_clipping_range" in masking_problem(g, {**ok, "w": torch.full((4,), 50.0)}, 9000, cfg)
    assert "wrong keys" in masking_problem(g, {"w": ok["w"]}, 260, cfg)


def test_secure_aggregation_needs_two_hospitals(tmp_path):
    with pytest.raises(ConfigError, match="secure_aggregation: needs 2 to 63 hospitals"):
        load_config(overrides_for(tmp_path, "federation.num_hospitals=1"))


@pytest.mark.slow
def test_simulation_with_secure_aggregation_and_dp_matches_the_plain_run(tmp_path):
    """One simulated federation with SecAgg+ and DP: it completes, its epsilon is that of the same
    run without SecAgg+, and its released model equals that run's within the quantisation error
    (the DP noise is made reproducible for this comparison only)."""
    from test_simulation import FEDGEN, TAGGED_ENV, tiny_overrides

    def simulate(name: str, *extra: str) -> tuple[dict, dict]:
        overrides = [*tiny_overrides(tmp_path, name), "privacy.reproducible_noise=true", *extra]
        done = subprocess.run([FEDGEN, "simulate", *overrides], capture_output=True, text=True, timeout=900,
                              env=TAGGED_ENV)
        assert done.returncode == 0, done.stdout + done.stderr
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        released = torch.load(tmp_path / name / "checkpoints" / "round-0002.pt", weights_only=False)["model"]
        return metrics, released

    secure, secure_model = simulate("secure", "federation.secure_aggregation=true")
    plain, plain_model = simulate("plain")
    assert secure["status"] == "completed" and secure["secure_aggregation"] is True
    assert plain["secure_aggregation"] is False
    for record in secure["history"]:
        assert record["secure_aggregation"]["summed"] == [0, 1] and not record["failures"] and not record["rejected"]
    for h in ("0", "1"):
        assert secure["ledgers"][h]["epsilon"] == pytest.approx(plain["ledgers"][h]["epsilon"], rel=1e-12)
        assert secure["ledgers"][h]["history"] == plain["ledgers"][h]["history"]
    worst = max(float((secure_model[k].double() - plain_model[k].double()).abs().max()) for k in plain_model)
    bound = sum(r["secure_aggregation"]["error_bound"] for r in secure["history"])
    print(f"released model: largest difference {worst:.3g}, quantisation bound per round summed {bound:.3g}")
    assert worst <= 10 * bound  # round 2 trains from a round-1 model that differs by the bound
