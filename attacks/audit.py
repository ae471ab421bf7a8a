"""`fedgen attack <run dir>`: measure how much a released global model leaks its hospitals' patients.

Loads the released pipeline and rebuilds the candidates from the run's records (`targets`), runs
every membership attack overall (scores calibrated per hospital) and per hospital, a dataset-level test per hospital, empirical
epsilon lower bounds (and the one-run canary audit when the run has canaries) set against each
hospital's accountant epsilon, and extraction; the white-box DP-SGD audit's result (`fedgen
audit-dp`, dp_audit.json) is copied in when the run has one. Writes `attack.json`, `roc.png`,
`extraction.png`, and adds `attack/...` to the run's TensorBoard.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from attacks.dataset_inference import dataset_inference
from attacks.empirical_epsilon import one_run_epsilon_lb_best
from attacks.extraction import (
    ExtractionConfig,
    by_duplication,
    find_copies,
    generate,
    multiplicity,
    pairs_grid,
    unique_images,
)
from attacks.membership import ATTACKS, build_attack
from attacks.metrics import AttackResult, evaluate_scores
from attacks.reference import REFERENCE_ATTACKS, ReferenceAttackConfig, run_reference_attacks
from attacks.targets import candidates_from_run, load_run_config
from fedgen.config import ConfigError
from fedgen.data.dataset import DataError
from fedgen.data.silos import build_silos
from fedgen.diffusion import sample_images
from fedgen.group_privacy import group_epsilon
from fedgen.model import load_released
from fedgen.run_dir import RunDir, read_json, write_json


class AuditAlarm(RuntimeError):
    """An empirical lower bound above the accountant's epsilon: the implementation is broken."""


@dataclass(frozen=True)
class AuditSettings:
    attacks: tuple[str, ...] = tuple(ATTACKS)
    # The dataset-level test uses one attack fixed in advance: picking the best one on the same
    # images would bias its p-value.
    dataset_attack: str = "loss"
    per_hospital: int | None = None  # members (and as many non-members) per hospital; None = all
    # More non-members, new synthetic patients of the hospitals' scanners (`targets.fresh_nonmembers`):
    # TPR at 1% FPR needs ~1000 non-members to mean something, and a silo holds out tens.
    fresh_nonmembers: int = 0
    batch_size: int = 64
    confidence: float = 0.95
    bootstrap: int = 1000
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    # lira and rmia (not run by default: they train reference models): their statistic, k, population
    reference: ReferenceAttackConfig = field(default_factory=ReferenceAttackConfig)
    seed: int = 0


def accountant_epsilons(run: RunDir) -> dict[int, float]:
    """Each hospital's cumulative epsilon as it reported it (inf without DP)."""
    ledgers = run.read_metrics().get("ledgers", {})
    return {int(h): float(v["epsilon"]) for h, v in ledgers.items()}


def check_attacks(names, setting: str) -> None:
    unknown = [n for n in names if n not in ATTACKS and n not in REFERENCE_ATTACKS]
    if unknown or not names:
        raise ConfigError(f"{setting}: unknown attack {', '.join(map(repr, unknown)) or '(none)'}; "
                          f"known: {', '.join([*ATTACKS, *REFERENCE_ATTACKS])}")


def audit_run(run_dir: str | Path, settings: AuditSettings = AuditSettings(), progress: bool = True, log=print) -> dict:
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise DataError(f"{run.root}: no such run directory")
    if not run.config.exists():
        raise DataError(f"{run.root}: not a fedgen run directory (no config.yaml)")
    if run.selection.exists():
        raise DataError(f"{run.root}: a private selection run (`fedgen select`): its hospitals trained no weights (the release is the public base, reweighted); its samples' leakage (DCR) is in report.md")
    if not (run.pipeline / "model_index.json").exists():
        raise DataError(f"{run.pipeline}: no released model; has the run finished training?")
    check_attacks(settings.attacks, "attacks")
    cfg = load_run_config(run)
    unet, scheduler = load_released(run.root)
    candidates, training = candidates_from_run(run.root, settings.seed, settings.per_hospital, settings.fresh_nonmembers)
    delta = cfg.privacy.delta if cfg.privacy.enabled else 1e-5
    epsilons = accountant_epsilons(run)
    eps_max = max(epsilons.values(), default=math.inf)
    fresh = f" ({settings.fresh_nonmembers} of them fresh patients)" if settings.fresh_nonmembers else ""
    log(f"attacking {run.root.name}: {int(candidates.is_member.sum())} members, "
        f"{int((~candidates.is_member).sum())} non-members{fresh} from {len(set(candidates.hospital))} hospitals")

    scores = {name: build_attack(name).score(unet, scheduler, candidates.images, settings.batch_size, progress)
              for name in settings.attacks if name in ATTACKS}
    queries = {name: build_attack(name).queries_per_image for name in scores}
    reference_info: dict = {}
    if wanted := [n for n in settings.attacks if n in REFERENCE_ATTACKS]:
        found, reference_info = run_reference_attacks(run, cfg, unet, scheduler, candidates.images, training,
                                                      settings.reference, wanted, settings.batch_size, progress, log)
        scores.update(found)
        queries.update({n: 1 if n == "tuned" else reference_info["queries_per_image_target"] for n in found})
        log(f"  reference models: {reference_info['training_seconds']:.0f} s, {reference_info['training_steps']} steps "
            f"({reference_info['from_cache']} of {settings.reference.k} from the cache)")
        if "direction" in reference_info:
            log(f"  lira/rmia statistic {reference_info['statistic']} {reference_info['direction']} "
                f"(p = {reference_info['direction_p_value']:.2g})")
        if tuned := reference_info.get("tuned"):
            log(f"  tuned: the references choose {tuned['statistic']} (their mean TPR at 1% FPR "
                f"{tuned['reference_tpr_at_1pct_fpr'][tuned['statistic']]:.2f})")
    uncalibrated = {name: _evaluate(name, s, candidates.is_member, delta, settings) for name, s in scores.items()}
    overall = {name: _pooled(name, s, uncalibrated[name], candidates, delta, settings) for name, s in scores.items()}
    best = max(overall, key=lambda n: overall[n].auc)
    report: dict = {
        "run": str(run.root),
        "accountant_epsilon": epsilons,
        "delta": delta,
        "best_attack": best,
        "attacks": {n: r.to_dict() for n, r in overall.items()},
        "calibration": "per hospital (scores standardised within each hospital's candidates)",
        "auc_uncalibrated": {n: r.auc for n, r in uncalibrated.items()},
        "queries_per_image": queries,
        "reference_models": reference_info,
        "fresh_nonmembers": settings.fresh_nonmembers,
        "hospitals": {},
    }
    for h in sorted(set(candidates.hospital.tolist())):
        report["hospitals"][h] = _hospital_report(h, scores, candidates, delta, settings, epsilons.get(h, math.inf))
        report["hospitals"][h].update(alarm_epsilon(run, h, epsilons.get(h, math.inf)))
    report["reversed"] = reversed_statistics(overall)
    report["alarms"] = _alarms(overall, report["hospitals"], eps_max)
    single = [n for n in overall if n in ATTACKS]  # the canary audit scores canaries on the target alone
    best_single = max(single, key=lambda n: overall[n].auc) if single else settings.reference.statistic
    report["canary_audit"] = _canary_audit(cfg, unet, scheduler, best_single, delta, settings, epsilons, progress)
    if (run.root / "dp_audit.json").exists():  # `fedgen audit-dp`'s white-box audit of the DP-SGD
        report["dp_audit"] = read_json(run.root / "dp_audit.json")
    for alarm in report["alarms"]:
        log(f"!!! {alarm}")
    heldout = candidates.images[np.flatnonzero(~candidates.is_member)]
    duplicated = {h: n for home in map(run.hospital_home, range(cfg.federation.num_hospitals))
                  for h, n in read_json(home / "records.json").get("duplicated", {}).items()}
    report["extraction"], copies = _extraction(cfg, unet, scheduler, training, heldout, settings.extraction,
                                               progress, duplicated)
    _write(run, report, overall, copies, cfg.federation.num_rounds)
    for name, r in overall.items():
        log(f"  {name:6s} AUC {r.auc:.3f} [{r.auc_ci[0]:.3f}, {r.auc_ci[1]:.3f}]  TPR@1%FPR {r.tpr_at_1pct_fpr:.3f}  "
            f"epsilon lower bound {r.epsilon_lb_clopper_pearson:.2f} (accountant {eps_max:.2f})")
    for name, flipped in report["reversed"].items():
        log(f"  ! {name} runs backwards: its AUC is below chance with 95% confidence, so it carries membership "
            f"signal in the other direction (flipped AUC {flipped:.3f}); read it as a leak, not as safety")
    ex = report["extraction"]
    log(f"  extraction: {ex['num_flagged']} of {ex['num_samples']} samples flagged as copies"
        + (f"; {ex['num_nearer_than_heldout']} nearer a training image than all but "
           f"{settings.extraction.calibration_quantile:.0%} of the non-members are "
           f"({ex['expected_by_chance']:.1f} expected by chance, p = {ex['p_value']:.2g})"
           if ex.get("p_value") is not None else ""))
    dup = ex.get("by_duplication")
    if dup and dup["duplicated_images"]:
        log(f"  extraction: {dup['nearer_than_heldout_duplicated']} of those sit nearest one of the "
            f"{dup['duplicated_images']} duplicated training images ({dup['duplicated_images'] / dup['training_images']:.0%} "
            f"of the {dup['training_images']}), {dup['distinct_duplicated_images_copied']} distinct")
    log(f"wrote {run.root / 'attack.json'}")
    if report["alarms"]:
        raise AuditAlarm("; ".join(report["alarms"]))
    return report


def reversed_statistics(results: dict[str, AttackResult]) -> dict[str, float]:
    """Attacks whose AUC's confidence interval lies wholly below 0.5, with their flipped AUC.
    Such a statistic separates members from non-members, only in the direction opposite to the one
    its paper assumes (PIA on fedgen's small memorising models). Its lower bounds count only the
    stated direction; choosing the direction on the same candidates would bias them, so the
    flipped AUC is reported beside the result, not put in its place."""
    return {n: 1.0 - r.auc for n, r in results.items() if r.auc_ci[1] < 0.5}


def _evaluate(name: str, scores: np.ndarray, is_member: np.ndarray, delta: float, s: AuditSettings) -> AttackResult:
    return evaluate_scores(name, scores, is_member, delta, s.confidence, s.bootstrap, s.seed)


def calibrate_per_hospital(scores: np.ndarray, hospital: np.ndarray) -> np.ndarray:
    """Standardise scores within each hospital: median 0, interquartile range 1.

    Hospitals image differently, so one attack's raw scores live on different scales per hospital
    and a single pooled threshold mixes them up (leak preset: per-hospital AUC 0.99 and 0.93,
    pooled 0.80). The transform uses no membership labels, only the candidates' own scores, which
    an attacker holding candidates from each hospital has.
    """
    out = np.empty_like(scores, dtype=float)
    for h in np.unique(hospital):
        mine = hospital == h
        q25, q50, q75 = np.percentile(scores[mine], [25, 50, 75])
        out[mine] = (scores[mine] - q50) / max(q75 - q25, 1e-12)
    return out


def _pooled(name, scores, uncalibrated: AttackResult, candidates, delta, settings) -> AttackResult:
    """The pooled result on per-hospital calibrated scores. Its epsilon lower bounds stay those of
    the raw scores: the calibration depends on the candidate pool itself, which the bounds'
    independence argument does not cover."""
    calibrated = _evaluate(name, calibrate_per_hospital(scores, candidates.hospital), candidates.is_member, delta, settings)
    return replace(
        calibrated,
        epsilon_lb_clopper_pearson=uncalibrated.epsilon_lb_clopper_pearson,
        epsilon_lb_gdp=uncalibrated.epsilon_lb_gdp,
    )


def _patient_means(scores: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """One score per patient (the mean of its images): patients, not films, are independent."""
    return np.array([scores[patients == p].mean() for p in dict.fromkeys(patients.tolist())])


def _hospital_report(h, scores, candidates, delta, settings, epsilon) -> dict:
    mine = candidates.hospital == h
    member, nonmember = mine & candidates.is_member, mine & ~candidates.is_member
    per_attack = {n: _evaluate(n, s[mine], candidates.is_member[mine], delta, settings) for n, s in scores.items()}
    report = {
        "accountant_epsilon": epsilon,
        "best_attack": max(per_attack, key=lambda n: per_attack[n].auc),
        "auc": {n: r.auc for n, r in per_attack.items()},
        "tpr_at_1pct_fpr": {n: r.tpr_at_1pct_fpr for n, r in per_attack.items()},
        "epsilon_lb": max(r.epsilon_lb_clopper_pearson for r in per_attack.values()),
    }
    if settings.dataset_attack in scores:
        report.update(_dataset_test(scores[settings.dataset_attack], candidates, member, nonmember, settings))
    return report


def _dataset_test(scores, candidates, member, nonmember, settings) -> dict:
    """Dataset inference for one hospital: are its (up to 100) member images' scores higher than
    those of patients known not to be in training? The held-out patients are split at random in
    two: a reference, and a control set that must come out not significant."""
    rng = np.random.default_rng(settings.seed)
    held_patients = rng.permutation(np.unique(candidates.patient[nonmember]))
    half = len(held_patients) // 2
    if half < 2:
        return {"dataset_p_value": math.nan, "dataset_p_value_control": math.nan}
    reference = nonmember & np.isin(candidates.patient, held_patients[:half])
    control = nonmember & np.isin(candidates.patient, held_patients[half:])
    suspect = np.flatnonzero(member)[:100]
    ref = _patient_means(scores[reference], candidates.patient[reference])
    return {
        "dataset_attack": settings.dataset_attack,
        "dataset_size": int(len(suspect)),
        "dataset_p_value": dataset_inference(_patient_means(scores[suspect], candidates.patient[suspect]), ref),
        "dataset_p_value_control": dataset_inference(_patient_means(scores[control], candidates.patient[control]), ref),
    }


def alarm_epsilon(run: RunDir, hospital: int, accountant_epsilon: float) -> dict:
    """The epsilon a hospital's lower bound is held to. A member duplicated k times is protected
    only as a group of its k copies, so with duplicates the bar is the group epsilon of the largest
    copy group (RDP group privacy, from the run's privacy card), not the per-example epsilon:
    holding duplicated candidates to the latter would raise false alarms."""
    copies = 1 + max(read_json(run.hospital_home(hospital) / "records.json").get("duplicated", {}).values(),
                     default=0)
    entry = read_json(run.privacy_card).get("hospitals", {}).get(str(hospital))
    if copies == 1 or not entry or not math.isfinite(accountant_epsilon):
        return {"copies": copies, "alarm_epsilon": accountant_epsilon}
    return {"copies": copies, "alarm_epsilon": group_epsilon(entry["history"], copies, entry["delta"])}


def _alarms(overall: dict[str, AttackResult], hospitals: dict, eps_max: float) -> list[str]:
    alarms = []
    bar = max((rep.get("alarm_epsilon", eps_max) for rep in hospitals.values()), default=eps_max)
    for name, r in overall.items():
        if r.epsilon_lb_clopper_pearson > bar:
            alarms.append(f"{name}: empirical epsilon lower bound {r.epsilon_lb_clopper_pearson:.3f} "
                          f"exceeds the accountant's {bar:.3f}: the privacy implementation is broken")
    for h, rep in hospitals.items():
        held_to = rep.get("alarm_epsilon", rep["accountant_epsilon"])
        if rep["epsilon_lb"] > held_to:
            group = f" (group epsilon of {rep['copies']} copies)" if rep.get("copies", 1) > 1 else ""
            alarms.append(f"hospital {h}: epsilon lower bound {rep['epsilon_lb']:.3f} exceeds its "
                          f"accountant's {held_to:.3f}{group}")
    return alarms


def _canary_audit(cfg, unet, scheduler, attack_name, delta, settings, epsilons, progress) -> dict:
    """One-run audit (Steinke et al. 2023) on each hospital that trained with canaries."""
    if not cfg.audit.canaries:
        return {}
    out = {}
    for silo in build_silos(cfg):
        if silo.canaries is None:
            continue
        scores = build_attack(attack_name).score(unet, scheduler, silo.canaries.images, settings.batch_size, progress)
        bound = one_run_epsilon_lb_best(scores, silo.canary_included, delta, settings.confidence)
        out[silo.hospital] = {
            "attack": attack_name,
            "canaries": len(silo.canaries),
            "included": int(silo.canary_included.sum()),
            "epsilon_lb": bound.epsilon,
            "guesses": bound.num_guesses,
            "correct": bound.num_correct,
            "accountant_epsilon": epsilons.get(silo.hospital, math.inf),
        }
    return out


def _extraction(cfg, unet, scheduler, training, heldout, ex: ExtractionConfig, progress, duplicated: dict[str, int]):
    if ex.num_samples <= 0:
        return {"num_samples": 0, "num_flagged": 0}, None
    shape = (1, cfg.data.image_size, cfg.data.image_size)
    samples = generate(
        lambda noise, gen: sample_images(unet, scheduler, noise, ex.sampling_method, ex.sampling_steps, generator=gen),
        shape,
        ex,
        progress,
    )
    unique = unique_images(training)
    result = find_copies(samples, unique, ex, heldout)
    summary = {k: v for k, v in result.to_dict().items() if not isinstance(v, list) or k.startswith("flagged")}
    summary["median_nearest_distance"] = float(np.median(result.nearest_distance))
    if result.heldout_threshold is not None:
        summary["by_duplication"] = by_duplication(result, multiplicity(unique, duplicated))
    return summary, pairs_grid(samples, unique, result)


def _write(run: RunDir, report: dict, overall: dict[str, AttackResult], copies, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from attacks.plots import roc_figure
    from fedgen.data.images import display_upscale, grid_array, save_grid

    write_json(run.root / "attack.json", report)
    fig = roc_figure(overall, title=f"membership inference: {run.root.name}")
    fig.savefig(run.root / "roc.png", dpi=120)
    with warnings.catch_warnings(), SummaryWriter(log_dir=str(run.tensorboard)) as tb:
        warnings.simplefilter("ignore")
        for name, r in overall.items():
            tb.add_scalar(f"attack/{name}/auc", r.auc, step)
            tb.add_scalar(f"attack/{name}/tpr@1%fpr", r.tpr_at_1pct_fpr, step)
            tb.add_scalar(f"attack/{name}/epsilon_lb", r.epsilon_lb_clopper_pearson, step)
        tb.add_scalar("attack/extraction/flagged", report["extraction"]["num_flagged"], step)
        tb.add_figure("attack/roc", fig, step)
        if copies is not None and len(copies):
            upscale = display_upscale(copies.shape[-1])
            save_grid(copies, run.root / "extraction.png", nrow=8, upscale=upscale)
            tb.add_image("attack/extraction_pairs", grid_array(copies, nrow=8, upscale=upscale), step, dataformats="HWC")
