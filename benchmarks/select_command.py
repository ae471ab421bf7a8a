"""`fedgen select` end to end: the real Flower round, the release and its evaluation, as a user runs it.

Runs `fedgen select experiment=tradeoff` `--repeats` times at epsilon 8 (fresh secret noise each
time), once at epsilon 1 and once without noise, each into its own run under one runs dir (the base
pretrained once), and collects each run's `selection_eval.json` (FD, precision, recall of the base's
and the selection's samples against the held-out images; the DCR attack) and its wall time.

Usage: python benchmarks/select_command.py [--repeats 3] [--runs-dir DIR] [--out benchmarks/results/select_command.json]
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

FEDGEN = str(Path(sys.executable).parent / "fedgen")


def run(runs: Path, name: str, extra: list[str]) -> dict:
    print(f"{name}: fedgen select experiment=tradeoff {' '.join(extra)}", flush=True)
    started = time.perf_counter()
    out = subprocess.run([FEDGEN, "select", "experiment=tradeoff", f"runs_dir={runs}", f"name={name}", *extra],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    folder = runs / name
    measured = json.loads((folder / "selection_eval.json").read_text())
    summary = json.loads((folder / "selection.json").read_text())
    row = {"setting": name, "seconds": time.perf_counter() - started, "epsilon": summary["epsilon_per_hospital"],
           "cells": summary["cells"], "acceptance": measured["acceptance"]}
    for which in ("base", "selection"):
        row.update({f"{which}_{k}": v for k, v in measured[which].items()})
        row[f"{which}_dcr_auc"] = measured["attack"][which]["dcr_auc"]
    print("  " + " | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                            if k != "setting"), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs-dir", default=None, help="default: a temp dir (the base is pretrained there first)")
    parser.add_argument("--out", default="benchmarks/results/select_command.json")
    args = parser.parse_args()
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="fedgen-select-"))
    load_before, started = os.getloadavg(), time.perf_counter()
    rows = [run(runs, f"eps8-r{i + 1}", []) for i in range(args.repeats)]
    rows += [run(runs, "eps1", ["privacy=eps1"]), run(runs, "no-noise", ["privacy=none"])]
    eps8 = [r["selection_frechet_distance"] for r in rows if r["setting"].startswith("eps8")]
    summary = {"eps8_fd_mean": statistics.mean(eps8), "eps8_fd_sd": statistics.stdev(eps8) if len(eps8) > 1 else 0.0,
               "base_fd": rows[0]["base_frechet_distance"],
               "first_run_seconds": rows[0]["seconds"], "later_run_seconds_median": statistics.median(r["seconds"] for r in rows[1:])}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python", *sys.argv]), "commit": commit, "wall_seconds": time.perf_counter() - started,
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpus": os.cpu_count(),
        "note": "the first run pretrains the base; each run draws the public pool (2048 samples) again",
        "rows": rows, "summary": summary,
    }, indent=1))
    print(f"wrote {out}: epsilon 8 FD {summary['eps8_fd_mean']:.3f} +- {summary['eps8_fd_sd']:.3f} (base {summary['base_fd']:.3f})")


if __name__ == "__main__":
    main()
