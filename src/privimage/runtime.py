"""Where computations run and where their randomness comes from."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from privimage.distributed import local_device
from privimage.errors import UserError
from privimage.privacy.noise import GaussianNoise, NoiseSource, SecureGaussianNoise


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


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Torch's global generator seeded for the block and restored after it.

    Only for what cannot take an explicit generator: module initialisation, and the diffusion loss's
    noise, which `vmap(randomness="different")` draws from the global generator. Never for DP noise.
    """
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def dp_noise_source(secure: bool) -> NoiseSource:
    """The source of all DP randomness of a run (privacy.secure_rng picks Opacus' secure mode)."""
    if not secure:
        return GaussianNoise()
    try:
        return SecureGaussianNoise()
    except ImportError:
        raise UserError("privacy.secure_rng=true needs torchcsprng (pip install torchcsprng, built for your "
                        "torch); or set privacy.secure_rng=false") from None
