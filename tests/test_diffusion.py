"""The diffusion math: q_sample's formula, the per-example loss, sampling."""

import pytest
import torch

from fedgen.diffusion import Diffusion, sample_images, unet_denoiser
from fedgen.model import build_scheduler, build_unet


@pytest.fixture()
def parts(base_config):
    torch.manual_seed(0)
    return build_unet(base_config.model, 16), Diffusion(build_scheduler(base_config.model))


def test_q_sample_follows_the_closed_form(parts):
    _, diffusion = parts
    x0, eps = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    abar = diffusion.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    torch.testing.assert_close(diffusion.q_sample(x0, t, eps), expected)
    # diffusers' own add_noise agrees
    torch.testing.assert_close(diffusion.q_sample(x0, t, eps), diffusion.scheduler.add_noise(x0, eps, t))


def test_per_example_loss_is_per_example_and_reproducible(parts):
    unet, diffusion = parts
    x0 = torch.rand(5, 1, 16, 16) * 2 - 1
    t, eps = diffusion.draw(x0, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        losses = diffusion.per_example_loss(unet_denoiser(unet), x0, t, eps)
        again = diffusion.per_example_loss(unet_denoiser(unet), x0, t, eps)
        alone = diffusion.per_example_loss(unet_denoiser(unet), x0[2:3], t[2:3], eps[2:3])
    assert losses.shape == (5,)
    torch.testing.assert_close(losses, again)
    torch.testing.assert_close(losses[2:3], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_sampling_gives_images_in_range_and_is_deterministic_for_fixed_noise(parts, method):
    unet, diffusion = parts
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = {"num_inference_steps": 5}
    a = sample_images(unet, diffusion.scheduler, noise, method=method, generator=torch.Generator().manual_seed(1), **kwargs)
    b = sample_images(unet, diffusion.scheduler, noise, method=method, generator=torch.Generator().manual_seed(1), **kwargs)
    assert a.shape == noise.shape and a.abs().max() <= 1
    torch.testing.assert_close(a, b)
