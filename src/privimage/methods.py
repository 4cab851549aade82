"""The tables of stages and methods: which stages each method runs, what it pretrains on, what it books.

A new method is one entry in METHODS, plus an entry in STAGES and a module in privimage/stages/ where
it needs a stage of its own; no other module compares method or stage names. A stage that spends
privacy has `mechanism(cfg, num_samples, earlier)` in its module: what it will book, given what the
stages before it book.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Stage:
    name: str
    # Config sections the stage reads, beyond its upstream stages: they decide when it is stale.
    config_keys: tuple[str, ...]
    spends_privacy: bool = False
    # Whether the whole stage reads sensitive data, so that the budget's clock counts it at its planned
    # seconds (planning.BudgetClock). Stages that read it in part mark that part themselves.
    reads_sensitive: bool = False
    # Whether its release may be made again under new settings (with --force, and paid for again): the
    # semantic query only; every later release is built on what came before it.
    repeatable_release: bool = False
    # Whether a method that lists the stage runs it under this config (a stage that can be turned off).
    enabled: Callable[[DictConfig], bool] = lambda cfg: True

    @property
    def module(self) -> ModuleType:
        """privimage.stages.<name>, which has run(pipeline)."""
        return importlib.import_module(f"privimage.stages.{self.name}")


# In the order they run.
STAGE_TABLE: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("semantics", ("data", "semantics", "seed", "method"), spends_privacy=True, repeatable_release=True),
    Stage("warmstart", ("warm_start", "dpmerf", "privacy", "seed"), spends_privacy=True,
          enabled=lambda cfg: cfg.warm_start.epsilon_share > 0),
    Stage("pretrain", ("model", "pretrain")),
    Stage("finetune", ("finetune", "privacy"), spends_privacy=True, reads_sensitive=True),
    Stage("dpmerf", ("dpmerf", "privacy", "sample", "seed"), spends_privacy=True),
    Stage("sample", ("sample",)),
    Stage("evaluate", ("evaluate",), reads_sensitive=True),
    Stage("report", ()),
)}
STAGES = tuple(STAGE_TABLE)


@dataclass(frozen=True)
class Method:
    name: str
    stages: tuple[str, ...]
    # What pretraining sees: "selected" (the public classes the DP query picked, relabelled), "public"
    # (the whole public set with its own labels; the sensitive classes then fine-tune on seeded random
    # public label rows) or None (no pretraining).
    pretraining_data: str | None
    description: str
    # A config section whose keys replace those of `finetune` for this method (DP-SGD from scratch
    # wants other settings than fine-tuning a pretrained model).
    finetune_section: str | None = None

    def stages_for(self, cfg: DictConfig) -> tuple[str, ...]:
        """The stages it runs under `cfg`: its own, less those the config turns off."""
        return tuple(s for s in self.stages if STAGE_TABLE[s].enabled(cfg))

    def configure(self, cfg: DictConfig) -> DictConfig:
        """`cfg` with the method's own fine-tuning settings in `finetune`."""
        if self.finetune_section is None:
            return cfg
        return OmegaConf.merge(cfg, {"finetune": cfg[self.finetune_section]})

    @property
    def queries_semantics(self) -> bool:
        """Whether it books the semantic query (a Gaussian mechanism) besides DP-SGD."""
        return "semantics" in self.stages

    @property
    def uses_public_data(self) -> bool:
        return self.pretraining_data is not None

    @property
    def follows_budget(self) -> bool:
        """Whether `minutes` plans its steps: the DP-SGD methods; dpmerf's generator runs its configured
        steps, a few minutes at most."""
        return "finetune" in self.stages

    @property
    def model_stage(self) -> str:
        """The stage that makes the model synthetic images are drawn from (its module has `sampler`):
        the last one that spends privacy, so a fitted model has spent the whole budget."""
        return [s for s in self.stages if STAGE_TABLE[s].spends_privacy][-1]


def _stages(*names: str) -> tuple[str, ...]:
    return tuple(s for s in STAGES if s in names)


METHODS: dict[str, Method] = {
    "privimage": Method("privimage", _stages("semantics", "warmstart", "pretrain", "finetune", "sample", "evaluate",
                                             "report"), "selected",
                        "semantic query, a DP-MERF warm start, pretraining on the selected public semantics and the "
                        "warm start's images, DP-SGD fine-tuning"),
    "pdp": Method("pdp", _stages("pretrain", "finetune", "sample", "evaluate", "report"), "public",
                  "PDP-Diffusion: conditional pretraining on the whole public set, DP-SGD fine-tuning"),
    "dpdm": Method("dpdm", _stages("finetune", "sample", "evaluate", "report"), None,
                   "DPDM: DP-SGD from scratch, no public data", finetune_section="dpdm"),
    "dpmerf": Method("dpmerf", _stages("dpmerf", "evaluate", "report"), None,
                     "DP-MERF: one noisy release of random-feature mean embeddings, a generator fitted to it"),
}
