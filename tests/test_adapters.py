"""finetune.trainable: which coordinates DP-SGD trains, and LoRA's identity start and merge."""

import pytest
import torch
from torch import nn

from privimage.diffusion import EDMPrecond, UNet, edm_loss
from privimage.diffusion.adapters import merged_state_dict, set_trainable
from privimage.privacy.dpsgd import DPSGD


def tiny_denoiser() -> EDMPrecond:
    torch.manual_seed(0)
    net = EDMPrecond(UNet(resolution=8, in_channels=1, num_classes=3, base_channels=8, channel_mult=(1, 2)))
    with torch.no_grad():  # residual branches start at zero: perturb so every gradient is non-trivial
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def loss_fn(forward, x, y):
    return edm_loss(forward, x, y, num_classes=3)


def dp_step(net: nn.Module) -> None:
    engine = DPSGD(net, loss_fn, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    engine.step(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]), optimizer)


def test_norms_biases_trains_only_norms_and_biases() -> None:
    net = tiny_denoiser()
    set_trainable(net, "norms_biases")
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    dp_step(net)
    for name, p in net.named_parameters():
        is_norm_or_bias = name.endswith("bias") or ".norm" in name or "output_norm" in name
        assert p.requires_grad == is_norm_or_bias, name
        assert torch.equal(p, before[name]) != is_norm_or_bias, name  # trained ones moved, the rest did not


def test_lora_starts_as_the_base_model_and_merges_into_plain_weights() -> None:
    net = tiny_denoiser()
    x, sigma, y = torch.randn(3, 1, 8, 8), torch.full((3,), 0.7), torch.tensor([0, 1, 3])
    base_out = net(x, sigma, y)
    set_trainable(net, "lora", lora_rank=2)
    trained = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith((".up", ".down")) for n in trained)
    torch.testing.assert_close(net(x, sigma, y), base_out, rtol=0, atol=0)
    dp_step(net)
    adapted_out = net(x, sigma, y)
    assert not torch.allclose(adapted_out, base_out)
    plain = tiny_denoiser()
    plain.load_state_dict(merged_state_dict(net))  # strict: the same keys as a model without adapters
    torch.testing.assert_close(plain(x, sigma, y), adapted_out, rtol=1e-5, atol=1e-5)


def test_unknown_trainable_is_refused_before_changing_the_net() -> None:
    net = tiny_denoiser()
    with pytest.raises(ValueError, match="trainable"):
        set_trainable(net, "heads")
    assert all(p.requires_grad for p in net.parameters())


def test_bf16_dp_step_keeps_float32_gradients_close_to_float32() -> None:
    sums = []
    for bf16 in (False, True):
        net = tiny_denoiser()
        engine = DPSGD(net, loss_fn, clip_norm=1e6, noise_multiplier=0.0, expected_batch_size=4, bf16=bf16)
        torch.manual_seed(1)
        grads, _ = engine._clipped_sums(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))
        assert all(g.dtype == torch.float32 for g in grads.values())
        sums.append(torch.cat([g.flatten() for g in grads.values()]))
    cosine = torch.nn.functional.cosine_similarity(sums[0], sums[1], dim=0)
    assert cosine > 0.99
