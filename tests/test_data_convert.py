"""In-memory data as arrays (data/convert.py): the pixel and label validators, the Hugging Face column
finder, and one Hugging Face dataset accepted or refused alike by `fit` and by the saved-dataset loader."""

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privimage.api import _labelled, _write_private_npz
from privimage.data import ImageDataset, load_dataset
from privimage.data.checks import label_array, uint8_image, uint8_images
from privimage.data.convert import hf_columns
from privimage.data.formats import _hf_source
from privimage.errors import UserError


# -- pixels ----------------------------------------------------------------------------------------
def test_uint8_images_pass_unchanged_with_a_channel_axis_added():
    gray = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    assert np.array_equal(uint8_images(gray, "images"), gray[..., None])
    rgb = np.zeros((2, 4, 5, 3), np.uint8)
    assert uint8_images(rgb, "images") is rgb


def test_floats_in_0_1_become_0_255_and_floats_in_0_255_are_refused():
    floats = np.array([0.0, 0.2, 0.5, 1.0], np.float32).reshape(1, 2, 2)
    assert uint8_images(floats, "images").ravel().tolist() == [0, 51, 128, 255]
    with pytest.raises(UserError, match=r"images are floats outside \[0, 1\]: scale them to \[0, 1\]"):
        uint8_images(floats * 255, "images")  # 0..255 as floats: refused, not guessed from the maximum
    for bad in (np.nan, -0.1, np.inf):
        with pytest.raises(UserError, match=r"outside \[0, 1\]"):
            uint8_images(np.full((1, 2, 2), bad), "images")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, bool])
def test_other_dtypes_are_refused_naming_the_dtype(dtype):
    with pytest.raises(UserError, match=rf"images are {np.dtype(dtype)}: give uint8 values 0..255 or floats in \[0, 1\]"):
        uint8_images(np.zeros((1, 4, 4), dtype), "images")


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (4, 8, 8, 2), (4, 8, 8, 4), (0, 8, 8), (8, 8), (1, 2, 8, 8, 1)])
def test_shapes_other_than_n_h_w_c_with_c_1_or_3_are_refused(shape):
    with pytest.raises(UserError, match=rf"images have shape \({shape[0]}, .*channels last"):
        uint8_images(np.zeros(shape, np.uint8), "images")


def test_one_image_is_checked_with_its_own_shape_and_a_declared_dtype():
    assert uint8_image(np.zeros((4, 5), np.uint8), "x").shape == (4, 5, 1)
    with pytest.raises(UserError, match=r"x have shape \(3, 4, 5\): give H×W or H×W×C"):
        uint8_image(np.zeros((3, 4, 5), np.uint8), "x")
    nested = [[0, 255], [7, 9]]  # as `datasets` hands out an Array2D column: lists, their type lost
    with pytest.raises(UserError, match="x are int64"):
        uint8_image(nested, "x")
    assert uint8_image(nested, "x", np.dtype(np.uint8)).ravel().tolist() == [0, 255, 7, 9]


# -- labels ----------------------------------------------------------------------------------------
def test_labels_as_integers_or_names():
    labels, names = label_array([1, 0, 1], None, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0, 1] and names is None  # None: "0".."K-1"
    labels, names = label_array(["dog", "cat", "dog"], None, 3)
    assert labels.tolist() == [1, 0, 1] and names == ("cat", "dog")
    labels, names = label_array(None, None, 2)
    assert labels.tolist() == [0, 0] and names == ("images",)


@pytest.mark.parametrize(
    "labels, names, count, words",
    [
        ([0, 1, -1], ["a", "b"], 3, "labels below 0 \\(Hugging Face marks an unlabelled image -1\\)"),
        ([0, 2, 0], None, 3, "class '1' has no images"),
        ([0, 1, 0], ["a", "b", "c"], 3, "class 'c' has no images"),
        ([0, 2], ["a", "b"], 2, "labels must be 0..1, one per class of class_names"),
        ([0, 1], None, 3, "3 images but 2 labels"),
        ([0.0, 1.0], None, 2, "labels are float64"),
        (["a", "z"], ["a", "b"], 2, "unknown class names z"),
        (None, ["a", "b"], 2, "2 class_names but no labels"),
        ([], None, 0, "holds no images"),
    ],
)
def test_bad_labels_are_refused(labels, names, count, words):
    with pytest.raises(UserError, match=words):
        label_array(labels, names, count)


# -- Hugging Face datasets: one spec, built as a stand-in and (if installed) as a real `datasets` one ----
class Feature:
    """A stand-in for a `datasets` feature type; the finder knows them by class name, as it knows the real ones."""

    def __init__(self, *args, names=None):
        self.args, self.names = args, names
        self.dtype = args[-1] if args else None


def feature_type(kind):
    return type(kind, (Feature,), {})


Image_, ClassLabel, Value, Array3D = (feature_type(kind) for kind in ("Image", "ClassLabel", "Value", "Array3D"))


class FakeDataset:
    """Enough of a `datasets.Dataset` for fit and for the loader: columns, features, length, batches."""

    def __init__(self, columns, features):
        self.columns, self.features = columns, features
        self.column_names = list(columns)

    def __getitem__(self, column):
        return self.columns[column]

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def iter(self, batch_size):
        for start in range(0, len(self), batch_size):
            yield {name: values[start : start + batch_size] for name, values in self.columns.items()}


def photo(shade, size=(12, 12), mode="RGB"):
    return Image.fromarray(np.full((*size, 4), shade, np.uint8)).convert(mode)


def pixel_lists(shape, value, dtype=np.uint8):
    return [np.full(shape, value * (i + 1), dtype).tolist() for i in range(4)]


PHOTOS = [photo(40 * i) for i in range(4)]
CAT_DOG = ClassLabel(names=["cat", "dog"])
# name: ({column: (feature, values)}, words of the refusal, or None where both accept it)
CASES = {
    "ClassLabel": ({"img": (Image_(), PHOTOS), "label": (CAT_DOG, [0, 1, 0, 1])}, None),
    "image under another name": ({"photo": (Image_(), PHOTOS), "kind": (CAT_DOG, [1, 0, 0, 1])}, None),
    "integer label column": ({"image": (Image_(), PHOTOS), "label": (Value("int64"), [0, 1, 1, 0])}, None),
    "string labels": ({"image": (Image_(), PHOTOS), "labels": (Value("string"), ["x", "y", "x", "y"])}, None),
    "one unlabelled class": ({"image": (Image_(), PHOTOS)}, None),
    "mixed sizes and modes": ({"img": (Image_(), [photo(50, (12, 12)), photo(90, (20, 14), "RGBA"),
                                                  photo(130, (9, 9), "L"), photo(170, (12, 12), "P")]),
                               "label": (CAT_DOG, [0, 1, 0, 1])}, None),
    "Array3D uint8": ({"image": (Array3D((12, 12, 3), "uint8"), pixel_lists((12, 12, 3), 30)),
                       "label": (CAT_DOG, [0, 1, 0, 1])}, None),
    "Array3D floats in [0, 1]": ({"image": (Array3D((12, 12, 1), "float32"), pixel_lists((12, 12, 1), 0.2, np.float32)),
                                  "label": (CAT_DOG, [0, 1, 0, 1])}, None),
    "Array3D floats in 0..255": ({"image": (Array3D((12, 12, 1), "float32"), pixel_lists((12, 12, 1), 60, np.float32)),
                                  "label": (CAT_DOG, [0, 1, 0, 1])}, r"floats outside \[0, 1\]"),
    "Array3D channels first": ({"image": (Array3D((3, 12, 12), "uint8"), pixel_lists((3, 12, 12), 30)),
                                "label": (CAT_DOG, [0, 1, 0, 1])}, "channels last"),
    "ClassLabel -1": ({"img": (Image_(), PHOTOS), "label": (CAT_DOG, [0, 1, -1, 1])}, "labels below 0"),
    "ClassLabel with an empty class": ({"img": (Image_(), PHOTOS),
                                        "label": (ClassLabel(names=["a", "b", "c"]), [0, 1, 0, 1])}, "class 'c' has no images"),
    "label column under another name": ({"img": (Image_(), PHOTOS), "fine_label": (Value("int64"), [0, 1, 0, 1])},
                                        "no label column .* among fine_label"),
    "no image column": ({"path": (Value("string"), ["a.png"] * 4), "label": (CAT_DOG, [0, 1, 0, 1])},
                        "no image column among path, label"),
}


def fake_dataset(case):
    columns, _ = CASES[case]
    return FakeDataset({name: values for name, (_, values) in columns.items()},
                       {name: feature for name, (feature, _) in columns.items()})


def hf_dataset(datasets, case, folder: Path):
    """The case as a real `datasets.Dataset`, read from a parquet file that pyarrow writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def real(feature):
        kind = type(feature).__name__
        if kind == "Image":
            return datasets.Image()
        if kind == "ClassLabel":
            return datasets.ClassLabel(names=feature.names)
        return getattr(datasets, kind)(*feature.args)

    def stored(feature, value):
        if isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            return {"bytes": buffer.getvalue(), "path": None}
        return value

    columns, _ = CASES[case]
    features = datasets.Features({name: real(feature) for name, (feature, _) in columns.items()})
    table = pa.table({name: [stored(feature, v) for v in values] for name, (feature, values) in columns.items()})
    folder.mkdir(parents=True)
    pq.write_table(table.cast(features.arrow_schema), folder / "data.parquet")
    return datasets.Dataset.from_parquet(str(folder / "data.parquet"), keep_in_memory=True,
                                         cache_dir=str(folder / "builder"))


def fit_and_load(fit_data, load, case, tmp_path, resolution, channels, folder):
    """Both paths on one dataset: fit's conversion (then its private copy loaded as the pipeline loads it)
    and the loader of the dataset saved in `folder`. Either both give the same images, labels and
    classes, or both refuse alike."""
    _, refusal = CASES[case]
    try:
        fitted = _labelled(fit_data, None, None, resolution, channels)
    except UserError as error:
        fit_error = str(error)
    else:
        fit_error = None
        _write_private_npz(tmp_path / "fit.npz", fitted)
    try:
        loaded = load()
    except UserError as error:
        load_error = str(error)
    else:
        load_error = None
    if refusal is None:
        assert fit_error is None and load_error is None, (fit_error, load_error)
        from_fit = load_dataset(str(tmp_path / "fit.npz"), resolution=resolution, channels=channels)
        np.testing.assert_array_equal(from_fit.images, loaded.images)
        np.testing.assert_array_equal(from_fit.labels, loaded.labels)
        if len(CASES[case][0]) == 1:  # one unlabelled class: named after the saved folder, or "images"
            assert from_fit.class_names == ("images",) and loaded.class_names == (folder,)
        else:
            assert from_fit.class_names == loaded.class_names
        return from_fit
    assert fit_error is not None and load_error is not None, (fit_error, load_error)
    assert re.search(refusal, fit_error) and load_error.endswith(": " + fit_error), (fit_error, load_error)
    return None


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_fit_and_the_loader_accept_and_refuse_the_same_hugging_face_datasets(tmp_path, case, channels):
    dataset = fake_dataset(case)
    load = lambda: ImageDataset(*_hf_source(dataset, "saved", (), tmp_path, 8, channels).load(), "saved")  # noqa: E731
    fitted = fit_and_load(dataset, load, case, tmp_path, 8, channels, tmp_path.name)
    if fitted is not None and case == "ClassLabel":
        assert fitted.class_names == ("cat", "dog") and fitted.labels.tolist() == [0, 1, 0, 1]
        assert fitted.images.shape == (4, 8, 8, channels) and fitted.images[3].min() == 120


@pytest.mark.parametrize("case", CASES)
def test_a_saved_hugging_face_dataset_is_read_as_fit_reads_it_in_memory(tmp_path, monkeypatch, case):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    dataset = hf_dataset(datasets, case, tmp_path / "parquet")
    dataset.save_to_disk(str(tmp_path / "saved"))
    load = lambda: load_dataset(str(tmp_path / "saved"), resolution=8, channels=3)  # noqa: E731
    fit_and_load(dataset, load, case, tmp_path, 8, 3, "saved")


def test_columns_are_found_by_feature_type_then_by_name():
    class SubImage(Image_):  # a subclass of datasets.Image is an image column too
        pass

    def columns(**features):
        return FakeDataset({name: [] for name in features}, features)

    assert hf_columns(columns(a=Value("string"), b=SubImage(), c=Value("int64"), d=CAT_DOG)) == ("b", "d")
    assert hf_columns(columns(img=Array3D((2, 2, 1), "uint8"), labels=Value("int64"))) == ("img", "labels")
    assert hf_columns(columns(image=Image_(), id=Value("int64")), need_labels=False) == ("image", None)
    with pytest.raises(UserError, match="no label column .* among id"):
        hf_columns(columns(image=Image_(), id=Value("int64")))


def test_a_dataset_dict_is_refused_naming_its_splits():
    with pytest.raises(UserError, match=r"images are a mapping of train, test: give one split"):
        _labelled({"train": fake_dataset("ClassLabel"), "test": fake_dataset("ClassLabel")}, None, None, 8, 1)
