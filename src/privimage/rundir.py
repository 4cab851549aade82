"""The run directory: one layout that every stage reads from and writes into.

Stages hand each other typed artifacts through it, so any stage can be rerun alone. Every file is
written atomically (temporary file in the same folder, fsync, rename): a kill at any moment leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class RunDir:
    """Paths of a run directory. Creating the object touches nothing on disk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    config = property(lambda self: self.root / "config.yaml")
    ledger = property(lambda self: self.root / "privacy.json")
    semantics = property(lambda self: self.root / "semantics.json")
    pretrain_dir = property(lambda self: self.root / "pretrain")
    finetune_dir = property(lambda self: self.root / "finetune")
    synthetic = property(lambda self: self.root / "synthetic.npz")
    synthetic_images = property(lambda self: self.root / "synthetic")
    samples_grid = property(lambda self: self.root / "samples.png")
    metrics = property(lambda self: self.root / "metrics.json")
    report = property(lambda self: self.root / "report.html")
    stages = property(lambda self: self.root / "stages")
    logs = property(lambda self: self.root / "logs")
    tensorboard = property(lambda self: self.root / "tensorboard")

    def create(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self
