"""The public-share measure: a public-vs-sensitive CNN's verdict on a synthetic set and the real test split."""

import numpy as np

from privimage.evaluation.public_share import called_public, public_share


def shapes(kind: str, n: int, seed: int) -> np.ndarray:
    """Bars (public: horizontal, sensitive: vertical) at random positions, 12x12 grayscale."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 12, 12, 1), np.uint8)
    for image, at in zip(images, rng.integers(2, 10, n)):
        if kind == "public":
            image[at, 2:10] = 255
        else:
            image[2:10, at] = 255
    return images


def test_the_share_is_the_fraction_of_a_set_that_looks_public():
    public, sensitive = shapes("public", 300, 0), shapes("sensitive", 300, 1)
    half = np.concatenate([shapes("public", 50, 2), shapes("sensitive", 150, 3)])  # a quarter public
    shares = public_share(public, sensitive, {"public": shapes("public", 100, 4), "real": shapes("sensitive", 100, 5),
                                              "quarter": half}, epochs=6, width=8)
    assert shares["public"] > 0.95 and shares["real"] < 0.05
    assert abs(shares["quarter"] - 0.25) < 0.05


def test_each_image_is_called_by_what_it_shows():
    public, sensitive = shapes("public", 300, 0), shapes("sensitive", 300, 1)
    mixed = np.concatenate([shapes("public", 50, 2), shapes("sensitive", 150, 3)])
    calls = called_public(public, sensitive, {"mixed": mixed}, epochs=6, width=8)["mixed"]
    assert calls.dtype == bool and calls.shape == (200,)
    assert calls[:50].mean() > 0.95 and calls[50:].mean() < 0.05
