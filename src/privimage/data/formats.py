"""User datasets in the formats they are downloaded in, each read in chunks.

`open_source` recognises a path by its files:

- CIFAR-10 / CIFAR-100 python batches (`data_batch_1..5`, `test_batch`, `batches.meta`; CIFAR-100:
  `train`, `test`, `meta` with `fine_labels`). The test batch is the format's own test split; class
  names come from the meta file.
- Downsampled ImageNet (ImageNet32/64): `train_data_batch_1..10` and `val_data`, pickles or `.npz`.
  Classes are numbered by their 1-based labels unless the folder holds `map_clsloc.txt`
  ("n01440764 1 tench" per line) or `class_names.txt` (one name per line, label 1 first).
- A Hugging Face dataset written by `save_to_disk`, or a `.parquet` file, through the optional
  `datasets` library (`pip install 'privimage[hf]'`). Its image and label columns are found and
  checked as `fit` finds and checks them in memory (data/convert.py).
- Otherwise a folder of images or an `.npz` (data/user.py).

Both batch formats store each image as 3·r·r uint8, channel-major. The pickles are read by an
unpickler that builds only numpy arrays, lists and numbers, so a batch file cannot run code.
"""

from __future__ import annotations

import functools
import math
import pickle
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privimage.data.convert import hf_columns, hf_dtype, hf_labels, pil_or_array, stacked
from privimage.data.user import CHUNK_IMAGES, fit_images, folder_index, load_npz, read_images
from privimage.errors import UserError

Chunks = Iterator[tuple[np.ndarray, np.ndarray]]  # (N×r×r×C uint8 images, N int64 labels)

IMAGENET_BATCH = re.compile(r"(train_data_batch_(\d+)|val_data)(\.npz)?")
HF_MARKERS = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})
BATCH_HELP = "re-download it, or convert the set to a folder of images or an .npz"
_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


@dataclass(frozen=True)
class Source:
    """A dataset on disk as the in-memory loader and the cache writer both read it."""

    name: str
    files: tuple[Path, ...]  # whose names, sizes and mtimes key the cache
    root: Path
    chunks: Callable[[], Chunks]  # the images at the requested resolution and channels
    class_names: Callable[[np.ndarray], tuple[str, ...]]  # the names, given every label
    test: Source | None = None  # a test split the format ships

    def load(self) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        images, labels = zip(*self.chunks())
        labels = np.concatenate(labels)
        return np.concatenate(images) if len(images) > 1 else images[0], labels, self.class_names(labels)


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it holds {module}.{name}, not only arrays")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core")  # numpy 2 moved it
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict:
    """A batch file as a dict with str keys (Python 2 pickles have byte-string keys)."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        with open(path, "rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="latin1").load()
    except Exception as error:  # unpickling raises many types
        raise UserError(f"{path}: unreadable batch file ({error}): {BATCH_HELP}") from error
    if not isinstance(batch, dict):
        raise UserError(f"{path}: holds a {type(batch).__name__}, not a batch dict: {BATCH_HELP}")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}


def _names(values) -> tuple[str, ...]:
    return tuple(value.decode() if isinstance(value, bytes) else str(value) for value in values)


def _batch(path: Path, label_key: str, first_label: int, num_classes: int | None,
           resolution: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's images at the requested shape and its labels, numbered from 0."""
    batch = _read_batch(path)
    missing = [key for key in ("data", label_key) if key not in batch]
    if missing:
        raise UserError(f"{path}: no {' or '.join(missing)} in the batch file: {BATCH_HELP}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    side = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
    if data.dtype != np.uint8 or side == 0 or 3 * side * side != data.shape[1]:
        raise UserError(f"{path}: 'data' is {data.dtype} {data.shape}, not N×(3·r·r) uint8 rows: {BATCH_HELP}")
    if labels.shape != data.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: '{label_key}' is not one integer per image: {BATCH_HELP}")
    labels = labels.astype(np.int64) - first_label
    if len(labels) and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
        raise UserError(f"{path}: labels outside {first_label}..{first_label + (num_classes or 0) - 1}: {BATCH_HELP}")
    images = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
    return fit_images(images, resolution, channels), labels


def _batches(files: list[Path], **batch_args) -> Callable[[], Chunks]:
    return lambda: (_batch(path, **batch_args) for path in files)


def _cifar(folder: Path, resolution: int, channels: int) -> Source:
    if (folder / "batches.meta").is_file():  # CIFAR-10
        meta, names_key, label_key = folder / "batches.meta", "label_names", "labels"
        train = sorted(folder.glob("data_batch_*"))
        test = folder / "test_batch"
    else:  # CIFAR-100
        meta, names_key, label_key = folder / "meta", "fine_label_names", "fine_labels"
        train, test = [folder / "train"], folder / "test"
    if not train:
        raise UserError(f"{folder}: {meta.name} but no data_batch_* files: {BATCH_HELP}")
    names_list = _read_batch(meta).get(names_key)
    if names_list is None:
        raise UserError(f"{meta}: no {names_key} in it: {BATCH_HELP}")
    names = _names(names_list)
    args = dict(label_key=label_key, first_label=0, num_classes=len(names), resolution=resolution, channels=channels)
    test_source = None
    if test.is_file():
        test_source = Source(str(test), (test, meta), folder, _batches([test], **args), lambda labels: names)
    return Source(str(folder), (*train, meta), folder, _batches(train, **args), lambda labels: names, test_source)


def _imagenet_names(folder: Path) -> tuple[str, ...] | None:
    """Class names by label from `map_clsloc.txt` or `class_names.txt`, or None (numbered classes)."""
    clsloc, plain = folder / "map_clsloc.txt", folder / "class_names.txt"
    if clsloc.is_file():
        rows = [line.split() for line in clsloc.read_text().splitlines() if line.strip()]
        if any(len(row) != 3 or not row[1].isdigit() for row in rows):
            raise UserError(f"{clsloc}: every line must read 'wnid label name', e.g. 'n01440764 1 tench'")
        rows.sort(key=lambda row: int(row[1]))
        if [int(row[1]) for row in rows] != list(range(1, len(rows) + 1)):
            raise UserError(f"{clsloc}: labels must run 1..{len(rows)} with no gaps or repeats")
        counts = {}
        for _, _, name in rows:
            counts[name] = counts.get(name, 0) + 1
        # A few ImageNet names repeat (crane the bird and the machine): those get their WordNet id.
        return tuple(name if counts[name] == 1 else f"{name} ({wnid})" for wnid, _, name in rows)
    if plain.is_file():
        names = tuple(line.strip() for line in plain.read_text().splitlines() if line.strip())
        if len(set(names)) != len(names):
            raise UserError(f"{plain}: class names repeat: give each class a distinct name, one per line")
        return names
    return None


def _batch_number(path: Path) -> int:
    return int(IMAGENET_BATCH.fullmatch(path.name)[2])  # train_data_batch_10 after _9


def _imagenet(folder: Path, files: list[Path], resolution: int, channels: int) -> Source:
    train = sorted((p for p in files if p.name.startswith("train")), key=_batch_number)
    val = [p for p in files if p.name.startswith("val")]
    names = _imagenet_names(folder)
    name_files = tuple(p for p in (folder / "map_clsloc.txt", folder / "class_names.txt") if p.is_file())
    args = dict(label_key="labels", first_label=1, num_classes=None if names is None else len(names),
                resolution=resolution, channels=channels)

    def class_names(labels: np.ndarray) -> tuple[str, ...]:
        return names if names is not None else tuple(str(label + 1) for label in range(labels.max() + 1))

    if not train:  # a folder with val_data alone is that set
        return Source(str(folder), (*val, *name_files), folder, _batches(val, **args), class_names)
    test = Source(str(val[0]), (*val, *name_files), folder, _batches(val, **args), class_names) if val else None
    return Source(str(folder), (*train, *name_files), folder, _batches(train, **args), class_names, test)


def _hf_source(dataset, name: str, files: tuple[Path, ...], root: Path, resolution: int, channels: int) -> Source:
    """A saved Hugging Face dataset, its columns found and its labels checked as `fit` finds and checks them."""
    try:
        image_column, label_column = hf_columns(dataset)
        labels, names = hf_labels(dataset, label_column, len(dataset), unlabelled=root.name)
    except UserError as error:
        raise UserError(f"{name}: {error}") from None
    names = names or tuple(str(label) for label in range(labels.max() + 1))  # integer labels without names
    dtype, what = hf_dtype(dataset, image_column), f"{name}: images of column {image_column!r}"

    def chunks() -> Chunks:
        start = 0
        for batch in dataset.iter(batch_size=CHUNK_IMAGES):
            pixels = [pil_or_array(image, channels, what, dtype) for image in batch[image_column]]
            images = fit_images(stacked(pixels, resolution, channels), resolution, channels)
            yield images, labels[start : start + len(images)]
            start += len(images)

    return Source(name, files, root, chunks, lambda _: names)


def _huggingface(path: Path, resolution: int, channels: int) -> Source:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{path} is a Hugging Face dataset, and reading it needs the datasets library: "
            "pip install 'privimage[hf]'"
        ) from None
    files = tuple(sorted(p for p in path.rglob("*") if p.is_file())) if path.is_dir() else (path,)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        else:  # kept in memory, its builder's copy in a folder deleted at once: none in the HF cache
            with tempfile.TemporaryDirectory() as scratch:
                loaded = datasets.Dataset.from_parquet(str(path), keep_in_memory=True, cache_dir=scratch)
    except Exception as error:
        raise UserError(f"{path}: unreadable Hugging Face dataset ({error}): write it with save_to_disk") from error
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"{path}: splits {', '.join(loaded)} but no 'train': save the training split as 'train'")
        test = loaded["test"] if "test" in loaded else None
        loaded = loaded["train"]
    else:
        test = None
    train = _hf_source(loaded, str(path), files, path, resolution, channels)
    if test is None:
        return train
    test_source = _hf_source(test, f"{path}[test]", files, path, resolution, channels)
    return Source(train.name, files, path, train.chunks, train.class_names, test_source)


def _folder(folder: Path, resolution: int, channels: int) -> Source:
    paths, labels, names = folder_index(folder)

    def chunks() -> Chunks:
        start = 0
        for images in read_images(paths, resolution, channels, f"reading {folder}"):
            yield images, labels[start : start + len(images)]
            start += len(images)

    return Source(str(folder), tuple(paths), folder, chunks, lambda labels: names)


def _npz(path: Path, resolution: int, channels: int) -> Source:
    loaded = functools.cache(lambda: load_npz(path, resolution, channels))  # read when first asked, once
    return Source(str(path), (path,), path.parent, lambda: iter([loaded()[:2]]), lambda labels: loaded()[2])


def open_source(path: Path, resolution: int, channels: int) -> Source:
    """The dataset at an existing `path`, its format recognised by its files."""
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file()]
        names = {p.name for p in files}
        if "batches.meta" in names or {"meta", "train"} <= names:
            return _cifar(path, resolution, channels)
        batches = [p for p in files if IMAGENET_BATCH.fullmatch(p.name)]
        if batches:
            return _imagenet(path, batches, resolution, channels)
        if names & HF_MARKERS:
            return _huggingface(path, resolution, channels)
        return _folder(path, resolution, channels)
    if path.suffix.lower() == ".parquet":
        return _huggingface(path, resolution, channels)
    if path.suffix.lower() == ".npz":
        return _npz(path, resolution, channels)
    raise UserError(
        f"{path} is neither a folder nor an .npz or .parquet file: point to a folder (of images, CIFAR or "
        "ImageNet batches, or a saved Hugging Face dataset) or an .npz"
    )
