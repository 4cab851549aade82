"""Datasets: the built-in offline sets and the user's own images, as one `ImageDataset` type.

`load_dataset` takes a built-in name or a path (any format of data/formats.py); `load_sensitive` adds
the train/test split. Images stay uint8 NHWC, in memory or (`convert=True`, public data only) in a
converted file read a batch at a time (data/imagefile.py); `to_tensor` / `to_uint8` convert to and from
the models' float NCHW in [-1, 1].
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from privimage.data.builtin import BUILTIN_NAMES, BuiltinInfo, builtin_datasets, load_builtin
from privimage.data.formats import Source, open_source
from privimage.data.imagefile import ImageFile, cache_key, converted
from privimage.errors import UserError

__all__ = [
    "BUILTIN_NAMES",
    "BuiltinInfo",
    "ImageDataset",
    "builtin_datasets",
    "default_cache_dir",
    "keyed_split",
    "load_dataset",
    "load_sensitive",
    "to_tensor",
    "to_uint8",
]



@dataclass(frozen=True, eq=False)
class ImageDataset:
    images: np.ndarray | ImageFile  # uint8, N×H×W×C (C = 1 or 3)
    labels: np.ndarray  # int64, N, each in [0, len(class_names))
    class_names: tuple[str, ...]
    name: str  # a built-in name or the user's path

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be uint8 N×H×W×C, C 1 or 3; got {images.dtype} {images.shape}")
        if labels.dtype != np.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be int64, one per image; got {labels.dtype} {labels.shape}")
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(self.class_names):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)})")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def resolution(self) -> int:
        return self.images.shape[1]

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """The images at `indices`; of an ImageFile, a lazy selection that copies no pixels."""
        images = self.images.select(indices) if isinstance(self.images, ImageFile) else self.images[indices]
        return replace(self, images=images, labels=self.labels[indices])

    def fingerprint(self) -> str:
        """Short content hash (images, labels, class names) that keys caches derived from this data.

        An ImageFile contributes its key (its source files and selection), not a pass over its pixels.
        """
        digest = hashlib.sha256(json.dumps([self.images.shape, self.class_names]).encode())
        if isinstance(self.images, ImageFile):
            digest.update(self.images.key.encode())
        else:
            digest.update(np.ascontiguousarray(self.images).data)
        digest.update(np.ascontiguousarray(self.labels).data)
        return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """$PRIVIMAGE_CACHE, else ~/.cache/privimage."""
    return Path(os.environ.get("PRIVIMAGE_CACHE") or Path.home() / ".cache" / "privimage").expanduser()


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_shape(resolution: int, channels: int) -> None:
    if not _is_int(resolution) or resolution < 8:
        raise UserError(f"resolution {resolution!r} is not an integer of at least 8: set e.g. resolution: 28")
    if not _is_int(channels) or channels not in (1, 3):
        raise UserError(f"channels {channels!r} is neither 1 nor 3: set 1 for grayscale or 3 for RGB")


def _user_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    known = ", ".join(BUILTIN_NAMES)
    if os.sep in spec or "/" in spec or spec.startswith((".", "~")) or path.suffix:
        raise UserError(f"path {spec} does not exist: check it, or name a built-in dataset ({known})")
    raise UserError(f"unknown built-in dataset {spec!r}: use one of {known}, or a path to a folder or .npz")


def load_dataset(
    spec: str,
    *,
    resolution: int = 28,
    channels: int = 1,
    cache_dir: Path | None = None,
    glyph_samples: int = 300,
    seed: int = 0,
    convert: bool = False,
) -> ImageDataset:
    """A built-in dataset by name (`glyph_samples` and `seed` shape the generated glyphs) or a user path.

    With `convert` a user dataset is converted once into `cache_dir`/images and read from there a
    batch at a time (an ImageFile): for public data only, since the cache is shared.
    """
    return _load(spec, resolution=resolution, channels=channels, cache_dir=cache_dir, glyph_samples=glyph_samples,
                 seed=seed, convert=convert)[0]


def _load(
    spec: str, *, resolution: int, channels: int, cache_dir: Path | None, glyph_samples: int = 300, seed: int = 0,
    convert: bool = False,
) -> tuple[ImageDataset, Source | None]:
    """The dataset, and the test split its format ships (CIFAR's test_batch) if any."""
    _check_shape(resolution, channels)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    if spec not in BUILTIN_NAMES:
        source = open_source(_user_path(spec), resolution, channels)
        if not convert:
            return ImageDataset(*source.load(), spec), source.test
        key = cache_key(source.files, source.root, resolution, channels)
        return ImageDataset(*converted(cache_dir / "images", key, source.chunks, source.class_names), spec), source.test
    if not _is_int(glyph_samples) or glyph_samples < 1:
        raise UserError(f"glyph_samples {glyph_samples!r} is not a positive integer: set e.g. 300")
    gray, labels, class_names = load_builtin(
        spec, resolution=resolution, cache_dir=cache_dir, glyph_samples=glyph_samples, seed=seed
    )
    images = np.repeat(gray[..., None], channels, axis=-1)
    return ImageDataset(images, labels, class_names, spec), None


def _align_classes(test: ImageDataset, class_names: tuple[str, ...]) -> ImageDataset:
    """Relabel a separately given test set into the training set's class order."""
    if test.class_names == class_names:
        return test
    if len(test.class_names) == len(class_names) == 1:  # unlabelled folders, named after themselves
        return replace(test, class_names=class_names)
    unknown = sorted(set(test.class_names) - set(class_names))
    if unknown:
        raise UserError(
            f"test set {test.name} has classes the training set lacks ({', '.join(unknown[:5])}): "
            "give both the same class folders or class_names"
        )
    position = {name: index for index, name in enumerate(class_names)}
    relabel = np.array([position[name] for name in test.class_names], np.int64)
    return ImageDataset(test.images, relabel[test.labels], class_names, test.name)


def load_sensitive(
    spec: str,
    *,
    resolution: int,
    channels: int,
    test_fraction: float = 0.2,
    test_spec: str | None = None,
    cache_dir: Path | None = None,
    split_key: bytes,
) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) of the sensitive data: `test_spec` as the test set, else the format's own test split
    (CIFAR's test_batch), else a per-image keyed split."""
    data, shipped_test = _load(spec, resolution=resolution, channels=channels, cache_dir=cache_dir)
    if test_spec is not None:
        return data, _align_classes(_load_test_set(test_spec, resolution, channels, cache_dir), data.class_names)
    if shipped_test is not None:
        return data, _align_classes(ImageDataset(*shipped_test.load(), shipped_test.name), data.class_names)
    if not 0 < test_fraction < 1:
        raise UserError(f"test_fraction {test_fraction!r} is not between 0 and 1: set e.g. 0.2")
    in_test = keyed_split(data, test_fraction, split_key)
    if in_test.all() or not in_test.any():
        raise UserError(
            f"{spec}: too few images to hold out test_fraction {test_fraction}: add images or give a test set"
        )
    return data.subset(np.flatnonzero(~in_test)), data.subset(np.flatnonzero(in_test))


def _load_test_set(spec: str, resolution: int, channels: int, cache_dir: Path | None) -> ImageDataset:
    """A separately given test set; a dataset whose format ships a test split (a CIFAR folder) gives that split."""
    if spec in BUILTIN_NAMES:
        return load_dataset(spec, resolution=resolution, channels=channels, cache_dir=cache_dir)
    _check_shape(resolution, channels)
    source = open_source(_user_path(spec), resolution, channels)
    chosen = source.test if source.test is not None else source
    return ImageDataset(*chosen.load(), spec)


def keyed_split(data: ImageDataset, test_fraction: float, key: bytes) -> np.ndarray:
    """Whether each image goes to the test split, from a keyed hash of its pixels and label.

    Each image's side depends on that image alone, so adding or removing one image moves no other:
    the guarantee for the training split then carries to the whole dataset. A permutation of all N
    images would reshuffle hundreds of them on every change. The key keeps the sides unpredictable.
    """
    threshold = int(test_fraction * 2**64)
    sides = np.empty(len(data), dtype=bool)
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        digest = hmac.new(key, image.tobytes() + int(label).to_bytes(8, "little"), hashlib.sha256).digest()
        sides[i] = int.from_bytes(digest[:8], "little") < threshold
    return sides


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 N×H×W×C (array, or tensor on any device) -> float32 N×C×H×W in [-1, 1], on that device."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return pixels.permute(0, 3, 1, 2).float().contiguous() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float N×C×H×W in [-1, 1] -> uint8 N×H×W×C; values outside the range are clamped."""
    pixels = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()
