"""A private selection run (`fedgen select`): its utility against the base, and its report.md.

Utility is measured as `fedgen sweep` measures a trained run: Frechet distance, precision and recall
of samples against the hospitals' held-out images, in the features of an encoder trained on their
training images. Here the base's samples and the selection's are drawn from the same public draws,
so the difference is the hospitals' votes alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedgen.base_model import load_base, weights_hash
from fedgen.data.dataset import DataError, ImageSet
from fedgen.evaluation.features import EncoderSettings, encoder_fingerprint, load_or_train_encoder
from fedgen.evaluation.fidelity import frechet_distance, precision_recall
from fedgen.evaluation.utility import NEAREST_NEIGHBOURS, _checked_silos
from fedgen.federation.selection import SelectionRelease, base_sampler
from fedgen.model import build_scheduler
from fedgen.run_dir import RunDir, read_json
from fedgen.tracking import FederationLogger

EVALUATION_FILE = "selection_eval.json"


@dataclass
class SelectionSamples:
    base: torch.Tensor
    selected: torch.Tensor
    drawn: int  # base samples drawn to keep `selected`
    members: ImageSet  # the hospitals' training images
    heldout: ImageSet  # their held-out patients' images (never voted)


def draw_selection(run_dir: str | Path, num_samples: int, log: Callable[[str], None] = print) -> SelectionSamples:
    """The base's and the selection's samples (seed: the run's, plus 1: not the grid's), and the images to score them on."""
    run = RunDir(run_dir)
    if not run.selection.exists():
        raise DataError(f"{run.selection}: no selection release; has `fedgen select` finished?")
    cfg = run.experiment_config()
    release = SelectionRelease.load(run.selection)
    base = load_base(release.base, cfg)
    if weights_hash(base.state_dict()) != release.base_sha256:
        raise DataError(f"{release.base}: not the base this selection weighted (its sha256 changed)")
    draw = base_sampler(cfg, base, build_scheduler(cfg.model))
    seed = cfg.seed + 1
    log(f"selection evaluation: drawing {num_samples} selected samples and {num_samples} of the base's")
    selected, drawn = release.sample(draw, num_samples, seed, log)
    silos = _checked_silos(run, cfg)
    members, heldout = ImageSet.concat([s.members for s in silos]), ImageSet.concat([s.heldout for s in silos])
    return SelectionSamples(draw(num_samples, release.first_draw_seed(seed)), selected, drawn, members, heldout)


def selection_utility(run_dir: str | Path, samples: SelectionSamples, log: Callable[[str], None] = print) -> dict:
    """FD, precision and recall of the base and of the selection against the held-out images."""
    training, settings = samples.members, EncoderSettings()
    encoder = load_or_train_encoder(RunDir(run_dir).root.parent / f"encoder-{encoder_fingerprint(training, settings)}.pt",
                                    training, settings, torch.device("cpu"), log)
    held = encoder.features(samples.heldout.images)
    result = {}
    for name, images in (("base", samples.base), ("selection", samples.selected)):
        f = encoder.features(images)
        pr = precision_recall(held, f, NEAREST_NEIGHBOURS)
        result[name] = {"frechet_distance": frechet_distance(held, f), "precision": pr.precision, "recall": pr.recall}
    result["acceptance"] = len(samples.selected) / samples.drawn
    return result


def log_selection(run_dir: str | Path, result: dict) -> None:
    """The selection's figures in TensorBoard, under the tags a trained run uses (step 1: its one
    release), so `tensorboard --logdir runs` sets it beside the DP-SGD runs."""
    run = RunDir(run_dir)
    summary = read_json(run.root / "selection.json")
    scalars = {"privacy/epsilon_max": float(summary["epsilon_per_hospital"]),
               "privacy/noise_multiplier": float(summary["noise_multiplier"]),
               "utility/frechet_distance": result["selection"]["frechet_distance"],
               "utility/frechet_distance_base": result["base"]["frechet_distance"],
               "utility/precision": result["selection"]["precision"], "utility/recall": result["selection"]["recall"],
               "attack/dcr/auc": result["attack"]["selection"]["dcr_auc"]}
    logger = FederationLogger(run.tensorboard)
    for tag, value in scalars.items():
        if math.isfinite(value):
            logger.writer.add_scalar(tag, value, 1)
    logger.close()


def write_selection_report(run_dir: str | Path) -> Path:
    run = RunDir(run_dir)
    cfg = run.experiment_config()
    summary = read_json(run.root / "selection.json")
    measured = read_json(run.root / EVALUATION_FILE)
    sigma, epsilon = float(summary["noise_multiplier"]), float(summary["epsilon_per_hospital"])
    dp = sigma > 0 and math.isfinite(epsilon)
    unit = "patient" if cfg.privacy.unit == "patient" else "image"
    group = "" if unit == "patient" else "; a patient with k images is protected as a group of k"
    lines = [
        f"# Privacy report: {cfg.name} (private selection)",
        "",
        f"The public base model was not trained. {len(summary['hospitals_voted'])} hospitals each sent one vector "
        f"of {summary['cells']} counts: how many of its training images fall in each cell of a public pool of "
        f"{cfg.selection.pool_size} base samples (seed {cfg.selection.pool_seed}). The coordinator summed them into "
        "weights; the released model is the base, keeping a sample with its cell's weight.",
        "",
        "## The guarantee",
        "",
        (f"Each hospital added Gaussian noise (sigma {sigma:.3f} per count, from its own secret randomness) before its "
         f"counts left it: ({epsilon:.3g}, {cfg.privacy.delta:g})-differential privacy per {unit} for its training "
         f"images (one release of sensitivity 1, Opacus's RDP){group}. It is on each site's lifetime ledger "
         "(`fedgen budget`). The base and the pool are public and not covered."
         if dp else "**No guarantee**: privacy was off, the counts were sent without noise."),
        "",
        f"Base: `{summary['base']}` (sha256 {summary['base_sha256'][:16]}...).",
        "",
        "## Utility and leakage, on images the hospitals never voted with",
        "",
    ]
    if measured:
        lines += [
            "| samples | Frechet distance | precision | recall | DCR attack AUC | TPR at 1% FPR |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("base", "selection"):
            row, attack = measured[name], measured.get("attack", {}).get(name, {})
            lines.append(f"| {name} | {row['frechet_distance']:.3f} | {row['precision']:.2f} | {row['recall']:.2f} | "
                         f"{attack.get('dcr_auc', float('nan')):.3f} | {attack.get('dcr_tpr_at_1pct_fpr', float('nan')):.3f} |")
        better = measured["selection"]["frechet_distance"] < measured["base"]["frechet_distance"]
        lines += ["", ("The selection's samples are closer to the hospitals' held-out images than the base's: "
                       "the votes moved the base towards them." if better else
                       "**The selection's samples are no closer to the hospitals' held-out images than the base's**: "
                       "the votes did not help, and an attack AUC near 0.5 here says nothing about safety."),
                  "", f"{measured['acceptance']:.0%} of the base's samples are kept. DCR: each candidate scored by "
                  "its distance to the nearest of the selection's samples (members vs held-out patients)."]
    else:
        lines.append("Not measured.")
    lines += ["", "## Samples", "", "The base's (`selection_base.png`) and the selection's (`selection.png`), "
              "from the same public draws.", "", "![selection](selection.png)", ""]
    path = run.root / "report.md"
    path.write_text("\n".join(lines))
    return path
