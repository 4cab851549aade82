"""The warm start's median filter, paired: one generator fitted to each saved release, scored on its
images as drawn and median-filtered, with the plain downstream CNN.

Each RELEASE is a run directory holding a warm-start release (`warmstart/embedding.safetensors`, e.g. a
`warm_start_levers.py` run); its own config.yaml fixes the features and the generator. Pairing on one
release takes the release's noise, which spreads the generator's score by several points at ε = 1,
out of the comparison. Scored on the base run's real *training* split (the validation measure).

  OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/despeckle_levers.py --base runs/base \
      --out runs/despeckle/a runs/warm/e1a runs/warm/e1b [--widths 1,3,5]
Prints one JSON line a release: its ε, and the accuracy at each filter width (1: none).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lever_runs import cnn_accuracy, open_on_base
from privimage.checkpoint import load_checkpoint
from privimage.config import load_config
from privimage.stages.dpmerf import EMBEDDING_FILE, fitted_generator, generator_images
from privimage.stages.warmstart import STAGE, despeckle, trained_features
from privimage.synthetic import balanced_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a run directory whose split to score on")
    parser.add_argument("--out", type=Path, required=True, help="a new run directory (holds no release)")
    parser.add_argument("--widths", default="1,3", help="median filter widths, 1 for none")
    parser.add_argument("releases", nargs="+", type=Path)
    args = parser.parse_args()
    pipeline, real = open_on_base(argparse.Namespace(base=args.base, out=args.out, split="train", overrides=[]))
    names = real.class_names
    for release in args.releases:
        cfg = load_config(config_file=release / "config.yaml", overrides=["minutes=null"])
        noisy_sum = load_checkpoint(release / STAGE / EMBEDDING_FILE)[0]["noisy_sum"]
        features = trained_features(cfg, pipeline.public, pipeline.cache_dir, pipeline.device)
        generator = fitted_generator(cfg, noisy_sum, features, len(names), pipeline.device, cfg.warm_start.generator_steps).eval()
        drawn = generator_images(generator, balanced_labels(cfg.sample.n, len(names)), names, cfg.seed + 1)
        accuracy = {width: cnn_accuracy(pipeline, despeckle(drawn, int(width)), real) for width in args.widths.split(",")}
        print(json.dumps({"release": str(release), "epsilon": cfg.privacy.epsilon, "accuracy": accuracy}), flush=True)
    pipeline.close()


if __name__ == "__main__":
    main()
