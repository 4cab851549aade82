"""Exponential moving average of model weights, the weights that are sampled from.

The warm-up decay min(decay, (1 + n) / (10 + n)) lets the average forget its starting point within a
few dozen updates; without it a 0.999 average of a short CPU run still holds much of the initial model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn


class EMA:
    """Keeps `module`, an averaged copy of a model (eval mode, no gradients); call `update` after each step."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1 - self.current_decay()
        for averaged, current in zip(self.module.parameters(), model.parameters(), strict=True):
            averaged.lerp_(current.detach(), weight)
        for averaged, current in zip(self.module.buffers(), model.buffers(), strict=True):
            averaged.copy_(current)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """Flat name -> tensor like a module's (the update count included), so it drops into a checkpoint."""
        state = {f"module.{name}": tensor for name, tensor in self.module.state_dict().items()}
        state["num_updates"] = torch.tensor(self.num_updates)
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        module_state = {name.removeprefix("module."): tensor for name, tensor in state.items()
                        if name.startswith("module.")}
        self.module.load_state_dict(module_state)
        self.num_updates = int(state["num_updates"])
