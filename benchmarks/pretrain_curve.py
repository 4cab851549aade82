"""Accuracy against pretraining steps: one pretraining, scored at several step counts.

Runs privimage's semantics and warm-start stages in a new run directory on a base run's split, then
pretrains on their images, resuming the same (constant learning rate) training at each of `--at`:
the EMA model at step s is the one a run of s steps would have. Each is scored like
warm_start_levers.py: `sample.n` images, the plain CNN, the real *training* split by default.

  PYTHONPATH=src python benchmarks/pretrain_curve.py --base runs/base --out runs/curve --at 500,1000,2000 \
      [sample.steps=10 pretrain.lr=2e-3 ...]
Prints one JSON line per step count: accuracy, seconds of pretraining so far.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from privimage.config import load_config
from privimage.evaluation.downstream import downstream_accuracy
from privimage.pipeline import Pipeline
from privimage.rundir import RunDir
from privimage.stages.pretrain import load_denoiser, pretrain, pretraining_data
from privimage.stages.sample import balanced_labels, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a run directory whose split to reuse")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--at", type=lambda text: [int(n) for n in text.split(",")], required=True,
                        help="step counts to score, ascending, e.g. 500,1000,2000")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(config_file=args.base / "config.yaml", overrides=["minutes=null", *args.overrides])
    pipeline = Pipeline(cfg, args.out, split_key=RunDir(args.base).split_key.read_bytes()).validate().create()
    cfg, device, names = pipeline.cfg, pipeline.device, pipeline.sensitive_train.class_names
    real = pipeline.sensitive_train if args.split == "train" else pipeline.sensitive_test
    for stage in pipeline.stages()[:pipeline.stages().index("pretrain")]:
        pipeline.run_stage(stage)
    data = pretraining_data(pipeline)
    model, seconds = pipeline.run.pretrain_dir / "curve.safetensors", 0.0
    for steps in args.at:
        step_cfg = OmegaConf.merge(cfg, {"pretrain": {"steps": steps, "checkpoint_every": steps}})
        started = time.perf_counter()
        pretrain(step_cfg, pipeline.run, data, device, model)  # resumes from the last step count's checkpoint
        seconds += time.perf_counter() - started
        net = load_denoiser(cfg, len(names), model, device)
        synthetic = generate(net, names, balanced_labels(cfg.sample.n, len(names)), cfg, device,
                             torch.Generator().manual_seed(cfg.seed))
        accuracy = downstream_accuracy(synthetic, real.images, real.labels, classifiers=["cnn"],
                                       epochs=cfg.evaluate.classifier_epochs, seed=cfg.seed, progress=False)["cnn"]
        print(json.dumps({"steps": steps, "accuracy": accuracy, "pretrain_seconds": round(seconds, 1),
                          "split": args.split, "overrides": args.overrides}), flush=True)
    pipeline.close()


if __name__ == "__main__":
    main()
