"""Atomic file writes: a temporary file in the same folder, fsync, rename.

A kill at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


TEMPORARY_SUFFIX = ".tmp"


def remove_interrupted_writes(folder: Path) -> None:
    """Delete the temporary files that killed writes left under `folder` (never renamed into place, so
    never read). Only the holder of the folder's lock may call it: another writer's file may be in flight."""
    for leftover in list(folder.rglob(f".*{TEMPORARY_SUFFIX}")):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`.

    `private` files are readable by their owner alone (0600), and a folder the write creates is the
    owner's alone too (0700); other files are world-readable (0666 less the umask). The mode is set
    after the writer is done, since some writers (safetensors) replace the file they are given.
    """
    path = Path(path)
    if private and not path.parent.exists():
        make_private_dir(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o600 if private else 0o666 & ~_umask())
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def make_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)  # mkdir's mode is filtered by the umask; chmod is not
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes, private: bool = False) -> None:
    with atomic_path(path, private) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, private: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), private)


def write_json(path: str | os.PathLike, obj: Any, private: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", private)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
