"""The synthetic set's mix: a finished run's diffusion samples and its warm start's generator images, recomposed.

Both are DP outputs of the run, so any mix is post-processing; the lever is `sample.warm_start_share`. Each
share draws `sample.n` images, balanced over the classes: that share of each class from the generator's
`warm_start.samples` images (what pretraining saw), the rest from the run's own `synthetic.npz` (sampled with
no generator images: `sample.warm_start_share=0`, as runs before it was a key). Scored with the plain downstream
CNN on the real *training* split (the validation measure) of the run's own split.

  PYTHONPATH=src python experiments/mixture_levers.py runs/bench/mnist-public-mix/privimage-eps10-15min \
      --shares 0 0.3 0.5 0.7
Prints one JSON line per run and share.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from privimage.config import load_config
from privimage.data import ImageDataset
from privimage.evaluation.downstream import downstream_accuracy
from privimage.pipeline import Pipeline
from privimage.stages.warmstart import warm_start_images
from privimage.synthetic import load_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished privimage runs with a warm start")
    parser.add_argument("--shares", nargs="+", type=float, default=[0.0, 0.3, 0.5, 0.7])
    parser.add_argument("--subset-seed", type=int, default=2, help="which images of each source are drawn")
    args = parser.parse_args()
    for root in args.runs:
        cfg = load_config(config_file=root / "config.yaml", overrides=["minutes=null"])
        pipeline = Pipeline(cfg, root)
        real, names = pipeline.sensitive_train, pipeline.sensitive_train.class_names
        diffusion = load_synthetic(pipeline.run)
        generator = warm_start_images(cfg, pipeline.run, names, pipeline.device)
        rng = np.random.default_rng(args.subset_seed)
        per_class = cfg.sample.n // len(names)
        for share in args.shares:
            from_generator = round(share * per_class)
            parts = [_draw(source, count, rng) for source, count in
                     ((diffusion, per_class - from_generator), (generator, from_generator))]
            mix = ImageDataset(np.concatenate([images for images, _ in parts]),
                               np.concatenate([labels for _, labels in parts]), names, name="mix")
            accuracy = downstream_accuracy(mix, real.images, real.labels, classifiers=["cnn"],
                                           epochs=cfg.evaluate.classifier_epochs, seed=cfg.seed, progress=False)
            print(json.dumps({"run": str(root), "warm_start_share": share, "images": len(mix),
                              "accuracy": round(accuracy["cnn"], 4)}), flush=True)


def _draw(source: ImageDataset, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of each class of `source`, drawn without replacement."""
    index = np.concatenate([rng.permutation(np.flatnonzero(source.labels == c))[:per_class]
                            for c in range(source.num_classes)])
    return source.images[index], source.labels[index]


if __name__ == "__main__":
    main()
