"""The coordinator's gradient-inversion attack works, not just runs: from one plain SGD step on one
image (fedgen's own local training, no DP), it reconstructs that image; from a random update it
reconstructs nothing in particular."""

from __future__ import annotations

import torch

from attacks.inversion import InversionSettings, LocalRecipe, invert, score, weight_delta
from fedgen.config import load_config
from fedgen.data.synthetic import generate_xrays
from fedgen.diffusion import Diffusion
from fedgen.model import build_scheduler, build_unet
from fedgen.privacy.accounting import TrainingPlan
from fedgen.privacy.dp_sgd import train_locally

SIZE = 16
TINY = ["model.init=null", f"data.image_size={SIZE}", "model.block_out_channels=[16,32]",
        "model.down_block_types=[DownBlock2D,DownBlock2D]", "model.up_block_types=[UpBlock2D,UpBlock2D]",
        "privacy=none", "training.optimizer=sgd", "training.learning_rate=0.01", "training.batch_size=1",
        "training.max_physical_batch_size=0",
        # The hospital's (t, eps) draws are secret by default; fixed here so the test's figures repeat.
        # The attack never reads them: it optimises its own.
        "privacy.reproducible_noise=true"]
SETTINGS = InversionSettings(iterations=200, restarts=8, warmup=40)  # about 15 s on one core


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
    # Measured 0.76 (seed 0); a different synthetic X-ray of the same scanner scores about 0.1.
    assert scored.match == [0] and scored.reidentification_rate == 1.0
    assert scored.best_ssim[0] >= 0.6
    assert result.losses[-1] < 0.1


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
    assert result.losses[-1] > 0.5  # no images make this update


def test_score_against_an_independent_count():
    pool = pool_of(8)
    noisy = pool[[3, 5]] + 0.05 * torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    scored = score(noisy.clamp(-1, 1), pool, sources=[3, 6])
    assert scored.match == [3, 5] and scored.reidentified == [True, False]
    assert scored.reidentification_rate == 0.5 and scored.chance == 2 / 8
    assert min(scored.best_ssim) > 0.8 and min(scored.best_psnr) > 20
