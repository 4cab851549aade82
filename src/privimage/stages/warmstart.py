"""privimage's warm start: a DP-MERF release whose generator's images join the pretraining set.

Not in the PrivImage paper; it follows DP-FETA (Li et al., IEEE S&P 2025, by PrivImage's authors):
a cheap DP release first teaches the diffusion model the coarse look of the sensitive data, so that
DP-SGD starts from the sensitive style rather than the public one. Here the release is DP-MERF's
(stages/dpmerf.py, with the `dpmerf` section's random features and generator), with
`warm_start.public_features` of each image's embedding given to the semantic classifier's features
(DP-MEPF's public perceptual features; the classifier saw public data only): one Gaussian mechanism whose
σ spends `warm_start.epsilon_share` of ε on its own; DP-SGD's σ is calibrated for the rest of the
composed budget. `warm_start.samples` generator images, labelled with the sensitive classes, are
post-processing of the release; the pretrain stage adds them to the selected public images.
`warm_start.epsilon_share: 0` drops the stage: the paper's pipeline.

At small ε the generator also fits the release's noise and draws it as salt-and-pepper speckle, which
the diffusion model would learn; `warm_start.median_filter` removes it from the images (post-processing too).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from scipy.ndimage import median_filter

from privimage.data import ImageDataset
from privimage.errors import UserError
from privimage.privacy.accountant import Mechanism, calibrate_noise_multiplier
from privimage.rundir import RunDir
from privimage.merf import FeatureMap, JointFeatures, NetworkFeatures
from privimage.builders import build_classifier
from privimage.runtime import seeded
from privimage.stages.dpmerf import (fit_generator, generator_images, generator_path, load_generator, random_features,
                                     release_name)
from privimage.stages.semantics import semantic_classifier
from privimage.synthetic import balanced_labels

if TYPE_CHECKING:
    from privimage.pipeline import Pipeline

STAGE = "warmstart"


def mechanism(cfg: DictConfig, num_samples: int = 0, earlier: list[Mechanism] = ()) -> Mechanism:
    """One Gaussian mechanism (sensitivity 1) whose ε alone is `epsilon_share` of the target."""
    share, p = cfg.warm_start.epsilon_share, cfg.privacy
    if not 0 < share < 1:
        raise UserError(f"warm_start.epsilon_share must be in [0, 1) (got {share}): 0 turns the warm start off")
    return Mechanism(calibrate_noise_multiplier(share * p.epsilon, p.delta, 1.0, 1, accountant=p.accountant))


def features(cfg: DictConfig, classifier: torch.nn.Module | None) -> FeatureMap:
    """The warm start's embedding: DP-MERF's random features and, with their share of the norm, the
    normalised penultimate features of `classifier` (one trained on public data only, or None where
    `warm_start.public_features` is 0)."""
    share = cfg.warm_start.public_features
    if not share:
        return random_features(cfg)
    return JointFeatures((random_features(cfg), 1 - share), (NetworkFeatures(classifier, bf16=cfg.dpmerf.bf16), share))


def trained_features(cfg: DictConfig, public: ImageDataset, cache_dir: Path, device: torch.device) -> FeatureMap:
    """`features` with the semantic classifier of `public` (the cached one the semantics stage trained)."""
    classifier = semantic_classifier(cfg, public, cache_dir, device)[0] if cfg.warm_start.public_features else None
    return features(cfg, classifier)


def untrained_features(cfg: DictConfig, public: ImageDataset, device: torch.device) -> FeatureMap:
    """`features` with an untrained classifier of the semantic classifier's architecture: what the
    planner times before the semantics stage has trained one (it costs the same and reads no data)."""
    if not cfg.warm_start.public_features:
        return features(cfg, None)
    with seeded(0):
        return features(cfg, build_classifier(cfg, public).to(device))


def generator_file(run: RunDir) -> Path:
    return generator_path(run, STAGE)


def warm_start_images(cfg: DictConfig, run: RunDir, class_names: tuple[str, ...], device: torch.device,
                      labels: torch.Tensor | None = None) -> ImageDataset:
    """The generator's images for `labels` (seeded; default: `warm_start.samples` balanced over the sensitive
    classes, what pretraining adds), each channel median-filtered over a `warm_start.median_filter`-pixel square."""
    generator = load_generator(cfg, generator_file(run), len(class_names), device)
    if labels is None:
        labels = balanced_labels(cfg.warm_start.samples, len(class_names))
    return despeckle(generator_images(generator, labels, class_names, cfg.seed, name="warm-start"),
                     cfg.warm_start.median_filter)


def despeckle(data: ImageDataset, width: int) -> ImageDataset:
    """A `width` × `width` median filter of each channel of each image; width 1 leaves them as they are."""
    images = median_filter(data.images, size=(1, width, width, 1), mode="nearest")
    return ImageDataset(images, data.labels, data.class_names, name=data.name)


def release_key(pipeline: Pipeline) -> str:
    """The name of the release this config books: what the noisy embedding depends on."""
    cfg = pipeline.cfg
    w = cfg.warm_start
    classifier = cfg.semantics.classifier if w.public_features else None
    return release_name(cfg, w.epsilon_share, w.public_features, classifier)


def run(pipeline: Pipeline) -> None:
    cfg = pipeline.cfg
    fit_generator(pipeline, stage=STAGE, name=release_key(pipeline), planned=lambda: mechanism(cfg),
                  steps=cfg.warm_start.generator_steps,
                  features=trained_features(cfg, pipeline.public, pipeline.cache_dir, pipeline.device))
