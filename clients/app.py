"""ClientApp: one hospital. Unpacks the message, calls `fedgen.federation.hospital.Hospital`, packs
the reply."""

from __future__ import annotations

import json
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgen.config import load_config, overrides_from_run_config
from fedgen.federation.hospital import Hospital, silos_for
from fedgen.federation.site import check_site_privacy, site_home, site_silo
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
        cfg = load_config(overrides)
        if node.get("data-dir"):
            check_site_privacy(cfg, node)
            silo, home = site_silo(cfg, partition, node), str(site_home(str(node["data-dir"]), cfg.name))
        else:
            silo = silos_for(cfg)[partition]
            home = str(node.get("hospital-home") or RunDir(key[1]).hospital_home(partition))
        _hospitals[key] = Hospital(cfg, silo, home)
    return _hospitals[key]


def recorded_account(config: ConfigRecord, hospital: Hospital) -> dict | None:
    """What the coordinator recorded of this hospital's privacy account (None before round 1)."""
    accounts = json.loads(str(config.get("fedgen-accounts", "{}")))
    return accounts.get(str(hospital.silo.hospital))


@app.train()
def train(msg: Message, context: Context) -> Message:
    hospital = hospital_for(context)
    config = msg.content.config_records["config"]
    state, metrics = hospital.train(
        msg.content.array_records["arrays"].to_torch_state_dict(),
        server_round=int(cast(int, config["fedgen-round"])),
        proximal_mu=float(cast(float, config.get("proximal-mu", 0.0))),
        recorded=recorded_account(config, hospital),
    )
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    metrics = hospital_for(context).evaluate(msg.content.array_records["arrays"].to_torch_state_dict())
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query()
def account(msg: Message, context: Context) -> Message:
    """The roll call: this hospital's ledger, checked against the coordinator's record of it."""
    hospital = hospital_for(context)
    mine = hospital.account(recorded_account(msg.content.config_records["config"], hospital))
    return Message(content=RecordDict({"metrics": MetricRecord(mine)}), reply_to=msg)
