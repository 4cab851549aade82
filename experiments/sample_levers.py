"""Sampling levers: one saved denoiser sampled under variant `sample.*` settings, each set scored.

Sampling is post-processing, so the variants share one model (a lever run's or a finished run's
`finetune/model.safetensors`) and the comparison is paired. Each variant draws `sample.n` balanced images from
the run's seed and is scored like warm_start_levers.py: the plain downstream CNN on the real *training* split
by default, and the public share (lever_runs.public_share_of).

  PYTHONPATH=src python experiments/sample_levers.py --base runs/base --out runs/sample/a \
      --model runs/warm/a/finetune/model.safetensors --variants 'sample.guidance=0' 'sample.guidance=2'
Prints one JSON line per variant (the base run's settings first): accuracy, public share (`--per-class`: of each
class's samples and real images too), sampling seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from lever_runs import add_arguments, cnn_accuracy, diffusion_samples, open_on_base, public_share_of, public_shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a saved denoiser of the base run's classes")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="space-separated key=value settings per variant, e.g. 'sample.guidance=0 sample.steps=8'")
    parser.add_argument("--per-class", action="store_true",
                        help="also the public share of each class's samples and of its real images (the scored split)")
    add_arguments(parser)
    args = parser.parse_args()
    pipeline, real = open_on_base(args)
    base_cfg = pipeline.cfg
    for variant in ["", *args.variants]:
        pipeline.cfg = OmegaConf.merge(base_cfg, OmegaConf.from_dotlist(variant.split()))
        started = time.perf_counter()
        synthetic = diffusion_samples(pipeline, args.model)
        seconds = time.perf_counter() - started
        result = {"variant": variant or "base", "accuracy": cnn_accuracy(pipeline, synthetic, real),
                  "public_share": round(public_share_of(pipeline, synthetic), 4),
                  "sample_seconds": round(seconds, 1), "split": args.split, "model": str(args.model)}
        if args.per_class:
            probes = {f"{side} {name}": data.images[data.labels == c] for side, data in (("synthetic", synthetic),
                      ("real", real)) for c, name in enumerate(real.class_names)}
            result["public_share_by_class"] = {key: round(share, 3) for key, share in
                                               public_shares(pipeline, probes).items()}
        print(json.dumps(result), flush=True)
    pipeline.close()


if __name__ == "__main__":
    main()
