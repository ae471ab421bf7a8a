"""DP-SGD in a gradient subspace found on public images (`training.gradient_subspace=k`).

DP noise is isotropic: its norm grows with the square root of the trained coordinates (267k at the
tiny model, so at epsilon 8 the noise of one step is some 500x the clipped mean gradient), while
the per-example gradients of a diffusion model live almost entirely in a few directions. Projected
DP-SGD (Zhou et al., ICLR 2021; GEP, Yu et al., ICLR 2021) finds those directions on public data
and noises only there: at each round's start the hospital takes per-example gradients of public
images at the global model, keeps their top-k right singular vectors V [d, k], and in every DP
step projects each example's gradient onto V before clipping, and the noisy sum onto V after the
noise. The noise that remains is k-dimensional.

Privacy: V is a function of public images and the global model (both public), so it costs nothing;
each projected example still contributes at most C before the Gaussian noise (the accountant's
mechanism, unchanged); projecting the noisy sum is post-processing. The basis's (timestep, noise)
draws come from a seed: they touch no private image, so they need not be secret.
"""

from __future__ import annotations

import torch

from fedgen.config import ConfigError, ExperimentConfig
from fedgen.data.dataset import ImageSet
from fedgen.data.public import public_archive
from fedgen.diffusion import Diffusion
from fedgen.privacy.per_sample_grads import per_sample_gradients
from fedgen.seeding import torch_generator

CHUNK = 32  # public images per per-example gradient computation


class GradientSubspace:
    """An orthonormal basis V [d, k] over the trainable parameters, kept as one row block per
    parameter ({name: [numel, k]}), so projecting never concatenates the gradients."""

    def __init__(self, blocks: dict[str, torch.Tensor]):
        self.blocks = blocks

    @property
    def basis(self) -> torch.Tensor:
        return torch.cat(list(self.blocks.values()))

    def _coefficients(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(rows[n].reshape(rows[n].shape[0], -1) @ v for n, v in self.blocks.items())  # type: ignore[return-value]

    def project_rows(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each example's gradient {name: [B, *shape]} replaced by its projection V V^T g."""
        coefficients = self._coefficients(grads)
        return {n: (coefficients @ v.T).reshape(grads[n].shape) for n, v in self.blocks.items()}

    @torch.no_grad()
    def project_gradients(self, unet: torch.nn.Module) -> None:
        """The noisy gradient in every trainable parameter's .grad, projected onto V, in place."""
        params = dict(unet.named_parameters())
        grads = {n: params[n].grad.unsqueeze(0) for n in self.blocks}  # type: ignore[union-attr]
        for name, projected in self.project_rows(grads).items():
            params[name].grad.copy_(projected[0])  # type: ignore[union-attr]


_PUBLIC: dict[tuple, torch.Tensor] = {}  # per process: a Ray worker trains many hospitals


def _public_images(cfg: ExperimentConfig, count: int) -> torch.Tensor:
    """`count` images of the public archive (`pretrain.*`), drawn by its seed."""
    key = (repr(cfg.pretrain), cfg.data.image_size, count)
    if key not in _PUBLIC:
        _PUBLIC.clear()
        _PUBLIC[key] = _draw_public(cfg, count)
    return _PUBLIC[key]


def _draw_public(cfg: ExperimentConfig, count: int) -> torch.Tensor:
    archive: ImageSet = public_archive(cfg.pretrain, cfg.data.image_size, cfg.pretrain.seed)
    if len(archive) < count:
        raise ConfigError(f"training.subspace_images={count}, but the public archive holds {len(archive)} images")
    pick = torch.randperm(len(archive), generator=torch_generator(cfg.pretrain.seed, "subspace-images"))[:count]
    return archive.images[pick]


def public_subspace(unet: torch.nn.Module, diffusion: Diffusion, cfg: ExperimentConfig,
                    round_key: tuple) -> GradientSubspace:
    """The top-k directions of public images' per-example gradients at `unet`'s current weights
    (k = `training.gradient_subspace`, at most `subspace_images`: `fedgen.config.validate`), the
    draws seeded by `round_key` (public)."""
    k, count = cfg.training.gradient_subspace, cfg.training.subspace_images
    images = _public_images(cfg, count)
    device = next(unet.parameters()).device
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    generator = torch_generator(*round_key, "subspace-draws")
    rows = []
    for start in range(0, count, CHUNK):
        x0 = images[start:start + CHUNK]
        t, eps = diffusion.draw(x0, cfg.training.noise_multiplicity, generator=generator)
        grads, _ = per_sample_gradients(unet, diffusion, x0.to(device), t.to(device), eps.to(device))
        rows.append(torch.cat([grads[n].reshape(len(x0), -1) for n, _ in named], dim=1))
    gradients = torch.cat(rows).double()  # [n, d]: n << d, so through the n x n Gram matrix
    values, vectors = torch.linalg.eigh(gradients @ gradients.T)  # ascending
    top = vectors[:, -k:].flip(1) / values[-k:].flip(0).clamp(min=1e-30).sqrt()
    basis = torch.linalg.qr(gradients.T @ top)[0].float()  # the top right singular vectors [d, k], re-orthonormalised
    sizes = [p.numel() for _, p in named]
    return GradientSubspace({n: block for (n, _), block in zip(named, basis.split(sizes))})
