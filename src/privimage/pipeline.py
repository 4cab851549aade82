"""The pipeline: stages, their artifacts, and when a stage is up to date.

Each stage writes its artifacts into the run directory and then a marker `stages/<stage>.json`
holding a fingerprint of everything it depends on (its config sections and its upstream stages'
fingerprints). A stage whose marker matches is skipped; changing `sample.n` reruns sampling and
what follows, never the privacy-spending stages before it.

Everything that can be wrong with the input (config, data, budget) is checked by `Pipeline.validate`
before `create` touches the run directory, so a bad input never leaves a half-made run behind.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from privimage import distributed
from privimage.atomic import read_json, remove_interrupted_writes, write_bytes, write_json, write_text
from privimage.config import fingerprint, to_yaml
from privimage.data import ImageDataset, default_cache_dir, load_dataset, load_sensitive
from privimage.errors import UserError
from privimage.methods import METHODS, STAGE_TABLE, Method
from privimage.planning import BudgetClock, Plan, classifier_throughput, make_plan, probe, replan_pretraining
from privimage.privacy.accountant import Mechanism
from privimage.privacy.ledger import PrivacyLedger
from privimage.privacy.plan import PlannedRelease, plan_releases
from privimage.rundir import RunDir
from privimage.runtime import dp_noise_source, resolve_device
from privimage.stages import warmstart
from privimage.stages.pretrain import label_rows
from privimage.stages.registry import RELEASE_MODULES, STAGE_MODULES
from privimage.stages.semantics import semantic_classifier_is_cached

logger = logging.getLogger(__name__)

SPLIT_KEY_BYTES = 32
TIMINGS_FILE = "timings.json"  # in private/: each stage's measured seconds
# Settings that, once a run directory has spent privacy, may not change under it.
_FROZEN_KEYS = ("privacy", "data")


@dataclass
class StageResult:
    stage: str
    skipped: bool
    seconds: float


class Pipeline:
    """A run directory plus the data and ledger its stages share."""

    def __init__(self, cfg: DictConfig, out: Path, split_key: bytes | None = None):
        """`split_key` is the split key for a new run directory (runs that must share a split); an
        existing directory keeps its own."""
        self.cfg = METHODS[cfg.method].configure(cfg)
        self._new_split_key = split_key
        self.run = RunDir(out)
        self.device = resolve_device(cfg.device)
        self.cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
        self._marker_notes: dict[str, dict] = {}  # extra facts a stage records in its marker
        self.clock = BudgetClock(cfg.minutes)  # `minutes` counts from here (planning.BudgetClock)
        self.plan: Plan | None = None

    def validate(self) -> "Pipeline":
        """Check the run directory, the data and the budget; touches nothing on disk."""
        weights = self.cfg.evaluate.fid_weights
        if self.cfg.evaluate.fid and weights is not None and not Path(weights).is_file():
            raise UserError(f"evaluate.fid_weights={weights} is not a file: give a TorchScript Inception-v3 or null")
        if self.cfg.privacy.secure_rng:
            dp_noise_source(secure=True)  # refuses early when torchcsprng is missing
        self._check_existing_run()
        if self.method.uses_public_data:
            self._check_public_is_not_sensitive()
        self.sensitive_train, self.sensitive_test  # noqa: B018 -- load (and validate) the data now
        self._check_delta()
        if self.method.uses_public_data:
            self.public  # noqa: B018
        if self.method.queries_semantics:
            self._check_selection_fits()
        if self.method.pretrains_on_public_labels:
            label_rows(self.public.num_classes, self.sensitive_train.num_classes, self.cfg.seed)  # refuses too few
        if self.cfg.minutes is not None and self.method.follows_budget:
            self._apply_plan()
        self.planned_mechanisms()  # refuses a budget too small to train
        self.clock.pause()  # `bench` validates every run before the first starts: the wait is not this run's time
        return self

    def seconds_left(self) -> float:
        """Of the `minutes` budget, on its clock (planning.BudgetClock)."""
        return self.clock.left()

    def _check_public_is_not_sensitive(self) -> None:
        """Public data is read with no privacy at all: it must not be the sensitive data."""
        d = self.cfg.data
        public, sensitive = Path(str(d.public)), Path(str(d.sensitive))
        if str(d.public) == str(d.sensitive) or (public.exists() and sensitive.exists()
                                                 and public.resolve() == sensitive.resolve()):
            raise UserError(f"data.public and data.sensitive are the same data ({d.sensitive}): public data is read "
                            "without privacy; give a data.public that holds none of the sensitive images")

    def _check_delta(self) -> None:
        """δ ≥ 1/N allows a mechanism that publishes one image outright; DPImageBench uses 1/(N ln N)."""
        n, delta = len(self.sensitive_train), self.cfg.privacy.delta
        if delta * n >= 1:
            suggested = 1 / (n * max(math.log(n), 1.0))
            raise UserError(f"privacy.delta={delta:g} is not below 1/N for the N={n} sensitive training images, so the "
                            f"guarantee promises nothing: set privacy.delta={suggested:.1g} (1/(N ln N)) or smaller")

    def _check_selection_fits(self) -> None:
        s, num_public = self.cfg.semantics, self.public.num_classes
        picks = (s.per_class or s.k) * self.sensitive_train.num_classes
        if s.k > num_public or picks > num_public:
            raise UserError(f"semantics.k={s.k} and {picks} picks in all ({s.per_class or s.k} per sensitive class) "
                            f"need at least as many public classes; {self.cfg.data.public} has {num_public}: "
                            "lower semantics.k or semantics.per_class")

    def _apply_plan(self) -> None:
        """Step counts for `minutes`: the run directory's plan when it has one (a resumed run keeps its
        plan), else a new one from the probe. Made before any sensitive image is read."""
        if self.run.plan.exists():
            plan = Plan(**read_json(self.run.plan))
        else:
            plan = distributed.broadcast(self._make_plan() if distributed.is_main() else None)
        self.plan = plan
        self.cfg = OmegaConf.merge(self.cfg, plan.overrides())

    def _make_plan(self) -> Plan:
        num_classes = self.sensitive_train.num_classes
        warm_start_features = (warmstart.untrained_features(self.cfg, self.public, self.device)
                               if self.method.has_warm_start(self.cfg) else None)
        throughput = probe(self.cfg, num_classes, self.device, num_samples=len(self.sensitive_train),
                           warm_start_features=warm_start_features)
        semantics_seconds = 0.0
        if self.method.queries_semantics and not semantic_classifier_is_cached(self.cfg, self.public, self.cache_dir):
            c = self.cfg.semantics.classifier
            throughput["semantic_classifier_image_epoch"] = classifier_throughput(
                self.cfg, self.public, self.device)
            semantics_seconds = c.epochs * len(self.public) * throughput["semantic_classifier_image_epoch"]
        plan = make_plan(self.cfg, throughput, self.seconds_left(), semantics_seconds=semantics_seconds,
                         uses_pretraining=self.method.pretrains, num_samples=len(self.sensitive_train))
        self._log_plan("plan for %g minutes: %s", plan)
        return plan

    def _log_plan(self, message: str, plan: Plan) -> None:
        logger.info(message, self.cfg.minutes, json.dumps(
            {"pretrain_steps": plan.pretrain_steps, "finetune_steps": plan.finetune_steps,
             "expected_minutes": {k: round(v / 60, 2) for k, v in plan.expected_seconds.items()},
             **({"evaluation_trimmed": plan.evaluation} if plan.evaluation else {})}))

    def _replan_pretraining(self) -> None:
        """Fit pretraining's steps to the seconds left when it starts (planning.replan_pretraining), once
        per run directory, before its first step: a resumed run keeps the steps plan.json holds."""
        if self.plan is None or self.plan.replanned_seconds_left is not None or self.run.pretrain_dir.exists():
            return
        plan = None
        if distributed.is_main():  # plan.json first: a resumed run reads its steps from there
            pretraining = next(stage for stage in self.stages() if STAGE_TABLE[stage].follows_clock)
            markers = [self.run.stages / f"{stage}.json" for stage in self.stages_before(pretraining)]
            plan = replan_pretraining(self.plan, self.seconds_left(), {m.stem: read_json(m)["seconds"]
                                                                         for m in markers if m.exists()})
            write_json(self.run.plan, plan.to_dict())
        self.plan = distributed.broadcast(plan)
        self.cfg = OmegaConf.merge(self.cfg, self.plan.overrides())
        if distributed.is_main():
            write_text(self.run.config, to_yaml(self.cfg))
            self._log_plan("pretraining planned again for the %g minutes: %s", self.plan)

    def create(self, stages: Sequence[str] | None = None, force: bool = False) -> "Pipeline":
        """Lock and create (or reopen) the run directory, its config.yaml, ledger and split key.

        The lock (rank 0 holds it under torchrun) lasts as long as this process or `close()`. Every
        check of the existing run is repeated under it, and a command that would redo a released stage
        of `stages` (default: all) is refused (`_check_releases`); config.yaml is written only once
        every check has passed, so a refused command changes no file. A directory holding results but
        no ledger or no split key is refused: a fresh ledger would forget what was spent, a fresh key
        would move images between the train and test splits.
        """
        if self.clock.paused:
            self.clock.resume()
        created = not self.run.root.exists()
        privacy = self.cfg.privacy
        if distributed.is_main():
            try:
                self.run.create()
                self._lock = self.run.lock()
                remove_interrupted_writes(self.run.root)
                self._check_existing_run()
                self._check_split_key()
                self.ledger = PrivacyLedger.open(self.run.ledger, privacy.epsilon, privacy.delta, privacy.accountant,
                                                 create=not self.run.holds_results())
                self._check_releases(self.stages() if stages is None else stages, force)
                write_text(self.run.config, to_yaml(self.cfg))
                if not self.run.split_key.exists():
                    write_bytes(self.run.split_key, self.split_key, private=True)
                if self.plan is not None and not self.run.plan.exists():
                    write_json(self.run.plan, self.plan.to_dict())
            except BaseException:
                self.close()
                if created:
                    shutil.rmtree(self.run.root, ignore_errors=True)
                raise
        distributed.barrier()  # under torchrun the other ranks read what rank 0 made
        if not distributed.is_main():
            self.ledger = PrivacyLedger.open(self.run.ledger, privacy.epsilon, privacy.delta, privacy.accountant,
                                             create=False)
        return self

    def _check_split_key(self) -> None:
        """Under the lock: the data was split with the key read at validation, which another process may have
        written since (two processes started together on a new run directory)."""
        if self.run.split_key.exists() and self.run.split_key.read_bytes() != self.split_key:
            raise UserError(f"another privimage process created {self.run.root} with another train/test split while "
                            "this one was starting: run the same command again")

    def _check_releases(self, stages: Sequence[str], force: bool) -> None:
        """Refuse to redo a privacy-spending stage whose release is out under other settings (its own, or those
        of a stage before it): what followed it was made from that release. Only a repeatable release (the
        semantic query) may be made again, with `force`, and only when it still fits the budget."""
        for stage in self.stages():
            if not STAGE_TABLE[stage].spends_privacy:
                continue
            module = RELEASE_MODULES[stage]
            booked = self.ledger.find(stage)
            if booked is None or booked.release == module.release_key(self):
                continue
            if not STAGE_TABLE[stage].repeatable_release:
                raise UserError(f"{self.run.root} has spent privacy on its {stage} release with other settings (its "
                                "own or an earlier stage's changed since): releasing again would spend the budget "
                                "twice; restore them, or use a new --out")
            before = self.ledger.spent_epsilon()
            after = self.ledger.spent_epsilon([module.mechanism(self.cfg, len(self.sensitive_train),
                                                                self.ledger.mechanisms())])
            fits = self.ledger.within_target(after)
            if fits and force and stage in stages:
                logger.warning("%s: released again (--force), ε %.4g -> %.4g", stage, before, after)
                return
            cost = f"releasing it again takes ε {before:.4g} -> {after:.4g}"
            cost += (f" of the target {self.ledger.target_epsilon:g} and leaves its file out of step with what was made "
                     "from the first release: add --force to pay for that, restore the settings," if fits else
                     f", beyond the target {self.ledger.target_epsilon:g}: restore the settings,")
            raise UserError(f"{self.run.root} has spent privacy on its {stage} release with other settings; {cost} "
                            "or use a new --out")

    def close(self) -> None:
        """Release the run directory's lock (process exit releases it too)."""
        lock = self.__dict__.pop("_lock", None)
        if lock is not None:
            lock.release()

    def _check_existing_run(self) -> None:
        if not self.run.config.exists():
            if self.run.holds_results() or self.run.ledger.exists():
                raise UserError(f"{self.run.root} exists and is not a privimage run directory: choose another --out")
            return
        saved = OmegaConf.load(self.run.config)
        for key in _FROZEN_KEYS:
            if fingerprint(saved.get(key)) != fingerprint(self.cfg[key]):
                raise UserError(
                    f"run directory {self.run.root} was made with other '{key}' settings and has spent privacy "
                    "on them: use a new --out for new settings"
                )

    @cached_property
    def split_key(self) -> bytes:
        """The key of the per-image train/test split: the run directory's, else a new one from OS entropy."""
        if self.run.split_key.exists():
            key = self.run.split_key.read_bytes()
        elif self.run.holds_results() or (self.run.ledger.exists() and read_json(self.run.ledger).get("entries")):
            raise UserError(f"{self.run.split_key} is missing but {self.run.root} holds results: without it the "
                            "train/test split cannot be rebuilt; use a new --out")
        else:
            key = self._new_split_key or secrets.token_bytes(SPLIT_KEY_BYTES)
        return distributed.broadcast(key)

    # -- data ---------------------------------------------------------------------------------
    @cached_property
    def _sensitive(self) -> tuple[ImageDataset, ImageDataset]:
        d = self.cfg.data
        with self.clock.reading_sensitive():  # how long decoding takes depends on the images
            return load_sensitive(d.sensitive, resolution=d.resolution, channels=d.channels,
                                  test_fraction=d.test_fraction, test_spec=d.sensitive_test, cache_dir=self.cache_dir,
                                  split_key=self.split_key)

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
    def privacy_plan(self) -> list[PlannedRelease]:
        """Every release the run will book, in stage order (privacy/plan.py)."""
        return plan_releases(self.cfg, len(self.sensitive_train), [
            (stage, RELEASE_MODULES[stage].mechanism) for stage in self.stages() if STAGE_TABLE[stage].spends_privacy])

    def planned_mechanisms(self) -> list[Mechanism]:
        """Every mechanism the run will apply, in stage order; the last one's σ is calibrated so that the
        composition meets the target."""
        return [release.mechanism for release in self.privacy_plan()]

    # -- stages ----------------------------------------------------------------------------------
    def stages(self) -> tuple[str, ...]:
        return self.method.stages_for(self.cfg)

    def stages_before(self, stage: str) -> tuple[str, ...]:
        return self.stages()[: self.stages().index(stage)]

    def stage_fingerprint(self, stage: str) -> str:
        upstream = [self.stage_fingerprint(s) for s in self.stages_before(stage)]
        keys = STAGE_TABLE[stage].config_keys
        return fingerprint(upstream, [OmegaConf.select(self.cfg, k) for k in keys],
                           self.cfg.data, self.cfg.method)

    def is_done(self, stage: str) -> bool:
        """Its marker matches the config and every file it leaves is there."""
        marker = self.run.stages / f"{stage}.json"
        return (marker.exists() and read_json(marker)["fingerprint"] == self.stage_fingerprint(stage)
                and not self.run.missing_outputs(stage))

    def check_runnable(self, stage: str) -> None:
        """Refuse a stage that is not part of the method or whose upstream stages are not done."""
        if stage not in self.stages():
            raise UserError(f"stage '{stage}' is not part of method={self.cfg.method}: stages are {', '.join(self.stages())}")
        for earlier in self.stages_before(stage):
            if not self.is_done(earlier):
                raise UserError(f"stage '{stage}' needs '{earlier}' first: run `privimage {earlier} --out {self.run.root}` "
                                f"or `privimage run --out {self.run.root}`")

    def run_stage(self, stage: str, force: bool = False) -> StageResult:
        if not force and stage in self.stages() and self.is_done(stage):
            return StageResult(stage, skipped=True, seconds=0.0)
        self.check_runnable(stage)
        if STAGE_TABLE[stage].follows_clock:
            self._replan_pretraining()
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        started, on_clock = time.perf_counter(), self.clock.spent()
        if STAGE_TABLE[stage].reads_sensitive:
            planned = self.plan.expected_seconds.get(stage, 0.0) if self.plan is not None else 0.0
            with self.clock.reading_sensitive(planned):
                STAGE_MODULES[stage].run(self)
        else:
            STAGE_MODULES[stage].run(self)
        seconds = time.perf_counter() - started
        if distributed.is_main():
            # The shareable marker holds the stage's seconds on the budget's clock, which counts reading
            # sensitive data as planned; the measured seconds are the owner's (private/timings.json).
            marker = {"fingerprint": self.stage_fingerprint(stage), "seconds": self.clock.spent() - on_clock,
                      **self._marker_notes.pop(stage, {})}
            if on_gpu:
                marker["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            write_json(self.run.stages / f"{stage}.json", marker)
            timings = self.run.private / TIMINGS_FILE
            write_json(timings, {**(read_json(timings) if timings.exists() else {}), stage: seconds}, private=True)
        distributed.barrier()
        return StageResult(stage, skipped=False, seconds=seconds)

    def run_all(self, on_stage: Callable[[StageResult], None] = lambda r: None) -> list[StageResult]:
        results = []
        for stage in self.stages():
            results.append(self.run_stage(stage))
            on_stage(results[-1])
        return results

    @property
    def method(self) -> Method:
        return METHODS[self.cfg.method]

    def note(self, stage: str, **facts) -> None:
        """Extra facts a stage records in its marker (e.g. that it reused a cached model)."""
        self._marker_notes.setdefault(stage, {}).update(facts)

    def public_images_used(self) -> int:
        """How many public images the method pretrained on (after its stages ran)."""
        if self.method.pretrains_on_selected_semantics:
            return int(read_json(self.run.semantics)["public_images"])
        return len(self.public) if self.method.uses_public_data else 0
