"""`fedgen sweep`: one federation per privacy setting, everything else equal; each trained, attacked
and measured, then compared (sweep.json, tradeoff.png, report.md, TensorBoard HParams).

Design:
- The sweep's settings come from `conf/sweep.yaml`. Overrides that start with `sweep.` change
  it; every other override applies to every run. Setting `s` is the run
  `<runs_dir>/<sweep.name>/s/`, trained exactly as `fedgen simulate <common overrides>
  <s's overrides> runs_dir=<runs_dir>/<sweep.name> name=s`. Silos, splits and seeds derive from
  the data and federation config and the seed, never from the run's name or privacy settings,
  so every run sees the same patients in the same roles.
- Every setting's config is composed and checked before anything trains (a typo fails at once).
- Steps per run: train (in-process `fedgen.running.simulate.simulate`, which starts and stops its own
  Flower processes), attack (`attacks.audit.audit_run`, 64 extraction samples by default rather
  than 256), utility (`fedgen.evaluation.utility.evaluate_utility`: one feature encoder, trained on the
  runs' common training images and cached in the sweep folder, measures every run), then the
  run's HParams session and report. A step whose output exists is skipped (train: metrics.json
  says completed and the config is unchanged; attack: attack.json; utility: utility.json), so
  the same command again only does what is missing; an interrupted run resumes from its last
  checkpoint. Delete a run's attack.json or utility.json to redo that step.
- A run that fails (a setting that cannot work, a failed federation, an audit alarm) is recorded in
  sweep.json with the step and error, and the sweep goes on; the command exits non-zero at the end.
  Ctrl-C stops the whole sweep.
- sweep.json is rewritten after every run: one row per setting (`comparison.run_row` plus
  status, failed step, error and seconds per step; a skipped step keeps the seconds it took).
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from fedgen.config import ConfigError, check_override_keys, compose, load_config
from fedgen.run_dir import RunDir, write_json
from fedgen.running.preflight import check_count, check_writable

RESERVED = ("name", "runs_dir")  # the sweep sets these for each run


@dataclass
class SweepAttack:
    attacks: list[str] = field(default_factory=lambda: ["loss", "pia", "pian", "secmi", "sima"])
    per_hospital: int | None = None
    samples: int = 64
    batch_size: int = 64


@dataclass
class SweepUtility:
    enabled: bool = True
    num_samples: int = 256
    batch_size: int = 64


@dataclass
class SweepConfig:
    name: str = "budgets"
    privacy: list[str] = field(default_factory=lambda: ["none", "eps10", "eps4", "eps1"])
    settings: dict[str, list[str]] = field(default_factory=dict)
    attack: SweepAttack = field(default_factory=SweepAttack)
    utility: SweepUtility = field(default_factory=SweepUtility)


@dataclass(frozen=True)
class Plan:
    """What a sweep will do: its folder, and each setting's complete `fedgen simulate` overrides."""

    sweep: SweepConfig
    folder: Path
    common: list[str]
    runs: dict[str, list[str]]  # setting -> overrides of its run


def _key(override: str) -> str:
    return override.lstrip("~+").split("=", 1)[0]


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(overrides of the sweep config, overrides of every run)."""
    mine = [o for o in overrides if _key(o) == "sweep" or _key(o).startswith("sweep.")]
    return mine, [o for o in overrides if o not in mine]


def plan(overrides: list[str]) -> Plan:
    """Compose the sweep and every run's config; raise on anything that cannot work."""
    sweep_overrides, common = split_overrides(overrides)
    check_override_keys(sweep_overrides, SweepConfig(), groups=["sweep"], prefix="sweep.")
    raw = compose(sweep_overrides, config_name="sweep").sweep
    sweep = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), raw))
    assert isinstance(sweep, SweepConfig)
    _check_steps(sweep)
    for o in common:
        if _key(o) == "name":
            raise ConfigError(
                "name: a sweep names its runs after their settings; set sweep.name instead"
            )
    folder = Path(load_config(common).runs_dir) / sweep.name
    settings = {p: [f"privacy={p}"] for p in sweep.privacy}
    for name, own in sweep.settings.items():
        if name in settings:
            raise ConfigError(
                f"sweep.settings.{name}: the setting '{name}' is already in sweep.privacy"
            )
        settings[name] = list(own)
    if not settings:
        raise ConfigError("sweep.privacy: the sweep has no settings")
    shared = [o for o in common if _key(o) != "runs_dir"]  # each run's runs_dir is the sweep folder
    runs = {}
    for name, own in settings.items():
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or name == "tb":
            raise ConfigError(
                f"sweep.settings: '{name}' cannot name a run folder (letters, digits, _ . -; not tb)"
            )
        if any(_key(o) in RESERVED for o in own):
            raise ConfigError(
                f"sweep.settings.{name}: the sweep sets {' and '.join(RESERVED)} itself"
            )
        runs[name] = [*shared, *own, f"runs_dir={folder}", f"name={name}"]
        try:
            load_config(runs[name])
        except Exception as err:
            raise ConfigError(f"sweep setting '{name}' ({' '.join(own)}): {err}") from err
    return Plan(sweep, folder, common, runs)


def _check_steps(sweep: SweepConfig) -> None:
    """The attack and utility settings, checked before the first run trains rather than after."""
    from attacks.audit import check_attacks
    from fedgen.evaluation.utility import NEAREST_NEIGHBOURS

    check_attacks(sweep.attack.attacks, "sweep.attack.attacks")
    check_count(sweep.attack.per_hospital, "sweep.attack.per_hospital", 1)
    check_count(sweep.attack.samples, "sweep.attack.samples", 0)
    check_count(sweep.attack.batch_size, "sweep.attack.batch_size", 1)
    check_count(sweep.utility.num_samples, "sweep.utility.num_samples", NEAREST_NEIGHBOURS + 1)
    check_count(sweep.utility.batch_size, "sweep.utility.batch_size", 1)


def run_sweep(overrides: list[str], command: str | None = None, log=print) -> list[dict]:
    """Train, attack and measure every setting; write sweep.json, tradeoff.png and report.md.
    Returns the rows (status "failed" for each run that failed)."""
    p = plan(overrides)
    check_writable(p.folder, "runs_dir")
    command = command or " ".join(["fedgen", "sweep", *overrides])
    p.folder.mkdir(parents=True, exist_ok=True)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars, twice per run
    previous = {r["setting"]: r for r in _read_rows(p.folder)}
    log(f"sweep '{p.sweep.name}': {len(p.runs)} settings ({', '.join(p.runs)}) in {p.folder}")
    rows = {name: previous.get(name, {"setting": name, "status": "pending"}) for name in p.runs}
    try:
        for i, (name, run_overrides) in enumerate(p.runs.items(), 1):
            rows[name] = run_setting(
                p, name, run_overrides, previous.get(name, {}), f"[{i}/{len(p.runs)}] {name}", log
            )
            _write_sweep_json(p, rows, command)
    finally:
        _write_sweep_json(p, rows, command)
    finish(p.folder, list(rows.values()), p.common, command)
    failed = [r for r in rows.values() if r["status"] == "failed"]
    log(
        f"\nsweep '{p.sweep.name}': {len(rows) - len(failed)} of {len(rows)} runs ok"
        + "".join(f"\n  FAILED {r['setting']} ({r['step']}): {r['error']}" for r in failed)
    )
    log(
        f"  report: {p.folder / 'report.md'}\n  trade-off: {p.folder / 'tradeoff.png'}\n"
        f"  compare them: tensorboard --logdir {p.folder}"
    )
    log_spend(p.folder, log)
    return list(rows.values())


def log_spend(folder: Path, log) -> None:
    """The sweep's total spend: every run trained on the same patients, so each hospital's site
    ledger composes them all (`fedgen budget`)."""
    from fedgen.privacy.accounting import LedgerError
    from fedgen.running.budget import budget_report

    try:
        lines, _ = budget_report(folder)
    except (ConfigError, LedgerError) as err:  # no run trained, or a damaged ledger: say so, go on
        log(f"  total spend: {err}")
        return
    log("\ntotal spend per hospital (all the sweep's runs on the same patients):\n" + "\n".join(lines))


def run_setting(p: Plan, name: str, overrides: list[str], previous: dict, label: str, log) -> dict:
    """One run's steps; a failure is recorded in the row, never raised (Ctrl-C is)."""
    run = RunDir(p.folder / name)
    row: dict = {
        "setting": name,
        "overrides": overrides,
        "status": "ok",
        "step": None,
        "error": None,
        "steps": {},
        "seconds": dict(previous.get("seconds", {})),
    }
    steps = {
        "train": lambda: _train(run, overrides, log),
        "attack": lambda: _attack(run, p.sweep.attack, log),
        "utility": lambda: _utility(run, p.sweep.utility, log),
    }
    step = "train"
    try:
        for step, do in steps.items():
            log(f"{label}: {step}")
            started = time.perf_counter()
            outcome = row["steps"][step] = do()
            if outcome == "done":
                row["seconds"][step] = round(time.perf_counter() - started, 1)
                log(f"{label}: {step} done ({row['seconds'][step]:.0f} s)")
            else:
                log(f"{label}: {step} {outcome}")
        if run.is_complete():
            step = "report"
            row = _describe(run, row)
    except KeyboardInterrupt:
        raise
    except Exception as err:
        _record_failure(row, step, err, log, label)
        if step != "report" and run.is_complete():  # e.g. an audit alarm: its report says so
            try:
                row = _describe(run, row)
            except Exception as err2:
                _record_failure(row, "report", err2, log, label)
    return row


def _record_failure(row: dict, step: str, err: Exception, log, label: str) -> None:
    row.update(
        status="failed",
        step=step,
        error=f"{type(err).__name__}: {err}".strip(),
        traceback=traceback.format_exc(limit=8),
    )
    log(f"{label}: FAILED at {step}: {row['error']}")


def _describe(run: RunDir, row: dict) -> dict:
    """Add the run's numbers; write its HParams session and report."""
    from fedgen.evaluation.comparison import run_row, write_hparams
    from fedgen.evaluation.report import write_run_report

    described = {**row, **run_row(run.root), "path": str(run.root)}
    write_hparams(run.root, described)
    write_run_report(run.root, described)
    return described


# --- steps: each returns "done", or why it did nothing ---------------------------------------------
def _train(run: RunDir, overrides: list[str], log) -> str:
    from fedgen.running.simulate import prepare_run_dir, simulate

    argv = ["fedgen", "simulate", *overrides]
    # A complete run with the same config is skipped; a different config raises (ConfigError).
    if run.config.exists() and prepare_run_dir(run, load_config(overrides), overrides, argv):
        return "skipped (already complete)"
    simulate(overrides, argv=argv, echo=lambda line="": log("  " + line.lstrip("\n")))
    return "done"


def _attack(run: RunDir, s: SweepAttack, log) -> str:
    import dataclasses

    from attacks.audit import AuditAlarm, AuditSettings, audit_run

    report = run.root / "attack.json"
    if report.exists():
        alarms = json.loads(report.read_text()).get("alarms", [])
        if alarms:  # found by an earlier attack: still a failure
            raise AuditAlarm("; ".join(alarms))
        return "skipped (attack.json exists)"
    settings = AuditSettings(
        attacks=tuple(s.attacks), per_hospital=s.per_hospital, batch_size=s.batch_size
    )
    settings = dataclasses.replace(
        settings, extraction=dataclasses.replace(settings.extraction, num_samples=s.samples)
    )
    audit_run(run.root, settings, progress=False, log=lambda line: log(f"  {line}"))
    return "done"


def _utility(run: RunDir, s: SweepUtility, log) -> str:
    if not s.enabled:
        return "off (sweep.utility.enabled=false)"
    if (run.root / "utility.json").exists():
        return "skipped (utility.json exists)"
    from fedgen.evaluation.utility import evaluate_utility

    evaluate_utility(
        run.root,
        encoder_path=None,  # <sweep>/encoder-<fingerprint>.pt: trained once, shared by every run
        num_samples=s.num_samples,
        batch_size=s.batch_size,
        seed=0,
        progress=False,
        log=lambda line: log(f"  {line}"),
    )
    return "done"


# --- sweep outputs ---------------------------------------------------------------------------------
def _read_rows(folder: Path) -> list[dict]:
    path = folder / "sweep.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _write_sweep_json(p: Plan, rows: dict[str, dict], command: str) -> None:
    write_json(
        p.folder / "sweep.json",
        {
            "name": p.sweep.name,
            "command": command,
            "common_overrides": p.common,
            "settings": p.runs,
            "rows": list(rows.values()),
        },
    )


def finish(folder: Path, rows: list[dict], common: list[str], command: str) -> None:
    """The sweep's trade-off figure (PNG and TensorBoard) and report."""
    from fedgen.evaluation.comparison import write_tradeoff
    from fedgen.evaluation.sweep_report import write_sweep_report

    usable = [r for r in rows if r["status"] == "ok" and "privacy" in r]
    write_tradeoff(folder, usable, title=f"privacy budgets: {folder.name}")
    write_sweep_report(folder, rows, common, command)


def refresh(folder: str | Path) -> Path:
    """Rewrite a finished sweep's reports and figure from its runs' current files (`fedgen report`)."""
    folder = Path(folder)
    try:
        sweep = json.loads((folder / "sweep.json").read_text())
        recorded, common, command = sweep["rows"], sweep["common_overrides"], sweep["command"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{folder / 'sweep.json'}: not a fedgen sweep file ({err!r})") from err
    rows = []
    for row in recorded:
        run = RunDir(folder / row["setting"])
        rows.append(_describe(run, row) if run.is_complete() else row)
    finish(folder, rows, common, command)
    return folder / "report.md"


def main(overrides: list[str], print_only: bool = False) -> int:
    """`fedgen sweep`: exit status 1 when a run failed."""
    if print_only:
        p = plan(overrides)
        for overrides_of_run in p.runs.values():
            print(" ".join(["fedgen", "simulate", *overrides_of_run]))
        return 0
    rows = run_sweep(overrides, " ".join(["fedgen", "sweep", *overrides]))
    sys.stdout.flush()
    return 1 if any(r["status"] == "failed" for r in rows) else 0
