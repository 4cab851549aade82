"""ε by stage on the ledger: each entry alone, each stage composed, the composed curve over the run."""

import math

import pytest

from privimage.privacy.accountant import Mechanism, compose_epsilon
from privimage.privacy.ledger import Booking, PrivacyLedger

DELTA = 1e-5


@pytest.fixture
def ledger(tmp_path) -> PrivacyLedger:
    ledger = PrivacyLedger.open(tmp_path / "privacy.json", 10.0, DELTA)
    ledger.book(Booking("semantics", Mechanism(6.0), "a"))
    ledger.book(Booking("warmstart", Mechanism(3.0), "w"))
    ledger.book(Booking("semantics", Mechanism(8.0), "b"))  # a second query (other settings) beside the first
    ledger.book(Booking("finetune", Mechanism(1.2, 0.1, 30), "f"))
    return ledger


def test_a_stage_with_two_gaussian_queries_costs_one_gaussian_of_their_combined_noise(ledger):
    """Gaussian RDP adds as 1/σ²: σ 6 and σ 8 compose to one Gaussian of σ = 4.8 (independent reference)."""
    combined = 1 / math.sqrt(1 / 6.0 ** 2 + 1 / 8.0 ** 2)
    stages = ledger.epsilon_by_stage()
    assert list(stages) == ["semantics", "warmstart", "finetune"]
    assert stages["semantics"] == pytest.approx(compose_epsilon([Mechanism(combined)], DELTA), rel=1e-6)
    assert stages["warmstart"] == pytest.approx(compose_epsilon([Mechanism(3.0)], DELTA))


def test_each_entry_alone_is_less_than_the_composed_total(ledger):
    alone = ledger.epsilon_alone()
    assert alone == [compose_epsilon([b.mechanism], DELTA) for b in ledger.entries]
    assert max(alone) < ledger.spent_epsilon() < sum(alone)


def test_the_curve_rises_from_nothing_to_the_spent_total(ledger):
    curve = ledger.spending_curve(points=10)
    assert [b.release for b, _, _ in curve] == ["a", "w", "b", "f"]
    assert curve[0][1:] == ([0, 1], [0.0, ledger.epsilon_alone()[0]])
    finetune_steps, finetune_epsilon = curve[-1][1], curve[-1][2]
    assert finetune_steps == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert finetune_epsilon == sorted(finetune_epsilon) and finetune_epsilon[-1] == pytest.approx(ledger.spent_epsilon())
    for (_, _, before), (_, _, after) in zip(curve, curve[1:]):
        assert after[0] == pytest.approx(before[-1])  # each mechanism starts where the ones before ended
