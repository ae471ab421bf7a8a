"""Extraction (Carlini et al. 2023): generate many images, flag those that copy a training image.

Threat model: the attacker holds the released generator and samples from it; the auditor then
compares every sample with the training images it may have copied. Two criteria, both reported:

- ratio (Gu et al. 2025): d(x^, NN1) < d(x^, NN2) / 3, with d the l2 distance in pixel space;
- Carlini's normalised l2: d(x^, NN1) / (alpha * mean d(x^, NN_k) over its k = 50 nearest
  training images), alpha = 0.5; memorised when below `normalised_threshold` (a copy sits far
  closer to one training image than to its neighbourhood).
Duplicated training images count once (distances are to unique images).

At fedgen's image sizes neither fires, even on a model that memorises: small X-rays of one anatomy
all sit near one another (held-out images' NN1/NN2 ratio never fell below 0.65 on the trade-off
preset, nor did the memorising model's samples below 0.72; the criteria need 0.33). So a third,
calibrated by images the model never saw, is reported beside them:
- nearer than held-out: d(x^, NN1) below the `calibration_quantile` (1%) quantile of the same
  distance for held-out real images of the same hospitals. A model that draws fresh images has
  about that share of its samples there by chance; the binomial p-value says how surprising the
  count is. The no-DP trade-off model put 6 of 128 samples there (1.3 expected), epsilon 8 none.
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
    calibration_quantile: float = 0.01  # "nearer than held-out": below this quantile of their NN1 distances
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
    flagged_nearer_than_heldout: list[int] = field(default_factory=list)
    heldout_threshold: float | None = None  # the held-out images' NN1 distance at calibration_quantile
    expected_by_chance: float | None = None  # samples below it if the model drew fresh images
    p_value: float | None = None  # binomial, one-sided: this many or more by chance

    @property
    def flagged(self) -> list[int]:
        """Samples flagged by either criterion."""
        return sorted(set(self.flagged_ratio) | set(self.flagged_normalised))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_flagged_ratio"] = len(self.flagged_ratio)
        d["num_flagged_normalised"] = len(self.flagged_normalised)
        d["num_flagged"] = len(self.flagged)
        d["num_nearer_than_heldout"] = len(self.flagged_nearer_than_heldout)
        return d


def unique_images(images: torch.Tensor) -> torch.Tensor:
    """Drop exact duplicates (a duplicated training image is one image to copy)."""
    flat = images.reshape(len(images), -1)
    _, first = np.unique(flat.numpy().round(6), axis=0, return_index=True)
    return images[torch.from_numpy(np.sort(first))]


def multiplicity(unique: torch.Tensor, duplicated: dict[str, int]) -> list[int]:
    """How many times each of the `unique` training images was trained on: 1 plus its extra copies
    in `duplicated` (content hash -> extra copies, as the hospitals' records.json hold them)."""
    from fedgen.data.dataset import content_hashes

    return [1 + int(duplicated.get(h, 0)) for h in content_hashes(unique)]


def by_duplication(result: ExtractionResult, copies: list[int]) -> dict:
    """The calibrated copies split by whether the training image they sit nearest is duplicated
    (`copies`: each unique training image's count, from `multiplicity`). Memorisation grows with
    duplication (Carlini et al. 2023), so a model that copies shows it on the duplicated images
    first: their share of the flagged samples above their share of the training images."""
    duplicated = {i for i, c in enumerate(copies) if c > 1}
    flagged = result.flagged_nearer_than_heldout
    flagged_dup = [i for i in flagged if result.nearest[i] in duplicated]
    return {
        "training_images": len(copies),
        "duplicated_images": len(duplicated),
        "copies_of_duplicated": max(copies, default=1),
        "samples_nearest_a_duplicated": sum(1 for n in result.nearest if n in duplicated),
        "nearer_than_heldout": len(flagged),
        "nearer_than_heldout_duplicated": len(flagged_dup),
        "distinct_images_copied": len({result.nearest[i] for i in flagged}),
        "distinct_duplicated_images_copied": len({result.nearest[i] for i in flagged_dup}),
    }


def find_copies(samples: torch.Tensor, training: torch.Tensor, cfg: ExtractionConfig,
                heldout: torch.Tensor | None = None) -> ExtractionResult:
    """samples [S,1,H,W], training [N,1,H,W] (unique), held-out real images [M,1,H,W] (optional:
    the calibrated criterion), all in [-1, 1]."""
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
    nearer: list[int] = []  # the calibrated criterion, when there are held-out images
    threshold: float | None = None
    expected: float | None = None
    p_value: float | None = None
    if heldout is not None and len(heldout):
        from scipy.stats import binomtest

        h1 = torch.cdist(heldout.reshape(len(heldout), -1).double(), t).min(dim=1).values
        threshold = float(torch.quantile(h1, cfg.calibration_quantile))
        nearer = torch.nonzero(d1 < threshold).flatten().tolist()
        expected = cfg.calibration_quantile * len(samples)
        p_value = float(binomtest(len(nearer), len(samples), cfg.calibration_quantile, alternative="greater").pvalue)
    return ExtractionResult(
        num_samples=len(samples),
        num_training_images=len(training),
        flagged_ratio=ratio_flags,
        flagged_normalised=normalised_flags,
        nearest=index_k[:, 0].tolist(),
        nearest_distance=d1.tolist(),
        second_distance=d2.tolist(),
        normalised_distance=normalised.tolist(),
        flagged_nearer_than_heldout=nearer,
        heldout_threshold=threshold,
        expected_by_chance=expected,
        p_value=p_value,
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
