"""Image grids, plots and PNG encoding shared by the sample stage, the report and the benchmark."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from PIL import Image


def image_grid(rows: list[np.ndarray], pad: int = 2) -> Image.Image:
    """One row per list entry (each uint8 N×H×W×C, N may differ), on a black canvas."""
    height, width, channels = rows[0].shape[1:]
    columns = max(len(r) for r in rows)
    canvas = np.zeros((len(rows) * (height + pad) + pad, columns * (width + pad) + pad, channels), np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (height + pad), pad + j * (width + pad)
            canvas[top:top + height, left:left + width] = image
    return Image.fromarray(canvas[..., 0] if channels == 1 else canvas)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
