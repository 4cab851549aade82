"""The baselines' own parts: DP-MERF's release and generator, pdp's label rows, dpdm's settings, the method table."""

import math

import numpy as np
import pytest
import torch

from privimage.config import load_config
from privimage.diffusion.unet import UNet
from privimage.errors import UserError
from privimage.classifiers import ResNetGN, SmallCNN
from privimage.merf import (SIZE_WEIGHT, Generator, JointFeatures, NetworkFeatures, RandomFeatures, class_means,
                            embedding_sum, fixed_features, release, train_generator)
from privimage.methods import METHODS, STAGE_TABLE
from privimage.privacy.accountant import compose_epsilon
from privimage.privacy.noise import GaussianNoise
from privimage.stages.pretrain import LABEL_EMBEDDING, label_rows, with_label_rows
from privimage.stages.registry import (MODEL_MODULES, RELEASE_MODULES, STAGE_MODULES, ModelModule, ReleaseModule,
                                       StageModule)


def features(dim=12, count=64, scale=2.0, seed=0):
    return RandomFeatures(dim, count, scale, torch.Generator().manual_seed(seed))


def joint(network, public_share, bf16=False):
    """Random features of 4 x 4 images joined with a network's normalised features."""
    random = RandomFeatures(16, 64, 2.0, torch.Generator().manual_seed(0))
    return JointFeatures((random, 1 - public_share), (NetworkFeatures(network, bf16=bf16), public_share))


def embedding_features():
    torch.manual_seed(0)
    return {"random": features(dim=16),
            "joint cnn": joint(SmallCNN(1, 5, width=4), 0.5),
            "joint resnet bf16": joint(ResNetGN(1, 5, width=4), 0.3, bf16=True),
            "network alone": joint(SmallCNN(1, 5, width=4), 1.0)}


@pytest.mark.parametrize("name", ["random", "joint cnn", "joint resnet bf16", "network alone"])
def test_every_image_adds_a_vector_of_norm_at_most_one_so_the_sensitivity_is_one(name):
    phi = embedding_features()[name]
    x = torch.cat([torch.randn(5, 1, 4, 4) * 3, torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), -1e4)])
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    everyone = embedding_sum(phi, [(x[:3], y[:3]), (x[3:], y[3:])], 3)
    for i in range(len(x)):
        keep = torch.arange(len(x)) != i
        without = embedding_sum(phi, [(x[keep], y[keep])], 3)
        assert torch.linalg.norm(everyone - without).item() <= 1.0 + 1e-6
    # Each part is unit-norm on an image with features: the whole is too, so the bound is tight.
    assert torch.linalg.norm(phi(x[:5]), dim=1).tolist() == pytest.approx([1.0] * 5, abs=1e-5)


def test_joint_features_are_the_parts_scaled_by_the_root_of_their_shares():
    random, network = features(dim=16), NetworkFeatures(SmallCNN(1, 5, width=4))
    x = torch.randn(3, 1, 4, 4)
    both = JointFeatures((random, 0.36), (network, 0.64))(x)
    assert torch.allclose(both, torch.cat([0.6 * random(x), 0.8 * network(x)], dim=1), atol=1e-6)
    assert JointFeatures((random, 1.0), (network, 0.0))(x).shape == random(x).shape  # a zero share is left out


@pytest.mark.parametrize("shares", [(0.5, 0.6), (1.2, -0.2)])
def test_joint_feature_shares_that_do_not_sum_to_one_or_are_negative_are_refused(shares):
    with pytest.raises(ValueError, match="sum to 1"):
        JointFeatures((features(), shares[0]), (features(), shares[1]))


def test_network_features_leave_the_network_frozen():
    network = SmallCNN(1, 5, width=4)
    NetworkFeatures(network)(torch.randn(2, 1, 4, 4, requires_grad=True)).sum().backward()
    assert not network.training and all(p.grad is None and not p.requires_grad for p in network.parameters())


def test_random_features_approximate_the_gaussian_kernel():
    """Reference: the kernel computed directly, exp(-|x - x'|^2 / 2 l^2)."""
    phi = features(dim=5, count=20_000, scale=1.5)
    x, x2 = torch.randn(4, 5), torch.randn(4, 5)
    approx = (phi(x) * phi(x2)).sum(1)
    exact = torch.exp(-((x - x2) ** 2).sum(1) / (2 * 1.5 ** 2))
    assert torch.allclose(approx, exact, atol=0.03)
    assert torch.allclose(torch.linalg.norm(phi(x), dim=1), torch.ones(4), atol=1e-5)


def test_without_noise_the_class_means_are_the_exact_means():
    phi = features()
    x, y = torch.randn(9, 12), torch.tensor([0] * 4 + [1] * 5)
    means = class_means(embedding_sum(phi, [(x[:5], y[:5]), (x[5:], y[5:])], 2))
    assert torch.allclose(means[0], phi(x[:4]).mean(0), atol=1e-5)
    assert torch.allclose(means[1], phi(x[4:]).mean(0), atol=1e-5)


def test_the_release_adds_gaussian_noise_of_the_booked_std_to_every_entry():
    total = torch.zeros(50, 401, dtype=torch.float64)
    noisy = release(total, 2.5, GaussianNoise(seed=1))
    assert noisy.std().item() == pytest.approx(2.5, rel=0.02)
    assert abs(noisy.mean().item()) < 4 * 2.5 / math.sqrt(noisy.numel())  # 4 standard errors


def test_a_class_whose_noisy_size_is_below_one_is_read_as_one_image():
    noisy = torch.tensor([[0.3, 0.4, -0.2 * SIZE_WEIGHT]], dtype=torch.float64)
    assert torch.allclose(class_means(noisy), torch.tensor([[0.3, 0.4]]) / SIZE_WEIGHT)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_generator_learns_to_match_target_means(bf16):
    phi = fixed_features(1 * 8 * 8, 200, 0.7, seed=0)
    targets = phi(torch.stack([torch.full((1, 8, 8), -0.8), torch.full((1, 8, 8), 0.8)]))
    generator = Generator(2, 1, 8, code_dim=4, width=8)
    losses = train_generator(generator, phi, targets, steps=150, per_class=16, lr=1e-2, seed=0, bf16=bf16)
    assert losses[-1] < 0.2 * losses[0]
    assert all(p.dtype == torch.float32 for p in generator.parameters())  # autocast leaves the weights float32
    generator.eval()
    with torch.no_grad():
        dark, light = (generator.sample(torch.full((16,), c), torch.Generator().manual_seed(0)).mean() for c in (0, 1))
    assert dark < 0 < light


def test_pdp_label_rows_are_a_seeded_random_choice_not_the_first_rows():
    rows = label_rows(82, 10, seed=0)
    assert len(set(rows.tolist())) == 10 and (rows == label_rows(82, 10, seed=0)).all()
    assert not (rows == np.arange(10)).all() and not (rows == label_rows(82, 10, seed=1)).all()
    with pytest.raises(UserError, match="public set has 5"):
        label_rows(5, 10, seed=0)


def test_a_remapped_model_answers_for_class_i_as_the_public_model_for_its_row():
    torch.manual_seed(0)
    public = UNet(resolution=8, in_channels=1, num_classes=6, base_channels=8, channel_mult=(1,))
    rows = np.array([4, 1])
    remapped = UNet(resolution=8, in_channels=1, num_classes=2, base_channels=8, channel_mult=(1,))
    state = {f"unet.{k}": v for k, v in public.state_dict().items()}
    remapped.load_state_dict({k.removeprefix("unet."): v for k, v in with_label_rows(state, rows).items()})
    assert LABEL_EMBEDDING.removeprefix("unet.") in public.state_dict()
    x, noise = torch.randn(3, 1, 8, 8), torch.ones(3)
    for sensitive, public_row in ((0, 4), (1, 1), (2, 6)):  # 2 and 6: the null classes
        assert torch.allclose(remapped(x, noise, torch.full((3,), sensitive)), public(x, noise, torch.full((3,), public_row)))


def test_dpdm_reads_its_own_dp_sgd_settings_and_the_others_finetunes():
    cfg = load_config("default", overrides=["method=dpdm", "dpdm.lr=0.005"])
    assert METHODS["dpdm"].configure(cfg).finetune.lr == 0.005
    assert METHODS["privimage"].configure(cfg).finetune.lr == cfg.finetune.lr


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_books_what_its_stages_spend_and_ends_in_a_sampled_model(method):
    stages = METHODS[method].stages
    assert METHODS[method].model_stage in stages and METHODS[method].model_stage in MODEL_MODULES
    for stage in stages:
        assert (stage in RELEASE_MODULES) == STAGE_TABLE[stage].spends_privacy


def test_every_stage_of_the_table_has_a_module_that_keeps_the_contract_of_its_role():
    assert set(STAGE_MODULES) == set(STAGE_TABLE)
    for name, module in STAGE_MODULES.items():
        assert module.__name__ == f"privimage.stages.{name}" and isinstance(module, StageModule)
        assert isinstance(module, ReleaseModule) == STAGE_TABLE[name].spends_privacy, name
    for name, module in MODEL_MODULES.items():
        assert isinstance(module, ModelModule), name


@pytest.mark.parametrize("epsilon", [1.0, 10.0])
def test_dpmerf_calibrates_its_one_release_to_the_target(epsilon):
    cfg = load_config("default", overrides=["method=dpmerf", f"privacy.epsilon={epsilon}"])
    mechanism = RELEASE_MODULES["dpmerf"].mechanism(cfg, 4000, [])
    assert (mechanism.sample_rate, mechanism.steps) == (1.0, 1)
    spent = compose_epsilon([mechanism], 1e-5)
    assert epsilon * 0.98 < spent <= epsilon
    # The classical Gaussian-mechanism bound (Dwork & Roth, Thm A.1, for epsilon < 1) needs at least as much noise.
    if epsilon < 1.01:
        assert mechanism.noise_multiplier <= math.sqrt(2 * math.log(1.25 / 1e-5)) / (0.98 * epsilon)
