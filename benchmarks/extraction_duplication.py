"""Extraction against duplication: does the copy count rise as training images are duplicated?

Trains `experiment=leak` (no DP, memorises) with 10% of each hospital's images duplicated 0, 3, 10
and 30 extra times, each trained on about as many images in all (the local epochs shrink as the
silos grow, so only the duplication changes), then draws samples from each released model and counts
those nearer a training image than all but 1% of the non-members are (`attacks/extraction.py`),
split by whether that image was duplicated. The non-members are the silos' held-out patients and
`--fresh-nonmembers` new ones, so that 1% quantile is read off about a thousand images.

Usage: python benchmarks/extraction_duplication.py [--times 0,3,10,30] [--samples 512] [--runs-dir DIR]
                                                  [--fresh-nonmembers 1000]
Writes benchmarks/results/extraction_duplication.json (command, commit, load average, one row per
duplication level).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from attack_leak import FEDGEN, run  # benchmarks/ is on the path when this file runs

MEMBERS, FRACTION, EPOCHS = 36, 0.1, 100  # experiment=leak: 36 training images a hospital, 100 epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", default="0,3,10,30", help="extra copies of the duplicated images")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/extraction_duplication.json")
    parser.add_argument("--runs-dir", default=None)
    parser.add_argument("--fresh-nonmembers", type=int, default=1000, help="new patients added to the non-members")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="fedgen-dup-"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result: dict = {"command": " ".join([sys.executable, *sys.argv]), "commit": commit,
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "load_average_before": os.getloadavg(), "runs_dir": str(runs_dir), "rows": []}
    started = time.perf_counter()
    for times in (int(t) for t in args.times.split(",")):
        silo = MEMBERS + round(FRACTION * MEMBERS) * times
        epochs = max(1, round(EPOCHS * MEMBERS / silo))  # as many images trained at every level
        name = f"dup{times}"
        train_s = run([FEDGEN, "simulate", "experiment=leak", f"name={name}", f"runs_dir={runs_dir}",
                       f"federation.duplicate_times={times}", f"federation.local_epochs={epochs}"])
        attack_s = run([FEDGEN, "attack", str(runs_dir / name), "--attacks", "sima", "--samples", str(args.samples),
                        "--fresh-nonmembers", str(args.fresh_nonmembers)])
        report = json.loads((runs_dir / name / "attack.json").read_text())
        ex = report["extraction"]
        row = {"extra_copies": times, "local_epochs": epochs, "sima_auc": report["attacks"]["sima"]["auc"],
               "samples": ex["num_samples"], "flagged_ratio_or_normalised": ex["num_flagged"],
               "nearer_than_heldout": ex["num_nearer_than_heldout"], "expected_by_chance": ex["expected_by_chance"],
               "p_value": ex["p_value"], **{k: v for k, v in ex["by_duplication"].items() if k != "nearer_than_heldout"},
               "train_seconds": train_s, "attack_seconds": attack_s}
        result["rows"].append(row)
        print(f"{times:2d} extra copies ({epochs} epochs): {row['nearer_than_heldout']} of {row['samples']} samples "
              f"nearer than held-out ({row['expected_by_chance']:.1f} by chance, p {row['p_value']:.2g}); "
              f"{row['nearer_than_heldout_duplicated']} at the {row['duplicated_images']} duplicated images "
              f"({row['distinct_duplicated_images_copied']} distinct); sima AUC {row['sima_auc']:.3f} | "
              f"train {train_s:.0f} s, attack {attack_s:.0f} s", flush=True)
    result["total_seconds"] = time.perf_counter() - started
    result["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"total {result['total_seconds'] / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
