"""Private selection across a federation (`fedgen select`), without Flower: the public plan, the
pool the hospitals vote on, and the release the coordinator assembles from their noisy votes.

A hospital's vote is `Hospital.vote`; the mechanism and its accounting are
`fedgen.privacy.private_selection`. Everything here is public or post-processing: the base, the
pool and its cells (from a public seed), K (from silo sizes and the noise), and the weights
(from the noisy votes only).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedgen.config import ExperimentConfig
from fedgen.diffusion import generate
from fedgen.privacy.dp_sgd import privacy_units, unit_count
from fedgen.privacy.private_selection import (
    PublicCells,
    cell_weights,
    cluster_count,
    sample_selected,
    selection_epsilon,
    selection_noise_multiplier,
)
from fedgen.run_dir import save_torch

DRAW_SEED_OFFSET = 1000  # the rejection sampler's draws: public seeds after the pool's
SAMPLE_BATCH = 64


def selection_sigma(cfg: ExperimentConfig) -> float:
    """The noise on each count: calibrated to spend privacy.target_epsilon at privacy.delta in one
    release; 0 with privacy off (votes released as they are: no guarantee)."""
    if not cfg.privacy.enabled:
        return 0.0
    return selection_noise_multiplier(cfg.privacy.target_epsilon, cfg.privacy.delta)


@dataclass(frozen=True)
class SelectionPlan:
    cells: int  # K
    sigma: float  # per count, per hospital (0: no DP)
    epsilon: float  # each hospital's, for its one release (inf: no DP)
    delta: float
    hospitals: int
    votes: int  # training images (or patients) the hospitals hold: public, as DP-SGD's q is


def silo_unit_counts(cfg: ExperimentConfig, silos) -> list[int]:
    """Each silo's voters: its training images, or its patients with privacy.unit=patient."""
    return [unit_count(privacy_units(s.train.patient_ids, cfg.privacy.unit) if cfg.privacy.enabled else None,
                       len(s.train)) for s in silos]


def plan_selection(cfg: ExperimentConfig, unit_counts: list[int]) -> SelectionPlan:
    """K and sigma from public quantities only, before any vote."""
    sigma = selection_sigma(cfg)
    votes = sum(unit_counts)
    k = cfg.selection.cells or cluster_count(votes, sigma, len(unit_counts), cfg.selection.pool_size)
    epsilon = selection_epsilon(sigma, cfg.privacy.delta) if sigma else math.inf
    return SelectionPlan(k, sigma, epsilon, cfg.privacy.delta, len(unit_counts), votes)


def base_sampler(cfg: ExperimentConfig, base: torch.nn.Module, scheduler) -> Callable[[int, int], torch.Tensor]:
    """draw(n, seed) -> n base samples from public seed `seed` (the same images on every machine)."""
    f = cfg.federation
    device = torch.device("cpu")

    def draw(n: int, seed: int) -> torch.Tensor:
        return generate(base, scheduler, n, cfg.data.image_size, (f.sampling_method, f.sampling_steps),
                        SAMPLE_BATCH, seed, False, device)

    return draw


def pool_cache(cfg: ExperimentConfig, base_sha256: str) -> Path:
    """Where the public pool is kept beside the base, by what makes it: the base's weights, the
    pool's size and seed, and the sampling. It is public and deterministic; drawing it again costs
    a run its longest step (about 2 min at 32x32 on 2 cores)."""
    f = cfg.federation
    key = [base_sha256, cfg.selection.pool_size, cfg.selection.pool_seed, cfg.data.image_size,
           f.sampling_method, f.sampling_steps, asdict(cfg.model)]
    return Path(cfg.runs_dir) / "selection-pools" / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}.pt"


def public_cells(cfg: ExperimentConfig, draw: Callable[[int, int], torch.Tensor], k: int, say=print,
                 cache: Path | None = None) -> PublicCells:
    """The public pool (selection.pool_size base samples from selection.pool_seed), cut into K cells.
    With `cache`, the pool is read from there when a run drew it before, and kept there otherwise."""
    size, seed = cfg.selection.pool_size, cfg.selection.pool_seed
    if cache is not None and cache.exists():
        pool = torch.load(cache, weights_only=True)
        say(f"selection: public pool of {len(pool)} base samples, drawn before: {cache}")
    else:
        batches = []
        for start in range(0, size, 256):  # in pieces, to show progress; each piece its own public seed
            batches.append(draw(min(256, size - start), seed + start))
            say(f"selection: public pool {start + len(batches[-1])}/{size} base samples")
        pool = torch.cat(batches)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(f".{os.getpid()}.partial")
            torch.save(pool, partial)
            os.replace(partial, cache)  # whole or absent: runs may draw side by side
    return PublicCells.fit(pool, k, seed=seed)


def cells_fingerprint(cells: PublicCells) -> str:
    """Which pool and cells a vote answered (a repeated request is answered with the same release)."""
    h = hashlib.sha256(cells.pool.numpy().tobytes())
    h.update(cells.labels.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class SelectionRelease:
    """What `fedgen select` releases: the base (named by path and hash) and the cells' weights.
    Its samples are the base's, each kept with its cell's weight (`sample`)."""

    plan: SelectionPlan
    base: str
    base_sha256: str
    pool: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    released: dict[int, torch.Tensor]  # each hospital's noisy counts (its DP release)

    @classmethod
    def assemble(cls, plan: SelectionPlan, base: str, base_sha256: str, cells: PublicCells,
                 released: dict[int, torch.Tensor]) -> SelectionRelease:
        weights = cell_weights([released[h] for h in sorted(released)])
        pool = cells.pool.reshape(-1, *cells.image_shape)
        return cls(plan, base, base_sha256, pool, cells.labels, weights, released)

    @property
    def cells(self) -> PublicCells:
        return PublicCells(self.pool, self.labels)

    def sample(self, draw: Callable[[int, int], torch.Tensor], num_samples: int, seed: int,
               say: Callable[[str], None] | None = None) -> tuple[torch.Tensor, int]:
        """num_samples selected images, and how many base samples were drawn for them (`say`:
        a progress line every 1024 draws)."""
        first = self.first_draw_seed(seed)

        def progress(kept: int, drawn: int) -> None:
            if say is not None and drawn % 1024 < SAMPLE_BATCH:
                say(f"  kept {kept}/{num_samples} of {drawn} base samples drawn")

        return sample_selected(lambda n, batch: draw(n, first + batch), self.cells, self.weights, num_samples,
                               torch.Generator().manual_seed(seed), batch_size=SAMPLE_BATCH, progress=progress)

    @staticmethod
    def first_draw_seed(seed: int) -> int:
        return seed + DRAW_SEED_OFFSET

    def save(self, path: str | Path) -> None:
        data = {"plan": asdict(self.plan), "base": self.base, "base_sha256": self.base_sha256, "pool": self.pool,
                "labels": self.labels, "weights": self.weights, "released": {str(h): c for h, c in self.released.items()}}
        save_torch(Path(path), data)

    @classmethod
    def load(cls, path: str | Path) -> SelectionRelease:
        data = torch.load(path, weights_only=True)
        return cls(SelectionPlan(**data["plan"]), data["base"], data["base_sha256"], data["pool"], data["labels"],
                   data["weights"], {int(h): c for h, c in data["released"].items()})
