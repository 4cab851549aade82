"""Which weights DP fine-tuning trains: all, GroupNorm affines and biases only, or LoRA adapters.

DP-SGD adds noise of the same std to every trained coordinate while the clipped signal's norm is fixed,
so training fewer coordinates raises the signal-to-noise ratio of each step (parameter-efficient DP
fine-tuning, Yu et al. 2022). DPSGD trains exactly the parameters with `requires_grad`.
LoRA (Hu et al. 2022) is a `torch.nn.utils.parametrize` parametrization W + B·A of each conv and linear
weight, B zero so the adapted net starts equal to the base; `merged_state_dict` folds it back into
plain weights, the artifact the sampler loads.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

TRAINABLE = ("all", "norms_biases", "lora")  # the values of finetune.trainable


class LoRA(nn.Module):
    """W -> W + up @ down, reshaped to W's shape: rank-`rank` change of a (out, in[, k, k]) weight."""

    def __init__(self, weight: Tensor, rank: int):
        super().__init__()
        fan_in = weight[0].numel()
        self.down = nn.Parameter(torch.randn(rank, fan_in, device=weight.device) / math.sqrt(fan_in))
        self.up = nn.Parameter(torch.zeros(weight.shape[0], rank, device=weight.device))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.up @ self.down).view_as(weight)


def set_trainable(net: nn.Module, trainable: str, lora_rank: int = 4) -> None:
    """Mark the parameters DP fine-tuning trains (and, for `lora`, add the adapters) in place."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    if trainable == "all":
        net.requires_grad_(True)
        return
    net.requires_grad_(False)
    for module in list(net.modules()):
        if trainable == "norms_biases":
            if isinstance(module, nn.GroupNorm):
                module.requires_grad_(True)
            elif getattr(module, "bias", None) is not None:
                module.bias.requires_grad_(True)
        elif trainable == "lora" and isinstance(module, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(module, "weight", LoRA(module.weight.detach(), lora_rank))


def merged_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The state dict of `net` with every parametrization folded into its plain weight."""
    if not any(parametrize.is_parametrized(m) for m in net.modules()):
        return net.state_dict()
    plain = copy.deepcopy(net)
    for module in plain.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return plain.state_dict()
