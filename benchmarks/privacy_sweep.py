"""Privacy sweep benchmark: `fedgen sweep` over no DP and two epsilons on the synthetic X-ray
generator, timed, with the table the issue asks for (utility and leakage per epsilon) written as JSON.

The runs use `experiment=leak_data`: the synthetic data at the leak preset's size (2 hospitals x 36
trained images, 16 px, 600 epochs), where the non-DP model memorises. On the default demo's silos
(260 images per hospital, 32 px) the non-DP model does not measurably memorise within a CPU budget,
so leakage could not fall there (see the README's benchmark notes).

Usage: python benchmarks/privacy_sweep.py [--out benchmarks/results/privacy_sweep.json]
       [--runs-dir DIR] [--privacy none,eps10,eps1] [extra overrides...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEDGEN = str(Path(sys.executable).parent / "fedgen")
COLUMNS = ("setting", "epsilon", "noise_multiplier", "val_loss", "frechet_distance", "frechet_distance_real",
           "precision", "recall", "downstream_auc", "downstream_baseline_auc", "best_attack", "attack_auc",
           "tpr_at_1pct_fpr", "epsilon_lb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/privacy_sweep.json")
    parser.add_argument("--runs-dir", default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--privacy", default="none,eps10,eps1")
    parser.add_argument("overrides", nargs="*", default=["experiment=leak_data"])
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="fedgen-sweep-"))
    command = [FEDGEN, "sweep", f"sweep.privacy=[{args.privacy}]", "sweep.name=bench",
               f"runs_dir={runs_dir}", *args.overrides]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command)
    wall = time.perf_counter() - started
    sweep = json.loads((runs_dir / "bench" / "sweep.json").read_text())
    rows = [{k: r.get(k) for k in COLUMNS} | {"seconds": r.get("seconds")} for r in sweep["rows"]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "exit_code": done.returncode, "wall_seconds": wall,
              "sweep_dir": str(runs_dir / "bench"), "rows": rows}
    out.write_text(json.dumps(result, indent=1))
    for r in rows:
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k != "seconds"))
    print(f"sweep wall time {wall / 60:.1f} min; report {runs_dir / 'bench' / 'report.md'}; wrote {out}")


if __name__ == "__main__":
    main()
