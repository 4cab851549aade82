"""The pipeline: stages, their artifacts, and when a stage is up to date.

Each stage writes its artifacts into the run directory and then a marker `stages/<stage>.json`
holding a fingerprint of everything it depends on (its config sections and its upstream stages'
fingerprints). A stage whose marker matches is skipped; changing `sample.n` reruns sampling and
what follows, never the privacy-spending stages before it.

Everything that can be wrong with the input (config, data, budget) is checked by `Pipeline.open`
before the run directory is touched, so a bad input never leaves a half-made run behind.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from privimage.config import fingerprint, to_yaml
from privimage.data import ImageDataset, default_cache_dir, load_dataset, load_sensitive
from privimage.diffusion.synthesize import generate, write_synthetic
from privimage.diffusion.train import MODEL_FILE, finetune, load_denoiser, plan_finetune, pretrain
from privimage.evaluation.stage import run_evaluation
from privimage.errors import UserError
from privimage.privacy.accountant import Mechanism
from privimage.privacy.ledger import PrivacyLedger
from privimage.report.html import write_report
from privimage.rundir import RunDir, read_json, write_json, write_text
from privimage.runtime import resolve_device
from privimage.semantics.stage import pretraining_set, query_mechanism, run_semantics

STAGES = ("semantics", "pretrain", "finetune", "sample", "evaluate", "report")

# The config sections each stage reads, beyond its upstream stages.
_STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "semantics": ("data", "semantics", "seed", "method"),
    "pretrain": ("model", "pretrain"),
    "finetune": ("finetune", "privacy"),
    "sample": ("sample",),
    "evaluate": ("evaluate",),
    "report": (),
}
# Settings that, once a run directory has spent privacy, may not change under it.
_FROZEN_KEYS = ("privacy", "data")


@dataclass
class StageResult:
    stage: str
    skipped: bool
    seconds: float


class Pipeline:
    """A run directory plus the data and ledger its stages share."""

    def __init__(self, cfg: DictConfig, out: Path):
        self.cfg = cfg
        self.run = RunDir(out)
        self.device = resolve_device(cfg.device)
        self.cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()

    @classmethod
    def open(cls, cfg: DictConfig, out: str | Path) -> "Pipeline":
        """Validate everything, then create (or reopen) the run directory and its ledger."""
        pipeline = cls(cfg, Path(out))
        pipeline._check_existing_run()
        pipeline.sensitive_train, pipeline.sensitive_test  # noqa: B018 -- load (and validate) the data now
        if cfg.method != "dpdm":
            pipeline.public  # noqa: B018
        pipeline.planned_mechanisms()  # refuses a budget too small to train
        created = not pipeline.run.root.exists()
        try:
            pipeline.run.create()
            write_text(pipeline.run.config, to_yaml(cfg))
            pipeline.ledger = PrivacyLedger.open(
                pipeline.run.ledger, cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.accountant
            )
        except BaseException:
            if created:
                shutil.rmtree(pipeline.run.root, ignore_errors=True)
            raise
        return pipeline

    def _check_existing_run(self) -> None:
        if not self.run.config.exists():
            if self.run.root.exists() and any(self.run.root.iterdir()):
                raise UserError(f"{self.run.root} exists and is not a privimage run directory: choose another --out")
            return
        saved = OmegaConf.load(self.run.config)
        for key in _FROZEN_KEYS:
            if fingerprint(saved.get(key)) != fingerprint(self.cfg[key]):
                raise UserError(
                    f"run directory {self.run.root} was made with other '{key}' settings and has spent privacy "
                    "on them: use a new --out for new settings"
                )

    # -- data ---------------------------------------------------------------------------------
    @cached_property
    def _sensitive(self) -> tuple[ImageDataset, ImageDataset]:
        d = self.cfg.data
        return load_sensitive(d.sensitive, resolution=d.resolution, channels=d.channels,
                              test_fraction=d.test_fraction, test_spec=d.sensitive_test, cache_dir=self.cache_dir)

    @property
    def sensitive_train(self) -> ImageDataset:
        return self._sensitive[0]

    @property
    def sensitive_test(self) -> ImageDataset:
        return self._sensitive[1]

    @cached_property
    def public(self) -> ImageDataset:
        d = self.cfg.data
        return load_dataset(d.public, resolution=d.resolution, channels=d.channels, cache_dir=self.cache_dir,
                            glyph_samples=d.glyph_samples, seed=0)

    # -- privacy plan ---------------------------------------------------------------------------
    def planned_mechanisms(self) -> list[Mechanism]:
        """Every mechanism the run will apply, DP-SGD's σ calibrated so the composition meets the target."""
        fixed = [query_mechanism(self.cfg)] if self.cfg.method == "privimage" else []
        return fixed + [plan_finetune(self.cfg, len(self.sensitive_train), fixed)]

    # -- stages ----------------------------------------------------------------------------------
    def stages(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if not (s == "semantics" and self.cfg.method != "privimage")
                     and not (s == "pretrain" and self.cfg.method == "dpdm"))

    def stage_fingerprint(self, stage: str) -> str:
        upstream = [self.stage_fingerprint(s) for s in self.stages()[: self.stages().index(stage)]]
        return fingerprint(upstream, [self.cfg[k] if k in self.cfg else None for k in _STAGE_KEYS[stage]],
                           self.cfg.data, self.cfg.method)

    def is_done(self, stage: str) -> bool:
        marker = self.run.stages / f"{stage}.json"
        return marker.exists() and read_json(marker)["fingerprint"] == self.stage_fingerprint(stage)

    def run_stage(self, stage: str, force: bool = False) -> StageResult:
        if stage not in self.stages():
            raise UserError(f"stage '{stage}' is not part of method={self.cfg.method}: stages are {', '.join(self.stages())}")
        if not force and self.is_done(stage):
            return StageResult(stage, skipped=True, seconds=0.0)
        for earlier in self.stages()[: self.stages().index(stage)]:
            if not self.is_done(earlier):
                raise UserError(f"stage '{stage}' needs '{earlier}' first: run `privimage {earlier} --out {self.run.root}` "
                                f"or `privimage run --out {self.run.root}`")
        started = time.perf_counter()
        self._stage_functions()[stage]()
        seconds = time.perf_counter() - started
        write_json(self.run.stages / f"{stage}.json", {"fingerprint": self.stage_fingerprint(stage), "seconds": seconds})
        return StageResult(stage, skipped=False, seconds=seconds)

    def run_all(self, on_stage: Callable[[StageResult], None] = lambda r: None) -> list[StageResult]:
        results = []
        for stage in self.stages():
            results.append(self.run_stage(stage))
            on_stage(results[-1])
        return results

    def _stage_functions(self) -> dict[str, Callable[[], None]]:
        return {
            "semantics": self._semantics,
            "pretrain": self._pretrain,
            "finetune": self._finetune,
            "sample": self._sample,
            "evaluate": self._evaluate,
            "report": self._report,
        }

    def _semantics(self) -> None:
        run_semantics(self.cfg, self.run, self.ledger, self.sensitive_train, self.sensitive_test, self.public,
                      self.cache_dir, self.device)

    def pretraining_data(self) -> ImageDataset:
        """privimage: the selected public semantics, relabelled; pdp: all public data, unconditional."""
        names = self.sensitive_train.class_names
        if self.cfg.method == "privimage":
            return pretraining_set(self.public, read_json(self.run.semantics)["selected"], names)
        null_labels = np.full(len(self.public), len(names), dtype=np.int64)
        return ImageDataset(self.public.images, null_labels, names, name=self.public.name)

    def _pretrain(self) -> None:
        pretrain(self.cfg, self.run, self.pretraining_data(), self.sensitive_train.num_classes, self.device)

    def _finetune(self) -> None:
        pretrained = self.run.pretrain_dir / MODEL_FILE if "pretrain" in self.stages() else None
        finetune(self.cfg, self.run, self.ledger, self.sensitive_train, pretrained, self.device)

    def _sample(self) -> None:
        names = self.sensitive_train.class_names
        net = load_denoiser(self.cfg, len(names), self.run.finetune_dir / MODEL_FILE, self.device)
        with torch.inference_mode():
            data = generate(net, names, self.cfg.sample.n, self.cfg, self.device)
        write_synthetic(self.run, data)

    def _evaluate(self) -> None:
        run_evaluation(self.cfg, self.run, self.sensitive_train, self.sensitive_test, self.cache_dir, self.device)

    def _report(self) -> None:
        public = self.public if self.cfg.method == "privimage" else None
        write_report(self.cfg, self.run, public, self.sensitive_test)
