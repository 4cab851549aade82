"""The privacy ledger: `privacy.json`, the run directory's record of every release it has paid for.

Stages book a mechanism *before* they compute its noisy result, and booking refuses anything that
would take the composed ε over the run's target. Each entry also records how many of its steps have
been released (`released_steps`): a stage writes that number durably *before* anything depending on
those steps leaves the process, so a rerun can tell a booking that is still unused (redo it: nothing
left) from one whose results are out (never redo it: that would release the same data twice).

The spent ε is always recomputed from the entries; the `spent` field in the file is for people. A
ledger whose recomputed ε is not finite and at most its target is refused: that is the only state it
accepts.

Format:
    {"target": {"epsilon", "delta"}, "accountant",
     "entries": [{"stage", "mechanism", "noise_multiplier", "sample_rate", "steps", "release",
                  "released_steps"}, ...],
     "spent": {"epsilon", "delta"}}
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from privimage.errors import UserError
from privimage.privacy.accountant import Mechanism, compose_epsilon
from privimage.atomic import read_json, write_json

log = logging.getLogger(__name__)

OVERSPEND_SLACK = 1e-9  # relative: absorbs float noise in the accountant, nothing more


@dataclass(frozen=True)
class Booking:
    """A mechanism booked by a stage for one release (the stage's config fingerprint).

    The release lets a stage killed after booking find its booking when rerun and not pay twice.
    """

    stage: str
    mechanism: Mechanism
    release: str = ""

    def to_dict(self, released_steps: int) -> dict:
        return {"stage": self.stage, **self.mechanism.to_dict(), "release": self.release,
                "released_steps": released_steps}

    @classmethod
    def from_dict(cls, d: dict) -> Booking:
        return cls(str(d["stage"]), Mechanism.from_dict(d), str(d.get("release", "")))


class PrivacyLedger:
    """The bookings against one run's (ε, δ) target, mirrored to a JSON file.

    Every change rereads the file first, so a ledger object never writes over entries it has not seen.
    (One process per run directory is enforced by the run-directory lock, not here.)
    """

    def __init__(self, path: Path, target_epsilon: float, target_delta: float, accountant: str,
                 entries: list[Booking], released: list[int]):
        self.path = path
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.accountant = accountant
        self.entries = entries
        self.released = released  # released_steps of each entry

    @classmethod
    def open(cls, path: str | os.PathLike, target_epsilon: float, target_delta: float,
             accountant: str = "rdp", *, create: bool = True) -> PrivacyLedger:
        """Load the ledger at `path`, or create it when `create`; an existing one must have the same target."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise UserError(f"{path} is missing but its run directory holds results that spent privacy: "
                                "the spend cannot be known, so nothing more may run there; use a new --out")
            ledger = cls(path, float(target_epsilon), float(target_delta), accountant, [], [])
            ledger._write(ledger.entries, ledger.released)
            return ledger
        ledger = cls._load(path)
        same_target = math.isclose(ledger.target_epsilon, target_epsilon, rel_tol=1e-12) and math.isclose(
            ledger.target_delta, target_delta, rel_tol=1e-12
        )
        if not same_target or ledger.accountant != accountant:
            raise UserError(
                f"this run directory was made for ε={ledger.target_epsilon:g}, δ={ledger.target_delta:g} "
                f"({ledger.accountant} accountant); use a new --out or the same target"
            )
        return ledger

    @classmethod
    def _load(cls, path: Path) -> PrivacyLedger:
        try:
            data = read_json(path)
            target_epsilon, target_delta = float(data["target"]["epsilon"]), float(data["target"]["delta"])
            accountant = str(data["accountant"])
            entries = [Booking.from_dict(entry) for entry in data["entries"]]
            released = [int(entry.get("released_steps", 0)) for entry in data["entries"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path} is not a valid privacy ledger ({err}): use a new --out") from err
        ledger = cls(path, target_epsilon, target_delta, accountant, entries, released)
        spent = ledger.spent_epsilon()
        if not ledger.within_target(spent):
            raise UserError(f"{path} records ε={spent:.4g}, not within its target {target_epsilon:g}: "
                            "the run directory is unusable; use a new --out")
        return ledger

    @classmethod
    def read(cls, path: str | os.PathLike) -> PrivacyLedger:
        """The ledger at `path` with the target it records (for readers: reports, the API)."""
        return cls._load(Path(path))

    def reread(self) -> PrivacyLedger:
        """The ledger as it is on disk now (under torchrun, rank 0 books and the other ranks reread)."""
        return PrivacyLedger.open(self.path, self.target_epsilon, self.target_delta, self.accountant, create=False)

    def _refresh(self) -> None:
        fresh = self.reread()
        self.entries, self.released = fresh.entries, fresh.released

    def spent_epsilon(self, extra: Sequence[Mechanism] = ()) -> float:
        """Composed ε of the booked mechanisms, plus `extra` ones (to ask "what if")."""
        return compose_epsilon([*self.mechanisms(), *extra], self.target_delta, self.accountant)

    def mechanisms(self, excluding_stage: str | None = None) -> list[Mechanism]:
        return [b.mechanism for b in self.entries if b.stage != excluding_stage]

    def epsilon_alone(self) -> list[float]:
        """Each entry's ε on its own, at the ledger's δ, in booking order."""
        return [compose_epsilon([b.mechanism], self.target_delta, self.accountant) for b in self.entries]

    def epsilon_by_stage(self) -> dict[str, float]:
        """Each stage's ε on its own (its entries composed), in the order the stages first booked."""
        return {stage: compose_epsilon([b.mechanism for b in self.entries if b.stage == stage], self.target_delta,
                                       self.accountant)
                for stage in dict.fromkeys(b.stage for b in self.entries)}

    def spending_curve(self, points: int) -> list[tuple[Booking, list[int], list[float]]]:
        """How ε grew: for each entry, up to `points` + 1 step counts from 0 to all its steps, and the
        composed ε of the entries booked before it plus that many of its steps."""
        curve, before = [], []
        for booking in self.entries:
            mechanism = booking.mechanism
            steps = np.unique(np.linspace(0, mechanism.steps, min(points, mechanism.steps) + 1).astype(int)).tolist()
            epsilon = [compose_epsilon(before + ([replace(mechanism, steps=s)] if s else []), self.target_delta,
                                       self.accountant) for s in steps]
            curve.append((booking, steps, epsilon))
            before.append(mechanism)
        return curve

    def within_target(self, spent: float) -> bool:
        """Whether a composed ε is finite and at most the target (float noise aside)."""
        return math.isfinite(spent) and spent <= self.target_epsilon * (1 + OVERSPEND_SLACK)

    def _index(self, stage: str, release: str | None) -> int | None:
        return next((i for i in reversed(range(len(self.entries)))
                     if self.entries[i].stage == stage and (release is None or self.entries[i].release == release)),
                    None)

    def find(self, stage: str, release: str | None = None) -> Booking | None:
        """The latest entry booked by `stage` (for `release`, if given), or None."""
        index = self._index(stage, release)
        return None if index is None else self.entries[index]

    def released_steps(self, stage: str, release: str) -> int:
        """How many steps of the booking (stage, release) have been released; 0 if none or not booked."""
        index = self._index(stage, release)
        return 0 if index is None else self.released[index]

    def book(self, booking: Booking) -> None:
        """Record `booking` on disk, or refuse (leaving the ledger as it was) if it breaks the target."""
        self._refresh()
        spent = self.spent_epsilon([booking.mechanism])
        if not self.within_target(spent):
            raise UserError(
                f"stage {booking.stage} would bring the spent ε to {spent:.4g}, over the target "
                f"{self.target_epsilon:g} (already spent {self.spent_epsilon():.4g}): "
                "use a new run directory, or a larger target there"
            )
        self._write([*self.entries, booking], [*self.released, 0])
        log.info("privacy: booked %s (σ=%.4g); spent ε=%.4g of %g", booking.stage,
                 booking.mechanism.noise_multiplier, spent, self.target_epsilon)

    def record_release(self, stage: str, release: str, steps: int) -> None:
        """Durably note that `steps` steps of the booking (stage, release) are about to leave the process.

        Call it before writing or printing anything that depends on them. The count never goes down
        and never exceeds what was booked.
        """
        self._refresh()
        index = self._index(stage, release)
        if index is None:
            raise ValueError(f"no booking of {stage} for release {release!r}: book before releasing")
        if not self.released[index] <= steps <= self.entries[index].mechanism.steps:
            raise ValueError(f"{stage}: cannot record {steps} released steps (booked {self.entries[index].mechanism.steps}, "
                             f"already released {self.released[index]})")
        released = list(self.released)
        released[index] = steps
        self._write(self.entries, released)

    def _write(self, entries: list[Booking], released: list[int]) -> None:
        spent = compose_epsilon([b.mechanism for b in entries], self.target_delta, self.accountant)
        write_json(self.path, {
            "target": {"epsilon": self.target_epsilon, "delta": self.target_delta},
            "accountant": self.accountant,
            "entries": [b.to_dict(n) for b, n in zip(entries, released)],
            "spent": {"epsilon": spent, "delta": self.target_delta if entries else 0.0},
        })
        self.entries, self.released = entries, released
