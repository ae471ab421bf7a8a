"""How tight is the white-box DP-SGD audit? Its lower bound against the accountant's epsilon.

    python benchmarks/dp_audit.py [--out benchmarks/results/dp_audit.json] [--canaries 8000]
                                  [--images 64] [--epsilons 8,1] [--threads N] [--skip-broken]

The audited plan is the default demo's hospital (`conf/`, one silo of the default federation:
N training images, q = batch / N, T = the planned steps, C, the tiny UNet at its image size),
with sigma calibrated by fedgen for each target epsilon. For each epsilon, one
`fedgen.privacy.dp_audit.audit_dp_sgd` run (gradient canaries through the real DP-SGD step, secret
noise, synthetic X-rays): the f-DP and the distribution-free one-run bounds, correct guesses and
seconds; at the first epsilon also the deliberately broken variants, which must come out above it.

Why the bound stops where it does: an "ideal" table replays the same canary scores without a
model (`simulated_scores`: each included canary adds Binomial(T, q) to N(0, T sigma^2), exactly
what a correct step does to a Dirac canary) for several m, with the audit's own tests, so the
bound's dependence on the number of canaries shows in seconds of numpy instead of an audit per m.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from fedgen.audit_bounds import one_run_epsilon_lb_best, one_run_gdp_lb
from fedgen.config import load_config
from fedgen.data.silos import build_silos
from fedgen.data.synthetic import generate_xrays
from fedgen.diffusion import Diffusion
from fedgen.model import build_scheduler, build_unet, count_parameters
from fedgen.privacy.accounting import EpsilonLedger, make_plan
from fedgen.privacy.dp_audit import (
    DpAuditResult,
    DpSgdRecipe,
    audit_dp_sgd,
    gdp_tests,
    simulated_scores,
)

IDEAL_CANARIES = (1000, 2000, 4000, 8000, 16000, 32000)
BROKEN = ("noise/4", "no-clipping")


def plan_recipe(epsilon: float) -> tuple[DpSgdRecipe, int, list[str]]:
    """The default demo's hospital-0 recipe at this target epsilon, its N, and the overrides."""
    overrides = [f"privacy.target_epsilon={epsilon:g}", "model.init=null"]
    cfg = load_config(overrides)
    fed = cfg.federation
    silo = build_silos(cfg)[0]
    plan = make_plan(len(silo.train), cfg.training.batch_size, fed.local_epochs, fed.num_rounds)
    ledger = EpsilonLedger.start(cfg.privacy, plan)
    recipe = DpSgdRecipe(ledger.noise_multiplier, plan.sample_rate, plan.total_steps,
                         cfg.privacy.max_grad_norm, cfg.privacy.delta, cfg.privacy.accountant)
    return recipe, len(silo.train), overrides


def run_model() -> torch.nn.Module:
    cfg = load_config(["model.init=null"])
    torch.manual_seed(0)
    return build_unet(cfg.model, cfg.data.image_size)


def run_audit(recipe: DpSgdRecipe, canaries: int, images: int, broken: str | None = None) -> DpAuditResult:
    cfg = load_config(["model.init=null"])
    unet = run_model()
    xrays = generate_xrays(images, 1, cfg.data.image_size, 1, cfg.data.finding_rate, seed=1).images
    return audit_dp_sgd(unet, Diffusion(build_scheduler(cfg.model)), xrays, recipe, canaries,
                        max_physical_batch_size=cfg.training.max_physical_batch_size, _broken=broken)


def ideal_bounds(recipe: DpSgdRecipe, seed: int = 0) -> list[dict]:
    """The bounds a correct step gives for each m in IDEAL_CANARIES, from simulated scores, with
    the audit's own pre-registered tests."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in IDEAL_CANARIES:
        scores, included = simulated_scores(recipe, m, rng)
        fdp = one_run_gdp_lb(scores, included, recipe.delta, gdp_tests(recipe, m, 0.95))
        steinke = one_run_epsilon_lb_best(scores, included, recipe.delta)
        rows.append({"canaries": m, "epsilon_lb": fdp.epsilon, "epsilon_lb_steinke": steinke.epsilon,
                     "correct": fdp.num_correct, "guesses": fdp.num_guesses})
    return rows


def _summary(result: DpAuditResult) -> dict:
    keep = ("accountant_epsilon", "epsilon_lb", "ratio", "mu_lb", "correct", "guesses", "planned_guesses",
            "epsilon_lb_steinke",
            "correct_steinke", "guesses_steinke", "canaries", "included", "images", "seconds", "verdict")
    d = result.to_dict()
    return {k: d[k] for k in keep}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/dp_audit.json")
    parser.add_argument("--canaries", type=int, default=8000)
    parser.add_argument("--images", type=int, default=64, help="synthetic X-rays trained on with the canaries")
    parser.add_argument("--epsilons", default="8,1", help="target epsilons of the audited plans")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-broken", action="store_true", help="no deliberately broken variants")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="There is a performance drop")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit,
        "load_average_before": os.getloadavg(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": count_parameters(run_model()),
        "plans": {},
    }
    for i, epsilon in enumerate(float(e) for e in args.epsilons.split(",")):
        recipe, n, overrides = plan_recipe(epsilon)
        honest = run_audit(recipe, args.canaries, args.images)
        plan: dict = {"overrides": overrides, "train_images": n, "recipe": honest.to_dict()["recipe"],
                      "honest": _summary(honest), "ideal": ideal_bounds(recipe)}
        _print(f"epsilon {epsilon:g}", honest)
        if i == 0 and not args.skip_broken:
            plan["broken"] = {}
            for name in BROKEN:
                broken = run_audit(recipe, args.canaries, args.images, name)
                plan["broken"][name] = _summary(broken)
                _print(f"  broken ({name})", broken)
        result["plans"][f"{epsilon:g}"] = plan
    result["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def _print(label: str, r: DpAuditResult) -> None:
    print(f"{label}: accountant {r.accountant_epsilon:.3f}, bound {r.epsilon_lb:.3f} "
          f"(ratio {r.epsilon_lb / r.accountant_epsilon:.2f}; {r.correct}/{r.guesses} right), "
          f"distribution-free {r.epsilon_lb_steinke:.3f}, m {r.canaries}, {r.seconds:.0f} s")


if __name__ == "__main__":
    main()
