"""Stage 5b: measure the synthetic set against the real data; writes `metrics.json`.

Evaluation reads the sensitive data only to measure, and its outputs are for the data owner: the
closest-pairs picture shows real training images, so it goes under `private/`, never in the report.

The headline downstream accuracy follows DPImageBench: the classifiers train on the synthetic set with
no data-specific augmentation and fixed hyperparameters, and are tested on the real test split. With
`evaluate.augment > 0` the same classifiers are also trained with augmentation, reported beside it as
`accuracy_augmented` (it measures the classifier's augmentation as much as the data). With
`evaluate.reference` they are trained on as many real *training* images as there are synthetic ones:
what real data of that size would give. It is a statistic of the sensitive training split, so it goes
to `private/reference.json` only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from privimage.data import ImageDataset
from privimage.evaluation.downstream import LabelledImages, downstream_accuracy
from privimage.evaluation.fid import InceptionFeatures, feature_stats, fid_from_stats
from privimage.evaluation.manifold import precision_recall
from privimage.evaluation.memorization import closest_pairs_figure, memorization
from privimage.rundir import RunDir, read_json, write_bytes, write_json

PRIVATE_DIR = "private"
REFERENCE_FILE = "reference.json"


def load_synthetic(run: RunDir) -> ImageDataset:
    with np.load(run.synthetic) as data:
        return ImageDataset(images=data["images"], labels=data["labels"].astype(np.int64),
                            class_names=tuple(str(n) for n in data["class_names"]), name="synthetic")


def _first(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded random subset of `n` images (all if fewer)."""
    order = np.random.default_rng(seed).permutation(len(images))[:n]
    return images[np.sort(order)]


def _subset(data: ImageDataset, n: int, seed: int) -> ImageDataset:
    """A seeded random subset of `n` labelled images (all if fewer)."""
    order = np.sort(np.random.default_rng(seed).permutation(len(data.labels))[:n])
    return ImageDataset(images=data.images[order], labels=data.labels[order], class_names=data.class_names,
                        name=f"{data.name}-subset")


def read_reference(run: RunDir) -> dict | None:
    """The private real-data reference of a run, if it was measured."""
    path = run.root / PRIVATE_DIR / REFERENCE_FILE
    return read_json(path) if path.exists() else None


def run_evaluation(
    cfg: DictConfig, run: RunDir, train: ImageDataset, test: ImageDataset, cache_dir: Path, device: torch.device
) -> dict:
    e = cfg.evaluate
    synthetic = load_synthetic(run)
    metrics: dict = {"samples": len(synthetic)}
    def accuracy(train_set: LabelledImages, augment: float = 0.0) -> dict[str, float]:
        return downstream_accuracy(train_set, test.images, test.labels, classifiers=tuple(e.classifiers),
                                   epochs=e.classifier_epochs, augment=augment, seed=cfg.seed, device=str(device))

    metrics["accuracy"] = accuracy(synthetic)
    if e.augment > 0:
        metrics["accuracy_augmented"] = accuracy(synthetic, augment=e.augment)
    if e.reference:
        subset = _subset(train, len(synthetic), cfg.seed)
        write_json(run.root / PRIVATE_DIR / REFERENCE_FILE,
                   {"train_images": len(subset.labels), "accuracy": accuracy(subset)})
    if e.fid:
        extractor = InceptionFeatures(e.fid_weights, device=str(device))
        real = feature_stats(_first(train.images, e.fid_samples, cfg.seed), extractor, cache_dir / "fid")
        fake = feature_stats(_first(synthetic.images, e.fid_samples, cfg.seed), extractor)
        metrics["fid"] = fid_from_stats(real.mu, real.sigma, fake.mu, fake.sigma)
        metrics["fid_samples"] = {"real": len(real.features), "synthetic": len(fake.features)}
        precision, recall = precision_recall(real.features, fake.features, k=e.knn_k)
        metrics["precision"], metrics["recall"] = precision, recall
    metrics["memorization"] = memorization(synthetic.images, train.images, test.images)
    write_bytes(run.root / PRIVATE_DIR / "closest_pairs.png", closest_pairs_figure(synthetic.images, train.images))
    write_json(run.metrics, metrics)
    return metrics
