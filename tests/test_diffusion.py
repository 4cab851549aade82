import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from privimage.diffusion import EMA, EDMPrecond, UNet, edm_loss, edm_sample, edm_sigmas


def tiny_unet(resolution: int = 8, in_channels: int = 1, num_classes: int = 3, **kwargs) -> UNet:
    kwargs = {"base_channels": 8, "channel_mult": (1, 2), **kwargs}
    return UNet(resolution=resolution, in_channels=in_channels, num_classes=num_classes, **kwargs)


def randomize(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Perturb every weight so no gradient is trivially zero (the residual branches start at zero)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return module


def num_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


# --- U-Net ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution, channels", [(28, 1), (32, 3)])
def test_unet_output_has_input_shape(resolution: int, channels: int) -> None:
    unet = randomize(UNet(resolution=resolution, in_channels=channels, num_classes=10, base_channels=16,
                          attn_resolutions=(resolution // 2,)))
    x = torch.randn(2, channels, resolution, resolution)
    out = unet(x, torch.randn(2), torch.tensor([0, 10]))  # 10 is the null label
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_a_patched_unet_runs_at_a_lower_resolution_and_returns_full_resolution_images() -> None:
    """patch_size 2: the U-Net sees 2 x 2 patches as channels (pixel-unshuffle) and gives them back."""
    unet = randomize(UNet(resolution=28, in_channels=1, num_classes=10, base_channels=16, channel_mult=(1, 1),
                          patch_size=2))
    assert unet.input_conv.in_channels == 4 and unet.output_conv.out_channels == 4
    seen = []
    unet.encoder[0].register_forward_hook(lambda module, inputs, output: seen.append(output.shape[-2:]))
    x = torch.randn(2, 1, 28, 28)
    out = unet(x, torch.randn(2), torch.tensor([0, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all() and seen == [(14, 14)]


def test_a_patch_size_that_does_not_divide_the_resolution_is_refused() -> None:
    with pytest.raises(ValueError, match="patch_size 3"):
        UNet(resolution=28, in_channels=1, num_classes=10, channel_mult=(1,), patch_size=3)


def test_unet_starts_at_zero_output() -> None:
    """The zero-initialised output layer makes D(x) = c_skip x at initialisation, as in EDM."""
    unet = tiny_unet()
    assert torch.equal(unet(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([0, 1])), torch.zeros(2, 1, 8, 8))


def test_unet_depends_on_class_label() -> None:
    unet = randomize(tiny_unet())
    x, noise = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1), torch.zeros(2)
    out = unet(x, noise, torch.tensor([0, 3]))
    assert not torch.allclose(out[0], out[1])


def test_unet_rejects_indivisible_resolution() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet(resolution=30, in_channels=1, num_classes=10, channel_mult=(1, 2, 2))


def test_parameter_counts() -> None:
    tiny = num_parameters(UNet(resolution=28, in_channels=1, num_classes=10, base_channels=16, channel_mult=(1, 2)))
    default = num_parameters(UNet(resolution=28, in_channels=1, num_classes=10))
    small = num_parameters(UNet(resolution=28, in_channels=1, num_classes=10, base_channels=16))
    paper = num_parameters(UNet(resolution=32, in_channels=3, num_classes=10, num_res_blocks=2,
                                attn_resolutions=(16,)))
    print(f"parameters: tiny {tiny:,}  default {default:,}  default at base 16 {small:,}  paper {paper:,}")
    assert tiny < 250_000
    assert 250_000 < small < 450_000
    assert 1_100_000 < default < 1_500_000
    assert abs(paper - 1_750_000) / 1_750_000 < 0.1  # the paper's 1.75 M, up to our scale/shift embedding


# --- EDM preconditioning and loss ----------------------------------------------------------------

class RecordingUNet(nn.Module):
    """Returns a constant and remembers what the preconditioning fed it."""

    def __init__(self, output: float):
        super().__init__()
        self.output = output

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor) -> Tensor:
        self.inputs = (x, noise_labels, class_labels)
        return torch.full_like(x, self.output)


def test_preconditioning_matches_hand_computed_coefficients() -> None:
    unet = RecordingUNet(output=3.0)
    denoiser = EDMPrecond(unet, sigma_data=0.5)  # type: ignore[arg-type]
    x = torch.full((1, 1, 2, 2), 2.0)
    # Worked by hand for sigma = 2, sigma_data = 0.5 (sigma^2 + sigma_data^2 = 4.25):
    # c_skip = 0.25 / 4.25, c_out = 2 * 0.5 / sqrt(4.25), c_in = 1 / sqrt(4.25), c_noise = ln(2) / 4.
    c_skip, c_out, c_in, c_noise = 0.0588235, 0.4850713, 0.4850713, 0.1732868
    out = denoiser(x, torch.tensor([2.0]), torch.tensor([1]))
    assert torch.allclose(out, torch.full_like(x, c_skip * 2.0 + c_out * 3.0))
    assert torch.allclose(out, torch.full_like(x, 1.5728609))
    fed_x, fed_noise, fed_labels = unet.inputs
    assert torch.allclose(fed_x, torch.full_like(x, c_in * 2.0))
    assert torch.allclose(fed_noise, torch.tensor([c_noise]))
    assert torch.equal(fed_labels, torch.tensor([1]))


def test_preconditioning_broadcasts_a_scalar_sigma() -> None:
    denoiser = EDMPrecond(randomize(tiny_unet()))
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    assert torch.allclose(denoiser(x, torch.tensor(0.7), labels), denoiser(x, torch.full((3,), 0.7), labels))


def test_loss_weighting() -> None:
    """With a fixed sigma and a denoiser that returns 0, the loss is weight(sigma) * mean(x^2)."""
    seen = {}

    def zero_denoiser(noisy: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        seen.update(noisy=noisy, sigma=sigma)
        return torch.zeros_like(noisy)

    x = torch.full((2, 1, 64, 64), 0.5)
    loss = edm_loss(zero_denoiser, x, torch.tensor([0, 1]), num_classes=2, sigma_data=0.5,
                    p_mean=math.log(2.0), p_std=0.0)
    weight = (2.0**2 + 0.5**2) / (2.0 * 0.5) ** 2  # 4.25
    assert loss.shape == (2,)
    assert torch.allclose(loss, torch.full((2,), weight * 0.25))
    assert torch.allclose(seen["sigma"], torch.full((2,), 2.0))
    assert (seen["noisy"] - x).std().item() == pytest.approx(2.0, rel=0.05)


def test_label_dropout_frequency() -> None:
    seen = {}

    def recording_denoiser(noisy: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        seen["labels"] = labels
        return noisy

    labels = torch.arange(4000) % 5
    x = torch.zeros(4000, 1, 1, 1)
    torch.manual_seed(0)
    edm_loss(recording_denoiser, x, labels, num_classes=5, label_dropout=0.3)
    dropped = seen["labels"] == 5
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert torch.equal(seen["labels"][~dropped], labels[~dropped])
    edm_loss(recording_denoiser, x, labels, num_classes=5, label_dropout=0.0)
    assert torch.equal(seen["labels"], labels)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_vmap_per_sample_gradients_equal_a_per_example_loop(patch_size: int) -> None:
    torch.manual_seed(0)
    denoiser = EDMPrecond(randomize(tiny_unet(attn_resolutions=(4 // patch_size,), patch_size=patch_size)))
    params = {name: p.detach() for name, p in denoiser.named_parameters()}
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 3])

    def sample_loss(params: dict[str, Tensor], x: Tensor, label: Tensor) -> Tensor:
        call = lambda *inputs: functional_call(denoiser, params, inputs)  # noqa: E731
        return edm_loss(call, x[None], label[None], num_classes=3, label_dropout=0.5).sum()

    # randomness="same" gives every sample the draws a plain call makes from the same RNG state.
    torch.manual_seed(1)
    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="same")(params, x, labels)
    for index in range(3):
        torch.manual_seed(1)
        expected = grad(sample_loss)(params, x[index], labels[index])
        for name, value in expected.items():
            torch.testing.assert_close(per_sample[name][index], value, rtol=1e-4, atol=1e-6)

    # randomness="different" (what DP-SGD uses) gives each copy of one sample its own noise and sigma.
    copies = [0, 0, 0]
    different = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")(params, x[copies], labels[copies])
    assert not torch.allclose(different["unet.input_conv.weight"][0], different["unet.input_conv.weight"][1])


# --- sampler -------------------------------------------------------------------------------------

def test_sigma_schedule() -> None:
    sigmas = edm_sigmas(18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert sigmas.shape == (19,)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[17].item() == pytest.approx(0.002)
    assert sigmas[18].item() == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_sampler_returns_the_point_of_a_point_mass(solver: str) -> None:
    """If the data are one point x0, the exact denoiser is D(x) = x0 and the ODE must land on x0."""
    x0 = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
    samples = edm_sample(lambda x, sigma, labels: x0.expand_as(x), torch.zeros(5, dtype=torch.long),
                         shape=(1, 4, 4), num_classes=1, steps=18, solver=solver)
    torch.testing.assert_close(samples, x0.expand(5, -1, -1, -1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_sampling_from_noised_images_follows_the_exact_ode_of_gaussian_data(solver: str) -> None:
    """Data N(0, s^2) per pixel: the exact denoiser is D(x) = x s^2 / (s^2 + sigma^2), and the ODE carries
    x at sigma_max to x s / sqrt(s^2 + sigma_max^2). SDEdit starts it at init + sigma_max * noise."""
    s, sigma_max = 0.5, 2.0
    init = torch.linspace(-1, 1, 32).reshape(2, 1, 4, 4)
    noise = torch.randn(init.shape, generator=torch.Generator().manual_seed(3))
    samples = edm_sample(lambda x, sigma, labels: x * s ** 2 / (s ** 2 + sigma[:, None, None, None] ** 2),
                         torch.zeros(2, dtype=torch.long), shape=(1, 4, 4), num_classes=1, steps=200, solver=solver,
                         sigma_max=sigma_max, init=init, generator=torch.Generator().manual_seed(3))
    expected = ((init + sigma_max * noise) * s / (s ** 2 + sigma_max ** 2) ** 0.5).clamp(-1, 1)  # as it returns them
    torch.testing.assert_close(samples, expected, rtol=0, atol=2e-3 if solver == "heun" else 2e-2)


def test_guidance() -> None:
    """D(x|c) = a_c and D(x|null) = b give the guided point (1 + w) a_c - w b; w = 0 skips the null pass."""
    targets = torch.tensor([0.2, -0.4, 0.0])  # a_0, a_1, b (the null label is 2)
    batch_sizes = []

    def class_point_denoiser(x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        batch_sizes.append(x.shape[0])
        return targets[labels].reshape(-1, 1, 1, 1).expand_as(x)

    labels = torch.tensor([0, 1])
    sample = lambda w: edm_sample(class_point_denoiser, labels, shape=(1, 2, 2), num_classes=2,  # noqa: E731
                                  steps=6, guidance=w, generator=torch.Generator().manual_seed(0))
    unguided = sample(0.0)
    assert set(batch_sizes) == {2}
    torch.testing.assert_close(unguided, targets[labels].reshape(2, 1, 1, 1).expand(2, 1, 2, 2), atol=1e-4, rtol=0)
    guided = sample(1.5)
    assert set(batch_sizes[-11:]) == {4}  # conditional and unconditional passes in one batch
    expected = (2.5 * targets[labels]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2)
    torch.testing.assert_close(guided, expected, atol=1e-4, rtol=0)


def test_sampler_with_a_unet_is_reproducible_and_bounded() -> None:
    denoiser = EDMPrecond(randomize(tiny_unet(num_classes=3))).eval()
    labels = torch.tensor([0, 1, 2, 3])
    run = lambda: edm_sample(denoiser, labels, shape=(4, 1, 8, 8), num_classes=3, steps=4,  # noqa: E731
                             generator=torch.Generator().manual_seed(7))
    first, second = run(), run()
    assert first.shape == (4, 1, 8, 8)
    assert torch.equal(first, second)
    assert first.abs().max() <= 1.0


def test_bf16_sampling_stays_close_to_float32() -> None:
    """sample.bf16 autocasts the denoiser's calls; the ODE's state stays float32, so the images differ
    by bfloat16 rounding (a few uint8 levels), not by a different trajectory."""
    denoiser = EDMPrecond(randomize(tiny_unet(num_classes=3))).eval()
    labels = torch.tensor([0, 1, 2, 0])
    images = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            images.append(edm_sample(denoiser, labels, shape=(1, 8, 8), num_classes=3, steps=6, guidance=1.0,
                                     generator=torch.Generator().manual_seed(3)))
    assert images[1].dtype == torch.float32
    assert (images[0] - images[1]).abs().mean() < 0.02  # of a [-1, 1] range; uint8 levels are 0.008 apart


def test_sampler_rejects_unknown_solver() -> None:
    with pytest.raises(ValueError, match="unknown solver"):
        edm_sample(lambda x, s, c: x, torch.zeros(1, dtype=torch.long), shape=(1, 2, 2), num_classes=1,
                   solver="rk4")


# --- EMA -----------------------------------------------------------------------------------------

def test_ema_warmup_decay_and_values() -> None:
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.5)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())

    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay (1 + 0) / (10 + 0) = 0.1
    assert ema.module.weight.item() == pytest.approx(0.9)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update(model)  # decay 2 / 11
    assert ema.module.weight.item() == pytest.approx(0.9 * 2 / 11)

    decays = []
    for _ in range(10):
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays[:3] == pytest.approx([3 / 12, 4 / 13, 5 / 14])
    assert decays[-1] == 0.5  # (1 + 11) / (10 + 11) > 0.5: capped at `decay`
    assert EMA(model, decay=0.999, warmup=False).current_decay() == 0.999


def test_ema_state_dict_round_trip() -> None:
    model = nn.Linear(2, 2)
    ema = EMA(model)
    for _ in range(3):
        randomize(model)
        ema.update(model)
    state = ema.state_dict()
    assert all(isinstance(value, Tensor) for value in state.values())  # a checkpoint takes it as it is
    restored = EMA(nn.Linear(2, 2))
    restored.load_state_dict(state)
    assert restored.num_updates == 3
    assert restored.current_decay() == ema.current_decay()
    assert torch.equal(restored.module.weight, ema.module.weight)


def test_finetune_lr_schedule_warms_up_then_decays_to_zero() -> None:
    from privimage.diffusion.training import lr_factor

    assert [lr_factor("constant", 4, s, 40) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [lr_factor("constant", 4, s, 20) for s in range(3)] == [0.5, 1.0, 1.0]  # at most a tenth of the steps
    assert lr_factor("constant", 4, 0, 5) == 1.0
    cosine = [lr_factor("cosine", 2, s, 24) for s in range(24)]
    assert cosine[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:])) and 0 < cosine[-1] < 0.05
