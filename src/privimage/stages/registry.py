"""The stage registry: each stage's name (methods.STAGE_TABLE) → its module, typed by what the pipeline
calls on it.

A stage module is a plain module; the protocols below are its contract, and the dictionaries let an
editor or a type checker follow `STAGE_MODULES[stage].run(pipeline)` to the stage's code. Every stage
has `run`; a stage that spends privacy (`Stage.spends_privacy`) is also a `ReleaseModule`; a stage a
method draws its synthetic images from (`Method.model_stage`) is also a `ModelModule`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

import torch
from omegaconf import DictConfig

from privimage.privacy.accountant import Mechanism
from privimage.rundir import RunDir
from privimage.stages import dpmerf, evaluate, finetune, pretrain, report, sample, semantics, warmstart

if TYPE_CHECKING:
    from privimage.pipeline import Pipeline


@runtime_checkable
class StageModule(Protocol):
    def run(self, pipeline: Pipeline, /) -> None:
        """Make the stage's artifacts in the run directory (the pipeline writes its marker after)."""


@runtime_checkable
class ReleaseModule(StageModule, Protocol):
    def mechanism(self, cfg: DictConfig, num_samples: int, earlier: list[Mechanism], /) -> Mechanism:
        """What the stage will book on `num_samples` sensitive images, given what the stages before it book
        (privacy/plan.py composes these)."""

    def release_key(self, pipeline: Pipeline, /) -> str:
        """The name of the release this config books: another key is another release."""


@runtime_checkable
class ModelModule(ReleaseModule, Protocol):
    def model_file(self, run: RunDir, /) -> Path:
        """The fitted model's file in the run directory."""

    def sampler(self, cfg: DictConfig, run: RunDir, class_names: tuple[str, ...], device: torch.device,
                /) -> Callable[[torch.Tensor, torch.Generator], object]:
        """(labels, torch.Generator) → uint8 images drawn from the fitted model."""


MODEL_MODULES: dict[str, ModelModule] = {"finetune": finetune, "dpmerf": dpmerf}
RELEASE_MODULES: dict[str, ReleaseModule] = {"semantics": semantics, "warmstart": warmstart, **MODEL_MODULES}
STAGE_MODULES: dict[str, StageModule] = {**RELEASE_MODULES, "pretrain": pretrain, "sample": sample,
                                         "evaluate": evaluate, "report": report}
