"""The randomness DP-SGD's guarantee rests on: the Gaussian noise and the Poisson sampling.

The (epsilon, delta) a hospital reports holds only if nobody (the coordinator least of all) can
predict which images each step sampled or what noise it added: with both, the noise could be
subtracted from an update and the sampled images read off. So both are **secret by default**:

- `SecretRandomness` draws every random bit from a ChaCha20 keystream whose 256-bit key and nonce
  come from the operating system's entropy (`os.urandom`) when the local training starts: the
  construction the kernel's own CSPRNG uses (getrandom(2) is ChaCha20 on Linux), run in user space
  through `cryptography` (OpenSSL) because reading 8 MB per step from the kernel cost 16 ms and
  the keystream 2 ms. The key lives in memory only: nothing is seeded from the config, stored,
  logged or sent.
- The diffusion loss's (timestep, noise) draws: not what the DP guarantee rests on (DP-SGD holds
  for any per-example loss), but a coordinator who knows them inverts an update far more easily
  (GIDM, Huang et al. 2024), so they come from a generator seeded by the same keystream.
- Poisson sampling: each example is in the step's batch when a uniform u (53 random bits) is below q.
- Gaussian noise: Box-Muller in float64 on those uniforms; each coordinate is the sum of 4 such
  normals times std/2 (Holohan & Braghin 2021 with n = 2, the fix Opacus's `secure_mode` uses),
  which defeats the floating-point attacks on Gaussian sampling that read the seed-free noise back
  from the low-order bits of a released value (Mironov 2012; Jin et al. 2021, arXiv 2112.05307).
  The sum is then rounded to the gradient's dtype (float32), as in Opacus.

Opacus's own `secure_mode` needs `torchcsprng`, which has no build for current torch (pip finds
none here), so fedgen generates the noise itself (`fedgen.privacy.dp_optimizer` adds it, and
clips, sums and scales as Opacus's DPOptimizer does; Opacus's accountant counts the steps). What
this does not protect against: an attacker on the hospital's machine
(memory, timing side channels of the sampling loop), and a hospital that changes this code.

`ReproducibleRandomness` (`privacy.reproducible_noise=true`) derives both from (seed, hospital,
round), which the config gives to every party: **no privacy guarantee**, for tests and debugging
only. It draws exactly the streams fedgen used before secret noise existed (Opacus's sampler mask
and `torch.normal`), so old figures can be reproduced.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch

from fedgen.seeding import torch_generator

NO_GUARANTEE = "no guarantee: noise reproducible from the config"


class SecretRandomness:
    """Uniforms and Gaussians from a CSPRNG keyed by the OS's entropy (see the module docstring)."""

    reproducible = False

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        self._stream = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None).encryptor()
        self._zeros, self._out = b"", bytearray()

    def uniform(self, n: int) -> torch.Tensor:
        """[n] float64 uniforms in (0, 1], 53 random bits each."""
        words = torch.frombuffer(self._keystream(8 * n), dtype=torch.int64, count=n)
        # The top 53 bits of each word, as a signed integer in [-2^52, 2^52) (the shift keeps the
        # sign), moved to [1, 2^53]: exact in float64, and 53 uniform bits as before.
        return (words >> 11).double().add_(2.0**52 + 1.0).mul_(2.0**-53)

    def _keystream(self, nbytes: int) -> bytearray:
        """The next `nbytes` of keystream (encrypting zeros yields it), in a buffer reused by the
        next call: allocating 8 MB of zeros and of output per DP step cost more than the cipher."""
        if len(self._zeros) < nbytes:
            self._zeros = bytes(nbytes)
            self._out = bytearray(nbytes + 64)  # update_into wants room for a block more
        self._stream.update_into(memoryview(self._zeros)[:nbytes], self._out)
        return self._out

    def _noise(self, n: int, std: float) -> torch.Tensor:
        """[n] float64 N(0, std^2) values (see the module docstring)."""
        u = self.uniform(4 * n)  # 4n normals from 4n uniforms: Box-Muller turns each pair into two
        radius = torch.log(u[: 2 * n]).mul_(-2.0).sqrt_()
        angle = u[2 * n :].mul_(2.0 * math.pi)
        cos_part = radius * torch.cos(angle)
        sin_part = radius.mul_(torch.sin(angle))
        # Each coordinate sums 4 of the normals: two cosine and two sine ones.
        return (cos_part[:n] + cos_part[n:]).add_(sin_part[:n]).add_(sin_part[n:]).mul_(std / 2.0)

    def gaussian(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) noise of `reference`'s shape, dtype and device."""
        noise = self._noise(reference.numel(), std)
        return noise.view_as(reference).to(device=reference.device, dtype=reference.dtype)

    def gaussian_flat(self, references: list[torch.Tensor], std: float) -> torch.Tensor:
        """N(0, std^2) noise for all of `references`' coordinates, flat, in one draw (dtype and
        device of the first)."""
        noise = self._noise(sum(r.numel() for r in references), std)
        return noise.to(device=references[0].device, dtype=references[0].dtype)

    def draws_generator(self) -> torch.Generator:
        """The diffusion loss's (timestep, noise) draws, seeded from the keystream (63 bits)."""
        return torch.Generator().manual_seed(int.from_bytes(self._stream.update(bytes(8)), "little") >> 1)


class ReproducibleRandomness:
    """Streams derived from public seed parts: NO privacy guarantee (tests, debugging)."""

    reproducible = True

    def __init__(self, *seed_parts: int | str):
        self.seed_parts = seed_parts
        self.sampling = torch_generator(*seed_parts, "poisson")
        self.noise = torch_generator(*seed_parts, "dp-noise")

    def draws_generator(self) -> torch.Generator:
        return torch_generator(*self.seed_parts, "draws")

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.sampling)

    def gaussian_flat(self, references: list[torch.Tensor], std: float) -> torch.Tensor:
        """One draw per reference, in order: the stream fedgen drew before it drew all at once."""
        return torch.cat([self.gaussian(r, std).reshape(-1) for r in references])

    def gaussian(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        return torch.normal(0.0, std, size=reference.shape, generator=self.noise).to(
            device=reference.device, dtype=reference.dtype
        )


Randomness = SecretRandomness | ReproducibleRandomness


def privacy_randomness(reproducible: bool, *seed_parts: int | str) -> Randomness:
    """Secret randomness unless the config asks, explicitly, for the reproducible test switch."""
    return ReproducibleRandomness(*seed_parts) if reproducible else SecretRandomness()


def dp_noise_label(summary: dict, configured_reproducible: bool) -> str:
    """'secret', or the no-guarantee label when the config or any hospital's record says the DP
    noise was reproducible from the seed (a run recorded before this was tracked counts as such)."""
    reproducible = summary.get("reproducible_noise", True) or configured_reproducible
    return NO_GUARANTEE if reproducible else "secret"


def poisson_batches(num_examples: int, sample_rate: float, steps: int, randomness: Randomness) -> Iterator[torch.Tensor]:
    """`steps` batches of example indices, each example in each batch with probability q.

    Empty batches are yielded too: the analysis assumes every step releases a noisy update."""
    for _ in range(steps):
        yield torch.nonzero(randomness.uniform(num_examples) < sample_rate).reshape(-1)
