"""Private selection: adapt the public base to the hospitals by reweighting its samples, not by
changing its weights.

DP-SGD on 64 images a hospital moves a base's 267k weights mostly by its noise (a step's signal to
noise ratio is about 0.001 at epsilon 8; README, issue 13). Private Evolution (Lin et al., ICLR 2024;
one of DPImageBench's methods) asks the private data a far smaller question: which of the public
model's samples look like it. Here, in its simplest form (one round, votes pooled into clusters):

1. The public pool: samples of the base model from a public seed, clustered (k-means, pixel space)
   into K cells. Both are public: every party can draw them again.
2. Each hospital's vote: each of its training images adds 1 to the count of the cell of its nearest
   pool sample. Adding
   or removing one image changes one count by 1, so the counts have L2 sensitivity 1.
3. The hospital adds N(0, sigma^2) to every count from its secret randomness (`randomness`) before
   the counts leave it: the Gaussian mechanism, one release at q = 1, accounted with Opacus's RDP
   as one DP-SGD step of noise multiplier sigma would be (`selection_epsilon`).
4. The coordinator sums the hospitals' noisy counts; the weight of a cell is its sum clamped at 0
   (post-processing). The released model is the base with these weights: it draws from the base
   and keeps a sample with probability weight(cell) / max weight (rejection sampling).

K is set from public quantities before any vote (`cluster_count`): each cell should expect votes
well above the summed noise, else the weights are noise; no held-out image picks it.
What it cannot do: draw what the base never draws. It moves the base's mix of styles and
anatomies towards the hospitals', and nothing finer than a cell.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from sklearn.cluster import KMeans

from fedgen.privacy.randomness import Randomness

VOTES_PER_NOISE = 3.0  # a cell's expected votes over the summed noise's standard deviation
# Opacus's default RDP orders stop at 63; a single release's best order is about
# 1 + sigma * sqrt(2 ln(1/delta)), beyond 63 at small epsilon (sigma 15 for epsilon 0.3). These
# reach 1000, and every order added can only tighten the bound (the minimum over more orders).
ORDERS = [1 + x / 20 for x in range(1, 100)] + [float(a) for a in range(6, 64)] + [64.0 * 1.1**i for i in range(1, 30)]


def selection_noise_multiplier(epsilon: float, delta: float) -> float:
    """The sigma of one Gaussian release of sensitivity 1 that spends (epsilon, delta) (RDP)."""
    if not (epsilon > 0 and 0 < delta < 1):
        raise ValueError(f"need epsilon > 0 and 0 < delta < 1, got epsilon {epsilon}, delta {delta}")
    return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=1,
                                accountant="rdp", epsilon_tolerance=0.001, alphas=ORDERS)


def selection_epsilon(sigma: float, delta: float) -> float:
    """The epsilon of one Gaussian release of sensitivity 1 with noise sigma (Opacus's RDP)."""
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, 1)]
    return accountant.get_epsilon(delta, alphas=ORDERS)


def cluster_count(num_votes: int, sigma: float, hospitals: int, pool_size: int) -> int:
    """K such that a cell expects VOTES_PER_NOISE times the summed noise's sd (sigma * sqrt(H)),
    at least 2 and at most a tenth of the pool. Public: silo sizes are (DP-SGD's q uses them too)."""
    noise = sigma * math.sqrt(hospitals)
    by_noise = num_votes / (VOTES_PER_NOISE * noise) if noise > 0 else num_votes / VOTES_PER_NOISE
    return int(max(2, min(by_noise, pool_size // 10)))


class PublicCells:
    """The public pool's cells: `labels[i]` is the cell of pool sample i. An image belongs to the
    cell of its nearest pool sample (Private Evolution's vote for the nearest sample, pooled by
    cell): on three tuning federations this beat the nearest centre (README)."""

    def __init__(self, pool: torch.Tensor, labels: torch.Tensor):
        labels = torch.as_tensor(labels).long()
        if labels.shape != (len(pool),):
            raise ValueError(f"{len(pool)} pool samples but labels of shape {tuple(labels.shape)}")
        if len(pool) == 0 or int(labels.min()) < 0 or not bool(torch.isfinite(pool).all()):
            raise ValueError("the pool must be non-empty and finite, its labels >= 0")
        self.pool, self.labels = torch.from_numpy(_flat(pool)), labels
        self.k, self.image_shape = int(labels.max()) + 1, tuple(pool.shape[1:])

    @classmethod
    def fit(cls, pool: torch.Tensor, k: int, seed: int = 0) -> PublicCells:
        """K cells by k-means over the pool in pixel space."""
        if not 2 <= k <= len(pool):
            raise ValueError(f"need 2 <= K <= pool size ({len(pool)}), got K={k}")
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(_flat(pool))
        return cls(pool, torch.from_numpy(labels))

    def cell_of(self, images: torch.Tensor) -> torch.Tensor:
        """The cell of each image [N] (long): that of its nearest pool sample."""
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images of shape {tuple(images.shape[1:])}; the cells are of {self.image_shape}")
        if len(images) == 0:
            return torch.zeros(0, dtype=torch.long)
        return self.labels[torch.cdist(torch.from_numpy(_flat(images)), self.pool).argmin(dim=1)].long()

    def votes(self, images: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """[K] float64: how many of `images` fall in each cell (each counted `weights[i]`, default 1).
        An empty silo votes zeros."""
        w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        return torch.bincount(self.cell_of(images), weights=w, minlength=self.k).double()


def unit_weights(units: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """Patient-level selection: each of a patient's k images votes 1/k, so one patient moves the
    counts by at most 1 in L1, hence in L2 (the sensitivity the noise is calibrated for).
    `units`: each image's patient index (`privacy_units`); None: example level, each votes 1."""
    if units is None:
        return None
    units = torch.as_tensor(units).long()
    if units.shape != (count,):
        raise ValueError(f"{tuple(units.shape)} unit ids for {count} images")
    _, inverse, sizes = torch.unique(units, return_inverse=True, return_counts=True)
    return 1.0 / sizes[inverse].double()


def _flat(images: torch.Tensor) -> np.ndarray:
    return images.reshape(len(images), -1).float().numpy()


def noisy_votes(votes: torch.Tensor, sigma: float, randomness: Randomness) -> torch.Tensor:
    """A hospital's release: its votes plus N(0, sigma^2) each, from its secret randomness."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 for a private release, got {sigma}")
    return votes + randomness.gaussian(votes, sigma)


def cell_weights(released: list[torch.Tensor]) -> torch.Tensor:
    """The coordinator's weights [K]: the hospitals' released counts summed, clamped at 0, scaled to
    a maximum of 1 (all 0: uniform, the base itself)."""
    total = torch.stack(released).sum(dim=0).clamp(min=0)
    return total / total.max() if total.max() > 0 else torch.ones_like(total)


def sample_selected(
    draw: Callable[[int, int], torch.Tensor], cells: PublicCells, weights: torch.Tensor, num_samples: int,
    generator: torch.Generator, batch_size: int = 256, max_draws: int = 100_000,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Rejection sampling: `draw(n, batch_index)` gives n fresh base samples; each is kept with
    probability weights[its cell]. Returns (num_samples images, how many were drawn).
    `progress(kept, drawn)` is told after every batch."""
    kept, count, drawn, batch = [], 0, 0, 0
    while count < num_samples:
        if drawn >= max_draws:
            raise RuntimeError(f"{drawn} base samples gave {count} of {num_samples}: "
                               "the weighted cells are ones the base rarely draws")
        images = draw(batch_size, batch)
        if len(images) == 0:
            raise RuntimeError(f"the base drew no images for batch {batch}")
        accept = torch.rand(len(images), generator=generator) < weights[cells.cell_of(images)].float()
        kept.append(images[accept])
        count += int(accept.sum())
        drawn += len(images)
        batch += 1
        if progress is not None:
            progress(min(count, num_samples), drawn)
    return torch.cat(kept)[:num_samples], drawn
