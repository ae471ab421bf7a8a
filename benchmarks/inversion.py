"""The curious coordinator: what DP and secure aggregation each take from gradient inversion (issue 17).

Four federations of `experiment=invert_easy` (each hospital: one plain SGD step on its one
training image per round; the coordinator records what it receives), and `fedgen invert` on round 1
(and, for `none`, which trains 3 rounds for the timing, rounds 2 and 3 too):

- none:     3 hospitals, no defence: every hospital's update attacked (hospitals 0, 1, 2; 9 updates);
- dp_eps8:  the same with DP-SGD at epsilon 8 (`privacy=eps8`): every hospital's update attacked;
- secagg3:  3 hospitals with SecAgg+: the coordinator holds only the mean, attacked with 3 candidates;
- secagg10: 10 hospitals with SecAgg+: the mean of 10, attacked with 10 candidates (one start, not
            --restarts: each costs 10 single-image inversions, and no start of secagg3 came near).

Rows: re-identification rate (a reconstruction's most similar image, by SSIM, among the attacked
hospitals' 10 images each, is one they trained on), mean best-match SSIM and PSNR, and chance.
The (timestep, noise) draws and the DP noise are secret, as in any run: each run draws its own, so
the rates vary from one invocation to the next (a handful of updates per row). Also: wall time
per round with and without secure aggregation for 3 hospitals (rounds 2 and 3 of `none` and
`secagg3`, which train 3 rounds; goal <= 1.5x).

Usage: python benchmarks/inversion.py [--out benchmarks/results/inversion.json] [--runs-dir DIR]
                                      [--iterations 300] [--restarts 4]
Writes the JSON (command, commit, load average, machine, rows) and `inversion.png` beside it:
each row's reconstructions beside their best-matching images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from attacks.inversion import InversionSettings
from fedgen.data.images import save_grid
from fedgen.running.invert import invert_run

FEDGEN = str(Path(sys.executable).parent / "fedgen")
ROUNDS_TIMED = 3  # `none` and `secagg3` train this many rounds; rounds 2.. are timed (1 warms up)
# Rounds attacked (default: round 1) and starts (default: --restarts) where a row differs.
ROUNDS = {"none": [1, 2, 3]}
RESTARTS = {"secagg10": 1}
SETTINGS: dict[str, tuple[list[str], list[int | None]]] = {
    "none": (["federation.num_rounds=3"], [0, 1, 2]),
    "dp_eps8": (["privacy=eps8"], [0, 1, 2]),
    "secagg3": (["federation.secure_aggregation=true", "federation.num_rounds=3"], [None]),
    "secagg10": (["federation.secure_aggregation=true", "federation.num_hospitals=10", "data.num_patients=100"], [None]),
}


def simulate(runs_dir: Path, name: str, overrides: list[str]) -> Path:
    command = [FEDGEN, "simulate", "experiment=invert_easy", f"runs_dir={runs_dir}", f"name={name}", *overrides]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"{name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return runs_dir / name


def round_seconds(run: Path) -> list[float]:
    history = json.loads((run / "metrics.json").read_text())["history"]
    return [float(r["seconds"]) for r in history[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/inversion.json")
    parser.add_argument("--runs-dir", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--iterations", type=int, default=InversionSettings().iterations)
    parser.add_argument("--restarts", type=int, default=4,
                        help="starts per update (the attack stops at the first that reproduces the update)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the inversions (1: a second thread on a shared 2-core machine made them slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    settings = dataclasses.replace(InversionSettings(), iterations=args.iterations, restarts=args.restarts)
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(args.runs_dir or tmp).resolve()
        rows, pictures, timing = {}, [], {}
        for name, (overrides, targets) in SETTINGS.items():
            run = simulate(runs_dir, name, overrides)
            row_settings = dataclasses.replace(settings, restarts=RESTARTS.get(name, settings.restarts))
            reports = [invert_run(run, server_round, hospital, row_settings, progress=False)
                       for server_round in ROUNDS.get(name, [1]) for hospital in targets]
            hits = [bool(h) for r in reports for h in r["score"]["reidentified"]]
            rows[name] = {
                "overrides": overrides,
                "attacked": [f"round {r['round']}, {r['target']}" for r in reports],
                "restarts": row_settings.restarts,
                "reidentified_per_update": [sum(r["score"]["reidentified"]) for r in reports],
                "final_losses": [r["final_loss"] for r in reports],
                "reconstructions": len(hits),
                "reidentified": sum(hits),
                "reidentification_rate": sum(hits) / len(hits),
                "mean_best_ssim": statistics.fmean(s for r in reports for s in r["score"]["best_ssim"]),
                "mean_best_psnr": statistics.fmean(s for r in reports for s in r["score"]["best_psnr"]),
                "chance": statistics.fmean(r["chance"] for r in reports),
                "noise_multiplier": max(max(r["noise_multipliers"]) for r in reports),
                "inversion_seconds": sum(r["seconds"] for r in reports),
            }
            print(f"{name}: re-identified {sum(hits)}/{len(hits)}, mean best SSIM "
                  f"{rows[name]['mean_best_ssim']:.3f} (chance {rows[name]['chance']:.2f})", flush=True)
            pictures.append(torch.cat([pairs_of(run, r) for r in reports]))
            if name in ("none", "secagg3"):
                timing[name] = round_seconds(run)
    plain, secure = statistics.median(timing["none"]), statistics.median(timing["secagg3"])
    report = {
        "command": " ".join(sys.argv),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "dirty": bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()),
        "wall_seconds": time.perf_counter() - started,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": args.threads},
        "preset": "experiment=invert_easy (16x16 tiny UNet, random init, 1 SGD step on 1 image per hospital and round)",
        "settings": dataclasses.asdict(settings),
        "rows": rows,
        "round_seconds": {
            "plain_3_hospitals": timing["none"], "secure_3_hospitals": timing["secagg3"],
            "median_plain": plain, "median_secure": secure, "ratio": secure / plain, "goal_ratio": 1.5,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    picture = out.with_suffix(".png")
    width = max(len(p) for p in pictures)
    padded = [torch.cat([p, -torch.ones(width - len(p), *p.shape[1:])]) for p in pictures]
    save_grid(torch.cat(padded), picture, nrow=width, upscale=4)
    for name, row in rows.items():
        print(f"{name:9s} re-identified {row['reidentified']}/{row['reconstructions']} "
              f"({row['reidentification_rate']:.2f}, chance {row['chance']:.2f}), mean best SSIM "
              f"{row['mean_best_ssim']:.3f}, PSNR {row['mean_best_psnr']:.1f} dB")
    print(f"round seconds, 3 hospitals: plain {plain:.1f}, secure {secure:.1f} ({secure / plain:.2f}x)")
    print(f"wrote {out} and {picture} (a row per setting: reconstruction, best match, ...)")


def pairs_of(run: Path, report: dict) -> torch.Tensor:
    """The reconstructions beside their best matches, as `fedgen invert` kept them: [2B,1,H,W]."""
    folder = (f"round-{report['round']}-aggregate" if report["hospital"] is None
              else f"round-{report['round']}-hospital-{report['hospital']}")
    kept = torch.load(run / "invert" / folder / "reconstructions.pt")
    return torch.stack([image for pair in zip(kept["reconstructions"], kept["matches"]) for image in pair])


if __name__ == "__main__":
    main()
