"""Private selection on the trade-off preset: the public base reweighted by the hospitals' noisy
votes (`fedgen.privacy.private_selection`), against the base, measured as `fedgen sweep` measures
a run (Frechet distance, precision and recall against the hospitals' held-out images, in the
features of an encoder trained on their training images).

Rows: the base; selection without noise (no DP; K by the same rule with no noise); epsilon 8 and
epsilon 1 (delta 1e-5, each hospital's votes noised by its own secret randomness), each
`--repeats` times with fresh noise; and `copies` (256 of the training images themselves: what a
generator that memorises releases), which shows that the leakage check below sees a leak.

Leakage: released samples, not weights (the base's weights are public and unchanged). The attack is
distance to the closest released sample (DCR: a member should lie nearer the samples than a held-out
patient does), scored as AUC and TPR at 1% FPR on the hospitals' members vs held-out patients.

K is set by a rule of public quantities (`cluster_count`), not by looking at held-out images; run
it on a tuning federation with `--data-seed 99`.

Usage: python benchmarks/private_selection.py [--repeats 3] [--pool 2048] [--data-seed 0]
                                              [--runs-dir DIR] [--out benchmarks/results/private_selection.json]
Writes the JSON (command, commit, load average, rows) and a PNG beside it: the samples of the base,
no DP, epsilon 8 and epsilon 1 side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from fedgen.base_model import base_path, initial_unet
from fedgen.config import load_config
from fedgen.data.dataset import ImageSet
from fedgen.data.images import save_grid
from fedgen.data.silos import build_silos
from fedgen.evaluation.features import EncoderSettings, encoder_fingerprint, load_or_train_encoder
from fedgen.evaluation.fidelity import frechet_distance, precision_recall
from fedgen.evaluation.utility import NEAREST_NEIGHBOURS, generate
from fedgen.model import build_scheduler
from fedgen.privacy.private_selection import (
    PublicCells,
    cell_weights,
    cluster_count,
    noisy_votes,
    sample_selected,
    selection_epsilon,
    selection_noise_multiplier,
)
from fedgen.privacy.randomness import SecretRandomness

PRESET = ["experiment=tradeoff"]
DELTA = 1e-5
NUM_SAMPLES = 256
POOL_SEED, DRAW_SEED = 777, 1000  # public sampling seeds: the pool, then the rejection sampler's draws


def dcr_attack(released: torch.Tensor, members: torch.Tensor, heldout: torch.Tensor) -> dict:
    """Distance to the closest released sample as a membership score (nearer: member)."""
    flat = released.reshape(len(released), -1)
    scores = [-torch.cdist(x.reshape(len(x), -1), flat).min(dim=1).values for x in (members, heldout)]
    labels = np.r_[np.ones(len(members)), np.zeros(len(heldout))]
    score = torch.cat(scores).numpy()
    fpr, tpr, _ = roc_curve(labels, score)
    return {"dcr_auc": float(roc_auc_score(labels, score)), "dcr_tpr_at_1pct_fpr": float(np.interp(0.01, fpr, tpr))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool", type=int, default=2048, help="public pool size (base samples)")
    parser.add_argument("--data-seed", type=int, default=0, help="0: the benchmark's hospitals; 99: tuning")
    parser.add_argument("--runs-dir", default=None, help="where the base is pretrained (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/private_selection.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="fedgen-selection-"))
    load_before, started = os.getloadavg(), time.perf_counter()
    base_cfg = load_config([*PRESET, f"runs_dir={runs}"])  # the base: the same for every data seed
    cfg = load_config([*PRESET, f"data.seed={args.data_seed}", f"seed={args.data_seed}", f"runs_dir={runs}"])
    pipeline = base_path(base_cfg, runs)
    if pipeline is not None and not pipeline.exists():  # trained once, cached by its config's fingerprint
        subprocess.run([str(Path(sys.executable).parent / "fedgen"), "pretrain", *PRESET, f"runs_dir={runs}"],
                       check=True)
    base, scheduler = initial_unet(base_cfg, runs), build_scheduler(base_cfg.model)
    sampling, size = (cfg.federation.sampling_method, cfg.federation.sampling_steps), cfg.data.image_size

    def base_samples(n: int, seed: int) -> torch.Tensor:
        return generate(base, scheduler, n, size, sampling, 256, seed, False, torch.device("cpu"))

    silos = build_silos(cfg)
    training = ImageSet.concat([s.members for s in silos])
    heldout = ImageSet.concat([s.heldout for s in silos]).images
    encoder = load_or_train_encoder(runs / f"encoder-{encoder_fingerprint(training, EncoderSettings())}.pt", training, EncoderSettings(),
                                    torch.device("cpu"), print)
    f_held = encoder.features(heldout)
    print(f"public pool: {args.pool} base samples", flush=True)
    pool = base_samples(args.pool, POOL_SEED)
    draws: dict[int, torch.Tensor] = {}  # the rejection sampler's candidates, shared by every row

    def draw(n: int, batch: int) -> torch.Tensor:
        if batch not in draws:
            draws[batch] = base_samples(n, DRAW_SEED + batch)
        return draws[batch]

    def measure(name: str, released: torch.Tensor, extra: dict) -> dict:
        f = encoder.features(released)
        pr = precision_recall(f_held, f, NEAREST_NEIGHBOURS)
        row = {"setting": name, **extra, "frechet_distance": frechet_distance(f_held, f),
               "precision": pr.precision, "recall": pr.recall, **dcr_attack(released, training.images, heldout)}
        print(f"{name}: " + " | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in row.items() if k != "setting"), flush=True)
        return row

    rows, grids = [], {}
    grids["base"] = base_samples(NUM_SAMPLES, 0)
    rows.append(measure("base", grids["base"], {"epsilon": 0.0, "k": None}))
    votes = [len(s.members) for s in silos]
    settings = [("no_dp", float("inf")), ("eps8", 8.0), ("eps1", 1.0)]
    for name, epsilon in settings:
        sigma = 0.0 if epsilon == float("inf") else selection_noise_multiplier(epsilon, DELTA)
        k = cluster_count(sum(votes), sigma, len(silos), args.pool)
        cells = PublicCells(pool, k)
        for repeat in range(1 if sigma == 0 else args.repeats):
            counts = [cells.votes(s.members.images) for s in silos]
            released = counts if sigma == 0 else [noisy_votes(c, sigma, SecretRandomness()) for c in counts]
            weights = cell_weights(released)
            samples, drawn = sample_selected(draw, cells, weights, NUM_SAMPLES, torch.Generator().manual_seed(repeat))
            grids.setdefault(name, samples)
            spent = float("inf") if sigma == 0 else selection_epsilon(sigma, DELTA)
            rows.append(measure(f"{name}_r{repeat + 1}", samples, {
                "epsilon": spent, "sigma": sigma, "k": k, "acceptance": NUM_SAMPLES / drawn,
                "cells_weighted": int((weights > 0).sum())}))
    copies = training.images[torch.randint(len(training.images), (NUM_SAMPLES,), generator=torch.Generator().manual_seed(0))]
    rows.append(measure("copies", copies, {"epsilon": float("inf"), "k": None}))  # the attack's ceiling

    summary = {}
    for name, _ in settings[1:]:
        runs_of = [r for r in rows if r["setting"].startswith(name + "_r")]
        summary[name] = {key: {"values": [r[key] for r in runs_of], "mean": statistics.fmean(r[key] for r in runs_of),
                               "sd": statistics.stdev([r[key] for r in runs_of]) if len(runs_of) > 1 else 0.0}
                         for key in ("frechet_distance", "precision", "recall", "dcr_auc")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = torch.cat([grids[n][:32] for n in ("base", "no_dp", "eps8", "eps1")])
    save_grid(grid, out.with_suffix(".png"), nrow=32, padding=1, upscale=4)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out.write_text(json.dumps({
        "command": " ".join(["python", *sys.argv]), "commit": commit, "wall_seconds": time.perf_counter() - started,
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpus": os.cpu_count(),
        "data_seed": args.data_seed, "delta": DELTA, "pool": args.pool, "num_samples": NUM_SAMPLES,
        "votes_per_hospital": votes, "rows": rows, "summary": summary,
        "grid": f"{out.with_suffix('.png').name}: rows of 32 samples: base, no DP, epsilon 8, epsilon 1 (first repeat)",
    }, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
