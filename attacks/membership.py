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
          ||eps_theta(x_t, t) - eps||^2.
- `pia`   (Kong et al., ICLR 2024): eps0 = eps_theta(x0, 0); x_t built from eps0 instead of random
          noise; -||eps_theta(x_t, t) - eps0||_p^p. Two queries.
- `pian`  PIA with eps0 rescaled per image to the mean absolute value of a standard normal.
- `secmi` (Duan et al., ICML 2023): deterministic DDIM inversion x0 -> x_{t_sec}, one DDIM step on
          to t_sec + k and back; -||x_{t_sec} - x^_{t_sec}||^2 (SecMI-stat).
- `sima`  (Rao et al., TMLR 2025): -||eps_theta(x0, t)||_4^4 at a small t. One query.

Norms are means over pixels, where the reference code sums: the ranking of same-size images is
the same, and scores stay comparable across image sizes.

Determinism: random noise (only `loss` draws any) is seeded per image from (config seed, a hash of
the image's pixels), so an image's score does not depend on the batch size, the order, or which
other images are scored with it.

Dataset-level inference (one p-value for a hospital's set of images) is in `attacks.dataset_inference`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from attacks.metrics import AttackResult, evaluate_scores
from fedgen.seeding import derive_seed

EpsModel = Callable[[torch.Tensor, int], torch.Tensor]  # (x [B,C,H,W], t) -> eps_theta [B,C,H,W]

# Mean |z| of a standard normal: PIAN rescales eps0 so its mean absolute value matches this.
_MEAN_ABS_NORMAL = math.sqrt(2.0 / math.pi)
# Pixel values may exceed [-1, 1] by rounding in a loader, not by more.
_RANGE_TOLERANCE = 1e-3


def _check_timesteps(timesteps: Sequence[int], setting: str) -> None:
    if len(timesteps) == 0:
        raise ValueError(f"{setting}: need at least one timestep")
    for t in timesteps:
        if not isinstance(t, int) or t < 0:
            raise ValueError(f"{setting}: timesteps must be non-negative ints, got {t!r}")


def _require_positive(value: int | float, setting: str) -> None:
    if value <= 0:
        raise ValueError(f"{setting}: must be > 0, got {value}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss attack. Defaults: intermediate t are the most revealing (Matsumoto et al. 2023, who
    plot AUC against t for T = 1000), so six t from 50 to 300, the range PIA and SecMI work in;
    two fixed-seed draws each (averaging draws lowers the variance, Hu & Pang 2023) give 12
    queries, SecMI's budget. p = 2 is the training loss."""

    timesteps: tuple[int, ...] = (50, 100, 150, 200, 250, 300)
    draws: int = 2  # fixed-seed noise draws per timestep
    p: int = 2  # the loss is ||.||_p^p; 2 is the training loss
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", tuple(self.timesteps))  # Hydra hands over lists
        _check_timesteps(self.timesteps, "loss.timesteps")
        _require_positive(self.draws, "loss.draws")
        _require_positive(self.p, "loss.p")


@dataclasses.dataclass(frozen=True)
class PiaConfig:
    """PIA / PIAN (Kong et al., ICLR 2024). p = 4: `lp=4` in kong13661/PIA `DDPM/components.py`.
    t = 200: the DDPM (T = 1000) setting the project takes from the paper; the repository's driver
    does not fix one, it scans t = 10, 20, ..., 300 (`attack_num=30`, `interval=10`) and prints
    every AUC, i.e. picks t with the labels, which a real attacker cannot."""

    timestep: int = 200
    p: int = 4

    def __post_init__(self) -> None:
        _check_timesteps((self.timestep,), "pia.timestep")
        if self.timestep == 0:
            raise ValueError("pia.timestep: must be > 0 (t = 0 is where eps0 is read)")
        _require_positive(self.p, "pia.p")


@dataclasses.dataclass(frozen=True)
class SecMIConfig:
    """SecMI-stat. Defaults from Duan et al. (ICML 2023) and jinhaoduan/SecMI `secmia.py`
    (`t_sec=100`, `timestep=10`): DDIM inversion in steps of `interval` from 0 to `t_sec`, then
    one step of `k` forward and back: t_sec / interval + 2 = 12 queries. (The reference code stops
    its inversion one interval short, at 90, and steps 90 -> 100 -> 90; we follow the paper's
    t_SEC = 100.)"""

    t_sec: int = 100
    interval: int = 10
    k: int = 10
    p: int = 2

    def __post_init__(self) -> None:
        _require_positive(self.t_sec, "secmi.t_sec")
        _require_positive(self.interval, "secmi.interval")
        _require_positive(self.k, "secmi.k")
        _require_positive(self.p, "secmi.p")
        if self.t_sec % self.interval:
            raise ValueError(
                f"secmi.t_sec: {self.t_sec} is not a multiple of secmi.interval={self.interval}"
            )


@dataclasses.dataclass(frozen=True)
class SimAConfig:
    """SimA (Rao et al., TMLR 2025; mx-ethan-rao/SimA `DDPM/components.py`):
    ||eps_theta(x0, t)||_4^4, one query, p = 4 as in the reference. The paper finds the signal
    strongest at early-to-moderate t; its driver scans t = 0, 10, ..., 200 (README: `attack_num
    20`, `interval 10`) and reports the best AUC, i.e. picks t with the labels. We fix t = 50
    inside that range, chosen before any experiment here (a fixed t is what a real attacker has)."""

    timestep: int = 50
    p: int = 4

    def __post_init__(self) -> None:
        _check_timesteps((self.timestep,), "sima.timestep")
        _require_positive(self.p, "sima.p")


C = TypeVar("C")


class MembershipAttack(ABC, Generic[C]):
    """One attack: a config, a query count, and `score`. Subclasses implement `_score_batch`."""

    name: ClassVar[str]
    config_class: ClassVar[type[Any]]

    def __init__(self, config: C | None = None):
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{self.name}: config must be {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config: C = config

    @property
    @abstractmethod
    def queries_per_image(self) -> int:
        """Forward passes of the model per scored image."""

    @abstractmethod
    def _max_timestep(self) -> int:
        """The largest timestep the attack queries (checked against the schedule)."""

    @abstractmethod
    def _score_batch(
        self, eps: EpsModel, abar: torch.Tensor, x0: torch.Tensor, keys: Sequence[str]
    ) -> torch.Tensor:
        """Scores [B] (higher = member) for x0 [B,C,H,W]; abar [T] float64 on the CPU (read as
        scalars); keys: one pixel hash per image, for seeding its noise."""

    def score(
        self,
        unet: torch.nn.Module,
        scheduler: Any,
        images: torch.Tensor,
        batch_size: int = 64,
        progress: bool = False,
    ) -> np.ndarray:
        """Score images [N,C,H,W] in [-1, 1] against `unet` and `scheduler.alphas_cumprod`.

        Returns float64 [N], higher = more likely a member. Runs on the unet's device, in eval mode
        (restored afterwards), under torch.no_grad().
        """
        _check_images(images)
        _require_positive(batch_size, "batch_size")
        abar_all = torch.as_tensor(scheduler.alphas_cumprod)
        num_t = abar_all.shape[0]
        if self._max_timestep() >= num_t:
            raise ValueError(
                f"{self.name}: timestep {self._max_timestep()} is outside the schedule's "
                f"{num_t} steps"
            )
        device, dtype = _device_and_dtype(unet)
        abar = abar_all.to(device="cpu", dtype=torch.float64)  # float64: not on every device
        keys = [_pixel_key(x) for x in images]
        out = np.empty(images.shape[0], dtype=np.float64)
        was_training = unet.training
        unet.eval()

        def eps(x: torch.Tensor, t: int) -> torch.Tensor:
            t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            return unet(x, t_vec, return_dict=False)[0]

        try:
            with (
                torch.no_grad(),
                tqdm(
                    total=images.shape[0],
                    desc=f"attack/{self.name}",
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                for start in range(0, images.shape[0], batch_size):
                    stop = min(start + batch_size, images.shape[0])
                    x0 = images[start:stop].to(device=device, dtype=dtype)
                    s = self._score_batch(eps, abar, x0, keys[start:stop])
                    out[start:stop] = s.double().cpu().numpy()
                    bar.update(stop - start)
        finally:
            unet.train(was_training)
        return out


def _device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's weights live: its first float parameter, else buffer, else the CPU."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _check_images(images: Any) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images must be [N, C, H, W] with N >= 1, got shape {tuple(images.shape)}"
        )
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN/inf")
    if images.abs().max() > 1 + _RANGE_TOLERANCE:
        raise ValueError(
            f"images must be in [-1, 1] (the model's training range), got max |x| = "
            f"{images.abs().max().item():.3f}"
        )


def _pixel_key(x: torch.Tensor) -> str:
    return hashlib.sha256(
        x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    ).hexdigest()[:16]


def _noise(keys: Sequence[str], seed: int, count: int, like: torch.Tensor) -> torch.Tensor:
    """[B, count, C, H, W] standard normal noise, each image's from its own (seed, key) stream."""
    shape = (count, *like.shape[1:])
    draws = [
        torch.randn(
            shape, generator=torch.Generator().manual_seed(derive_seed("membership", seed, k))
        )
        for k in keys
    ]
    return torch.stack(draws).to(device=like.device, dtype=like.dtype)


def _q_sample(x0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, abar_t a float64 scalar tensor."""
    a, b = abar_t.sqrt().item(), (1 - abar_t).sqrt().item()
    return a * x0 + b * eps


def _lp(d: torch.Tensor, p: int) -> torch.Tensor:
    """Mean over pixels of |d|^p: [B, ...] -> [B]."""
    return d.abs().pow(p).flatten(1).mean(dim=1)


def _ddim_step(
    eps: EpsModel, x: torch.Tensor, t_from: int, t_to: int, abar: torch.Tensor
) -> torch.Tensor:
    """One deterministic DDIM (eta = 0) step x_{t_from} -> x_{t_to}, either direction: predict x0
    from eps_theta(x, t_from), then re-noise it with the same eps (SecMI's `ddim_singlestep`)."""
    e = eps(x, t_from)
    a_from, a_to = abar[t_from], abar[t_to]
    x0_pred = (x - (1 - a_from).sqrt().item() * e) / a_from.sqrt().item()
    return a_to.sqrt().item() * x0_pred + (1 - a_to).sqrt().item() * e


class LossAttack(MembershipAttack[LossConfig]):
    name = "loss"
    config_class = LossConfig

    @property
    def queries_per_image(self) -> int:
        return len(self.config.timesteps) * self.config.draws

    def _max_timestep(self) -> int:
        return max(self.config.timesteps)

    def _score_batch(
        self, eps: EpsModel, abar: torch.Tensor, x0: torch.Tensor, keys: Sequence[str]
    ) -> torch.Tensor:
        cfg = self.config
        noise = _noise(keys, cfg.seed, self.queries_per_image, x0)  # [B, T*K, C, H, W]
        total = torch.zeros(x0.shape[0], dtype=torch.float32, device=x0.device)
        for j, t in enumerate(t for t in cfg.timesteps for _ in range(cfg.draws)):
            e = noise[:, j]
            total += _lp(eps(_q_sample(x0, e, abar[t]), t) - e, cfg.p).float()
        return -total / self.queries_per_image


class PiaAttack(MembershipAttack[PiaConfig]):
    name = "pia"
    config_class = PiaConfig

    @property
    def queries_per_image(self) -> int:
        return 2

    def _max_timestep(self) -> int:
        return self.config.timestep

    def _eps0(self, eps: EpsModel, x0: torch.Tensor) -> torch.Tensor:
        return eps(x0, 0)

    def _score_batch(
        self, eps: EpsModel, abar: torch.Tensor, x0: torch.Tensor, keys: Sequence[str]
    ) -> torch.Tensor:
        t = self.config.timestep
        eps0 = self._eps0(eps, x0)
        return -_lp(eps(_q_sample(x0, eps0, abar[t]), t) - eps0, self.config.p)


class PianAttack(PiaAttack):
    """PIAN: eps0 / mean|eps0| * sqrt(2/pi) per image (kong13661/PIA `PIAN.ddim_reverse`), so its
    first absolute moment is a standard normal's. Kong et al. find it weaker than PIA on DDPM."""

    name = "pian"

    def _eps0(self, eps: EpsModel, x0: torch.Tensor) -> torch.Tensor:
        e = eps(x0, 0)
        scale = e.abs().flatten(1).mean(dim=1).clamp_min(torch.finfo(e.dtype).tiny)
        return e / scale.reshape(-1, *([1] * (e.ndim - 1))) * _MEAN_ABS_NORMAL


class SecMIAttack(MembershipAttack[SecMIConfig]):
    name = "secmi"
    config_class = SecMIConfig

    @property
    def queries_per_image(self) -> int:
        return self.config.t_sec // self.config.interval + 2

    def _max_timestep(self) -> int:
        return self.config.t_sec + self.config.k

    def _score_batch(
        self, eps: EpsModel, abar: torch.Tensor, x0: torch.Tensor, keys: Sequence[str]
    ) -> torch.Tensor:
        cfg = self.config
        x = x0
        for t in range(0, cfg.t_sec, cfg.interval):
            x = _ddim_step(eps, x, t, t + cfg.interval, abar)
        ahead = _ddim_step(eps, x, cfg.t_sec, cfg.t_sec + cfg.k, abar)
        back = _ddim_step(eps, ahead, cfg.t_sec + cfg.k, cfg.t_sec, abar)
        return -_lp(x - back, cfg.p)


class SimAAttack(MembershipAttack[SimAConfig]):
    name = "sima"
    config_class = SimAConfig

    @property
    def queries_per_image(self) -> int:
        return 1

    def _max_timestep(self) -> int:
        return self.config.timestep

    def _score_batch(
        self, eps: EpsModel, abar: torch.Tensor, x0: torch.Tensor, keys: Sequence[str]
    ) -> torch.Tensor:
        return -_lp(eps(x0, self.config.timestep), self.config.p)


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
    _check_images(members)
    _check_images(nonmembers)
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
