"""ServerApp: runs the configured Flower strategy and reports every round to the Coordinator."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedgen.config import ExperimentConfig, load_config, overrides_from_run_config
from fedgen.federation.coordinator import Coordinator, RunFailed
from fedgen.federation.flat_state import FLAT_KEY, pack, unpack
from fedgen.federation.update_checks import (
    EVALUATE_METRIC_KEYS,
    StateDict,
    metrics_problem,
    update_problem,
)
from fedgen.privacy.accounting import BudgetExceededError
from fedgen.run_dir import RunDir
from server.grid import PromptGrid
from server.secure_aggregation import SecureReporting, run_secure_rounds
from server.selection import run_selection

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}

app = ServerApp()


def _say(text: str) -> None:
    # The launcher shows lines with this prefix and keeps the rest of Flower's output in a log.
    print(f"[fedgen] {text}", flush=True)


class Reporting:
    """Mixin for a Flower strategy: tells the Coordinator what each round did, drops bad updates,
    and numbers rounds from the checkpoint it resumed from."""

    coordinator: Coordinator
    round_offset: int
    instructions: list[Message]  # this round's training instructions, as sent
    weighted_by_key: str  # (FedAvg's)
    train_metrics_aggr_fn: Callable

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        config["fedgen-round"] = self.round_offset + server_round
        # Each hospital checks its ledger against this before spending anything (`Hospital.account`).
        config["fedgen-accounts"] = json.dumps(self.coordinator.recorded_accounts())
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        if self.coordinator.hospital_dp is not None:  # fraction_train is 1: these are all connected hospitals
            messages = self._poisson_sample(self.round_offset + server_round, messages)
        self.coordinator.begin_round(self.round_offset + server_round, sampled=len(messages))
        self.instructions = messages  # Flower sets their message ids when it sends them
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        config["fedgen-round"] = self.round_offset + server_round
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        fed = self.coordinator.cfg.federation
        # Go by the instruction a reply answers: for a node it lost, the SuperLink itself sends
        # the error reply (from its own node id).
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.instructions}
        answered = {m.metadata.reply_to_message_id for m in replies}
        for message_id, node in sent_to.items():
            if message_id not in answered:  # too slow for the round, or gone without a trace
                self.coordinator.record_failure(node, f"no reply within federation.round_timeout ({fed.round_timeout:g} s)")
        template = self.coordinator.unet.state_dict()  # the global model this round: names, shapes, values
        accepted: list[Message] = []
        # The accepted replies' states, each decoded once; kept only where fedgen aggregates them
        # itself (hospital-level DP): FedAvg reads the replies, and a second copy of every update
        # cost the ServerApp 0.1 GiB at 100 hospitals (benchmarks/scale.py).
        updates: list[StateDict] = []
        keep_updates = self.coordinator.hospital_dp is not None
        seen: set[int] = set()
        for msg in replies:
            node = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                self.coordinator.record_failure(node, str(msg.error.reason))
                continue
            hospital, update, problem = self._check_train_reply(msg, seen, template)
            if problem or hospital is None or update is None:  # (no hospital or update only comes with a problem)
                spent = dict(msg.content.metric_records["metrics"]) if hospital is not None else None
                self.coordinator.record_rejection(hospital, str(problem), node=node, spent=spent)
                continue
            seen.add(hospital)
            update = self._pack_reply(msg, update, template)
            self.coordinator.record_train(hospital, dict(msg.content.metric_records["metrics"]))
            if fed.record_updates:  # the curious coordinator keeps it (`fedgen invert`)
                self.coordinator.record_update(self.round_offset + server_round, hospital, update)
            accepted.append(msg)
            if keep_updates:
                updates.append(update)
        required = self.coordinator.required_updates(len(sent_to))
        if len(accepted) < required:
            self.coordinator.record_model_unchanged(len(accepted), required)
            accepted, updates = [], []
        if self.coordinator.hospital_dp is not None:
            return self._release_hospital_level(server_round, accepted, updates)
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc]

    def _poisson_sample(self, server_round: int, messages: list[Message]) -> list[Message]:
        """Hospital-level DP: each hospital is in the round with probability q_h, independently
        and secretly; the round is refused first if it would pass the hospital-level budget."""
        hospital_dp = self.coordinator.hospital_dp
        assert hospital_dp is not None
        try:
            hospital_dp.begin_round(server_round)
        except BudgetExceededError as err:
            error = f"hospital level, at the coordinator: {err}"
            _say(error)
            self.coordinator.stop("refused", error)
            raise RunFailed(self.coordinator.run_dir.metrics, error) from err
        return [m for m, keep in zip(messages, hospital_dp.sample(len(messages)), strict=True) if keep]

    def _release_hospital_level(self, server_round: int, accepted: list[Message], updates: list[StateDict]):
        """DP-FedAvg in fedgen's own aggregation (fedgen.privacy.hospital_level), not Flower's
        DifferentialPrivacyServerSideFixedClipping: that one samples a fixed number of nodes, weights
        updates by num-examples and divides the noise by the number that replied (so one hospital's
        share is not bounded by C / expected count), and draws the noise from numpy's global generator."""
        hospital_dp = self.coordinator.hospital_dp
        assert hospital_dp is not None
        state, info = hospital_dp.release(self.round_offset + server_round, self.coordinator.global_state(), updates)
        self.coordinator.record_hospital_level(info)
        contents = [m.content for m in accepted]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key) if contents else MetricRecord()
        return ArrayRecord(pack(state)), metrics

    def _check_train_reply(self, msg: Message, seen: set[int],
                           template: StateDict) -> tuple[int | None, StateDict | None, str | None]:
        """(reported hospital, its update as decoded, why the reply must be dropped or None).
        Nothing in a reply is trusted: a malformed one is rejected here instead of crashing the
        aggregation. `template` is the global model the update is checked against."""
        content = msg.content
        if set(content.array_records) != {"arrays"} or set(content.metric_records) != {"metrics"}:
            return None, None, (f"malformed reply (array records {sorted(content.array_records)}, "
                                f"metric records {sorted(content.metric_records)})")
        metrics = dict(content.metric_records["metrics"])
        problem = metrics_problem(metrics, self.coordinator.cfg.federation.num_hospitals)
        if problem:
            return None, None, problem
        hospital = int(cast(int, metrics["hospital"]))
        if hospital in seen:
            return hospital, None, f"hospital {hospital} already sent an update this round"
        try:
            update = unpack(content.array_records["arrays"].to_torch_state_dict(), template)
        except Exception as err:  # a hostile payload may not even decode
            return hospital, None, f"unreadable arrays ({type(err).__name__}: {err})"
        return hospital, update, update_problem(template, update, self.coordinator.cfg.federation.max_update_norm)

    @staticmethod
    def _pack_reply(msg: Message, update: StateDict, template: StateDict) -> StateDict:
        """A checked reply that came as a plain state dict is packed like the instruction was:
        FedAvg averages like with like. Returns the update as it is aggregated: float32, in the
        global model's order."""
        update = {k: update[k].float() for k in template}  # (a packed one already is: no copy)
        if list(msg.content.array_records["arrays"].keys()) != [FLAT_KEY]:
            msg.content.array_records["arrays"] = ArrayRecord(pack(update))
        return update

    def state_of(self, arrays: ArrayRecord) -> dict:
        """A model state from a record, packed on the wire or not (`fedgen.federation.flat_state`)."""
        return unpack(arrays.to_torch_state_dict(), self.coordinator.unet.state_dict())

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        usable = []
        for msg in replies:
            if msg.has_error() or set(msg.content.metric_records) != {"metrics"}:
                continue
            metrics = dict(msg.content.metric_records["metrics"])
            hospital = metrics.get("hospital")
            if set(metrics) == EVALUATE_METRIC_KEYS and isinstance(hospital, int):
                self.coordinator.record_evaluate(hospital, metrics)
                usable.append(msg)
        return super().aggregate_evaluate(server_round, usable)  # type: ignore[misc]


def nodes_wanted(fed) -> int:
    """Connected hospitals to wait for before a round (0 in min_train_nodes: all of them)."""
    return max(fed.min_available_nodes, fed.min_train_nodes or fed.num_hospitals)


def make_strategy(cfg: ExperimentConfig, coordinator: Coordinator):
    fed = cfg.federation
    base = STRATEGIES[fed.strategy]
    kwargs = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0 if cfg.data.validation_fraction > 0 else 0.0,
        min_train_nodes=max(1, fed.min_train_nodes),
        min_evaluate_nodes=max(1, fed.min_train_nodes),
        min_available_nodes=nodes_wanted(fed),
    )
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    if fed.strategy == "fedadam":
        kwargs.update(eta=fed.server_learning_rate, eta_l=cfg.training.learning_rate)
    if fed.secure_aggregation:  # its training step runs SecAgg+ (server/secure_aggregation.py)
        strategy = type(f"SecureReporting{base.__name__}", (SecureReporting, Reporting, base), {})(**kwargs)
        strategy.base = base
    else:
        strategy = type(f"Reporting{base.__name__}", (Reporting, base), {})(**kwargs)
    strategy.coordinator = coordinator
    strategy.round_offset = coordinator.start_round
    strategy.instructions = []
    return strategy


def roll_call(grid: Grid, coordinator: Coordinator, wait: bool) -> tuple[dict[str, dict], list[str]]:
    """Ask every connected hospital for its ledger, checked against the coordinator's record.
    Returns (accounts by hospital, refusals). With `wait`, first waits up to round_timeout until
    as many hospitals are connected as a round needs."""
    fed = coordinator.cfg.federation
    wanted = nodes_wanted(fed)
    deadline = time.monotonic() + (fed.round_timeout if wait else 0.0)
    nodes = list(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    config = ConfigRecord({"fedgen-accounts": json.dumps(coordinator.recorded_accounts())})
    messages = [Message(RecordDict({"config": config}), dst_node_id=node, message_type="query") for node in nodes]
    accounts: dict[str, dict] = {}
    refusals: list[str] = []
    for reply in grid.send_and_receive(messages, timeout=fed.round_timeout):
        if reply.has_error():
            reason = str(reply.error.reason).strip()
            refusals.append(reason.splitlines()[-1] if reason else f"node {reply.metadata.src_node_id} failed")
            continue
        metrics = dict(reply.content.metric_records.get("metrics", {}))
        if isinstance(metrics.get("hospital"), int):
            accounts[str(metrics["hospital"])] = metrics
    return accounts, refusals


def check_accounts_before_resuming(grid: Grid, coordinator: Coordinator) -> None:
    """Before a resumed run spends anything: every hospital's ledger must hold at least what the
    coordinator recorded (a deleted or rolled-back ledger would restart its epsilon at 0)."""
    accounts, refusals = roll_call(grid, coordinator, wait=True)
    recorded = coordinator.recorded_accounts()
    for h, mine in accounts.items():  # the hospitals check themselves; check their answers too
        if h in recorded and int(cast(int, mine["steps"])) < recorded[h]["steps"]:
            refusals.append(f"hospital {h}: its ledger records {mine['steps']} steps, the coordinator "
                            f"recorded {recorded[h]['steps']}")
    coordinator.accounts = accounts  # what the answering hospitals' ledgers hold is what they spent
    if refusals:
        error = "refusing to resume: " + "; ".join(dict.fromkeys(refusals))
        _say(error)
        coordinator.stop("refused", error)
        raise RunFailed(coordinator.run_dir.metrics, error)


@app.main()
def main(grid: Grid, context: Context) -> None:
    grid = PromptGrid(grid)  # replies are taken as they come, not on Flower's 3 s poll
    cfg = load_config(overrides_from_run_config(context.run_config))
    run_dir = RunDir(str(context.run_config["run-dir"]))
    if str(context.run_config.get("mode", "train")) == "select":  # `fedgen select`: one vote, no training
        run_selection(grid, cfg, run_dir, _say)
        return
    coordinator = Coordinator(cfg, run_dir, log=_say)
    if coordinator.start_round:
        _say(f"resuming after round {coordinator.start_round} from {run_dir.checkpoints}")
        if cfg.privacy.enabled:
            check_accounts_before_resuming(grid, coordinator)
    strategy = make_strategy(cfg, coordinator)

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            coordinator.end_round(strategy.round_offset + server_round, strategy.state_of(arrays))
        return None

    if coordinator.rounds_left and cfg.federation.secure_aggregation:
        run_secure_rounds(strategy, grid, ArrayRecord(coordinator.global_state()), coordinator.rounds_left,
                          after_round, timeout=cfg.federation.round_timeout)
    elif coordinator.rounds_left:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(pack(coordinator.global_state())),  # one array on the wire
            num_rounds=coordinator.rounds_left,
            train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}),
            evaluate_fn=after_round,
            timeout=cfg.federation.round_timeout,
        )
    if cfg.privacy.enabled:  # what each hospital spent, from its own ledger (failed rounds included)
        coordinator.accounts, _ = roll_call(grid, coordinator, wait=False)
    pipeline = coordinator.finish()
    _say(f"released the global model as a diffusers pipeline: {pipeline}")
    for lost in coordinator.lost():
        _say(f"lost: {lost}")
    if not coordinator.trained_as_configured():
        rounds = coordinator.summary()["rounds_model_unchanged"]
        raise RunFailed(run_dir.metrics, f"incomplete: round(s) {rounds} had too few usable updates")
