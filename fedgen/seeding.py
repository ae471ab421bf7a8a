"""One seeding function for what may be reproducible: streams derive from (seed, hospital, round, purpose).

Seeded (reproducible from the config; not part of any guarantee): synthetic data generation,
partitioning and the member/held-out/validation split, model initialisation, validation draws,
sample grids and utility samples, the attacks' noise draws.

Never seeded: what DP-SGD's guarantee rests on, the Gaussian noise and the Poisson sampling, and the
local training's diffusion (timestep, noise) draws (which would help a coordinator invert an update).
They come from the operating system's CSPRNG at each local training (`fedgen.privacy.randomness`), and only
`privacy.reproducible_noise=true` (tests, debugging; every record then says "no guarantee")
derives them from here.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the given parts, stable across processes and platforms (unlike hash())."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def torch_generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
