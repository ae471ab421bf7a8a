"""ClientApp: one hospital. Unpacks the message, calls `fedgen.federation.hospital.Hospital`, packs
the reply."""

from __future__ import annotations

import json
from copy import copy
from functools import lru_cache
from typing import cast

import flwr.compat.common.recorddict_compat as compat
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedgen.config import load_config, overrides_from_run_config
from fedgen.federation.flat_state import FLAT_KEY, pack, unpack
from fedgen.federation.hospital import Hospital, silos_for
from fedgen.federation.secure_aggregation import KEYS, masking_problem, update_delta
from fedgen.federation.site import check_site_privacy, site_budget, site_home, site_silo
from fedgen.privacy.private_selection import PublicCells
from fedgen.run_dir import RunDir

app = ClientApp()
_hospitals: dict[tuple, Hospital] = {}


def hospital_for(context: Context) -> Hospital:
    """The hospital this node serves. One simulated worker may serve several: cache each.

    A deployed SuperNode names its own `data-dir` (and optionally `data-path`) in its node config:
    its ledger and records then live there (`fedgen.federation.site`), never in the coordinator's
    run dir."""
    overrides = overrides_from_run_config(context.run_config)
    node = context.node_config
    partition = int(node["partition-id"])
    key = (tuple(overrides), str(context.run_config["run-dir"]), partition, str(node.get("data-dir", "")))
    if key not in _hospitals:
        # A deployed hospital's ClientApp process lives across runs (clients/executor.py): keep
        # only this run's hospitals (a simulated worker may serve several of them).
        for old in [k for k in _hospitals if k[:2] != key[:2]]:
            del _hospitals[old]
        cfg = load_config(overrides)
        budget = site_budget(node)
        if node.get("data-dir"):
            check_site_privacy(cfg, node)
            silo, home = site_silo(cfg, partition, node), str(site_home(str(node["data-dir"]), cfg.name))
        else:
            silo = silos_for(cfg)[partition]
            home = str(node.get("hospital-home") or RunDir(key[1]).hospital_home(partition))
        _hospitals[key] = Hospital(cfg, silo, home, site_budget=budget)
    return _hospitals[key]


def recorded_account(config: ConfigRecord, hospital: Hospital) -> dict | None:
    """What the coordinator recorded of this hospital's privacy account (None before round 1)."""
    accounts = json.loads(str(config.get("fedgen-accounts", "{}")))
    return accounts.get(str(hospital.silo.hospital))


class UpdateRefused(RuntimeError):
    """The hospital will not mask and send this update (secure aggregation: the server cannot check it)."""



@lru_cache(maxsize=8)
def secure_aggregation_on(overrides: tuple[str, ...]) -> bool:
    return load_config(list(overrides)).federation.secure_aggregation


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """Train messages go through Flower's `secaggplus_mod` when the run config says
    `federation.secure_aggregation=true`, and straight to `train` otherwise. In such a run a
    plain training instruction is refused: the update would leave the hospital unmasked."""
    if not secure_aggregation_on(tuple(overrides_from_run_config(context.run_config))):
        return call_next(msg, context)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        raise UpdateRefused("this run has federation.secure_aggregation=true, but the training instruction "
                            "is not part of the SecAgg+ protocol: refusing to send an unmasked update")
    return secaggplus_mod(msg, context, lambda m, c: masked_train(m, c, call_next))


def masked_train(msg: Message, context: Context, call_next) -> Message:
    """The SecAgg+ stage that trains: unpack the legacy FitIns, train, check the update here (the
    server will see only the sum), and reply with the update (new - global) for the mod to mask.
    The metrics travel in the clear beside it (`fedgen.federation.secure_aggregation`)."""
    hospital = hospital_for(context)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = [str(k) for k in json.loads(str(fitins.config[KEYS]))]
    arrays = parameters_to_ndarrays(fitins.parameters)
    global_state = {k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays, strict=True)}
    weight = hospital.plan.num_examples
    if weight > hospital.cfg.federation.secagg_max_weight:  # before any epsilon is spent
        raise UpdateRefused(f"hospital {hospital.silo.hospital}: {weight} training examples exceed "
                            f"federation.secagg_max_weight={hospital.cfg.federation.secagg_max_weight:g}")
    config = ConfigRecord({k: v for k, v in fitins.config.items() if k != KEYS})
    # The same message (metadata) with the plain instruction a non-secure round would carry.
    plain = make_message(copy(msg.metadata), RecordDict({"arrays": ArrayRecord(global_state), "config": config}))
    reply = call_next(plain, context)
    new_state = reply.content.array_records["arrays"].to_torch_state_dict()
    metrics = dict(reply.content.metric_records["metrics"])
    problem = masking_problem(global_state, new_state, float(cast(float, metrics["num-examples"])), hospital.cfg)
    if problem:
        raise UpdateRefused(f"hospital {hospital.silo.hospital} refuses to send its update: {problem}")
    delta = update_delta(global_state, new_state)
    # float64: the mod quantises (r * delta + C) * Q / 2C, around 2^25, where float32 steps by 4.
    parameters = ndarrays_to_parameters([delta[k].double().numpy() for k in keys])
    fitres = FitRes(Status(Code.OK, ""), parameters, int(cast(int, metrics["num-examples"])), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    hospital = hospital_for(context)
    config = msg.content.config_records["config"]
    received = msg.content.array_records["arrays"].to_torch_state_dict()
    state, metrics = hospital.train(
        unpack(received, hospital.template),
        server_round=int(cast(int, config["fedgen-round"])),
        proximal_mu=float(cast(float, config.get("proximal-mu", 0.0))),
        recorded=recorded_account(config, hospital),
    )
    # The reply goes back as the instruction came: packed (one array on the wire) or not (SecAgg+).
    arrays = ArrayRecord(pack(state) if FLAT_KEY in received else state)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    hospital = hospital_for(context)
    metrics = hospital.evaluate(unpack(msg.content.array_records["arrays"].to_torch_state_dict(), hospital.template))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query()
def account(msg: Message, context: Context) -> Message:
    """The roll call: this hospital's ledger, checked against the coordinator's record of it."""
    hospital = hospital_for(context)
    mine = hospital.account(recorded_account(msg.content.config_records["config"], hospital))
    return Message(content=RecordDict({"metrics": MetricRecord(mine)}), reply_to=msg)


@app.query("select")
def select(msg: Message, context: Context) -> Message:
    """Private selection (`fedgen select`): this hospital's noisy votes over the coordinator's
    public cells. The noise is set by the hospital's own config, not by the message."""
    hospital = hospital_for(context)
    arrays = msg.content.array_records["cells"].to_torch_state_dict()
    counts, metrics = hospital.vote(PublicCells(arrays["pool"].float(), arrays["labels"]))
    return Message(content=RecordDict({"votes": ArrayRecord({"counts": counts}), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)
