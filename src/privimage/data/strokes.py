"""Pen strokes: redraw any binary character shape as a handwriting-like sample.

A shape is thinned to its skeleton (Zhang & Suen 1984) and kept as a distance-to-skeleton field on a
"master" canvas. A sample is that field warped (rotation, shear, aspect, elastic displacement) and cut
at a random half-width, which redraws the shape with a round pen of that width: thin monoline strokes
like MNIST's, whatever the source's weight (a bold font, a blurry 8x8 scan). MNIST's own size
normalisation, a mild blur and saturated pen cores finish it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from privimage.data.geometry import mnist_normalise

MASTER_CANVAS = 72  # side of the master fields; the margin leaves room for the warp
MASTER_BOX = 40  # longer side of a master shape; 2 master px = 1 px at 28 (MNIST's ink box is 20)
_MASTER_PX = MASTER_BOX / 20
_ELASTIC_GRID_STEP = 4  # master px between the random displacement vectors before smoothing
# (row, column) offsets of the neighbours P2 .. P9 of Zhang & Suen (1984): clockwise from north.
_NEIGHBOUR_OFFSETS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


@dataclass(frozen=True)
class Jitter:
    """Ranges of the random distortions; lengths are in pixels of a 28x28 image (ink box 20 px)."""

    stroke_width: tuple[float, float] = (1.8, 3.5)  # MNIST pen strokes are ~2-3 px wide
    rotation_deg: float = 12.0
    shear: float = 0.3
    aspect: float = 1.25  # horizontal stretch or squeeze up to this factor
    elastic_px: float = 1.0  # largest RMS displacement
    elastic_smoothness_px: float = 2.5  # Gaussian sigma of the displacement field
    blur_px: float = 0.45  # Gaussian sigma of the strongest blur


def _zhang_suen_tables() -> tuple[np.ndarray, np.ndarray]:
    """For each 8-bit neighbourhood code, whether the centre pixel may go in pass 1 and in pass 2."""
    # Bit k is neighbour P(k+2), as in _NEIGHBOUR_OFFSETS.
    bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)
    count = bits.sum(axis=1)
    transitions = (~bits & np.roll(bits, -1, axis=1)).sum(axis=1)
    north, east, south, west = bits[:, 0], bits[:, 2], bits[:, 4], bits[:, 6]
    simple = (count >= 2) & (count <= 6) & (transitions == 1)
    first = simple & ~(north & east & south) & ~(east & south & west)
    second = simple & ~(north & east & west) & ~(north & south & west)
    return first, second


def _neighbour_codes(ink: np.ndarray) -> np.ndarray:
    """8-bit code of each pixel's neighbourhood, bit k set when neighbour P(k+2) is ink."""
    padded = np.pad(ink, ((0, 0), (1, 1), (1, 1))).view(np.uint8)
    _, height, width = ink.shape
    codes = np.zeros(ink.shape, np.uint8)
    for bit, (dy, dx) in enumerate(_NEIGHBOUR_OFFSETS):
        codes |= padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] << bit
    return codes


def thin(ink: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a batch (B×H×W bool) of binary images down to one-pixel skeletons."""
    tables = _zhang_suen_tables()
    skeleton = ink.copy()
    changed = True
    while changed:
        changed = False
        for removable in tables:
            remove = skeleton & removable[_neighbour_codes(skeleton)]
            if remove.any():
                skeleton &= ~remove
                changed = True
    return skeleton

def _matrices(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Batch of 2x2 matrices [[a, b], [c, d]] from four vectors."""
    return np.stack([a, b, c, d], axis=-1).reshape(-1, 2, 2)


def _sampling_grid(rng: np.random.Generator, count: int, jitter: Jitter) -> np.ndarray:
    """Random affine + elastic sampling grids (count×S×S×2 float32, grid_sample's normalised coordinates)."""
    angle = np.deg2rad(rng.uniform(-jitter.rotation_deg, jitter.rotation_deg, count))
    shear = rng.uniform(-jitter.shear, jitter.shear, count)
    stretch = np.sqrt(np.exp(rng.uniform(-np.log(jitter.aspect), np.log(jitter.aspect), count)))
    cos, sin, zero, one = np.cos(angle), np.sin(angle), np.zeros(count), np.ones(count)
    rotate = _matrices(cos, -sin, sin, cos)
    slant = _matrices(one, shear, zero, one)
    scale = _matrices(stretch, zero, zero, 1 / stretch)
    # grid_sample maps output to input coordinates, so it needs the inverse of the glyph's transform.
    inverse = np.linalg.inv(rotate @ slant @ scale).astype(np.float32)
    # Normalised (x, y) pixel centres, as grid_sample reads them with align_corners=False.
    centres = ((2 * np.arange(MASTER_CANVAS) + 1) / MASTER_CANVAS - 1).astype(np.float32)
    x, y = centres[None, :], centres[:, None]
    (a, b), (c, d) = np.moveaxis(inverse, 0, -1)[..., None, None]
    grid = np.stack([a * x + b * y, c * x + d * y], axis=-1)

    coarse = MASTER_CANVAS // _ELASTIC_GRID_STEP
    sigma = jitter.elastic_smoothness_px * _MASTER_PX / _ELASTIC_GRID_STEP
    noise = ndimage.gaussian_filter(rng.standard_normal((count, 2, coarse, coarse)), (0, 0, sigma, sigma))
    size = (MASTER_CANVAS, MASTER_CANVAS)
    field = F.interpolate(torch.from_numpy(noise).float(), size, mode="bilinear", align_corners=True).numpy()
    rms = np.sqrt(np.square(field).mean(axis=(1, 2, 3), keepdims=True))
    amplitude = rng.uniform(0, jitter.elastic_px, (count, 1, 1, 1)) * _MASTER_PX * 2 / MASTER_CANVAS
    return grid + (field * (amplitude / rms).astype(np.float32)).transpose(0, 2, 3, 1)


def _random_blur(rng: np.random.Generator, images: np.ndarray, sigma: float) -> np.ndarray:
    """Blend each image towards one fixed Gaussian blur with a random weight: a blur of random strength
    for the whole batch in one filter call."""
    blurred = ndimage.gaussian_filter(images, (0, sigma, sigma))
    return images + rng.uniform(0, 1, (len(images), 1, 1)) * (blurred - images)


def _saturate(images: np.ndarray) -> np.ndarray:
    """Scale each image so that its brightest pixel is 255, as the pen cores of MNIST digits are."""
    peak = images.max(axis=(1, 2), keepdims=True)
    return (images * (255 / np.maximum(peak, 1))).round().astype(np.uint8)


def pen_fields(inks: np.ndarray) -> np.ndarray:
    """Distance-to-skeleton fields (B×MASTER_CANVAS² float32) of binary shapes B×(MASTER_BOX+2)²."""
    margin = (MASTER_CANVAS - inks.shape[1]) // 2  # room for the warp, added after the (costly) thinning
    skeletons = np.pad(thin(inks), ((0, 0), (margin, margin), (margin, margin)))
    return np.stack([ndimage.distance_transform_edt(~skeleton) for skeleton in skeletons]).astype(np.float32)


def centre_on_master(ink: np.ndarray) -> np.ndarray:
    """A binary shape whose longer side is at most MASTER_BOX, centred on the (MASTER_BOX+2)² square."""
    canvas = np.zeros((MASTER_BOX + 2, MASTER_BOX + 2), bool)
    row, col = (len(canvas) - ink.shape[0]) // 2, (len(canvas) - ink.shape[1]) // 2
    canvas[row : row + ink.shape[0], col : col + ink.shape[1]] = ink
    return canvas


def draw(fields: np.ndarray, rng: np.random.Generator, resolution: int, jitter: Jitter = Jitter()) -> np.ndarray:
    """One jittered pen drawing of each field: uint8 B×resolution², MNIST-normalised."""
    count = len(fields)
    grid = torch.from_numpy(_sampling_grid(rng, count, jitter))
    distance = F.grid_sample(
        torch.from_numpy(fields).unsqueeze(1), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    half_width = rng.uniform(*jitter.stroke_width, (count, 1, 1)) * _MASTER_PX / 2
    ink = np.clip(half_width.astype(np.float32) - distance[:, 0].numpy() + 0.5, 0, 1)
    shapes = np.stack([mnist_normalise(sample * 255, resolution) for sample in ink]).astype(np.float32)
    return _saturate(_random_blur(rng, shapes, jitter.blur_px * resolution / 28))
