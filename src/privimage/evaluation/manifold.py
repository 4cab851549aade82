"""Improved precision and recall of generative models (Kynkäänniemi et al., NeurIPS 2019).

FID mixes fidelity and diversity into one number; these two separate them. Each set's manifold is
the union of balls around its points, each ball reaching the point's k-th nearest neighbour in the
same set. Precision: the fraction of fake points inside the real manifold (are samples realistic?).
Recall: the fraction of real points inside the fake manifold (is the real data covered?).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import pairwise_distances_chunked
from sklearn.neighbors import NearestNeighbors

from privimage.errors import UserError


def _knn_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour among the others."""
    distances, _ = NearestNeighbors(n_neighbors=k).fit(points).kneighbors()  # no query: self excluded
    return distances[:, -1]


def _inside_manifold(queries: np.ndarray, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Whether each query lies within radii[j] of some points[j] (chunked: never a full N×M matrix)."""
    inside = [
        (block <= radii[None, :]).any(axis=1)
        for block in pairwise_distances_chunked(queries, points, working_memory=256)
    ]
    return np.concatenate(inside)


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of fake feature vectors against real ones, both (N, D)."""
    smallest = min(len(real_feats), len(fake_feats))
    if smallest <= k:
        raise UserError(
            f"precision/recall with k={k} needs more than {k} samples per set, got {smallest}: "
            "evaluate more samples or lower k"
        )
    precision = _inside_manifold(fake_feats, real_feats, _knn_radii(real_feats, k)).mean()
    recall = _inside_manifold(real_feats, fake_feats, _knn_radii(fake_feats, k)).mean()
    return float(precision), float(recall)
