"""The `tuned` attack: the statistic and the calibration the attacker's reference models choose.

Shadow models used the way Shokri et al. (S&P 2017) first used them, to set the attack up. Every
reference model plays the target in turn, with the population images it trained on as its members
and the rest as its non-members; of every statistic in `GRID` (SimA at a range of timesteps and
norms) under every rule in `RULES`, the one with the best mean TPR at 1% FPR there (ties: AUC) is
then run on the real target. No candidate and no label of the target's takes part, so the choice is
one a real attacker could make. Two rules:

- "raw": the statistic itself. SimA's published t = 50, p = 4 is not where a small memorising model
  leaks most; on the leak preset t = 10, p = 2 does better.
- "in-out": a likelihood ratio of the target's value s(x) (as a log error) between an IN and an OUT
  Gaussian whose means are lines in m(x), the mean of s(x) over the references (all OUT for a
  candidate): s_IN ~ N(a_in + b_in m, sd_in), s_OUT ~ N(a_out + b_out m, sd_out). Both lines are
  fitted on the population, where each image is IN for some references and OUT for others (each
  reference's value against the mean of the others that did not train on the image). Offline LiRA
  (`attacks.reference`) assumes the IN mean is m plus a constant; on these models memorisation pulls
  a member's error towards one floor whatever the image (b_in < b_out), so LiRA's per-image shift
  adds noise to the members' scores and falls below the raw statistic, where the fitted IN line does
  not. This is fedgen's variant, not a published attack.

When a reference plays the target, the lines are fitted on the other references only.
"""

from __future__ import annotations

import numpy as np
import torch

from attacks.membership import build_attack
from attacks.metrics import batched_auc, roc_curve, tpr_at_fpr
from attacks.scores import log_error
from attacks.sima import SimAConfig

GRID = tuple(SimAConfig(timestep=t, p=p) for t in (5, 10, 20, 50, 100) for p in (2, 4))
RULES = ("raw", "in-out")
FPR = 0.01


def label(config: SimAConfig, rule: str) -> str:
    return f"sima t={config.timestep} p={config.p} {rule}"


def out_mean(values: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the mean of `values` [k, P] over the references that did not train on it, and
    whether any did not."""
    count = out.sum(axis=0)
    return (values * out).sum(axis=0) / np.maximum(count, 1), count > 0


def fit_in_out(values: np.ndarray, trained_on: np.ndarray) -> dict[bool, tuple[float, float, float]]:
    """{IN?: (intercept, slope, sd)} of a reference's value on the mean of the other references
    that did not train on the image, over population images [k, P] (log errors)."""
    xs, ys, ins = [], [], []
    for i in range(len(values)):
        others = np.arange(len(values)) != i
        m, ok = out_mean(values[others], ~trained_on[others])
        xs.append(m[ok])
        ys.append(values[i, ok])
        ins.append(trained_on[i, ok])
    x, y, is_in = map(np.concatenate, (xs, ys, ins))
    fits = {}
    for side in (True, False):
        xv, yv = x[is_in == side], y[is_in == side]
        if xv.size < 3:
            raise ValueError("tuned: too few population images IN (or OUT) of a reference to fit its line")
        slope, intercept = np.polyfit(xv, yv, 1)
        fits[side] = (float(intercept), float(slope), max(float((yv - intercept - slope * xv).std()), 1e-12))
    return fits


def in_out_ratio(target: np.ndarray, mean_out: np.ndarray, fits: dict) -> np.ndarray:
    """log N(s; IN line) - log N(s; OUT line) per image; s and the mean as log errors."""
    def log_density(side: bool) -> np.ndarray:
        a, b, sd = fits[side]
        return -0.5 * ((target - a - b * mean_out) / sd) ** 2 - np.log(sd)
    return log_density(True) - log_density(False)


def reference_rates(values: np.ndarray, trained_on: np.ndarray, rule: str) -> tuple[float, float]:
    """(mean TPR at 1% FPR, mean AUC) of one statistic's log errors [k, P] under `rule`, each
    reference judged on the population images it trained on against those it did not."""
    tprs, aucs = [], []
    for j in range(len(values)):
        members, others = trained_on[j], np.arange(len(values)) != j
        scores, usable = values[j], np.ones(len(members), dtype=bool)
        if rule == "in-out":
            mean_out, usable = out_mean(values[others], ~trained_on[others])
            scores = in_out_ratio(values[j], mean_out, fit_in_out(values[others], trained_on[others]))
        scores, members = scores[usable], members[usable]
        if members.all() or not members.any():
            continue
        tprs.append(tpr_at_fpr(roc_curve(scores, members), FPR))
        aucs.append(float(batched_auc(scores[None], members)[0]))
    if not tprs:
        raise ValueError("tuned: no reference holds both population images it trained on and ones it did not")
    return float(np.mean(tprs)), float(np.mean(aucs))


def tuned_scores(unet, scheduler, candidates: torch.Tensor, models: list, trained_on: np.ndarray,
                 population: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, dict]:
    """Scores [N] of the statistic and rule the references choose (k >= 3: the in-out rule fits its
    lines on the references other than the one playing the target), and what the report records:
    the choice and every option's mean TPR and AUC on the references."""
    if len(models) < 3:
        raise ValueError(f"tuned: needs k >= 3 reference models, got {len(models)}")
    on_refs, rates = {}, {}
    for config in GRID:
        attack = build_attack("sima", config)
        on_refs[config] = log_error(np.stack([attack.score(m, scheduler, population, batch_size) for m in models]))
        for rule in RULES:
            rates[(config, rule)] = reference_rates(on_refs[config], trained_on, rule)
    config, rule = max(rates, key=lambda option: rates[option])
    chosen = build_attack("sima", config)
    scores = log_error(chosen.score(unet, scheduler, candidates, batch_size))
    if rule == "in-out":
        on_candidates = log_error(np.stack([chosen.score(m, scheduler, candidates, batch_size) for m in models]))
        scores = in_out_ratio(scores, on_candidates.mean(axis=0), fit_in_out(on_refs[config], trained_on))
    info = {"statistic": label(config, rule), "timestep": config.timestep, "p": config.p, "rule": rule,
            "reference_tpr_at_1pct_fpr": {label(c, r): v[0] for (c, r), v in rates.items()},
            "reference_auc": {label(c, r): v[1] for (c, r), v in rates.items()}}
    return scores, info
