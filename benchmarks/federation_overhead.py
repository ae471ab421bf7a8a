"""Federation overhead: wall time of a real `fedgen simulate` run over the clients' training compute.

Runs (1) the default demo exactly as the README starts it and (2) a 10-round run of the same
config, each in a fresh run directory, and writes JSON with:
- wall_seconds: the whole command, from start to the last process stopped;
- client_train_cpu_seconds: the sum over rounds and hospitals of each local training's CPU time
  (its compute, whatever else shared the cores meanwhile);
- overhead_ratio = wall / client_train_cpu_seconds (the issue's figure; simulated hospitals train
  side by side, so it can fall below 1 when several cores are used);
- wall_over_train_seconds = wall / the sum of each local training's wall duration (inflated by
  hospitals sharing cores, so lower than the CPU-based figure);
- phases: launcher start -> first round (startup: config, silos, SuperLink, Ray, apps), the
  rounds, the gaps between them, last round -> exit (release, shutdown).

Usage: python benchmarks/federation_overhead.py [--out benchmarks/results/federation_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEDGEN = str(Path(sys.executable).parent / "fedgen")


def timed_run(runs_dir: Path, name: str, overrides: list[str]) -> dict:
    start, started_at = time.perf_counter(), time.time()
    done = subprocess.run([FEDGEN, "simulate", f"runs_dir={runs_dir}", f"name={name}", *overrides],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
    history = json.loads((runs_dir / name / "metrics.json").read_text())["history"]
    cpu = sum(m["train-cpu-seconds"] for r in history for m in r["train"].values())
    train = sum(m["train-seconds"] for r in history for m in r["train"].values())
    rounds = sum(r["seconds"] for r in history)
    return {
        "overrides": overrides,
        "rounds": len(history),
        "wall_seconds": wall,
        "client_train_cpu_seconds": cpu,
        "client_train_seconds": train,
        "overhead_ratio": wall / cpu,
        "wall_over_train_seconds": wall / train,
        "phases": {
            "startup": history[0]["started_at"] - started_at,
            "rounds": rounds,
            "between_rounds": history[-1]["ended_at"] - history[0]["started_at"] - rounds,
            "shutdown": started_at + wall - history[-1]["ended_at"],
        },
        "round_seconds": [r["seconds"] for r in history],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/federation_overhead.json")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    runs_dir = Path(tempfile.mkdtemp(prefix="fedgen-bench-"))
    try:
        results = {
            "default_demo": timed_run(runs_dir, "demo", []),
            "ten_rounds": timed_run(runs_dir, "ten", [f"federation.num_rounds={args.rounds}"]),
        }
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    for name, r in results.items():
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items())
        print(f"{name}: {r['rounds']} rounds, wall {r['wall_seconds']:.1f} s, client training "
              f"{r['client_train_cpu_seconds']:.1f} CPU s, wall/training {r['overhead_ratio']:.2f} "
              f"(wall/training wall time {r['wall_over_train_seconds']:.2f}); {phases}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
