"""The privacy ledger: `privacy.json`, the run directory's record of every release it has paid for.

Stages book a mechanism *before* they compute or use its noisy result, and booking refuses anything
that would take the composed ε over the run's target, so a crash or a rerun can never spend budget
that was not recorded. The spent ε is always recomputed from the entries; the `spent` field in the
file is for people reading it.

Format:
    {"target": {"epsilon", "delta"}, "accountant",
     "entries": [{"stage", "mechanism", "noise_multiplier", "sample_rate", "steps", "release"}, ...],
     "spent": {"epsilon", "delta"}}
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence

from privimage.errors import UserError
from privimage.privacy.accountant import Mechanism, compose_epsilon
from privimage.rundir import read_json, write_json

log = logging.getLogger(__name__)

OVERSPEND_SLACK = 1e-9  # relative: absorbs float noise in the accountant, nothing more


class PrivacyLedger:
    """The mechanisms booked against one run's (ε, δ) target, mirrored to a JSON file."""

    def __init__(self, path: Path, target_epsilon: float, target_delta: float, accountant: str,
                 entries: list[Mechanism]):
        self.path = path
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.accountant = accountant
        self.entries = entries

    @classmethod
    def open(cls, path: str | os.PathLike, target_epsilon: float, target_delta: float,
             accountant: str = "rdp") -> PrivacyLedger:
        """Load the ledger at `path`, or create it; an existing one must have the same target."""
        path = Path(path)
        if not path.exists():
            ledger = cls(path, float(target_epsilon), float(target_delta), accountant, [])
            ledger._write(ledger.entries, spent_epsilon=0.0)
            return ledger
        try:
            data = read_json(path)
            stored_epsilon, stored_delta = float(data["target"]["epsilon"]), float(data["target"]["delta"])
            stored_accountant = str(data["accountant"])
            entries = [Mechanism.from_dict(entry) for entry in data["entries"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path} is not a valid privacy ledger ({err}): use a new --out") from err
        same_target = math.isclose(stored_epsilon, target_epsilon, rel_tol=1e-12) and math.isclose(
            stored_delta, target_delta, rel_tol=1e-12
        )
        if not same_target or stored_accountant != accountant:
            raise UserError(
                f"this run directory was made for ε={stored_epsilon:g}, δ={stored_delta:g} "
                f"({stored_accountant} accountant); use a new --out or the same target"
            )
        return cls(path, stored_epsilon, stored_delta, stored_accountant, entries)

    def reread(self) -> PrivacyLedger:
        """The ledger as it is on disk now (under torchrun, rank 0 books and the other ranks reread)."""
        return PrivacyLedger.open(self.path, self.target_epsilon, self.target_delta, self.accountant)

    def spent_epsilon(self, extra: Sequence[Mechanism] = ()) -> float:
        """Composed ε of the booked entries, plus `extra` ones (to ask "what if")."""
        return compose_epsilon([*self.entries, *extra], self.target_delta, self.accountant)

    def find(self, stage: str, release: str | None = None) -> Mechanism | None:
        """The latest entry booked by `stage` (for `release`, if given), or None."""
        return next((m for m in reversed(self.entries)
                     if m.stage == stage and (release is None or m.release == release)), None)

    def book(self, mechanism: Mechanism) -> None:
        """Record `mechanism` on disk, or refuse (leaving the ledger as it was) if it breaks the target."""
        spent = self.spent_epsilon([mechanism])
        if spent > self.target_epsilon * (1 + OVERSPEND_SLACK):
            raise UserError(
                f"stage {mechanism.stage} would bring the spent ε to {spent:.4g}, over the target "
                f"{self.target_epsilon:g} (already spent {self.spent_epsilon():.4g}): "
                "raise privacy.epsilon or use a new --out"
            )
        entries = [*self.entries, mechanism]
        self._write(entries, spent)
        self.entries = entries
        log.info("privacy: booked %s (σ=%.4g); spent ε=%.4g of %g", mechanism.stage,
                 mechanism.noise_multiplier, spent, self.target_epsilon)

    def _write(self, entries: list[Mechanism], spent_epsilon: float) -> None:
        write_json(self.path, {
            "target": {"epsilon": self.target_epsilon, "delta": self.target_delta},
            "accountant": self.accountant,
            "entries": [m.to_dict() for m in entries],
            "spent": {"epsilon": spent_epsilon, "delta": self.target_delta if entries else 0.0},
        })
