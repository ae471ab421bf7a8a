"""Deployment round overhead: the same config in `fedgen simulate` and in `fedgen deploy demo`.

Runs, one after the other, the same Hydra overrides (3 hospitals, 2 rounds, 16x16, 2 local epochs
by default) in (1) `fedgen simulate` and (2) `fedgen deploy demo --nodes 3` (real flower-superlink
and flower-supernode processes on this machine, TLS and SuperNode authentication on), once per
`--isolation` asked for: `process` (fedgen's warm ClientApp executor beside each SuperNode, the
default) and/or `subprocess` (Flower's own: a fresh flwr-clientapp process per message). Writes
JSON with the command, the git commit (and whether the tree had uncommitted changes), the load
average before and after, and for each run:
- round_seconds: metrics.json history[i]["seconds"] (the coordinator's round: instructions sent
  to the replies of train and evaluate aggregated and the checkpoint written);
- train_seconds_max: per round, the slowest hospital's local training (its `train-seconds`);
- ratio: per round, deploy round seconds / simulate round seconds;
- phases (warm executor only, from its log): per round and hospital, where the deployed round's
  time went: train message delivered (round start -> the executor acquires it: the SuperLink,
  the SuperNode's poll, the object transfer), the task (pull input, ClientApp, push reply), the
  evaluate message delivered (train reply sent -> evaluate acquired: upload, the coordinator
  waiting for every hospital, aggregation, the SuperNode's poll), its task, and the tail (the
  last evaluate reply -> round end: upload, the coordinator's poll, checkpoint and samples).

`--repeats N` runs that sequence N times and adds, per deployment and round, the median of the N
deploy/simulate ratios (`median_ratio`; `repeats` holds every run, `runs` the first).
`--before DIR` also runs `fedgen deploy demo` from an earlier source tree (e.g. the last commit:
`git archive HEAD | tar -x -C DIR`, and `git rev-parse HEAD > DIR/COMMIT`), put first on
PYTHONPATH, as the "before" of a change.
The base model (`model.init=pretrained`) is pretrained once into --runs-dir and kept there.

Usage: python benchmarks/deploy_overhead.py [--out benchmarks/results/deploy_overhead.json]
           [--isolation process subprocess] [--before DIR] [--runs-dir runs/bench-deploy]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEDGEN = str(Path(sys.executable).parent / "fedgen")
ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["federation.num_hospitals=3", "federation.num_rounds=2", "federation.local_epochs=2",
             "data.image_size=16"]
ACQUIRED = re.compile(r"task (\d+): (\w+) message \(run \d+\), acquired at ([\d.]+)")
DONE = re.compile(r"task (\d+): (\w+) in ([\d.]+) s \(pull ([\d.-]+) s, ClientApp ([\d.]+) s, push ([\d.]+) s\), "
                  r"done at ([\d.]+)")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def timed(command: list[str], run_dir: Path, env: dict[str, str] | None = None) -> dict:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    return {
        "command": command,
        "wall_seconds": wall,
        "round_seconds": [r["seconds"] for r in history],
        "train_seconds_max": [max(m["train-seconds"] for m in r["train"].values()) for r in history],
        "history": [{"started_at": r["started_at"], "ended_at": r["ended_at"]} for r in history],
    }


def executor_tasks(log: Path) -> list[dict]:
    """The warm executor's tasks, from its log: message type, round (the n-th train or evaluate
    message of the run is round n's), acquired/done times, phases."""
    tasks: dict[str, dict] = {}
    count: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        if (m := ACQUIRED.search(line)) and m[1] not in tasks:
            count[m[2]] = count.get(m[2], 0) + 1
            tasks[m[1]] = {"type": m[2], "round": count[m[2]], "acquired_at": float(m[3])}
        elif (m := DONE.search(line)) and m[1] in tasks:
            tasks[m[1]].update(status=m[2], seconds=float(m[3]), pull=None if m[4] == "-" else float(m[4]),
                               clientapp=float(m[5]), push=float(m[6]), done_at=float(m[7]))
    return list(tasks.values())


def phases(run: dict, logs: Path, nodes: int) -> list[dict]:
    """Per round and hospital, the deployed round's time split by the executor's own records."""
    rounds = []
    for number, record in enumerate(run["history"], start=1):
        hospitals = []
        for h in range(nodes):
            tasks = {t["type"]: t for t in executor_tasks(logs / f"supernode-{h}-clientapp.log")
                     if t["round"] == number and "done_at" in t}
            train, evaluate = tasks.get("train"), tasks.get("evaluate")
            if train is None:
                continue
            row = {"hospital": h, "train_delivered": train["acquired_at"] - record["started_at"],
                   "train_task": train["seconds"], "train_pull": train["pull"], "train_clientapp": train["clientapp"],
                   "train_push": train["push"]}
            if evaluate is not None:
                row.update(evaluate_delivered=evaluate["acquired_at"] - train["done_at"], evaluate_task=evaluate["seconds"],
                           tail=record["ended_at"] - evaluate["done_at"])
            hospitals.append(row)
        rounds.append({"round": number, "hospitals": hospitals})
    return rounds


def one_repeat(stamp: str, runs_dir: Path, overrides: list[str], deploys: list, nodes: int) -> dict:
    """`fedgen simulate`, then each deployment, one after the other: {label: timed run}."""
    runs, names = {}, []
    try:
        name = f"sim-{stamp}"
        names.append(name)
        sim = timed([FEDGEN, "simulate", f"runs_dir={runs_dir}", f"name={name}", *overrides], runs_dir / name)
        runs["simulate"] = sim
        print(f"simulate: rounds {', '.join(f'{s:.1f}' for s in sim['round_seconds'])} s", flush=True)
        for label, flags, env in deploys:
            name = f"deploy-{label}-{stamp}"
            names.append(name)
            workdir = Path(tempfile.mkdtemp(prefix="fedgen-deploy-bench-"))
            try:
                run = timed([FEDGEN, "deploy", "demo", "--nodes", str(nodes), *flags, "--workdir", str(workdir),
                             f"runs_dir={runs_dir}", f"name={name}", *overrides], runs_dir / name, env)
                if label == "process":
                    run["phases"] = phases(run, workdir / "logs", nodes)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            run["ratio"] = [d / s for d, s in zip(run["round_seconds"], sim["round_seconds"])]
            runs[f"deploy_{label}"] = run
            print(f"deploy ({label}): rounds {', '.join(f'{s:.1f}' for s in run['round_seconds'])} s, "
                  f"deploy/simulate {', '.join(f'{r:.2f}x' for r in run['ratio'])}", flush=True)
            for record in run.get("phases", []):
                keys = ("train_delivered", "train_task", "evaluate_delivered", "evaluate_task", "tail")
                rows = record["hospitals"]
                means = {k: sum(r.get(k, 0.0) for r in rows) / max(1, len(rows)) for k in keys}
                print(f"  round {record['round']} (mean of {len(rows)} hospitals): "
                      + ", ".join(f"{k} {v:.2f} s" for k, v in means.items()), flush=True)
    finally:
        for name in names:
            shutil.rmtree(runs_dir / name, ignore_errors=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/deploy_overhead.json")
    parser.add_argument("--isolation", nargs="+", default=["process"], choices=["process", "subprocess"])
    parser.add_argument("--before", help="an earlier fedgen source tree: its `fedgen deploy demo` runs too")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run simulate and each deployment this many times, alternating: round "
                             "times move by a third between runs on 2 cores, so compare medians")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-deploy"),
                        help="where the runs go (the pretrained base is cached here)")
    parser.add_argument("overrides", nargs="*", help=f"Hydra overrides (default: {' '.join(OVERRIDES)})")
    args = parser.parse_args()
    overrides = args.overrides or OVERRIDES
    runs_dir = Path(args.runs_dir).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {
        "command": [Path(sys.argv[0]).as_posix(), *sys.argv[1:]],
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain")),
        "cpus": os.cpu_count(),
        "overrides": overrides,
        "load_average_before": os.getloadavg(),
    }
    deploys = [(isolation, ["--isolation", isolation], None) for isolation in args.isolation]
    if args.before:
        before = Path(args.before).resolve()
        results["before"] = {"tree": str(before), "commit": (before / "COMMIT").read_text().strip()
                             if (before / "COMMIT").exists() else None}
        deploys.append(("before", [], {**os.environ, "PYTHONPATH": str(before)}))
    results["repeats"] = []
    for repeat in range(args.repeats):
        if args.repeats > 1:
            print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        results["repeats"].append(one_repeat(f"{stamp}-{repeat}", runs_dir, overrides, deploys, args.nodes))
    results["runs"] = results["repeats"][0]  # (where earlier results kept their one repeat)
    results["median_ratio"] = {
        label: [statistics.median(r[label]["ratio"][i] for r in results["repeats"])
                for i in range(len(results["runs"][label]["ratio"]))]
        for label in results["runs"] if label != "simulate"}
    if args.repeats > 1:
        for label, ratios in results["median_ratio"].items():
            print(f"{label}: median deploy/simulate over {args.repeats} repeats "
                  f"{', '.join(f'{r:.2f}x' for r in ratios)}", flush=True)
    results["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"load average {results['load_average_before'][0]:.2f} before, {results['load_average_after'][0]:.2f} "
          f"after; wrote {out}")


if __name__ == "__main__":
    main()
