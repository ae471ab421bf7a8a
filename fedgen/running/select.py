"""`fedgen select`: private selection over a simulated federation, through Flower's own path.

The public base (model.init) is not trained. Each hospital votes, with its own secret noise, for
the cells of a public pool of the base's samples that its images fall in; the coordinator sums
the votes into weights, and the release is the base with them (`fedgen.federation.selection`).
One release per hospital: privacy.target_epsilon and privacy.delta, on its lifetime ledger.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedgen.config import ConfigError, absolute_init, load_config
from fedgen.running.apart import plan_apart
from fedgen.running.processes import stop_on_sigterm
from fedgen.running.simulate import client_gpus, prepare_run_dir, run_flower


def selection_overrides(overrides: list[str]) -> list[str]:
    """The run's overrides: `name=<config name>-select` unless a name is given (a selection's run
    dir sits beside, never over, a trained run of the same config); refuses a config with no base."""
    overrides = absolute_init(overrides)
    if not any(o.split("=", 1)[0].lstrip("+") == "name" for o in overrides):
        overrides = [*overrides, f"name={load_config(overrides).name}-select"]
    if not load_config(overrides).model.init:
        raise ConfigError("model.init: selection reweights a public base's samples; it needs one "
                          "(model.init=pretrained, or a diffusers pipeline or UNet folder)")
    return overrides


def check_selection_run_dir(run_dir) -> None:
    if run_dir.config.exists() and not (run_dir.root / "selection.json").exists() and run_dir.metrics.exists():
        raise ConfigError(f"name: {run_dir.root} holds a training run; pick a new name=...")


def select(overrides: list[str], argv: list[str] | None = None, echo=print):
    from fedgen.run_dir import RunDir

    stop_on_sigterm()
    overrides = selection_overrides(overrides)
    cfg = load_config(overrides)
    run_dir = RunDir(Path(cfg.runs_dir) / cfg.name)
    # As `fedgen simulate`: a child process plans, so that this one waits on Flower without torch.
    prepared = plan_apart(prepare_selection, overrides, argv or sys.argv, echo=echo)
    if prepared["complete"]:
        return run_dir
    run_flower(cfg, overrides, run_dir, echo, mode="select", gpus=prepared["gpus"])
    measure_selection(run_dir, echo, cfg.selection.eval_samples)
    return run_dir


def prepare_selection(overrides: list[str], argv: list[str], echo=print) -> dict:
    """Every check before any Flower process starts (a spent lifetime budget refuses here), the
    base pretrained if needed, the run dir prepared. Returns {"complete", "gpus"} as
    `prepare_simulation` does."""
    from fedgen.data.silos import build_silos
    from fedgen.federation.selection import plan_selection, silo_unit_counts
    from fedgen.privacy.accounting import check_delta
    from fedgen.privacy.lifetime import check_simulated_site
    from fedgen.run_dir import RunDir
    from fedgen.running.pretrain import ensure_base

    cfg = load_config(overrides)
    silos = build_silos(cfg)
    units = silo_unit_counts(cfg, silos)
    plan = plan_selection(cfg, units)
    for silo, count in zip(silos, units, strict=True):
        if cfg.privacy.enabled:
            check_delta(cfg.privacy.delta, count)
        check_simulated_site(cfg, silo, 1.0, 1, plan.sigma)  # one release; a spent lifetime budget refuses here
    privacy = (f"epsilon {plan.epsilon:.3g} per hospital (delta {plan.delta:g}), sigma {plan.sigma:.2f} per count"
               if plan.sigma else "off: votes sent without noise, no guarantee")
    echo(f"fedgen select: {plan.hospitals} hospitals vote on {cfg.selection.pool_size} public base samples in "
         f"{plan.cells} cells; privacy {privacy}")
    ensure_base(cfg, cfg.runs_dir, echo)
    run_dir = RunDir(Path(cfg.runs_dir) / cfg.name)
    check_selection_run_dir(run_dir)
    gpus = client_gpus(cfg)
    if prepare_run_dir(run_dir, cfg, overrides, argv):
        echo(f"run '{cfg.name}' is already complete: {run_dir.root}")
        return {"complete": True, "gpus": gpus}
    return {"complete": False, "gpus": gpus}


def measure_selection(run_dir, echo=print, num_samples: int = 256) -> None:
    """The evaluator's part (it holds the held-out images, as `fedgen sweep` does): utility of the
    base and of the selection, the DCR attack on both, selection_eval.json and report.md."""
    from attacks.dcr import dcr_attack
    from fedgen.evaluation.selection_report import (
        EVALUATION_FILE,
        draw_selection,
        log_selection,
        selection_utility,
        write_selection_report,
    )
    from fedgen.run_dir import write_json

    samples = draw_selection(run_dir.root, num_samples, echo)
    result = selection_utility(run_dir.root, samples, echo)
    result["attack"] = {name: dcr_attack(x, samples.members.images, samples.heldout.images)
                        for name, x in (("base", samples.base), ("selection", samples.selected))}
    write_json(run_dir.root / EVALUATION_FILE, result)
    log_selection(run_dir.root, result)
    for name in ("base", "selection"):
        r, a = result[name], result["attack"][name]
        echo(f"  {name}: Frechet distance {r['frechet_distance']:.3f}, precision {r['precision']:.2f}, "
             f"recall {r['recall']:.2f}, DCR attack AUC {a['dcr_auc']:.3f}")
    echo(f"  report: {write_selection_report(run_dir.root)}")
