"""Extraction (Carlini et al. 2023): generate many images, flag those that copy a training image.

Threat model: the attacker holds the released generator and samples from it; the auditor then
compares every sample with the training images it may have copied. Two criteria, both reported:

- ratio (Gu et al. 2025): d(x^, NN1) < d(x^, NN2) / 3, with d the l2 distance in pixel space;
- Carlini's normalised l2: d(x^, NN1) / (alpha * mean d(x^, NN_k) over its k = 50 nearest
  training images), alpha = 0.5; memorised when below `normalised_threshold` (a copy sits far
  closer to one training image than to its neighbourhood).
Duplicated training images count once (distances are to unique images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class ExtractionConfig:
    num_samples: int = 256
    batch_size: int = 64
    sampling_steps: int = 50
    sampling_method: str = "ddpm"  # ancestral, as fedgen's own samples (fedgen.diffusion.sample_images)
    ratio: float = 3.0  # NN1 < NN2 / ratio
    neighbours: int = 50  # Carlini's k
    alpha: float = 0.5
    normalised_threshold: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class ExtractionResult:
    num_samples: int
    num_training_images: int
    flagged_ratio: list[int] = field(default_factory=list)  # sample indices
    flagged_normalised: list[int] = field(default_factory=list)
    nearest: list[int] = field(default_factory=list)  # nearest training image of each sample
    nearest_distance: list[float] = field(default_factory=list)
    second_distance: list[float] = field(default_factory=list)
    normalised_distance: list[float] = field(default_factory=list)

    @property
    def flagged(self) -> list[int]:
        """Samples flagged by either criterion."""
        return sorted(set(self.flagged_ratio) | set(self.flagged_normalised))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_flagged_ratio"] = len(self.flagged_ratio)
        d["num_flagged_normalised"] = len(self.flagged_normalised)
        d["num_flagged"] = len(self.flagged)
        return d


def unique_images(images: torch.Tensor) -> torch.Tensor:
    """Drop exact duplicates (a duplicated training image is one image to copy)."""
    flat = images.reshape(len(images), -1)
    _, first = np.unique(flat.numpy().round(6), axis=0, return_index=True)
    return images[torch.from_numpy(np.sort(first))]


def find_copies(samples: torch.Tensor, training: torch.Tensor, cfg: ExtractionConfig) -> ExtractionResult:
    """samples [S,1,H,W], training [N,1,H,W] (unique), both in [-1, 1]."""
    s = samples.reshape(len(samples), -1).double()
    t = training.reshape(len(training), -1).double()
    distances = torch.cdist(s, t)  # [S, N]
    k = min(cfg.neighbours, len(training))
    nearest_k, index_k = distances.topk(k, dim=1, largest=False)
    d1 = nearest_k[:, 0]
    d2 = nearest_k[:, 1] if k > 1 else torch.full_like(d1, float("inf"))
    normalised = d1 / (cfg.alpha * nearest_k.mean(dim=1)).clamp_min(1e-12)
    ratio_flags = torch.nonzero(d1 < d2 / cfg.ratio).flatten().tolist()
    normalised_flags = torch.nonzero(normalised < cfg.normalised_threshold).flatten().tolist() if k > 1 else []
    return ExtractionResult(
        num_samples=len(samples),
        num_training_images=len(training),
        flagged_ratio=ratio_flags,
        flagged_normalised=normalised_flags,
        nearest=index_k[:, 0].tolist(),
        nearest_distance=d1.tolist(),
        second_distance=d2.tolist(),
        normalised_distance=normalised.tolist(),
    )


def generate(
    sample_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    shape: tuple[int, ...],
    cfg: ExtractionConfig,
    progress: bool = True,
) -> torch.Tensor:
    """Generate cfg.num_samples images in batches; `sample_fn(noise [B,...], generator) -> images
    [B,...]`, the generator (seeded by cfg.seed) for any noise the sampler draws on the way."""
    gen = torch.Generator().manual_seed(cfg.seed)
    out = []
    with tqdm(total=cfg.num_samples, desc="extraction: sampling", unit="img", disable=not progress) as bar:
        for start in range(0, cfg.num_samples, cfg.batch_size):
            n = min(cfg.batch_size, cfg.num_samples - start)
            out.append(sample_fn(torch.randn((n, *shape), generator=gen), gen).cpu())
            bar.update(n)
    return torch.cat(out)


def pairs_grid(samples: torch.Tensor, training: torch.Tensor, result: ExtractionResult, limit: int = 32) -> torch.Tensor:
    """Each flagged sample beside its nearest training image: [2 * n, 1, H, W] (pairs in a row)."""
    flagged = result.flagged[:limit]
    if not flagged:
        return samples[:0]
    rows = []
    for i in flagged:
        rows += [samples[i], training[result.nearest[i]]]
    return torch.stack(rows)
