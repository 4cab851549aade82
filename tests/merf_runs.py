"""Shared by the tests of the two runs that release DP-MERF embeddings: method=dpmerf and privimage's warm start."""

import json

import torch

from privimage.checkpoint import load_checkpoint
from privimage.config import load_config
from privimage.data import to_tensor
from privimage.merf import embedding_sum
from privimage.pipeline import Pipeline
from privimage.stages.dpmerf import random_features
from privimage.stages.warmstart import trained_features


def quick(cache_dir, *overrides):
    return load_config("quick", None, [f"data.cache_dir={cache_dir}", *overrides])


def finished_run(root, cfg) -> Pipeline:
    pipeline = Pipeline(cfg, root).validate().create()
    pipeline.run_all()
    pipeline.close()
    return pipeline


def release_residual(root, pipeline: Pipeline, stage: str) -> tuple[torch.Tensor, float]:
    """The released embedding minus the exact sum recomputed here from the training split, and the
    noise multiplier the ledger booked for it."""
    noisy = load_checkpoint(root / stage / "embedding.safetensors")[0]["noisy_sum"]
    train = pipeline.sensitive_train
    cfg = pipeline.cfg
    features = (trained_features(cfg, pipeline.public, pipeline.cache_dir, pipeline.device) if stage == "warmstart"
                else random_features(cfg))
    exact = embedding_sum(features, [(to_tensor(train.images), torch.as_tensor(train.labels))],
                          train.num_classes)
    (entry,) = [e for e in json.loads((root / "privacy.json").read_text())["entries"] if e["stage"] == stage]
    return noisy - exact, entry["noise_multiplier"]
