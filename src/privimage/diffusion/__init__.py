"""The diffusion model: U-Net backbone, EDM preconditioning and loss, ODE sampler and weight averaging."""

from privimage.diffusion.edm import EDMPrecond, edm_loss
from privimage.diffusion.ema import EMA
from privimage.diffusion.sampler import edm_sample, edm_sigmas
from privimage.diffusion.unet import UNet

__all__ = ["EMA", "EDMPrecond", "UNet", "edm_loss", "edm_sample", "edm_sigmas"]
