import numpy as np
import pytest
import torch

from privimage.classifiers import (
    ResNetGN,
    SmallCNN,
    _epoch_indices,
    accuracy,
    augment,
    predict_logits,
    to_tensor,
    train_classifier,
)


def corner_squares(n: int, size: int = 12, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class c: a bright 4×4 square in corner c (of 4), with pixel noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = rng.integers(0, 40, size=(n, size, size, channels), dtype=np.uint8)
    for image, label in zip(images, labels):
        top, left = (0 if label < 2 else size - 4), (0 if label % 2 == 0 else size - 4)
        image[top : top + 4, left : left + 4] = 255
    return images, labels.astype(np.int64)


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (1, 12)])
def test_classifiers_output_one_logit_per_class(channels, size):
    x = torch.randn(2, channels, size, size)
    assert ResNetGN(channels, 7, width=8, blocks=(1, 2), dropout=0.1)(x).shape == (2, 7)
    assert SmallCNN(channels, 7, width=8)(x).shape == (2, 7)


def test_resnet_depth_follows_blocks():
    def num_convs(model):
        return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())

    # Stem + 2 convs per block + a projection shortcut wherever the width changes.
    assert num_convs(ResNetGN(1, 10, width=8, blocks=(1, 1, 1))) == 1 + 6 + 2
    assert num_convs(ResNetGN(1, 10, width=8, blocks=(2, 2))) == 1 + 8 + 1


def test_to_tensor_maps_uint8_nhwc_to_unit_range_nchw():
    images = np.array([0, 255], dtype=np.uint8).reshape(1, 1, 2, 1).repeat(3, axis=3)
    x = to_tensor(images)
    assert x.shape == (1, 3, 1, 2) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1


def test_augment_is_seeded_bounded_and_keeps_background():
    images, _ = corner_squares(8, size=16)
    x = to_tensor(images)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    c = augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    blank = -torch.ones(4, 1, 16, 16)
    assert torch.equal(augment(blank, torch.Generator().manual_seed(0)), blank)
    assert torch.equal(augment(x, torch.Generator(), strength=0.0), x)


def test_augment_changes_geometry_but_keeps_the_ink():
    x = -torch.ones(64, 1, 28, 28)
    x[:, :, 8:20, 12:16] = 1  # a thick vertical bar
    y = augment(x, torch.Generator().manual_seed(0))
    changed = (y - x).abs().flatten(1).amax(dim=1) > 0.5
    assert changed.float().mean() > 0.9
    ink = (y + 1).flatten(1).sum(dim=1) / (x + 1).flatten(1).sum(dim=1)
    assert ink.min() > 0.3 and ink.max() < 3


def test_balanced_epoch_draws_classes_equally_often():
    labels = torch.tensor([0] * 900 + [1] * 100)
    counts = torch.bincount(labels[_epoch_indices(labels, True, torch.Generator().manual_seed(0))])
    assert abs(counts[0] - counts[1]) < 120
    plain = _epoch_indices(labels, False, torch.Generator().manual_seed(0))
    assert torch.equal(plain.sort().values, torch.arange(1000))


@pytest.mark.parametrize("augment_strength, balanced, bf16", [(0.0, False, False), (0.5, True, False), (0.5, True, True)])
def test_train_classifier_learns_a_separable_task(augment_strength, balanced, bf16):
    images, labels = corner_squares(96)
    test_images, test_labels = corner_squares(40, seed=1)
    model = ResNetGN(1, 4, width=8)
    trained = train_classifier(
        model, images, labels, epochs=6, batch_size=16, lr=1e-2, augment=augment_strength, balanced=balanced,
        bf16=bf16,
    )
    assert trained is model and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 autocasts; the weights stay float32
    assert accuracy(model, test_images, test_labels) >= 0.9


def test_train_classifier_is_deterministic_given_seed():
    images, labels = corner_squares(32)

    def train(seed):
        torch.manual_seed(0)
        model = train_classifier(ResNetGN(1, 4, width=8), images, labels, epochs=1, batch_size=8, augment=1.0, seed=seed)
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(train(0), train(0))
    assert not torch.equal(train(0), train(1))


def test_predict_logits_batches_and_restores_mode():
    images, _ = corner_squares(10)
    model = SmallCNN(1, 4, width=8).train()
    logits = predict_logits(model, images, batch_size=3)
    assert logits.shape == (10, 4) and model.training
    model.eval()
    torch.testing.assert_close(logits, model(to_tensor(images)).detach())


@pytest.mark.parametrize("network", [SmallCNN(1, 4, width=8), ResNetGN(1, 4, width=8)])
def test_an_images_logits_do_not_depend_on_the_images_beside_it(network):
    """The semantic query's sensitivity holds only if removing one image changes no other image's votes;
    with batches of other sizes the CPU's kernels moved logits by up to 1e-3 (failed before padding)."""
    images, _ = corner_squares(13, size=28)
    everyone = predict_logits(network, images, batch_size=8)
    for i in (0, 5, 12):
        keep = np.arange(len(images)) != i
        assert torch.equal(predict_logits(network, images[keep], batch_size=8), everyone[keep])


def test_predict_logits_reduces_each_batch():
    images, _ = corner_squares(10)
    model = SmallCNN(1, 4, width=8).eval()
    top = predict_logits(model, images, batch_size=3, reduce=lambda logits: logits.topk(2, dim=1).indices)
    assert top.shape == (10, 2) and top.dtype == torch.int64
    torch.testing.assert_close(top, predict_logits(model, images).topk(2, dim=1).indices)
    assert len(predict_logits(model, images[:0])) == 0  # an empty held-out split
