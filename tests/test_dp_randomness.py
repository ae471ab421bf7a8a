"""The randomness DP rests on is secret: unpredictable from the config, calibrated, Poisson."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedgen.config import ConfigError
from fedgen.diffusion import Diffusion
from fedgen.federation.site import check_site_privacy
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.accounting import EpsilonLedger, TrainingPlan, make_plan
from fedgen.privacy.dp_sgd import train_locally
from fedgen.privacy.randomness import (
    NO_GUARANTEE,
    ReproducibleRandomness,
    SecretRandomness,
    poisson_batches,
)


def _config(base_config, reproducible: bool, **training):
    return dataclasses.replace(
        base_config,
        data=dataclasses.replace(base_config.data, image_size=16),
        privacy=dataclasses.replace(base_config.privacy, reproducible_noise=reproducible),
        training=dataclasses.replace(base_config.training, **training),
    )


def _update(cfg, plan, ledger_path) -> torch.Tensor:
    """One local DP training from the same weights, data and seed parts; returns the weight change."""
    torch.manual_seed(0)
    unet = build_unet(cfg.model, 16)
    before = torch.cat([p.detach().flatten().clone() for p in unet.parameters()])
    images = torch.linspace(-1, 1, 32 * 256).reshape(32, 1, 16, 16)
    ledger = EpsilonLedger.open(ledger_path, cfg.privacy, plan)
    train_locally(unet, Diffusion(build_scheduler(cfg.model)), images, cfg, plan, ledger, (0, 0, 1))
    return torch.cat([p.detach().flatten() for p in unet.parameters()]) - before


def test_two_trainings_with_the_same_config_differ_unless_reproducible(base_config, tmp_path):
    plan = make_plan(32, batch_size=8, local_epochs=1, num_rounds=2)
    secret = _config(base_config, reproducible=False)
    a, b = _update(secret, plan, tmp_path / "a.json"), _update(secret, plan, tmp_path / "b.json")
    assert not torch.equal(a, b)
    assert (a - b).norm() > 0.1 * a.norm()  # not a rounding difference: different noise and batches
    reproducible = _config(base_config, reproducible=True)
    c, d = _update(reproducible, plan, tmp_path / "c.json"), _update(reproducible, plan, tmp_path / "d.json")
    assert torch.equal(c, d)


def test_the_noise_added_has_the_calibrated_standard_deviation(base_config):
    """An empty batch has a zero gradient sum: with SGD at lr 1 and E[batch] = 1, the weights move
    by exactly the noise, N(0, (sigma C)^2) in every coordinate."""
    sigma, clip = 1.7, 0.5
    cfg = _config(base_config, reproducible=False, optimizer="sgd", learning_rate=1.0)
    cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, max_grad_norm=clip))
    unet = build_unet(cfg.model, 16)
    before = torch.cat([p.detach().flatten().clone() for p in unet.parameters()])
    plan = TrainingPlan(num_examples=4, sample_rate=1e-12, steps_per_epoch=1, local_epochs=1, num_rounds=1)
    ledger = EpsilonLedger("rdp", 1e-5, float("inf"), sigma, plan.sample_rate, 1)
    train_locally(unet, Diffusion(build_scheduler(cfg.model)), torch.zeros(4, 1, 16, 16), cfg, plan, ledger, (0, 0, 1))
    noise = (torch.cat([p.detach().flatten() for p in unet.parameters()]) - before).double().numpy()
    n = noise.size
    assert n > 100_000
    assert abs(noise.mean()) < 5 * sigma * clip / math.sqrt(n)
    assert noise.std() == pytest.approx(sigma * clip, rel=0.01)
    assert stats.kstest(noise / (sigma * clip), "norm").pvalue > 1e-4  # Gaussian, not just the right std
    assert ledger.rounds[-1]["reproducible_noise"] is False


def test_secret_gaussian_is_standard_normal_and_ignores_torch_seeds():
    secret = SecretRandomness()
    torch.manual_seed(0)
    a = secret.gaussian(torch.zeros(200_000), std=1.0)
    torch.manual_seed(0)
    b = secret.gaussian(torch.zeros(200_000), std=1.0)
    assert a.dtype == torch.float32 and not torch.equal(a, b)
    assert stats.kstest(a.double().numpy(), "norm").pvalue > 1e-4
    u = secret.uniform(100_000).numpy()
    assert u.min() > 0 and u.max() <= 1 and stats.kstest(u, "uniform").pvalue > 1e-4


@pytest.mark.parametrize("n, q", [(100, 0.1), (260, 0.123), (50, 0.5)])
def test_poisson_batch_sizes_have_binomial_mean_and_variance(n, q):
    steps = 4000
    sizes = np.array([len(b) for b in poisson_batches(n, q, steps, SecretRandomness())])
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / steps)
    # The sample variance of a binomial has standard error about var * sqrt(2 / steps).
    assert abs(sizes.var(ddof=1) - var) < 5 * var * math.sqrt(2 / steps)


def test_poisson_batches_differ_between_runs_unless_reproducible():
    first = [b.tolist() for b in poisson_batches(200, 0.1, 20, SecretRandomness())]
    second = [b.tolist() for b in poisson_batches(200, 0.1, 20, SecretRandomness())]
    assert first != second
    again = [b.tolist() for b in poisson_batches(200, 0.1, 20, ReproducibleRandomness(0, 1, 2))]
    assert again == [b.tolist() for b in poisson_batches(200, 0.1, 20, ReproducibleRandomness(0, 1, 2))]


def test_every_record_says_when_the_noise_was_reproducible(base_config, tmp_path):
    plan = make_plan(32, batch_size=8, local_epochs=1, num_rounds=2)
    _update(_config(base_config, reproducible=True), plan, tmp_path / "r.json")
    _update(_config(base_config, reproducible=False), plan, tmp_path / "s.json")
    # _update does not save: open again from a saved ledger to check the file.
    for name, reproducible in (("r", True), ("s", False)):
        cfg = _config(base_config, reproducible=reproducible)
        ledger = EpsilonLedger.open(tmp_path / f"{name}.json", cfg.privacy, plan)
        unet = build_unet(cfg.model, 16)
        images = torch.zeros(32, 1, 16, 16)
        train_locally(unet, Diffusion(build_scheduler(cfg.model)), images, cfg, plan, ledger, (0, 0, 1))
        ledger.save(tmp_path / f"{name}.json")
        saved = EpsilonLedger.load(tmp_path / f"{name}.json")
        assert saved.reproducible_noise is reproducible
        assert (saved.to_dict()["guarantee"] == NO_GUARANTEE) is reproducible


def test_a_deployed_hospital_refuses_reproducible_noise_unless_its_node_allows_it(base_config):
    cfg = _config(base_config, reproducible=True)
    with pytest.raises(ConfigError, match="privacy.reproducible_noise"):
        check_site_privacy(cfg, {"partition-id": 0, "data-dir": "/tmp/x"})
    check_site_privacy(cfg, {"allow-reproducible-noise": True})
    check_site_privacy(_config(base_config, reproducible=False), {})


class RecordingDiffusion(Diffusion):
    """Keeps the timesteps of every (timestep, noise) draw local training makes."""

    def draw(self, x0, draws, generator=None, timesteps=None):
        t, eps = super().draw(x0, draws, generator=generator, timesteps=timesteps)
        self.timesteps.append(t.clone())
        return t, eps


def _timesteps_drawn(cfg) -> torch.Tensor:
    plan = make_plan(16, batch_size=16, local_epochs=1, num_rounds=1)  # q = 1: every image, every step
    diffusion = RecordingDiffusion(build_scheduler(cfg.model))
    diffusion.timesteps = []
    images = torch.zeros(16, 1, 16, 16)
    train_locally(build_unet(cfg.model, 16), diffusion, images, cfg, plan, None, (0, 0, 1))
    return torch.cat(diffusion.timesteps)


def test_the_diffusion_draws_are_secret_unless_reproducible(base_config):
    """A coordinator that knows the (timestep, noise) draws inverts an update far more easily
    (GIDM): they come from the secret stream, never from the config's seed."""
    secret = dataclasses.replace(_config(base_config, reproducible=False), privacy=dataclasses.replace(
        base_config.privacy, enabled=False, reproducible_noise=False))
    assert not torch.equal(_timesteps_drawn(secret), _timesteps_drawn(secret))
    reproducible = dataclasses.replace(secret, privacy=dataclasses.replace(secret.privacy, reproducible_noise=True))
    assert torch.equal(_timesteps_drawn(reproducible), _timesteps_drawn(reproducible))


def test_training_draws_only_the_timesteps_it_is_told(base_config):
    """`training.timestep_range`: a fine-tune spends its budget on those noise levels only."""
    cfg = _config(base_config, reproducible=False)
    ranged = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, timestep_range=[600, 1000]))
    drawn = _timesteps_drawn(ranged)
    assert drawn.numel() >= 16 and drawn.min() >= 600 and drawn.max() < 1000
    assert _timesteps_drawn(cfg).min() < 600  # all of them by default (16 draws: P(all >= 600) = 0.4^16)
