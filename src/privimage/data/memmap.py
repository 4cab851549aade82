"""A converted dataset on disk: uint8 pixels in one file, read a batch at a time.

A public set of 1.28 M images is converted once (decoded, resized, channels fixed) into
`<cache>/images/<key>.u8` (raw N×r×r×C pixels) beside `<key>.npz` (shape, labels, class names).
The key hashes the source files' names, sizes and mtimes with the resolution and channels, so a
changed source or setting converts again. Both files are written atomically, the metadata last:
its presence means the pixels are complete.

Only public data is converted: the cache is shared between runs, and nothing derived from
sensitive images may be kept there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from privimage.rundir import atomic_path

# Bumped when the conversion changes, so old caches are not read as new ones.
FORMAT_VERSION = 1


class ImageFile:
    """uint8 N×H×W×C images in a `.u8` file: indexing reads only the rows asked for, as an array.

    The file is mapped for each read and unmapped after it, so the pages of a pass over the whole set
    do not accumulate in this process's resident memory, as they would under one long-lived np.memmap.
    `select` gives a lazy subset (a row index into the same file), which copies no pixels.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: Path, shape: tuple[int, int, int, int], key: str, rows: np.ndarray | None = None):
        self.path, self.file_shape, self.rows = Path(path), tuple(shape), rows
        self.key = key if rows is None else hashlib.sha256(key.encode() + rows.tobytes()).hexdigest()[:16]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.file_shape[1:])

    def __len__(self) -> int:
        return self.file_shape[0] if self.rows is None else len(self.rows)

    def __getitem__(self, item) -> np.ndarray:
        index = item if self.rows is None else self.rows[item]
        pixels = np.memmap(self.path, np.uint8, "r", shape=self.file_shape)
        return np.array(pixels[index])  # a copy: the map closes when `pixels` goes

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)

    def select(self, indices: np.ndarray) -> ImageFile:
        indices = np.asarray(indices)
        rows = indices if self.rows is None else self.rows[indices]
        return ImageFile(self.path, self.file_shape, self._file_key, rows.astype(np.int64))

    @property
    def _file_key(self) -> str:
        return self.path.stem


def cache_key(files: Iterable[Path], root: Path, resolution: int, channels: int) -> str:
    """Hash of the source files (names relative to `root`, sizes, mtimes) and the target shape."""
    stats = []
    for path in files:
        stat = path.stat()
        stats.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns])
    text = json.dumps([FORMAT_VERSION, resolution, channels, stats])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_images(folder: Path, key: str) -> tuple[ImageFile, np.ndarray, tuple[str, ...]] | None:
    """The converted set under `key`, or None when it has not been converted (completely) yet."""
    meta = folder / f"{key}.npz"
    if not meta.is_file():
        return None
    with np.load(meta, allow_pickle=False) as archive:
        shape = tuple(int(n) for n in archive["shape"])
        labels, names = archive["labels"].astype(np.int64), tuple(str(n) for n in archive["class_names"].tolist())
    return ImageFile(folder / f"{key}.u8", shape, key), labels, names


def write_cache(
    folder: Path, key: str, chunks: Iterator[tuple[np.ndarray, np.ndarray]], class_names
) -> tuple[ImageFile, np.ndarray, tuple[str, ...]]:
    """Stream (images, labels) chunks into the cache under `key`; `class_names(labels)` names the classes.

    Memory holds one chunk at a time, plus the labels.
    """
    pixels, labels = folder / f"{key}.u8", []
    shape = None
    with atomic_path(pixels) as tmp, open(tmp, "wb") as fh:
        for images, chunk_labels in chunks:
            shape = (0, *images.shape[1:]) if shape is None else shape
            fh.write(np.ascontiguousarray(images).data)
            labels.append(chunk_labels)
    labels = np.concatenate(labels).astype(np.int64)
    names = tuple(class_names(labels))
    shape = (len(labels), *shape[1:])
    with atomic_path(folder / f"{key}.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, shape=np.array(shape), labels=labels, class_names=np.array(names))
    return ImageFile(pixels, shape, key), labels, names
