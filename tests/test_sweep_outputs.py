"""`fedgen sweep`'s comparison outputs (HParams, trade-off figure, reports) hold each run's numbers.

The runs are fabricated as training, `fedgen attack` and the utility evaluation leave them (no
Flower); `fabricate_run` and `check_outputs` serve tests/test_sweep.py too.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attacks.metrics import evaluate_scores
from fedgen.config import load_config
from fedgen.evaluation.comparison import METRICS, hparams_sessions, number, run_row, write_hparams
from fedgen.evaluation.markdown import fmt
from fedgen.evaluation.report import tpr_bound, write_run_report
from fedgen.run_dir import RunDir, write_json
from fedgen.running import sweep
from fedgen.running.simulate import prepare_run_dir
from fedgen.tracking import FederationLogger

SMALL = ["federation.num_hospitals=2", "federation.num_rounds=2"]


def fabricate_run(overrides: list[str], seed: int, parts=("train", "attack", "utility")) -> RunDir:
    """A run as training, `fedgen attack` and the utility evaluation leave it (no Flower)."""
    cfg = load_config(overrides)
    run = RunDir(Path(cfg.runs_dir) / cfg.name)
    rng = np.random.default_rng(seed)
    if "train" in parts:
        prepare_run_dir(run, cfg, overrides, ["fedgen", "simulate", *overrides])
        fabricate_training(run, cfg, rng)
    eps = number(run.read_metrics()["ledgers"]["0"]["epsilon"])
    if "attack" in parts:
        fabricate_attack(run, eps, rng)
    if "utility" in parts:
        write_json(
            run.root / "utility.json",
            {
                "val_loss": float(rng.uniform(0.1, 0.5)),
                "frechet_distance": float(rng.uniform(5, 50)),
                "frechet_distance_real": 1.5,
                "val_loss_untrained": 0.98,
                "frechet_distance_untrained": 123.0,
                "precision": float(rng.uniform()),
                "recall": float(rng.uniform()),
                "downstream": {
                    "auc": float(rng.uniform(0.5, 1)),
                    "accuracy": 0.7,
                    "baseline_auc": 0.9,
                    "baseline_accuracy": 0.8,
                },
            },
        )
    return run


def fabricate_training(run: RunDir, cfg, rng: np.random.Generator) -> None:
    dp = cfg.privacy.enabled
    eps = [
        float(rng.uniform(0.5, 0.99) * cfg.privacy.target_epsilon) if dp else math.inf
        for _ in range(2)
    ]
    ledgers = {
        str(h): {
            "epsilon": eps[h],
            "delta": cfg.privacy.delta,
            "noise_multiplier": 0.9 + h if dp else 0.0,
            "sample_rate": 0.1 * (h + 1),
            "total_steps": 20,
            "rounds": [],
        }
        for h in range(2)
    }
    summary = {
        "epsilon_max": max(eps),
        "noise_multiplier": 1.9 if dp else 0.0,
        "val_loss": float(rng.uniform(0.1, 0.5)),
        "train_loss": 0.4,
        "rounds_completed": cfg.federation.num_rounds,
    }
    write_json(
        run.metrics,
        {
            "status": "completed",
            "name": cfg.name,
            "summary": summary,
            "history": [],
            "ledgers": ledgers,
        },
    )
    logger = FederationLogger(
        run.tensorboard
    )  # what training leaves: a sample grid and its HParams
    logger.log_samples(torch.rand(4, 1, 8, 8) * 2 - 1, cfg.federation.num_rounds)
    logger.log_hparams(cfg, summary)
    logger.close()


def fabricate_attack(run: RunDir, eps: float | None, rng: np.random.Generator) -> None:
    is_member = np.arange(200) < 100
    results = {
        name: evaluate_scores(
            name, rng.normal(size=200) + shift * is_member, is_member, 1e-5, bootstrap=20
        )
        for name, shift in (("loss", rng.uniform(0, 1)), ("pia", rng.uniform(0, 1)))
    }
    best = max(results, key=lambda n: results[n].auc)
    write_json(
        run.root / "attack.json",
        {
            "best_attack": best,
            "attacks": {n: r.to_dict() for n, r in results.items()},
            "alarms": [],
            "hospitals": {
                "0": {
                    "accountant_epsilon": math.inf if eps is None else eps,
                    "auc": {n: r.auc for n, r in results.items()},
                    "epsilon_lb": 0.1,
                    "dataset_p_value": 0.02,
                    "dataset_p_value_control": 0.7,
                }
            },
            "extraction": {"num_samples": 8, "num_flagged": int(rng.integers(0, 8))},
        },
    )


def expected(run: RunDir) -> dict:
    """The numbers a row must hold, read straight from the run's files (None: not measured)."""
    metrics = json.loads(run.metrics.read_text())
    attack = json.loads((run.root / "attack.json").read_text())
    path = run.root / "utility.json"
    utility = json.loads(path.read_text()) if path.exists() else {}
    results = attack["attacks"]
    return {
        "epsilon": number(metrics["summary"]["epsilon_max"]),
        "val_loss": utility.get("val_loss", metrics["summary"]["val_loss"]),
        "frechet_distance": utility.get("frechet_distance"),
        "frechet_distance_real": utility.get("frechet_distance_real"),
        "val_loss_untrained": utility.get("val_loss_untrained"),
        "frechet_distance_untrained": utility.get("frechet_distance_untrained"),
        "precision": utility.get("precision"),
        "recall": utility.get("recall"),
        "downstream_auc": (utility.get("downstream") or {}).get("auc"),
        "attack_auc": max(r["auc"] for r in results.values()),
        "tpr_at_1pct_fpr": max(r["tpr_at_1pct_fpr"] for r in results.values()),
        "epsilon_lb": max(r["epsilon_lb_clopper_pearson"] for r in results.values()),
        "extraction_flagged": attack["extraction"]["num_flagged"],
    }


def check_outputs(folder: Path, runs: dict[str, RunDir]) -> None:
    """HParams (as the dashboard reads them), the trade-off figure and the reports hold each run's numbers."""
    sessions = hparams_sessions(folder)
    # One session per run, none for the sweep's own tb/.
    assert set(sessions) == {f"{name}/tb" for name in runs}
    points = {
        p["setting"]: p for p in json.loads(Image.open(folder / "tradeoff.png").text["Description"])
    }
    sweep_report = (folder / "report.md").read_text()
    for name, run in runs.items():
        want = expected(run)
        session = sessions[f"{name}/tb"]
        assert session["hparams"]["setting"] == name
        for field, tag in METRICS.items():
            if want[field] is None:
                assert tag not in session["metrics"], tag
            else:
                assert session["metrics"][tag] == pytest.approx(want[field], rel=1e-6), tag
        cfg = load_config(json.loads(run.overrides.read_text()))
        if cfg.privacy.enabled:
            assert session["hparams"]["target_epsilon"] == cfg.privacy.target_epsilon
            assert session["hparams"]["achieved_epsilon"] == pytest.approx(want["epsilon"])
            assert session["hparams"]["noise_multiplier"] > 0
        else:
            assert (
                "target_epsilon" not in session["hparams"]
                and session["hparams"]["privacy"] == "none"
            )
        assert session["hparams"]["hospitals"] == cfg.federation.num_hospitals
        assert session["hparams"]["rounds"] == cfg.federation.num_rounds
        # Exactly one HParams session record in the run's logdir: training's was replaced.
        assert _session_records(run.tensorboard) == 1

        point = points[name]
        assert point["x"] == (pytest.approx(want["epsilon"]) if cfg.privacy.enabled else None)
        plotted = (
            want["frechet_distance"]
            if point["utility_metric"] == "frechet_distance"
            else want["val_loss"]
        )
        assert point["utility"] == pytest.approx(plotted)
        assert point["attack_auc"] == pytest.approx(want["attack_auc"])

        report = (run.root / "report.md").read_text()
        for field in (
            "attack_auc",
            "epsilon_lb",
            "frechet_distance",
            "precision",
            "recall",
            "val_loss",
            "val_loss_untrained",
            "frechet_distance_untrained",
        ):
            assert want[field] is None or fmt(want[field]) in report, field
        if cfg.privacy.enabled:
            assert (
                fmt(want["epsilon"]) in report
                and fmt(tpr_bound(want["epsilon"], cfg.privacy.delta)) in report
            )
        for link in _image_links(report):
            assert (run.root / link).exists(), link
        row_line = next(
            line
            for line in sweep_report.splitlines()
            if line.startswith(f"| [{name}]({name}/report.md)")
        )
        for field in (
            "attack_auc",
            "tpr_at_1pct_fpr",
            "epsilon_lb",
            "frechet_distance",
            "val_loss",
            "downstream_auc",
        ):
            assert f"| {fmt(want[field])} |" in row_line + " |", field
    # The utility scale's ends, shared by the runs, are in the sweep report and each run's report.
    for reference in ("val_loss_untrained", "frechet_distance_untrained", "frechet_distance_real"):
        value = fmt(want[reference])
        assert want[reference] is None or value in sweep_report, reference
    for link in _image_links(sweep_report):
        assert (folder / link).exists(), link
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(folder / "tb"), size_guidance={IMAGES: 0})
    events.Reload()
    assert "sweep/tradeoff" in events.Tags()["images"]


def _session_records(logdir: Path) -> int:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sum(
        v.tag == "_hparams_/session_start_info"
        for path in logdir.glob("events.out.tfevents.*")
        for event in EventFileLoader(str(path)).Load()
        for v in event.summary.value
    )


def _image_links(markdown: str) -> list[str]:
    import re

    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_reports_figure_and_hparams_hold_each_runs_numbers(tmp_path):
    folder = tmp_path / "budgets"
    runs = {
        name: fabricate_run([*SMALL, f"privacy={name}", f"runs_dir={folder}", f"name={name}"], seed)
        for seed, name in enumerate(("none", "eps10", "eps1"))
    }
    rows = []
    for name, run in runs.items():
        row = {"setting": name, "status": "ok", **run_row(run.root), "path": str(run.root)}
        write_hparams(run.root, row)
        write_hparams(run.root, row)  # idempotent: still one session per run
        write_run_report(run.root, row)
        rows.append(row)
    sweep.finish(folder, rows, SMALL, "fedgen sweep (test)")
    check_outputs(folder, runs)
    report = (runs["none"].root / "report.md").read_text()
    assert "No differential privacy" in report and (runs["none"].root / "samples.png").exists()
