"""The warm start's images redrawn by a finished run's fine-tuned model (SDEdit), at several noise levels.

Each variant draws `sample.n` balanced images from the run's warm-start generator and redraws them from
`sample.warm_start_sigma` in `sample.warm_start_steps` Heun steps (the sample stage's own call); `mix_` variants
replace the first half of each set with the run's pure-noise samples. Post-processing of the run's DP
outputs. Each set is scored with the plain downstream CNN on the real *training* split (the validation measure)
and the public share (the evaluate stage's public-vs-sensitive CNN; a private measure).

  PYTHONPATH=src python experiments/redraw_levers.py RUN --variants 0.5:4 1:5 2:6
RUN: a finished run whose synthetic.npz holds pure-noise samples (`sample.warm_start_share=0`, or a run made
before that key). Prints one line per set as it is scored, then one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from privimage.builders import MODEL_FILE, load_denoiser
from privimage.config import load_config
from privimage.data import ImageDataset
from privimage.evaluation.downstream import downstream_accuracy
from privimage.evaluation.public_share import public_share
from privimage.pipeline import Pipeline
from privimage.stages.sample import generate
from privimage.stages.warmstart import warm_start_images
from privimage.synthetic import balanced_labels, load_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--variants", nargs="+", default=["0.5:4", "1:5", "2:6"], help="sigma:steps")
    args = parser.parse_args()
    for root in args.runs:
        cfg = load_config(config_file=root / "config.yaml", overrides=["minutes=null"])
        pipeline = Pipeline(cfg, root)
        real, names, device = pipeline.sensitive_train, pipeline.sensitive_train.class_names, pipeline.device
        labels = balanced_labels(cfg.sample.n, len(names))
        net = load_denoiser(cfg, len(names), pipeline.run.finetune_dir / MODEL_FILE, device)
        noise, drawn = load_synthetic(pipeline.run), warm_start_images(cfg, pipeline.run, names, device, labels)
        sets = {"pure noise": noise, "generator": drawn}
        for variant in args.variants:
            sigma, steps = variant.split(":")
            at = OmegaConf.merge(cfg, {"sample": {"warm_start_sigma": float(sigma), "warm_start_steps": int(steps)}})
            sets[f"redrawn {variant}"] = generate(net, names, labels, at, device, torch.Generator().manual_seed(cfg.seed),
                                                  redraw=drawn.images)
        half = len(labels) // 2
        for name in [k for k in sets if k.startswith("redrawn")]:
            sets[f"mix {name}"] = ImageDataset(np.concatenate([noise.images[:half], sets[name].images[half:]]),
                                               labels.numpy().astype(np.int64), names, name="mix")
        scores = {}
        for name, data in sets.items():
            scores[name] = round(downstream_accuracy(data, real.images, real.labels, classifiers=["cnn"],
                                                     epochs=cfg.evaluate.classifier_epochs, seed=cfg.seed,
                                                     progress=False)["cnn"], 4)
            print(root.name, name, scores[name], flush=True)
        shares = public_share(pipeline.public.images, real.images, {k: d.images for k, d in sets.items()},
                              seed=cfg.seed, device=str(device))
        print(json.dumps({"run": str(root), **{k: {"accuracy": scores[k], "public_share": round(shares[k], 4)}
                                                for k in sets}}), flush=True)


if __name__ == "__main__":
    main()
