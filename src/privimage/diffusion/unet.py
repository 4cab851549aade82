"""The denoiser backbone: a small U-Net in the style of EDM's SongUNet (DDPM++ / NCSN++).

BigGAN residual blocks with the noise-and-class embedding injected as a scale/shift after the second
GroupNorm, average-pool / nearest-neighbour resampling inside the blocks, and single-head self-attention.

It is written for DP-SGD: GroupNorm only (BatchNorm mixes samples, so per-sample gradients would not be
per-sample), no in-place ops on activations and no data-dependent control flow, so that
`torch.func.vmap(torch.func.grad(...))` can compute per-sample gradients through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# Residual sums are scaled by sqrt(1/2) to keep the activation variance from growing with depth (EDM).
SKIP_SCALE = math.sqrt(0.5)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with about four channels a group, at most 32 groups, and a group count dividing `channels`."""
    groups = next(g for g in range(min(32, max(channels // 4, 1)), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer that ends a residual branch, so every block starts as the identity (guided-diffusion, EDM)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def positional_embedding(noise_labels: Tensor, channels: int, max_positions: int = 10_000) -> Tensor:
    """Transformer sinusoidal embedding of the (continuous) noise level, shape (B, channels)."""
    half = channels // 2
    freqs = (1 / max_positions) ** (torch.arange(half, device=noise_labels.device, dtype=torch.float32) / half)
    angles = noise_labels.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class SelfAttention(nn.Module):
    """Single-head self-attention over pixels, residual; plain matmuls so it vmaps and runs everywhere."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = zero_init(nn.Conv2d(channels, channels, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).unbind(dim=1)
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(channels), dim=-1)  # (B, query, key)
        attended = (v @ weights.transpose(1, 2)).reshape(batch, channels, height, width)
        return (x + self.proj(attended)) * SKIP_SCALE


class ResBlock(nn.Module):
    """BigGAN residual block; `resample` ("down" / "up") halves or doubles the resolution inside the block."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, resample: str | None = None,
                 attention: bool = False, dropout: float = 0.0):
        super().__init__()
        self.resample = {None: nn.Identity(), "down": nn.AvgPool2d(2), "up": nn.Upsample(scale_factor=2.0)}[resample]
        self.norm0 = group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = zero_init(nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1))
        same_channels = in_channels == out_channels
        self.skip = nn.Identity() if same_channels else nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.attention = SelfAttention(out_channels) if attention else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        x = (h + self.skip(self.resample(x))) * SKIP_SCALE
        return self.attention(x)


class UNet(nn.Module):
    """Class-conditional U-Net F(x, noise_labels, class_labels); label `num_classes` is the "null" class.

    The null label is what label dropout trains and what classifier-free guidance queries; with
    `num_classes == 1` the model is effectively unconditional.
    """

    def __init__(self, *, resolution: int, in_channels: int, num_classes: int, base_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, patch_size: int = 1):
        super().__init__()
        if patch_size < 1 or resolution % patch_size:
            raise ValueError(f"patch_size {patch_size} must be >= 1 and divide the resolution {resolution}")
        self.patch_size = patch_size
        resolution //= patch_size
        in_channels *= patch_size ** 2
        levels = len(channel_mult)
        if levels == 0:
            raise ValueError("channel_mult is empty: give one multiplier per resolution level")
        if resolution % 2 ** (levels - 1):
            raise ValueError(f"{levels} levels need a resolution divisible by {2 ** (levels - 1)}, got {resolution}")
        if base_channels % 2:
            raise ValueError(f"base_channels {base_channels} is odd: GroupNorm and the noise embedding need it even")
        self.num_classes = num_classes
        self.noise_channels = base_channels
        emb_channels = 4 * base_channels

        self.class_embed = nn.Embedding(num_classes + 1, base_channels)
        self.embed_mlp = nn.Sequential(nn.Linear(base_channels, emb_channels), nn.SiLU(),
                                       nn.Linear(emb_channels, emb_channels), nn.SiLU())

        def block(cin: int, cout: int, *, attention: bool = False, resample: str | None = None) -> ResBlock:
            return ResBlock(cin, cout, emb_channels, resample=resample, attention=attention, dropout=dropout)

        # Encoder: every output (the input conv's included) is a skip connection for the decoder.
        self.input_conv = nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1)
        self.encoder = nn.ModuleList()
        channels = base_channels
        skip_channels = [channels]
        for level, mult in enumerate(channel_mult):
            if level > 0:
                self.encoder.append(block(channels, channels, resample="down"))
                skip_channels.append(channels)
            for _ in range(num_res_blocks):
                attention = resolution >> level in attn_resolutions
                self.encoder.append(block(channels, base_channels * mult, attention=attention))
                channels = base_channels * mult
                skip_channels.append(channels)

        # Bottleneck at the lowest resolution: always with attention, as in NCSN++ / EDM (it is cheap there).
        self.middle = nn.ModuleList([block(channels, channels, attention=True), block(channels, channels)])

        # Decoder, lowest resolution first; each level but the first starts by upsampling, and attends
        # once, after its last block (NCSN++ / EDM).
        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            if level < levels - 1:
                self.upsamplers.append(block(channels, channels, resample="up"))
            level_blocks = nn.ModuleList()
            for index in range(num_res_blocks + 1):
                attention = index == num_res_blocks and resolution >> level in attn_resolutions
                level_blocks.append(block(channels + skip_channels.pop(), base_channels * mult, attention=attention))
                channels = base_channels * mult
            self.decoder.append(level_blocks)

        self.output_norm = group_norm(channels)
        self.output_conv = zero_init(nn.Conv2d(channels, in_channels, kernel_size=3, padding=1))

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor) -> Tensor:
        emb = positional_embedding(noise_labels, self.noise_channels) + self.class_embed(class_labels)
        emb = self.embed_mlp(emb)

        x = self.input_conv(F.pixel_unshuffle(x, self.patch_size))
        skips = [x]
        for block in self.encoder:
            x = block(x, emb)
            skips.append(x)
        for block in self.middle:
            x = block(x, emb)
        for level, level_blocks in enumerate(self.decoder):
            if level > 0:
                x = self.upsamplers[level - 1](x, emb)
            for block in level_blocks:
                x = block(torch.cat([x, skips.pop()], dim=1), emb)
        return F.pixel_shuffle(self.output_conv(F.silu(self.output_norm(x))), self.patch_size)
