"""MNIST-style size normalisation and square resizing."""

import numpy as np
import pytest
from PIL import Image

from privimage.data.geometry import fit_to_box, ink_bounding_box, mnist_normalise, square_resize


def centre_of_mass(img: np.ndarray) -> tuple[float, float]:
    img = img.astype(np.float64)
    rows, cols = np.indices(img.shape)
    return (rows * img).sum() / img.sum(), (cols * img).sum() / img.sum()


def ink_extent(img: np.ndarray) -> tuple[int, int]:
    rows, cols = ink_bounding_box(img)
    return rows.stop - rows.start, cols.stop - cols.start


def l_shape(height: int, width: int, offset: tuple[int, int], canvas: int = 64) -> np.ndarray:
    """An asymmetric 'L' (its centre of mass is far from its box centre) somewhere on a canvas."""
    img = np.zeros((canvas, canvas), np.uint8)
    top, left = offset
    img[top : top + height, left : left + 3] = 255
    img[top + height - 3 : top + height, left : left + width] = 255
    return img


@pytest.mark.parametrize("resolution, box", [(28, 20), (32, 23), (56, 40), (8, 6)])
@pytest.mark.parametrize("shape", [(40, 20, (2, 30)), (12, 50, (45, 1)), (30, 30, (0, 0))])
def test_centre_of_mass_lands_on_centre_and_ink_fits_box(resolution, box, shape):
    height, width, offset = shape
    out = mnist_normalise(l_shape(height, width, offset), resolution)
    assert out.shape == (resolution, resolution) and out.dtype == np.uint8
    assert max(ink_extent(out)) in (box, box + 1)  # bilinear edges may add one faint pixel
    if resolution >= 28:  # at 8 px the 'L' is too lopsided to centre without leaving the canvas
        centre = (resolution - 1) / 2
        np.testing.assert_allclose(centre_of_mass(out), (centre, centre), atol=0.5 + 0.05)


def test_aspect_ratio_is_kept():
    out = mnist_normalise(l_shape(60, 30, (2, 2)), 28)
    rows, cols = ink_extent(out)
    assert rows == 20 and cols == pytest.approx(10, abs=1)


def test_float_input_and_blank_image():
    assert mnist_normalise(np.zeros((10, 10)), 28).max() == 0
    assert fit_to_box(np.zeros((5, 5), np.float32), 20) is None
    out = mnist_normalise(l_shape(20, 20, (5, 5)).astype(np.float32), 28)
    assert out.max() == 255


def test_faint_halo_does_not_widen_the_box():
    img = l_shape(40, 40, (10, 10))
    img[0, :] = 5  # a faint line far from the ink: under 5 % of the peak
    assert ink_extent(img) == (40, 40)


def test_square_resize_centre_crops_any_size():
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = (0, 255, 0)  # only the middle third survives the crop
    out = np.asarray(square_resize(Image.fromarray(wide), 16))
    assert out.shape == (16, 16, 3)
    assert (out[..., 1] > 200).all() and (out[..., [0, 2]] < 30).all()
    tiny = square_resize(Image.fromarray(np.full((1, 1), 77, np.uint8)), 8)
    assert tiny.size == (8, 8) and np.all(np.asarray(tiny) == 77)
