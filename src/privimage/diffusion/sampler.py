"""Deterministic EDM sampling: Euler or Heun steps along the probability-flow ODE dx/dsigma = (x - D(x)) / sigma."""

from __future__ import annotations

import torch
from torch import Tensor

from privimage.diffusion.edm import Denoiser

SOLVERS = ("heun", "euler")


def edm_sigmas(steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The EDM noise levels: `steps` values from sigma_max to sigma_min, denser near sigma_min, then a final 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def edm_sample(denoiser: Denoiser, class_labels: Tensor, *, shape: tuple, num_classes: int, steps: int = 18,
               sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, guidance: float = 0.0,
               solver: str = "heun", generator: torch.Generator | None = None, init: Tensor | None = None) -> Tensor:
    """Sample one image per label, in [-1, 1], by solving the probability-flow ODE from pure noise, or from
    `init` (images in [-1, 1]) noised to `sigma_max` (SDEdit, Meng et al. 2022: the model redraws what that
    noise hides and keeps the rest).

    `shape` is the image shape (C, H, W), or (B, C, H, W) with B == len(class_labels). With guidance w > 0
    the denoiser is (1 + w) D(x | c) - w D(x | null) (classifier-free guidance); the conditional and
    unconditional passes then run as one batch. Heun costs 2 * steps - 1 denoiser calls, Euler `steps`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")
    if steps < 1:
        raise ValueError(f"{steps} sampling steps: use at least 1")
    batch = class_labels.shape[0]
    if len(shape) == 4:
        if shape[0] != batch:
            raise ValueError(f"shape {tuple(shape)} does not match {batch} class labels")
        shape = tuple(shape[1:])
    device = class_labels.device
    null_labels = torch.full_like(class_labels, num_classes)

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        sigma = sigma.expand(batch)
        if guidance == 0:
            return denoiser(x, sigma, class_labels)
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([class_labels, null_labels]))
        conditional, unconditional = both.chunk(2)
        return conditional + guidance * (conditional - unconditional)

    sigmas = edm_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).to(device, torch.float32)
    # Draw the noise where the generator lives, so a CPU generator gives the same images on any device.
    noise_device = generator.device if generator is not None else device
    x = torch.randn((batch, *shape), generator=generator, device=noise_device).to(device) * sigmas[0]
    if init is not None:
        x = x + init.to(device)
    for index, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        slope = (x - denoise(x, sigma)) / sigma
        x_next = x + (sigma_next - sigma) * slope
        if solver == "heun" and index < steps - 1:  # no correction into sigma = 0, where the slope is undefined
            slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma) * (slope + slope_next) / 2
        x = x_next
    return x.clamp(-1, 1)
