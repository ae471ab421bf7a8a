"""Tuning federations for the trade-off preset: how far each `data.seed`'s hospitals are from the
public base (Frechet distance of the base's samples to their held-out images, in the features of
an encoder trained on their training images, as `fedgen sweep` measures it).

A DP recipe should be chosen on federations whose base is as near their hospitals as the
benchmark's (seed 0: FD 0.373): on one far from its base (seed 99: 1.74) any move towards the
hospitals' tone wins, and twice such a pick lost on the benchmark (README). And on federations
whose hospitals look as alike as the benchmark's: where they differ, the FD follows the samples'
mix of hospital styles, which the DP noise moves at random (README). `heldout_accuracy` is the
encoder's source head's balanced accuracy on the held-out images (0.5: alike; the benchmark's
seed 0 is 0.57), `base_mix_gap` the base samples' mix gap where it is measured. No held-out image
of the benchmark's hospitals is used to choose; seed 0 is listed only as the reference.

Usage: python benchmarks/tuning_federations.py [--seeds 0-30] [--runs-dir DIR]
Writes benchmarks/results/tuning_federations.json (command, commit, load average, one row a seed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedgen.base_model import base_path, initial_unet
from fedgen.config import load_config
from fedgen.data.dataset import ImageSet
from fedgen.data.silos import build_silos
from fedgen.evaluation.features import EncoderSettings, load_or_train_encoder
from fedgen.evaluation.fidelity import frechet_distance, precision_recall
from fedgen.evaluation.utility import NEAREST_NEIGHBOURS, generate, sample_style_mix
from fedgen.model import build_scheduler

PRESET = ["experiment=tradeoff"]


def seed_range(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-30", help="data seeds, LOW-HIGH (default 0-30)")
    parser.add_argument("--runs-dir", default=None, help="where the base is pretrained (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/tuning_federations.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="fedgen-tuning-"))
    load_before, started = os.getloadavg(), time.perf_counter()
    base_cfg = load_config([*PRESET, f"runs_dir={runs}"])
    pipeline = base_path(base_cfg, runs)
    if pipeline is not None and not pipeline.exists():  # trained once, cached by its config's fingerprint
        subprocess.run([str(Path(sys.executable).parent / "fedgen"), "pretrain", *PRESET, f"runs_dir={runs}"], check=True)
    base = initial_unet(base_cfg, runs)
    sampling = (base_cfg.federation.sampling_method, base_cfg.federation.sampling_steps)
    samples = generate(base, build_scheduler(base_cfg.model), 256, base_cfg.data.image_size, sampling, 64, 0,
                       False, torch.device("cpu"))
    rows = []
    for seed in seed_range(args.seeds):
        cfg = load_config([*PRESET, f"data.seed={seed}", f"seed={seed}", f"runs_dir={runs}"])
        silos = build_silos(cfg)
        training = ImageSet.concat([s.members for s in silos])
        heldout_set = ImageSet.concat([s.heldout for s in silos])
        heldout = heldout_set.images
        encoder = load_or_train_encoder(runs / f"encoder-seed{seed}.pt", training, EncoderSettings(),
                                        torch.device("cpu"), lambda _: None)
        f_base, f_held, f_train = (encoder.features(x) for x in (samples, heldout, training.images))
        row = {"data_seed": seed, "base_fd": frechet_distance(f_held, f_base),
               "base_precision": precision_recall(f_held, f_base, NEAREST_NEIGHBOURS).precision,
               "training_vs_heldout_fd": frechet_distance(f_held, f_train)}
        mix = sample_style_mix(encoder, samples, heldout_set)
        row |= {"heldout_accuracy": mix["heldout_accuracy"], "base_mix_gap": mix["gap"]}
        rows.append(row)
        print(f"data.seed={seed}: base FD {row['base_fd']:.3f} | precision {row['base_precision']:.2f} | "
              f"training vs held-out FD {row['training_vs_heldout_fd']:.3f} | hospitals told apart "
              f"{row['heldout_accuracy']:.2f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(sys.argv), "commit": commit, "wall_seconds": time.perf_counter() - started,
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpus": os.cpu_count(),
        "benchmark_seed": 0, "rows": sorted(rows, key=lambda r: r["base_fd"]),
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
