"""Downstream utility: train a classifier on synthetic images, test it on real held-out images.

This is the accuracy that DP image-synthesis papers report (DPImageBench's "train on synthetic,
test on real"): synthetic data is useful to the extent that a model trained on it works on reality.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from torch import nn

from privimage.errors import UserError
from privimage.runtime import seeded
from privimage.classifiers import ResNetGN, SmallCNN, accuracy, train_classifier

DOWNSTREAM_BATCH = 64

CLASSIFIERS: dict[str, Callable[[int, int], nn.Module]] = {
    "cnn": SmallCNN,
    "resnet": ResNetGN,
}


class LabelledImages(Protocol):
    images: np.ndarray  # uint8 NHWC
    labels: np.ndarray  # int


def downstream_accuracy(
    synthetic: LabelledImages,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    classifiers: Sequence[str] = ("cnn", "resnet"),
    epochs: int = 15,
    batch_size: int = DOWNSTREAM_BATCH,
    augment: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Real-test accuracy of each named classifier trained from scratch on `synthetic`.

    Nothing of the result is logged: test-split accuracies belong in the owner's metrics only. Pass
    `progress=False` when the training set is itself sensitive: the bar shows its training loss.

    `augment` is the strength of `classifiers.augment` during training: a few thousand synthetic images are a
    small training set, and a classifier trained on them plainly measures its overfitting as much as
    the images.
    """
    unknown = sorted(set(classifiers) - CLASSIFIERS.keys())
    if unknown:
        raise UserError(f"unknown downstream classifier(s) {unknown}: choose from {sorted(CLASSIFIERS)}")
    in_channels = synthetic.images.shape[-1]
    num_classes = int(max(synthetic.labels.max(), test_labels.max())) + 1
    results = {}
    for name in classifiers:
        # Seed the initialisation without disturbing the caller's random state.
        with seeded(seed):
            model = CLASSIFIERS[name](in_channels, num_classes)
        train_classifier(
            model, synthetic.images, synthetic.labels, epochs=epochs, batch_size=batch_size, augment=augment,
            seed=seed, device=device, desc=f"downstream {name}" if progress else None,
        )
        results[name] = accuracy(model, test_images, test_labels, device=device)
    return results
