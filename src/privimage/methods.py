"""The tables of stages and methods: which stages each method runs, what it pretrains on, what it books.

A new method is one entry in METHODS, plus an entry in STAGE_TABLE and a module in privimage/stages/
(registered in stages/registry.py, which states what a stage module provides) where it needs a stage of
its own. No other module compares method or stage names: what the rest of the code needs to know about
a stage or a method is a field or a property here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Stage:
    name: str
    description: str  # one line: what it does (its command's help)
    # Config sections (or dotted keys) the stage reads, beyond its upstream stages: they decide when it is stale.
    config_keys: tuple[str, ...]
    spends_privacy: bool = False
    # Whether the whole stage reads sensitive data, so that the budget's clock counts it at its planned
    # seconds (planning.BudgetClock). Stages that read it in part mark that part themselves.
    reads_sensitive: bool = False
    # Whether its release may be made again under new settings (with --force, and paid for again): the
    # semantic query only; every later release is built on what came before it.
    repeatable_release: bool = False
    # Whether it fits a DP-MERF generator to its release (merf.Generator, which upsamples twice).
    fits_generator: bool = False
    # Whether its step count follows the budget's clock: public work, planned again when it starts,
    # stopped early when late and trained on when fast (planning.pretraining_target). Pretraining only.
    follows_clock: bool = False
    # Whether a pretraining that runs late must leave time for it (planning.AFTER_PRETRAINING).
    after_pretraining: bool = False
    # Whether its seconds get a column in bench.md: the report is written in seconds.
    takes_time: bool = True
    # Whether a method that lists the stage runs it under this config (a stage that can be turned off).
    enabled: Callable[[DictConfig], bool] = lambda cfg: True


# The keys of the dpmerf section the warm start reads: its features and generator, not its `steps`.
WARM_START_DPMERF_KEYS = ("features", "length_scale", "per_class", "lr", "code_dim", "width", "bf16")

# In the order they run.
STAGE_TABLE: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("semantics", "Train the semantic classifier on public data, query it with DP, select semantics.",
          ("data", "semantics", "seed", "method"), spends_privacy=True, repeatable_release=True),
    Stage("warmstart", "A DP-MERF release (warm_start.epsilon_share of ε) whose generator's images join pretraining.",
          ("warm_start", *(f"dpmerf.{key}" for key in WARM_START_DPMERF_KEYS), "privacy", "seed"),
          spends_privacy=True, fits_generator=True,
          enabled=lambda cfg: cfg.warm_start.epsilon_share > 0),
    Stage("pretrain", "Pretrain the diffusion model on the selected public images (and the warm start's).",
          ("model", "pretrain"), follows_clock=True),
    Stage("finetune", "Fine-tune the pretrained model with DP-SGD on the sensitive training split.",
          ("finetune", "privacy"), spends_privacy=True, reads_sensitive=True, after_pretraining=True),
    Stage("dpmerf", "method=dpmerf: one noisy release of mean embeddings, a generator fitted to it, its samples.",
          ("dpmerf", "privacy", "sample", "seed"), spends_privacy=True, fits_generator=True),
    Stage("sample", "Sample a labelled synthetic dataset (synthetic.npz, PNG folders, samples.png); no privacy cost.",
          ("sample",), after_pretraining=True),
    Stage("evaluate", "FID, downstream accuracy, precision/recall and memorization of the synthetic set.",
          ("evaluate",), reads_sensitive=True, after_pretraining=True),
    Stage("report", "Write report.html: config, privacy ledger, semantics, samples, metrics.",
          (), after_pretraining=True, takes_time=False),
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
    # The method whose accuracy bench.md subtracts from this one's at the same ε, and what that margin measures.
    compared_with: str | None = None
    margin_measures: str = ""

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

    def has_warm_start(self, cfg: DictConfig) -> bool:
        """Whether it runs the warm start under `cfg` (whose generator's images join pretraining)."""
        return "warmstart" in self.stages_for(cfg)

    @property
    def uses_public_data(self) -> bool:
        return self.pretraining_data is not None

    @property
    def pretrains(self) -> bool:
        return "pretrain" in self.stages

    @property
    def pretrains_on_selected_semantics(self) -> bool:
        """privimage: pretraining sees the public classes the DP query selected, relabelled."""
        return self.pretraining_data == "selected"

    @property
    def pretrains_on_public_labels(self) -> bool:
        """pdp: pretraining sees the whole public set with its own labels; each sensitive class then takes
        over a public class's label row (stages/pretrain.label_rows)."""
        return self.pretraining_data == "public"

    @property
    def follows_budget(self) -> bool:
        """Whether `minutes` plans its steps: the DP-SGD methods; dpmerf's generator runs its configured
        steps, a few minutes at most."""
        return "finetune" in self.stages

    @property
    def model_stage(self) -> str:
        """The stage that makes the model synthetic images are drawn from (a ModelModule, stages/registry.py):
        the last one that spends privacy, so a fitted model has spent the whole budget."""
        return [s for s in self.stages if STAGE_TABLE[s].spends_privacy][-1]

    @property
    def stages_after_model(self) -> tuple[str, ...]:
        """What is made from the fitted model: samples, their measures, the report."""
        return self.stages[self.stages.index(self.model_stage) + 1:]

    @property
    def stages_to_measure(self) -> tuple[str, ...]:
        """What `PrivImage.evaluate()` runs: the stages after the model that take time (the report does not)."""
        return tuple(s for s in self.stages_after_model if STAGE_TABLE[s].takes_time)


def _stages(*names: str) -> tuple[str, ...]:
    return tuple(s for s in STAGES if s in names)


METHODS: dict[str, Method] = {
    "privimage": Method("privimage", _stages("semantics", "warmstart", "pretrain", "finetune", "sample", "evaluate",
                                             "report"), "selected",
                        "semantic query, a DP-MERF warm start, pretraining on the selected public semantics and the "
                        "warm start's images, DP-SGD fine-tuning", compared_with="dpmerf",
                        margin_measures="what the diffusion model adds to a DP-MERF release of the whole budget"),
    "pdp": Method("pdp", _stages("pretrain", "finetune", "sample", "evaluate", "report"), "public",
                  "PDP-Diffusion: conditional pretraining on the whole public set, DP-SGD fine-tuning"),
    "dpdm": Method("dpdm", _stages("finetune", "sample", "evaluate", "report"), None,
                   "DPDM: DP-SGD from scratch, no public data", finetune_section="dpdm"),
    "dpmerf": Method("dpmerf", _stages("dpmerf", "evaluate", "report"), None,
                     "DP-MERF: one noisy release of random-feature mean embeddings, a generator fitted to it"),
}
