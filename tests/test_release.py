"""privacy/release.py: book → compute → record → write, with a fake computation and a real ledger."""

import json
from dataclasses import replace

import pytest

from privimage.errors import UserError
from privimage.privacy.accountant import Mechanism, compose_epsilon
from privimage.privacy.ledger import PrivacyLedger
from privimage.privacy.release import open_release, release_once

MECHANISM = Mechanism(5.0)


class Crash(Exception):
    pass


class FakeStage:
    """A one-shot release whose 'result' is a file; records what each call saw of the ledger."""

    def __init__(self, tmp_path):
        self.ledger_path = tmp_path / "privacy.json"
        self.output = tmp_path / "result.json"
        self.computed: list[tuple[int, int]] = []  # (bookings, released steps) when compute ran
        self.released_when_written: list[int] = []
        self.crash_before_record = False

    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger.open(self.ledger_path, 10.0, 1e-5)

    def run(self, name="a", other_release=None):
        ledger = self.ledger()

        def compute(mechanism):
            fresh = ledger.reread()
            self.computed.append((len(fresh.entries), fresh.released_steps("stage", name)))
            if self.crash_before_record:
                raise Crash
            return {"value": mechanism.noise_multiplier, "release": name}

        def read():
            return json.loads(self.output.read_text()) if self.output.exists() else None

        def write(result):
            self.released_when_written.append(ledger.reread().released_steps("stage", name))
            self.output.write_text(json.dumps(result))

        return release_once(ledger, "stage", name, lambda: MECHANISM, compute=compute, read=read, write=write,
                            missing="released but missing: use a new --out", other_release=other_release)

    def entries(self) -> list[dict]:
        return json.loads(self.ledger_path.read_text())["entries"]


def test_books_before_computing_and_records_before_writing(tmp_path):
    stage = FakeStage(tmp_path)
    assert stage.run() == {"value": 5.0, "release": "a"}
    assert stage.computed == [(1, 0)]  # booked, not yet released, while computing
    assert stage.released_when_written == [1]  # counted as released before it is written
    assert [(e["stage"], e["release"], e["released_steps"]) for e in stage.entries()] == [("stage", "a", 1)]


def test_a_crash_between_compute_and_record_is_computed_again_under_the_same_booking(tmp_path):
    stage = FakeStage(tmp_path)
    stage.crash_before_record = True
    with pytest.raises(Crash):
        stage.run()
    assert [e["released_steps"] for e in stage.entries()] == [0] and not stage.output.exists()
    stage.crash_before_record = False
    assert stage.run()["value"] == 5.0
    assert stage.computed == [(1, 0), (1, 0)]  # no second booking
    assert [e["released_steps"] for e in stage.entries()] == [1]


def test_a_released_result_is_read_back_not_computed_again(tmp_path):
    stage = FakeStage(tmp_path)
    first = stage.run()
    ledger_before = stage.ledger_path.read_bytes()
    assert stage.run() == first
    assert len(stage.computed) == 1 and stage.ledger_path.read_bytes() == ledger_before


def test_a_released_result_whose_file_is_gone_refuses(tmp_path):
    stage = FakeStage(tmp_path)
    stage.run()
    stage.output.unlink()
    ledger_before = stage.ledger_path.read_bytes()
    with pytest.raises(UserError, match="released but missing"):
        stage.run()
    assert len(stage.computed) == 1 and stage.ledger_path.read_bytes() == ledger_before


def test_another_release_of_the_stage_refuses_or_stands_beside_it(tmp_path):
    stage = FakeStage(tmp_path)
    stage.run("a")
    stage.output.unlink()
    with pytest.raises(UserError, match="other settings"):
        stage.run("b", other_release="booked with other settings")
    assert [e["release"] for e in stage.entries()] == ["a"]
    stage.run("b")  # a repeatable release (the semantic query) books beside the first
    assert [(e["release"], e["released_steps"]) for e in stage.entries()] == [("a", 1), ("b", 1)]


def test_a_multi_step_release_counts_its_steps_and_the_epsilon_they_spent(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "privacy.json", 10.0, 1e-5)
    open_release(ledger, "query", "q", lambda: MECHANISM)
    dpsgd = Mechanism(1.0, 0.1, 50)
    release = open_release(ledger, "finetune", "f", lambda: dpsgd, other_release="other settings")
    assert release.released_steps() == 0
    release.record(20)
    again = open_release(ledger, "finetune", "f", lambda: pytest.fail("booked twice"), other_release="other settings")
    assert again.released_steps() == 20
    assert [e.stage for e in ledger.reread().entries] == ["query", "finetune"]
    assert release.epsilon_after(50) == pytest.approx(ledger.spent_epsilon())
    assert release.epsilon_after(20) == pytest.approx(
        compose_epsilon([MECHANISM, replace(dpsgd, steps=20)], 1e-5, "rdp"))
    assert compose_epsilon([MECHANISM], 1e-5, "rdp") < release.epsilon_after(20) < release.epsilon_after(50)


def test_a_follower_rank_plans_the_booking_without_writing_it(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "privacy.json", 10.0, 1e-5)
    release = open_release(ledger, "finetune", "f", lambda: MECHANISM, book=False)
    assert release.booking.mechanism == MECHANISM and ledger.reread().entries == []
