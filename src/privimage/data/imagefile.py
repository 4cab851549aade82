"""A converted dataset on disk: uint8 pixels in one file, read a batch at a time.

A public set of 1.28 M images is converted once (decoded, resized, channels fixed) into
`<cache>/images/<key>.u8` (raw N×r×r×C pixels, row-major: np.memmap can open it) beside `<key>.npz`
(shape, labels, class names). The key hashes the source files' names, sizes and mtimes with the
resolution and channels, so a changed source or setting converts again. Both files are written
atomically, the metadata last: its presence means the pixels are complete. One process converts at
a time (a lock file): the ranks of a torchrun, or two runs, wait for it instead of converting too.

Only public data is converted: the cache is shared between runs, and nothing derived from
sensitive images may be kept there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from privimage.atomic import atomic_path

# Bumped when the conversion changes, so old caches are not read as new ones.
FORMAT_VERSION = 1
WRITE_ROWS = 4096  # images made contiguous at a time while writing


class ImageFile:
    """uint8 N×H×W×C images in a `.u8` file: indexing reads only the rows asked for, as an array.

    Rows are read with plain file reads (one per run of consecutive rows), never mapped: a mapped
    page counts as resident memory, and with the large page-cache folios of recent kernels a few
    hundred random rows would map most of the file. `select` gives a lazy subset (a row index into
    the same file), which copies no pixels.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: Path, shape: tuple[int, int, int, int], key: str, rows: np.ndarray | None = None):
        self.path, self.file_shape, self.rows = Path(path), tuple(shape), rows
        self.file_key = key
        self.key = key if rows is None else hashlib.sha256(key.encode() + rows.tobytes()).hexdigest()[:16]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.file_shape[1:])

    def __len__(self) -> int:
        return self.file_shape[0] if self.rows is None else len(self.rows)

    def __getitem__(self, item) -> np.ndarray:
        if self.rows is None and isinstance(item, slice) and item.step in (None, 1):
            index = np.arange(*item.indices(len(self))[:2])
        else:  # any numpy index (ints, arrays, masks) of the rows
            index = np.arange(len(self))[item] if self.rows is None else self.rows[item]
        images = self._read(np.atleast_1d(index))
        return images[0] if np.ndim(index) == 0 else images

    def _read(self, rows: np.ndarray) -> np.ndarray:
        row_bytes = math.prod(self.file_shape[1:])
        images = np.empty((len(rows), *self.file_shape[1:]), np.uint8)
        flat = images.reshape(len(rows), row_bytes)
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1).tolist()  # where each run begins
        with open(self.path, "rb", buffering=0) as fh:
            for start, end in zip(starts, starts[1:] + [len(rows)]):
                fh.seek(int(rows[start]) * row_bytes)
                view, done = memoryview(flat[start:end]).cast("B"), 0
                while done < len(view):  # one read returns at most ~2 GB
                    count = fh.readinto(view[done:])
                    if not count:
                        raise OSError(f"{self.path} is shorter than its {self.file_shape} images: delete it")
                    done += count
        return images

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)

    def select(self, indices: np.ndarray) -> ImageFile:
        rows = np.arange(len(self))[indices] if self.rows is None else self.rows[indices]
        return ImageFile(self.path, self.file_shape, self.file_key, rows.astype(np.int64))


def cache_key(files: Iterable[Path], root: Path, resolution: int, channels: int) -> str:
    """Hash of the source files (names relative to `root`, sizes, mtimes) and the target shape."""
    stats = []
    for path in files:
        stat = path.stat()
        stats.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns])
    text = json.dumps([FORMAT_VERSION, resolution, channels, stats])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def converted(
    folder: Path, key: str, chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
    class_names: Callable[[np.ndarray], tuple[str, ...]],
) -> tuple[ImageFile, np.ndarray, tuple[str, ...]]:
    """The set converted under `key`: read from `folder`, or converted first (by one process at a time)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _cached(folder, key) or _write(folder, key, chunks(), class_names)


def _cached(folder: Path, key: str) -> tuple[ImageFile, np.ndarray, tuple[str, ...]] | None:
    meta = folder / f"{key}.npz"
    if not meta.is_file():
        return None
    with np.load(meta, allow_pickle=False) as archive:
        shape = tuple(int(n) for n in archive["shape"])
        labels, names = archive["labels"].astype(np.int64), tuple(str(n) for n in archive["class_names"].tolist())
    return ImageFile(folder / f"{key}.u8", shape, key), labels, names


def _write(
    folder: Path, key: str, chunks: Iterator[tuple[np.ndarray, np.ndarray]], class_names
) -> tuple[ImageFile, np.ndarray, tuple[str, ...]]:
    """Stream (images, labels) chunks into the files of `key`: memory holds one chunk, plus the labels."""
    pixels, labels, shape = folder / f"{key}.u8", [], None
    with atomic_path(pixels) as tmp, open(tmp, "wb") as fh:
        for images, chunk_labels in chunks:
            shape = images.shape[1:]
            for start in range(0, len(images), WRITE_ROWS):  # batch files' rows are channel-major:
                fh.write(np.ascontiguousarray(images[start : start + WRITE_ROWS]).data)  # a bounded copy each
            labels.append(chunk_labels)
    labels = np.concatenate(labels).astype(np.int64)
    names = tuple(class_names(labels))
    shape = (len(labels), *shape)
    with atomic_path(folder / f"{key}.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, shape=np.array(shape), labels=labels, class_names=np.array(names))
    return ImageFile(pixels, shape, key), labels, names
