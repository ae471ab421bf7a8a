"""Scale: many simulated hospitals on one machine, at the same total number of images.

Runs `fedgen simulate` with 3, 10 and 100 hospitals sharing the same synthetic patients (so the
images trained per round are the same, only their split differs), one run at a time, and writes
JSON with, for each:
- wall_seconds, and round_seconds (each round's wall time from `metrics.json`);
- peak_rss_gib: the peak of the summed resident memory of the whole process tree (launcher,
  SuperLink, Ray and its workers, the apps), sampled every 0.25 s (shared pages counted once per
  process: an upper bound);
- peak_pss_gib: the same for the proportional set size, where a page shared by n processes counts
  1/n in each (torch's libraries, mapped by every process that imports torch, count once): what
  the tree takes from the machine's memory (Linux only; None elsewhere);
- peak_processes: the most processes the tree held at once;
- pss_at_peak_gib: at the PSS peak, each kind of process's share (GiB, by command or Ray role);
- ledgers_ok: every hospital's `privacy.json` entry was recomputed to the same epsilon, within its
  budget, with as many steps as the plan (no hospital left out or double-counted:
  `fedgen.evaluation.card_check`).

Goal (issue 18): 100 hospitals complete within 3 GiB, and time per round grows with the images
trained, not with the hospitals.

Usage: python benchmarks/scale.py [--out benchmarks/results/scale.json] [--hospitals 3,10,100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from fedgen.evaluation.card_check import card_problems

FEDGEN = str(Path(sys.executable).parent / "fedgen")
# The default demo's 600 patients at 16x16, 2 rounds of 1 local epoch, DP at epsilon 8. Every
# hospital keeps at least one patient to train on at 100 hospitals (6 patients each).
ROUNDS = 2
COMMON = ["data.image_size=16", f"federation.num_rounds={ROUNDS}", "federation.local_epochs=1",
          "federation.sample_every=0", "training.batch_size=4"]  # a silo of 100 holds ~6


class TreeMemory:
    """Polls a process and its descendants: peak summed RSS and PSS, and peak process count."""

    def __init__(self, pid: int, every: float = 0.25):
        self.root, self.every = psutil.Process(pid), every
        self.peak_bytes, self.peak_processes = 0, 0
        self.peak_pss: int | None = 0 if sys.platform.startswith("linux") else None
        self.at_peak: dict[str, float] = {}  # GiB of PSS by process name, at the PSS peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total, pss, by_name = 0, 0, {}
            for proc in tree:
                with contextlib.suppress(psutil.Error):  # gone between listing and reading
                    if self.peak_pss is None:
                        total += proc.memory_info().rss
                    else:
                        full = proc.memory_full_info()
                        total, pss = total + full.rss, pss + full.pss
                        name = _process_name(proc)
                        by_name[name] = by_name.get(name, 0) + full.pss
            self.peak_bytes = max(self.peak_bytes, total)
            if self.peak_pss is not None and pss > self.peak_pss:
                self.peak_pss = pss
                self.at_peak = {n: round(b / 2**30, 3) for n, b in sorted(by_name.items(), key=lambda x: -x[1])}
            self.peak_processes = max(self.peak_processes, len(tree))
            self._stop.wait(self.every)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _process_name(proc: psutil.Process) -> str:
    """What a process of the tree is: Flower's commands by their script, Ray's by their role."""
    line = proc.cmdline()
    for word in line[:3]:
        base = Path(word).name
        if base.startswith(("flwr", "flower-", "fedgen", "raylet", "gcs_server")):
            return base
    text = " ".join(line)
    for role in ("default_worker", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray::"):
        if role in text:
            return f"ray {role}"
    return proc.name()


def one_run(runs_dir: Path, hospitals: int) -> dict:
    name = f"scale-{hospitals}"
    command = [FEDGEN, "simulate", f"runs_dir={runs_dir}", f"name={name}",
               f"federation.num_hospitals={hospitals}", *COMMON]
    print(" ".join(command), flush=True)
    log = (runs_dir / f"{name}.log").open("w")
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    with TreeMemory(proc.pid) as memory:
        code = proc.wait()
    wall = time.perf_counter() - start
    run = runs_dir / name
    history = json.loads((run / "metrics.json").read_text())["history"] if (run / "metrics.json").exists() else []
    problems = card_problems(run, hospitals, ROUNDS)
    images = [sum(m["num-examples"] for m in r["train"].values()) for r in history]
    row = {
        "hospitals": hospitals, "exit_code": code, "wall_seconds": round(wall, 1),
        "round_seconds": [round(r["seconds"], 1) for r in history], "images_per_round": images,
        "peak_rss_gib": round(memory.peak_bytes / 2**30, 2),
        "peak_pss_gib": None if memory.peak_pss is None else round(memory.peak_pss / 2**30, 2),
        "peak_processes": memory.peak_processes,
        "pss_at_peak_gib": memory.at_peak,
        "ledgers_ok": not problems, "ledger_problems": problems[:5],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    parser.add_argument("--hospitals", default="3,10,100")
    parser.add_argument("--runs-dir", default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="fedgen-scale-")).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    # The public base first (cached): its training is not what the runs measure.
    subprocess.run([FEDGEN, "pretrain", f"runs_dir={runs_dir}", *COMMON], check=True, capture_output=True)
    load_before = os.getloadavg()
    rows = [one_run(runs_dir, int(n)) for n in args.hospitals.split(",")]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
        "commit": commit, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "overrides": COMMON, "rows": rows,
        "goals": {
            "100_hospitals_complete": any(r["hospitals"] == 100 and r["exit_code"] == 0 for r in rows),
            "peak_rss_at_most_3_gib": all(r["peak_rss_gib"] <= 3.0 for r in rows),
            "peak_pss_at_most_3_gib": all((r["peak_pss_gib"] or 99) <= 3.0 for r in rows),
            "every_ledger_right": all(r["ledgers_ok"] for r in rows),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["goals"]), "->", out)


if __name__ == "__main__":
    main()
