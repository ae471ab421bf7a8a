"""Utility of a trained run: how good are the released model's images? (`<run>/utility.json`)

Leakage figures only mean something next to utility figures: a model that learned nothing
leaks nothing. For one run directory this module

1. loads the released pipeline and generates `num_samples` images from fixed-seed noise (the
   run's `federation.sampling_method` and `sampling_steps`, as the run's own sample grids);
2. rebuilds the run's real images from its config, checked against the hospitals' records:
   the training images (every hospital's members) and the held-out images (non-members, never
   trained on, same distribution). The held-out images are the reference the generated images
   are compared with; the training images teach the feature encoder and the downstream labeller,
   so the reference stays unseen by every instrument that measures against it;
3. trains or loads the feature encoder (`fedgen.evaluation.features`), cached by default beside the
   run directory, `<runs parent>/encoder-<fingerprint>.pt`, so every run of a sweep under one parent
   directory is measured with the same encoder (when they share their training images); the
   downstream check's labeller is cached the same way (`labeller-<fingerprint>.pt`);
4. computes the Frechet distance, precision and recall (`fedgen.evaluation.fidelity`) of the
   generated images against the held-out images, the same for as many real training images (the floor a
   perfect generator would reach with that many samples), and the downstream check
   (`fedgen.evaluation.downstream`) when the images have 0/1 labels;
5. measures the untrained model the run started from the same way (validation loss and Frechet
   distance): the other end of the scale, so a reader can tell a model that learned little (a
   DP run whose attacks find nothing proves little if it also learned nothing) from one that
   learned;
6. writes `utility.json` and `utility/...` scalars in the run's TensorBoard at the final round.

See docs/utility.md for what each number means and its caveats.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from fedgen.base_model import initial_unet, weights_hash
from fedgen.data.dataset import ImageSet
from fedgen.data.silos import Silo, build_silos, check_records
from fedgen.diffusion import generate, sample_images  # noqa: F401 (generate: re-exported)
from fedgen.evaluation.downstream import (
    downstream_check,
    has_binary_labels,
    labeller_fingerprint,
    load_or_train_labeller,
)
from fedgen.evaluation.features import EncoderSettings, encoder_fingerprint, load_or_train_encoder
from fedgen.evaluation.fidelity import frechet_distance, precision_recall
from fedgen.federation.coordinator import finite_mean
from fedgen.federation.hospital import Hospital
from fedgen.model import load_released
from fedgen.run_dir import RunDir, read_json, write_json
from fedgen.seeding import resolve_device
from fedgen.tracking import FederationLogger

NEAREST_NEIGHBOURS = 3  # k of improved precision and recall (Kynkaenniemi et al. 2019)


def _checked_silos(run: RunDir, cfg) -> list[Silo]:
    """The run's silos rebuilt from its config; refused if they disagree with the records."""
    silos = build_silos(cfg)
    for silo in silos:
        check_records(silo, run.hospital_home(silo.hospital) / "records.json")
    return silos


# The source head must read at least this share of held-out images as their own hospital's for the
# samples' style mix to mean anything (0.5 is chance with two equal hospitals).
MIX_MIN_ACCURACY = 0.75


def _final_validation(run: RunDir) -> tuple[float, int]:
    """(final validation loss, final round) from metrics.json."""
    if not run.metrics.exists():
        raise FileNotFoundError(f"{run.root}: no metrics.json; evaluate a trained run")
    metrics = run.read_metrics()
    history = metrics.get("history") or []
    # write_json stores NaN as the string "nan", which float() reads back.
    val_loss = float(metrics.get("summary", {}).get("val_loss", "nan"))
    return val_loss, int(history[-1]["round"]) if history else 0


def _untrained_validation_loss(run: RunDir, cfg, silos: list[Silo], unet: UNet2DModel) -> float:
    """The hospitals' validation loss of `unet`, by the protocol of the run's own evaluation
    (`Hospital.evaluate`, averaged as the coordinator averages each round's)."""
    state = unet.state_dict()
    return finite_mean([Hospital(cfg, s, run.hospital_home(s.hospital)).evaluate(state)["val-loss"] for s in silos])


def start_model(run: RunDir, cfg) -> UNet2DModel:
    """The model the run started from (its base, or the untrained weights), checked against the
    hash the run recorded: a base replaced since would make the comparison meaningless."""
    unet = initial_unet(cfg, run.root.parent)
    recorded = read_json(run.base).get("weights_sha256")
    if recorded and weights_hash(unet.state_dict()) != recorded:
        raise ValueError(
            f"{run.base}: the run started from weights with sha256 {recorded[:16]}..., but "
            f"model.init={cfg.model.init} now gives other weights: the base was replaced"
        )
    return unet


def start_samples(
    run: RunDir, unet: UNet2DModel, scheduler: DDPMScheduler, num_samples: int, image_size: int,
    sampling: tuple[str, int], batch_size: int, seed: int, device: torch.device,
) -> torch.Tensor:
    """The start model's samples, drawn once per (weights, sampling, seed) and kept beside the runs:
    every run of a sweep starts from the same base, and drawing them costs as much as the run's own."""
    key = json.dumps([weights_hash(unet.state_dict()), dict(scheduler.config), num_samples, image_size,
                      list(sampling), seed], sort_keys=True, default=str)
    path = run.root.parent / f"start-samples-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.exists():
        return torch.load(path)
    samples = generate(unet, scheduler, num_samples, image_size, sampling, batch_size, seed, False, device)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    torch.save(samples, partial)
    os.replace(partial, path)  # whole or absent: sweeps may evaluate side by side
    return samples


def evaluate_utility(
    run_dir: str | Path,
    encoder_path: str | Path | None = None,
    num_samples: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Utility of the run's released model; writes and returns `<run_dir>/utility.json`.

    encoder_path: the feature encoder file (trained there if missing, refused if trained on other
    images; or a pytorch-fid Inception weights file). Default: `<run_dir>/../encoder-<fp>.pt`.
    seed: picks the sampling noise and the real training images of the floor; the encoder and
    the downstream classifiers have fixed seeds (they are the measuring instruments).
    """
    if num_samples <= NEAREST_NEIGHBOURS:
        raise ValueError(f"num_samples must be > {NEAREST_NEIGHBOURS}, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    started = time.perf_counter()
    run = RunDir(run_dir)
    cfg = run.experiment_config()
    val_loss, final_round = _final_validation(run)
    device = resolve_device("auto")

    silos = _checked_silos(run, cfg)
    training = ImageSet.concat([s.members for s in silos])
    heldout = ImageSet.concat([s.heldout for s in silos])
    if len(heldout) <= NEAREST_NEIGHBOURS:
        raise ValueError(
            f"{run.root}: {len(heldout)} held-out images; the comparison needs more than {NEAREST_NEIGHBOURS}"
        )

    settings = EncoderSettings()
    if encoder_path is None:
        encoder_path = run.root.parent / f"encoder-{encoder_fingerprint(training, settings)}.pt"
    encoder = load_or_train_encoder(encoder_path, training, settings, device, log)

    unet, scheduler = load_released(run.root)
    sampling = (cfg.federation.sampling_method, cfg.federation.sampling_steps)
    phase = time.perf_counter()
    generated = generate(
        unet, scheduler, num_samples, cfg.data.image_size, sampling, batch_size, seed, progress, device
    )
    untrained = start_model(run, cfg)
    generated_untrained = start_samples(
        run, untrained, scheduler, num_samples, cfg.data.image_size, sampling, batch_size, seed, device
    )
    log(f"utility: generated {num_samples} images (and as many untrained) in {time.perf_counter() - phase:.1f} s")

    rng = np.random.default_rng([seed, 7])
    floor_index = np.sort(
        rng.choice(len(training), size=min(num_samples, len(training)), replace=False)
    )
    real_reference = training.images[torch.from_numpy(floor_index)]
    f_gen, f_held, f_real, f_untrained = (
        encoder.features(x) for x in (generated, heldout.images, real_reference, generated_untrained)
    )
    fake_pr = precision_recall(f_held, f_gen, NEAREST_NEIGHBOURS)
    real_pr = precision_recall(f_held, f_real, NEAREST_NEIGHBOURS)
    start_pr = precision_recall(f_held, f_untrained, NEAREST_NEIGHBOURS)

    style_mix = sample_style_mix(encoder, generated, heldout)

    downstream = None
    if has_binary_labels(training.labels) and has_binary_labels(heldout.labels):
        phase = time.perf_counter()
        labeller = load_or_train_labeller(
            run.root.parent / f"labeller-{labeller_fingerprint(training)}.pt", training, device=device, log=log
        )
        downstream = downstream_check(
            training.images,
            training.labels,
            heldout.images,
            heldout.labels,
            generated,
            device=device,
            labeller=labeller,
        ).to_dict()
        log(f"utility: downstream check in {time.perf_counter() - phase:.1f} s")

    result = {
        "round": final_round,
        "val_loss": val_loss,
        "frechet_distance": frechet_distance(f_held, f_gen),
        "precision": fake_pr.precision,
        "recall": fake_pr.recall,
        "frechet_distance_real": frechet_distance(f_held, f_real),
        "precision_real": real_pr.precision,
        "recall_real": real_pr.recall,
        "val_loss_untrained": _untrained_validation_loss(run, cfg, silos, untrained),
        "frechet_distance_untrained": frechet_distance(f_held, f_untrained),
        # What the run started from: "base" (model.init) or "untrained" (random weights).
        "start_model": "base" if cfg.model.init else "untrained",
        "precision_untrained": start_pr.precision,
        "recall_untrained": start_pr.recall,
        "k": NEAREST_NEIGHBOURS,
        "style_mix": style_mix,
        "downstream": downstream,
        "encoder_kind": encoder.kind,
        "encoder_path": str(Path(encoder.path).resolve()),
        "encoder_fingerprint": encoder.fingerprint,
        "feature_dim": int(f_gen.shape[1]),
        "num_samples": num_samples,
        "num_heldout": len(heldout),
        "num_training": len(training),
        "num_real_reference": len(real_reference),
        "sampling": {"method": sampling[0], "steps": sampling[1]},
        "seed": seed,
        "seconds": time.perf_counter() - started,
    }
    write_json(run.root / "utility.json", result)
    _log_scalars(run, result, final_round)
    log(
        f"utility: FD {result['frechet_distance']:.3g} (real floor {result['frechet_distance_real']:.3g}, "
        f"untrained {result['frechet_distance_untrained']:.3g}) | "
        f"precision {fake_pr.precision:.2f} | recall {fake_pr.recall:.2f}"
        + (
            f" | downstream AUC {downstream['auc']:.2f} (real {downstream['baseline_auc']:.2f})"
            if downstream
            else ""
        )
        + f" -> {run.root / 'utility.json'}"
    )
    if style_mix is not None and style_mix["gap"] is None:
        log(f"utility: the encoder does not tell the hospitals' styles apart (held-out images read as their own "
            f"hospital's: {style_mix['heldout_accuracy']:.0%}): their mix is not measured")
    elif style_mix is not None:
        log(f"utility: style mix (share of images per source) generated {_shares(style_mix['generated'])}, "
            f"held-out {_shares(style_mix['heldout'])}; off by {style_mix['gap']:.2f}")
    return result


def sample_style_mix(encoder, generated: torch.Tensor, heldout: ImageSet) -> dict | None:
    """Which hospital's style the samples take, by the encoder's source head, beside the held-out
    images' (as the head reads them, and as they are): an unconditional model can draw the right
    images in the wrong proportions, which the Frechet distance punishes where the hospitals'
    styles differ (README, issue 13).
    heldout_accuracy: the share of held-out images the head reads as their own hospital's (per
    hospital, averaged). Below
    MIX_MIN_ACCURACY the hospitals look alike to the encoder: the mix is then not measured (gap
    None), and it does not move the Frechet distance either.
    gap: total variation distance between the generated and held-out shares as the head reads them."""
    generated_shares = encoder.source_shares(generated)
    if generated_shares is None:
        return None
    heldout_shares = encoder.source_shares(heldout.images)
    sources = np.asarray([str(s) for s in heldout.sources])
    true = {name: float(np.mean(sources == name)) for name in generated_shares}
    # per hospital, the share of its held-out images read as its own; averaged (balanced accuracy)
    accuracy = float(np.mean([encoder.source_shares(heldout.images[torch.from_numpy(sources == name)])[name]
                              for name in true if true[name] > 0]))
    gap = 0.5 * sum(abs(generated_shares[n] - heldout_shares[n]) for n in generated_shares)
    return {"generated": generated_shares, "heldout": heldout_shares, "heldout_true": true,
            "heldout_accuracy": accuracy, "gap": gap if accuracy >= MIX_MIN_ACCURACY else None}


def _shares(shares: dict[str, float]) -> str:
    return " / ".join(f"{name} {value:.0%}" for name, value in shares.items())


def _log_scalars(run: RunDir, result: dict, step: int) -> None:
    scalars = {
        "utility/frechet_distance": result["frechet_distance"],
        "utility/frechet_distance_real": result["frechet_distance_real"],
        "utility/precision": result["precision"],
        "utility/recall": result["recall"],
    }
    if (result.get("style_mix") or {}).get("gap") is not None:
        scalars["utility/style_mix_gap"] = result["style_mix"]["gap"]
    if result["downstream"] is not None:
        scalars["utility/downstream_auc"] = result["downstream"]["auc"]
        scalars["utility/downstream_baseline_auc"] = result["downstream"]["baseline_auc"]
    logger = FederationLogger(run.tensorboard)
    for tag, value in scalars.items():
        if math.isfinite(value):
            logger.writer.add_scalar(tag, value, step)
    logger.close()
