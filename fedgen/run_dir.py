"""The run directory: one place per run for its config, checkpoints, logs, metrics and release.

runs/<name>/
  config.yaml, overrides.json, command.txt   what was run (resolved config and command line)
  tb/                                        TensorBoard events
  checkpoints/round-0003.pt                  global model after each round (+ history so far)
  updates/round-0003/hospital-1.pt           what the coordinator received (federation.record_updates);
                                             aggregate.pt under secure aggregation, global.pt: round 1's start
  pipeline/                                  the final global model as a diffusers DDPMPipeline
  hospitals/hospital-0/{ledger,records}.json each hospital's epsilon ledger and member/held-out split
  hospital_level_ledger.json                 the coordinator's hospital-level ledger (privacy.hospital_level)
  metrics.json                               per-round history and every hospital's ledger
  privacy.json                               the privacy card: every hospital's (sigma, q, steps) and epsilons
  base.json                                  where round 0's weights came from (model.init, sha256)
  flower.log                                 everything Flower printed
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

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
    import torch  # here, not at the top: a launcher reads run dirs without torch (running.apart)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be trusted: resuming stops before any hospital trains."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    selection = property(lambda self: self.root / "selection.pt")  # `fedgen select`'s release
    checkpoints = property(lambda self: self.root / "checkpoints")
    pipeline = property(lambda self: self.root / "pipeline")
    metrics = property(lambda self: self.root / "metrics.json")
    base = property(lambda self: self.root / "base.json")
    privacy_card = property(lambda self: self.root / "privacy.json")
    flower_log = property(lambda self: self.root / "flower.log")

    def hospital_home(self, hospital: int) -> Path:
        return self.root / "hospitals" / f"hospital-{hospital}"

    def hospital_homes(self) -> list[Path]:
        return sorted((self.root / "hospitals").glob("hospital-*"), key=lambda p: int(p.name.split("-")[1]))

    def checkpoint_path(self, server_round: int) -> Path:
        return self.checkpoints / f"round-{server_round:04d}.pt"

    updates = property(lambda self: self.root / "updates")

    def update_path(self, server_round: int, name: str) -> Path:
        """A state dict the coordinator kept of round `server_round`: "hospital-H" (a hospital's
        returned weights), "aggregate" (the SecAgg+ mean) or "global" (the weights sent)."""
        return self.updates / f"round-{server_round:04d}" / f"{name}.pt"

    def save_checkpoint(self, server_round: int, state: dict, history: list[dict]) -> str:
        """Write the round's checkpoint, carrying the sha256 of its weights; returns the file's
        sha256, which metrics.json records."""
        from fedgen.base_model import weights_hash

        path = self.checkpoint_path(server_round)
        save_torch(path, {"round": server_round, "model": state, "history": history,
                          "weights_sha256": weights_hash(state)})
        return file_sha256(path)

    def latest_checkpoint(self) -> dict | None:
        """The last checkpoint ({'round', 'model', 'history'}), verified, or None before round 1.
        It must load, its weights must match the hash it carries and be finite, and the file must
        match the hash metrics.json recorded for it (a checkpoint written just before a crash may
        have none there yet: it verifies by the hash it carries). Otherwise it is refused, naming
        the file: resuming from it would train every hospital on garbage."""
        import torch

        from fedgen.base_model import weights_hash

        found = sorted(self.checkpoints.glob(CHECKPOINT_GLOB))
        if not found:
            return None
        path = found[-1]
        try:
            metrics = self.read_metrics()
        except ValueError as err:
            raise CheckpointError(f"{self.metrics}: unreadable ({err}); it holds the checkpoints' hashes") from err
        recorded = metrics.get("checkpoints", {}).get(str(int(path.stem.split("-")[1])))
        if recorded is not None and file_sha256(path) != recorded:
            raise CheckpointError(f"{path}: its sha256 does not match the one in {self.metrics.name} "
                                  "(truncated or modified); refusing to resume from it")
        try:
            checkpoint = torch.load(path, weights_only=False)
            carried = checkpoint.get("weights_sha256")
            model = checkpoint["model"]
        except Exception as err:  # truncated, or not a checkpoint at all: say which file
            raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err}); "
                                  "refusing to resume from it") from err
        if carried is None:
            raise CheckpointError(f"{path}: carries no weights hash (written by an older fedgen): it "
                                  "cannot be verified; start a new run (name=...)")
        bad = [k for k, v in model.items() if not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"{path}: non-finite weights in {len(bad)} tensor(s), e.g. {bad[0]}; "
                                  "refusing to resume from it")
        if weights_hash(model) != carried:
            raise CheckpointError(f"{path}: its weights do not match the hash it carries (modified); "
                                  "refusing to resume from it")
        return checkpoint

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
