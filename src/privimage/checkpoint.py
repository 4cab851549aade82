"""Checkpoints: one safetensors file per save, written atomically, with JSON metadata in its header.

Training state (model, EMA, optimizer) is a nest of dicts and lists holding tensors and plain values.
`state_tensors` splits such a nest into a flat dict of tensors and a JSON "structure" that records where
each tensor goes, so one file holds everything needed to resume, and `state_from_tensors` rebuilds it.
The structure keeps dict keys' types: Adam's state is keyed by integer parameter indices, and restoring
them as strings would silently drop the moments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from privimage.errors import UserError
from privimage.atomic import atomic_path

METADATA_KEY = "privimage"


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: dict) -> None:
    """Write `tensors` and JSON-serialisable `metadata` to a safetensors file, atomically."""
    header = {METADATA_KEY: json.dumps(metadata)}
    contiguous = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, tmp, metadata=header)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint back as (tensors on the CPU, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: rerun the stage that writes it")
    try:
        with safe_open(path, framework="pt", device="cpu") as reader:
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
            metadata = json.loads((reader.metadata() or {})[METADATA_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({error}): the run cannot continue from it; "
                        "use a new --out") from error
    return tensors, metadata


def state_tensors(state: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split nested state (dicts, lists, tuples, tensors, JSON scalars) into flat tensors and a JSON structure.

    Tensors are named by their path, e.g. `model.unet.input_conv.weight` or `optimizer.state.3.exp_avg`.
    """
    tensors: dict[str, Tensor] = {}

    def split(value: Any, name: str) -> Any:
        if isinstance(value, Tensor):
            if name in tensors:
                raise ValueError(f"two tensors of the state would be stored as {name!r}")
            tensors[name] = value
            return {"tensor": name}
        if isinstance(value, Mapping):
            return {"dict": [[key, split(item, f"{name}.{key}" if name else str(key))] for key, item in value.items()]}
        if isinstance(value, (list, tuple)):
            kind = "list" if isinstance(value, list) else "tuple"
            return {kind: [split(item, f"{name}.{index}" if name else str(index)) for index, item in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise TypeError(f"cannot store {type(value).__name__} at {name!r} in a checkpoint")

    return tensors, split(state, prefix)


def state_from_tensors(tensors: Mapping[str, Tensor], structure: Any) -> Any:
    """Rebuild the nested state that `state_tensors` split (the inverse of it)."""
    (kind, content), = structure.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {key: state_from_tensors(tensors, item) for key, item in content}
    if kind == "list":
        return [state_from_tensors(tensors, item) for item in content]
    if kind == "tuple":
        return tuple(state_from_tensors(tensors, item) for item in content)
    return content
