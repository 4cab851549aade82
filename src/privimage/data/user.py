"""The user's own images: a folder of class subfolders, one folder of unlabelled images, or an .npz.

(data/formats.py adds the batch formats CIFAR and downsampled ImageNet ship in.)

Every image is converted to the requested channels, centre-cropped to a square and resized, so mixed
modes and sizes load as one array. Anything wrong with the input is a `UserError` that names the file.
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from privimage.data.checks import Labelled, label_array, uint8_images
from privimage.data.geometry import square_resize
from privimage.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
NPZ_HELP = "save it with numpy.savez(path, images=uint8 N×H×W[×C], labels=integers, class_names=strings)"
ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
CHUNK_IMAGES = 4096  # images decoded per chunk: the memory a large folder needs while it is read
POOL_MIN_IMAGES = 2048  # smaller folders decode in this process: a pool would take longer to start


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_image(path: Path) -> bool:
    return _visible(path) and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere under `folder`, sorted; symlinked folders are not entered, so no loops."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found += [path for path in map(Path(root).joinpath, files) if _is_image(path)]
    return sorted(found)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Map high-bit-depth grayscale modes (I;16*, I, F) onto 0..255 'L'."""
    values = np.asarray(image, np.float64)
    if image.mode.startswith("I;16"):
        scale = 255 / 65535
    elif image.mode == "I":  # 32-bit ints: 16-bit data from PNG/TIFF unless it stays within 8 bits
        scale = 255 / 65535 if values.max(initial=0) > 255 else 1.0
    else:  # "F": floats in [0, 1] unless larger values say 0..255
        scale = 255.0 if values.max(initial=0) <= 1 else 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))


def convert_image(image: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode to 'L' (channels 1) or 'RGB' (channels 3); transparency is composited on black."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), np.float32)
        image = Image.fromarray(np.rint(rgba[..., :3] * rgba[..., 3:] / 255).astype(np.uint8))
    return image.convert("L" if channels == 1 else "RGB")


def read_image(path: Path, resolution: int, channels: int) -> np.ndarray:
    """One image file as a resolution×resolution×channels uint8 array."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                upright = ImageOps.exif_transpose(image)  # camera rotation; also decodes the pixels
                converted = convert_image(upright, channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(
            f"{path}: image has more than {Image.MAX_IMAGE_PIXELS:,} pixels (a decompression-bomb guard): "
            "shrink or remove it"
        ) from None
    except Exception as error:  # decoders raise many types (OSError, SyntaxError, ValueError, ...)
        raise UserError(f"{path}: unreadable image ({error}): re-save it as PNG/JPEG or remove it") from error
    array = np.asarray(square_resize(converted, resolution))
    return array.reshape(resolution, resolution, channels)


def _stacked(decoded: Iterator[np.ndarray], progress: tqdm) -> Iterator[np.ndarray]:
    while chunk := list(itertools.islice(decoded, CHUNK_IMAGES)):
        progress.update(len(chunk))
        yield np.stack(chunk)


def read_images(paths: list[Path], resolution: int, channels: int, desc: str) -> Iterator[np.ndarray]:
    """The images at `paths`, in order, as N×r×r×C chunks of at most CHUNK_IMAGES.

    Large sets are decoded by a pool of processes, one per core; the chunks keep memory bounded
    by a chunk, however many images there are.
    """
    read = functools.partial(read_image, resolution=resolution, channels=channels)
    workers = len(os.sched_getaffinity(0))
    with tqdm(total=len(paths), desc=desc, leave=False) as progress:
        if len(paths) < POOL_MIN_IMAGES or workers == 1:
            yield from _stacked(map(read, paths), progress)
            return
        pool = ProcessPoolExecutor(workers)
        try:
            yield from _stacked(pool.map(read, paths, chunksize=64), progress)
        finally:  # on an error, drop the images not decoded yet rather than wait for them
            pool.shutdown(cancel_futures=True)


def folder_index(folder: Path) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """(image paths, labels, class names) of a folder: one class per subfolder (sorted names), or one
    unlabelled class named after a folder of images."""
    class_dirs = sorted(p for p in folder.iterdir() if _visible(p) and p.is_dir() and not p.is_symlink())
    loose_images = sorted(p for p in folder.iterdir() if _is_image(p))
    if class_dirs and loose_images:
        raise UserError(
            f"folder {folder} holds both images and subfolders: put every image in a class subfolder, "
            "or remove the subfolders to use the images as one unlabelled class"
        )
    if not class_dirs:
        if not loose_images:
            raise UserError(
                f"folder {folder} has no images: put one subfolder of PNG/JPEG images per class in it "
                "(or the images themselves for one unlabelled class)"
            )
        return loose_images, np.zeros(len(loose_images), np.int64), (folder.resolve().name,)
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        found = _images_under(class_dir)
        if not found:
            raise UserError(f"class folder {class_dir} has no images: add PNG/JPEG images to it or remove it")
        paths += found
        labels.append(np.full(len(found), label, np.int64))
    return paths, np.concatenate(labels), tuple(p.name for p in class_dirs)


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("images", "labels") if key not in archive.files]
            if missing:
                raise UserError(f"{path}: no {' or '.join(missing)} array in the file: {NPZ_HELP}")
            names = archive["class_names"] if "class_names" in archive.files else None
            return archive["images"], archive["labels"], names
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        # Object arrays (pickles) land here too: allow_pickle stays off for files from elsewhere.
        raise UserError(f"{path}: unreadable .npz ({error}): {NPZ_HELP}") from error


def _npz_images(path: Path, images: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    """The images array, uint8 only (a file states its type), as N×resolution×resolution×channels."""
    if images.dtype != np.uint8:
        raise UserError(f"{path}: images are {images.dtype}, not uint8: store values 0..255 as np.uint8")
    return fit_images(uint8_images(images, f"{path}: images"), resolution, channels)


def fit_images(images: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    """uint8 N×H×W×C (C 1 or 3) -> N×resolution×resolution×channels, resized and converted as needed."""
    if images.shape[1:] == (resolution, resolution, channels):
        return images
    mode = "L" if channels == 1 else "RGB"
    pil = (Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image) for image in images)
    resized = [np.asarray(square_resize(image.convert(mode), resolution)) for image in pil]
    return np.stack(resized).reshape(len(images), resolution, resolution, channels)


def _npz_labels(
    path: Path, labels: np.ndarray, count: int, names: np.ndarray | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Check the labels (and class names) against each other and the image count (data/convert.py)."""
    if names is not None and (names.ndim != 1 or names.dtype.kind not in "US"):
        raise UserError(f"{path}: class_names must be a 1-D array of strings")
    if labels.dtype.kind in "USO":
        raise UserError(f"{path}: labels are {labels.dtype}: store a 1-D integer array (names in class_names)")
    try:
        labels, class_names = label_array(labels, None if names is None else names.tolist(), count)
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    return labels, class_names or tuple(str(label) for label in range(labels.max() + 1))


def load_npz(path: Path, resolution: int, channels: int) -> Labelled:
    images, labels, names = _npz_arrays(path)
    images = _npz_images(path, images, resolution, channels)
    labels, class_names = _npz_labels(path, labels, len(images), names)
    return images, labels, class_names
