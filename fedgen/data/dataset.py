"""The in-memory image collection every loader returns and every later stage consumes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


class DataError(ValueError):
    """Bad input data: a corrupt file, a wrong shape, an empty silo. The message names the culprit."""


@dataclass
class ImageSet:
    """Images with who they belong to.

    images:      [N, 1, H, W] float32 in [-1, 1]
    patient_ids: [N] str; several images may share a patient (splits are made by patient)
    labels:      [N] int64; the finding label (e.g. nodule = 1), -1 where unknown
    sources:     [N] str; the acquisition source (hospital, scanner, file set) of each image
    """

    images: torch.Tensor
    patient_ids: np.ndarray
    labels: np.ndarray
    sources: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[1] != 1:
            raise DataError(f"images must be [N, 1, H, W], got {tuple(self.images.shape)}")
        for name in ("patient_ids", "labels", "sources"):
            if len(getattr(self, name)) != n:
                raise DataError(f"{name} has {len(getattr(self, name))} entries for {n} images")
        if n and not torch.isfinite(self.images).all():
            raise DataError("images contain NaN or Inf")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, index: np.ndarray | list[int]) -> ImageSet:
        index = np.asarray(index, dtype=np.int64)
        return ImageSet(
            images=self.images[torch.from_numpy(index)],
            patient_ids=self.patient_ids[index],
            labels=self.labels[index],
            sources=self.sources[index],
        )

    @staticmethod
    def concat(parts: list[ImageSet]) -> ImageSet:
        if not parts:
            raise DataError("nothing to concatenate")
        return ImageSet(
            images=torch.cat([p.images for p in parts]),
            patient_ids=np.concatenate([p.patient_ids for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            sources=np.concatenate([p.sources for p in parts]),
        )

    def fingerprint(self, *salts: str) -> str:
        """16 hex digits from `salts` (what is derived from the set, e.g. a format and settings),
        then the images (8-bit content, in order), labels and sources: names a cached artefact."""
        h = hashlib.sha256()
        for salt in salts:
            h.update(salt.encode())
        h.update(str(tuple(self.images.shape)).encode())
        quantised = ((self.images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        h.update(quantised.numpy().tobytes())
        h.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        h.update("\n".join(str(s) for s in self.sources).encode())
        return h.hexdigest()[:16]

    def content_hashes(self) -> list[str]:
        return content_hashes(self.images)


def content_hashes(images: torch.Tensor) -> list[str]:
    """sha256 of each image [N,C,H,W] in [-1,1] quantised to 8 bits: stable across float noise,
    unique per image."""
    quantised = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [hashlib.sha256(img.tobytes()).hexdigest()[:16] for img in quantised]


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """Scale any-range pixels to [-1, 1] by their own min and max (a constant image becomes 0)."""
    pixels = pixels.astype(np.float32)
    lo, hi = float(pixels.min()), float(pixels.max())
    if hi - lo < 1e-12:
        return np.zeros_like(pixels)
    return (pixels - lo) / (hi - lo) * 2.0 - 1.0
