"""Where ε goes: the releases a run will book, in order, each with its σ and its ε alone.

The pipeline's validation, each stage's booking, `privimage budget` and `privimage run --dry-run` all read
this one plan (through `Pipeline.privacy_plan`), so what the tools print is what a run books. Each stage
that spends privacy gives a function `(cfg, num_samples, earlier mechanisms) -> Mechanism`; the last one
calibrates its σ so that the composition meets the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from omegaconf import DictConfig

from privimage.privacy.accountant import Mechanism, compose_epsilon

MechanismFor = Callable[[DictConfig, int, list[Mechanism]], Mechanism]


@dataclass(frozen=True)
class PlannedRelease:
    stage: str
    mechanism: Mechanism
    epsilon_alone: float  # this release's ε on its own, at the run's δ

    def to_dict(self) -> dict:
        m = self.mechanism
        return {"stage": self.stage, "noise_multiplier": m.noise_multiplier, "sample_rate": m.sample_rate,
                "steps": m.steps, "epsilon_alone": self.epsilon_alone}


def plan_releases(cfg: DictConfig, num_samples: int, stages: Sequence[tuple[str, MechanismFor]]) -> list[PlannedRelease]:
    """The releases of `stages` (name and mechanism function, in the order they run) on `num_samples` images."""
    p, mechanisms = cfg.privacy, []
    for _, mechanism_for in stages:
        mechanisms.append(mechanism_for(cfg, num_samples, list(mechanisms)))
    return [PlannedRelease(stage, m, compose_epsilon([m], p.delta, p.accountant))
            for (stage, _), m in zip(stages, mechanisms)]


def summary(cfg: DictConfig, num_samples: int, releases: Sequence[PlannedRelease]) -> dict:
    """The plan as `privimage budget` prints it: every release, and their composition against the target."""
    p = cfg.privacy
    return {"releases": [r.to_dict() for r in releases],
            "epsilon": compose_epsilon([r.mechanism for r in releases], p.delta, p.accountant),
            "target": {"epsilon": float(p.epsilon), "delta": float(p.delta)}, "accountant": p.accountant,
            "num_samples": num_samples}
