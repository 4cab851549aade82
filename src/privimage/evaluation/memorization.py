"""Does the generator copy its sensitive training images?

Pixel-space nearest-neighbour test. Real held-out images show how close a fresh sample of the
data distribution falls to the training set; a generator that does not memorise should look
the same. Rule: the threshold is the `quantile` (default 5th percentile) of the test→train
nearest-neighbour distances; we report the fraction of synthetic images at least as near to
the training set. About `quantile` is expected; far more means near-copies of training images.

These outputs describe the sensitive data itself (distances, and the figure shows training
images): they are for the data owner and fall outside the DP guarantee.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from sklearn.neighbors import NearestNeighbors


def _flatten(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> (N, H·W·C) float32 in [0, 1], so distances do not depend on the bit depth."""
    return images.reshape(len(images), -1).astype(np.float32) / 255


def nearest_train(queries: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query image to its nearest training image, and that image's index."""
    distances, indices = NearestNeighbors(n_neighbors=1).fit(_flatten(train)).kneighbors(_flatten(queries))
    return distances[:, 0], indices[:, 0]


def memorization(
    synthetic: np.ndarray, train: np.ndarray, test: np.ndarray, quantile: float = 0.05
) -> dict[str, float]:
    """Nearest-train distances of synthetic images compared with those of real held-out images."""
    synthetic_distances, _ = nearest_train(synthetic, train)
    test_distances, _ = nearest_train(test, train)
    threshold = float(np.quantile(test_distances, quantile))
    return {
        "quantile": quantile,
        "threshold": threshold,
        "fraction_closer": float(np.mean(synthetic_distances <= threshold)),
        "synthetic_median_distance": float(np.median(synthetic_distances)),
        "test_median_distance": float(np.median(test_distances)),
    }


def closest_pairs_figure(synthetic: np.ndarray, train: np.ndarray, n: int = 8) -> bytes:
    """PNG: the `n` synthetic images nearest to the training set (top row) above their neighbours."""
    distances, indices = nearest_train(synthetic, train)
    closest = np.argsort(distances)[:n]
    figure = Figure(figsize=(1.2 * len(closest), 2.7))
    axes = figure.subplots(2, len(closest), squeeze=False)
    for column, index in enumerate(closest):
        for row, image in enumerate((synthetic[index], train[indices[index]])):
            axis = axes[row, column]
            axis.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[0, column].set_title(f"d={distances[index]:.2f}", fontsize=8)
    axes[0, 0].set_ylabel("synthetic", fontsize=8)
    axes[1, 0].set_ylabel("nearest train", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")  # a bare Figure: no pyplot state, renders with Agg
    return buffer.getvalue()
