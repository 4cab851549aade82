"""In-memory images and labels as the project's arrays: uint8 N×H×W×C images, int64 labels 0..K-1.

The pixel and label checks are data/checks.py's; here is the one finder for a Hugging Face dataset's image and label columns (`hf_columns`, `hf_labels`), shared by
the API's `fit` (arrays, torch Datasets, Hugging Face datasets in memory) and by the loader of a
saved Hugging Face dataset (data/formats.py), so both accept and refuse the same datasets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch.utils.data
from PIL import Image

from privimage.data.checks import class_indices, label_array, uint8_image, uint8_images
from privimage.data.user import convert_image, fit_images
from privimage.errors import UserError

# Images as a user gave them: uint8 N×H×W×C (any one H, W, C), int64 labels, class names (None: "0".."K-1").
UserArrays = tuple[np.ndarray, np.ndarray, Union[tuple[str, ...], None]]

IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values")  # looked for when no column is a datasets.Image
LABEL_COLUMN_NAMES = ("label", "labels")  # looked for when no column is a datasets.ClassLabel


def labelled_arrays(images: Any, labels: Any, class_names: Sequence[str] | None, resolution: int,
                    channels: int) -> UserArrays:
    """An array of images, a torch Dataset of (image, label) or a Hugging Face dataset as arrays.

    Images of one size keep it (the pipeline resizes them when it loads them); images of mixed
    sizes or modes are brought to `resolution` and `channels` here, as a folder's images are.
    """
    if isinstance(images, Mapping):  # a datasets.DatasetDict
        raise UserError(f"images are a mapping of {', '.join(map(str, images))}: give one split, "
                        "e.g. fit(data['train'], test=data['test'])")
    if is_hugging_face(images):
        return _hugging_face(images, labels, class_names, resolution, channels)
    if isinstance(images, torch.utils.data.Dataset):
        pixels, labels = _torch_dataset(images, labels, resolution, channels)
        class_names = class_names or getattr(images, "classes", None)
    else:
        pixels = uint8_images(np.asarray(images), "images")
    return pixels, *label_array(labels, class_names, len(pixels))


# -- pixels ----------------------------------------------------------------------------------------
def pil_or_array(image: Any, channels: int, what: str, dtype: np.dtype | None = None) -> np.ndarray:
    """A PIL image in any mode (converted to `channels`) or an H×W[×C] array (of `dtype`, if given),
    as uint8 H×W×C."""
    if isinstance(image, Image.Image):
        return uint8_image(convert_image(image, channels), what)
    return uint8_image(image, what, dtype)


def stacked(pixels: list[np.ndarray], resolution: int, channels: int) -> np.ndarray:
    """Stack H×W×C uint8 images; images of mixed sizes or modes are first resized as folders are."""
    if len({p.shape for p in pixels}) > 1:
        pixels = [fit_images(p[None], resolution, channels)[0] for p in pixels]
    return np.stack(pixels)


def _torch_dataset(dataset: torch.utils.data.Dataset, labels: Any, resolution: int,
                   channels: int) -> tuple[np.ndarray, list]:
    """The (image, label) pairs of a torch Dataset: tensors in torch's C×H×W, or PIL images or HWC arrays."""
    if labels is not None:
        raise UserError("labels= goes with an array of images: a torch Dataset yields (image, label) pairs")
    pixels, found = [], []
    for index in range(len(dataset)):
        item = dataset[index]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise UserError("the torch Dataset must yield (image, label) pairs")
        image, label = item
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
            image = image.transpose(1, 2, 0) if image.ndim == 3 else image
        pixels.append(pil_or_array(image, channels, "dataset images"))
        found.append(label.item() if isinstance(label, torch.Tensor) else label)
    if not pixels:
        raise UserError("the torch Dataset is empty: give at least one image per class")
    return stacked(pixels, resolution, channels), found


# -- Hugging Face datasets -------------------------------------------------------------------------
def is_hugging_face(data: Any) -> bool:
    """Whether `data` is a `datasets.Dataset` (duck-typed: the API needs no `datasets` import)."""
    return hasattr(data, "column_names") and hasattr(data, "features")


def _is_feature(feature: Any, kind: str) -> bool:
    """Whether `feature` is a `datasets.<kind>` feature, or of a subclass; matched by class name."""
    return any(cls.__name__ == kind for cls in type(feature).__mro__)


def _column(dataset: Any, kind: str, usual_names: tuple[str, ...]) -> str | None:
    """The first column whose feature is a `datasets.<kind>`, else the first with one of `usual_names`."""
    columns = list(dataset.column_names)
    typed = [name for name in columns if _is_feature(dataset.features[name], kind)]
    if typed:
        return typed[0]
    return next((name for name in usual_names if name in columns), None)


def hf_columns(dataset: Any, need_labels: bool = True) -> tuple[str, str | None]:
    """(image column, label column or None) of a Hugging Face dataset.

    Each is found by its feature type (datasets.Image, datasets.ClassLabel), else by its usual name.
    Without a label column the images are one unlabelled class, but only where no other column
    could be the labels: a label column missed would train on one class without a word.
    """
    columns = list(dataset.column_names)
    image = _column(dataset, "Image", IMAGE_COLUMN_NAMES)
    if image is None:
        raise UserError(f"no image column among {', '.join(columns) or 'no columns'}: cast yours with "
                        "dataset.cast_column(name, datasets.Image()) or name it image")
    if not need_labels:
        return image, None
    label = _column(dataset, "ClassLabel", LABEL_COLUMN_NAMES)
    others = [name for name in columns if name not in (image, label)]
    if label is None and others:
        raise UserError(f"no label column (a datasets.ClassLabel, or one named label) among {', '.join(others)}: "
                        "cast yours with dataset.cast_column(name, datasets.ClassLabel(names=[...])) or name it "
                        "label; for one unlabelled class remove the other columns")
    return image, label


def hf_labels(dataset: Any, column: str | None, count: int, class_names: Sequence[str] | None = None,
              unlabelled: str = "images") -> tuple[np.ndarray, tuple | None]:
    """The label column checked as `label_array` checks labels; a ClassLabel's names name the classes
    unless `class_names` are given. No column: one class named `unlabelled`."""
    if column is None:
        return label_array(None, class_names or (unlabelled,), count)
    feature = dataset.features[column]
    if class_names is None and _is_feature(feature, "ClassLabel"):
        class_names = feature.names
    return label_array(list(dataset[column]), class_names, count)


def hf_dtype(dataset: Any, column: str) -> np.dtype | None:
    """The numpy type an array feature declares (datasets.Array3D(shape, "uint8")); None for others.

    The dataset hands such a column out as nested lists, whose own type (int64) would be refused.
    """
    declared = getattr(dataset.features[column], "dtype", None)
    try:
        return np.dtype(declared) if isinstance(declared, str) else None
    except TypeError:  # datasets.Image declares "PIL.Image.Image"
        return None


def _hugging_face(dataset: Any, labels: Any, class_names: Any, resolution: int, channels: int) -> UserArrays:
    """A Hugging Face dataset in memory: its image column and its label column (unless `labels` are given)."""
    image_column, label_column = hf_columns(dataset, need_labels=labels is None)
    images = dataset[image_column]  # read once: older `datasets` decode every image on access
    if labels is None:
        labels, class_names = hf_labels(dataset, label_column, len(images), class_names)
    else:
        labels, class_names = label_array(labels, class_names, len(images))
    dtype, what = hf_dtype(dataset, image_column), f"images of column {image_column!r}"
    pixels = [pil_or_array(image, channels, what, dtype) for image in images]
    return stacked(pixels, resolution, channels), labels, class_names
