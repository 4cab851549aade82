"""Empirical privacy auditing in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

m canaries are each put into the training set with probability 1/2, independently. After training,
an auditor scores every canary and guesses "in" for the `guesses` highest scores and "out" for the
`guesses` lowest. Under ε-DP the number of right guesses W among the r = 2·guesses is stochastically
dominated by Binomial(r, e^ε / (1 + e^ε)) (their Theorem 3.1, δ = 0), so any ε whose binomial tail
P[Binomial(r, p_ε) >= W] is below β is refuted at confidence 1 - β: the largest such ε is an
empirical lower bound on the ε the training really has. It ignores δ, which for δ = 1e-5 and a few
hundred canaries moves the bound by far less than its statistical uncertainty.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binom

MAX_EPSILON = 50.0  # beyond this e^ε/(1+e^ε) is 1 in double precision


def correct_guesses(scores: np.ndarray, included: np.ndarray, guesses: int) -> int:
    """Right guesses when the `guesses` highest scores are called members and the `guesses` lowest not."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if not 0 < 2 * guesses <= len(scores):
        raise ValueError(f"need 0 < 2·guesses <= {len(scores)} canaries (got guesses={guesses})")
    order = np.argsort(scores, kind="stable")
    return int(included[order[-guesses:]].sum() + (~included[order[:guesses]]).sum())


def epsilon_lower_bound(correct: int, total: int, beta: float = 0.05) -> float:
    """The largest ε refuted at confidence 1 - β by `correct` right guesses out of `total`; 0 if none."""
    if not 0 <= correct <= total or total < 1 or not 0 < beta < 1:
        raise ValueError("need 0 <= correct <= total, total >= 1 and 0 < beta < 1")

    def tail_minus_beta(epsilon: float) -> float:
        p = 1 / (1 + math.exp(-epsilon))
        return float(binom.sf(correct - 1, total, p)) - beta  # P[W >= correct] - β, increasing in ε

    if tail_minus_beta(0.0) >= 0:
        return 0.0  # even ε = 0 explains the guesses
    if tail_minus_beta(MAX_EPSILON) < 0:
        return MAX_EPSILON
    return brentq(tail_minus_beta, 0.0, MAX_EPSILON, xtol=1e-9)
