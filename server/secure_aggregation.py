"""SecAgg+ rounds for the ServerApp (`federation.secure_aggregation=true`): the coordinator
receives the hospitals' metrics in the clear and only the weighted mean of their updates.

Flower 1.41's `SecAggPlusWorkflow` speaks the legacy API (a `LegacyContext` whose strategy has
`configure_fit`/`aggregate_fit`). Here it runs one round's training step inside the Message-API
strategy's loop: the round's instructions become legacy `FitIns`, the workflow's four stages
(setup, share keys, collect masked vectors, unmask) run through a `ScreeningGrid`, and what the
workflow hands its strategy (the unmasked sum and each hospital's clear metrics) is reported to
the Coordinator. What is masked, what each side checks and the error bound:
`fedgen/federation/secure_aggregation.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedgen.federation.secure_aggregation import KEYS, SecAggSettings, apply_update
from fedgen.federation.update_checks import metrics_problem, update_problem

FITRES_METRICS = "fitres.metrics"  # where a legacy FitRes keeps its (clear) metrics


class ScreeningGrid:
    """The Grid the workflow talks through: it records which node failed at which stage, and at
    the stage where masked vectors arrive it screens each reply's clear metrics. A reply that
    fails is withheld from the workflow, which then treats that hospital as dropped out (its
    vector is not summed; its masks are cancelled from the survivors' shares)."""

    def __init__(self, grid: Grid, num_hospitals: int):
        self.grid = grid
        self.num_hospitals = num_hospitals
        self.failures: dict[int, str] = {}  # node -> why (error reply, or no reply)
        self.rejected: dict[int, tuple[int | None, str, dict | None]] = {}  # node -> (hospital, why, metrics)
        self.replies: list[Message] = []  # every reply the coordinator received, for the record

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else ""
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies += replies
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = {r.metadata.reply_to_message_id for r in replies}
        for message_id, node in sent_to.items():
            if message_id not in answered:
                self.failures.setdefault(node, f"no reply within federation.round_timeout (SecAgg+ stage {stage})")
        kept, seen = [], {h for h, _, _ in self.rejected.values()}
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                self.failures.setdefault(node, f"SecAgg+ stage {stage}: {reply.error.reason}")
            elif stage == Stage.COLLECT_MASKED_VECTORS and (screened := self._screen(reply, seen)) is not None:
                self.rejected[node] = screened
                continue
            kept.append(reply)
        return kept

    def _screen(self, reply: Message, seen: set) -> tuple[int | None, str, dict | None] | None:
        """(hospital, why, its metrics) if the masked reply must not be summed, else None."""
        content = reply.content
        if any(len(record) for record in content.array_records.values()):
            return None, "sent arrays in the clear in a secure-aggregation round", None
        if FITRES_METRICS not in content.config_records:
            return None, f"malformed reply (config records {sorted(content.config_records)})", None
        metrics = dict(content.config_records[FITRES_METRICS])
        problem = metrics_problem(metrics, self.num_hospitals)
        if problem:
            return None, problem, None
        hospital = int(cast(int, metrics["hospital"]))
        if hospital in seen:
            return hospital, f"hospital {hospital} already sent an update this round", metrics
        seen.add(hospital)
        return None


class _Instructions:
    """The legacy strategy the workflow asks: hands out the round's FitIns, keeps what the
    workflow aggregated (every result's parameters are the same unmasked weighted mean)."""

    def __init__(self, grid: Grid, fitins: dict[int, FitIns]):
        self.grid = grid
        self.fitins = fitins
        self.results: list[tuple[GridClientProxy, FitRes]] = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, self.grid, 0), ins) for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return (self.results[0][1].parameters if self.results else None), {}


class SecureReporting:
    """Mixin before `Reporting`: the training step of a round runs SecAgg+ (`train_securely`)."""

    def train_securely(self, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float) -> ArrayRecord | None:
        """One round's training step. Returns the new global arrays, or None (model unchanged)."""
        coordinator = self.coordinator  # type: ignore[attr-defined]
        cfg = coordinator.cfg
        settings = SecAggSettings.from_config(cfg)
        messages = list(self.configure_train(server_round, arrays, ConfigRecord({}), grid))  # type: ignore[attr-defined]
        keys = list(arrays.keys())
        parameters = ndarrays_to_parameters([arrays[k].numpy() for k in keys])
        fitins = {m.metadata.dst_node_id: FitIns(parameters, {**dict(m.content.config_records["config"]), KEYS: json.dumps(keys)})
                  for m in messages}
        required = coordinator.required_updates(len(messages))
        threshold = min(max(2, required), len(messages))
        screening = ScreeningGrid(grid, cfg.federation.num_hospitals)
        legacy = _Instructions(grid, fitins)
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                strategy=legacy)  # type: ignore[arg-type]
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # the FitIns carry the model
        SecAggPlusWorkflow(
            num_shares=1.0,  # every sampled hospital holds a share of every other's secrets
            reconstruction_threshold=threshold,
            max_weight=settings.max_weight,
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            modulus_range=settings.modulus_range,
            timeout=timeout,
        )(screening, context)  # type: ignore[arg-type]

        for node, reason in screening.failures.items():
            coordinator.record_failure(node, reason)
        for node, (hospital, reason, spent) in screening.rejected.items():
            coordinator.record_rejection(hospital, reason, node=node, spent=spent)
        summed = {int(cast(int, res.metrics["hospital"])): dict(res.metrics) for _, res in legacy.results}
        for hospital, metrics in summed.items():
            coordinator.record_train(hospital, metrics)
        weights = [float(m["num-examples"]) for m in summed.values()]
        coordinator.record_secure_aggregation({
            "summed": sorted(summed), "threshold": threshold,
            "clipping_range": settings.clipping_range, "quantization_range": settings.quantization_range,
            "error_bound": settings.error_bound(weights) if weights else None,
        })
        if not legacy.results or len(summed) < required:
            coordinator.record_model_unchanged(len(summed), required)
            return None
        mean = parameters_to_ndarrays(legacy.results[0][1].parameters)
        global_state = arrays.to_torch_state_dict()
        new_state = apply_update(global_state, {k: torch.from_numpy(a) for k, a in zip(keys, mean, strict=True)})
        # All the coordinator ever sees of the weights: the mean (`fedgen invert` attacks this).
        coordinator.record_update(self.round_offset + server_round, None, new_state)  # type: ignore[attr-defined]
        problem = update_problem(global_state, new_state, cfg.federation.max_update_norm)
        if problem:  # no single hospital can be named: the sum is all the coordinator has
            coordinator.record_rejection(None, f"the securely aggregated update: {problem}")
            coordinator.record_model_unchanged(0, required)
            return None
        # The base strategy (FedAvg, FedProx, FedAdam) aggregates one reply: the sum's mean.
        total = MetricRecord({"num-examples": sum(weights)})
        reply = Message(RecordDict({"arrays": ArrayRecord(new_state), "metrics": total}), dst_node_id=0, message_type="train")
        aggregated, _ = self.base.aggregate_train(self, server_round, [reply])  # type: ignore[attr-defined]
        return aggregated


def run_secure_rounds(strategy, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int,
                      evaluate_fn: Callable[[int, ArrayRecord], object], timeout: float) -> None:
    """The loop of Flower's `Strategy.start`, with SecAgg+ in place of its training step."""
    arrays = initial_arrays
    evaluate_fn(0, arrays)
    for server_round in range(1, num_rounds + 1):
        new = strategy.train_securely(grid, server_round, arrays, timeout)
        if new is not None:
            arrays = new
        instructions = strategy.configure_evaluate(server_round, arrays, ConfigRecord({}), grid)
        strategy.aggregate_evaluate(server_round, grid.send_and_receive(instructions, timeout=timeout))
        evaluate_fn(server_round, arrays)
