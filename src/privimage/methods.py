"""The table of methods: which stages each runs, what it pretrains on, which mechanisms it books.

A new method is one entry here (plus a stage module where it needs a stage of its own); no other
module compares method names.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("semantics", "pretrain", "finetune", "sample", "evaluate", "report")


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
