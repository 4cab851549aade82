"""Where computations run and where their randomness comes from."""

from __future__ import annotations

import secrets

import numpy as np
import torch

from privimage.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; an explicit device that is absent is the user's to fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}' is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but no CUDA GPU is visible: use device=cpu or device=auto")
    return device


def private_seed() -> int:
    """A seed from the OS entropy pool for DP noise and Poisson sampling.

    DP noise must be unpredictable: deriving it from the run's `seed` (which config.yaml records)
    would let anyone holding the config subtract the noise. Everything else is seeded for
    reproducibility.
    """
    return secrets.randbits(63)


def private_numpy_rng() -> np.random.Generator:
    return np.random.default_rng(private_seed())


def private_torch_generator(device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(private_seed())
    return generator
