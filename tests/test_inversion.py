"""The coordinator's gradient-inversion attack works, not just runs: from one plain SGD step on one
image (fedgen's own local training, no DP), it reconstructs that image; from a random update it
reconstructs nothing in particular."""

from __future__ import annotations

import pytest
import torch

from attacks.inversion import InversionSettings, LocalRecipe, invert, score, weight_delta
from fedgen.config import load_config
from fedgen.data.synthetic import generate_xrays
from fedgen.diffusion import Diffusion
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.accounting import TrainingPlan
from fedgen.privacy.dp_sgd import train_locally

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small tensors: a second thread only slows them

SIZE = 16
TINY = ["model.init=null", f"data.image_size={SIZE}", "model.block_out_channels=[16,32]",
        "model.down_block_types=[DownBlock2D,DownBlock2D]", "model.up_block_types=[UpBlock2D,UpBlock2D]",
        "privacy=none", "training.optimizer=sgd", "training.learning_rate=0.01", "training.batch_size=1",
        "training.max_physical_batch_size=0",
        # The hospital's (t, eps) draws are secret by default; fixed here so the test's figures repeat.
        # The attack never reads them: it optimises its own.
        "privacy.reproducible_noise=true"]
# One plain SGD step: up to 4 L-BFGS starts of 300 iterations, stopping at the first that
# reproduces the update (about 20 s on a quiet core when the first start does).
SETTINGS = InversionSettings(iterations=300, restarts=4)


def one_step_update(images: torch.Tensor, overrides: list[str] = TINY, seed: int = 0):
    """(unet, diffusion, weights before, weights after) of one local step of fedgen's training on
    all of `images` (q = 1, one epoch of one step, the hospital's (t, eps) draws its own)."""
    cfg = load_config(overrides)
    torch.manual_seed(seed)
    unet = build_unet(cfg.model, cfg.data.image_size)
    diffusion = Diffusion(build_scheduler(cfg.model))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    train_locally(unet, diffusion, images, cfg, TrainingPlan(len(images), 1.0, 1, 1, 1), None, seed_parts=(seed, 0, 1))
    after = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_state_dict(before)
    return unet, diffusion, before, after


def pool_of(n: int = 32) -> torch.Tensor:
    return generate_xrays(num_patients=n, images_per_patient=1, image_size=SIZE, num_sources=1,
                          finding_rate=0.3, seed=0).images


def test_one_sgd_step_on_one_image_gives_the_image_back():
    pool = pool_of()
    unet, diffusion, before, after = one_step_update(pool[:1])
    recipe = LocalRecipe("sgd", 0.01, steps=1, batch_size=1)
    result = invert(unet, before, after, diffusion, recipe, (1, SIZE, SIZE), SETTINGS, progress=False)
    scored = score(result.images, pool, sources=[0])
    # Measured: SSIM 1.000, PSNR 74 dB (seed 0: the secret timestep is 14): the image itself, up to
    # the float32 rounding of the weights; a different synthetic X-ray of the same scanner scores about 0.1.
    assert scored.match == [0] and scored.reidentification_rate == 1.0
    assert scored.best_ssim[0] >= 0.95 and scored.best_psnr[0] >= 30
    assert result.losses[-1] < 1e-4  # the simulated update is the observed one (measured 1e-5)


def test_a_random_update_matches_nothing():
    pool = pool_of()
    unet, diffusion, before, after = one_step_update(pool[:1])
    delta = weight_delta(before, after)
    gen = torch.Generator().manual_seed(1)
    fake = {k: v + (torch.randn(v.shape, generator=gen) * delta[k].std(correction=0) if k in delta else 0)
            for k, v in before.items()}
    recipe = LocalRecipe("sgd", 0.01, steps=1, batch_size=1)
    result = invert(unet, before, fake, diffusion, recipe, (1, SIZE, SIZE), SETTINGS, progress=False)
    scored = score(result.images, pool, sources=[0])
    assert scored.best_ssim[0] < 0.3
    assert result.losses[-1] > 0.5  # no images make this update (squared distance / its norm)


def test_score_against_an_independent_count():
    pool = pool_of(8)
    noisy = pool[[3, 5]] + 0.05 * torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    scored = score(noisy.clamp(-1, 1), pool, sources=[3, 6])
    assert scored.match == [3, 5] and scored.reidentified == [True, False]
    assert scored.reidentification_rate == 0.5 and scored.chance == 2 / 8
    assert min(scored.best_ssim) > 0.8 and min(scored.best_psnr) > 20


@pytest.mark.slow
def test_one_sgd_step_is_inverted_whatever_the_secret_timestep():
    """Four updates, each one step on a different image with its own (t, eps): t = 867, 399, 134,
    542, from a lightly to an almost wholly noised x_t. Each one found gives its image back
    exactly (SSIM above 0.99); a start can miss, so 3 of 4 are asked for. (Seeds 3 and 6, t = 161
    and 567, were left out to keep CI short; in session 16 seed 3's update was missed, SSIM 0.61,
    and seed 6's found.)"""
    pool = pool_of()
    recipe = LocalRecipe("sgd", 0.01, steps=1, batch_size=1)
    found = []
    for seed in (1, 2, 4, 5):
        unet, diffusion, before, after = one_step_update(pool[seed:seed + 1], seed=seed)
        result = invert(unet, before, after, diffusion, recipe, (1, SIZE, SIZE), SETTINGS, progress=False)
        found.append(score(result.images, pool, sources=[seed]))
    assert sum(s.reidentification_rate for s in found) >= 3
    assert sorted(s.best_ssim[0] for s in found)[1] >= 0.9
