"""Privacy accounting: what every noisy release costs, composed over the whole run.

A run releases a few things computed from sensitive data: the noisy vote histogram of the semantic
query and the warm start's (or DP-MERF's) noisy embedding (Gaussian mechanisms with sampling rate 1,
one step), and the DP-SGD updates (a Poisson-subsampled Gaussian mechanism over many steps). All are
Gaussian mechanisms under the add/remove-one neighbouring relation, so Opacus' accountants compose them
as a history of `(noise_multiplier, sample_rate, steps)`; this module never does the maths itself.
Which releases a run makes, in order, is privacy/plan.py's.

- `rdp` (default): Renyi DP (Mironov et al. 2019) converted with Balle et al. 2020. Opacus' default
  orders stop at 63, which is loose for tiny ε (a lone query at σ_q = 50), so we add the large orders
  Google's dp-accounting uses.
- `prv`: numerical composition of privacy loss random variables (Gopi et al. 2021); tighter, slower,
  and the ε it returns is an upper bound (estimate + 0.01). Opacus' PRV formulas hold at sampling
  rate 1, where they reduce to the plain Gaussian mechanism's privacy loss N(1/2σ², 1/σ²); only
  `log(1 - q) = -inf` raises a spurious numpy divide warning there, which we silence.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant


log = logging.getLogger(__name__)

ACCOUNTANTS = ("rdp", "prv")
RDP_ORDERS = [*RDPAccountant.DEFAULT_ALPHAS, 128, 256, 512, 1024]
MAX_NOISE_MULTIPLIER = 1e4  # beyond this, the DP-SGD updates are pure noise: better to tell the user
CALIBRATION_TOLERANCE = 0.01  # calibrated ε lands in [(1 - tol) * target, target]


class BudgetError(ValueError):
    """The target cannot be met; the subclass says which part is to blame."""


class FixedReleasesExceedTarget(BudgetError):
    """The releases that come before DP-SGD already spend the whole target."""


class NoiseBeyondLimit(BudgetError):
    """DP-SGD would need more noise than any useful update survives."""


@dataclass(frozen=True)
class Mechanism:
    """One Gaussian release on the sensitive data, as the accountant sees it: σ, q and T, nothing else.

    A plain Gaussian mechanism (the vote query) is the case q = 1, T = 1.
    """

    noise_multiplier: float  # noise std / L2 sensitivity
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"a noise multiplier of {self.noise_multiplier} has no finite ε")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate {self.sample_rate} is not in (0, 1]")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @property
    def kind(self) -> str:
        return "gaussian" if self.sample_rate == 1 and self.steps == 1 else "subsampled_gaussian"

    def to_dict(self) -> dict[str, Any]:
        return {"mechanism": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mechanism:
        mechanism = cls(float(d["noise_multiplier"]), float(d["sample_rate"]), int(d["steps"]))
        if d.get("mechanism", mechanism.kind) not in (mechanism.kind, "subsampled_gaussian"):
            raise ValueError(f"a {d['mechanism']} mechanism cannot have sample rate {mechanism.sample_rate} "
                             f"and {mechanism.steps} steps")
        return mechanism


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}: use one of {', '.join(ACCOUNTANTS)}")


def compose_epsilon(mechanisms: Sequence[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """ε at `delta` of all `mechanisms` run on the same sensitive data (0 for none)."""
    _check_accountant(accountant)
    if not mechanisms:
        return 0.0
    history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in mechanisms]
    engine = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    engine.history = history
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        # "Optimal order is the smallest/largest alpha" (RDP, and PRV sizing its domain from RDP): the
        # bound stays valid, only looser, and with orders 1.1 to 1024 it happens only for ε far from
        # any useful budget. The divide warning is log(1 - q) at q = 1, see the module docstring.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        if accountant == "rdp":
            return float(engine.get_epsilon(delta=delta, alphas=RDP_ORDERS))
        return float(engine.get_epsilon(delta=delta))


def _solve(epsilon_at: Callable[[float], float], target: float, start: float) -> float:
    """Smallest σ (within the tolerance) with `epsilon_at(σ) <= target`, for ε decreasing in σ.

    Brackets by doubling or halving from `start`, keeping ε(low) > target >= ε(high), then narrows
    the bracket by false position on log ε against log σ: nearly a straight line for Gaussian
    mechanisms, so it takes a few accountant calls where bisection takes ten.
    """
    low, high = start, start
    eps_low = eps_high = epsilon_at(start)
    while eps_high > target:  # too little noise: double until it fits
        low, eps_low, high = high, eps_high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            return math.inf
        eps_high = epsilon_at(high)
    while eps_low <= target:  # `start` already fits: halve until it no longer does
        high, eps_high, low = low, eps_low, low / 2
        eps_low = epsilon_at(low)
    aim = (1 - CALIBRATION_TOLERANCE / 2) * target
    while eps_high < (1 - CALIBRATION_TOLERANCE) * target and high - low > 1e-9 * high:
        if math.isfinite(eps_low):
            fraction = min(max(math.log(eps_low / aim) / math.log(eps_low / eps_high), 0.1), 0.9)
        else:
            fraction = 0.5
        mid = low * (high / low) ** fraction
        eps_mid = epsilon_at(mid)
        if eps_mid > target:
            low, eps_low = mid, eps_mid
        else:
            high, eps_high = mid, eps_mid
    return high


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    fixed: Sequence[Mechanism] = (),
    accountant: str = "rdp",
) -> float:
    """Smallest DP-SGD noise multiplier whose ε, composed with the `fixed` releases, meets the target.

    The result is tight: the composed ε lies in [0.99 * target, target].
    """
    _check_accountant(accountant)
    if not (target_epsilon > 0 and 0 < delta < 1):
        raise ValueError(f"the target ε={target_epsilon:g}, δ={delta:g} is not a budget: need ε > 0 and 0 < δ < 1")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"the DP-SGD sample rate {sample_rate:g} is not in (0, 1]")
    if steps < 1:
        raise ValueError(f"DP-SGD needs at least one step (got {steps})")
    fixed = tuple(fixed)
    fixed_epsilon = compose_epsilon(fixed, delta, accountant)
    if fixed_epsilon >= target_epsilon:
        raise FixedReleasesExceedTarget(
            f"the releases before DP-SGD alone spend ε={fixed_epsilon:.3g} of the target {target_epsilon:g}")

    def epsilon_at(sigma: float) -> float:
        return compose_epsilon([*fixed, Mechanism(sigma, sample_rate, steps)], delta, accountant)

    # PRV is slow and runs out of memory at tiny σ, so it starts from the RDP answer (PRV is tighter,
    # so its σ is a little smaller) instead of scanning from σ = 1.
    start = 1.0 if accountant == "rdp" else calibrate_noise_multiplier(
        target_epsilon, delta, sample_rate, steps, fixed, "rdp"
    )
    sigma = _solve(epsilon_at, target_epsilon, start)
    if sigma == math.inf:
        raise NoiseBeyondLimit(
            f"DP-SGD would need a noise multiplier above {MAX_NOISE_MULTIPLIER:g} to fit in ε={target_epsilon:g} "
            f"(the other releases spend {fixed_epsilon:.3g})")
    log.debug("calibrated DP-SGD noise multiplier %.4f for ε=%g, δ=%g (%s)", sigma, target_epsilon, delta, accountant)
    return sigma
