"""Stage 3: non-private pretraining of the conditional EDM denoiser on public images.

privimage pretrains on the public images of the semantics the DP query selected, relabelled to the
sensitive class that chose them. pdp pretrains on the whole public set with its own labels, as
DPImageBench does, and each sensitive class then takes over the label row of a public class drawn
at random (seeded, `label_rows`): DPImageBench hands class c row c, which on a public set whose first
classes are the digits would give pdp the digit semantics by accident. The loop is resumable
(diffusion/training.py); the finished stage writes `pretrain/model.safetensors` (the EMA weights,
with the sensitive classes' label rows), which `load_denoiser` reads. Pretraining sees public data
only, so a model pretrained on the same images with the same settings is reused from the cache.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from privimage import distributed
from privimage.atomic import atomic_path, read_json
from privimage.checkpoint import load_checkpoint, save_checkpoint
from privimage.builders import MODEL_FILE, build_denoiser, diffusion_loss, pretraining_step
from privimage.config import fingerprint
from privimage.data import ImageDataset, to_tensor
from privimage.diffusion.ema import EMA
from privimage.diffusion.training import Checkpointer, lr_factor, progress, scalars
from privimage.errors import UserError
from privimage.merf import SIZE_WEIGHT, class_means
from privimage.planning import pretraining_target
from privimage.rundir import RunDir
from privimage.runtime import seeded
from privimage.semantics.public_fit import draw_weights, fit_ratios, fit_weights
from privimage.stages.dpmerf import EMBEDDING_FILE
from privimage.stages.semantics import pretraining_set
from privimage.stages.warmstart import STAGE as WARM_START, trained_features, warm_start_images

if TYPE_CHECKING:
    from privimage.pipeline import Pipeline

logger = logging.getLogger(__name__)

BUDGET_CHECK_EVERY = 25  # steps: often enough to stop within seconds, seldom enough that the pace is measured
LABEL_EMBEDDING = "unet.class_embed.weight"  # one row per class, the null class last


def pretrain(cfg: DictConfig, run: RunDir, data: ImageDataset, device: torch.device, target: Path,
             weights: torch.Tensor | None = None, budget: Callable[[int, int, float], int] | None = None) -> int:
    """Non-private EDM training on public images, conditional on `data`'s labels; EMA weights to `target`.
    Returns the steps trained.

    Batches are drawn with replacement, uniformly or with probabilities proportional to `weights`
    (one per image). The learning rate follows `pretrain.lr_schedule` over `pretrain.steps`.
    `budget(steps_done, steps, seconds)`, asked every BUDGET_CHECK_EVERY steps with the steps done and the
    steps and seconds of this call, returns the steps to reach: fewer than `pretrain.steps` stops the
    training early, more trains on (a time budget: planning.pretraining_target).

    Under torchrun the net trains as DDP: each rank draws batch_size / world_size images per step.
    With `pretrain.bf16` the forward pass (and so the backward) runs under bf16 autocast, on a CPU too
    (weights, optimizer and EMA stay float32): AVX-512 BF16 cores take a step faster than in float32,
    and on a CPU budget steps are what accuracy follows (benchmarks/bf16_levers.py, docs/performance.md#bf16).
    """
    p = cfg.pretrain
    folder, num_classes = run.pretrain_dir, data.num_classes
    with seeded(cfg.seed):  # the same initial weights on every rank
        net = build_denoiser(cfg, num_classes).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=p.lr)
    ema = EMA(net, decay=p.ema)
    checkpoint = Checkpointer(folder, net, ema, optimizer)
    start = checkpoint.restore()
    trained = DistributedDataParallel(net) if distributed.is_distributed() else net
    labels = torch.as_tensor(data.labels)  # images are read a batch at a time: a set of any size fits
    per_rank = math.ceil(p.batch_size / distributed.world_size())
    loss_fn = diffusion_loss(cfg, num_classes)
    rank_seed = distributed.rank_seed(cfg.seed)
    generator = torch.Generator().manual_seed(rank_seed + start)
    net.train()
    began, done, reach = time.monotonic(), start, p.steps
    # Diffusion noise: each rank and each resumed segment its own.
    with seeded(rank_seed + start, device), scalars(run.tensorboard / "pretrain") as writer, \
            progress("pretrain", start, p.steps) as bar:
        while done < reach:
            if weights is None:
                index = torch.randint(len(labels), (per_rank,), generator=generator)
            else:
                index = torch.multinomial(weights, per_rank, replacement=True, generator=generator)
            optimizer.param_groups[0]["lr"] = p.lr * lr_factor(p.lr_schedule, p.warmup_steps, done, p.steps)
            x = to_tensor(torch.from_numpy(data.images[index.numpy()]).to(device))  # uint8 over the bus
            loss = pretraining_step(trained, loss_fn, optimizer, x, labels[index].to(device), bf16=p.bf16)
            ema.update(net)
            if writer is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                writer.add_scalar("pretrain/loss", loss.item(), done + 1)
            bar.update()
            done += 1
            if budget is not None and (done - start) % BUDGET_CHECK_EVERY == 0:
                reach = distributed.broadcast(budget(done, done - start, time.monotonic() - began)
                                              if distributed.is_main() else None)
                bar.total = max(reach, done)
            if done % p.checkpoint_every == 0 or done >= reach:
                checkpoint.save(done)
    if done != p.steps:
        logger.info("pretrain: %d steps of %d planned, to fit the time budget", done, p.steps)
    if distributed.is_main():
        save_checkpoint(target, ema.module.state_dict(), {"stage": "pretrain", "steps": done})
    distributed.barrier()
    return done


def label_rows(num_public: int, num_sensitive: int, seed: int) -> np.ndarray:
    """pdp: the public class whose label row each sensitive class fine-tunes on, drawn without
    replacement from a generator seeded with `seed` (public: it reads no data)."""
    if num_sensitive > num_public:
        raise UserError(f"method=pdp maps each of the {num_sensitive} sensitive classes to a public class, but the "
                        f"public set has {num_public}: use a public set with more classes, or method=privimage")
    return np.random.default_rng(seed).permutation(num_public)[:num_sensitive]


def with_label_rows(tensors: dict[str, torch.Tensor], rows: np.ndarray) -> dict[str, torch.Tensor]:
    """A model conditioned on the public classes, answering to the sensitive classes: class i reads
    public row rows[i]; the null class keeps the null row. Nothing else changes."""
    embedding = tensors[LABEL_EMBEDDING]
    keep = torch.as_tensor([*rows.tolist(), len(embedding) - 1])
    return {**tensors, LABEL_EMBEDDING: embedding[keep].clone()}


def pretraining_data(pipeline: Pipeline) -> tuple[ImageDataset, torch.Tensor | None]:
    """The selected public semantics relabelled to the sensitive classes, or the public set (methods.py);
    with the warm start's generator images (stages/warmstart.py) where the method runs it.

    Returns the images and their sampling weights (semantics/public_fit.draw_weights): None (uniform)
    unless `pretrain.warm_start_share` sets the share of each class's draws that the generator's images of
    that class make up, or `pretrain.public_fit` gives a selected public class that fits its sensitive class
    poorly less than its share (none at all: its images are left out); the warm start's images take the rest.
    """
    if not pipeline.method.pretrains_on_selected_semantics:
        return pipeline.public, None
    names = pipeline.sensitive_train.class_names
    chosen = read_json(pipeline.run.semantics)["selected"]
    selected = pretraining_set(pipeline.public, chosen, names)
    if not pipeline.method.has_warm_start(pipeline.cfg):
        return selected, None
    fit = np.ones(len(selected))
    if pipeline.cfg.pretrain.public_fit is not None:
        weight_of = public_fit(pipeline, chosen)
        pipeline.note("pretrain", public_fit={name: {pick: round(weight_of[pick], 3) for pick in picks}
                                              for name, picks in chosen.items()})
        fit = picked_image_weights(pipeline.public, weight_of)
        selected = selected.subset(np.flatnonzero(fit > 0))
        fit = fit[fit > 0]
        pipeline.note("pretrain", public_images=len(selected))
    extra = warm_start_images(pipeline.cfg, pipeline.run, names, pipeline.device)
    data = ImageDataset(np.concatenate([selected.images[np.arange(len(selected))], extra.images]),
                        np.concatenate([selected.labels, extra.labels]), names, name=f"{selected.name}+warm-start")
    share = pipeline.cfg.pretrain.warm_start_share
    if share is None and (fit == 1).all():
        return data, None
    return data, torch.as_tensor(draw_weights(selected.labels, fit, extra.labels, share), dtype=torch.float64)


def public_fit(pipeline: Pipeline, chosen: dict[str, list[str]]) -> dict[str, float]:
    """Each selected public class's weight in pretraining (semantics/public_fit.py), from the warm start's
    release and the public images: post-processing of DP outputs, no sensitive image is read."""
    cfg, public = pipeline.cfg, pipeline.public
    bounds = cfg.pretrain.public_fit
    if len(bounds) != 2 or not 0 <= bounds[0] < bounds[1]:
        raise UserError(f"pretrain.public_fit must be [full, none] with 0 <= full < none, or null (got {bounds})")
    noisy_sum = load_checkpoint(pipeline.run.root / WARM_START / EMBEDDING_FILE)[0]["noisy_sum"]
    sigma = pipeline.ledger.reread().find(WARM_START).mechanism.noise_multiplier  # under torchrun rank 0 booked it
    sizes = (noisy_sum[:, -1] / SIZE_WEIGHT).clamp(min=1.0).double().numpy()  # as class_means reads them
    noise_var = (sigma / SIZE_WEIGHT / sizes) ** 2  # of each coordinate of a class mean
    features = trained_features(cfg, public, pipeline.cache_dir, pipeline.device)
    names = pipeline.sensitive_train.class_names
    picks = [(names.index(name), pick) for name, row in chosen.items() for pick in row]
    index = {name: i for i, name in enumerate(public.class_names)}
    with torch.no_grad():
        pick_means = np.stack([_mean_feature(features, public.images, np.flatnonzero(public.labels == index[pick]),
                                             pipeline.device) for _, pick in picks])
    ratios = fit_ratios(class_means(noisy_sum).double().numpy(), noise_var, pick_means,
                        np.array([c for c, _ in picks]))
    return {pick: float(w) for (_, pick), w in zip(picks, fit_weights(ratios, *bounds))}


def picked_image_weights(public: ImageDataset, weight_of: dict[str, float]) -> np.ndarray:
    """The weight of each image of `pretraining_set` (the picked classes' images, in the public set's order)."""
    by_class = np.full(public.num_classes, np.nan)
    for i, name in enumerate(public.class_names):
        by_class[i] = weight_of.get(name, np.nan)
    weights = by_class[public.labels]
    return weights[~np.isnan(weights)]


def _mean_feature(features: Callable, images: np.ndarray, indices: np.ndarray, device: torch.device,
                  batch: int = 512) -> np.ndarray:
    total = sum(features(to_tensor(torch.from_numpy(images[indices[i:i + batch]]).to(device))).double().sum(0)
                for i in range(0, len(indices), batch))
    return (total / len(indices)).cpu().numpy()


def run(pipeline: Pipeline) -> None:
    """Pretrain, or reuse the model an earlier run pretrained on the same images with the same settings.

    A model pretrained only on public images (chosen, for privimage, by the noisy selection) may be
    shared across runs: runs at several ε (`privimage bench`) pretrain once. One that saw the warm
    start's images is the run's own (post-processing of its release) and stays in the run directory.
    """
    cfg, run_dir = pipeline.cfg, pipeline.run
    (data, weights), names = pretraining_data(pipeline), pipeline.sensitive_train.class_names
    shareable = not pipeline.method.has_warm_start(cfg)
    pipeline.note("pretrain", pretraining_images=len(data))
    rows = label_rows(data.num_classes, len(names), cfg.seed) if pipeline.method.pretrains_on_public_labels else None
    key = fingerprint(data.fingerprint(), cfg.model, cfg.pretrain, cfg.seed, data.num_classes,
                      cfg.data.resolution, cfg.data.channels)
    cached = pipeline.cache_dir / "pretrained" / f"{key}.safetensors"
    trained = run_dir.pretrain_dir / ("public-labels.safetensors" if rows is not None else MODEL_FILE)
    if shareable and distributed.broadcast(cached.is_file()):
        if distributed.is_main():
            logger.info("pretrain: reusing %s (same public images and settings)", cached)
            _copy(cached, trained)
        pipeline.note("pretrain", reused_cached_model=True)
    else:
        steps = pretrain(cfg, run_dir, data, pipeline.device, trained, weights, budget=_budget_check(pipeline))
        if steps < cfg.pretrain.steps:
            pipeline.note("pretrain", stopped_early_at=steps)  # a model off its planned steps is never cached
        elif steps > cfg.pretrain.steps:
            pipeline.note("pretrain", trained_on_to=steps)
        elif shareable and distributed.is_main():
            try:
                _copy(trained, cached)
            except OSError as error:
                logger.warning("could not cache the pretrained model in %s (%s)", cached.parent, error)
    if rows is not None:
        if distributed.is_main():
            tensors, meta = load_checkpoint(trained)
            save_checkpoint(run_dir.pretrain_dir / MODEL_FILE, with_label_rows(tensors, rows), meta)
        pipeline.note("pretrain", label_rows={name: data.class_names[row] for name, row in zip(names, rows)})
    distributed.barrier()


def _budget_check(pipeline: Pipeline) -> Callable[[int, int, float], int] | None:
    """With `minutes`, the steps pretraining should reach to fit the budget (planning.pretraining_target).

    Its pace is measured from the first check on: the first steps warm caches and allocators up and
    would read as a slow machine. It trains on past its planned steps only under a constant learning
    rate, whose schedule more steps do not change, and only in a run that pretrains from its first step:
    a resumed run starts a new clock with the whole budget ahead, so it keeps the steps plan.json holds."""
    if pipeline.plan is None:
        return None
    plan, first = pipeline.plan, None
    may_extend = pipeline.cfg.pretrain.lr_schedule == "constant"

    def target(done: int, steps: int, seconds: float) -> int:
        nonlocal first
        if first is None:
            first = (steps, seconds)
            return plan.pretrain_steps
        return pretraining_target(plan, pipeline.seconds_left(), done, steps - first[0], seconds - first[1],
                                  may_extend=may_extend and done == steps)

    return target


def _copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
