"""The accountant against independent references (Google's dp-accounting) and its own guarantees."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from privimage.privacy.accountant import (FixedReleasesExceedTarget, Mechanism, NoiseBeyondLimit,
                                          calibrate_noise_multiplier, compose_epsilon)

DELTA = 1e-5


def mechanisms(query_sigma: float, sample_rate: float, steps: int, sigma: float) -> list[Mechanism]:
    query = [Mechanism(query_sigma)] if query_sigma else []
    return [*query, Mechanism(sigma, sample_rate, steps)]


def reference_event(query_sigma: float, sample_rate: float, steps: int, sigma: float) -> dp_accounting.DpEvent:
    dpsgd = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(sigma))
    events = [dp_accounting.SelfComposedDpEvent(dpsgd, steps)]
    if query_sigma:
        events.insert(0, dp_accounting.GaussianDpEvent(query_sigma))
    return dp_accounting.ComposedDpEvent(events)


@pytest.mark.parametrize("query_sigma", [0, 5, 50])
@pytest.mark.parametrize("sample_rate", [0.001, 0.01, 0.1])
def test_rdp_matches_dp_accounting(query_sigma: float, sample_rate: float) -> None:
    # σ >= 1: below, at q >= 0.05, dp-accounting's fractional-order series stops before converging and
    # is looser than Opacus, whose values match a numerical integration of the Renyi divergence.
    for steps in (10, 1000):
        for sigma in (1.0, 4.0):
            reference = RdpAccountant()
            reference.compose(reference_event(query_sigma, sample_rate, steps, sigma))
            expected = reference.get_epsilon(DELTA)
            ours = compose_epsilon(mechanisms(query_sigma, sample_rate, steps, sigma), DELTA)
            assert ours == pytest.approx(expected, rel=0.01), (query_sigma, sample_rate, steps, sigma)


@pytest.mark.parametrize("query_sigma, sample_rate, steps, sigma",
                         [(5, 1.0, 1, 5), (50, 1.0, 1, 50), (5, 0.01, 20, 1.0)])
def test_prv_handles_sample_rate_one_and_matches_pld(query_sigma, sample_rate, steps, sigma) -> None:
    """PRV (Opacus) at q = 1 against dp-accounting's PLD accountant, a near-exact reference."""
    reference = PLDAccountant()
    reference.compose(reference_event(query_sigma, sample_rate, steps, sigma))
    expected = reference.get_epsilon(DELTA)
    ours = compose_epsilon(mechanisms(query_sigma, sample_rate, steps, sigma), DELTA, accountant="prv")
    assert expected - 1e-3 <= ours <= expected + 0.02  # an upper bound, loose by PRV's eps_error (0.01)


def test_prv_is_tighter_than_rdp() -> None:
    composed = mechanisms(20, 0.02, 200, 1.0)
    assert compose_epsilon(composed, DELTA, "prv") < compose_epsilon(composed, DELTA, "rdp")


def test_no_mechanism_spends_nothing() -> None:
    assert compose_epsilon([], DELTA) == 0.0


@pytest.mark.parametrize("query_sigma, target", [(0, 1.0), (20, 10.0), (5, 3.0)])
def test_calibration_is_tight(query_sigma: float, target: float) -> None:
    fixed = mechanisms(query_sigma, 0.02, 100, 1.0)[:-1]
    sigma = calibrate_noise_multiplier(target, DELTA, 0.02, 100, fixed=fixed)
    composed = compose_epsilon(mechanisms(query_sigma, 0.02, 100, sigma), DELTA)
    assert 0.99 * target <= composed <= target


def test_prv_calibration_is_tight() -> None:
    fixed = [Mechanism(5.0)]
    sigma = calibrate_noise_multiplier(2.0, DELTA, 1.0, 5, fixed=fixed, accountant="prv")
    composed = compose_epsilon(mechanisms(5.0, 1.0, 5, sigma), DELTA, "prv")
    assert 0.99 * 2.0 <= composed <= 2.0


def test_query_alone_over_target_is_a_budget_error() -> None:
    with pytest.raises(FixedReleasesExceedTarget, match="alone spend"):
        calibrate_noise_multiplier(0.5, DELTA, 0.02, 100, fixed=[Mechanism(5.0)])


def test_unreachable_target_is_a_budget_error() -> None:
    query = Mechanism(5.0)
    barely_above = compose_epsilon([query], DELTA) * 1.0001
    with pytest.raises(NoiseBeyondLimit, match="noise multiplier above"):
        calibrate_noise_multiplier(barely_above, DELTA, 1.0, 10_000, fixed=[query])


@pytest.mark.parametrize("kwargs, message", [
    ({"sample_rate": 1.5}, "sample rate"),
    ({"steps": 0}, "at least one step"),
    ({"accountant": "gdp"}, "unknown accountant"),
    ({"target_epsilon": 0.0}, "not a budget"),
    ({"delta": 1.0}, "not a budget"),
])
def test_bad_inputs_are_value_errors_without_config_keys(kwargs: dict, message: str) -> None:
    args = {"target_epsilon": 1.0, "delta": DELTA, "sample_rate": 0.01, "steps": 10} | kwargs
    with pytest.raises(ValueError, match=message):
        calibrate_noise_multiplier(**args)


def test_mechanism_round_trip_and_validation() -> None:
    mechanism = Mechanism(1.25, 0.01, 300)
    assert mechanism.kind == "subsampled_gaussian" and Mechanism(5.0).kind == "gaussian"
    assert Mechanism.from_dict(mechanism.to_dict()) == mechanism
    with pytest.raises(ValueError):
        Mechanism.from_dict({"mechanism": "gaussian", "noise_multiplier": 5.0, "sample_rate": 0.5, "steps": 1})
    with pytest.raises(ValueError):
        Mechanism(0.0, 0.01, 10)
    with pytest.raises(ValueError):
        Mechanism(1.0, 1.5, 10)


rates = st.floats(0.001, 0.05)
sigmas = st.floats(0.8, 5.0)
step_counts = st.integers(1, 2000)


@settings(max_examples=8, deadline=None)
@given(rates, sigmas, step_counts, st.integers(1, 1000))
def test_more_steps_spend_more(sample_rate: float, sigma: float, steps: int, more: int) -> None:
    fewer = compose_epsilon(mechanisms(20, sample_rate, steps, sigma), DELTA)
    assert compose_epsilon(mechanisms(20, sample_rate, steps + more, sigma), DELTA) > fewer


@settings(max_examples=8, deadline=None)
@given(rates, sigmas, step_counts, st.floats(1.05, 3.0))
def test_more_noise_spends_less(sample_rate: float, sigma: float, steps: int, factor: float) -> None:
    less_noise = compose_epsilon(mechanisms(20, sample_rate, steps, sigma), DELTA)
    assert compose_epsilon(mechanisms(20, sample_rate, steps, sigma * factor), DELTA) < less_noise


@settings(max_examples=8, deadline=None)
@given(rates, sigmas, step_counts, st.floats(1.0, 100.0), st.floats(1.05, 3.0))
def test_more_query_noise_spends_less(sample_rate, sigma, steps, query_sigma, factor) -> None:
    louder = compose_epsilon(mechanisms(query_sigma, sample_rate, steps, sigma), DELTA)
    assert compose_epsilon(mechanisms(query_sigma * factor, sample_rate, steps, sigma), DELTA) < louder
