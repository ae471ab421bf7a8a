"""`fedgen pretrain`: the base model, trained without DP on the public archive, saved as a
diffusers DDPMPipeline and cached by the fingerprint of what defines it (`fedgen.base_model`).

<runs_dir>/pretrained/<fingerprint>/
  pipeline/        the base: what `model.init=pretrained` starts every federation from
  checkpoint.pt    model and optimizer after each epoch: an interrupted pretraining resumes
  pretrain.json    what it saw and how it trained (archive, recipe, steps, loss, seconds, sha256)
  samples.png      what it draws

The archive is public, so no privacy is spent here and none is claimed: the hospitals' guarantee
covers their fine-tuning data. `fedgen simulate` calls `ensure_base` before it plans anything.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fedgen.base_model import (
    PRETRAINED,
    base_path,
    pretrain_fingerprint,
    pretrained_home,
    weights_hash,
)
from fedgen.config import ExperimentConfig
from fedgen.data.images import save_grid
from fedgen.data.public import public_archive
from fedgen.diffusion import Diffusion, sample_images, unet_denoiser
from fedgen.model import build_scheduler, build_unet
from fedgen.run_dir import save_torch, write_json
from fedgen.seeding import resolve_device, torch_generator


def ensure_base(cfg: ExperimentConfig, runs_dir: str | Path, echo=print) -> Path | None:
    """The base this config starts from, pretrained first when it is fedgen's and not cached."""
    if cfg.model.init == PRETRAINED:
        return pretrain(cfg, runs_dir, echo)
    return base_path(cfg, runs_dir)


def pretrain(cfg: ExperimentConfig, runs_dir: str | Path, echo=print, progress: bool = True) -> Path:
    """Train (or find, or resume) fedgen's base for `cfg`; returns its pipeline folder."""
    home = pretrained_home(cfg, runs_dir)
    pipeline = home / "pipeline"
    if (pipeline / "model_index.json").exists():
        echo(f"base model: {pipeline} (pretrained, cached)")
        return pipeline
    p = cfg.pretrain
    archive = public_archive(p, cfg.data.image_size, p.seed)
    echo(f"pretraining the base model on the public archive: {len(archive)} images "
         f"({p.source}), {p.epochs} epochs, no DP (public data) -> {home}")
    device = resolve_device(cfg.training.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        unet = build_unet(cfg.model, cfg.data.image_size).to(device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=p.learning_rate)
    checkpoint, first_epoch = home / "checkpoint.pt", 0
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        unet.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        first_epoch = int(saved["epoch"])
        echo(f"  resuming after epoch {first_epoch}")
    scheduler = build_scheduler(cfg.model)
    diffusion, denoiser = Diffusion(scheduler), unet_denoiser(unet)
    images = archive.images
    started, steps_per_epoch = time.perf_counter(), -(-len(images) // p.batch_size)
    loss = float("nan")
    unet.train()
    for epoch in range(first_epoch, p.epochs):
        order = torch.randperm(len(images), generator=torch_generator(p.seed, "pretrain-order", epoch))
        draws = torch_generator(p.seed, "pretrain-draws", epoch)
        total, count = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"pretrain epoch {epoch + 1}/{p.epochs}",
                   disable=None if progress else True, leave=False)  # None: a bar on a terminal only
        for step in bar:
            x0 = images[order[step * p.batch_size : (step + 1) * p.batch_size]]
            t, eps = diffusion.draw(x0, 1, generator=draws)
            losses = diffusion.per_example_loss(denoiser, x0.to(device), t.to(device), eps.to(device))
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            optimizer.step()
            total, count = total + float(losses.detach().sum()), count + len(x0)
            bar.set_postfix(loss=f"{total / count:.4f}")
        loss = total / max(count, 1)
        save_torch(checkpoint, {"epoch": epoch + 1, "model": unet.state_dict(), "optimizer": optimizer.state_dict()})
        echo(f"  pretrain epoch {epoch + 1}/{p.epochs} | loss {loss:.4f} | {time.perf_counter() - started:.0f} s")
    unet.eval()
    _save_pipeline(unet.cpu(), scheduler, pipeline)
    noise = torch.randn(16, 1, cfg.data.image_size, cfg.data.image_size, generator=torch_generator(p.seed, "pretrain-samples"))
    steps = [torch_generator(p.seed, "pretrain-sample-steps", i) for i in range(16)]
    grid = sample_images(unet, scheduler, noise, cfg.federation.sampling_method, cfg.federation.sampling_steps, generator=steps)
    save_grid(grid, home / "samples.png", nrow=4, upscale=max(1, 64 // cfg.data.image_size))
    write_json(home / "pretrain.json", {
        "fingerprint": pretrain_fingerprint(cfg),
        "archive": {**asdict(p), "images": len(archive), "patients": len(set(archive.patient_ids.tolist()))},
        "image_size": cfg.data.image_size,
        "model": cfg.model.name,
        "steps": p.epochs * steps_per_epoch,
        "final_loss": loss,
        "seconds": time.perf_counter() - started,
        "weights_sha256": weights_hash(unet.state_dict()),
        "privacy": "none: the archive is public; the hospitals' DP covers their fine-tuning data",
    })
    checkpoint.unlink(missing_ok=True)
    echo(f"base model: {pipeline} (samples: {home / 'samples.png'})")
    return pipeline


def _save_pipeline(unet, scheduler, pipeline: Path) -> None:
    """Write to a temporary folder, then rename: a half-written base is never found as cached."""
    from diffusers import DDPMPipeline

    tmp = pipeline.with_name(pipeline.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp))
    shutil.rmtree(pipeline, ignore_errors=True)
    os.replace(tmp, pipeline)
