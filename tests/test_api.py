"""The Python API: the README's example on the quick preset, sampling at no privacy cost, refits,
and the conversions of in-memory data (arrays, torch datasets, Hugging Face datasets)."""

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import privimage
from privimage import cli
from privimage.api import PrivImage, _labelled
from privimage.errors import UserError

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first python block of the README's "From Python" section, on the quick preset with small n."""
    section = README.read_text().split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for old, new in ((', out="runs/from-python")', ', out="runs/from-python", preset="quick")'),
                     ("model.sample(10_000)", "model.sample(100)")):
        assert old in code, old
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def example(tmp_path_factory, cache_dir):
    """The README example, run once: its namespace and its run directory."""
    root = tmp_path_factory.mktemp("api")
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRIVIMAGE_CACHE", str(cache_dir))
        patch.chdir(root)
        exec(compile(readme_example(), "README.md", "exec"), namespace)
    return namespace, root / "runs" / "from-python"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_readme_example_fits_samples_and_reloads(example):
    namespace, run = example
    assert namespace["images"].dtype == np.uint8 and namespace["images"].shape == (100, 28, 28, 1)
    assert np.bincount(namespace["labels"]).tolist() == [10] * 10
    assert 0 <= namespace["accuracy"] <= 1
    assert set(namespace["metrics"]["accuracy"]) == {"cnn", "resnet"}
    assert (run / "report.html").is_file() and namespace["sevens"].shape == (16, 28, 28, 1)
    spent = namespace["model"].privacy_spent
    assert list(spent["stages"]) == ["semantics", "warmstart", "finetune"]
    assert 0.99 * 10 <= spent["epsilon"] <= 10 and spent["delta"] == 1e-5
    assert all(spent["epsilon"] > epsilon for epsilon in spent["stages"].values())


def test_sampling_costs_nothing_and_writes_nothing(example):
    namespace, run = example
    model = namespace["model"]
    before = snapshot(run)
    first, _ = model.sample(12)
    second, _ = model.sample(12)
    again, labels = PrivImage.load(run).sample(12)
    assert snapshot(run) == before  # privacy.json byte for byte, and every other file
    assert not np.array_equal(first, second)  # a fresh draw each call
    assert labels.tolist() == [i % 10 for i in range(12)]


def test_seeded_and_labelled_samples(example):
    _, run = example
    model = PrivImage.load(run)
    by_name, labels = model.sample(4, labels=["3", "3", "8", "8"], seed=7)
    by_index, _ = model.sample(4, labels=[3, 3, 8, 8], seed=7)
    assert labels.tolist() == [3, 3, 8, 8] and np.array_equal(by_name, by_index)
    with pytest.raises(UserError, match="unknown class names"):
        model.sample(1, labels=["cat"])


def test_in_memory_data_is_the_owners_only(example):
    _, run = example
    private = run / "private"
    assert private.stat().st_mode & 0o777 == 0o700
    for name in ("sensitive.npz", "test.npz"):
        assert (private / name).stat().st_mode & 0o777 == 0o600
    model = PrivImage.load(run)
    assert Path(model.cfg.data.sensitive) == (private / "sensitive.npz").absolute()
    assert Path(model.cfg.data.sensitive_test) == (private / "test.npz").absolute()


def test_a_refit_reuses_the_same_data_and_refuses_other_data(example):
    namespace, run = example
    mnist, train = namespace["mnist"], namespace["train"]
    ledger = (run / "privacy.json").read_bytes()
    model = PrivImage.load(run)
    results = []
    model.run(model.pipeline.stages()[:3], on_stage=results.append)
    assert all(r.skipped for r in results)
    other = mnist.images[train].copy()
    other[0] = 255 - other[0]  # one image changed
    with pytest.raises(UserError, match="spent privacy on other data"):
        model.fit(other, mnist.labels[train], class_names=mnist.class_names)
    with pytest.raises(UserError, match="other 'data' settings"):
        PrivImage.load(run).fit("mnist")
    assert (run / "privacy.json").read_bytes() == ledger


def test_sampling_needs_only_the_shareable_files(example, tmp_path):
    """sample() loaded the sensitive set and the split key for the class names: a copy of the shareable
    files alone could not sample."""
    from privimage.rundir import SHAREABLE, classify

    _, run = example
    shared = tmp_path / "shared"
    for path in run.rglob("*"):
        if path.is_file() and classify(path.relative_to(run)) == SHAREABLE:
            (shared / path.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
            (shared / path.relative_to(run)).write_bytes(path.read_bytes())
    assert not (shared / "private").exists()
    images, labels = PrivImage.load(shared).sample(4, labels=["7"] * 4, seed=3)
    assert np.array_equal(images, PrivImage.load(run).sample(4, labels=[7] * 4, seed=3)[0])
    assert labels.tolist() == [7] * 4


def test_fit_plans_with_minutes_and_a_second_fit_changes_nothing(tmp_path, cache_dir, monkeypatch):
    """fit on arrays planned `minutes` on a scratch pipeline and dropped the plan: the run pretrained the
    configured steps, and a second fit planned anew, rewrote config.yaml and pretrained more."""
    from omegaconf import OmegaConf

    from privimage.data import load_dataset
    from privimage.pipeline import Pipeline, StageResult

    monkeypatch.setenv("PRIVIMAGE_CACHE", str(cache_dir))
    ran = []

    def run_stage(self, stage, force=False):  # the plan alone: no stage runs
        ran.append(stage)
        return StageResult(stage, skipped=True, seconds=0.0)

    monkeypatch.setattr(Pipeline, "run_stage", run_stage)
    digits = load_dataset("mnist")
    images, labels = digits.images[:2000], digits.labels[:2000]

    def planned() -> PrivImage:  # a small evaluation, so that a loaded machine's probe leaves training time
        return PrivImage(preset="quick", out=tmp_path / "r", minutes=30, sample__n=20, evaluate__classifier_epochs=1)

    planned().fit(images, labels)
    plan = json.loads((tmp_path / "r" / "plan.json").read_text())
    saved = OmegaConf.load(tmp_path / "r" / "config.yaml")
    assert (saved.pretrain.steps, saved.finetune.steps) == (plan["pretrain_steps"], plan["finetune_steps"])
    before = snapshot(tmp_path / "r")
    planned().fit(images, labels)
    assert snapshot(tmp_path / "r") == before
    assert ran == ["semantics", "warmstart", "pretrain", "finetune"] * 2


def test_sample_to_folder(example, tmp_path):
    _, run = example
    folder = PrivImage.load(run).sample_to_folder(tmp_path / "digits", 20, seed=0)
    assert sorted(p.name for p in folder.iterdir()) == [str(d) for d in range(10)]
    assert all(len(list((folder / str(d)).glob("*.png"))) == 2 for d in range(10))
    with pytest.raises(UserError, match="not an empty folder"):
        PrivImage.load(run).sample_to_folder(folder, 5)


def test_keywords_map_onto_config_keys_with_the_cli_messages(tmp_path):
    model = PrivImage(epsilon=3, public="public-mix", preset="quick", out=tmp_path / "r", minutes=4,
                      finetune__steps=60, sample__guidance=2.0)
    cfg = model.cfg
    assert (cfg.privacy.epsilon, cfg.data.public, cfg.minutes, cfg.finetune.steps, cfg.sample.guidance) == (
        3, "public-mix", 4, 60, 2.0)
    assert PrivImage(preset="quick", out=tmp_path / "r").cfg.data.public == "glyphs"  # None keeps the preset's
    for kwargs, words in (({"epsilon": -1}, "privacy.epsilon must be a number > 0"),
                          ({"minutes": 0}, "minutes must be a number"),
                          ({"no__such": 1}, "unknown config key 'no'"),
                          ({"preset": "nope"}, "unknown preset")):
        with pytest.raises(UserError, match=words):
            PrivImage(out=tmp_path / "r", **kwargs)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "images, labels, words",
    [
        (np.full((4, 8, 8), 1.5), [0, 1, 0, 1], "outside \\[0, 1\\]"),
        (np.zeros((4, 8, 8), np.int32), [0, 1, 0, 1], "int32"),
        (np.zeros((4, 3, 8, 8), np.uint8), [0, 1, 0, 1], "channels last"),
        (np.zeros((4, 8, 8), np.uint8), [0, 1, 0], "4 images but 3 labels"),
        (np.zeros((4, 8, 8), np.uint8), [0, 2, 0, 2], "class '1' has no images"),
    ],
)
def test_bad_arrays_are_refused_before_the_run_dir_exists(tmp_path, images, labels, words):
    with pytest.raises(UserError, match=words):
        PrivImage(preset="quick", out=tmp_path / "r").fit(images, labels)
    assert not (tmp_path / "r").exists()


def test_a_refused_budget_leaves_no_run_dir_and_no_staged_copy(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("PRIVIMAGE_CACHE", str(cache_dir))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    with pytest.raises(UserError, match="query_sigma"):
        PrivImage(epsilon=0.05, preset="quick", out=tmp_path / "r").fit(images, np.arange(40) % 2)
    assert not (tmp_path / "r").exists() and not list((tmp_path / "tmp").iterdir())


def test_sampling_before_fit_and_loading_a_non_run_are_refused(tmp_path):
    with pytest.raises(UserError, match="call fit"):
        PrivImage(preset="quick", out=tmp_path / "r").sample(5)
    with pytest.raises(UserError, match="not a privimage run directory"):
        PrivImage.load(tmp_path)


class Digits(torch.utils.data.Dataset):
    """A torchvision-style dataset: CHW float tensors in [0, 1] and int labels, with `classes`."""

    classes = ["zero", "one"]

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return torch.from_numpy(self.images[index]).permute(2, 0, 1).float() / 255, int(self.labels[index])


def test_a_torch_dataset_gives_the_arrays_it_holds():
    images = np.random.default_rng(0).integers(0, 256, (6, 10, 10, 1), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 1, 0])
    pixels, found, names = _labelled(Digits(images, labels), None, None, 28, 1)
    assert np.array_equal(pixels, images) and found.tolist() == labels.tolist() and names == ("zero", "one")


class Image_:  # the feature types of `datasets`, recognised by their class names
    pass


class ClassLabel:
    def __init__(self, names):
        self.names = names


Image_.__name__ = "Image"


class FakeHuggingFace:
    """Enough of a `datasets.Dataset`: column names, features, and column access by name."""

    def __init__(self, images, labels, names):
        self.columns = {"img": images, "fine_label": labels}
        self.column_names = list(self.columns)
        self.features = {"img": Image_(), "fine_label": ClassLabel(names)}

    def __getitem__(self, column):
        return self.columns[column]


def test_a_hugging_face_dataset_is_read_by_its_feature_types():
    sizes = [(12, 12), (20, 16), (12, 12)]
    photos = [Image.fromarray(np.full((h, w, 3), 60 * i, np.uint8)) for i, (h, w) in enumerate(sizes)]
    pixels, labels, names = _labelled(FakeHuggingFace(photos, [1, 0, 1], ["cat", "dog"]), None, None, 16, 1)
    assert pixels.shape == (3, 16, 16, 1) and pixels.dtype == np.uint8  # mixed sizes resized as folders are
    assert labels.tolist() == [1, 0, 1] and names == ("cat", "dog")
    assert pixels[2].min() == pixels[2].max() == np.asarray(photos[2].convert("L"))[0, 0]


def test_importing_privimage_does_not_import_torch():
    code = "import sys, privimage; assert 'torch' not in sys.modules and 'privimage.api' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr
    assert privimage.PrivImage is PrivImage and privimage.UserError is UserError  # resolved on first use


@pytest.mark.parametrize("command", ["run", "semantics", "pretrain", "finetune", "sample", "evaluate", "report"])
def test_cli_commands_go_through_the_api(tmp_path, monkeypatch, capsys, command):
    calls = []

    def run(self, stages=None, *, force=False, on_stage=None):
        calls.append((stages, self.cfg.minutes, self.out))
        raise UserError("reached the API")

    monkeypatch.setattr(PrivImage, "run", run)
    extra = ["--minutes", "5"] if command == "run" else []
    monkeypatch.setattr(sys, "argv", ["privimage", command, "--preset", "quick", "--out", str(tmp_path / "r"), *extra])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 3 and "reached the API" in capsys.readouterr().err
    assert calls == [(None if command == "run" else [command], 5 if command == "run" else None, tmp_path / "r")]


def test_evaluate_runs_the_measures_of_a_method_without_a_sample_stage(tmp_path, cache_dir, monkeypatch):
    """method=dpmerf draws its synthetic set in its own stage: evaluate() must not ask for `sample`."""
    monkeypatch.setenv("PRIVIMAGE_CACHE", str(cache_dir))
    model = PrivImage(out=tmp_path / "dpmerf", preset="quick", method="dpmerf", dpmerf__steps=2)
    model.fit("mnist")
    metrics = model.evaluate()
    assert 0.0 <= metrics["accuracy"]["cnn"] <= 1.0
    assert not (tmp_path / "dpmerf" / "report.html").exists()
