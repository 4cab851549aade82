"""Datasets as users download them: CIFAR and downsampled-ImageNet batch files, Hugging Face datasets,
the converted cache they are read from in batches, and bad batch files as one-line UserErrors."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from privimage.data import ImageDataset, load_dataset, load_sensitive
from privimage.data import user as user_module
from privimage.data.imagefile import ImageFile
from privimage.errors import UserError
from privimage.stages.semantics import pretraining_set

KEY = b"k" * 32  # the split key; unused where the format ships its test split
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def rows(count, side, seed):
    """`count` images as batch rows (3·side·side, channel-major) and as N×side×side×3 arrays."""
    images = np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    return images.transpose(0, 3, 1, 2).reshape(count, -1), images


def dump(path, batch):
    """As Python 2 wrote CIFAR: byte-string keys, protocol 2."""
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)


def write_cifar10(folder, train=(30, 30), test=20):
    folder.mkdir()
    images = []
    for index, count in enumerate((*train, test)):
        data, pixels = rows(count, 32, seed=index)
        labels = [i % 10 for i in range(count)]
        name = f"data_batch_{index + 1}" if index < len(train) else "test_batch"
        dump(folder / name, {b"data": data, b"labels": labels, b"batch_label": b"x"})
        images.append((pixels, np.array(labels)))
    dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES]})
    return images


def write_imagenet(folder, counts=(25, 15), classes=20, npz=False, side=32):
    folder.mkdir()
    images = []
    for index, count in enumerate(counts):
        data, pixels = rows(count, side, seed=10 + index)
        labels = np.arange(count) % classes + 1  # 1-based, as the downsampled-ImageNet files number them
        path = folder / f"train_data_batch_{index + 1}"
        if npz:
            np.savez(path.with_suffix(".npz"), data=data, labels=labels, mean=np.zeros(3 * side * side))
        else:
            with open(path, "wb") as fh:
                pickle.dump({"data": data, "labels": labels.tolist(), "mean": np.zeros(3 * side * side)}, fh)
        images.append((pixels, labels - 1))
    return np.concatenate([p for p, _ in images]), np.concatenate([l for _, l in images])


def test_cifar10_batches_give_train_test_split_and_class_names(tmp_path):
    written = write_cifar10(tmp_path / "cifar-10-batches-py")
    train, test = load_sensitive(str(tmp_path / "cifar-10-batches-py"), resolution=32, channels=3, split_key=KEY)
    assert train.class_names == test.class_names == tuple(CIFAR10_NAMES)
    np.testing.assert_array_equal(train.images, np.concatenate([written[0][0], written[1][0]]))
    np.testing.assert_array_equal(train.labels, np.concatenate([written[0][1], written[1][1]]))
    np.testing.assert_array_equal(test.images, written[2][0])  # the test_batch, not a random split
    np.testing.assert_array_equal(test.labels, written[2][1])
    gray, _ = load_sensitive(str(tmp_path / "cifar-10-batches-py"), resolution=16, channels=1, split_key=KEY)
    assert gray.images.shape == (60, 16, 16, 1)


def test_cifar100_batches_use_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{i}" for i in range(100)]
    for split, count in (("train", 40), ("test", 10)):
        data, _ = rows(count, 32, seed=count)
        fine = list(range(99, 99 - count, -1))
        dump(folder / split, {b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * count})
    dump(folder / "meta", {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"c"]})
    train, test = load_sensitive(str(folder), resolution=32, channels=3, split_key=KEY)
    assert train.class_names == tuple(names) and len(train) == 40 and len(test) == 10
    assert train.labels[0] == 99 and test.labels[-1] == 90


@pytest.mark.parametrize("npz", [False, True])
def test_imagenet_batches_convert_once_into_a_cache_read_in_batches(tmp_path, npz):
    pixels, labels = write_imagenet(tmp_path / "Imagenet32_train", npz=npz)
    cache = tmp_path / "cache"
    public = load_dataset(str(tmp_path / "Imagenet32_train"), resolution=32, channels=3, cache_dir=cache, convert=True)
    assert isinstance(public.images, ImageFile) and public.images.shape == (40, 32, 32, 3)
    np.testing.assert_array_equal(public.images[:], pixels)
    np.testing.assert_array_equal(public.images[[7, 2]], pixels[[7, 2]])
    np.testing.assert_array_equal(public.labels, labels)
    assert public.class_names == tuple(str(i) for i in range(1, 21))  # numbered by their 1-based labels
    in_memory = load_dataset(str(tmp_path / "Imagenet32_train"), resolution=32, channels=3, cache_dir=cache)
    assert isinstance(in_memory.images, np.ndarray)
    np.testing.assert_array_equal(in_memory.images, pixels)

    assert sorted(p.suffix for p in (cache / "images").iterdir()) == [".lock", ".npz", ".u8"]  # no temporary files
    converted = [p for p in sorted((cache / "images").iterdir()) if p.suffix in (".npz", ".u8")]
    mtimes = [p.stat().st_mtime_ns for p in converted]
    again = load_dataset(str(tmp_path / "Imagenet32_train"), resolution=32, channels=3, cache_dir=cache, convert=True)
    assert [p.stat().st_mtime_ns for p in converted] == mtimes  # read, not converted again
    assert again.fingerprint() == public.fingerprint()
    smaller = load_dataset(str(tmp_path / "Imagenet32_train"), resolution=16, channels=1, cache_dir=cache, convert=True)
    assert smaller.images.shape == (40, 16, 16, 1) and smaller.fingerprint() != public.fingerprint()


def test_a_changed_source_file_is_converted_again(tmp_path):
    write_imagenet(tmp_path / "in32")
    cache = tmp_path / "cache"
    first = load_dataset(str(tmp_path / "in32"), resolution=32, channels=3, cache_dir=cache, convert=True)
    data, pixels = rows(5, 32, seed=99)
    with open(tmp_path / "in32" / "train_data_batch_2", "wb") as fh:
        pickle.dump({"data": data, "labels": [3] * 5}, fh)
    second = load_dataset(str(tmp_path / "in32"), resolution=32, channels=3, cache_dir=cache, convert=True)
    assert len(second) == 30 and second.fingerprint() != first.fingerprint()
    np.testing.assert_array_equal(second.images[25:], pixels)


def test_imagenet_class_names_from_map_clsloc_or_a_plain_list(tmp_path):
    write_imagenet(tmp_path / "in32", classes=3)
    (tmp_path / "in32" / "map_clsloc.txt").write_text(
        "n02012849 2 crane\nn01440764 1 tench\nn03126707 3 crane\n"  # any order; ImageNet has two cranes
    )
    public = load_dataset(str(tmp_path / "in32"), resolution=32, channels=3, cache_dir=tmp_path / "c", convert=True)
    assert public.class_names == ("tench", "crane (n02012849)", "crane (n03126707)")
    (tmp_path / "in32" / "map_clsloc.txt").unlink()
    (tmp_path / "in32" / "class_names.txt").write_text("tench\ngoldfish\nshark\n")
    public = load_dataset(str(tmp_path / "in32"), resolution=32, channels=3, cache_dir=tmp_path / "c", convert=True)
    assert public.class_names == ("tench", "goldfish", "shark")  # a new name file is a new conversion
    (tmp_path / "in32" / "class_names.txt").write_text("tench\ngoldfish\n")
    with pytest.raises(UserError, match="train_data_batch_1: labels outside 1..2"):
        load_dataset(str(tmp_path / "in32"), resolution=32, channels=3)


def test_imagenet_val_data_is_the_test_split(tmp_path):
    write_imagenet(tmp_path / "in64", counts=(12,), classes=4, side=64)
    data, pixels = rows(6, 64, seed=5)
    with open(tmp_path / "in64" / "val_data", "wb") as fh:
        pickle.dump({"data": data, "labels": [1, 2, 3, 4, 1, 2]}, fh)
    train, test = load_sensitive(str(tmp_path / "in64"), resolution=64, channels=3, split_key=KEY)
    assert len(train) == 12 and train.class_names == ("1", "2", "3", "4")
    np.testing.assert_array_equal(test.images, pixels)
    np.testing.assert_array_equal(test.labels, [0, 1, 2, 3, 0, 1])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    "batch, message",
    [
        (b"\x80\x02garbage", "train_data_batch_1: unreadable batch file"),
        ({"data": _RunsCode(), "labels": [1]}, r"unreadable batch file .*posix.system, not only arrays"),
        ([1, 2, 3], "holds a list, not a batch dict"),
        ({"labels": [1]}, "no data in the batch file"),
        ({"data": np.zeros((2, 100), np.uint8), "labels": [1, 1]}, r"'data' is uint8 \(2, 100\), not N×\(3·r·r\)"),
        ({"data": np.zeros((2, 3072), np.float32), "labels": [1, 1]}, "'data' is float32"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, "'labels' is not one integer per image"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, "labels outside 1.."),
    ],
)
def test_bad_batch_files_are_one_line_user_errors(tmp_path, monkeypatch, batch, message):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "in32"
    folder.mkdir()
    content = batch if isinstance(batch, bytes) else pickle.dumps(batch)
    (folder / "train_data_batch_1").write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        load_dataset(str(folder), resolution=32, channels=3, cache_dir=tmp_path / "cache", convert=True)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "pwned").exists()
    assert not [p for p in (tmp_path / "cache" / "images").iterdir() if p.suffix != ".lock"]  # nothing half-written


def test_cifar_without_label_names_is_a_user_error(tmp_path):
    write_cifar10(tmp_path / "cifar")
    dump(tmp_path / "cifar" / "batches.meta", {b"num_cases_per_batch": 10000})
    with pytest.raises(UserError, match="batches.meta: no label_names in it"):
        load_sensitive(str(tmp_path / "cifar"), resolution=32, channels=3, split_key=KEY)


def test_lazy_subsets_copy_no_pixels_and_key_caches_by_selection(tmp_path):
    pixels, labels = write_imagenet(tmp_path / "in32", classes=4)
    public = load_dataset(str(tmp_path / "in32"), resolution=32, channels=3, cache_dir=tmp_path / "c", convert=True)
    for index in (5, -1, slice(3, 9), slice(None, None, 3), labels == 2, np.array([4, 5, 6, 1, 2, 39])):
        np.testing.assert_array_equal(public.images[index], pixels[index])  # as numpy indexes
    order = np.random.default_rng(0).permutation(len(public))
    holdout = public.subset(order[:10])
    assert isinstance(holdout.images, ImageFile)
    np.testing.assert_array_equal(holdout.images[:], pixels[order[:10]])
    np.testing.assert_array_equal(holdout.subset(np.array([3, 1])).images[:], pixels[order[[3, 1]]])
    assert holdout.fingerprint() != public.subset(order[10:20]).fingerprint()
    selected = pretraining_set(public, {"a": ["2"], "b": ["4"]}, ("a", "b"))
    assert isinstance(selected.images, ImageFile)
    keep = np.isin(labels, [1, 3])
    np.testing.assert_array_equal(selected.images[:], pixels[keep])
    np.testing.assert_array_equal(selected.labels, (labels[keep] == 3).astype(np.int64))
    assert isinstance(ImageDataset(np.asarray(selected.images), selected.labels, ("a", "b"), "x"), ImageDataset)


def test_folder_decoding_in_a_process_pool_matches_one_process(tmp_path, monkeypatch):
    from PIL import Image

    for index in range(12):
        folder = tmp_path / "faces" / f"c{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((10, 14, 3), 20 * index, np.uint8)).save(folder / f"{index:02d}.png")
    serial = load_dataset(str(tmp_path / "faces"), resolution=8, channels=3)
    monkeypatch.setattr(user_module, "POOL_MIN_IMAGES", 2)
    monkeypatch.setattr(user_module, "CHUNK_IMAGES", 5)
    pooled = load_dataset(str(tmp_path / "faces"), resolution=8, channels=3, cache_dir=tmp_path / "c", convert=True)
    np.testing.assert_array_equal(pooled.images[:], serial.images)
    np.testing.assert_array_equal(pooled.labels, serial.labels)
    (tmp_path / "faces" / "c1" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png: unreadable image"):
        load_dataset(str(tmp_path / "faces"), resolution=8, channels=3, cache_dir=tmp_path / "c", convert=True)


def test_hugging_face_dataset_without_the_library_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'privimage\[hf\]'"):
        load_dataset(str(tmp_path / "hf"), resolution=8, channels=3)


def write_parquet(datasets, path, count, shade):
    """Images and ClassLabel labels as a Hugging Face parquet file (written by pyarrow itself)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(value):
        buffer = io.BytesIO()
        Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    table = pa.table({"img": [png(shade + i) for i in range(count)], "label": [i % 2 for i in range(count)]})
    pq.write_table(table.cast(features.arrow_schema), path)
    return str(path)


def test_hugging_face_save_to_disk_folder_and_parquet(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    splits = {
        name: datasets.Dataset.from_parquet(write_parquet(datasets, tmp_path / f"{name}.parquet", count, shade),
                                            cache_dir=str(tmp_path / "builder"))
        for name, count, shade in (("train", 6, 0), ("test", 4, 100))
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hf"))
    train, test = load_sensitive(str(tmp_path / "hf"), resolution=8, channels=3, split_key=KEY)
    assert train.class_names == ("cat", "dog") and len(train) == 6 and len(test) == 4
    assert train.images[3].max() == 3 and test.images[0].min() == 100  # the saved test split
    np.testing.assert_array_equal(test.labels, [0, 1, 0, 1])
    public = load_dataset(str(tmp_path / "train.parquet"), resolution=8, channels=1, cache_dir=tmp_path / "c",
                          convert=True)
    assert public.images.shape == (6, 8, 8, 1) and public.class_names == ("cat", "dog")
    assert not (tmp_path / "hf-cache").exists()  # no copy of the data in the Hugging Face cache


@pytest.mark.slow
def test_quick_run_on_cifar_and_imagenet32_batch_files(tmp_path, cache_dir):
    write_cifar10(tmp_path / "cifar-10-batches-py", train=(60, 60), test=30)
    write_imagenet(tmp_path / "Imagenet32_train", counts=(40, 40), classes=20)
    env = {**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)}
    command = [sys.executable, "-m", "privimage", "run", "--preset", "quick", "--out", "run",
               "data.sensitive=cifar-10-batches-py", "data.public=Imagenet32_train",
               "data.resolution=32", "data.channels=3"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    semantics = json.loads((tmp_path / "run" / "semantics.json").read_text())
    assert set(semantics["selected"]) == set(CIFAR10_NAMES)
    assert semantics["noisy_votes"]["public_classes"] == [str(i) for i in range(1, 21)]
    with np.load(tmp_path / "run" / "synthetic.npz") as synthetic:
        assert synthetic["images"].shape[1:] == (32, 32, 3)
        assert list(synthetic["class_names"]) == CIFAR10_NAMES
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_a_cifar_folder_given_as_the_test_set_gives_its_test_batch(tmp_path):
    """Pointing data.sensitive_test at a CIFAR folder must not silently use its training batches."""
    written = write_cifar10(tmp_path / "cifar-10-batches-py")
    root = str(tmp_path / "cifar-10-batches-py")
    _, test = load_sensitive(root, resolution=32, channels=3, test_spec=root, split_key=KEY)
    np.testing.assert_array_equal(test.images, written[2][0])
