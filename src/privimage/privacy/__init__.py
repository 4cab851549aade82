"""The privacy core: accounting of every noisy release, the run's ledger, and the DP-SGD engine."""

from privimage.privacy.accountant import Mechanism, calibrate_noise_multiplier, compose_epsilon
from privimage.privacy.dpsgd import DPSGD, poisson_batches
from privimage.privacy.ledger import PrivacyLedger

__all__ = [
    "DPSGD",
    "Mechanism",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "compose_epsilon",
    "poisson_batches",
]
