"""Writing image tensors to disk as PNG grids (samples, data previews)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def grid_array(images: torch.Tensor, nrow: int = 8, padding: int = 2, upscale: int = 1) -> np.ndarray:
    """Images [N, C, H, W] (C = 1 or 3) or [N, H, W] in [-1, 1] as one uint8 grid [H', W', C].

    nrow images per row, `padding` black pixels between them; each pixel repeated `upscale`
    times in both directions, so 32x32 samples stay visible. Values outside [-1, 1] are clipped.
    """
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images must be [N, 1 or 3, H, W] with N >= 1, got {tuple(images.shape)}")
    if nrow < 1 or padding < 0 or upscale < 1:
        raise ValueError(
            f"need nrow >= 1, padding >= 0, upscale >= 1; got {nrow}, {padding}, {upscale}"
        )
    quantised = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = quantised.numpy().transpose(0, 2, 3, 1)  # [N, H, W, C]
    if upscale > 1:
        pixels = pixels.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = pixels.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid


def save_grid(
    images: torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2, upscale: int = 1
) -> Path:
    """Write images [N, C, H, W] or [N, H, W] in [-1, 1] as one PNG grid (see `grid_array`)."""
    grid = grid_array(images, nrow, padding, upscale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def display_upscale(image_size: int, target: int = 64) -> int:
    """Pixel repeat that shows small images at about `target` pixels (16 px images: 4x)."""
    return max(1, target // max(1, image_size))
