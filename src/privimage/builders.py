"""Config → the objects that the stages, the planner's probe, the audit and the benchmarks build alike.

Each builder reads the config and returns a core object (privimage/diffusion, classifiers.py): the probe
times exactly the step a stage runs because both call the same `pretraining_step`, `sample_batch` and
`finetune_schedule`. Builders sit below the stages and the planner, so neither imports the other.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from omegaconf import DictConfig
from torch import nn

from privimage.checkpoint import load_checkpoint
from privimage.classifiers import ResNetGN, SmallCNN
from privimage.data import ImageDataset
from privimage.diffusion.edm import EDMPrecond, edm_loss
from privimage.diffusion.sampler import edm_sample
from privimage.diffusion.unet import UNet

MODEL_FILE = "model.safetensors"  # the denoiser's EMA weights, in pretrain/ and finetune/


def build_denoiser(cfg: DictConfig, num_classes: int) -> EDMPrecond:
    m = cfg.model
    unet = UNet(
        resolution=cfg.data.resolution, in_channels=cfg.data.channels, num_classes=num_classes,
        base_channels=m.base_channels, channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, patch_size=m.patch_size,
    )
    return EDMPrecond(unet, sigma_data=m.sigma_data)


def load_denoiser(cfg: DictConfig, num_classes: int, path: Path, device: torch.device) -> EDMPrecond:
    net = build_denoiser(cfg, num_classes)
    tensors, _ = load_checkpoint(path)
    net.load_state_dict(tensors)
    return net.to(device).eval()


def diffusion_loss(cfg: DictConfig, num_classes: int) -> Callable:
    """Per-sample EDM loss with the configured label dropout; `forward` is the denoiser."""
    m = cfg.model

    def loss(forward: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return edm_loss(forward, x, y, num_classes=num_classes, sigma_data=m.sigma_data, label_dropout=m.label_dropout)

    return loss


def pretraining_step(net: torch.nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                     y: torch.Tensor, *, bf16: bool) -> torch.Tensor:
    """One optimizer step on the batch's mean loss (returned); the planner's probe times this same step."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(net, x, y).float().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def sample_batch(net: torch.nn.Module, labels: torch.Tensor, cfg: DictConfig, num_classes: int, *, steps: int,
                 bf16: bool, generator: torch.Generator | None = None, init: torch.Tensor | None = None,
                 sigma_max: float = 80.0) -> torch.Tensor:
    """One batch of images in [-1, 1] with the configured sampler (the planner's probe times this same call),
    from pure noise or from `init` noised to `sigma_max` (sampler.edm_sample)."""
    s = cfg.sample
    shape = (len(labels), cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    with torch.inference_mode(), torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=bf16):
        return edm_sample(net, labels, shape=shape, num_classes=num_classes, steps=steps, guidance=s.guidance,
                          solver=s.solver, generator=generator, init=init, sigma_max=sigma_max)


class Schedule(NamedTuple):
    sample_rate: float
    steps: int


def finetune_schedule(cfg: DictConfig, num_samples: float) -> Schedule:
    """DP-SGD's Poisson sampling rate and number of steps. N is treated as public, as in Opacus and the paper."""
    f = cfg.finetune
    sample_rate = min(1.0, f.batch_size / num_samples)
    steps = math.ceil(f.epochs / sample_rate) if f.epochs is not None else int(f.steps)
    return Schedule(sample_rate, steps)


def build_classifier(cfg: DictConfig, public: ImageDataset) -> nn.Module:
    c = cfg.semantics.classifier
    if c.arch == "resnet":
        return ResNetGN(public.channels, public.num_classes, width=c.width, blocks=tuple(c.blocks))
    return SmallCNN(public.channels, public.num_classes, width=c.width)
