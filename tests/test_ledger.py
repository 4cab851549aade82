"""The privacy ledger: its file format, recomputed spend, refusals and atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from privimage import atomic
from privimage.errors import UserError
from privimage.privacy.accountant import Mechanism, compose_epsilon
from privimage.privacy.ledger import Booking, PrivacyLedger

QUERY = Booking("semantics", Mechanism(20.0))
FINETUNE = Booking("finetune", Mechanism(2.0, 1.0, 4))
GREEDY = Booking("finetune", Mechanism(0.3, 1.0, 50))


def test_new_ledger_is_written_in_the_documented_format(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    PrivacyLedger.open(path, 10.0, 1e-5)
    assert json.loads(path.read_text()) == {
        "target": {"epsilon": 10.0, "delta": 1e-5},
        "accountant": "rdp",
        "entries": [],
        "spent": {"epsilon": 0.0, "delta": 0.0},
    }


def test_round_trip(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    ledger = PrivacyLedger.open(path, 10.0, 1e-5)
    ledger.book(QUERY)
    ledger.book(FINETUNE)

    stored = json.loads(path.read_text())  # on disk as soon as book() returns
    assert stored["entries"] == [
        {"stage": "semantics", "mechanism": "gaussian", "noise_multiplier": 20.0, "sample_rate": 1.0, "steps": 1,
         "release": "", "released_steps": 0},
        {"stage": "finetune", "mechanism": "subsampled_gaussian", "noise_multiplier": 2.0, "sample_rate": 1.0,
         "steps": 4, "release": "", "released_steps": 0},
    ]
    both = [QUERY.mechanism, FINETUNE.mechanism]
    assert stored["spent"] == {"epsilon": pytest.approx(compose_epsilon(both, 1e-5)), "delta": 1e-5}

    reopened = PrivacyLedger.open(path, 10.0, 1e-5)
    assert reopened.entries == [QUERY, FINETUNE]
    assert reopened.find("finetune") == FINETUNE
    assert reopened.find("pretrain") is None
    assert reopened.spent_epsilon() == pytest.approx(ledger.spent_epsilon())


def test_spent_is_recomputed_from_the_entries(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    PrivacyLedger.open(path, 10.0, 1e-5).book(QUERY)
    tampered = json.loads(path.read_text())
    tampered["spent"]["epsilon"] = 0.0
    path.write_text(json.dumps(tampered))

    ledger = PrivacyLedger.open(path, 10.0, 1e-5)
    assert ledger.spent_epsilon() == pytest.approx(compose_epsilon([QUERY.mechanism], 1e-5))
    assert ledger.spent_epsilon([FINETUNE.mechanism]) == pytest.approx(
        compose_epsilon([QUERY.mechanism, FINETUNE.mechanism], 1e-5))


def test_overspending_is_refused_and_leaves_the_file_unchanged(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    ledger = PrivacyLedger.open(path, 2.0, 1e-5)
    ledger.book(QUERY)
    before = path.read_bytes()
    with pytest.raises(UserError, match="over the target"):
        ledger.book(GREEDY)
    assert path.read_bytes() == before
    assert ledger.entries == [QUERY]


@pytest.mark.parametrize("epsilon, delta, accountant", [(1.0, 1e-5, "rdp"), (10.0, 1e-6, "rdp"), (10.0, 1e-5, "prv")])
def test_a_different_target_is_refused(tmp_path, epsilon: float, delta: float, accountant: str) -> None:
    path = tmp_path / "privacy.json"
    PrivacyLedger.open(path, 10.0, 1e-5)
    with pytest.raises(UserError, match="use a new --out or the same target"):
        PrivacyLedger.open(path, epsilon, delta, accountant)


def test_a_corrupt_ledger_is_a_user_error(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    path.write_text('{"target": {"epsilon": 10}}')
    with pytest.raises(UserError, match="not a valid privacy ledger"):
        PrivacyLedger.open(path, 10.0, 1e-5)


def test_a_failed_write_keeps_the_old_file_and_entries(tmp_path, monkeypatch) -> None:
    path = tmp_path / "privacy.json"
    ledger = PrivacyLedger.open(path, 10.0, 1e-5)
    ledger.book(QUERY)
    before = path.read_bytes()

    def crash(src, dst):  # the process dies between writing the temporary file and renaming it
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError):
        ledger.book(FINETUNE)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert ledger.entries == [QUERY]
    assert os.listdir(tmp_path) == ["privacy.json"]  # no temporary file left behind


def test_released_steps_are_recorded_and_only_go_up(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    ledger = PrivacyLedger.open(path, 10.0, 1e-5)
    ledger.book(FINETUNE)
    ledger.record_release("finetune", "", 2)
    assert PrivacyLedger.open(path, 10.0, 1e-5).released_steps("finetune", "") == 2
    with pytest.raises(ValueError):
        ledger.record_release("finetune", "", 1)  # never down
    with pytest.raises(ValueError):
        ledger.record_release("finetune", "", FINETUNE.mechanism.steps + 1)  # never past the booking
    with pytest.raises(ValueError):
        ledger.record_release("semantics", "", 1)  # never without a booking


def test_book_rereads_the_file_and_keeps_entries_booked_by_another_object(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    first = PrivacyLedger.open(path, 10.0, 1e-5)
    second = PrivacyLedger.open(path, 10.0, 1e-5)
    first.book(QUERY)
    second.book(FINETUNE)  # a stale object must not write over the query
    assert PrivacyLedger.open(path, 10.0, 1e-5).entries == [QUERY, FINETUNE]


def test_a_missing_ledger_is_not_recreated_when_asked_not_to(tmp_path) -> None:
    with pytest.raises(UserError, match="use a new --out"):
        PrivacyLedger.open(tmp_path / "privacy.json", 10.0, 1e-5, create=False)
    assert not (tmp_path / "privacy.json").exists()


def test_a_nan_epsilon_is_refused(tmp_path, monkeypatch) -> None:
    path = tmp_path / "privacy.json"
    ledger = PrivacyLedger.open(path, 10.0, 1e-5)
    before = path.read_bytes()
    monkeypatch.setattr("privimage.privacy.ledger.compose_epsilon",
                        lambda mechanisms, *args, **kwargs: float("nan") if mechanisms else 0.0)
    with pytest.raises(UserError, match="over the target"):
        ledger.book(QUERY)
    assert path.read_bytes() == before


def test_a_ledger_over_its_target_is_refused_on_open(tmp_path) -> None:
    path = tmp_path / "privacy.json"
    PrivacyLedger.open(path, 10.0, 1e-5).book(QUERY)
    tampered = json.loads(path.read_text())
    tampered["entries"].append(GREEDY.to_dict(0))  # ε far above 10
    path.write_text(json.dumps(tampered))
    with pytest.raises(UserError, match="not within its target"):
        PrivacyLedger.open(path, 10.0, 1e-5)
