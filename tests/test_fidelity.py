"""Frechet distance against its closed form for Gaussians; precision and recall on sets whose
coverage is known by construction."""

import numpy as np
import pytest

from fedgen.evaluation.fidelity import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    precision_recall,
)


def _closed_form_diagonal(mu1, var1, mu2, var2) -> float:
    """||mu1 - mu2||^2 + sum(var1 + var2 - 2 sqrt(var1 var2)) for diagonal covariances."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2)))


def test_identical_sets_are_at_distance_zero_with_full_precision_and_recall():
    x = np.random.default_rng(0).normal(size=(300, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    pr = precision_recall(x, x, k=3)
    assert (pr.precision, pr.recall) == (1.0, 1.0)


def test_frechet_distance_from_stats_equals_the_closed_form_for_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    fd = frechet_distance_from_stats(mu1, np.diag(var1), mu2, np.diag(var2))
    assert fd == pytest.approx(_closed_form_diagonal(mu1, var1, mu2, var2), rel=1e-12, abs=1e-12)
    # 1 + 0 + 4 + 1 for the means; (1+9-6) + (4+1-4) + 0 + (2+0.5-2) for the covariances.
    assert fd == pytest.approx(6.0 + 5.5, rel=1e-12)


def test_frechet_distance_from_stats_equals_the_closed_form_for_commuting_full_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: (S1 S2)^(1/2) = Q diag(sqrt(ab)) Q^T.
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 5)))
    a, b = np.array([1.0, 2.0, 3.0, 0.5, 4.0]), np.array([2.0, 2.0, 0.1, 1.0, 9.0])
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = np.zeros(5), np.full(5, 0.3)
    expected = 5 * 0.09 + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_sample_frechet_distance_approaches_the_population_value():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 0.0, 1.0]), np.array([1.0, -1.0, 1.0])
    var1, var2 = np.array([1.0, 2.0, 0.5]), np.array([0.5, 2.0, 1.5])
    expected = _closed_form_diagonal(mu1, var1, mu2, var2)
    errors = []
    for n in (200, 50_000):
        a = mu1 + rng.normal(size=(n, 3)) * np.sqrt(var1)
        b = mu2 + rng.normal(size=(n, 3)) * np.sqrt(var2)
        errors.append(abs(frechet_distance(a, b) - expected))
    assert errors[1] < 0.02 * expected
    assert errors[1] < errors[0]


def test_singular_covariances_fall_back_to_an_offset():
    rng = np.random.default_rng(3)
    # Fewer samples than dimensions and a dead feature: both covariances are singular.
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 1.0
    a[:, 0] = b[:, 0] = 0.0
    assert np.isfinite(frechet_distance(a, b))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)
    # Singular and not positive definite after round-off: an eps offset keeps it finite.
    sigma = np.diag([1.0, 0.0, -1e-12])
    fd = frechet_distance_from_stats(np.zeros(3), sigma, np.ones(3), sigma)
    assert fd == pytest.approx(3.0, abs=1e-4)


def test_feature_stats_and_bad_inputs():
    x = np.random.default_rng(4).normal(size=(50, 3))
    stats = feature_stats(x)
    assert stats.mu.shape == (3,) and stats.sigma.shape == (3, 3) and stats.count == 50
    with pytest.raises(ValueError, match="must be"):
        frechet_distance(x[:, 0], x[:, 0])
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((5, 3), np.nan), x)
    with pytest.raises(ValueError, match="dimensions"):
        precision_recall(x, x[:, :2])
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(x[:3], x)


def test_fake_set_covering_half_of_the_real_modes_has_full_precision_and_half_recall():
    rng = np.random.default_rng(5)
    centres = 20.0 * np.array([[0, 0], [1, 0], [0, 1], [1, 1]])  # four clusters, far apart
    real = np.concatenate([c + rng.normal(size=(500, 2)) for c in centres])
    fake = np.concatenate([c + rng.normal(size=(500, 2)) for c in centres[:2]])
    pr = precision_recall(real, fake, k=3)
    assert pr.precision > 0.95
    assert pr.recall == pytest.approx(0.5, abs=0.03)
    # Swapped roles: the fake set is the real one's half, so precision halves instead.
    swapped = precision_recall(fake, real, k=3)
    assert swapped.precision == pytest.approx(0.5, abs=0.03) and swapped.recall > 0.95


def test_disjoint_far_apart_sets_have_zero_precision_and_recall():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 100.0
    pr = precision_recall(real, fake)
    assert (pr.precision, pr.recall) == (0.0, 0.0)
    assert frechet_distance(real, fake) > 100.0**2 * 4 * 0.9
