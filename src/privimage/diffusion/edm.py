"""EDM preconditioning and training loss (Karras et al. 2022, "Elucidating the Design Space ...").

The preconditioning scales the network's input and output so that, at every noise level, its input and
its training target both have unit variance; the loss weight then makes every noise level contribute
equally at initialisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from privimage.diffusion.unet import UNet

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


class EDMPrecond(nn.Module):
    """The denoiser D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c) around a U-Net F."""

    def __init__(self, unet: UNet, sigma_data: float = 0.5):
        super().__init__()
        self.unet = unet
        self.sigma_data = sigma_data

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor) -> Tensor:
        """`sigma` has shape (B,) (or is a scalar for the whole batch); the result has the shape of `x`."""
        sigma = sigma.to(x.dtype).expand(x.shape[0])
        sigma_img = sigma.reshape(-1, 1, 1, 1)
        variance = sigma_img.square() + self.sigma_data**2
        c_skip = self.sigma_data**2 / variance
        c_out = sigma_img * self.sigma_data / variance.sqrt()
        c_in = variance.rsqrt()
        c_noise = sigma.log() / 4
        return c_skip * x + c_out * self.unet(c_in * x, c_noise, class_labels)


def edm_loss(denoiser: Denoiser, x: Tensor, class_labels: Tensor, *, num_classes: int, sigma_data: float = 0.5,
             p_mean: float = -1.2, p_std: float = 1.2, label_dropout: float = 0.1) -> Tensor:
    """Per-sample EDM loss, shape (B,): weighted squared error of denoising x at a random noise level.

    ln sigma ~ N(p_mean, p_std^2); labels become the null label `num_classes` with probability
    `label_dropout`, which trains the unconditional model used by classifier-free guidance. All randomness
    comes from the global torch RNG, so under `vmap(..., randomness="different")` every sample draws its own.
    """
    batch = x.shape[0]
    sigma = (torch.randn(batch, device=x.device) * p_std + p_mean).exp()
    weight = (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()
    dropped = torch.rand(batch, device=x.device) < label_dropout
    labels = torch.where(dropped, torch.full_like(class_labels, num_classes), class_labels)
    noisy = x + torch.randn_like(x) * sigma.reshape(-1, 1, 1, 1)
    squared_error = (denoiser(noisy, sigma, labels) - x).square()
    return weight * squared_error.flatten(1).mean(dim=1)
