"""method=dpmerf: release the noisy mean embeddings once, fit a generator to them, sample it.

The release is booked in the ledger before it is computed and marked released before
`<stage>/embedding.safetensors` (the noisy release: shareable) is written; a rerun reuses that file, a
released booking whose file is gone refuses. The generator, its samples and everything after are
post-processing of the release. Writes `synthetic.npz` like the sample stage. privimage's warm start
(stages/warmstart.py) makes the same release and generator under its own stage name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from privimage import distributed
from privimage.checkpoint import load_checkpoint, save_checkpoint
from privimage.config import fingerprint
from privimage.data import ImageDataset, to_tensor, to_uint8
from privimage.errors import UserError
from privimage.merf import (FeatureMap, Generator, RandomFeatures, class_means, embedding_sum, fixed_features, release,
                            train_generator)
from privimage.privacy.accountant import FixedReleasesExceedTarget, Mechanism, calibrate_noise_multiplier
from privimage.privacy.ledger import PrivacyLedger
from privimage.privacy.release import release_once
from privimage.rundir import RunDir
from privimage.runtime import dp_noise_source, seeded
from privimage.synthetic import balanced_labels, write_synthetic

if TYPE_CHECKING:
    from privimage.pipeline import Pipeline

EMBEDDING_FILE = "embedding.safetensors"
GENERATOR_FILE = "generator.safetensors"
BATCH = 512


def mechanism(cfg: DictConfig, num_samples: int, earlier: list[Mechanism]) -> Mechanism:
    """One Gaussian mechanism (sensitivity 1) whose σ meets the target with what was booked before."""
    try:
        sigma = calibrate_noise_multiplier(cfg.privacy.epsilon, cfg.privacy.delta, 1.0, 1, fixed=earlier,
                                           accountant=cfg.privacy.accountant)
    except FixedReleasesExceedTarget as error:
        raise UserError(f"{error}: raise privacy.epsilon") from None
    return Mechanism(sigma)


def random_features(cfg: DictConfig) -> RandomFeatures:
    """DP-MERF's features, the `dpmerf` section's; fixed by the seed, they read no data."""
    r, d = cfg.dpmerf, cfg.data
    return fixed_features(d.resolution ** 2 * d.channels, r.features, r.length_scale, cfg.seed)


def release_name(cfg: DictConfig, *depends_on: object) -> str:
    """What the release depends on: a new generator or sample count reuses it, never releases again."""
    return fingerprint(cfg.data, cfg.privacy, cfg.dpmerf.features, cfg.dpmerf.length_scale, cfg.seed, *depends_on)


def noisy_embedding(cfg: DictConfig, run: RunDir, ledger: PrivacyLedger, sensitive: ImageDataset, *, stage: str,
                    planned: Callable[[], Mechanism], name: str, features: FeatureMap,
                    device: torch.device) -> torch.Tensor:
    """The released C × (D + 1) noisy sum of `features`: booked (as `stage`, `planned()`), computed and
    released once per run directory (`release_once`)."""
    path = run.root / stage / EMBEDDING_FILE

    def embed(mechanism: Mechanism) -> torch.Tensor:
        batches = ((to_tensor(sensitive.images[i:i + BATCH]).to(device),
                    torch.as_tensor(sensitive.labels[i:i + BATCH])) for i in range(0, len(sensitive), BATCH))
        return release(embedding_sum(features, batches, sensitive.num_classes), mechanism.noise_multiplier,
                       dp_noise_source(cfg.privacy.secure_rng))

    def read() -> torch.Tensor | None:
        if not path.exists():
            return None
        tensors, meta = load_checkpoint(path)
        if meta.get("release") != name:
            raise UserError(f"{path} is from another release: use a new --out")
        return tensors["noisy_sum"]

    return release_once(
        ledger, stage, name, planned, compute=embed, read=read,
        write=lambda noisy: save_checkpoint(path, {"noisy_sum": noisy}, {"release": name}),
        missing=f"the ledger records the DP-MERF embedding as released but {path} is missing: "
                "releasing it again would spend the budget twice; use a new --out",
        other_release=f"{run.root} has released its DP-MERF embedding with other settings (dpmerf.features, "
                      "dpmerf.length_scale, warm_start, semantics.classifier or seed changed since): restore them, "
                      "or use a new --out")


def _build(cfg: DictConfig, num_classes: int) -> Generator:
    r, d = cfg.dpmerf, cfg.data
    with seeded(cfg.seed):
        return Generator(num_classes, d.channels, d.resolution, code_dim=r.code_dim, width=r.width)


def _draw(generator: Generator, labels: torch.Tensor, rng: torch.Generator) -> np.ndarray:
    device = next(generator.parameters()).device
    with torch.no_grad():
        return np.concatenate([to_uint8(generator.sample(labels[i:i + BATCH].to(device), rng))
                               for i in range(0, len(labels), BATCH)])


def fit_generator(pipeline: Pipeline, *, stage: str, planned: Callable[[], Mechanism], name: str,
                  features: FeatureMap, steps: int) -> Generator:
    """The release of `features` (once), then the generator fitted to it in `steps` updates, saved as
    `<stage>/generator.safetensors`.
    Under torchrun rank 0 alone releases and fits (a release per rank would spend the budget once per
    rank); every rank then reads the same generator."""
    cfg, names = pipeline.cfg, pipeline.sensitive_train.class_names
    path = generator_path(pipeline.run, stage)
    if distributed.is_main():
        with pipeline.clock.reading_sensitive():  # the generator's fit is public work, on the budget's clock
            noisy_sum = noisy_embedding(cfg, pipeline.run, pipeline.ledger, pipeline.sensitive_train, stage=stage,
                                        planned=planned, name=name, features=features, device=pipeline.device)
        with tqdm(total=steps, desc=f"{stage} generator") as bar:
            generator = fitted_generator(cfg, noisy_sum, features, len(names), pipeline.device, steps=steps,
                                         progress=bar)
        save_checkpoint(path, generator.state_dict(), {"stage": stage, "class_names": list(names)})
    distributed.barrier()
    return load_generator(cfg, path, len(names), pipeline.device)


def fitted_generator(cfg: DictConfig, noisy_sum: torch.Tensor, features: FeatureMap, num_classes: int,
                     device: torch.device, steps: int, progress=None) -> Generator:
    """The `dpmerf` section's generator, trained in `steps` updates to match a released noisy sum of
    `features` (post-processing of it)."""
    r = cfg.dpmerf
    generator = _build(cfg, num_classes).to(device)
    train_generator(generator, features, class_means(noisy_sum), steps=steps, per_class=r.per_class, lr=r.lr,
                    seed=cfg.seed, bf16=r.bf16, progress=progress)
    return generator


def generator_images(generator: Generator, labels: torch.Tensor, class_names: tuple[str, ...], seed: int,
                     name: str = "synthetic") -> ImageDataset:
    """One image per label, from the generator's seeded codes."""
    rng = torch.Generator(device=next(generator.parameters()).device).manual_seed(seed)
    return ImageDataset(_draw(generator, labels, rng), labels.numpy().astype(np.int64), class_names, name=name)


def load_generator(cfg: DictConfig, path: Path, num_classes: int, device: torch.device) -> Generator:
    generator = _build(cfg, num_classes)
    generator.load_state_dict(load_checkpoint(path)[0])
    return generator.to(device).eval()


def generator_path(run: RunDir, stage: str) -> Path:
    return run.root / stage / GENERATOR_FILE


def model_file(run: RunDir) -> Path:
    return generator_path(run, "dpmerf")


def sampler(cfg: DictConfig, run: RunDir, class_names: tuple[str, ...], device: torch.device) -> Callable:
    """(labels, torch.Generator) → uint8 images from the fitted generator (methods.Method.model_stage)."""
    generator = load_generator(cfg, model_file(run), len(class_names), device)
    return lambda labels, rng: _draw(generator, labels, rng)


def release_key(pipeline: Pipeline) -> str:
    """The name of the release this config books."""
    return release_name(pipeline.cfg)


def run(pipeline: Pipeline) -> None:
    cfg, n, names = pipeline.cfg, len(pipeline.sensitive_train), pipeline.sensitive_train.class_names
    generator = fit_generator(pipeline, stage="dpmerf", name=release_key(pipeline), features=random_features(cfg),
                              steps=cfg.dpmerf.steps,
                              planned=lambda: mechanism(cfg, n, pipeline.ledger.mechanisms(excluding_stage="dpmerf")))
    if distributed.is_main():
        write_synthetic(pipeline.run, generator_images(generator, balanced_labels(cfg.sample.n, len(names)), names,
                                                       cfg.seed))
