"""Stage 5b: measure the synthetic set against the real data; writes `metrics.json`.

Evaluation reads the sensitive data only to measure, and its outputs are for the data owner: the
closest-pairs picture shows real training images, so it goes under `private/`, never in the report.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from privimage.data import ImageDataset
from privimage.evaluation.downstream import downstream_accuracy
from privimage.evaluation.fid import InceptionFeatures, feature_stats, fid_from_stats
from privimage.evaluation.manifold import precision_recall
from privimage.evaluation.memorization import closest_pairs_figure, memorization
from privimage.atomic import write_bytes, write_json
from privimage.rundir import RunDir


def load_synthetic(run: RunDir) -> ImageDataset:
    with np.load(run.synthetic) as data:
        return ImageDataset(images=data["images"], labels=data["labels"].astype(np.int64),
                            class_names=tuple(str(n) for n in data["class_names"]), name="synthetic")


def _first(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded random subset of `n` images (all if fewer)."""
    order = np.random.default_rng(seed).permutation(len(images))[:n]
    return images[np.sort(order)]


def run_evaluation(
    cfg: DictConfig, run: RunDir, train: ImageDataset, test: ImageDataset, device: torch.device
) -> dict:
    """FID and precision/recall against the test split; memorization compares with the training split."""
    e = cfg.evaluate
    synthetic = load_synthetic(run)
    metrics: dict = {"samples": len(synthetic)}
    metrics["accuracy"] = downstream_accuracy(
        synthetic, test.images, test.labels, classifiers=tuple(e.classifiers), epochs=e.classifier_epochs,
        augment=e.augment, seed=cfg.seed, device=str(device),
    )
    if e.fid:
        extractor = InceptionFeatures(e.fid_weights, device=str(device))
        real = feature_stats(_first(test.images, e.fid_samples, cfg.seed), extractor, run.private / "fid", private=True)
        fake = feature_stats(_first(synthetic.images, e.fid_samples, cfg.seed), extractor)
        metrics["fid"] = fid_from_stats(real.mu, real.sigma, fake.mu, fake.sigma)
        metrics["fid_samples"] = {"real": len(real.features), "synthetic": len(fake.features)}
        precision, recall = precision_recall(real.features, fake.features, k=e.knn_k)
        metrics["precision"], metrics["recall"] = precision, recall
    metrics["memorization"] = memorization(synthetic.images, train.images, test.images)
    write_bytes(run.private / "closest_pairs.png", closest_pairs_figure(synthetic.images, train.images), private=True)
    write_json(run.metrics, metrics)
    return metrics
