"""What every membership attack shares: the `MembershipAttack` base class (a config, a query
count, and `score`, which runs the released UNet over candidate images batch by batch), the checks
of its inputs, per-image seeded noise and the formulas the attacks are written in.

Conventions are `attacks.membership`'s: eps_theta(x_t, t) is `unet(x, t, return_dict=False)[0]`,
images x0 [N, C, H, W] in [-1, 1], abar_t = alphas_cumprod[t], higher score = more likely a member.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from fedgen.seeding import derive_seed

EpsModel = Callable[[torch.Tensor, int], torch.Tensor]  # (x [B,C,H,W], t) -> eps_theta [B,C,H,W]

# Pixel values may exceed [-1, 1] by rounding in a loader, not by more.
_RANGE_TOLERANCE = 1e-3


def check_timesteps(timesteps: Sequence[int], setting: str) -> None:
    if len(timesteps) == 0:
        raise ValueError(f"{setting}: need at least one timestep")
    for t in timesteps:
        if not isinstance(t, int) or t < 0:
            raise ValueError(f"{setting}: timesteps must be non-negative ints, got {t!r}")


def require_positive(value: int | float, setting: str) -> None:
    if value <= 0:
        raise ValueError(f"{setting}: must be > 0, got {value}")


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
        check_images(images)
        require_positive(batch_size, "batch_size")
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


def check_images(images: Any) -> None:
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


def seeded_noise(keys: Sequence[str], seed: int, count: int, like: torch.Tensor) -> torch.Tensor:
    """[B, count, C, H, W] standard normal noise, each image's from its own (seed, key) stream."""
    shape = (count, *like.shape[1:])
    draws = [
        torch.randn(
            shape, generator=torch.Generator().manual_seed(derive_seed("membership", seed, k))
        )
        for k in keys
    ]
    return torch.stack(draws).to(device=like.device, dtype=like.dtype)


def q_sample(x0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, abar_t a float64 scalar tensor."""
    a, b = abar_t.sqrt().item(), (1 - abar_t).sqrt().item()
    return a * x0 + b * eps


def lp(d: torch.Tensor, p: int) -> torch.Tensor:
    """Mean over pixels of |d|^p: [B, ...] -> [B]."""
    return d.abs().pow(p).flatten(1).mean(dim=1)
