"""The Python API: `PrivImage(...).fit(data)`, then `sample(n)` as often as you like.

It follows the convention of synthetic-data libraries (SDV, SmartNoise): `fit` spends the privacy
budget once, through the same pipeline, run directory and ledger as `privimage run`; everything
after it (`sample`, `sample_to_folder`, `evaluate`, `report`) is post-processing. The command line
is a thin layer over this class.

    >>> import privimage
    >>> model = privimage.PrivImage(epsilon=10, out="runs/mine").fit(images, labels)  # doctest: +SKIP
    >>> synthetic_images, synthetic_labels = model.sample(1000)                        # doctest: +SKIP

Config keys beyond the named arguments are keyword arguments with `__` for the dots of their
path, as in scikit-learn's `set_params`: `finetune__steps=60` sets `finetune.steps`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
import torch.utils.data
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from privimage.checkpoint import load_checkpoint
from privimage.config import load_config
from privimage.data.checks import class_indices
from privimage.data.convert import UserArrays, labelled_arrays
from privimage.stages.registry import MODEL_MODULES
from privimage.synthetic import safe_folder_name
from privimage.errors import UserError
from privimage.pipeline import Pipeline, StageResult
from privimage.privacy.ledger import PrivacyLedger
from privimage.atomic import atomic_path, read_json
from privimage.rundir import RunDir

logger = logging.getLogger(__name__)

# What `fit` takes: an array of images, a torch Dataset of (image, label), a Hugging Face dataset,
# or a built-in name / folder / .npz path.
Data = Union[np.ndarray, torch.utils.data.Dataset, "datasets.Dataset", str, os.PathLike]

_DATA_FILES = {"sensitive": "sensitive.npz", "sensitive_test": "test.npz"}


class PrivImage:
    """A differentially private synthetic-image model in one run directory.

    `epsilon`, `delta`, `public` and `minutes` set `privacy.epsilon`, `privacy.delta`, `data.public` and
    `minutes`; `None` keeps the value of the preset (or of the run's saved config.yaml). `preset` is
    quick | default | paper; `None` reopens the run saved in `out` if there is one, else `default`.
    `config` is a YAML file of config keys. Any other config key is a keyword argument, dots written
    as `__`. Bad values raise `privimage.UserError` with the same one-line message as the CLI.

        >>> model = PrivImage(epsilon=1, preset="quick", out="runs/try", finetune__steps=4)  # doctest: +SKIP
    """

    def __init__(
        self,
        epsilon: float | None = None,
        delta: float | None = None,
        public: str | None = None,
        preset: str | None = None,
        out: str | os.PathLike = "runs/default",
        minutes: float | None = None,
        config: str | os.PathLike | None = None,
        **overrides: Any,
    ):
        named = {"privacy.epsilon": epsilon, "privacy.delta": delta, "data.public": public, "minutes": minutes}
        keys = {key: value for key, value in named.items() if value is not None}
        keys |= {name.replace("__", "."): value for name, value in overrides.items()}
        out = Path(out).absolute()  # a notebook may change directory later
        self._use(load_config(preset, config, keys, saved=out / "config.yaml"), out)

    @classmethod
    def from_config(cls, cfg: DictConfig, out: str | os.PathLike, split_key: bytes | None = None) -> "PrivImage":
        """A model for a config resolved elsewhere (`privimage.config.load_config`, the CLI).

            >>> PrivImage.from_config(load_config("quick", overrides=["sample.n=50"]), "runs/q")  # doctest: +SKIP
        """
        model = cls.__new__(cls)
        model._use(cfg, Path(out), split_key=split_key)
        return model

    @classmethod
    def load(cls, out: str | os.PathLike, **overrides: Any) -> "PrivImage":
        """Reopen a run directory with its saved config, e.g. to sample from it without refitting.

            >>> images, labels = PrivImage.load("runs/mine").sample(100)  # doctest: +SKIP
        """
        out = Path(out).absolute()
        if not (out / "config.yaml").is_file():
            raise UserError(f"{out} is not a privimage run directory (no config.yaml): give the out= of a fitted run")
        keys = {name.replace("__", "."): value for name, value in overrides.items()}
        return cls.from_config(load_config(overrides=keys, saved=out / "config.yaml"), out)

    def _use(self, cfg: DictConfig, out: Path, pending: dict[str, UserArrays] | None = None,
             split_key: bytes | None = None) -> None:
        self.cfg, self.out = cfg, out
        self.pipeline = Pipeline(cfg, out, split_key)  # touches nothing on disk until a stage runs
        self._pending = pending or {}  # in-memory data for data.<key>, written into private/ by the first run
        self._validated = False
        self._draw: Callable | None = None  # the fitted model's sampler, loaded once

    def __repr__(self) -> str:
        return f"PrivImage(out={str(self.out)!r}, method={self.cfg.method}, epsilon={self.cfg.privacy.epsilon:g})"

    # -- running stages ----------------------------------------------------------------------------
    def validate(self) -> "PrivImage":
        """Check config, data, budget and run directory, touching nothing on disk (bad input: UserError).

            >>> PrivImage(epsilon=0.01, preset="quick", out="runs/q").validate()  # doctest: +SKIP
            privimage.errors.UserError: the semantics release alone spends ε=0.375 of the target 0.01: ...
        """
        if self._pending:  # data not yet in the run directory: check a copy of it in a private scratch folder
            with tempfile.TemporaryDirectory(prefix="privimage-fit-") as scratch:
                staged = {key: str(Path(scratch) / Path(self.cfg.data[key]).name) for key in self._pending}
                for key, data in self._pending.items():
                    _write_private_npz(Path(staged[key]), data)
                checked = Pipeline(_with_data_keys(self.cfg, staged), self.out, self.pipeline.split_key).validate()
            # Its plan (`minutes`) holds for the run directory's copy of the same data, split by the same key.
            self.pipeline.plan = checked.plan
            self.pipeline.cfg = _with_data_keys(checked.cfg, {key: self.cfg.data[key] for key in self._pending})
        else:
            self.pipeline.validate()
        self._validated = True
        return self

    def run(
        self,
        stages: Sequence[str] | None = None,
        *,
        force: bool = False,
        on_stage: Callable[[StageResult], None] | None = None,
    ) -> list[StageResult]:
        """Run `stages` in order (all, by default) as `privimage run` / `privimage <stage>` do.

        Every check that can refuse runs before the run directory is created; stages that are up to
        date are skipped.

            >>> PrivImage(preset="quick", out="runs/q").run()  # doctest: +SKIP
        """
        report = on_stage or _log_stage
        pipeline = self._open(stages, force)
        try:  # the run directory stays locked while its stages run, and no longer
            if stages is None:
                return pipeline.run_all(report)
            results = []
            for stage in stages:
                results.append(pipeline.run_stage(stage, force=force))
                report(results[-1])
            return results
        finally:
            pipeline.close()

    def _open(self, stages: Sequence[str] | None, force: bool) -> Pipeline:
        """Validate (once), refuse a stage whose inputs are missing, then create the run directory (which
        refuses to redo a released stage of `stages`)."""
        if not self._validated:
            self.validate()
        if stages:
            self.pipeline.check_runnable(stages[0])
        existed = self.out.exists()
        self.pipeline.create(stages, force)
        try:  # after create(), which refuses a directory that holds files but no run
            for key, data in self._pending.items():
                _write_private_npz(Path(self.cfg.data[key]), data)
        except BaseException:
            if not existed:
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        self._pending = {}
        return self.pipeline

    # -- fit: the only method that spends privacy --------------------------------------------------
    def fit(
        self,
        images: Data,
        labels: Sequence | np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
        test: Data | tuple | None = None,
    ) -> "PrivImage":
        """Spend the privacy budget: run the pipeline on `images` up to and including DP fine-tuning.

        `images` is a uint8 array N×H×W[×C] (or floats in [0, 1]) with `labels` (integers 0..K-1 or
        class names; none: one unlabelled class), a torch Dataset of (image, label) pairs (CHW float
        tensors or HWC arrays), a Hugging Face dataset (its columns found as for `data.sensitive`), or a built-in
        name / folder / .npz path (`data.sensitive`). `test` is a held-out test set for `evaluate`, in
        the same forms (arrays as an `(images, labels)` tuple); without it a fixed split is held out.
        In-memory data is copied once into the run directory's private/ folder. A run directory that
        has spent privacy on other data refuses to fit again: use a new `out`.

            >>> model = PrivImage(epsilon=10, out="runs/mine").fit(x_train, y_train)  # doctest: +SKIP
        """
        d = self.cfg.data
        train = _labelled(images, labels, class_names, d.resolution, d.channels)
        data = {"sensitive": train}
        if test is not None:
            names = train[2] if isinstance(train, tuple) else None
            data["sensitive_test"] = _labelled(*_test_parts(test, names), d.resolution, d.channels)
        self._with_data(data)
        stages = self.pipeline.stages()
        self.run(stages[: stages.index(self.pipeline.method.model_stage) + 1])
        return self

    def _with_data(self, data: dict[str, str | UserArrays]) -> None:
        """Point `data.*` at the given data; in-memory sets become files in private/ (0700) at the first run."""
        private = RunDir(self.out).private.absolute()  # config.yaml finds them from any working directory
        in_memory = {key: value for key, value in data.items() if isinstance(value, tuple)}
        cfg = _with_data_keys(self.cfg, {key: str(private / _DATA_FILES[key]) if key in in_memory else value
                                         for key, value in data.items()})
        if not (self.out / "config.yaml").exists():
            self._use(cfg, self.out, pending=in_memory)
            return
        for key, arrays in in_memory.items():  # the same path in config.yaml: compare what it holds
            if not _same_data(private / _DATA_FILES[key], arrays):
                raise UserError(f"run directory {self.out} has spent privacy on other data: use a new out= for new data")
        self._use(cfg, self.out)  # run() validates it, refusing other data.* of a saved run

    # -- post-processing: no privacy cost ----------------------------------------------------------
    @property
    def privacy_spent(self) -> dict:
        """The ledger's composed ε and δ, with the ε of each stage alone.

            >>> model.privacy_spent  # doctest: +SKIP
            {'epsilon': 9.95, 'delta': 1e-05, 'stages': {'semantics': 0.375, 'finetune': 9.94}, ...}
        """
        ledger_file = self.pipeline.run.ledger
        if not ledger_file.exists():
            target = {"epsilon": float(self.cfg.privacy.epsilon), "delta": float(self.cfg.privacy.delta)}
            return {"epsilon": 0.0, "delta": 0.0, "stages": {}, "target": target, "accountant": self.cfg.privacy.accountant}
        ledger = PrivacyLedger.read(ledger_file)
        return {"epsilon": ledger.spent_epsilon(), "delta": ledger.target_delta if ledger.entries else 0.0,
                "stages": ledger.epsilon_by_stage(),
                "target": {"epsilon": ledger.target_epsilon, "delta": ledger.target_delta},
                "accountant": ledger.accountant}

    @property
    def class_names(self) -> tuple[str, ...]:
        """The sensitive classes, in label order: `sample`'s labels index them. A fitted model's file holds
        them (shareable: the classes are public, like N), so sampling needs no sensitive data.

            >>> PrivImage.load("runs/mine").class_names  # doctest: +SKIP
            ('0', '1', '2', '3', '4', '5', '6', '7', '8', '9')
        """
        model = MODEL_MODULES[self.pipeline.method.model_stage].model_file(self.pipeline.run)
        if model.is_file():
            names = load_checkpoint(model, tensors=False)[1].get("class_names")
            if names is not None:
                return tuple(names)
        return self.pipeline.sensitive_train.class_names  # not fitted, or fitted before models held their classes

    def sample(
        self, n: int, labels: Sequence | np.ndarray | None = None, *, seed: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`n` synthetic images (uint8 N×H×W×C) and their labels (int64), from the fine-tuned model.

        Sampling reads no sensitive data, so it costs no privacy and may be called any number of
        times. `labels` (class indices or names, one per image) picks the classes; by default they
        cycle through all classes. `seed` makes the draw reproducible; by default every call differs.

            >>> images, labels = PrivImage.load("runs/mine").sample(10, labels=["7"] * 10)  # doctest: +SKIP
        """
        self._require_fitted()
        names = self.class_names
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise UserError(f"n must be an integer >= 1 (got {n!r})")
        wanted = np.arange(n) % len(names) if labels is None else class_indices(labels, names, n)
        device = self.pipeline.device
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # a fresh draw each call
        else:
            generator.manual_seed(seed)
        return self._sampler()(torch.as_tensor(wanted), generator), wanted.astype(np.int64)

    def sample_to_folder(self, path: str | os.PathLike, n: int, *, seed: int | None = None) -> Path:
        """Write `n` synthetic images as PNGs, one subfolder per class, into a new or empty folder.

            >>> PrivImage.load("runs/mine").sample_to_folder("synthetic_digits", 5000)  # doctest: +SKIP
        """
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"{path} exists and is not an empty folder: choose a new folder for the images")
        images, labels = self.sample(n, seed=seed)
        folders = [path / safe_folder_name(name) for name in self.class_names]
        for index, (image, label) in enumerate(zip(images, labels)):
            folders[label].mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folders[label] / f"{index:06d}.png")
        return path

    def evaluate(self) -> dict:
        """Sample `sample.n` images (the run's synthetic.npz) if not done, then measure them: metrics.json.

        The metrics read the real test split: they are for the data owner, outside the guarantee.

            >>> PrivImage.load("runs/mine").evaluate()["accuracy"]  # doctest: +SKIP
        """
        self._require_fitted()
        self.run(list(self.pipeline.method.stages_to_measure))
        return read_json(self.pipeline.run.metrics)

    def report(self) -> Path:
        """Write report.html (config, ledger, semantics, samples, metrics) and return its path.

            >>> PrivImage.load("runs/mine").report()  # doctest: +SKIP
        """
        self._require_fitted()
        self.run(list(self.pipeline.method.stages_after_model))
        return self.pipeline.run.report

    def _require_fitted(self) -> None:
        if not self.pipeline.is_done(self.pipeline.method.model_stage):
            raise UserError(f"{self.out} holds no fine-tuned model for this config: call fit(...) first, "
                            "or PrivImage.load(out) a fitted run")

    def _sampler(self) -> Callable:
        if self._draw is None:
            model = MODEL_MODULES[self.pipeline.method.model_stage]
            self._draw = model.sampler(self.cfg, self.pipeline.run, self.class_names, self.pipeline.device)
        return self._draw


def _log_stage(result: StageResult) -> None:
    logger.info("%s: %s", result.stage, "up to date, skipped" if result.skipped else f"done in {result.seconds:.0f}s")


def _with_data_keys(cfg: DictConfig, data: dict[str, str]) -> DictConfig:
    cfg = cfg.copy()
    for key, spec in data.items():
        OmegaConf.update(cfg, f"data.{key}", spec)
    return cfg


# -- in-memory data -> arrays (data/convert.py) ----------------------------------------------------
def _labelled(
    images: Data, labels: Any, class_names: Sequence[str] | None, resolution: int, channels: int
) -> str | UserArrays:
    """A path or built-in name as it is; any in-memory form as (uint8 N×H×W×C, int64 labels, names)."""
    if isinstance(images, (str, os.PathLike)):
        if labels is not None or class_names is not None:
            raise UserError("labels= and class_names= go with in-memory images: a folder or .npz carries its own")
        return str(images)
    return labelled_arrays(images, labels, class_names, resolution, channels)


def _test_parts(test: Any, train_names: tuple[str, ...] | None) -> tuple[Any, Any, Any]:
    """`test` as (images, labels, class_names); arrays come as a tuple and share the training names."""
    if isinstance(test, tuple):
        if len(test) not in (2, 3):
            raise UserError("test= as a tuple is (images, labels) or (images, labels, class_names)")
        return test[0], test[1], test[2] if len(test) == 3 else train_names
    return test, None, None


def _write_private_npz(path: Path, data: UserArrays) -> None:
    """Write atomically, readable by the owner alone (0600): these are the sensitive images."""
    images, labels, names = data
    arrays = {"images": images, "labels": labels} | ({"class_names": np.array(names)} if names else {})
    with atomic_path(path, private=True) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def _same_data(path: Path, data: UserArrays) -> bool:
    """Whether `path` holds exactly these arrays (a missing file holds none)."""
    if not path.is_file():
        return False
    images, labels, names = data
    with np.load(path, allow_pickle=False) as stored:
        stored_names = tuple(str(x) for x in stored["class_names"]) if "class_names" in stored.files else None
        return (stored_names == (tuple(names) if names else None) and np.array_equal(stored["labels"], labels)
                and stored["images"].shape == images.shape and np.array_equal(stored["images"], images))
