"""Empirical privacy auditing in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

m canaries are each put into the training set with probability 1/2, independently. After training,
an auditor scores every canary and guesses "in" for the `guesses` highest scores and "out" for the
`guesses` lowest. Under ε-DP the number of right guesses W among the r = 2·guesses is stochastically
dominated by Binomial(r, e^ε / (1 + e^ε)) (their Theorem 3.1, δ = 0). Under (ε, δ)-DP their
Theorem 5.2 adds 2mδ·α to that tail, with α = max_i P[W - i <= Binomial < W] / i. Any ε whose
p-value is below β is refuted at confidence 1 - β: the largest such ε is an empirical lower bound
on the ε the training really has. Even all r guesses right refute only up to a finite ε (about 3.7
for r = 128, β = 0.05), so a claim above that maximum cannot be tested by the audit at all.
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


def p_value(correct: int, total: int, epsilon: float, delta: float = 0.0, canaries: int | None = None) -> float:
    """P[at least `correct` of `total` guesses right] under (ε, δ)-DP, with `canaries` m (default: total)."""
    m = total if canaries is None else canaries
    q = 1 / (1 + math.exp(-epsilon))
    tail = float(binom.sf(correct - 1, total, q))  # P[Binomial(r, q) >= correct]
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    below = np.cumsum(binom.pmf(correct - np.arange(1, correct + 1), total, q))  # P[correct - i <= B < correct]
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(correct: int, total: int, beta: float = 0.05, delta: float = 0.0,
                        canaries: int | None = None) -> float:
    """The largest ε refuted at confidence 1 - β by `correct` right guesses out of `total`; 0 if none."""
    if not 0 <= correct <= total or total < 1 or not 0 < beta < 1 or not 0 <= delta < 1:
        raise ValueError("need 0 <= correct <= total, total >= 1, 0 < beta < 1 and 0 <= delta < 1")
    if canaries is not None and canaries < total:
        raise ValueError(f"{total} guesses need at least as many canaries (got {canaries})")

    def p_minus_beta(epsilon: float) -> float:  # increasing in ε
        return p_value(correct, total, epsilon, delta, canaries) - beta

    if p_minus_beta(0.0) >= 0:
        return 0.0  # even ε = 0 explains the guesses
    if p_minus_beta(MAX_EPSILON) < 0:
        return MAX_EPSILON
    return brentq(p_minus_beta, 0.0, MAX_EPSILON, xtol=1e-9)
