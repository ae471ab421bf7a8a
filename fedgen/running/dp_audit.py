"""`fedgen audit-dp <run dir>`: the white-box audit of a run's DP-SGD recipe (`fedgen.privacy.dp_audit`).

The recipe is what a hospital trained with: sigma, q, the planned steps, delta and the accountant
from its ledger (or planned from the config, as the hospital would, when it has none yet), C and
the model from the config. The audit trains a fresh model of that architecture on synthetic
X-rays, never the hospital's patients (its output is one more DP release of whatever it trains
on), writes `dp_audit.json` into the run directory and raises `DpAuditAlarm` when the lower bound
exceeds the accountant's epsilon: then fedgen's DP-SGD does not privatise as it claims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedgen.config import ConfigError, ExperimentConfig
from fedgen.data.dataset import DataError
from fedgen.data.silos import build_silos
from fedgen.data.synthetic import generate_xrays
from fedgen.diffusion import Diffusion
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.accounting import EpsilonLedger, LedgerError, make_plan
from fedgen.privacy.dp_audit import DpSgdRecipe, audit_dp_sgd
from fedgen.run_dir import RunDir, write_json
from fedgen.seeding import derive_seed, resolve_device


class DpAuditAlarm(RuntimeError):
    """The white-box lower bound exceeds the accountant's epsilon: the DP-SGD implementation is broken."""


@dataclass(frozen=True)
class DpAuditSettings:
    hospital: int = 0  # whose recipe (hospitals differ in N, hence q and sigma)
    # m: about 8,000 brings the bound to half the accountant's epsilon at epsilon 8 (see
    # benchmarks/dp_audit.py); fewer are faster and looser, and cannot certify large epsilons.
    canaries: int = 8000
    images: int = 64  # synthetic X-rays trained on with the canaries (background for the step)
    seed: int = 0  # the canaries and their inclusion; never the DP noise or the sampling


def recipe_of_run(run: RunDir, cfg: ExperimentConfig, hospital: int) -> DpSgdRecipe:
    if not cfg.privacy.enabled:
        raise ConfigError("privacy.enabled is false: the run trained without DP-SGD; nothing to audit")
    path = run.hospital_home(hospital) / "ledger.json"
    if path.exists():
        try:
            ledger = EpsilonLedger.load(path)
        except LedgerError as err:
            raise DataError(str(err)) from err
    else:
        silos = build_silos(cfg)
        if not 0 <= hospital < len(silos):
            raise ConfigError(f"--hospital: {hospital} is not one of the run's {len(silos)} hospitals")
        fed = cfg.federation
        plan = make_plan(len(silos[hospital].train), cfg.training.batch_size, fed.local_epochs, fed.num_rounds)
        ledger = EpsilonLedger.start(cfg.privacy, plan)
    return DpSgdRecipe(
        noise_multiplier=ledger.noise_multiplier,
        sample_rate=ledger.sample_rate,
        steps=ledger.planned_steps,
        max_grad_norm=cfg.privacy.max_grad_norm,
        delta=ledger.delta,
        accountant=ledger.accountant,
    )


def audit_run_dp(
    run_dir: str | Path,
    settings: DpAuditSettings = DpAuditSettings(),
    log: Callable[[str], None] = print,
    *,
    _broken: str | None = None,  # tests only: audit a deliberately broken DP-SGD
) -> dict:
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise DataError(f"{run.root}: no such run directory")
    if not run.config.exists():
        raise DataError(f"{run.root}: not a fedgen run directory (no config.yaml)")
    if run.selection.exists():
        raise DataError(f"{run.root}: a private selection run (`fedgen select`): there is no DP-SGD to audit; its one Gaussian release per hospital is tested against the exact mechanism (tests/test_private_selection.py)")
    cfg = run.experiment_config()
    recipe = recipe_of_run(run, cfg, settings.hospital)
    device = resolve_device(cfg.training.device)
    torch.manual_seed(derive_seed(cfg.seed, "dp-audit", "model"))  # the weights do not matter: seeded
    unet = build_unet(cfg.model, cfg.data.image_size).to(device)
    images = generate_xrays(
        num_patients=settings.images,
        images_per_patient=1,
        image_size=cfg.data.image_size,
        num_sources=1,
        finding_rate=cfg.data.finding_rate,
        seed=derive_seed(cfg.seed, "dp-audit", "images"),
    ).images.to(device)
    log(f"auditing the DP-SGD of {run.root.name}, hospital {settings.hospital}: sigma "
        f"{recipe.noise_multiplier:.3f}, q {recipe.sample_rate:.3f}, {recipe.steps} steps, C "
        f"{recipe.max_grad_norm:g}, accountant epsilon {recipe.epsilon:.3f}; {settings.canaries} canaries")
    result = audit_dp_sgd(
        unet, Diffusion(build_scheduler(cfg.model)), images, recipe, settings.canaries,
        seed=settings.seed, max_physical_batch_size=cfg.training.max_physical_batch_size, _broken=_broken,
    )
    report = {"run": str(run.root), "hospital": settings.hospital, "images": "synthetic X-rays",
              **result.to_dict()}
    write_json(run.root / "dp_audit.json", report)
    log(f"  epsilon lower bound {result.epsilon_lb:.3f} (f-DP, {result.correct} of {result.guesses} "
        f"guesses right; distribution-free {result.epsilon_lb_steinke:.3f}) vs accountant "
        f"{result.accountant_epsilon:.3f}: {result.verdict} ({result.seconds:.0f} s)")
    log(f"wrote {run.root / 'dp_audit.json'}")
    if result.is_broken:
        raise DpAuditAlarm(
            f"DP-SGD audit of {run.root.name}: epsilon lower bound {result.epsilon_lb:.3f} exceeds the "
            f"accountant's {result.accountant_epsilon:.3f}: the DP-SGD implementation is broken"
        )
    return report
