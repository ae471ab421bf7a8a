"""TensorBoard logging for a federation: server round as the step, tags namespaced by concern.

train/     loss per hospital and mean            privacy/  cumulative epsilon per hospital, max, sigma
fl/        round time, clients sampled, failed   utility/  validation loss per hospital and mean
samples    a grid from fixed noise every few rounds; HParams once at the end of the run.

Two guarantees, never mixed: `privacy/epsilon*` and `privacy/noise_multiplier` are the hospitals'
own DP-SGD (example or patient level, at each hospital); `privacy/hospital_level/*` is the
coordinator's hospital-level DP (`privacy.hospital_level`), as is `hparam/hospital_level_epsilon`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from fedgen.config import ExperimentConfig
from fedgen.data.images import display_upscale, grid_array
from fedgen.privacy.randomness import dp_noise_label


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


class FederationLogger:
    def __init__(self, logdir: str | Path):
        self.writer = SummaryWriter(log_dir=str(logdir))

    def log_round(self, record: dict) -> None:
        """`record`: one entry of metrics.json's history (see server/app.py for its fields)."""
        step = record["round"]
        w = self.writer
        train = record["train"]
        for h, m in train.items():
            w.add_scalar(f"train/loss/hospital_{h}", m["train-loss"], step)
            if math.isfinite(m["epsilon"]):
                w.add_scalar(f"privacy/epsilon/hospital_{h}", m["epsilon"], step)
        if train:
            w.add_scalar("train/loss_mean", _mean([m["train-loss"] for m in train.values()]), step)
            eps = [m["epsilon"] for m in train.values() if math.isfinite(m["epsilon"])]
            if eps:
                w.add_scalar("privacy/epsilon_max", max(eps), step)
            w.add_scalar("privacy/noise_multiplier", max(m["noise-multiplier"] for m in train.values()), step)
        for h, m in record["evaluate"].items():
            w.add_scalar(f"utility/val_loss/hospital_{h}", m["val-loss"], step)
        if record["evaluate"]:
            w.add_scalar("utility/val_loss", record["val_loss"], step)
        if "hospital_level" in record:  # the coordinator's guarantee for each hospital as a whole
            level = record["hospital_level"]
            w.add_scalar("privacy/hospital_level/epsilon", level["epsilon"], step)
            w.add_scalar("privacy/hospital_level/noise_std", level["noise_std"], step)
            w.add_scalar("fl/hospital_level/updates_summed", level["summed"], step)
            w.add_scalar("fl/hospital_level/updates_clipped", level["clipped"], step)
        w.add_scalar("fl/round_seconds", record["seconds"], step)
        w.add_scalar("fl/clients_sampled", record["sampled"], step)
        w.add_scalar("fl/clients_failed", len(record["failures"]), step)
        w.add_scalar("fl/updates_rejected", len(record.get("rejected", [])), step)
        w.flush()

    def log_samples(self, images: torch.Tensor, step: int, tag: str = "samples/fixed_noise") -> None:
        """images [N,1,H,W] in [-1,1], shown as one grid."""
        grid = grid_array(
            images, nrow=int(math.ceil(math.sqrt(len(images)))), upscale=display_upscale(images.shape[-1])
        )
        self.writer.add_image(tag, grid, step, dataformats="HWC")
        self.writer.flush()

    def log_hparams(self, cfg: ExperimentConfig, final: dict) -> None:
        """One HParams entry per run, written beside the scalars so runs line up in the dashboard."""
        p, f = cfg.privacy, cfg.federation
        hparams = {
            "privacy": "dp" if p.enabled else "none",
            "target_epsilon": float(p.target_epsilon) if p.enabled else 0.0,
            "delta": float(p.delta) if p.enabled else 0.0,
            "dp_noise": dp_noise_label(final, p.reproducible_noise) if p.enabled else "none",
            "noise_multiplier": float(final.get("noise_multiplier", 0.0)),
            "noise_multiplicity": cfg.training.noise_multiplicity,
            "max_grad_norm": float(p.max_grad_norm),
            "rounds": f.num_rounds,
            "hospitals": f.num_hospitals,
            "local_epochs": f.local_epochs,
            "batch_size": cfg.training.batch_size,
            "strategy": f.strategy,
            "model": cfg.model.name,
            "hospital_level": "dp" if p.hospital_level.enabled else "none",
            "hospital_level_target_epsilon": float(p.hospital_level.target_epsilon) if p.hospital_level.enabled else 0.0,
            "hospital_level_sample_rate": float(p.hospital_level.sample_rate) if p.hospital_level.enabled else 0.0,
        }
        metrics = {f"hparam/{k}": float(v) for k, v in final.items() if isinstance(v, int | float) and math.isfinite(v)}
        self.writer.add_hparams(hparams, metrics, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
