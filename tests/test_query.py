"""The semantic query's maths: exact votes, noise scale, greedy selection."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from privimage.privacy.noise import GaussianNoise
from privimage.semantics.query import noisy_histogram, select_semantics, top_k_classes, vote_histogram


def test_vote_histogram_counts_top_k_in_own_row():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.0], [3.0, 0.0, 2.0, 1.0]])
    votes = top_k_classes(logits, 2)
    hist = vote_histogram(votes, np.array([0, 1, 0]), num_sensitive=2, num_public=4)
    np.testing.assert_array_equal(hist, [[2, 1, 1, 0], [0, 0, 1, 1]])
    assert hist.sum() == 3 * 2  # every image casts exactly k votes


def test_tiny_sigma_gives_exact_top_k_selection():
    hist = np.array([[50, 40, 3, 0, 0, 0], [45, 0, 30, 20, 0, 0], [0, 0, 0, 0, 9, 8]])
    noisy = noisy_histogram(hist, query_sigma=1e-6, k=3, noise=GaussianNoise(seed=0))
    # class 1 would pick public 0 but class 0 took it first: it falls back to its next best.
    assert select_semantics(noisy, per_class=2) == [[0, 1], [2, 3], [4, 5]]


def test_noise_std_is_sigma_times_sqrt_k():
    hist = np.zeros((50, 400), dtype=np.int64)
    noisy = noisy_histogram(hist, query_sigma=3.0, k=4, noise=GaussianNoise(seed=1))
    assert noisy.std() == pytest.approx(3.0 * 2.0, rel=0.02)
    assert abs(noisy.mean()) < 4 * 6.0 / np.sqrt(noisy.size)  # 4 standard errors of the mean


def test_huge_sigma_selection_is_chance():
    """At σ_q far above any count the picks carry no information: hits ≈ per_class / P."""
    noise = GaussianNoise(seed=2)
    num_public, trials, hits = 20, 400, 0
    hist = np.zeros((1, num_public), dtype=np.int64)
    hist[0, 0] = 100  # the true answer: public class 0
    for _ in range(trials):
        hits += 0 in select_semantics(noisy_histogram(hist, 1e6, 1, noise), per_class=1)[0]
    assert hits / trials < 0.05 + 3 * np.sqrt(0.05 * 0.95 / trials)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 1000))
def test_selection_is_disjoint_and_sized(num_sensitive, per_class, seed):
    num_public = num_sensitive * per_class + 3
    noisy = np.random.default_rng(seed).normal(size=(num_sensitive, num_public))
    picks = select_semantics(noisy, per_class)
    flat = [p for row in picks for p in row]
    assert all(len(row) == per_class for row in picks)
    assert len(set(flat)) == len(flat)
    # the first class always gets its own top picks
    assert sorted(picks[0]) == sorted(np.argsort(-noisy[0])[:per_class].tolist())


def test_too_many_picks_is_an_error():
    with pytest.raises(ValueError):
        select_semantics(np.zeros((3, 5)), per_class=2)
