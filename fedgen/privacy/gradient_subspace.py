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
    """An orthonormal basis V [d, k] over the trainable parameters (in `named_parameters` order)."""

    def __init__(self, basis: torch.Tensor, names: list[str], shapes: list[torch.Size]):
        self.basis = basis
        self.names = names
        self.shapes = shapes

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def project_rows(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each example's gradient {name: [B, *shape]} replaced by its projection V V^T g."""
        rows = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in self.names], dim=1)
        projected = (rows @ self.basis) @ self.basis.T
        return self._split(projected, batch=rows.shape[0])

    @torch.no_grad()
    def project_gradients(self, unet: torch.nn.Module) -> None:
        """The noisy gradient in every trainable parameter's .grad, projected onto V, in place."""
        params = dict(unet.named_parameters())
        flat = torch.cat([params[n].grad.reshape(-1) for n in self.names])  # type: ignore[union-attr]
        projected = self._split(((flat @ self.basis) @ self.basis.T).unsqueeze(0), batch=1)
        for name in self.names:
            params[name].grad.copy_(projected[name][0])  # type: ignore[union-attr]

    def _split(self, rows: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
        sizes = [s.numel() for s in self.shapes]
        return {n: part.reshape(batch, *s) for n, s, part in zip(self.names, self.shapes, rows.split(sizes, dim=1))}


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
    (k = `training.gradient_subspace`), the draws seeded by `round_key` (public)."""
    k, count = cfg.training.gradient_subspace, cfg.training.subspace_images
    if k > count:
        raise ConfigError(f"training.gradient_subspace={k} needs at least as many public images "
                          f"(training.subspace_images={count})")
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
    _, _, vh = torch.linalg.svd(torch.cat(rows), full_matrices=False)
    return GradientSubspace(vh[:k].T.contiguous(), [n for n, _ in named], [p.shape for _, p in named])
