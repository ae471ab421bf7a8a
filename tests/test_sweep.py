"""`fedgen sweep`: planning the runs, the orchestration (a failed run does not lose the others,
finished ones are skipped), and a tiny real sweep (Flower, attacks, utility) end to end, marked
slow. That the outputs hold each run's numbers: tests/test_sweep_outputs.py.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweep_outputs import SMALL, check_outputs, fabricate_run

from fedgen.config import ConfigError, load_config
from fedgen.run_dir import RunDir
from fedgen.running import sweep
from fedgen.running.processes import TAG_VARIABLE

FEDGEN = str(Path(sys.executable).parent / "fedgen")


def test_plan_routes_overrides_and_refuses_bad_settings(tmp_path):
    p = sweep.plan(
        [
            f"runs_dir={tmp_path}",
            "sweep.privacy=[none,eps4]",
            "federation.num_rounds=3",
            "+sweep.settings.k4=['privacy=eps4','training.noise_multiplicity=4']",
            "sweep.name=s",
        ]
    )
    assert p.folder == tmp_path / "s" and list(p.runs) == ["none", "eps4", "k4"]
    assert p.runs["k4"] == [
        "federation.num_rounds=3",
        "privacy=eps4",
        "training.noise_multiplicity=4",
        f"runs_dir={tmp_path / 's'}",
        "name=k4",
    ]
    assert load_config(p.runs["none"]).federation.num_rounds == 3
    for bad, message in (
        (["sweep.privacy=[nosuch]"], "nosuch"),
        (["name=x"], "name"),
        (["+sweep.settings.x=['name=y']"], "sweep.settings.x"),
        (["+sweep.settings.eps4=['privacy=eps1']"], "already"),
        (["sweep.privacy=[]"], "no settings"),
        (["sweep.privacy=[none]", "federation.num_rounds=0"], "federation.num_rounds"),
        (["sweep.privacy=[none,eps1]", "experiment=leak"], "does not train with privacy=eps1"),
    ):
        with pytest.raises(ConfigError, match=message):
            sweep.plan([f"runs_dir={tmp_path}", *bad])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_does_not_lose_the_others_and_finished_runs_are_skipped(tmp_path, monkeypatch):
    """Orchestration without Flower: training and the attack are replaced by fabricated results."""
    import attacks.audit
    import fedgen.running.simulate

    trained, attacked = [], []

    def fake_simulate(overrides, argv=None, echo=print):
        cfg = load_config(overrides)
        if cfg.privacy.delta == 0.5:
            raise ConfigError("privacy.delta: 0.5 is not below 1/N")
        fabricate_run(overrides, seed=len(trained), parts=("train", "utility"))
        trained.append(cfg.name)

    def fake_audit(run_dir, settings, progress=True, log=print):
        attacked.append((Path(run_dir).name, settings.extraction.num_samples))
        fabricate_run(
            json.loads(RunDir(run_dir).overrides.read_text()),
            seed=10 + len(attacked),
            parts=("attack",),
        )

    monkeypatch.setattr(fedgen.running.simulate, "simulate", fake_simulate)
    monkeypatch.setattr(attacks.audit, "audit_run", fake_audit)
    overrides = [
        f"runs_dir={tmp_path}",
        *SMALL,
        "sweep.name=s",
        "sweep.privacy=[none]",
        "+sweep.settings.bad=['privacy=eps10','privacy.delta=0.5']",
        "+sweep.settings.eps10=['privacy=eps10']",
    ]
    assert sweep.main(overrides) == 1
    assert trained == ["none", "eps10"] and attacked == [("none", 64), ("eps10", 64)]
    rows = {
        r["setting"]: r for r in json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]
    }
    assert [r["status"] for r in rows.values()] == ["ok", "failed", "ok"]
    assert rows["bad"]["step"] == "train" and "privacy.delta" in rows["bad"]["error"]
    assert "bad (failed)" in (tmp_path / "s" / "report.md").read_text()
    check_outputs(tmp_path / "s", {n: RunDir(tmp_path / "s" / n) for n in ("none", "eps10")})

    # Again: the finished runs are skipped, the bad one fails again.
    assert sweep.main(overrides) == 1
    assert trained == ["none", "eps10"] and len(attacked) == 2
    again = {
        r["setting"]: r for r in json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]
    }
    assert (
        again["none"]["steps"]["train"].startswith("skipped")
        and again["none"]["seconds"] == rows["none"]["seconds"]
    )
    assert again["bad"]["status"] == "failed"


# --- end to end ------------------------------------------------------------------------------------
TAG_ENV = {**os.environ, TAG_VARIABLE: f"fedgen-sweep-test-{os.getpid()}"}


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
    overrides = [
        f"runs_dir={tmp_path}",
        "sweep.name=tiny",
        "sweep.privacy=[none]",
        "+sweep.settings.bad=['privacy=eps10','privacy.delta=0.5']",  # fails before training
        "+sweep.settings.eps10=['privacy=eps10']",
        "sweep.attack.attacks=[loss,pia]",
        "sweep.attack.per_hospital=8",
        "sweep.attack.samples=8",
        "sweep.attack.batch_size=16",
        "sweep.utility.num_samples=32",
        "sweep.utility.batch_size=16",
        "federation.num_hospitals=2",
        "federation.num_rounds=1",
        "federation.local_epochs=1",
        "federation.num_samples=4",
        "federation.sampling_steps=5",
        "data.num_patients=48",
        "data.image_size=16",
        "training.batch_size=16",
        "pretrain.num_patients=64",  # the runs fine-tune one small public base, pretrained once
        "pretrain.epochs=1",
    ]
    started = time.perf_counter()
    done = subprocess.run(
        [FEDGEN, "sweep", *overrides], capture_output=True, text=True, timeout=900, env=TAG_ENV
    )
    first = time.perf_counter() - started
    assert done.returncode == 1, done.stdout + done.stderr  # one run failed
    folder = tmp_path / "tiny"
    rows = {r["setting"]: r for r in json.loads((folder / "sweep.json").read_text())["rows"]}
    assert {n: r["status"] for n, r in rows.items()} == {
        "none": "ok",
        "bad": "failed",
        "eps10": "ok",
    }, done.stdout
    assert "privacy.delta" in rows["bad"]["error"]
    runs = {n: RunDir(folder / n) for n in ("none", "eps10")}
    for run in runs.values():
        assert (
            run.is_complete()
            and (run.root / "attack.json").exists()
            and (run.root / "report.md").exists()
        )
    if importlib.util.find_spec("fedgen.evaluation.utility") is not None:
        assert all((run.root / "utility.json").exists() for run in runs.values()), done.stdout
    check_outputs(folder, runs)
    # The same command again skips every finished step.
    mtimes = {
        n: (run.metrics.stat().st_mtime, (run.root / "attack.json").stat().st_mtime)
        for n, run in runs.items()
    }
    started = time.perf_counter()
    again = subprocess.run(
        [FEDGEN, "sweep", *overrides], capture_output=True, text=True, timeout=600, env=TAG_ENV
    )
    print(f"tiny sweep: {first:.0f} s, again: {time.perf_counter() - started:.0f} s")
    assert again.returncode == 1, again.stdout + again.stderr
    assert again.stdout.count("skipped") >= 6, again.stdout
    for n, run in runs.items():
        now = (run.metrics.stat().st_mtime, (run.root / "attack.json").stat().st_mtime)
        assert now == mtimes[n]
    check_outputs(folder, runs)
