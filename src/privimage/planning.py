"""`--minutes M`: plan every stage's step counts from a short throughput probe on random data.

The probe times one pretraining step, one DP-SGD step, two sampler steps, a few batches of classifier
training, (with the warm start) DP-MERF generator updates and (with FID) Inception, each the call its
stage makes, all on random tensors of the run's shapes, never on sensitive images.

Fixed-size work (the semantic classifier, the warm start's generator, sampling `sample.n` images,
evaluation) is planned at its configured size. What remains of the budget, less a safety margin, goes to
pretraining and DP fine-tuning, whose configured step counts are scaled by one common factor: the
configured recipe keeps its proportions and grows or shrinks with the machine. Neither goes below its
floor (`pretrain.min_steps`, `finetune.min_steps`). Accuracy follows the training steps, so optional
evaluation (the real-data reference, FID, then every classifier but the first) is trimmed for as long as
the configured steps do not fit; where even the floors do not fit without it, the run is refused, naming
the minutes this machine needs. A trimmed measure can be had later: `privimage evaluate --out DIR
minutes=null evaluate.fid=true` (the planned steps are in the run's config.yaml).

The budget's clock (`BudgetClock`) counts work that reads sensitive data at its planned seconds, never
at its measured ones. So the plan, DP-SGD's T and σ, pretraining's replanned steps and where it stops
depend on the probe, N and the duration of public work alone: a sensitive image that is slow to decode
or a query that runs long moves nothing that is published.

When pretraining is about to start (the semantics and the warm start done), its step count is planned
again from the seconds left on that clock (`replan_pretraining`). Pretraining reads no sensitive image,
so its step count may follow the clock; DP-SGD's T stays as first planned, since σ was calibrated for it.
Where the public work already run took longer than planned, the probe was optimistic for this machine (a
short probe catches a CPU at its burst speed): the rest of the plan is slowed by the same ratio.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from privimage.data import ImageDataset, to_tensor
from privimage.builders import (build_classifier, build_denoiser, diffusion_loss, finetune_schedule, pretraining_step,
                                sample_batch)
from privimage.errors import UserError
from privimage.evaluation.downstream import CLASSIFIERS, DOWNSTREAM_BATCH
from privimage.classifiers import train_classifier
from privimage.merf import FeatureMap, Generator, train_generator
from privimage.methods import STAGE_TABLE
from privimage.privacy.dpsgd import DPSGD
from privimage.privacy.noise import GaussianNoise
from privimage.runtime import seeded
from privimage.synthetic import warm_start_count

SAFETY = 0.85  # plan the whole run to end with 15 % of the budget to spare: the probe is not exact
# Planned again when pretraining starts, only what is left is uncertain: pretraining itself and the stages after it.
REPLAN_SAFETY = 0.92
STOP_MARGIN = 0.02  # of the budget, kept when pretraining stops early or trains on (pretraining_target)
# The stages a late pretraining must leave time for.
AFTER_PRETRAINING = tuple(name for name, stage in STAGE_TABLE.items() if stage.after_pretraining)
REPORT_SECONDS = 5.0
PROBE_IMAGES = 128
# Optional evaluation, dropped in this order where the configured training steps do not fit the budget: the
# owner's real-data reference, FID, then every downstream classifier but the first (the headline CNN stays).
EVALUATION_TRIMS = ("reference", "fid", "classifiers")


class BudgetClock:
    """Seconds spent of a time budget, with work that reads sensitive data counted at its planned seconds.

    A duration that depends on the sensitive data (decoding it, querying it, DP-SGD on it) must not move
    what the plan publishes: pretraining's steps shape the released model. So `reading_sensitive(planned)`
    stops the clock for its block and charges `planned` instead; the wall clock may then run over the
    budget by the difference, which is the price of leaking nothing. `pause()`/`resume()` leave out time
    that is not the run's own (`privimage bench` validates every run before the first starts).
    """

    def __init__(self, minutes: float | None):
        self.minutes = minutes
        self._started = time.monotonic()
        self._stopped_at: float | None = None
        self._depth = 0  # nested stops count once
        self._excluded = 0.0
        self._charged = 0.0

    def spent(self) -> float:
        now = self._stopped_at if self._stopped_at is not None else time.monotonic()
        return now - self._started - self._excluded + self._charged

    def left(self) -> float:
        return 60 * self.minutes - self.spent()

    @property
    def paused(self) -> bool:
        return self._depth > 0

    def pause(self) -> None:
        if self._depth == 0:
            self._stopped_at = time.monotonic()
        self._depth += 1

    def resume(self, charge: float = 0.0) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._excluded += time.monotonic() - self._stopped_at
            self._stopped_at = None
        self._charged += charge

    @contextmanager
    def reading_sensitive(self, planned_seconds: float = 0.0) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume(charge=planned_seconds)


@dataclass(frozen=True)
class Plan:
    minutes: float
    seconds_left: float  # of the budget when the plan was made (data loading and the probe already spent)
    throughput: dict[str, float]  # seconds per unit, measured by the probe
    expected_seconds: dict[str, float]  # per stage
    pretrain_steps: int
    finetune_steps: int
    replanned_seconds_left: float | None = None  # of the budget when pretraining's steps were planned again
    slowdown: float | None = None  # at the replan: the stages run so far, actual over expected seconds (>= 1)
    evaluation: dict = field(default_factory=dict)  # evaluate keys trimmed to fit the training floors
    pretrain_floor: int = 1  # pretraining's steps are never planned again, nor stopped early, below it

    def to_dict(self) -> dict:
        return asdict(self)

    def overrides(self) -> dict:
        return {"pretrain": {"steps": self.pretrain_steps}, "finetune": {"steps": self.finetune_steps, "epochs": None},
                **({"evaluate": self.evaluation} if self.evaluation else {})}


def _seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median of `repeats` timed calls after one warm-up call (a loop runs at its typical speed, not its best)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe(cfg: DictConfig, num_classes: int, device: torch.device, *, num_samples: int,
          warm_start_features: FeatureMap | None = None) -> dict[str, float]:
    """Seconds per pretraining step, per DP-SGD sample, per image-forward, per classifier image-epoch;
    with `warm_start_features` (the warm start's feature map, or one of its cost: a network in it need not
    be trained), per update of the DP-MERF generator fitted to random target means of those features.

    The DP-SGD sample is timed in a batch of the size the stage runs (the expected logical batch q·N
    of the `num_samples` training images, at most one micro-batch): a step has a fixed overhead, so a
    small batch costs more per sample than a full micro-batch."""
    shape = (cfg.data.resolution, cfg.data.resolution, cfg.data.channels)
    generator = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=generator)

    with seeded(0):
        net = build_denoiser(cfg, num_classes).to(device)
        loss_fn = diffusion_loss(cfg, num_classes)
        optimizer = torch.optim.Adam(net.parameters(), lr=0.0)
        x, y = images(cfg.pretrain.batch_size), torch.randint(0, num_classes, (cfg.pretrain.batch_size,))
        throughput = {"pretrain_step": _seconds(lambda: pretraining_step(
            net, loss_fn, optimizer, to_tensor(x).to(device), y.to(device), bf16=cfg.pretrain.bf16), repeats=5)}

        f = cfg.finetune
        engine = DPSGD(net, loss_fn, clip_norm=f.clip_norm, noise_multiplier=1.0, expected_batch_size=1.0,
                       noise_multiplicity=f.noise_multiplicity, max_physical_batch=f.max_physical_batch,
                       noise=GaussianNoise(seed=0), bf16=f.bf16)
        expected_batch = finetune_schedule(cfg, num_samples).sample_rate * num_samples
        dp_batch = max(1, min(round(expected_batch), engine.samples_per_chunk))
        dx, dy = images(dp_batch), torch.randint(0, num_classes, (dp_batch,))
        throughput["dp_sample"] = _seconds(lambda: engine.step(to_tensor(dx).to(device), dy.to(device), optimizer),
                                           repeats=2) / dp_batch

        # The sampler itself, one step (one denoiser call) on a batch of the configured size: its own
        # overhead and the guided batch (conditional and unconditional passes together) included.
        s = cfg.sample
        labels = torch.zeros(s.batch_size, dtype=torch.long, device=device)
        # per image and denoiser call, counting a guided call as two images, as make_plan does
        throughput["denoiser_image"] = _seconds(lambda: sample_batch(
            net.eval(), labels, cfg, num_classes, steps=1, bf16=s.bf16)) / (s.batch_size * (2 if s.guidance else 1))
        probe_images, probe_labels = images(PROBE_IMAGES).numpy(), (torch.arange(PROBE_IMAGES) % num_classes).numpy()
        for name in cfg.evaluate.classifiers:
            model = CLASSIFIERS[name](cfg.data.channels, num_classes)
            seconds = _seconds(lambda: train_classifier(model, probe_images, probe_labels, epochs=1,
                                                        batch_size=DOWNSTREAM_BATCH, device=str(device)), repeats=1)
            throughput[f"classifier_{name}_image_epoch"] = seconds / PROBE_IMAGES
    if warm_start_features is not None:
        r, d = cfg.dpmerf, cfg.data
        merf_generator = Generator(num_classes, d.channels, d.resolution, code_dim=r.code_dim, width=r.width).to(device)
        dim = warm_start_features(to_tensor(images(1)).to(device)).shape[1]
        targets = torch.randn(num_classes, dim, generator=generator) / math.sqrt(dim)
        throughput["generator_step"] = _seconds(lambda: train_generator(
            merf_generator, warm_start_features, targets, steps=2, per_class=r.per_class, lr=0.0, seed=0,
            bf16=r.bf16), repeats=1) / 2
    if cfg.evaluate.fid:
        from privimage.evaluation.fid import INCEPTION_BATCH, InceptionFeatures

        inception = InceptionFeatures(cfg.evaluate.fid_weights, device=str(device))
        sample = images(INCEPTION_BATCH).numpy()
        throughput["inception_image"] = _seconds(lambda: inception(sample), repeats=1) / INCEPTION_BATCH
    return throughput


def classifier_throughput(cfg: DictConfig, public: ImageDataset, device: torch.device) -> float:
    """Seconds per image-epoch of the semantic classifier, on random images of the public set's shape."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (PROBE_IMAGES, *public.images.shape[1:]), dtype=torch.uint8,
                           generator=generator).numpy()
    labels = (torch.arange(PROBE_IMAGES) % public.num_classes).numpy()
    c = cfg.semantics.classifier
    with seeded(0):
        model = build_classifier(cfg, public)
        seconds = _seconds(lambda: train_classifier(model, images, labels, epochs=1, batch_size=c.batch_size,
                                                    augment=c.augment, device=str(device), bf16=c.bf16), repeats=1)
    return seconds / PROBE_IMAGES


def evaluations_per_classifier(cfg: DictConfig) -> int:
    """How many times the evaluate stage trains each downstream classifier (stages/evaluate.py)."""
    e = cfg.evaluate
    return 1 + int(e.augment > 0) + int(bool(e.reference))


def _fixed_seconds(cfg: DictConfig, throughput: dict[str, float], semantics_seconds: float) -> dict[str, float]:
    """Expected seconds of the fixed-size stages, at their configured sizes."""
    s, e = cfg.sample, cfg.evaluate

    def denoiser_calls(steps: int) -> int:
        return (2 * steps - 1 if s.solver == "heun" else steps) * (2 if s.guidance else 1)

    from_generator = warm_start_count(cfg, "generator_step" in throughput)
    redrawn = from_generator if s.warm_start_sigma is not None else 0
    return {
        "semantics": semantics_seconds,
        **({"warmstart": cfg.warm_start.generator_steps * throughput["generator_step"]}
           if "generator_step" in throughput else {}),
        "sample": ((s.n - from_generator) * denoiser_calls(s.steps) + redrawn * denoiser_calls(s.warm_start_steps))
        * throughput["denoiser_image"],
        "evaluate": sum(evaluations_per_classifier(cfg) * e.classifier_epochs * s.n
                        * throughput[f"classifier_{name}_image_epoch"] for name in e.classifiers)
        + (2 * e.fid_samples * throughput["inception_image"] if e.fid else 0.0),
        "report": REPORT_SECONDS,
    }


def _trimmed(evaluate: DictConfig, key: str) -> dict:
    """The `evaluate` override that drops the optional work of `key` (empty where there is none)."""
    if key == "classifiers":
        return {key: list(evaluate.classifiers[:1])} if len(evaluate.classifiers) > 1 else {}
    return {key: False} if evaluate[key] else {}


def make_plan(cfg: DictConfig, throughput: dict[str, float], seconds_left: float, *, semantics_seconds: float,
              uses_pretraining: bool, num_samples: int) -> Plan:
    """Scale the configured pretraining and DP-SGD steps so that the run ends within `seconds_left`, each at
    least its floor. Accuracy follows the training steps, so optional evaluation is trimmed, in the order
    of EVALUATION_TRIMS, for as long as the configured recipe does not fit; where even the floors do not
    fit without it, the run is refused."""
    pretrain_steps = cfg.pretrain.steps if uses_pretraining else 0
    pretrain_floor = min(cfg.pretrain.min_steps, pretrain_steps) if uses_pretraining else 0
    sample_rate, dp_steps = finetune_schedule(cfg, num_samples)
    finetune_floor = max(1, min(cfg.finetune.min_steps, dp_steps))
    step, dp_step = throughput["pretrain_step"], sample_rate * num_samples * throughput["dp_sample"]
    floors = pretrain_floor * step + finetune_floor * dp_step
    recipe = pretrain_steps * step + dp_steps * dp_step
    evaluation = {}
    for trim in (None, *EVALUATION_TRIMS):  # learning first: optional measures only where the recipe fits
        if trim is not None:
            evaluation |= _trimmed(OmegaConf.merge(cfg.evaluate, evaluation), trim)
        expected = _fixed_seconds(OmegaConf.merge(cfg, {"evaluate": evaluation}), throughput, semantics_seconds)
        trainable = SAFETY * seconds_left - sum(expected.values())
        if trainable >= recipe:
            break
    if trainable < floors:
        spent = 60 * cfg.minutes - seconds_left
        needed = math.ceil((spent + (sum(expected.values()) + floors) / SAFETY) / 60)
        raise UserError(
            f"--minutes {cfg.minutes:g} is too short for this machine: the fixed work and the training floors "
            f"({pretrain_floor} pretraining and {finetune_floor} DP-SGD steps, pretrain.min_steps and "
            f"finetune.min_steps, below which samples are near chance) need about {needed} minutes here: "
            f"--minutes {needed}"
        )
    # One common factor keeps the recipe's proportions; a step count under its floor is raised to it and
    # the other takes what is left.
    factor = trainable / (pretrain_steps * step + dp_steps * dp_step)
    planned_pretrain, planned_finetune = math.floor(factor * pretrain_steps), math.floor(factor * dp_steps)
    if planned_pretrain < pretrain_floor:
        planned_pretrain = pretrain_floor
        planned_finetune = math.floor((trainable - pretrain_floor * step) / dp_step)
    elif planned_finetune < finetune_floor:
        planned_finetune = finetune_floor
        planned_pretrain = math.floor((trainable - finetune_floor * dp_step) / step) if uses_pretraining else 0
    expected["pretrain"] = planned_pretrain * step
    expected["finetune"] = planned_finetune * dp_step
    return Plan(minutes=float(cfg.minutes), seconds_left=seconds_left, throughput=throughput,
                expected_seconds=expected, pretrain_steps=planned_pretrain, finetune_steps=planned_finetune,
                evaluation=evaluation, pretrain_floor=pretrain_floor)


def replan_pretraining(plan: Plan, seconds_left: float, stage_seconds: dict[str, float]) -> Plan:
    """The plan with pretraining's steps fitted to the `seconds_left` when it starts.

    `stage_seconds` are the seconds of the stages already run on the budget's clock (their public work
    as measured, their reading of sensitive data as planned). Where they took longer than planned,
    pretraining's step and the stages after it are expected to take longer by the same ratio; where they
    were faster, the plan stays as it was (a fast start is no promise). Never fewer than the plan's
    `pretrain_floor`: a run that is late still learns, and ends late.
    """
    planned = sum(plan.expected_seconds.get(stage, 0.0) for stage in stage_seconds)
    slowdown = max(1.0, sum(stage_seconds.values()) / planned) if planned > 0 else 1.0
    expected = {**plan.expected_seconds,
                **{stage: slowdown * plan.expected_seconds[stage] for stage in AFTER_PRETRAINING}}
    step = slowdown * plan.throughput["pretrain_step"]
    steps = max(plan.pretrain_floor, math.floor((REPLAN_SAFETY * seconds_left - sum(expected[s] for s in AFTER_PRETRAINING)) / step))
    return replace(plan, pretrain_steps=steps, expected_seconds={**expected, "pretrain": steps * step},
                   replanned_seconds_left=seconds_left, slowdown=slowdown)


def pretraining_target(plan: Plan, seconds_left: float, steps_done: int, steps_timed: int, seconds_timed: float,
                       *, may_extend: bool) -> int:
    """How many steps pretraining should reach, asked as it trains: `steps_done` so far, the last
    `steps_timed` of them in `seconds_timed`.

    The machine may slow down after the probe (a shared host, a throttled chip), or run faster than the
    short probe said. Pretraining measures its own pace: it stops now once the stages after it, expected
    as much slower as it runs (never faster than planned), and a margin of STOP_MARGIN of the budget no
    longer fit in the `seconds_left`. Where it runs faster and `may_extend` (a constant learning rate, so
    that more steps change no schedule), it trains on into the seconds its pace saved, still leaving the
    stages after it their planned seconds with the replan's margin. The timed steps should leave out the
    first ones, which warm caches up (stages/pretrain.py measures from its first check). Pretraining reads
    no sensitive image and `seconds_left` is on the budget's clock, so where it stops leaks nothing; DP-SGD's
    T and σ do not change. Never below the plan's floor.
    """
    pace = seconds_timed / steps_timed
    slowdown = max(1.0, pace / (plan.expected_seconds["pretrain"] / plan.pretrain_steps))
    after = slowdown * sum(plan.expected_seconds.get(stage, 0.0) for stage in AFTER_PRETRAINING)
    margin = STOP_MARGIN * 60 * plan.minutes
    target = plan.pretrain_steps
    if seconds_left < after + margin:
        target = steps_done
    elif may_extend:
        target = max(target, steps_done + math.floor((seconds_left - after / REPLAN_SAFETY - margin) / pace))
    return max(target, plan.pretrain_floor)
