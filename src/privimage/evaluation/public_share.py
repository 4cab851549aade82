"""How much of a synthetic set looks like the public data rather than the sensitive data.

A model pretrained on public images can carry their shapes into its samples: letters drawn under the
label of an animal. A small CNN trained to tell public images from sensitive ones (as many of each,
balanced) counts the images of a set it calls public. Next to the share it gives the real held-out
sensitive images (its false-alarm rate), the share of the synthetic set says how many samples are
public shapes. It trains on sensitive training images, so its figures are private to the data owner.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from privimage.classifiers import SmallCNN, predict_logits, train_classifier
from privimage.runtime import seeded

PUBLIC, SENSITIVE = 1, 0


def called_public(public: np.ndarray, sensitive: np.ndarray, probes: Mapping[str, np.ndarray], *, per_side: int = 4000,
                  epochs: int = 2, width: int = 8, seed: int = 0, device: str = "cpu") -> dict[str, np.ndarray]:
    """For each probe set (uint8 NHWC images), whether a public-vs-sensitive CNN calls each image public.

    The CNN (`width` channels, `epochs` passes) trains on at most `per_side` seeded images of each side.
    """
    rng = np.random.default_rng(seed)
    n = min(per_side, len(public), len(sensitive))
    picks = [np.sort(rng.permutation(len(side))[:n]) for side in (public, sensitive)]
    images = np.concatenate([public[picks[0]], sensitive[picks[1]]])
    labels = np.concatenate([np.full(n, PUBLIC), np.full(n, SENSITIVE)]).astype(np.int64)
    with seeded(seed):
        model = SmallCNN(images.shape[-1], 2, width=width)
    train_classifier(model, images, labels, epochs=epochs, seed=seed, device=device)
    return {name: predict_logits(model, probe, device=device, reduce=lambda logits: logits.argmax(1)).numpy() == PUBLIC
            for name, probe in probes.items()}


def public_share(public: np.ndarray, sensitive: np.ndarray, probes: Mapping[str, np.ndarray], **settings) -> dict[str, float]:
    """The share of each probe set that the CNN of `called_public` (same settings) calls public."""
    return {name: float(calls.mean()) for name, calls in called_public(public, sensitive, probes, **settings).items()}
