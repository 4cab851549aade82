"""Accuracy against pretraining steps: one pretraining, scored at several step counts.

Runs privimage's semantics and warm-start stages in a new run directory on a base run's split, then
pretrains on their images, resuming the same (constant learning rate) training at each of `--at`:
the EMA model at step s is the one a run of s steps would have. Each is scored like
warm_start_levers.py: `sample.n` images, the plain CNN, the real *training* split by default.

  PYTHONPATH=src python experiments/pretrain_curve.py --base runs/base --out runs/curve --at 500,1000,2000 \
      [sample.steps=10 pretrain.lr=2e-3 ...]
Prints one JSON line per step count: accuracy, seconds of pretraining so far.
"""

from __future__ import annotations

import argparse
import json
import time

from omegaconf import OmegaConf

from lever_runs import add_arguments, cnn_accuracy, diffusion_samples, open_on_base
from privimage.stages.pretrain import pretrain, pretraining_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at", type=lambda text: [int(n) for n in text.split(",")], required=True,
                        help="step counts to score, ascending, e.g. 500,1000,2000")
    add_arguments(parser)
    args = parser.parse_args()
    pipeline, real = open_on_base(args)
    cfg = pipeline.cfg
    for stage in pipeline.stages()[:pipeline.stages().index("pretrain")]:
        pipeline.run_stage(stage)
    data, weights = pretraining_data(pipeline)
    model, seconds = pipeline.run.pretrain_dir / "curve.safetensors", 0.0
    for steps in args.at:
        step_cfg = OmegaConf.merge(cfg, {"pretrain": {"steps": steps, "checkpoint_every": steps}})
        started = time.perf_counter()
        pretrain(step_cfg, pipeline.run, data, pipeline.device, model, weights)  # resumes from the last count's checkpoint
        seconds += time.perf_counter() - started
        accuracy = cnn_accuracy(pipeline, diffusion_samples(pipeline, model), real)
        print(json.dumps({"steps": steps, "accuracy": accuracy, "pretrain_seconds": round(seconds, 1),
                          "split": args.split, "overrides": args.overrides}), flush=True)
    pipeline.close()


if __name__ == "__main__":
    main()
