"""Reference-model membership attacks on a diffusion model: offline LiRA and offline RMIA.

Both calibrate one per-image statistic s (any single-model attack of `attacks.membership`: loss,
SimA, PIA(N), SecMI) per candidate, by its values on reference models that never saw the
candidate (`attacks.reference_models` trains them on the attacker's population). Inputs are score
arrays only; higher = more likely a member, as everywhere in `attacks.metrics`.

- LiRA, offline (Carlini et al., S&P 2022): s is first mapped to minus the log of the error it
  negates (errors are positive and skewed, like the confidences LiRA logit-scales), then a Gaussian
  N(mu_x, sigma^2) is fitted to candidate x's values on the k OUT references: mu_x per example,
  sigma global (pooled over candidates; the paper's choice with few references) or per example.
  Score: -log of the one-sided p-value Pr[N(mu_x, sigma^2) >= s_target(x)].
- RMIA, offline (Zarifzadeh et al., ICML 2024): log Pr(x|theta) = the same log-error statistic,
  divided by its spread over the population on the references and shifted to be <= 0 (a likelihood
  up to a temperature: the statistics are not probabilities); LR(x) = Pr(x|target) / Pr(x), with
  Pr(x) the OUT references' mean completed for the missing IN models by the paper's linear
  approximation Pr(x) = ((1 + a) Pr_OUT(x) + 1 - a) / 2, a chosen on the references (`tune_a`).
  Score: the fraction of population samples z (population images, which the target never saw,
  with at least one OUT reference) with LR(x) / LR(z) > gamma, ties broken by LR(x).

Direction. Both assume that training on x raises s(x). For a statistic that runs the other way on
these models (SecMI and sometimes PIA on fedgen's small memorising models), that assumption would
make the calibrated attack run backwards too. The references say which way it runs, without the
target's labels: every population image is IN for some references and OUT for others, so the sign
of its IN-minus-OUT gap, taken over the population (`statistic_direction`), gives the direction,
and s is flipped before calibration when most gaps are negative. With few references and a weak
statistic the gaps are noise: the report gives their binomial p-value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit, logsumexp
from scipy.stats import binomtest, norm

from attacks.membership import ATTACKS, build_attack
from attacks.metrics import batched_auc
from attacks.reference_models import (
    ReferenceSet,
    check_disjoint,
    population_images,
    recipe_from_config,
    train_references,
)
from attacks.scores import log_error
from attacks.tuned import tuned_scores
from fedgen.base_model import initial_unet, weights_hash
from fedgen.config import ConfigError, ExperimentConfig
from fedgen.data.dataset import DataError
from fedgen.run_dir import RunDir, read_json

REFERENCE_ATTACKS = ("lira", "rmia", "tuned")  # tuned: the statistic the references choose (`attacks.tuned`)
A_GRID = tuple(i / 10 for i in range(11))  # RMIA's a: the values `tune_a` tries


@dataclass(frozen=True)
class ReferenceAttackConfig:
    """statistic: the single-model attack both calibrate; k: reference models; population: "public"
    (public-archive patients), "hospitals" (synthetic patients on the hospitals' scanners) or an
    image folder; population_size: None = twice the federation's training images; a, gamma: RMIA's
    offline parameter and threshold; global_std: LiRA's sigma pooled over candidates (else per
    example; needs k >= 2); cache_dir: None = <run>/reference_models."""

    statistic: str = "sima"  # one query per model; the strongest calibrated statistic in tests/test_reference_attacks.py
    k: int = 4
    population: str = "public"
    population_size: int | None = None
    a: float | None = None  # None: tuned on the references (`tune_a`)
    gamma: float = 1.0
    global_std: bool = True
    cache_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.statistic not in ATTACKS:
            raise ConfigError(f"reference attacks: statistic {self.statistic!r} is not a single-model attack; "
                              f"known: {', '.join(ATTACKS)}")
        if self.k < 1:
            raise ConfigError(f"reference attacks: k must be >= 1, got {self.k}")
        if self.a is not None and not 0.0 <= self.a <= 1.0:
            raise ValueError(f"rmia: a must be in [0, 1], got {self.a}")
        if self.gamma <= 0:
            raise ValueError(f"rmia: gamma must be > 0, got {self.gamma}")
        if self.a is None and self.k < 2:
            raise ConfigError("rmia: tuning a on the references needs k >= 2; with one reference, set a")
        if not self.global_std and self.k < 2:
            raise ValueError("lira: a per-example std needs k >= 2 references")


def _check(target: np.ndarray, ref: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    target, ref = np.asarray(target, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ref.ndim != 2 or target.shape != ref.shape[1:]:
        raise ValueError(f"{what}: target scores [N] and reference scores [k, N] expected, got "
                         f"{target.shape} and {ref.shape}")
    if not (np.isfinite(target).all() and np.isfinite(ref).all()):
        raise ValueError(f"{what}: scores contain NaN or inf")
    return target, ref


def statistic_direction(pop_ref: np.ndarray, trained_on: np.ndarray) -> tuple[float, float, int]:
    """(+1 or -1, the share of images it holds for, how many images): does training on an image
    raise the statistic?

    pop_ref [k, P]: each reference's scores on the population; trained_on [k, P]: which images it
    trained on. Per image with both IN and OUT references, the mean of its (log-error) statistic on
    the IN references is set against that on the OUT ones: paired, so each image is its own control
    and how hard an image is cancels out, as it does in LiRA and RMIA. No label of the target's
    candidates is used."""
    pop_ref, trained_on = np.asarray(pop_ref, dtype=np.float64), np.asarray(trained_on, dtype=bool)
    if pop_ref.shape != trained_on.shape or pop_ref.ndim != 2:
        raise ValueError(f"direction: scores and membership must both be [k, P], got {pop_ref.shape}, {trained_on.shape}")
    both = trained_on.any(axis=0) & (~trained_on).any(axis=0)
    if not both.any():
        raise ValueError("direction: no population image is IN for one reference and OUT for another "
                         "(train more references, or on a smaller share of the population)")
    s, m = log_error(pop_ref)[:, both], trained_on[:, both]
    gap = (s * m).sum(axis=0) / m.sum(axis=0) - (s * ~m).sum(axis=0) / (~m).sum(axis=0)
    raised = float((gap > 0).mean() + 0.5 * (gap == 0).mean())
    return (1.0 if raised >= 0.5 else -1.0), raised, int(both.sum())


def lira_offline(target: np.ndarray, ref_out: np.ndarray, direction: float = 1.0, global_std: bool = True) -> np.ndarray:
    """Offline LiRA scores [N] from target scores [N] and OUT reference scores [k, N]."""
    target, ref_out = _check(target, ref_out, "lira")
    if not global_std and ref_out.shape[0] < 2:
        raise ValueError("lira: a per-example std needs k >= 2 references")
    both = log_error(np.concatenate([target[None], ref_out]))
    t, r = direction * both[0], direction * both[1:]
    mu = r.mean(axis=0)
    if global_std:
        spread = r - mu if r.shape[0] > 1 else r - r.mean()  # one reference: spread over candidates
        sigma = np.full_like(mu, max(float(spread.std()), 1e-12))
    else:
        sigma = np.maximum(r.std(axis=0, ddof=1), 1e-12)
    return -norm.logsf((t - mu) / sigma)


def _pr_ref_offline(ref_out: np.ndarray, out_mask: np.ndarray, a: float) -> np.ndarray:
    """log of ((1 + a) Pr_OUT + 1 - a) / 2, Pr_OUT the mean of exp(s) over the OUT references."""
    counts = out_mask.sum(axis=0)
    if (counts == 0).any():
        raise ValueError("rmia: an image has no OUT reference model")
    log_out = logsumexp(np.where(out_mask, ref_out, -np.inf), axis=0) - np.log(counts)
    return np.logaddexp(np.log1p(a) + log_out, np.log(max(1.0 - a, 1e-300))) - np.log(2.0)


def rmia_offline(target_x: np.ndarray, ref_x: np.ndarray, target_z: np.ndarray, ref_z: np.ndarray,
                 z_out: np.ndarray | None = None, direction: float = 1.0, a: float = 0.3,
                 gamma: float = 1.0, x_out: np.ndarray | None = None) -> np.ndarray:
    """Offline RMIA scores [N] in [0, 1 + 1/(Z + 1)).

    target_x [N], ref_x [k, N]: candidates on the target and on the references (all OUT);
    target_z [Z], ref_z [k, Z]: population samples; z_out [k, Z] which references did not train
    on each z (None: none did); x_out [k, N] likewise for the candidates (None: none did)."""
    target_x, ref_x = _check(target_x, ref_x, "rmia (candidates)")
    target_z, ref_z = _check(target_z, ref_z, "rmia (population)")
    if ref_x.shape[0] != ref_z.shape[0]:
        raise ValueError(f"rmia: {ref_x.shape[0]} references for the candidates, {ref_z.shape[0]} for z")
    z_out = np.ones(ref_z.shape, dtype=bool) if z_out is None else np.asarray(z_out, dtype=bool)
    if z_out.shape != ref_z.shape:
        raise ValueError(f"rmia: z_out must be {ref_z.shape}, got {z_out.shape}")
    # log Pr(x|theta): the direction-adjusted log error, on the scale of the spread between
    # population images (so that it, not the statistic's units, sets how far Pr falls below 1 and
    # with it the weight of the (1 - a) term), shifted to be <= 0.
    values = [direction * log_error(v) for v in (target_x, ref_x, target_z, ref_z)]
    scale = max(float(values[3].std()), 1e-12)
    top = max(float(v.max()) for v in values)
    tx, rx, tz, rz = ((v - top) / scale for v in values)
    x_out = np.ones(rx.shape, dtype=bool) if x_out is None else np.asarray(x_out, dtype=bool)
    log_lr_x = tx - _pr_ref_offline(rx, x_out, a)
    log_lr_z = tz - _pr_ref_offline(rz, z_out, a)
    fraction = (log_lr_x[:, None] - log_lr_z[None, :] > np.log(gamma)).mean(axis=1)
    # The fraction takes Z + 1 values, so with few z many candidates tie at 1 and the low-FPR end
    # of the ROC is lost. It is a non-decreasing function of LR(x), which breaks the ties without
    # changing any strict order: expit(.) / (Z + 1) < 1 / Z, the gap between two fractions.
    return fraction + expit(log_lr_x) / (len(tz) + 1)


def reference_attack_scores(unet, scheduler, candidates: torch.Tensor, refs: ReferenceSet, population: torch.Tensor,
                            config: ReferenceAttackConfig, names=REFERENCE_ATTACKS, batch_size: int = 64,
                            progress: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """{name: scores [N]} for the reference attacks `names` on candidates [N,1,H,W], and what the
    report records (the statistic, its learned direction, the queries)."""
    unknown = [n for n in names if n not in REFERENCE_ATTACKS]
    if unknown:
        raise ValueError(f"unknown reference attack(s) {unknown}; known: {list(REFERENCE_ATTACKS)}")
    started = time.perf_counter()
    scores, info = {}, {}
    if "tuned" in names:
        scores["tuned"], info["tuned"] = tuned_scores(unet, scheduler, candidates, refs.models, refs.trained_on,
                                                      population, batch_size)
    if "lira" not in names and "rmia" not in names:
        return scores, {**info, "scoring_seconds": time.perf_counter() - started}
    stat = build_attack(config.statistic)
    images = torch.cat([candidates, population])
    on_target = stat.score(unet, scheduler, images, batch_size, progress)
    on_refs = np.stack([stat.score(m, scheduler, images, batch_size, progress) for m in refs.models])
    n = len(candidates)
    direction, share, count = statistic_direction(on_refs[:, n:], refs.trained_on)
    z = (~refs.trained_on).any(axis=0)  # population samples with at least one OUT reference
    if "lira" in names:
        scores["lira"] = lira_offline(on_target[:n], on_refs[:, :n], direction, config.global_std)
    a = config.a
    if "rmia" in names:
        if a is None:
            a, _ = tune_a(on_refs[:, n:], refs.trained_on, direction, config.gamma)
        scores["rmia"] = rmia_offline(on_target[:n], on_refs[:, :n], on_target[n:][z], on_refs[:, n:][:, z],
                                      ~refs.trained_on[:, z], direction, a, config.gamma)
    info |= {
        "statistic": config.statistic,
        "direction": "as published" if direction > 0 else "flipped (the references' members score lower)",
        # share of population images whose error falls when a reference trains on them, and the
        # binomial p-value against 1/2: a large one means the references cannot tell the direction
        "direction_share": share,
        "direction_p_value": float(binomtest(round(share * count), count).pvalue),
        "queries_per_image_target": stat.queries_per_image,
        "queries_per_image_total": stat.queries_per_image * (1 + len(refs.models)),
        "population_samples_z": int(z.sum()),
        "a": a,
        "scoring_seconds": time.perf_counter() - started,
    }
    return scores, info


def run_reference_attacks(run: RunDir, cfg: ExperimentConfig, unet, scheduler, candidates: torch.Tensor,
                          training: torch.Tensor, config: ReferenceAttackConfig, names=REFERENCE_ATTACKS,
                          batch_size: int = 64, progress: bool = False, log=print) -> tuple[dict[str, np.ndarray], dict]:
    """Train (or load) the references for a released run, then score its candidates [N,1,H,W].
    `training` [M,1,H,W]: every image the hospitals trained on; the population must avoid both."""
    records = [read_json(h / "records.json") for h in run.hospital_homes()]
    if not records:
        raise FileNotFoundError(f"{run.root}: no hospitals/*/records.json; the references need the silo sizes")
    # Which images a hospital repeated stays with it; how many, and how often, the config says too.
    repeats = tuple((len(r.get("duplicated", {})), max(r.get("duplicated", {}).values(), default=0)) for r in records)
    recipe = recipe_from_config(cfg, tuple(int(r["train_size"]) for r in records), repeats)
    size = config.population_size or 2 * recipe.train_size
    population = population_images(cfg, size, config.population).images
    check_disjoint(population, candidates, "candidates")
    check_disjoint(population, training, "hospitals' training images")
    init = initial_unet(cfg, run.root.parent)  # the released config's starting weights
    recorded = read_json(run.base).get("weights_sha256")
    if recorded and weights_hash(init.state_dict()) != recorded:
        raise DataError(f"{run.base}: the run started from other weights than its config's model.init gives "
                        "here; the references would not share the target's start")
    cache = Path(config.cache_dir) if config.cache_dir else run.root / "reference_models"
    log(f"reference models: {config.k} x {recipe.num_rounds} rounds x {len(records)} pseudo-hospitals on "
        f"{recipe.train_size} of {size} '{config.population}' population images (cache {cache})")
    refs = train_references(init, scheduler, population, recipe, config.k, cache, config.seed, log)
    scores, info = reference_attack_scores(unet, scheduler, candidates, refs, population, config, names,
                                           batch_size, progress)
    info.update({"k": config.k, "population": config.population, "population_size": size,
                 "fingerprint": refs.fingerprint, "cache": str(refs.home), "training_seconds": refs.seconds,
                 "training_steps": refs.steps, "from_cache": refs.cached, "gamma": config.gamma})
    return scores, info


def tune_a(pop_ref: np.ndarray, trained_on: np.ndarray, direction: float, gamma: float = 1.0,
           grid: tuple[float, ...] = A_GRID) -> tuple[float, dict[float, float]]:
    """RMIA's a, chosen on the references alone: each reference in turn plays the
    target, the others its references, the population its candidates (IN or OUT of it, known) and
    its z (those OUT of it); a is the grid value of the best mean AUC. Needs k >= 2."""
    pop_ref, trained_on = np.asarray(pop_ref, dtype=np.float64), np.asarray(trained_on, dtype=bool)
    k = pop_ref.shape[0]
    if k < 2:
        raise ValueError("rmia: tuning a needs k >= 2 references (or set a)")
    aucs: dict[float, list[float]] = {float(a): [] for a in grid}
    for j in range(k):
        others = np.arange(k) != j
        ref, out = pop_ref[others], ~trained_on[others]
        usable = out.any(axis=0)
        label = trained_on[j] & usable
        z = usable & ~trained_on[j]
        if label.sum() == 0 or z.sum() < 2:
            continue
        for a in aucs:
            scores = rmia_offline(pop_ref[j, usable], ref[:, usable], pop_ref[j, z], ref[:, z], out[:, z],
                                  direction, a, gamma, out[:, usable])
            aucs[a].append(float(batched_auc(scores[None], label[usable])[0]))
    if not any(aucs.values()):
        raise ValueError("rmia: no reference has both IN and OUT population images to tune a on")
    mean = {a: float(np.mean(v)) for a, v in aucs.items()}
    return max(mean, key=lambda a: (mean[a], a)), mean
