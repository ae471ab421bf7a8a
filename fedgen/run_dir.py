"""The run directory: one place per run for its config, checkpoints, logs, metrics and release.

runs/<name>/
  config.yaml, overrides.json, command.txt   what was run (resolved config and command line)
  tb/                                        TensorBoard events
  checkpoints/round-0003.pt                  global model after each round (+ history so far)
  pipeline/                                  the final global model as a diffusers DDPMPipeline
  hospitals/hospital-0/{ledger,records}.json each hospital's epsilon ledger and member/held-out split
  metrics.json                               per-round history and every hospital's ledger
  base.json                                  where round 0's weights came from (model.init, sha256)
  flower.log                                 everything Flower printed
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fedgen.config import ConfigError, ExperimentConfig, to_config

CHECKPOINT_GLOB = "round-*.pt"


def _json_safe(value):
    """JSON has no inf/nan: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data) -> None:
    """Atomic JSON write: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=1))
    os.replace(tmp, path)


def save_torch(path: Path, data: dict) -> None:
    """Atomic torch.save: a crash mid-write never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    """A JSON file written by `write_json`, or {} when it does not exist (yet)."""
    return json.loads(path.read_text()) if path.exists() else {}


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    config = property(lambda self: self.root / "config.yaml")
    overrides = property(lambda self: self.root / "overrides.json")
    command = property(lambda self: self.root / "command.txt")
    tensorboard = property(lambda self: self.root / "tb")
    checkpoints = property(lambda self: self.root / "checkpoints")
    pipeline = property(lambda self: self.root / "pipeline")
    metrics = property(lambda self: self.root / "metrics.json")
    base = property(lambda self: self.root / "base.json")
    flower_log = property(lambda self: self.root / "flower.log")

    def hospital_home(self, hospital: int) -> Path:
        return self.root / "hospitals" / f"hospital-{hospital}"

    def hospital_homes(self) -> list[Path]:
        return sorted((self.root / "hospitals").glob("hospital-*"), key=lambda p: int(p.name.split("-")[1]))

    def checkpoint_path(self, server_round: int) -> Path:
        return self.checkpoints / f"round-{server_round:04d}.pt"

    def save_checkpoint(self, server_round: int, state: dict, history: list[dict]) -> None:
        save_torch(self.checkpoint_path(server_round), {"round": server_round, "model": state, "history": history})

    def latest_checkpoint(self) -> dict | None:
        """The last complete checkpoint ({'round', 'model', 'history'}), or None before round 1."""
        found = sorted(self.checkpoints.glob(CHECKPOINT_GLOB))
        return torch.load(found[-1], weights_only=False) if found else None

    def experiment_config(self) -> ExperimentConfig:
        """The resolved config the run was trained with (config.yaml)."""
        if not self.config.exists():
            raise FileNotFoundError(f"{self.root}: not a fedgen run directory (no config.yaml)")
        raw = OmegaConf.load(self.config)
        if not isinstance(raw, DictConfig):
            raise ConfigError(f"{self.config}: not a fedgen config")
        return to_config(raw)

    def read_metrics(self) -> dict:
        return read_json(self.metrics)

    def is_complete(self) -> bool:
        return self.read_metrics().get("status") == "completed"
