"""The DP-SGD engine against per-example loops, plain SGD and the noise it promises."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from privimage.privacy.dpsgd import DPSGD, poisson_batches
from privimage.privacy.noise import GaussianNoise


class TinyNet(nn.Module):
    """Conv + GroupNorm + attention + linear head: the layer kinds of the diffusion U-Net."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.qkv = nn.Conv2d(4, 12, kernel_size=1)
        self.head = nn.Linear(4 * 6 * 6, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.norm(self.conv(x)))
        q, k, v = self.qkv(h).flatten(2).transpose(1, 2).chunk(3, dim=2)
        h = h + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(h.shape)
        return self.head(h.flatten(1))


def cross_entropy(forward, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(forward(x), y, reduction="none")


def batch(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def frozen_sgd(model: nn.Module) -> torch.optim.Optimizer:
    """lr = 0: the step leaves the weights alone, so tests can read the released gradient in p.grad."""
    return torch.optim.SGD(model.parameters(), lr=0.0)


def clipped(grads: list[Tensor], clip_norm: float) -> list[Tensor]:
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    return [g * min(1.0, clip_norm / (norm.item() + 1e-6)) for g in grads]


def per_example_clipped_sum(model: nn.Module, loss_of_one, x: Tensor, y: Tensor, clip_norm: float) -> list[Tensor]:
    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):
        grads = torch.autograd.grad(loss_of_one(model, x[i:i + 1], y[i:i + 1]), list(model.parameters()))
        total = [t + g for t, g in zip(total, clipped(list(grads), clip_norm))]
    return total


def test_clipped_gradients_match_a_per_example_loop() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    x, y = batch(7)
    norms = [
        torch.linalg.vector_norm(torch.cat([g.flatten() for g in torch.autograd.grad(
            cross_entropy(model, x[i:i + 1], y[i:i + 1]).sum(), list(model.parameters()))])).item()
        for i in range(len(x))
    ]
    clip_norm = sorted(norms)[len(norms) // 2]  # half the samples are clipped, half are not
    engine = DPSGD(model, cross_entropy, clip_norm=clip_norm, noise_multiplier=0.0, expected_batch_size=5.0,
                   max_physical_batch=3)  # three micro-batches: 3 + 3 + 1
    engine.step(x, y, frozen_sgd(model))

    expected = per_example_clipped_sum(model, lambda m, xi, yi: cross_entropy(m, xi, yi).sum(), x, y, clip_norm)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad * 5.0, e, rtol=1e-4, atol=1e-6)


def test_without_noise_or_clipping_it_is_plain_sgd() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    reference = copy.deepcopy(model)
    x, y = batch(8)

    engine = DPSGD(model, cross_entropy, clip_norm=1e6, noise_multiplier=0.0, expected_batch_size=8,
                   loss_clip=1e3, max_physical_batch=5)
    released_loss = engine.step(x, y, torch.optim.SGD(model.parameters(), lr=0.1))

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss = cross_entropy(reference, x, y).mean()
    loss.backward()
    optimizer.step()

    assert released_loss == pytest.approx(loss.item(), rel=1e-5)
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_weight", [0.0, 1.0])
def test_gradient_noise_has_the_promised_std(loss_weight: float) -> None:
    model = nn.Linear(100, 100)  # 10,100 coordinates of pure noise on an empty batch
    sigma, clip_norm, expected_batch_size = 2.0, 0.5, 4.0
    engine = DPSGD(model, cross_entropy, clip_norm=clip_norm, noise_multiplier=sigma,
                   expected_batch_size=expected_batch_size, loss_weight=loss_weight,
                   noise=GaussianNoise(seed=0))
    released_loss = engine.step(torch.empty(0, 100), torch.empty(0, dtype=torch.long), frozen_sgd(model))

    noise = torch.cat([p.grad.flatten() for p in model.parameters()]) * expected_batch_size
    expected_std = sigma * clip_norm * math.sqrt(1 + loss_weight**2)
    assert noise.std().item() == pytest.approx(expected_std, rel=0.03)
    assert abs(noise.mean().item()) < 4 * expected_std / math.sqrt(noise.numel())
    assert (released_loss is None) == (loss_weight == 0)


def test_released_loss_is_a_noisy_estimate_with_the_promised_std() -> None:
    model = nn.Linear(2, 2)
    sigma, clip_norm, loss_weight, loss_clip, expected_batch_size = 1.0, 0.1, 0.5, 2.0, 10.0
    engine = DPSGD(model, cross_entropy, clip_norm=clip_norm, noise_multiplier=sigma,
                   expected_batch_size=expected_batch_size, loss_weight=loss_weight, loss_clip=loss_clip,
                   noise=GaussianNoise(seed=0))
    empty_x, empty_y = torch.empty(0, 2), torch.empty(0, dtype=torch.long)
    losses = torch.tensor([engine.step(empty_x, empty_y, frozen_sgd(model)) for _ in range(300)])

    expected_std = sigma * math.sqrt(1 + loss_weight**2) * loss_clip / (loss_weight * expected_batch_size)
    assert losses.std().item() == pytest.approx(expected_std, rel=0.15)
    assert abs(losses.mean().item()) < 4 * expected_std / math.sqrt(len(losses))


def test_noise_multiplicity_averages_the_loss_before_clipping() -> None:
    torch.manual_seed(0)
    k, clip_norm = 2, 0.05
    model = TinyNet()
    x, y = batch(3)
    draws = torch.randn(k, 3)  # stands in for the loss' K random draws: draw j uses targets draws[j]

    def loss_over_draws(forward, xs: Tensor, ys: Tensor) -> Tensor:
        return (forward(xs) - draws[: len(xs)]).square().sum(dim=1)

    engine = DPSGD(model, loss_over_draws, clip_norm=clip_norm, noise_multiplier=0.0, expected_batch_size=1.0,
                   noise_multiplicity=k, max_physical_batch=2 * k)  # micro-batches of 2 + 1 samples, K rows each
    engine.step(x, y, frozen_sgd(model))
    released = [p.grad.clone() for p in model.parameters()]

    def mean_over_draws(m: nn.Module, xi: Tensor, yi: Tensor) -> Tensor:
        return (m(xi) - draws).square().sum(dim=1).mean()

    expected = per_example_clipped_sum(model, mean_over_draws, x, y, clip_norm)
    for r, e in zip(released, expected):
        torch.testing.assert_close(r, e, rtol=1e-4, atol=1e-7)

    # Clipping each draw and then averaging gives something else, so the check above can fail.
    per_draw = [
        per_example_clipped_sum(model, lambda m, xi, yi, j=j: (m(xi) - draws[j]).square().sum(), x, y, clip_norm)
        for j in range(k)
    ]
    clipped_then_averaged = [sum(parts) / k for parts in zip(*per_draw)]
    assert not all(torch.allclose(r, c, rtol=1e-3) for r, c in zip(released, clipped_then_averaged))


def test_empty_batch_releases_noise_only() -> None:
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    engine = DPSGD(model, cross_entropy, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=16.0,
                   noise_multiplicity=2)
    released_loss = engine.step(*batch(0), torch.optim.SGD(model.parameters(), lr=1.0))
    assert math.isfinite(released_loss)
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_poisson_batch_sizes_have_mean_qn() -> None:
    num_samples, sample_rate, steps = 1000, 0.05, 400
    batches = list(poisson_batches(num_samples, sample_rate, steps, GaussianNoise(seed=0)))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert len(batches) == steps
    assert sizes.mean().item() == pytest.approx(sample_rate * num_samples, abs=1.5)  # std of the mean: 0.34
    assert sizes.var().item() == pytest.approx(num_samples * sample_rate * (1 - sample_rate), rel=0.25)
    for indices in batches[:20]:
        assert indices.dtype == torch.long
        assert torch.equal(indices, indices.unique())  # sorted, no repeats
        assert indices.numel() == 0 or 0 <= indices.min() <= indices.max() < num_samples
    again = list(poisson_batches(num_samples, sample_rate, 3, GaussianNoise(seed=0)))
    assert all(torch.equal(a, b) for a, b in zip(again, batches))


def test_single_process_group_gives_the_same_step(tmp_path) -> None:
    """The DDP path (all-reduce, noise on rank 0) with world size 1 equals the single-process step."""
    torch.manual_seed(0)
    model = TinyNet()
    twin = copy.deepcopy(model)
    x, y = batch(5)

    def released_gradients(net: nn.Module) -> list[Tensor]:
        engine = DPSGD(net, cross_entropy, clip_norm=0.1, noise_multiplier=1.0, expected_batch_size=5.0,
                       noise=GaussianNoise(seed=1))
        engine.step(x, y, frozen_sgd(net))
        return [p.grad for p in net.parameters()]

    alone = released_gradients(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        together = released_gradients(twin)
    finally:
        dist.destroy_process_group()
    for a, t in zip(alone, together):
        torch.testing.assert_close(a, t)


def test_a_sample_with_a_non_finite_loss_contributes_nothing() -> None:
    """Fail closed on numbers: a NaN/inf sample adds zero to the released sums; the others are unchanged."""
    torch.manual_seed(0)
    model = TinyNet()
    x, y = batch(5)
    poisoned = x.clone()
    poisoned[2] = float("nan")
    poisoned[4, 0, 0, 0] = float("inf")
    keep = torch.tensor([0, 1, 3])

    engine = DPSGD(model, cross_entropy, clip_norm=0.1, noise_multiplier=0.0, expected_batch_size=5.0)
    clean_sums, clean_loss = engine._clipped_sums(x[keep], y[keep])
    bad_sums, bad_loss = engine._clipped_sums(poisoned, y)
    for name in clean_sums:
        torch.testing.assert_close(bad_sums[name], clean_sums[name])
    torch.testing.assert_close(bad_loss, clean_loss)
    assert math.isfinite(engine.step(poisoned, y, frozen_sgd(model)))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_dp_noise_is_seeded_from_at_least_128_bits_of_os_entropy() -> None:
    """A 63-bit seed could be searched against published noisy values; PCG64 is seeded with 256 bits."""
    seeds = [GaussianNoise().rng.bit_generator.seed_seq.entropy for _ in range(4)]
    assert len(set(seeds)) == 4
    assert max(s.bit_length() for s in seeds) > 128  # each is uniform on 256 bits: fails with chance 2^-(4·128)


def test_poisson_sampling_draws_from_the_dp_noise_source() -> None:
    """Who is in a batch is as secret as the noise: with secure_rng the secure source samples it too."""

    class Recording(GaussianNoise):
        drawn = 0

        def uniform(self, n):
            Recording.drawn += n
            return super().uniform(n)

    batches = list(poisson_batches(50, 0.5, 3, Recording(seed=0)))
    assert len(batches) == 3 and Recording.drawn == 150
