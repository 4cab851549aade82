"""DP-MERF (Harder et al., AISTATS 2021): one noisy release of class-conditional mean embeddings.

Each sensitive image x of class y contributes the unit vector v = [φ(x), 1] / √2 to row y of a
C × (D + 1) matrix, where φ is a D-dimensional feature map with ‖φ(x)‖ ≤ 1: DP-MERF's random Fourier
features of a Gaussian kernel, or (DP-MEPF, Harder et al., TMLR 2023) those joined with the
normalised features of a network trained on public data only. Adding or removing one image moves the
sum by a vector of norm at most 1, so the sum plus N(0, σ²) on every entry is a Gaussian mechanism with
noise multiplier σ: the only access to sensitive data. The last column holds the (noisy) class sizes,
so that the release also gives each class's mean embedding.

A generator is then trained to match those noisy means (an MMD with the random-feature kernel),
which is post-processing: it costs no further privacy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from privimage.privacy.noise import NoiseSource

FeatureMap = Callable[[Tensor], Tensor]  # images in [-1, 1] → rows of norm ≤ 1
SIZE_WEIGHT = 1 / math.sqrt(2)  # of the constant feature; φ gets the same weight, so ‖v‖ = 1
FEATURE_BATCH = 256  # images a call of the feature map sees in the release (embedding_sum)


class RandomFeatures:
    """φ(x) = [cos(xW), sin(xW)] / √F with W ~ N(0, 1/ℓ²): E φ(x)·φ(x') = exp(-‖x - x'‖² / 2ℓ²)."""

    def __init__(self, dim: int, features: int, length_scale: float, generator: torch.Generator):
        self.weights = torch.randn(dim, features, generator=generator) / length_scale
        self.features = features

    def __call__(self, x: Tensor) -> Tensor:
        projection = x.flatten(1) @ self.weights.to(x.device)
        return torch.cat([projection.cos(), projection.sin()], dim=1) / math.sqrt(self.features)


class NetworkFeatures:
    """ψ(x) = h(x) / ‖h(x)‖, h the penultimate features (`network.features`) of a frozen network.

    DP-MEPF's perceptual features: a classifier trained on public data sees what tells shapes apart,
    which random features of the pixels spread over thousands of noisy coordinates. The network must
    never have seen sensitive data, so that ψ, like random features, depends on none. With `bf16` its
    forward runs under bfloat16 autocast; the normalisation is float32, so ‖ψ(x)‖ ≤ 1 either way.
    """

    def __init__(self, network: nn.Module, bf16: bool = False):
        self.network = network.eval().requires_grad_(False)
        self.bf16 = bf16

    def __call__(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            h = self.network.features(x)
        h = h.float().flatten(1)
        return h / h.norm(dim=1, keepdim=True).clamp(min=1e-12)


class JointFeatures:
    """[√s₁ φ₁(x), √s₂ φ₂(x), ...] with Σ s = 1: squared norms add, so unit-bounded parts give a
    unit-bounded whole and the release keeps sensitivity 1. A part with share 0 is left out."""

    def __init__(self, *parts: tuple[FeatureMap, float]):
        if any(share < 0 for _, share in parts) or not math.isclose(sum(share for _, share in parts), 1.0):
            raise ValueError(f"the shares must be non-negative and sum to 1, got {[share for _, share in parts]}")
        self.parts = [(features, math.sqrt(share)) for features, share in parts if share > 0]

    def __call__(self, x: Tensor) -> Tensor:
        return torch.cat([features(x) * weight for features, weight in self.parts], dim=1)


def embedding_sum(features: FeatureMap, batches: Iterator[tuple[Tensor, Tensor]], num_classes: int) -> Tensor:
    """Σ_i v_i in row y_i: the exact, private statistic; callers pass it only to `release`.

    `features` sees FEATURE_BATCH images a call, a short batch padded with zeros: a CPU picks its convolution
    kernels by batch size, and with another kernel an image's features move by up to 1e-3, so one image
    more or less would move every other image's row and the sum by more than the sensitivity of 1.
    """
    total = None
    for x, y in _fixed_size(batches):
        v = torch.cat([features(x)[:len(y)] * SIZE_WEIGHT, torch.full((len(y), 1), SIZE_WEIGHT, device=x.device)],
                      dim=1)
        v = bounded(v.double().cpu())
        if total is None:
            total = torch.zeros(num_classes, v.shape[1], dtype=torch.float64)
        total.index_add_(0, y.cpu(), v)
    if total is None:
        raise ValueError("no images to embed")
    return total


def _fixed_size(batches: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """The images in batches of exactly FEATURE_BATCH (the last padded with zeros), with their labels."""
    for x, y in batches:
        for i in range(0, len(x), FEATURE_BATCH):
            piece = x[i:i + FEATURE_BATCH]
            padding = piece.new_zeros((FEATURE_BATCH - len(piece), *piece.shape[1:]))
            yield torch.cat([piece, padding]), y[i:i + FEATURE_BATCH]


def bounded(v: Tensor) -> Tensor:
    """Each row scaled to norm at most 1, and a row that is not finite (a feature map that overflowed) set
    to zero, as DP-SGD drops a non-finite gradient: the sensitivity is 1 whatever the feature map returns,
    float rounding included (unit rows come out of float32 up to 1e-7 longer)."""
    v = torch.where(torch.isfinite(v).all(dim=1, keepdim=True), v, torch.zeros_like(v))
    return v / v.norm(dim=1, keepdim=True).clamp(min=1.0)


def release(total: Tensor, noise_multiplier: float, noise: NoiseSource) -> Tensor:
    """The Gaussian mechanism (L2 sensitivity 1): N(0, σ²) on every entry."""
    return total + torch.from_numpy(noise.gaussian_array(tuple(total.shape), noise_multiplier))


def class_means(noisy_total: Tensor) -> Tensor:
    """Each class's mean feature vector from the noisy release (post-processing).

    A noisy class size below one image is read as one: the mean then is merely noisier.
    """
    sizes = (noisy_total[:, -1:] / SIZE_WEIGHT).clamp(min=1.0)
    return (noisy_total[:, :-1] / SIZE_WEIGHT / sizes).float()


class Generator(nn.Module):
    """A small class-conditional convolutional generator: (code, label) → image in [-1, 1]."""

    def __init__(self, num_classes: int, channels: int, resolution: int, *, code_dim: int = 32, width: int = 64):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"the generator upsamples twice: resolution must be a multiple of 4, got {resolution}")
        self.code_dim, self.base = code_dim, resolution // 4
        self.label_embedding = nn.Embedding(num_classes, code_dim)
        self.project = nn.Sequential(nn.Linear(2 * code_dim, 2 * width * self.base ** 2),
                                     nn.BatchNorm1d(2 * width * self.base ** 2), nn.ReLU())
        self.decode = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, channels, 3, padding=1), nn.Tanh(),
        )

    def forward(self, code: Tensor, labels: Tensor) -> Tensor:
        h = self.project(torch.cat([code, self.label_embedding(labels)], dim=1))
        return self.decode(h.view(len(code), -1, self.base, self.base))

    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        code = torch.randn(len(labels), self.code_dim, generator=generator, device=generator.device).to(labels.device)
        return self(code, labels)


def train_generator(generator: Generator, features: FeatureMap, target_means: Tensor, *, steps: int,
                    per_class: int, lr: float, seed: int, bf16: bool = False, progress=None) -> list[float]:
    """Adam on Σ_c ‖mean φ(G(z, c)) − m_c‖² over balanced batches (`per_class` codes a class a step).

    The generator trains channels-last (faster convolutions on a CPU); with `bf16` its forward runs
    under bfloat16 autocast (its images are stored as uint8, coarser than bfloat16), while the random
    features and the loss stay float32 (benchmarks/bf16_levers.py); NetworkFeatures has its own flag.
    """
    num_classes = len(target_means)
    device = next(generator.parameters()).device
    generator.to(memory_format=torch.channels_last)
    labels = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    targets = target_means.to(device)
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
    code_generator = torch.Generator().manual_seed(seed)
    generator.train()
    losses = []
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            images = generator.sample(labels, code_generator)
        phi = features(images.float())
        means = phi.view(num_classes, per_class, -1).mean(dim=1)
        loss = (means - targets).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update()
    return losses


def fixed_features(dim: int, features: int, relative_length_scale: float, seed: int) -> RandomFeatures:
    """Random features drawn from `seed`, with ℓ = relative_length_scale · √dim: a data-independent rule,
    so the kernel reads no data (DP-MERF's median heuristic is a statistic of the sensitive images)."""
    return RandomFeatures(dim, features, relative_length_scale * math.sqrt(dim), torch.Generator().manual_seed(seed))
