"""Membership inference on a released diffusion model, per image and per dataset.

Threat model: the attacker holds the released noise predictor eps_theta(x_t, t) (a diffusers
`UNet2DModel`, called as `unet(x, t, return_dict=False)[0]`), its schedule (`alphas_cumprod` of a
diffusers DDPM/DDIM scheduler) and candidate images x0 [N, C, H, W] in [-1, 1]. Nothing else: no
optimizer state, no gradients, no training losses, no knowledge of which timesteps or noise the
trainer drew.

Every attack returns one score per image with the `attacks.metrics` convention, HIGHER = MORE LIKELY
A MEMBER (the natural statistics are errors, so they are negated). Names follow the papers:
abar_t = alphas_cumprod[t], x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

- `loss`  (Matsumoto et al. 2023; Hu & Pang 2023): -mean over t and noise draws of
          ||eps_theta(x_t, t) - eps||^2. In `attacks.loss`.
- `pia`   (Kong et al., ICLR 2024): eps0 = eps_theta(x0, 0); x_t built from eps0 instead of random
          noise; -||eps_theta(x_t, t) - eps0||_p^p. Two queries. In `attacks.pia`.
- `pian`  PIA with eps0 rescaled per image to the mean absolute value of a standard normal.
- `secmi` (Duan et al., ICML 2023): deterministic DDIM inversion x0 -> x_{t_sec}, one DDIM step on
          to t_sec + k and back; -||x_{t_sec} - x^_{t_sec}||^2 (SecMI-stat). In `attacks.secmi`.
- `sima`  (Rao et al., TMLR 2025): -||eps_theta(x0, t)||_4^4 at a small t. One query.
          In `attacks.sima`.

This module is the registry (`ATTACKS`, `build_attack`) and `run_attacks`; what the attacks share
(the `MembershipAttack` base class, input checks, seeded noise) is `attacks.membership_base`.

Norms are means over pixels, where the reference code sums: the ranking of same-size images is
the same, and scores stay comparable across image sizes.

Determinism: random noise (only `loss` draws any) is seeded per image from (config seed, a hash of
the image's pixels), so an image's score does not depend on the batch size, the order, or which
other images are scored with it.

Dataset-level inference (one p-value for a hospital's set of images) is in `attacks.dataset_inference`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from attacks.loss import LossAttack
from attacks.membership_base import MembershipAttack, check_images
from attacks.metrics import AttackResult, evaluate_scores
from attacks.pia import PiaAttack, PianAttack
from attacks.secmi import SecMIAttack
from attacks.sima import SimAAttack

ATTACKS: dict[str, type[MembershipAttack[Any]]] = {
    cls.name: cls for cls in (LossAttack, PiaAttack, PianAttack, SecMIAttack, SimAAttack)
}


def build_attack(name: str, config: Any = None) -> MembershipAttack[Any]:
    """The registered attack `name` with `config` (its config dataclass; None = defaults)."""
    if name not in ATTACKS:
        raise KeyError(f"unknown membership attack '{name}'; registered: {sorted(ATTACKS)}")
    return ATTACKS[name](config)


def _json_config(config: Any) -> dict[str, Any]:
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def run_attacks(
    unet: torch.nn.Module,
    scheduler: Any,
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    names: Sequence[str],
    delta: float,
    configs: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    confidence: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, AttackResult]:
    """Run each named attack on members [M,C,H,W] and non-members [N,C,H,W]; evaluate with
    `attacks.metrics.evaluate_scores`.

    Members and non-members must come from the same distribution (split by patient): a shifted
    split inflates the AUC (Dubinski et al., WACV 2024). `configs` maps names to config
    dataclasses (missing = defaults). Each result's `extra` records the config and the queries.
    """
    configs = dict(configs or {})
    unknown = sorted(set(configs) - set(names))
    if unknown:
        raise ValueError(f"configs given for attacks not in names: {unknown}")
    check_images(members)
    check_images(nonmembers)
    if members.shape[1:] != nonmembers.shape[1:]:
        raise ValueError(
            f"members and non-members differ in image shape: {tuple(members.shape[1:])} vs "
            f"{tuple(nonmembers.shape[1:])}"
        )
    images = torch.cat([members, nonmembers])
    is_member = np.r_[np.ones(members.shape[0], bool), np.zeros(nonmembers.shape[0], bool)]
    results = {}
    for name in names:
        attack = build_attack(name, configs.get(name))
        scores = attack.score(unet, scheduler, images, batch_size=batch_size, progress=progress)
        result = evaluate_scores(name, scores, is_member, delta, confidence, bootstrap, seed)
        extra = {
            **result.extra,
            "attack_config": _json_config(attack.config),
            "queries_per_image": attack.queries_per_image,
        }
        results[name] = dataclasses.replace(result, extra=extra)
    return results
