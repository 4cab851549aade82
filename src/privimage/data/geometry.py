"""Image geometry shared by the built-in and user loaders.

`mnist_normalise` repeats how MNIST itself was made (LeCun et al.: the ink is scaled to fit a 20x20 box,
keeping its aspect, then placed in a 28x28 field so that its centre of mass is at the centre). Every
built-in public image goes through it so that public and sensitive images share one geometry and the
semantic classifier cannot tell them apart by size or position.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MNIST_BOX_FRACTION = 20 / 28
# Pixels fainter than this fraction of the brightest one are halo (blur tails, resampling ringing),
# not ink: they must not widen the bounding box.
INK_THRESHOLD = 0.05


def ink_bounding_box(img: np.ndarray) -> tuple[slice, slice] | None:
    """Rows and columns that hold ink in a white-on-black image; None for a blank image."""
    peak = float(img.max(initial=0))
    if peak <= 0:
        return None
    ink = img > INK_THRESHOLD * peak
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def fit_to_box(img: np.ndarray, box: int) -> np.ndarray | None:
    """Crop to the ink and resize, keeping the aspect, so that the longer side is `box` pixels.

    Returns float32 (same intensity scale as `img`), or None when the image holds no ink.
    """
    bounds = ink_bounding_box(img)
    if bounds is None:
        return None
    crop = np.ascontiguousarray(img[bounds], dtype=np.float32)
    height, width = crop.shape
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR))


def mnist_normalise(img: np.ndarray, resolution: int = 28) -> np.ndarray:
    """Size-normalise and centre one white-on-black grayscale image the way MNIST digits were.

    The ink fits a box of 20/28 of `resolution`; its centre of mass lands on the image centre (to the
    nearest pixel, as in MNIST), unless that would push ink off the canvas. Returns uint8 `resolution`².
    """
    canvas = np.zeros((resolution, resolution), np.float32)
    fitted = fit_to_box(img, round(resolution * MNIST_BOX_FRACTION))
    if fitted is None:
        return canvas.astype(np.uint8)
    centre = (resolution - 1) / 2
    mass = fitted.sum()
    com_row = fitted.sum(axis=1) @ np.arange(fitted.shape[0]) / mass
    com_col = fitted.sum(axis=0) @ np.arange(fitted.shape[1]) / mass
    height, width = fitted.shape
    top = min(max(round(centre - com_row), 0), resolution - height)
    left = min(max(round(centre - com_col), 0), resolution - width)
    canvas[top : top + height, left : left + width] = fitted
    return np.clip(canvas, 0, 255, out=canvas).round().astype(np.uint8)


def square_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop to a square and resize to `resolution`² (any input size, 1x1 included)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == resolution:
        return square
    return square.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)


def resize_batch(images: np.ndarray, resolution: int) -> np.ndarray:
    """Resize a batch of square N×H×W uint8 grayscale images to `resolution`²."""
    if images.shape[1] == resolution:
        return images
    return np.stack([np.asarray(square_resize(Image.fromarray(im), resolution)) for im in images])
