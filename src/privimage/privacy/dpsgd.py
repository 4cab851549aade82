"""DP-SGD (Abadi et al. 2016) with Poisson sampling, for any model whose loss is per-sample.

Per-sample gradients come from `torch.func` (`vmap` over `grad` of a `functional_call`), which needs
no hooks and handles every layer autograd handles, GroupNorm and attention included. BatchNorm has
no per-sample gradient and must not be used. benchmarks/dp_step.py measures its cost against a
non-private step. Norms and clipping run outside the vmap, as one weighted sum per parameter.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from privimage.privacy.noise import GaussianNoise, NoiseSource

# loss_fn(forward, x, y) -> per-sample losses (B,), where forward(*args, **kwargs) runs the model.
LossFn = Callable[[Callable[..., Tensor], Tensor, Tensor], Tensor]


def poisson_batches(num_samples: int, sample_rate: float, steps: int, noise: NoiseSource) -> Iterator[Tensor]:
    """Indices of `steps` logical batches, each sample in each batch independently with `sample_rate`.

    Poisson sampling is what the subsampled-Gaussian accountant assumes: batch sizes vary (and may be
    0), and that variation is part of the privacy guarantee, so batches must not be padded or trimmed.
    Who is in a batch is as secret as the noise, so it comes from the same source.
    """
    for _ in range(steps):
        mask = noise.uniform(num_samples) < sample_rate
        yield mask.nonzero().squeeze(1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class DPSGD:
    """One DP-SGD update per call of `step`, on the Poisson-sampled logical batch it is given.

    Each sample contributes the joint vector (g_i · min(1, C/‖g_i‖), w·C·clamp(l_i, 0, L)/L): its
    clipped gradient and its clipped, scaled loss, whose norm is at most C·sqrt(1 + w²). One Gaussian
    noise of std σ·C·sqrt(1 + w²) on every coordinate of the sum makes the whole vector a subsampled
    Gaussian mechanism with noise multiplier σ, exactly what the accountant charges for the gradients
    alone. So the loss for the progress bar is released for free: the gradient noise grows by
    sqrt(1 + w²) (0.5 % at w = 0.1) and the noisy loss sum, rescaled, is a DP estimate of the mean
    clipped loss. With `loss_weight = 0` this is plain DP-SGD (noise std σ·C) and no loss is released.

    The per-sample loss is the mean over K = `noise_multiplicity` draws of the loss' own randomness
    (e.g. diffusion noise levels), taken before clipping: one sample still moves the sum by at most C,
    so K lowers the variance of the gradient at no privacy cost. `loss_fn` must draw that randomness
    from the global torch RNG; under `vmap(randomness="different")` each sample then gets its own.

    The batch runs in micro-batches of `max_physical_batch // K` samples (at least one), so the model
    sees about `max_physical_batch` rows at once whatever K is. Sums are divided by
    `expected_batch_size` (q·N), never by the real batch size, which is private.
    Under torch.distributed, pass the bare module (not a DistributedDataParallel wrapper), each rank its
    share of the batch, and the global expected batch size: the clipped sums are all-reduced and the
    noise is drawn on rank 0 only, once for the global batch.

    A sample whose loss or gradient is not finite contributes nothing (a zero vector is within any
    clipping bound), so one bad input can neither poison the released sum nor reveal itself by it.
    `noise` is the source of the Gaussian noise (privacy/noise.py; OS entropy when None).

    `bf16` runs the model's forward (and so its backward) under bfloat16 autocast, CPU included: the
    per-sample gradients come back in the parameters' float32, and norms, clipping and noise stay float32.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        noise_multiplicity: int = 1,
        max_physical_batch: int = 64,
        loss_clip: float = 1.0,
        loss_weight: float = 0.1,
        noise: NoiseSource | None = None,
        bf16: bool = False,
    ):
        if clip_norm <= 0 or noise_multiplier < 0 or expected_batch_size <= 0:
            raise ValueError("need clip_norm > 0, noise_multiplier >= 0 and expected_batch_size > 0")
        if noise_multiplicity < 1 or max_physical_batch < 1 or loss_clip <= 0 or loss_weight < 0:
            raise ValueError("need noise_multiplicity >= 1, max_physical_batch >= 1, loss_clip > 0, loss_weight >= 0")
        self.model = model
        self.loss_fn = loss_fn
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        self.noise_multiplicity = noise_multiplicity
        # Memory and speed follow the rows the model sees at once, samples x K.
        self.samples_per_chunk = max(1, max_physical_batch // noise_multiplicity)
        self.loss_clip = loss_clip
        self.loss_weight = loss_weight
        self.noise = noise if noise is not None else GaussianNoise()
        self.bf16 = bf16
        self.noise_std = noise_multiplier * clip_norm * math.sqrt(1 + loss_weight**2)
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._per_sample_grads = vmap(
            grad(self._sample_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different"
        )

    def _sample_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One sample's loss, averaged over K draws: the K copies run as one batch of the model."""
        k = self.noise_multiplicity
        xs, ys = x.expand(k, *x.shape), y.expand(k, *y.shape)

        def forward(*args, **kwargs) -> Tensor:
            return functional_call(self.model, params, args, kwargs)

        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(forward, xs, ys).float().mean()
        return loss, loss.detach()

    def _clipped_sums(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Sum over the batch of the clipped per-sample gradients, and of the clipped losses."""
        params = {name: p.detach() for name, p in self.params.items()}
        grad_sums = {name: torch.zeros_like(p) for name, p in params.items()}
        loss_sum = torch.zeros((), device=x.device)
        for start in range(0, len(x), self.samples_per_chunk):
            end = start + self.samples_per_chunk
            grads, losses = self._per_sample_grads(params, x[start:end], y[start:end])
            norms = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()], dim=1), dim=1
            )
            finite = torch.isfinite(norms) & torch.isfinite(losses)
            scale = torch.where(finite, (self.clip_norm / (norms + 1e-6)).clamp(max=1.0), 0.0)
            for name, g in grads.items():
                if not finite.all():  # 0 · NaN is NaN: zero the bad samples' gradients themselves
                    g = torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, 0.0)
                grad_sums[name] += torch.tensordot(scale, g, dims=1)  # weighted sum, no (B, ...) temporary
            loss_sum += torch.where(finite, losses.detach(), 0.0).clamp(0, self.loss_clip).sum()
        return grad_sums, loss_sum

    def _add_noise_once(self, sums: list[Tensor]) -> None:
        """Add the Gaussian noise to `sums` in place, once for the global batch (rank 0 under DDP)."""
        if not _distributed() or dist.get_rank() == 0:
            for t in sums:
                t.add_(self.noise.gaussian_like(t, self.noise_std))
        if _distributed():
            for t in sums:
                dist.all_reduce(t)

    def step(self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer) -> float | None:
        """One DP-SGD update on the logical batch (x, y), which may be empty.

        Returns a DP estimate of the batch's mean clipped loss, or None when `loss_weight` is 0.
        """
        grad_sums, loss_sum = self._clipped_sums(x, y)
        loss_scale = self.loss_weight * self.clip_norm / self.loss_clip  # maps [0, L] onto [0, w·C]
        scaled_loss_sum = loss_sum * loss_scale
        released = [*grad_sums.values(), scaled_loss_sum] if self.loss_weight > 0 else [*grad_sums.values()]
        self._add_noise_once(released)
        for name, p in self.params.items():
            p.grad = grad_sums[name].div_(self.expected_batch_size)
        optimizer.step()
        if self.loss_weight == 0:
            return None
        return scaled_loss_sum.item() / (loss_scale * self.expected_batch_size)
