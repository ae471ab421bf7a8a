"""The loss attack (Matsumoto et al. 2023; Hu & Pang 2023): minus the mean over timesteps t and
fixed-seed noise draws eps of ||eps_theta(x_t, t) - eps||_p^p, the training loss. The only
membership attack here that draws noise; it is seeded per image (`membership_base.seeded_noise`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from attacks.membership_base import (
    EpsModel,
    MembershipAttack,
    check_timesteps,
    lp,
    q_sample,
    require_positive,
    seeded_noise,
)


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
        check_timesteps(self.timesteps, "loss.timesteps")
        require_positive(self.draws, "loss.draws")
        require_positive(self.p, "loss.p")


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
        noise = seeded_noise(keys, cfg.seed, self.queries_per_image, x0)  # [B, T*K, C, H, W]
        total = torch.zeros(x0.shape[0], dtype=torch.float32, device=x0.device)
        for j, t in enumerate(t for t in cfg.timesteps for _ in range(cfg.draws)):
            e = noise[:, j]
            total += lp(eps(q_sample(x0, e, abar[t]), t) - e, cfg.p).float()
        return -total / self.queries_per_image
