"""Printed characters jittered until they pass for handwriting: an offline public set of 62 semantics.

Each glyph (0-9, A-Z, a-z) is rendered once per matplotlib TrueType font that really draws it; every
sample redraws one of those renderings with a jittered pen (strokes.py), so the font's weight and
serifs give way to MNIST-like monoline strokes. Everything random comes from `seed`.
"""

from __future__ import annotations

import string
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from privimage.data.geometry import fit_to_box
from privimage.data.strokes import MASTER_BOX, Jitter, centre_on_master, draw, pen_fields

GLYPH_CHARS = string.digits + string.ascii_uppercase + string.ascii_lowercase
GLYPH_CLASSES = tuple(f"glyph:{char}" for char in GLYPH_CHARS)

_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_RENDER_SIZE = 100  # font size of the first rendering, then fitted to the master box


def font_paths() -> list[Path]:
    """The TrueType fonts shipped inside matplotlib's wheel (DejaVu, STIX, Computer Modern, ...)."""
    return sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("*.ttf"))


def _postscript_name(char: str) -> str:
    return _DIGIT_NAMES[int(char)] if char.isdigit() else char


def drawn_chars(font_path: Path) -> set[str]:
    """Glyph characters the font draws as themselves.

    The charmap must lead to the glyph with the character's standard PostScript name: that rejects
    missing glyphs (index 0), tofu fonts (LastResort maps every code to a 'lastresort' box) and symbol
    fonts that put other shapes at ASCII codes (cmsy10 draws a prime at '0', cmex10 brackets everywhere).
    """
    font = FT2Font(str(font_path))
    indices = {char: font.get_char_index(ord(char)) for char in GLYPH_CHARS}
    return {char for char, i in indices.items() if i and font.get_glyph_name(i) == _postscript_name(char)}


def _render_master(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray | None:
    """Binary ink of `char`, its longer side fitted to the master box, centred on a square of the box's
    size plus a one-pixel margin; None if the font draws nothing."""
    left, top, right, bottom = font.getbbox(char)
    if right <= left or bottom <= top:
        return None
    image = Image.new("L", (right - left + 2, bottom - top + 2))
    ImageDraw.Draw(image).text((1 - left, 1 - top), char, fill=255, font=font)
    fitted = fit_to_box(np.asarray(image), MASTER_BOX)
    if fitted is None:
        return None  # fonts such as DejaVuSansDisplay render nothing
    return centre_on_master(fitted > 127)


def build_masters() -> tuple[np.ndarray, list[np.ndarray]]:
    """Distance-to-skeleton fields of every (font, glyph) pair, and for each glyph the indices of its fields."""
    inks, owners = [], [[] for _ in GLYPH_CHARS]
    for path in font_paths():
        chars = drawn_chars(path)
        if not chars:
            continue
        font = ImageFont.truetype(str(path), _RENDER_SIZE)
        for glyph, char in enumerate(GLYPH_CHARS):
            ink = _render_master(font, char) if char in chars else None
            if ink is not None:
                owners[glyph].append(len(inks))
                inks.append(ink)
    return pen_fields(np.stack(inks)), [np.asarray(indices) for indices in owners]


def render_glyphs(
    samples_per_glyph: int, resolution: int = 28, seed: int = 0, jitter: Jitter = Jitter()
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Generate `samples_per_glyph` jittered images of each of the 62 glyphs, MNIST-normalised.

    Returns uint8 images N×resolution×resolution, int64 labels (glyph-major order) and class names.
    Each glyph draws from its own generator seeded by (seed, glyph): its images depend on nothing else.
    """
    fields, owners = build_masters()
    images, labels = [], []
    for glyph in tqdm(range(len(GLYPH_CHARS)), desc="rendering glyphs", unit="glyph", leave=False):
        rng = np.random.default_rng([seed, glyph])
        images.append(draw(fields[rng.choice(owners[glyph], samples_per_glyph)], rng, resolution, jitter))
        labels.append(np.full(samples_per_glyph, glyph, np.int64))
    return np.concatenate(images), np.concatenate(labels), GLYPH_CLASSES
