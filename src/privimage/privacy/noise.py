"""Where the DP randomness comes from: the Gaussian noise of every mechanism and Poisson sampling.

DP noise must be unpredictable to anyone holding the run's files: deriving it from the config's
`seed`, or from any seed small enough to enumerate, would let them test candidate seeds against the
published noisy values and subtract the noise. `GaussianNoise` therefore seeds numpy's PCG64 (128 bits
of state) from 256 bits of OS entropy; torch's own generators take 64-bit seeds and are not used for
DP randomness. `SecureGaussianNoise` is Opacus' secure mode: torchcsprng's /dev/urandom generator and
a sampler robust to floating-point attacks on naive Gaussian sampling (Mironov 2012; Holohan &
Braghin 2021).
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from torch import Tensor

ENTROPY_BITS = 256


class GaussianNoise:
    """Gaussian noise and uniforms from PCG64; `seed` only for tests (None: OS entropy)."""

    def __init__(self, seed: int | None = None):
        self.rng = np.random.Generator(np.random.PCG64(secrets.randbits(ENTROPY_BITS) if seed is None else seed))

    def gaussian_like(self, t: Tensor, std: float) -> Tensor:
        """N(0, std²) of t's shape, dtype and device."""
        draws = self.rng.standard_normal(tuple(t.shape), dtype=np.float32)
        return torch.from_numpy(draws).to(device=t.device, dtype=t.dtype).mul_(std)

    def gaussian_array(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return self.rng.normal(0.0, std, size=shape)

    def uniform(self, n: int) -> Tensor:
        """n draws of U[0, 1), float64 on the CPU."""
        return torch.from_numpy(self.rng.random(n))


class SecureGaussianNoise:
    """The same interface, drawn as Opacus' secure mode draws (needs torchcsprng built for your torch)."""

    def __init__(self) -> None:
        import torchcsprng  # raises ImportError: callers turn it into a UserError

        self.generator = torchcsprng.create_random_device_generator("/dev/urandom")

    def gaussian_like(self, t: Tensor, std: float) -> Tensor:
        from opacus.optimizers.optimizer import _generate_noise

        return _generate_noise(std, t.cpu(), self.generator, secure_mode=True).to(device=t.device, dtype=t.dtype)

    def gaussian_array(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return self.gaussian_like(torch.zeros(shape, dtype=torch.float64), std).numpy()

    def uniform(self, n: int) -> Tensor:
        return torch.rand(n, generator=self.generator, dtype=torch.float64)


NoiseSource = GaussianNoise | SecureGaussianNoise
