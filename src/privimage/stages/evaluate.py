"""Stage: measure the synthetic set against the real data; writes `metrics.json`.

Evaluation reads the sensitive data only to measure, and its outputs are for the data owner: the
closest-pairs picture shows real training images, so it goes under `private/`, never in the report.

The headline downstream accuracy follows DPImageBench: the classifiers train on the synthetic set with
no data-specific augmentation and fixed hyperparameters, and are tested on the real test split. With
`evaluate.augment > 0` the same classifiers are also trained with augmentation, reported beside it as
`accuracy_augmented` (it measures the classifier's augmentation as much as the data). With
`evaluate.reference` they are trained on as many real *training* images as there are synthetic ones:
what real data of that size would give. It is a statistic of the sensitive training split, so it goes
to `private/reference.json` only. So does `evaluate.public_share`: a small CNN trained to tell the public
images from the sensitive training images gives the share of the synthetic set, and of the real test
split, that it calls public (evaluation/public_share.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig

from privimage import distributed
from privimage.data import ImageDataset
from privimage.evaluation.downstream import LabelledImages, downstream_accuracy
from privimage.evaluation.fid import InceptionFeatures, feature_stats, fid_from_stats
from privimage.evaluation.manifold import precision_recall
from privimage.evaluation.memorization import closest_pairs_figure, memorization
from privimage.evaluation.public_share import public_share
from privimage.atomic import read_json, write_bytes, write_json
from privimage.rundir import RunDir
from privimage.synthetic import load_synthetic

if TYPE_CHECKING:
    from privimage.pipeline import Pipeline

REFERENCE_FILE = "reference.json"  # under private/
PUBLIC_SHARE_FILE = "public_share.json"  # under private/


def seeded_subset(data: ImageDataset, n: int, seed: int) -> ImageDataset:
    """A seeded random subset of `n` labelled images (all if fewer), in their original order."""
    order = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    return data.subset(order)


def read_reference(run: RunDir) -> dict | None:
    """The private real-data reference of a run, if it was measured."""
    path = run.private / REFERENCE_FILE
    return read_json(path) if path.exists() else None


def read_public_share(run: RunDir) -> dict | None:
    """The private public-share measure of a run, if it was measured."""
    path = run.private / PUBLIC_SHARE_FILE
    return read_json(path) if path.exists() else None


def run_evaluation(
    cfg: DictConfig, run: RunDir, train: ImageDataset, test: ImageDataset, device: torch.device,
    public: ImageDataset | None = None,
) -> dict:
    """FID and precision/recall against the test split; memorization compares with the training split;
    the public share (with `public`) tells the synthetic set and the test split from `public`."""
    e = cfg.evaluate
    synthetic = load_synthetic(run)
    metrics: dict = {"samples": len(synthetic)}

    def accuracy(train_set: LabelledImages, augment: float = 0.0, progress: bool = True) -> dict[str, float]:
        return downstream_accuracy(train_set, test.images, test.labels, classifiers=tuple(e.classifiers),
                                   epochs=e.classifier_epochs, augment=augment, seed=cfg.seed, device=str(device),
                                   progress=progress)

    metrics["accuracy"] = accuracy(synthetic)
    if e.augment > 0:
        metrics["accuracy_augmented"] = accuracy(synthetic, augment=e.augment)
    if e.reference:
        subset = seeded_subset(train, len(synthetic), cfg.seed)
        write_json(run.private / REFERENCE_FILE, {"train_images": len(subset), "accuracy": accuracy(subset, progress=False)},
                   private=True)
    if e.public_share and public is not None:
        shares = public_share(public.images, train.images, {"synthetic": synthetic.images, "real_test": test.images},
                              seed=cfg.seed, device=str(device))
        write_json(run.private / PUBLIC_SHARE_FILE, {"public_set": public.name, **shares}, private=True)
    if e.fid:
        extractor = InceptionFeatures(e.fid_weights, device=str(device))
        real = feature_stats(seeded_subset(test, e.fid_samples, cfg.seed).images, extractor, run.private / "fid",
                             private=True)
        fake = feature_stats(seeded_subset(synthetic, e.fid_samples, cfg.seed).images, extractor)
        metrics["fid"] = fid_from_stats(real.mu, real.sigma, fake.mu, fake.sigma)
        metrics["fid_samples"] = {"real": len(real.features), "synthetic": len(fake.features)}
        precision, recall = precision_recall(real.features, fake.features, k=e.knn_k)
        metrics["precision"], metrics["recall"] = precision, recall
    metrics["memorization"] = memorization(synthetic.images, train.images, test.images)
    write_bytes(run.private / "closest_pairs.png", closest_pairs_figure(synthetic.images, train.images), private=True)
    write_json(run.metrics, metrics, private=True)  # measured on real images (rundir.FILES)
    return metrics


def run(pipeline: Pipeline) -> None:
    """Rank 0 alone: evaluation is cheap next to training."""
    if distributed.is_main():
        run_evaluation(pipeline.cfg, pipeline.run, pipeline.sensitive_train, pipeline.sensitive_test, pipeline.device,
                       pipeline.public if pipeline.cfg.evaluate.public_share else None)
