"""Fidelity and diversity of generated images, measured on features: Frechet distance, precision, recall.

Pure numpy/scipy: the features come from elsewhere (`fedgen.evaluation.features`), arrays [N, D].

- Frechet distance (Heusel et al. 2017, "FID" when the features are Inception pool3): the
  2-Wasserstein distance between Gaussians fitted to the two feature sets,
  ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}). Lower is better; 0 for identical statistics.
  Computed as pytorch-fid does (scipy's `sqrtm`; eps * I added to both covariances when the
  product is singular; small imaginary parts from round-off dropped). Biased upwards for small
  N: compare values computed from the same numbers of samples.
- Improved precision and recall (Kynkaenniemi et al. 2019): each set's manifold is the union of
  balls around its points, a ball's radius being the distance to the point's k-th nearest
  neighbour in its own set. Precision is the share of generated points inside the real manifold
  (fidelity), recall the share of real points inside the generated manifold (diversity).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import linalg
from scipy.spatial.distance import cdist


@dataclass(frozen=True)
class FeatureStats:
    """mu [D] and sigma [D, D] (unbiased covariance) of a feature set, and how many rows it had."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float  # share of fake features inside the real manifold
    recall: float  # share of real features inside the fake manifold
    k: int

    def to_dict(self) -> dict:
        return asdict(self)


def _check_features(features: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {features.shape}")
    if len(features) < min_rows:
        raise ValueError(f"{name} has {len(features)} rows; at least {min_rows} are needed")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return features


def feature_stats(features: np.ndarray) -> FeatureStats:
    """Mean and covariance of features [N, D], N >= 2."""
    features = _check_features(features, "features", 2)
    return FeatureStats(features.mean(axis=0), np.cov(features, rowvar=False), len(features))


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}). mu [D], sigma [D, D].

    When the product of the covariances is singular (fewer samples than dimensions, dead
    features) its square root may come out non-finite: eps * I is then added to both, as in
    pytorch-fid. An imaginary part that is more than round-off is an error.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = (
        np.atleast_2d(sigma1).astype(np.float64),
        np.atleast_2d(sigma2).astype(np.float64),
    )
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be [D] of the same D, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}")

    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns on singular input; non-finite results are handled below, as in pytorch-fid.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"(sigma1 sigma2)^(1/2) has an imaginary part of {np.abs(covmean.imag).max():.3g}"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to features_a [N, D] and features_b [M, D]."""
    a, b = feature_stats(features_a), feature_stats(features_b)
    return frechet_distance_from_stats(a.mu, a.sigma, b.mu, b.sigma)


def _knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row to its k-th nearest other row. [N, D] -> [N]."""
    distances = cdist(features, features)
    # Column 0 after sorting is the point itself (distance 0), so the k-th neighbour is column k.
    return np.sort(distances, axis=1)[:, k]


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Share of queries [M, D] inside at least one ball (manifold [N, D], radii [N])."""
    inside = cdist(queries, manifold) <= radii[None, :]
    return float(inside.any(axis=1).mean())


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3
) -> PrecisionRecall:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of fake [M, D] against real [N, D].

    Both sets need more than k rows. Memory is N*N + M*M + N*M floats: fine for thousands.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real = _check_features(real_features, "real_features", k + 1)
    fake = _check_features(fake_features, "fake_features", k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} real, {fake.shape[1]} fake")
    precision = _coverage(real, _knn_radii(real, k), fake)
    recall = _coverage(fake, _knn_radii(fake, k), real)
    return PrecisionRecall(precision=precision, recall=recall, k=k)
