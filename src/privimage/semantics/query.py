"""The DP semantic query: which public classes does each sensitive class resemble?

Each sensitive image votes for the top-k public classes the semantic classifier gives it, in the row
of its own label. Adding or removing one image changes k bins by one, so the histogram has L2
sensitivity sqrt(k); Gaussian noise of std `query_sigma * sqrt(k)` on every bin makes it a Gaussian
mechanism with noise multiplier `query_sigma`. Only the noisy histogram ever leaves this module.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from privimage.privacy.noise import NoiseSource


def top_k_classes(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) indices of each row's k largest logits."""
    if k > logits.shape[1]:
        raise ValueError(f"k={k} exceeds the {logits.shape[1]} public classes")
    return logits.topk(k, dim=1).indices


def vote_histogram(votes: torch.Tensor, labels: np.ndarray, num_sensitive: int, num_public: int) -> np.ndarray:
    """H[s, p] = number of sensitive images of class s that have public class p among their top-k.

    This is the exact, private statistic: callers must only ever pass it to `noisy_histogram`.
    """
    votes = votes.cpu().numpy()
    hist = np.zeros((num_sensitive, num_public), dtype=np.int64)
    rows = np.repeat(np.asarray(labels, dtype=np.int64), votes.shape[1])
    np.add.at(hist, (rows, votes.reshape(-1)), 1)
    return hist


def noisy_histogram(hist: np.ndarray, query_sigma: float, k: int, noise: NoiseSource) -> np.ndarray:
    """The Gaussian mechanism: every bin gets N(0, (query_sigma * sqrt(k))^2)."""
    std = query_sigma * math.sqrt(k)
    return hist.astype(np.float64) + noise.gaussian_array(hist.shape, std)


def select_semantics(noisy: np.ndarray, per_class: int) -> list[list[int]]:
    """Per sensitive class in order, its `per_class` highest noisy bins not taken by an earlier class.

    Post-processing of the noisy histogram only, so it costs no privacy.
    """
    num_sensitive, num_public = noisy.shape
    if per_class * num_sensitive > num_public:
        raise ValueError(
            f"{num_sensitive} classes x {per_class} picks exceed the {num_public} public classes"
        )
    taken = np.zeros(num_public, dtype=bool)
    selected = []
    for row in noisy:
        scores = np.where(taken, -np.inf, row)
        picks = np.argsort(-scores, kind="stable")[:per_class]
        taken[picks] = True
        selected.append([int(p) for p in picks])
    return selected
