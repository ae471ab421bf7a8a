"""Private selection: the votes' sensitivity, the secret noise, the accounting against the exact
Gaussian mechanism, and the weighted sampler."""

import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from fedgen.privacy.private_selection import (
    PublicCells,
    cell_weights,
    cluster_count,
    noisy_votes,
    sample_selected,
    selection_epsilon,
    selection_noise_multiplier,
)
from fedgen.privacy.randomness import SecretRandomness


def _exact_delta(epsilon: float, sigma: float) -> float:
    """The Gaussian mechanism's exact delta at epsilon, sensitivity 1 (Balle & Wang 2018, Thm 8)."""
    return norm.cdf(0.5 / sigma - epsilon * sigma) - math.exp(epsilon) * norm.cdf(-0.5 / sigma - epsilon * sigma)


def _pool(n: int = 60, seed: int = 0) -> torch.Tensor:
    """Three well separated groups of 4x4 images (dark, mid, bright), n // 3 each, a little noise."""
    g = torch.Generator().manual_seed(seed)
    n -= n % 3
    levels = torch.tensor([-0.8, 0.0, 0.8]).repeat_interleave(n // 3)
    return levels.view(-1, 1, 1, 1) + 0.05 * torch.randn(n, 1, 4, 4, generator=g)


@pytest.mark.parametrize("epsilon", [8.0, 1.0, 0.3])
def test_the_noise_spends_no_more_than_the_exact_gaussian_mechanism_allows(epsilon):
    delta = 1e-5
    sigma = selection_noise_multiplier(epsilon, delta)
    spent = selection_epsilon(sigma, delta)
    assert spent == pytest.approx(epsilon, rel=0.01)
    # RDP is an upper bound: at the reported epsilon the exact delta is within the budget, and the
    # exact epsilon is not far below (the bound is not wasteful).
    assert _exact_delta(spent, sigma) <= delta
    exact = brentq(lambda e: _exact_delta(e, sigma) - delta, 1e-3, 100)
    assert 0.85 * spent <= exact <= spent


def test_impossible_privacy_settings_are_refused():
    with pytest.raises(ValueError, match="epsilon"):
        selection_noise_multiplier(0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        selection_noise_multiplier(8.0, 1.5)
    with pytest.raises(ValueError, match="sigma"):
        noisy_votes(torch.zeros(3, dtype=torch.float64), 0.0, SecretRandomness())


def test_one_image_changes_one_count_by_one():
    pool = _pool()
    cells = PublicCells.fit(pool, 3)
    silo = _pool(30, seed=1)
    votes = cells.votes(silo)
    assert votes.sum() == len(silo) and votes.dtype == torch.float64
    for i in range(len(silo)):  # remove any one image: exactly one cell loses exactly one vote
        without = cells.votes(torch.cat([silo[:i], silo[i + 1:]]))
        assert (votes - without).abs().sum() == 1 and (votes - without).max() == 1
    # The three groups fall in three cells, ten images each.
    assert sorted(votes.tolist()) == [10.0, 10.0, 10.0]


def test_an_empty_silo_votes_zeros_and_a_wrong_shape_is_refused():
    cells = PublicCells.fit(_pool(), 3)
    assert cells.votes(torch.zeros(0, 1, 4, 4)).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="shape"):
        cells.votes(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="K"):
        PublicCells.fit(_pool(), 1)


def test_the_noise_is_secret_and_calibrated():
    votes = torch.zeros(20_000, dtype=torch.float64)
    a, b = (noisy_votes(votes, 2.0, SecretRandomness()) for _ in range(2))
    assert not torch.equal(a, b)  # two hospitals (or two runs) never add the same noise
    assert a.std().item() == pytest.approx(2.0, rel=0.03)
    assert abs(a.mean().item()) < 0.05


def test_weights_are_the_clamped_sum_scaled_to_one_and_all_negative_means_the_base():
    weights = cell_weights([torch.tensor([4.0, -1.0, 1.0]), torch.tensor([4.0, -2.0, 1.0])])
    assert weights.tolist() == [1.0, 0.0, 0.25]
    assert cell_weights([torch.tensor([-1.0, -3.0])]).tolist() == [1.0, 1.0]


def test_the_sampler_keeps_only_weighted_cells():
    pool = _pool()
    cells = PublicCells.fit(pool, 3)
    dark = cells.cell_of(pool[:1]).item()
    weights = torch.zeros(3)
    weights[dark] = 1.0

    def draw(n, batch):
        return _pool(n, seed=100 + batch)

    samples, drawn = sample_selected(draw, cells, weights, 25, torch.Generator().manual_seed(0), batch_size=30)
    assert samples.shape == (25, 1, 4, 4) and drawn >= 60
    assert (cells.cell_of(samples) == dark).all()
    assert samples.mean() < -0.5  # all dark
    with pytest.raises(RuntimeError, match="rarely"):
        sample_selected(lambda n, b: _pool(60, seed=b)[20:40], cells, weights, 5, torch.Generator(), batch_size=20,
                        max_draws=100)  # only mid-grey images: never kept
    with pytest.raises(RuntimeError, match="no images"):
        sample_selected(lambda n, b: pool[:0], cells, weights, 5, torch.Generator())


def test_cells_follow_public_quantities_only():
    # eps 8 (sigma 0.638), 2 hospitals of 64: 47 cells; more noise, fewer cells; capped by the pool.
    assert cluster_count(128, 0.638, 2, 2048) == 47
    assert cluster_count(128, 4.06, 2, 2048) == 7
    assert cluster_count(128, 0.0, 2, 2048) == 42
    assert cluster_count(100_000, 0.638, 2, 2048) == 204
    assert cluster_count(3, 10.0, 2, 2048) == 2
