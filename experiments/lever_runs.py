"""What the lever benchmarks share: a new run directory on a base run's split, and the validation score.

A lever run reuses the base run's split key (so the same images are train and test), with its own
ledger and budget. Scores are the plain downstream CNN (no augmentation, `evaluate.classifier_epochs`)
on the real *training* split by default (`--split train`: the models saw it only through DP), or on the
test split (`--split test`, for a final choice only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from privimage.config import load_config
from privimage.data import ImageDataset
from privimage.evaluation.downstream import downstream_accuracy
from privimage.evaluation.public_share import public_share
from privimage.pipeline import Pipeline
from privimage.rundir import RunDir
from privimage.builders import load_denoiser
from privimage.stages.sample import generate
from privimage.synthetic import balanced_labels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="a run directory whose split to reuse")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("overrides", nargs="*")


def open_on_base(args: argparse.Namespace) -> tuple[Pipeline, ImageDataset]:
    """The lever's pipeline (locked, created) and the real split it is scored on."""
    cfg = load_config(config_file=args.base / "config.yaml", overrides=["minutes=null", *args.overrides])
    pipeline = Pipeline(cfg, args.out, split_key=RunDir(args.base).split_key.read_bytes()).validate().create()
    return pipeline, pipeline.sensitive_train if args.split == "train" else pipeline.sensitive_test


def cnn_accuracy(pipeline: Pipeline, synthetic: ImageDataset, real: ImageDataset) -> float:
    cfg = pipeline.cfg
    return downstream_accuracy(synthetic, real.images, real.labels, classifiers=["cnn"],
                               epochs=cfg.evaluate.classifier_epochs, seed=cfg.seed, progress=False)["cnn"]


def public_shares(pipeline: Pipeline, probes: dict[str, np.ndarray], seed: int | None = None) -> dict[str, float]:
    """The share of each probe set that the evaluate stage's public-vs-sensitive CNN calls public (a private
    measure: it trains on the sensitive training split); the CNN is seeded by `seed`, default the run's."""
    return public_share(pipeline.public.images, pipeline.sensitive_train.images, probes,
                        seed=pipeline.cfg.seed if seed is None else seed, device=str(pipeline.device))


def public_share_of(pipeline: Pipeline, synthetic: ImageDataset) -> float:
    return public_shares(pipeline, {"synthetic": synthetic.images})["synthetic"]


def diffusion_samples(pipeline: Pipeline, model: Path) -> ImageDataset:
    """`sample.n` balanced samples of a saved denoiser, from the run's seed."""
    cfg, names = pipeline.cfg, pipeline.sensitive_train.class_names
    net = load_denoiser(cfg, len(names), model, pipeline.device)
    return generate(net, names, balanced_labels(cfg.sample.n, len(names)), cfg, pipeline.device,
                    torch.Generator().manual_seed(cfg.seed))
