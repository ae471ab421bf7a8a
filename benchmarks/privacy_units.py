"""Privacy units benchmark: the default demo (`fedgen simulate`, epsilon 8) under example-level DP,
patient-level DP and example-level plus hospital-level DP, one run each, side by side.

Per run: every hospital's epsilon in the unit it protects, the largest patient's epsilon under
example-level DP (RDP group privacy, from `privacy.json`), the hospital-level epsilon at the
coordinator, and the utility (final validation loss, and the base's). Patient- against
example-level at the same target epsilon is the utility cost of protecting patients; the
hospital-level row shows what that level costs a 3-hospital federation.

Usage: python benchmarks/privacy_units.py [--out benchmarks/results/privacy_units.json]
       [--runs-dir DIR] [extra overrides for every run...]
Writes the JSON with the command of each run, the commit and the load average.
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

FEDGEN = str(Path(sys.executable).parent / "fedgen")
SETTINGS = {
    "example": [],
    "patient": ["privacy.unit=patient"],
    "example+hospital": ["privacy.hospital_level.enabled=true"],
}


def row(run: Path) -> dict:
    card = json.loads((run / "privacy.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    hospitals = card.get("hospitals", {})
    level = card.get("hospital_level")
    history = metrics.get("history", [])
    return {
        "status": metrics.get("status"),
        "level": card.get("level"),
        "epsilon_per_hospital": {h: c["epsilon"] for h, c in hospitals.items()},
        "unit": next(iter(hospitals.values()), {}).get("unit"),
        "delta": next(iter(hospitals.values()), {}).get("delta"),
        "largest_patient_images": {h: c.get("largest_patient_images") for h, c in hospitals.items()},
        "largest_patient_epsilon": {h: c.get("largest_patient_epsilon") for h, c in hospitals.items()},
        "hospital_level_epsilon": level["epsilon"] if level else None,
        "hospital_level_delta": level["delta"] if level else None,
        "hospital_level_noise_multiplier": level["noise_multiplier"] if level else None,
        "noise_multiplier": metrics.get("summary", {}).get("noise_multiplier"),
        "val_loss": metrics.get("summary", {}).get("val_loss"),
        "val_loss_round_0": history[0].get("val_loss") if history and history[0].get("round") == 0 else None,
        "val_loss_per_round": [r.get("val_loss") for r in history],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/privacy_units.json")
    parser.add_argument("--runs-dir", default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="fedgen-units-")).resolve()
    load_before, rows, commands = os.getloadavg(), {}, {}
    started = time.perf_counter()
    for name, overrides in SETTINGS.items():
        command = [FEDGEN, "simulate", f"runs_dir={runs_dir}", f"name=units-{name.replace('+', '-')}",
                   *overrides, *args.overrides]
        print(" ".join(command), flush=True)
        began = time.perf_counter()
        done = subprocess.run(command)
        commands[name] = command
        run = runs_dir / f"units-{name.replace('+', '-')}"
        rows[name] = ({"exit_code": done.returncode, "seconds": time.perf_counter() - began}
                      | (row(run) if (run / "privacy.json").exists() else {}))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "commands": commands, "commit": commit, "wall_seconds": time.perf_counter() - started,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for name, r in rows.items():
        print(f"{name:17s} epsilon {r.get('epsilon_per_hospital')} ({r.get('unit')}), largest patient "
              f"{r.get('largest_patient_epsilon')}, hospital level {r.get('hospital_level_epsilon')}, "
              f"val loss {r.get('val_loss')} (round 0: {r.get('val_loss_round_0')})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
