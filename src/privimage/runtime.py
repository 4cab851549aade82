"""Where computations run and where their randomness comes from."""

from __future__ import annotations

import secrets

import numpy as np
import torch

from privimage.distributed import local_device
from privimage.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; an explicit device that is absent is the user's to fix.

    Under torchrun, `cuda` means this process's GPU (its local rank).
    """
    if name == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}' is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but no CUDA GPU is visible: use device=cpu or device=auto")
    return local_device(device) if device.index is None else device


def private_seed() -> int:
    """A seed from the OS entropy pool for DP noise and Poisson sampling.

    DP noise must be unpredictable: deriving it from the run's `seed` (which config.yaml records)
    would let anyone holding the config subtract the noise. Everything else is seeded for
    reproducibility.
    """
    return secrets.randbits(63)


def private_numpy_rng() -> np.random.Generator:
    return np.random.default_rng(private_seed())


class SecureGaussian:
    """`normal(loc, scale, size)` like numpy's, drawn with Opacus' secure sampler from a secure generator."""

    def __init__(self) -> None:
        self.generator = noise_generator("cpu", secure=True)

    def normal(self, loc: float, scale: float, size: tuple[int, ...]) -> np.ndarray:
        from opacus.optimizers.optimizer import _generate_noise

        zeros = torch.zeros(size, dtype=torch.float64)
        return loc + _generate_noise(scale, zeros, self.generator, secure_mode=True).numpy()


def query_noise_rng(secure: bool) -> np.random.Generator | SecureGaussian:
    """The source of the semantic query's Gaussian noise (privacy.secure_rng picks the secure one)."""
    return SecureGaussian() if secure else private_numpy_rng()


def private_torch_generator(device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(private_seed())
    return generator


def noise_generator(device: torch.device | str = "cpu", secure: bool = False) -> torch.Generator:
    """The generator of the DP noise. `secure` takes torchcsprng's /dev/urandom generator, as Opacus'
    secure mode does; without it, torch's generator seeded from OS entropy (unpredictable, but not a
    cryptographic generator: its state could in principle be inferred from enough of its output)."""
    if not secure:
        return private_torch_generator(device)
    try:
        import torchcsprng
    except ImportError:
        raise UserError("privacy.secure_rng=true needs torchcsprng (pip install torchcsprng, built for your "
                        "torch); or set privacy.secure_rng=false") from None
    return torchcsprng.create_random_device_generator("/dev/urandom")
