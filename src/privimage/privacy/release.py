"""Book → compute → record → write: the one way a stage releases a noisy result of the sensitive data.

The ledger charges a release before its noisy result exists, and counts it as released (durably)
before anything that depends on it leaves the process. A rerun can then tell apart:
- booked, not released (killed in between): nothing left the process, so the result is computed again
  under the same booking, never booked twice;
- released: the written result is read back, never made again; if it is gone, the stage refuses,
  since making it again would release the same data twice.

`release_once` does all of it for a one-shot release (the semantic query, a DP-MERF embedding);
multi-step mechanisms (DP-SGD) take `open_release` and record each committed checkpoint's steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, TypeVar

from privimage.errors import UserError
from privimage.privacy.accountant import Mechanism, compose_epsilon
from privimage.privacy.ledger import Booking, PrivacyLedger

T = TypeVar("T")


@dataclass(frozen=True)
class Release:
    """A release booked in `ledger`: what it may spend, and how to count what it has released."""

    ledger: PrivacyLedger
    booking: Booking

    @property
    def mechanism(self) -> Mechanism:
        return self.booking.mechanism

    def released_steps(self) -> int:
        """Steps released so far, as the ledger file says now (under torchrun, rank 0 records them)."""
        return self.ledger.reread().released_steps(self.booking.stage, self.booking.release)

    def record(self, steps: int) -> None:
        """Durably count `steps` steps as released: call it before anything that depends on them leaves."""
        self.ledger.record_release(self.booking.stage, self.booking.release, steps)

    def epsilon_after(self, steps: int) -> float:
        """The composed ε once `steps` of this release's steps are out, with every other booking."""
        others = [b.mechanism for b in self.ledger.entries if b != self.booking]
        return compose_epsilon([*others, replace(self.mechanism, steps=steps)], self.ledger.target_delta,
                               self.ledger.accountant)


def open_release(ledger: PrivacyLedger, stage: str, name: str, planned: Callable[[], Mechanism], *,
                 other_release: str | None = None, book: bool = True) -> Release:
    """The booking of release `name` of `stage`: the existing one, or `planned()` booked now.

    `other_release` is the refusal when `stage` has already booked another release (its settings
    changed); None lets releases of one stage stand side by side (the semantic query, one per config).
    `book=False` plans the booking without writing it: the ranks that follow rank 0 under torchrun.
    """
    booking = ledger.find(stage) if other_release is not None else ledger.find(stage, name)
    if booking is not None and booking.release != name:
        raise UserError(other_release)
    if booking is None:
        booking = Booking(stage, planned(), name)
        if book:
            ledger.book(booking)  # before the noisy result exists, let alone is used
    return Release(ledger, booking)


def release_once(ledger: PrivacyLedger, stage: str, name: str, planned: Callable[[], Mechanism], *,
                 compute: Callable[[Mechanism], T], write: Callable[[T], None], read: Callable[[], T | None],
                 missing: str, other_release: str | None = None) -> T:
    """The one noisy result of release `name` of `stage`, made at most once per run directory.

    Not yet released: `compute(mechanism)` makes it under the booking (`open_release`), the ledger
    counts it as released, then `write` saves it. Released: `read()` returns the saved result, or None
    where it is gone or another release's; then this refuses with `missing`.
    """
    release = open_release(ledger, stage, name, planned, other_release=other_release)
    if ledger.released_steps(stage, name):
        result = read()
        if result is None:
            raise UserError(missing)
        return result  # the same result, never a second one
    result = compute(release.mechanism)
    release.record(1)
    write(result)
    return result
