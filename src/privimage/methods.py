"""The tables of stages and methods: which stages each method runs, what it pretrains on, what it books.

A new method is one entry in METHODS, plus an entry in STAGES and a module in privimage/stages/ where
it needs a stage of its own; no other module compares method or stage names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Stage:
    name: str
    # Config sections the stage reads, beyond its upstream stages: they decide when it is stale.
    config_keys: tuple[str, ...]

    @property
    def module(self) -> ModuleType:
        """privimage.stages.<name>, which has run(pipeline)."""
        return importlib.import_module(f"privimage.stages.{self.name}")


# In the order they run.
STAGE_TABLE: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("semantics", ("data", "semantics", "seed", "method")),
    Stage("pretrain", ("model", "pretrain")),
    Stage("finetune", ("finetune", "privacy")),
    Stage("sample", ("sample",)),
    Stage("evaluate", ("evaluate",)),
    Stage("report", ()),
)}
STAGES = tuple(STAGE_TABLE)


@dataclass(frozen=True)
class Method:
    name: str
    stages: tuple[str, ...]
    # What pretraining sees: "selected" (the public classes the DP query picked, relabelled), "public"
    # (the whole public set, unconditional) or None (no pretraining).
    pretraining_data: str | None
    description: str

    @property
    def queries_semantics(self) -> bool:
        """Whether it books the semantic query (a Gaussian mechanism) besides DP-SGD."""
        return "semantics" in self.stages

    @property
    def uses_public_data(self) -> bool:
        return self.pretraining_data is not None


METHODS: dict[str, Method] = {
    "privimage": Method("privimage", STAGES, "selected",
                        "semantic query, pretraining on the selected public semantics, DP-SGD fine-tuning"),
    "pdp": Method("pdp", tuple(s for s in STAGES if s != "semantics"), "public",
                  "PDP-Diffusion: pretraining on the whole public set, DP-SGD fine-tuning"),
    "dpdm": Method("dpdm", tuple(s for s in STAGES if s not in ("semantics", "pretrain")), None,
                   "DPDM: DP-SGD from scratch, no public data"),
}
