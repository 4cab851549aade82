"""User datasets: folders of any image mode and size, .npz files, and every bad input as a UserError."""

import numpy as np
import pytest
import torch
from PIL import Image

from privimage.data import ImageDataset, default_cache_dir, keyed_split, load_dataset, load_sensitive, to_tensor, to_uint8
from privimage.data.user import convert_image
from privimage.errors import UserError


def save(path, array, mode=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array))
    (image.convert(mode) if mode else image).save(path, **kwargs)
    return path


def gray(value, size=(6, 6)):
    return np.full(size, value, np.uint8)


def npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture
def class_folder(tmp_path):
    """Two classes in every mode and size that a user folder may hold, plus files to ignore."""
    root = tmp_path / "faces"
    rgba = np.zeros((5, 9, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: black once composited
    save(root / "b" / "rgba.png", rgba)
    save(root / "b" / "la.png", np.dstack([gray(255), gray(128)]), "LA")
    save(root / "b" / "bilevel.PNG", gray(255), "1")
    save(root / "b" / "photo.JPG", np.full((40, 30, 3), 200, np.uint8))
    save(root / "b" / "nested" / "tiny.bmp", gray(90, (1, 1)))
    save(root / "a" / "deep.png", np.full((3, 3), 65535, np.uint16))  # 16-bit: I;16
    save(root / "a" / "palette.png", gray(255), "P")
    save(root / "a" / "rgb.webp", np.full((12, 20, 3), (0, 255, 0), np.uint8), lossless=True)
    save(root / "a" / ".hidden.png", gray(0))
    (root / "a" / "notes.txt").write_text("not an image")
    save(root / ".thumbnails" / "x.png", gray(0))  # hidden folder: not a class
    (root / "b" / "loop").symlink_to(root / "b", target_is_directory=True)  # never followed
    (root / "link").symlink_to(root / "a", target_is_directory=True)  # symlinked folder: not a class
    return root


def test_class_folder_loads_every_mode_and_size(class_folder):
    data = load_dataset(str(class_folder), resolution=8, channels=3)
    assert data.class_names == ("a", "b") and data.name == str(class_folder)
    assert data.images.shape == (8, 8, 8, 3) and data.images.dtype == np.uint8
    assert np.bincount(data.labels).tolist() == [3, 5]
    means = data.images.reshape(8, -1, 3).mean(axis=1).round()
    # Sorted by path: a/deep, a/palette, a/rgb, then b/bilevel, b/la, b/nested/tiny, b/photo, b/rgba.
    np.testing.assert_array_equal(means[:, 1], [255, 255, 255, 255, 128, 90, 200, 0])
    np.testing.assert_array_equal(means[2], [0, 255, 0])


def test_class_folder_in_grayscale(class_folder):
    data = load_dataset(str(class_folder), resolution=16, channels=1)
    assert data.images.shape == (8, 16, 16, 1)


def test_unlabelled_folder_is_one_class_named_after_it(tmp_path):
    for index, size in enumerate([(1, 1), (30, 10), (64, 64)]):
        save(tmp_path / "celeba" / f"{index}.png", gray(100, size))
    data = load_dataset(str(tmp_path / "celeba"), resolution=12, channels=3)
    assert data.class_names == ("celeba",) and len(data) == 3 and (data.labels == 0).all()
    assert (data.images == 100).all()


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("I;16", np.array([[0, 32896, 65535]], np.uint16), [0, 128, 255]),
        ("I", np.array([[0, 32896, 65535]], np.int32), [0, 128, 255]),
        ("I", np.array([[0, 100, 255]], np.int32), [0, 100, 255]),  # 8-bit values in 32-bit ints
        ("F", np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),
    ],
)
def test_high_bit_depth_is_scaled_to_8_bit(mode, values, expected):
    image = Image.fromarray(values).convert(mode) if mode != "I;16" else Image.fromarray(values)
    assert image.mode == mode
    assert np.asarray(convert_image(image, 1)).ravel().tolist() == expected


def test_transparent_palette_is_composited_on_black():
    image = Image.fromarray(gray(255, (2, 2))).convert("P")
    image.info["transparency"] = image.getpixel((0, 0))
    assert np.asarray(convert_image(image, 3)).max() == 0


def test_npz_with_and_without_class_names(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 20, 20, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    named_path = npz(tmp_path / "n.npz", images=images, labels=labels, class_names=["x", "y", "z"])
    named = load_dataset(named_path, resolution=16, channels=1)
    assert named.class_names == ("x", "y", "z") and named.images.shape == (6, 16, 16, 1)
    plain_path = npz(tmp_path / "p.npz", images=images[..., 0], labels=labels)
    plain = load_dataset(plain_path, resolution=20, channels=1)
    assert plain.class_names == ("0", "1", "2")
    np.testing.assert_array_equal(plain.images[..., 0], images[..., 0])  # right size already: untouched


def test_separate_test_set_is_aligned_to_training_classes(tmp_path):
    for name in ("cat", "dog", "eel"):
        save(tmp_path / "train" / name / "0.png", gray(10))
    save(tmp_path / "test" / "eel" / "0.png", gray(10))
    train_dir, test_dir = str(tmp_path / "train"), str(tmp_path / "test")
    train, test = load_sensitive(train_dir, resolution=8, channels=1, test_spec=test_dir, split_key=KEY)
    assert test.class_names == train.class_names and test.labels.tolist() == [2]
    save(tmp_path / "other" / "fox" / "0.png", gray(10))
    with pytest.raises(UserError, match="fox"):
        load_sensitive(train_dir, resolution=8, channels=1, test_spec=str(tmp_path / "other"), split_key=KEY)


KEY = bytes(32)


def test_keyed_split_of_a_folder(tmp_path):
    for index in range(40):
        save(tmp_path / "pics" / f"{index}.png", gray(index))
    train, test = load_sensitive(str(tmp_path / "pics"), resolution=8, channels=1, test_fraction=0.3, split_key=KEY)
    values = np.concatenate([train.images[:, 0, 0, 0], test.images[:, 0, 0, 0]])
    assert sorted(values.tolist()) == list(range(40))  # a partition
    assert 3 <= len(test) <= 21  # Binomial(40, 0.3): mean 12, std 2.9
    again = load_sensitive(str(tmp_path / "pics"), resolution=8, channels=1, test_fraction=0.3, split_key=KEY)
    assert again[1].fingerprint() == test.fingerprint()  # same key, same split
    other = load_sensitive(str(tmp_path / "pics"), resolution=8, channels=1, test_fraction=0.3, split_key=b"x" * 32)
    assert other[1].fingerprint() != test.fingerprint()  # the key decides it (fails with chance ~1e-11)
    with pytest.raises(UserError, match="test_fraction"):
        load_sensitive(str(tmp_path / "pics"), resolution=8, channels=1, test_fraction=1.5, split_key=KEY)


def test_adding_one_image_moves_no_other_between_train_and_test():
    """Neighbouring datasets must have neighbouring training splits (a permutation moved ~20 % of images)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (500, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 500).astype(np.int64)
    small = ImageDataset(images[1:], labels[1:], ("a", "b", "c"), "d")
    large = ImageDataset(images, labels, ("a", "b", "c"), "d")
    assert np.array_equal(keyed_split(large, 0.2, KEY)[1:], keyed_split(small, 0.2, KEY))


def test_tensor_round_trip():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    x = to_tensor(images)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(to_uint8(x), images)
    assert to_uint8(torch.tensor([[[[2.0, -3.0]]]])).ravel().tolist() == [255, 0]


def test_dataset_subset_and_fingerprint():
    images = np.zeros((4, 8, 8, 1), np.uint8)
    data = ImageDataset(images, np.array([0, 1, 0, 1]), ("a", "b"), "toy")
    part = data.subset(np.array([1, 3]))
    assert len(part) == 2 and part.labels.tolist() == [1, 1] and part.resolution == 8 and part.channels == 1
    changed = images.copy()
    changed[0, 0, 0, 0] = 1
    prints = {
        data.fingerprint(),
        ImageDataset(changed, data.labels, data.class_names, "toy").fingerprint(),
        ImageDataset(images, data.labels, ("a", "c"), "toy").fingerprint(),
        ImageDataset(images, np.array([1, 1, 0, 1]), data.class_names, "toy").fingerprint(),
    }
    assert len(prints) == 4
    with pytest.raises(ValueError):
        ImageDataset(images.astype(np.float32), data.labels, data.class_names, "toy")


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRIVIMAGE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("PRIVIMAGE_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "privimage")


# ---- bad input: each is a UserError whose one sentence names the file or the problem ----


def bad_folder(tmp_path, case):
    root = tmp_path / "data"
    root.mkdir()
    if case == "empty":
        (root / "readme.txt").write_text("no images here")
    elif case == "empty class":
        save(root / "cats" / "0.png", gray(1))
        (root / "dogs").mkdir()
    elif case == "zero-byte":
        save(root / "cats" / "0.png", gray(1))
        (root / "cats" / "broken.png").write_bytes(b"")
    elif case == "truncated":
        save(root / "full.png", np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
        (root / "broken.png").write_bytes((root / "full.png").read_bytes()[:300])
    elif case == "not an image":
        (root / "broken.jpg").write_text("hello")
    elif case == "mixed":
        save(root / "cats" / "0.png", gray(1))
        save(root / "stray.png", gray(1))
    return root


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "folder .*data has no images"),
        ("empty class", "class folder .*dogs has no images"),
        ("zero-byte", "broken.png: unreadable image"),
        ("truncated", "broken.png: unreadable image"),
        ("not an image", "broken.jpg: unreadable image"),
        ("mixed", "holds both images and subfolders"),
    ],
)
def test_bad_folders(tmp_path, case, message):
    with pytest.raises(UserError, match=message):
        load_dataset(str(bad_folder(tmp_path, case)), resolution=8)


@pytest.mark.parametrize("size", [(20, 20), (11, 11)])  # over twice the limit (error), over it (warning)
def test_decompression_bomb(tmp_path, monkeypatch, size):
    save(tmp_path / "pics" / "bomb.png", gray(0, size))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserError, match="bomb.png: .*decompression-bomb"):
        load_dataset(str(tmp_path / "pics"), resolution=8)


GOOD_IMAGES = np.zeros((3, 8, 8), np.uint8)


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(labels=[0, 1, 0]), "no images array"),
        (dict(images=GOOD_IMAGES), "no labels array"),
        (dict(images=GOOD_IMAGES, labels=[0, 5, 1], class_names=["a", "b"]), "labels must be 0..1, one per class of class_names"),
        (dict(images=GOOD_IMAGES, labels=[0, -1, 1]), "labels below 0"),
        (dict(images=GOOD_IMAGES, labels=[0, 1]), "3 images but 2 labels"),
        (dict(images=GOOD_IMAGES, labels=[0, 2, 0]), "class '1' has no images"),
        (dict(images=GOOD_IMAGES, labels=[0, 1, 0], class_names=["a", "b", "c"]), "class 'c' has no images"),
        (dict(images=GOOD_IMAGES, labels=[0.0, 1.0, 0.0]), "labels are float64"),
        (dict(images=GOOD_IMAGES.astype(np.float32), labels=[0, 1, 0]), "images are float32, not uint8"),
        (dict(images=np.zeros((3, 8, 8, 2), np.uint8), labels=[0, 1, 0]), r"shape \(3, 8, 8, 2\)"),
        (dict(images=GOOD_IMAGES, labels=[0, 1, 0], class_names=np.array([{}, {}], object)), "unreadable .npz"),
    ],
)
def test_bad_npz(tmp_path, arrays, message):
    with pytest.raises(UserError, match=message):
        load_dataset(npz(tmp_path / "data.npz", **arrays), resolution=8)


def test_corrupt_npz_and_other_files(tmp_path):
    (tmp_path / "data.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="data.npz: unreadable .npz"):
        load_dataset(str(tmp_path / "data.npz"))
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(UserError, match="data.csv is neither a folder nor an .npz"):
        load_dataset(str(tmp_path / "data.csv"))


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="path .*nowhere does not exist"):
        load_dataset(str(tmp_path / "nowhere"))
