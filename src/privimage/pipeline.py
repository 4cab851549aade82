"""The pipeline: stages, their artifacts, and when a stage is up to date.

Each stage writes its artifacts into the run directory and then a marker `stages/<stage>.json`
holding a fingerprint of everything it depends on (its config sections and its upstream stages'
fingerprints). A stage whose marker matches is skipped; changing `sample.n` reruns sampling and
what follows, never the privacy-spending stages before it.

Everything that can be wrong with the input (config, data, budget) is checked by `Pipeline.open`
before the run directory is touched, so a bad input never leaves a half-made run behind.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from privimage import distributed
from privimage.config import fingerprint, to_yaml
from privimage.data import ImageDataset, default_cache_dir, load_dataset, load_sensitive
from privimage.diffusion.synthesize import generate, write_synthetic
from privimage.diffusion.train import MODEL_FILE, finetune, load_denoiser, plan_finetune, pretrain
from privimage.evaluation.stage import run_evaluation
from privimage.errors import UserError
from privimage.privacy.accountant import Mechanism
from privimage.privacy.ledger import PrivacyLedger
from privimage.report.html import write_report
from privimage.rundir import RunDir, atomic_path, read_json, write_json, write_text
from privimage.runtime import noise_generator, resolve_device
from privimage.semantics.stage import pretraining_set, query_mechanism, run_semantics

logger = logging.getLogger(__name__)

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
        self._marker_notes: dict[str, dict] = {}  # extra facts a stage records in its marker

    def validate(self) -> "Pipeline":
        """Check the run directory, the data and the budget; touches nothing on disk."""
        weights = self.cfg.evaluate.fid_weights
        if self.cfg.evaluate.fid and weights is not None and not Path(weights).is_file():
            raise UserError(f"evaluate.fid_weights={weights} is not a file: give a TorchScript Inception-v3 or null")
        if self.cfg.privacy.secure_rng:
            noise_generator(secure=True)  # refuses early when torchcsprng is missing
        self._check_existing_run()
        self.sensitive_train, self.sensitive_test  # noqa: B018 -- load (and validate) the data now
        if self.cfg.method != "dpdm":
            self.public  # noqa: B018
        self.planned_mechanisms()  # refuses a budget too small to train
        return self

    @classmethod
    def open(cls, cfg: DictConfig, out: str | Path) -> "Pipeline":
        """Validate everything, then create (or reopen) the run directory and its ledger."""
        return cls(cfg, Path(out)).validate().create()

    def create(self) -> "Pipeline":
        """Create (or reopen) the run directory, its config.yaml and its ledger."""
        created = not self.run.root.exists()
        privacy = self.cfg.privacy
        if distributed.is_main():
            try:
                self.run.create()
                write_text(self.run.config, to_yaml(self.cfg))
                self.ledger = PrivacyLedger.open(self.run.ledger, privacy.epsilon, privacy.delta, privacy.accountant)
            except BaseException:
                if created:
                    shutil.rmtree(self.run.root, ignore_errors=True)
                raise
        distributed.barrier()  # under torchrun the other ranks read what rank 0 made
        if not distributed.is_main():
            self.ledger = PrivacyLedger.open(self.run.ledger, privacy.epsilon, privacy.delta, privacy.accountant)
        return self

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
                            glyph_samples=d.glyph_samples, seed=0, convert=True)

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

    def check_runnable(self, stage: str) -> None:
        """Refuse a stage that is not part of the method or whose upstream stages are not done."""
        if stage not in self.stages():
            raise UserError(f"stage '{stage}' is not part of method={self.cfg.method}: stages are {', '.join(self.stages())}")
        for earlier in self.stages()[: self.stages().index(stage)]:
            if not self.is_done(earlier):
                raise UserError(f"stage '{stage}' needs '{earlier}' first: run `privimage {earlier} --out {self.run.root}` "
                                f"or `privimage run --out {self.run.root}`")

    def run_stage(self, stage: str, force: bool = False) -> StageResult:
        if not force and stage in self.stages() and self.is_done(stage):
            return StageResult(stage, skipped=True, seconds=0.0)
        self.check_runnable(stage)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        self._stage_functions()[stage]()
        seconds = time.perf_counter() - started
        if distributed.is_main():
            marker = {"fingerprint": self.stage_fingerprint(stage), "seconds": seconds,
                      **self._marker_notes.pop(stage, {})}
            if on_gpu:
                marker["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            write_json(self.run.stages / f"{stage}.json", marker)
        distributed.barrier()
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
                      self.cache_dir, self.device, release=self.stage_fingerprint("semantics"))

    def pretraining_data(self) -> ImageDataset:
        """privimage: the selected public semantics, relabelled; pdp: all public data, unconditional."""
        names = self.sensitive_train.class_names
        if self.cfg.method == "privimage":
            return pretraining_set(self.public, read_json(self.run.semantics)["selected"], names)
        null_labels = np.full(len(self.public), len(names), dtype=np.int64)  # the label-dropout class
        return ImageDataset(self.public.images, null_labels, (*names, "<unconditional>"), name=self.public.name)

    def _pretrain(self) -> None:
        """Pretrain, or reuse the model an earlier run pretrained on the same images with the same settings.

        Pretraining sees only public images (chosen, for privimage, by the noisy selection), so its model
        may be shared across runs: runs at several ε (`privimage bench`) pretrain once.
        """
        data, num_classes = self.pretraining_data(), self.sensitive_train.num_classes
        key = fingerprint(data.fingerprint(), self.cfg.model, self.cfg.pretrain, self.cfg.seed, num_classes,
                          self.cfg.data.resolution, self.cfg.data.channels)
        cached = self.cache_dir / "pretrained" / f"{key}.safetensors"
        model = self.run.pretrain_dir / MODEL_FILE
        if distributed.broadcast(cached.is_file()):
            if distributed.is_main():
                logger.info("pretrain: reusing %s (same public images and settings)", cached)
                _copy(cached, model)
            distributed.barrier()
            self._marker_notes["pretrain"] = {"reused_cached_model": True}
            return
        pretrain(self.cfg, self.run, data, num_classes, self.device)
        if distributed.is_main():
            try:
                _copy(model, cached)
            except OSError as error:
                logger.warning("could not cache the pretrained model in %s (%s)", cached.parent, error)

    def _finetune(self) -> None:
        pretrained = self.run.pretrain_dir / MODEL_FILE if "pretrain" in self.stages() else None
        finetune(self.cfg, self.run, self.ledger, self.sensitive_train, pretrained, self.device,
                 release=self.stage_fingerprint("finetune"))

    def _sample(self) -> None:
        names = self.sensitive_train.class_names
        net = load_denoiser(self.cfg, len(names), self.run.finetune_dir / MODEL_FILE, self.device)
        with torch.inference_mode():
            data = generate(net, names, self.cfg.sample.n, self.cfg, self.device)
        if distributed.is_main():
            write_synthetic(self.run, data)

    def _evaluate(self) -> None:
        """Rank 0 alone: evaluation is cheap next to training."""
        if distributed.is_main():
            run_evaluation(self.cfg, self.run, self.sensitive_train, self.sensitive_test, self.cache_dir, self.device)

    def _report(self) -> None:
        if distributed.is_main():
            public = self.public if self.cfg.method == "privimage" else None
            write_report(self.cfg, self.run, public, self.sensitive_test)


def _copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
