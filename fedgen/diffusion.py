"""The diffusion process: forward noising, the per-example denoising loss, and sampling.

The network (a UNet predicting eps) is separate; this module holds the math. Names follow
Ho et al. 2020: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, loss = ||eps_theta(x_t, t) - eps||^2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from fedgen.seeding import torch_generator

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def unet_denoiser(unet: UNet2DModel) -> Denoiser:
    """eps_theta(x_t [B,C,H,W], t [B]) -> [B,C,H,W] from a diffusers UNet."""
    return lambda x_t, t: unet(x_t, t, return_dict=False)[0]


class Diffusion:
    """DDPM forward process and loss over a diffusers scheduler's alpha-bar schedule."""

    def __init__(self, scheduler: DDPMScheduler):
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)  # [T]
        self.num_timesteps = int(scheduler.config.num_train_timesteps)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t) for integer timesteps t (any shape), same shape."""
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar.sqrt(), (1.0 - abar).sqrt()

    @staticmethod
    def q_sample_with(
        x0: torch.Tensor, eps: torch.Tensor, sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor
    ) -> torch.Tensor:
        """x_t from x0 and eps [B,C,H,W] and per-example coefficients [B]. Usable inside vmap."""
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return sqrt_abar.reshape(shape) * x0 + sqrt_one_minus_abar.reshape(shape) * eps

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) with the given noise. x0, eps [B,C,H,W]; t [B] -> [B,C,H,W]."""
        a, b = self.coefficients(t)
        return self.q_sample_with(x0, eps, a, b)

    def draw(
        self, x0: torch.Tensor, draws: int, generator: torch.Generator | None = None,
        timesteps: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform timesteps [B, K] in [low, high) (`timesteps`; default all of them) and Gaussian
        noise [B, K, C, H, W] for K draws per example."""
        b = x0.shape[0]
        low, high = timesteps or (0, self.num_timesteps)
        t = torch.randint(low, high, (b, draws), generator=generator, device="cpu")
        eps = torch.randn((b, draws, *x0.shape[1:]), generator=generator, device="cpu")
        return t.to(x0.device), eps.to(x0.device)

    def per_example_loss(
        self, eps_model: Denoiser, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """Denoising loss per example, averaged over K draws (noise multiplicity).

        x0 [B,C,H,W]; t [B,K] timesteps; eps [B,K,C,H,W] noise. Returns [B]: the mean over draws
        and pixels of (eps_theta(x_t, t) - eps)^2. The caller fixes t and eps, so DP clipping and
        membership attacks can score the same example under the same noise.
        """
        b, k = t.shape
        x0_rep = x0.unsqueeze(1).expand(b, k, *x0.shape[1:]).reshape(b * k, *x0.shape[1:])
        eps_flat = eps.reshape(b * k, *x0.shape[1:])
        t_flat = t.reshape(b * k)
        x_t = self.q_sample(x0_rep, t_flat, eps_flat)
        err = (eps_model(x_t, t_flat) - eps_flat) ** 2
        return err.reshape(b, -1).mean(dim=1) if k == 1 else err.reshape(b, k, -1).mean(dim=(1, 2))


@torch.no_grad()
def sample_images(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    noise: torch.Tensor,
    method: str = "ddim",
    num_inference_steps: int | None = None,
    progress: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Generate images from starting noise [B,C,H,W] with DDPM (ancestral) or DDIM (eta=0).

    num_inference_steps: DDIM defaults to 50; DDPM to the full training chain (fewer is allowed:
    diffusers then skips timesteps).

    Fixed `noise` (and for DDPM a fixed `generator` for the noise added at each step; a list of
    one generator per image makes each image independent of the batch it is in) gives the same
    images from the same model, which makes round-by-round sample grids comparable. Returns
    [B,C,H,W] clipped to [-1, 1].
    """
    if method == "ddim":
        sampler = DDIMScheduler.from_config(scheduler.config)
    elif method == "ddpm":
        sampler = DDPMScheduler.from_config(scheduler.config)
    else:
        raise ValueError(f"sampling method must be 'ddim' or 'ddpm', got '{method}'")
    default_steps = 50 if method == "ddim" else scheduler.config.num_train_timesteps
    sampler.set_timesteps(num_inference_steps or default_steps)
    was_training = unet.training
    unet.eval()
    x = noise.clone()
    steps = sampler.timesteps
    for t in tqdm(steps, desc=f"sampling ({method})", disable=not progress, leave=False):
        eps = unet(x, t.expand(x.shape[0]).to(x.device), return_dict=False)[0]
        x = sampler.step(eps, t, x, generator=generator, return_dict=False)[0]
    unet.train(was_training)
    return x.clamp(-1, 1)


def generate(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    num_samples: int,
    image_size: int,
    sampling: tuple[str, int],
    batch_size: int,
    seed: int,
    progress: bool,
    device: torch.device,
) -> torch.Tensor:
    """num_samples images [N,1,S,S] in [-1,1] by `sampling` = (method, steps), from noise drawn
    once from (seed, "utility-samples") and, for DDPM, one step-noise stream per image: the same
    images whatever the batch size."""
    noise = torch.randn(
        (num_samples, 1, image_size, image_size), generator=torch_generator(seed, "utility-samples")
    )
    method, steps = sampling
    unet = unet.to(device)
    out = []
    with tqdm(total=num_samples, desc="generating", unit="img", disable=not progress) as bar:
        for start in range(0, num_samples, batch_size):
            batch = noise[start : start + batch_size]
            streams = [torch_generator(seed, "utility-steps", start + i) for i in range(len(batch))]
            out.append(
                sample_images(unet, scheduler, batch.to(device), method, steps, generator=streams).cpu()
            )
            bar.update(len(batch))
    return torch.cat(out)
