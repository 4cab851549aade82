"""Checkpoints: one safetensors file per save, written atomically, with JSON metadata in its header."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

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


def load_checkpoint(path: str | os.PathLike, tensors: bool = True) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint back as (tensors on the CPU, metadata); `tensors=False` reads the header alone."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: rerun the stage that writes it")
    try:
        with safe_open(path, framework="pt", device="cpu") as reader:
            loaded = {name: reader.get_tensor(name) for name in reader.keys()} if tensors else {}
            metadata = json.loads((reader.metadata() or {})[METADATA_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({error}): the run cannot continue from it; "
                        "use a new --out") from error
    return loaded, metadata
