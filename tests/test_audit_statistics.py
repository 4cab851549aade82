"""The one-run audit's ε lower bound, against Clopper–Pearson as an independent reference."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from privimage.privacy.audit_bound import correct_guesses, epsilon_lower_bound


def clopper_pearson_epsilon(correct: int, total: int, beta: float) -> float:
    """logit of the one-sided (1 - β) Clopper–Pearson lower bound on the guessing accuracy."""
    low = binomtest(correct, total).proportion_ci(confidence_level=1 - 2 * beta, method="exact").low
    return max(0.0, math.log(low / (1 - low))) if low > 0 else 0.0


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 2000), fraction=st.floats(0, 1), beta=st.sampled_from([0.01, 0.05, 0.1]))
def test_bound_is_the_clopper_pearson_logit(total, fraction, beta):
    correct = round(fraction * total)
    expected = clopper_pearson_epsilon(correct, total, beta)
    assert epsilon_lower_bound(correct, total, beta) == pytest.approx(expected, abs=1e-6)


def test_bound_is_valid_for_a_mechanism_of_known_epsilon():
    """Guesses from randomized response with ε = 1: the bound exceeds 1 in at most ~β of the trials."""
    rng = np.random.default_rng(0)
    epsilon, total, beta, trials = 1.0, 200, 0.05, 2000
    correct = rng.binomial(total, 1 / (1 + math.exp(-epsilon)), size=trials)
    exceed = np.mean([epsilon_lower_bound(int(w), total, beta) > epsilon for w in correct])
    assert exceed <= beta + 3 * math.sqrt(beta * (1 - beta) / trials)


def test_bound_approaches_the_true_epsilon_with_many_guesses():
    total = 100_000
    correct = round(total / (1 + math.exp(-2.0)))
    assert 1.9 < epsilon_lower_bound(correct, total) < 2.0


def test_chance_guessing_proves_nothing_and_perfect_guessing_is_capped_by_the_count():
    assert epsilon_lower_bound(50, 100) == 0.0
    perfect = epsilon_lower_bound(100, 100, beta=0.05)
    assert perfect == pytest.approx(math.log(0.05 ** (-1 / 100) - 1) * -1, rel=1e-6)  # p^100 = β


def test_correct_guesses_takes_the_extremes():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.55])
    included = np.array([True, False, False, False, True, True])
    # "in": 0.9 (right), 0.8 (wrong); "out": 0.1 (right), 0.2 (right)
    assert correct_guesses(scores, included, guesses=2) == 3
    with pytest.raises(ValueError):
        correct_guesses(scores, included, guesses=4)


def test_the_delta_term_follows_theorem_5_2_by_direct_summation():
    """p-value under (ε, δ): the binomial tail + 2mδ·max_i P[v-i <= B < v]/i, summed term by term here."""
    from scipy.stats import binom

    from privimage.privacy.audit_bound import p_value

    correct, total, m, epsilon, delta = 40, 64, 256, 0.7, 1e-4
    q = 1 / (1 + math.exp(-epsilon))
    alpha = max(sum(binom.pmf(correct - j, total, q) for j in range(1, i + 1)) / i for i in range(1, correct + 1))
    expected = binom.sf(correct - 1, total, q) + 2 * m * delta * alpha
    assert p_value(correct, total, epsilon, delta, m) == pytest.approx(expected, rel=1e-9)
    assert p_value(correct, total, epsilon) == pytest.approx(binom.sf(correct - 1, total, q), rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(total=st.integers(2, 300), fraction=st.floats(0.5, 1), delta=st.sampled_from([1e-6, 1e-5, 1e-3]))
def test_a_positive_delta_only_lowers_the_bound(total, fraction, delta):
    correct = round(fraction * total)
    assert epsilon_lower_bound(correct, total, 0.05, delta, 2 * total) <= epsilon_lower_bound(correct, total, 0.05) + 1e-9
