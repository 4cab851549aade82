"""Warm-start levers: score the warm start's generator, the model pretrained on its images, and the
fine-tuned model, each with the plain downstream CNN.

Runs privimage's own stages (semantics, warmstart, pretrain, finetune) in a new run directory on a
base run's split, with its own ledger and budget. Each model samples `sample.n` images, scored by the
plain CNN (no augmentation, `evaluate.classifier_epochs`) on the real *training* split (`--split
train`, the validation measure levers are chosen on: the models saw it only through DP) or on the
test split (`--split test`, for a final choice only).

  PYTHONPATH=src python benchmarks/warm_start_levers.py --base runs/base --out runs/warm/a \
      pretrain.steps=1000 finetune.steps=90 sample.steps=10 [warm_start.samples=10000 dpmerf.steps=200 ...]
Prints one JSON line: the variant, the three accuracies, ε spent, stage seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from privimage.atomic import read_json
from privimage.config import load_config
from privimage.data import ImageDataset
from privimage.evaluation.downstream import downstream_accuracy
from privimage.pipeline import Pipeline
from privimage.rundir import RunDir
from privimage.stages.dpmerf import generator_images, load_generator
from privimage.stages.pretrain import MODEL_FILE, load_denoiser
from privimage.stages.sample import balanced_labels, generate
from privimage.stages.warmstart import generator_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a run directory whose split to reuse")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(config_file=args.base / "config.yaml", overrides=["minutes=null", *args.overrides])
    pipeline = Pipeline(cfg, args.out, split_key=RunDir(args.base).split_key.read_bytes()).validate().create()
    cfg, device, names = pipeline.cfg, pipeline.device, pipeline.sensitive_train.class_names
    real = pipeline.sensitive_train if args.split == "train" else pipeline.sensitive_test
    accuracy, seconds = {}, {}

    def score(what: str, synthetic: ImageDataset) -> None:
        accuracy[what] = downstream_accuracy(synthetic, real.images, real.labels, classifiers=["cnn"],
                                             epochs=cfg.evaluate.classifier_epochs, seed=cfg.seed,
                                             progress=False)["cnn"]

    def diffusion_samples(model: Path) -> ImageDataset:
        net = load_denoiser(cfg, len(names), model, device)
        return generate(net, names, balanced_labels(cfg.sample.n, len(names)), cfg, device,
                        torch.Generator().manual_seed(cfg.seed))

    for stage in ("semantics", "warmstart", "pretrain", "finetune"):
        seconds[stage] = round(pipeline.run_stage(stage).seconds, 1)
        if stage == "warmstart":
            generator = load_generator(cfg, generator_file(pipeline.run), len(names), device)
            score("generator", generator_images(generator, cfg.sample.n, names, cfg.seed + 1))
        elif stage == "pretrain":
            score("pretrained", diffusion_samples(pipeline.run.pretrain_dir / MODEL_FILE))
        elif stage == "finetune":
            score("finetuned", diffusion_samples(pipeline.run.finetune_dir / MODEL_FILE))
    pipeline.close()
    print(json.dumps({"out": str(args.out), "overrides": args.overrides, "split": args.split, "accuracy": accuracy,
                      "epsilon": read_json(pipeline.run.ledger)["spent"]["epsilon"], "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
