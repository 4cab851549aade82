"""Image classifiers shared by the semantic query (public data) and the downstream evaluation.

Both jobs train small nets on small grayscale or colour images on a CPU, so the nets are
CIFAR-style (3×3 stem, no max-pool) and use GroupNorm: it does not depend on the batch, so
train and eval behave alike and the same nets remain usable under DP-SGD.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from privimage import distributed
from privimage.data import to_tensor


# Both heads see the last feature maps averaged over a fixed grid: it keeps coarse positions, which
# characters need, and makes the head's size independent of the image resolution.
HEAD_GRID = 4


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = _group_norm(out_channels)
        # Zero-initialised last norm: every block starts as the identity (Goyal et al. 2017).
        nn.init.zeros_(self.norm2.weight)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), _group_norm(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNetGN(nn.Module):
    """CIFAR-style ResNet: stage i has `blocks[i]` blocks of `width·2^i` channels, stride 2 between stages.

    The head averages the last feature maps over a 4×4 grid instead of globally. GroupNorm centres
    each image's feature maps, so a global mean says little, and where a stroke is matters for
    characters; it also transfers best from UCI digits to MNIST, the semantic query's job
    (docs/experiments.md#design-measurements).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 32,
        blocks: Sequence[int] = (1, 1, 1),
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            _group_norm(width),
            nn.ReLU(),
        ]
        channels = width
        for stage, num_blocks in enumerate(blocks):
            out_channels = width * 2**stage
            for block in range(num_blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        layers += [nn.AdaptiveAvgPool2d(HEAD_GRID), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels * HEAD_GRID**2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


class SmallCNN(nn.Module):
    """Three convolutions, pooling early: ~6 M multiply-adds per 28×28 image, so CPU-cheap."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, 1, 1), _group_norm(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(in_channels, width),
            nn.MaxPool2d(2),
            *conv(width, 2 * width),
            nn.MaxPool2d(2),
            *conv(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(HEAD_GRID),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(2 * width * HEAD_GRID**2, 4 * width),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> Tensor:
    u = torch.rand(n, generator=generator, device=generator.device).to(device)
    return low + (high - low) * u


def augment(x: Tensor, generator: torch.Generator, strength: float = 1.0) -> Tensor:
    """Randomly distort a batch of images in [-1, 1] (NCHW, light ink on a dark background).

    Printed glyphs and 8×8 UCI digits differ from handwriting mostly in slant, proportions,
    position and stroke width; the distortions below cover those, so that a classifier trained on
    public glyphs ranks real handwriting by its shape. `strength` scales every range (0 = identity).
    """
    if strength <= 0:
        return x
    n, device = x.shape[0], x.device

    def uniform(bound: float) -> Tensor:
        return _uniform(n, -bound * strength, bound * strength, generator, device)

    # Affine: rotation ±15°, shear ±0.3, per-axis scale ±15 % (so aspect changes), shift ±8 %.
    angle = torch.deg2rad(uniform(15.0))
    shear = uniform(0.3)
    scale_x, scale_y = torch.exp(uniform(0.15)), torch.exp(uniform(0.15))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output coordinates to input coordinates: rotation · shear · scale.
    a = torch.stack([cos, -sin + cos * shear, sin, cos + sin * shear], dim=1).view(n, 2, 2)
    a = a / torch.stack([scale_x, scale_y], dim=1).view(n, 2, 1)
    shift = torch.stack([uniform(0.08), uniform(0.08)], dim=1).view(n, 2, 1)
    grid = F.affine_grid(torch.cat([a, shift], dim=2), list(x.shape), align_corners=False)
    # Sample x + 1 with zero padding so that what enters from outside is background (-1).
    x = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1

    # Stroke width: blend towards a 3×3 dilation (thicker ink) or erosion (thinner ink). Erosion is
    # capped at half way: a full 3×3 erosion wipes out the 2-3 px strokes of 28×28 handwriting.
    thickness = _uniform(n, -0.5 * strength, strength, generator, device).view(n, 1, 1, 1)
    dilated = F.max_pool2d(x, 3, 1, 1)
    eroded = -F.max_pool2d(-x, 3, 1, 1)
    x = x + thickness.clamp(min=0) * (dilated - x) + (-thickness).clamp(min=0) * (eroded - x)

    # Mild blur: blend towards a separable [1, 2, 1]/4 binomial filter.
    channels = x.shape[1]
    kernel = torch.tensor([1.0, 2.0, 1.0], device=device, dtype=x.dtype) / 4
    horizontal = kernel.view(1, 1, 1, 3).repeat(channels, 1, 1, 1)
    blurred = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="replicate"), horizontal, groups=channels)
    blurred = F.conv2d(F.pad(blurred, (0, 0, 1, 1), mode="replicate"), horizontal.transpose(2, 3), groups=channels)
    blur = _uniform(n, 0.0, 0.5 * strength, generator, device).view(n, 1, 1, 1)
    x = x + blur * (blurred - x)
    return x.clamp(-1, 1)


# `train_classifier` takes an argument named `augment` (its strength), which hides the function.
_distort = augment


def _epoch_indices(labels: Tensor, balanced: bool, generator: torch.Generator) -> Tensor:
    """One epoch's sample order: a permutation, or (balanced) as many draws with class-equal odds."""
    if not balanced:
        return torch.randperm(len(labels), generator=generator)
    weights = 1.0 / torch.bincount(labels).double()[labels]
    return torch.multinomial(weights, len(labels), replacement=True, generator=generator)


def train_classifier(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    augment: float = 0.0,
    balanced: bool = False,
    seed: int = 0,
    device: str = "cpu",
    desc: str | None = None,
    data_parallel: bool = False,
    bf16: bool = False,
) -> nn.Module:
    """Train `model` with cross-entropy, AdamW and a one-cycle schedule; return it in eval mode.

    Images stay uint8 and are converted per batch, so large public sets never exist as float32.
    `augment` is the strength given to `augment()`; `balanced` samples every class equally often,
    which keeps big public classes from absorbing the votes of a semantic query. With `data_parallel`
    (under torchrun; every rank must call) the model trains as DDP, each rank on its share of every batch.
    `bf16` runs the forward pass under bfloat16 autocast (weights and AdamW stay float32): a speed lever
    for the semantic classifier only; the downstream classifiers, which are the measure, train in float32.
    """
    generator = torch.Generator().manual_seed(seed)  # the same on every rank: one global batch order
    rank = distributed.rank() if data_parallel else 0
    distortions = torch.Generator().manual_seed(seed + 1 + rank)  # each rank its own
    label_tensor = torch.as_tensor(labels, dtype=torch.long)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    model.to(device).train()
    trained = DistributedDataParallel(model) if data_parallel else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    quiet = desc is None or (data_parallel and not distributed.is_main())
    with tqdm(total=epochs * steps_per_epoch, desc=desc, disable=quiet, leave=False) as progress:
        for _ in range(epochs):
            order = _epoch_indices(label_tensor, balanced, generator)
            for batch in order.split(batch_size):
                if data_parallel:
                    batch = distributed.shard(batch)  # each rank its share, DDP averages the gradients
                x = to_tensor(images[batch.numpy()]).to(device)
                x = _distort(x, distortions, augment)
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    loss = F.cross_entropy(trained(x), label_tensor[batch].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.update()
                if not progress.disable:  # .item() waits for the device: only when someone watches
                    progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: np.ndarray, batch_size: int = 512, device: str = "cpu",
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Logits for uint8 NHWC images, on the CPU; leaves the model's train/eval mode as it was.

    `reduce` maps each batch's logits first (e.g. to the argmax), so that N × classes floats need
    not exist at once for a large set. Images are read a batch at a time (an ImageFile included). The
    model always sees `batch_size` images, a short batch padded with zeros: a CPU picks its kernels by
    batch size, and an image's logits (its votes in the semantic query) must not depend on which other
    images share its batch.
    """
    was_training = model.training
    model.to(device).eval()
    reduce = reduce or (lambda logits: logits)
    result = torch.empty(0)
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size])
        padded = torch.cat([x, x.new_zeros((batch_size - len(x), *x.shape[1:]))])
        batch = reduce(model(padded.to(device))[: len(x)]).cpu()
        if start == 0:  # one array for all: many small ones kept between batches fragment the heap
            result = batch.new_empty((len(images), *batch.shape[1:]))
        result[start : start + len(batch)] = batch
    model.train(was_training)
    return result


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: str = "cpu") -> float:
    predictions = predict_logits(model, images, device=device, reduce=lambda logits: logits.argmax(1)).numpy()
    return float(np.mean(predictions == np.asarray(labels)))
