"""ServerApp: runs the configured Flower strategy and reports every round to the Coordinator."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedgen.config import ExperimentConfig, load_config, overrides_from_run_config
from fedgen.federation.coordinator import Coordinator
from fedgen.federation.update_checks import EVALUATE_METRIC_KEYS, metrics_problem
from fedgen.run_dir import RunDir

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

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        config["fedgen-round"] = self.round_offset + server_round
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
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
        accepted: list[Message] = []
        seen: set[int] = set()
        for msg in replies:
            node = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                self.coordinator.record_failure(node, str(msg.error.reason))
                continue
            hospital, problem = self._check_train_reply(msg, seen)
            if problem or hospital is None:  # (no hospital number only comes with a problem)
                self.coordinator.record_rejection(hospital, str(problem), node=node)
                continue
            seen.add(hospital)
            self.coordinator.record_train(hospital, dict(msg.content.metric_records["metrics"]))
            accepted.append(msg)
        if len(accepted) < fed.min_train_nodes:
            _say(f"round {self.round_offset + server_round}: {len(accepted)} usable update(s), fewer than "
                 f"federation.min_train_nodes={fed.min_train_nodes}; the global model is unchanged")
            accepted = []
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc]

    def _check_train_reply(self, msg: Message, seen: set[int]) -> tuple[int | None, str | None]:
        """(reported hospital, why the reply must be dropped or None). Nothing in a reply is trusted:
        a malformed one is rejected here instead of crashing the aggregation."""
        content = msg.content
        if set(content.array_records) != {"arrays"} or set(content.metric_records) != {"metrics"}:
            return None, (f"malformed reply (array records {sorted(content.array_records)}, "
                          f"metric records {sorted(content.metric_records)})")
        metrics = dict(content.metric_records["metrics"])
        problem = metrics_problem(metrics, self.coordinator.cfg.federation.num_hospitals)
        if problem:
            return None, problem
        hospital = int(cast(int, metrics["hospital"]))
        if hospital in seen:
            return hospital, f"hospital {hospital} already sent an update this round"
        try:
            update = content.array_records["arrays"].to_torch_state_dict()
        except Exception as err:  # a hostile payload may not even decode
            return hospital, f"unreadable arrays ({type(err).__name__}: {err})"
        return hospital, self.coordinator.check_update(update)

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


def make_strategy(cfg: ExperimentConfig, coordinator: Coordinator):
    fed = cfg.federation
    base = STRATEGIES[fed.strategy]
    kwargs = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0 if cfg.data.validation_fraction > 0 else 0.0,
        min_train_nodes=fed.min_train_nodes,
        min_evaluate_nodes=fed.min_train_nodes,
        min_available_nodes=max(fed.min_available_nodes, fed.min_train_nodes),
    )
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    if fed.strategy == "fedadam":
        kwargs.update(eta=fed.server_learning_rate, eta_l=cfg.training.learning_rate)
    strategy = type(f"Reporting{base.__name__}", (Reporting, base), {})(**kwargs)
    strategy.coordinator = coordinator
    strategy.round_offset = coordinator.start_round
    strategy.instructions = []
    return strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_config(overrides_from_run_config(context.run_config))
    run_dir = RunDir(str(context.run_config["run-dir"]))
    coordinator = Coordinator(cfg, run_dir, log=_say)
    if coordinator.start_round:
        _say(f"resuming after round {coordinator.start_round} from {run_dir.checkpoints}")
    strategy = make_strategy(cfg, coordinator)

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            coordinator.end_round(strategy.round_offset + server_round, arrays.to_torch_state_dict())
        return None

    if coordinator.rounds_left:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(coordinator.global_state()),
            num_rounds=coordinator.rounds_left,
            train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}),
            evaluate_fn=after_round,
            timeout=cfg.federation.round_timeout,
        )
    pipeline = coordinator.finish()
    _say(f"released the global model as a diffusers pipeline: {pipeline}")
