"""The checks every path into the project's arrays shares: uint8 N×H×W×C images, int64 labels 0..K-1.

The API's in-memory data (data/convert.py), saved Hugging Face datasets (data/formats.py) and `.npz`
files (data/user.py) all pass through these, so they accept and refuse the same arrays with the same words.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from privimage.errors import UserError

# Images N×r×r×C uint8, int64 labels, class names.
Labelled = tuple[np.ndarray, np.ndarray, tuple[str, ...]]


def uint8_images(images: np.ndarray, what: str) -> np.ndarray:
    """N×H×W[×C] uint8, or floats in [0, 1], as uint8 N×H×W×C (C 1 or 3)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or 0 in images.shape:
        raise UserError(f"{what} have shape {images.shape}: give N×H×W or N×H×W×C with C 1 or 3 (channels last)")
    return _uint8_values(images, what)


def uint8_image(image: Any, what: str, dtype: np.dtype | None = None) -> np.ndarray:
    """One H×W[×C] image, uint8 or floats in [0, 1], as uint8 H×W×C. `dtype`: the values' type where
    their container does not keep it (nested lists)."""
    image = np.asarray(image, dtype)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3) or 0 in image.shape:
        raise UserError(f"{what} have shape {image.shape}: give H×W or H×W×C with C 1 or 3 (channels last)")
    return _uint8_values(image, what)


def _uint8_values(pixels: np.ndarray, what: str) -> np.ndarray:
    """uint8 as it is; floats in [0, 1] scaled to 0..255. Anything else would be a guess: refused.

    Floats in 0..255 are refused rather than guessed from their maximum: a dark image in 0..255
    would read as a bright one in [0, 1].
    """
    if pixels.dtype == np.uint8:
        return pixels
    if not np.issubdtype(pixels.dtype, np.floating):
        raise UserError(f"{what} are {pixels.dtype}: give uint8 values 0..255 or floats in [0, 1]")
    if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
        raise UserError(f"{what} are floats outside [0, 1]: scale them to [0, 1], or give uint8 values 0..255")
    return np.rint(pixels * 255).astype(np.uint8)


def label_array(labels: Any, class_names: Sequence[str] | None, count: int) -> tuple[np.ndarray, tuple | None]:
    """Integer labels 0..K-1 (or class names), checked against the images and each other.

    No labels: one class (named by `class_names`, else "images"). Integer labels without names come
    back with names None, meaning "0".."K-1".
    """
    if count == 0:
        raise UserError("the dataset holds no images: give at least one image per class")
    if labels is None:
        names = tuple(class_names or ("images",))
        if len(names) != 1:
            raise UserError(f"{len(names)} class_names but no labels: give labels=, one per image, or one class name")
        return np.zeros(count, np.int64), names
    labels = np.asarray(labels)
    if labels.dtype.kind in "USO":
        names = tuple(class_names) if class_names is not None else tuple(sorted({str(x) for x in labels}))
        labels = class_indices(labels, names, count)
        return labels, names
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"labels are {labels.dtype} of shape {labels.shape}: give a 1-D array of integers or class names")
    if len(labels) != count:
        raise UserError(f"{count} images but {len(labels)} labels: give one label per image")
    names = tuple(str(x) for x in class_names) if class_names is not None else None
    top = len(names) if names is not None else labels.max() + 1
    if labels.min() < 0:
        raise UserError("labels below 0 (Hugging Face marks an unlabelled image -1): drop those images, or "
                        "number the classes 0..K-1")
    if labels.max() >= top:
        raise UserError(f"labels must be 0..{top - 1}, one per class"
                        + (" of class_names" if names is not None else "") + ": renumber them")
    empty = np.flatnonzero(np.bincount(labels, minlength=top) == 0)
    if len(empty):
        name = names[empty[0]] if names is not None else str(empty[0])
        raise UserError(f"class {name!r} has no images: number the classes 0..K-1 with no gaps, or drop the empty "
                        "class from class_names")
    return labels.astype(np.int64), names


def class_indices(labels: Any, names: tuple[str, ...], count: int) -> np.ndarray:
    """Labels given as indices or class names, as int64 indices into `names`."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count:
        raise UserError(f"labels have shape {labels.shape}: give one label per image ({count})")
    if labels.dtype.kind in "USO":
        position = {name: index for index, name in enumerate(names)}
        unknown = sorted({str(x) for x in labels} - set(position))
        if unknown:
            raise UserError(f"unknown class names {', '.join(unknown[:5])}: the classes are {', '.join(names[:10])}")
        return np.array([position[str(x)] for x in labels], np.int64)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(names):
        raise UserError(f"labels must be class indices 0..{len(names) - 1} or class names")
    return labels.astype(np.int64)
