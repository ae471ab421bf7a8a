"""Federation overhead: wall time of a real `fedgen simulate` run over the clients' training compute.

Runs (1) the default demo exactly as the README starts it and (2) a 10-round run of the same
config, each in a fresh run directory, and writes JSON with:
- wall_seconds: the whole command, from start to the last process stopped;
- client_train_seconds: the sum over rounds and hospitals of each local training's duration;
- overhead_ratio = wall / client_train_seconds (the issue's figure; simulated hospitals train in
  parallel, so this can fall below 1 when several cores are used);
- critical_path_ratio = wall / sum over rounds of the slowest hospital's training (stricter: what
  the federation adds on top of the training that had to happen one after the other).

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
    start = time.perf_counter()
    done = subprocess.run([FEDGEN, "simulate", f"runs_dir={runs_dir}", f"name={name}", *overrides],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
    history = json.loads((runs_dir / name / "metrics.json").read_text())["history"]
    train = [[m["train-seconds"] for m in r["train"].values()] for r in history]
    total = sum(sum(r) for r in train)
    critical = sum(max(r) for r in train if r)
    return {
        "overrides": overrides,
        "rounds": len(history),
        "wall_seconds": wall,
        "client_train_seconds": total,
        "critical_path_train_seconds": critical,
        "overhead_ratio": wall / total,
        "critical_path_ratio": wall / critical,
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
        print(f"{name}: {r['rounds']} rounds, wall {r['wall_seconds']:.1f} s, client training "
              f"{r['client_train_seconds']:.1f} s, wall/training {r['overhead_ratio']:.2f}, "
              f"wall/critical path {r['critical_path_ratio']:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
