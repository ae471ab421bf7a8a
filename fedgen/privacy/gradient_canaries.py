"""Gradient canaries for the white-box DP-SGD audit (`dp_audit`): per-example gradient rows that
are a worst case for DP-SGD, on coordinates the real examples hardly touch.

Canary i is a Dirac row: CANARY_NORM * C on one coordinate c_i of the flattened trainable
parameters, zero elsewhere (Nasr et al. 2023, "Tight auditing"; the white-box setting of Steinke,
Nasr & Jagielski 2023). Why Dirac rather than random directions:
- Dirac rows are exactly orthogonal, so a canary's presence never moves another canary's score;
  m random unit directions in d dimensions are only nearly so: each of the ~q m / 2 canaries
  sampled at a step adds about C / sqrt(d) of cross-talk to every other score.
- Placed on the coordinates where the real images' clipped gradients are smallest (measured on a
  probe batch, `quietest_coordinates`), the real data add almost nothing along them, whereas a
  random direction collects |g| / sqrt(d) from every real gradient g. Both only add variance to
  the scores, which the one-run bound pays for.
With the tiny UNet (d = 267k) up to tens of thousands of canaries fit on distinct coordinates.

Norm CANARY_NORM * C >= C: a correct step clips each row to exactly C, the sensitivity DP-SGD is
calibrated for, so the audit tests the claim at its worst case; a step that fails to clip lets the
excess through, and the audit sees it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedgen.diffusion import Diffusion
from fedgen.privacy.per_sample_grads import per_sample_gradients

CANARY_NORM = 4.0  # a canary row's norm, in units of the clipping bound C


class ParameterLayout:
    """The trainable parameters of a model laid end to end: flat coordinate <-> (parameter, index)."""

    def __init__(self, model: torch.nn.Module):
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        sizes = torch.tensor([p.numel() for p in self.params])
        self.ends = torch.cumsum(sizes, 0)  # coordinate c lies in parameter searchsorted(ends, c, right)
        self.size = int(self.ends[-1]) if len(sizes) else 0

    def flat(self) -> torch.Tensor:
        """The parameters' current values, [size], float64 on the CPU."""
        return torch.cat([p.detach().reshape(-1).double().cpu() for p in self.params])

    def locate(self, coordinates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(parameter index, index within that parameter's flattened values) of each coordinate."""
        which = torch.searchsorted(self.ends, coordinates, right=True)
        starts = torch.cat([torch.zeros(1, dtype=self.ends.dtype), self.ends])[which]
        return which, coordinates - starts


def quietest_coordinates(
    layout: ParameterLayout,
    model: torch.nn.Module,
    diffusion: Diffusion,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    count: int,
    max_grad_norm: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The `count` coordinates where the probe images' clipped per-example gradients are smallest
    on average, [count] int64 (ties, e.g. exact zeros, broken at random). x0 [B,1,H,W], t [B,K],
    eps [B,K,1,H,W]: the probe batch, as `per_sample_gradients` takes it."""
    if not 1 <= count <= layout.size:
        raise ValueError(f"{count} canaries do not fit on {layout.size} trainable coordinates")
    grads, _ = per_sample_gradients(model, diffusion, x0, t, eps)
    rows = torch.cat([grads[n].reshape(len(x0), -1) for n in layout.names], dim=1).double().cpu()
    clip = (max_grad_norm / (rows.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    magnitude = (rows * clip).abs().mean(dim=0)
    shuffle = torch.randperm(layout.size, generator=generator)
    order = shuffle[torch.argsort(magnitude[shuffle], stable=True)]
    return order[:count]


class CanaryRows(Sequence[dict[str, torch.Tensor]]):
    """The rows of the canaries sampled at one step, as chunks of at most `chunk` rows
    ({name: [r, *param.shape]}, what `noisy_step`'s `extra_rows` takes).

    A dense row per canary is d floats, so the chunks are written into buffers allocated once and
    reused: a chunk is valid until the next one is asked for (`noisy_step` clips each before
    reading the next). Each chunk gets fresh views, since Opacus marks the tensors it has clipped.
    """

    def __init__(self, layout: ParameterLayout, value: float, chunk: int, device: torch.device):
        self.layout = layout
        self.value = value
        self.chunk = chunk
        self.buffers = [torch.zeros(chunk, p.numel(), device=device) for p in layout.params]
        self.written: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (parameter, rows, indices)
        self.set_step(torch.zeros(0, dtype=torch.long))

    def set_step(self, coordinates: torch.Tensor) -> CanaryRows:
        """The canaries sampled at this step, by coordinate [R]."""
        self.which, self.position = self.layout.locate(coordinates)
        return self

    def __len__(self) -> int:
        return -(-len(self.which) // self.chunk)  # ceil: no rows, no chunk

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]  # no slices
        if not 0 <= i < len(self):
            raise IndexError(i)
        for param, rows, position in self.written:  # clear the previous chunk's entries
            self.buffers[param][rows, position] = 0.0
        self.written = []
        which = self.which[i * self.chunk:(i + 1) * self.chunk]
        position = self.position[i * self.chunk:(i + 1) * self.chunk]
        for param in torch.unique(which).tolist():
            rows = torch.nonzero(which == param).reshape(-1)
            self.buffers[param][rows, position[rows]] = self.value
            self.written.append((param, rows, position[rows]))
        r = len(which)
        return {
            name: buffer[:r].view(r, *p.shape)
            for name, p, buffer in zip(self.layout.names, self.layout.params, self.buffers)
        }
