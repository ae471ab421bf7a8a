"""ServerApp: runs the configured Flower strategy and reports every round to the Coordinator."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedgen.config import ExperimentConfig, load_config, overrides_from_run_config
from fedgen.coordinator import Coordinator
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

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        config["fedgen-round"] = self.round_offset + server_round
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self.coordinator.begin_round(self.round_offset + server_round, sampled=len(messages))
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        config["fedgen-round"] = self.round_offset + server_round
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        accepted = []
        for msg in replies:
            if msg.has_error():
                self.coordinator.record_failure(msg.metadata.src_node_id, str(msg.error.reason))
                continue
            metrics = dict(msg.content.metric_records["metrics"])
            hospital = int(cast(int, metrics["hospital"]))
            update = msg.content.array_records["arrays"].to_torch_state_dict()
            problem = self.coordinator.check_update(update)
            if problem:
                self.coordinator.record_rejection(hospital, problem)
                continue
            self.coordinator.record_train(hospital, metrics)
            accepted.append(msg)
        if not accepted:
            _say(f"round {self.round_offset + server_round}: no usable update; the global model is unchanged")
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        for msg in replies:
            if not msg.has_error():
                metrics = dict(msg.content.metric_records["metrics"])
                self.coordinator.record_evaluate(int(cast(int, metrics["hospital"])), metrics)
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]


def make_strategy(cfg: ExperimentConfig, coordinator: Coordinator):
    fed = cfg.federation
    base = STRATEGIES[fed.strategy]
    kwargs = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0 if cfg.data.validation_fraction > 0 else 0.0,
        min_train_nodes=fed.min_train_nodes,
        min_evaluate_nodes=fed.min_train_nodes,
        min_available_nodes=fed.min_train_nodes,
    )
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    if fed.strategy == "fedadam":
        kwargs.update(eta=fed.server_learning_rate, eta_l=cfg.training.learning_rate)
    strategy = type(f"Reporting{base.__name__}", (Reporting, base), {})(**kwargs)
    strategy.coordinator = coordinator
    strategy.round_offset = coordinator.start_round
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
        )
    pipeline = coordinator.finish()
    _say(f"released the global model as a diffusers pipeline: {pipeline}")
