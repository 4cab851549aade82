"""Where each class's synthetic images come from, and how public they look: levers on a finished default run.

The sets, all post-processing of the run's DP outputs (its fine-tuned model, warm-start generator and release):
  redrawn            the run's own synthetic set (the generator's median-filtered images redrawn from σ)
  unfiltered σ S     the generator's images as drawn (no median filter) redrawn from σ S (`--sigmas`)
  pure noise         the fine-tuned model's samples from pure noise
  fit rule           per class, pure noise for the share its public picks fit (pretrain.json's `public_fit`
                     weights), redrawn for the rest: the generator only where the public data falls short
  release rule       per class, the mix of pure noise and redrawn whose mean random-feature embedding is
                     nearest the warm start's released class mean (a least-squares share in [0, 1])
Each set is scored with the plain downstream CNN on the real *training* split (the validation measure) and the
public share: the evaluate stage's public-vs-sensitive CNN, trained once per `--seeds` seed, averaged; with the
real test images' share beside it (a private measure: the output is the data owner's).

  PYTHONPATH=src python experiments/source_levers.py RUN [RUN ...] [--sigmas 1 1.5] [--seeds 0 1 2]
Prints one JSON line per run, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from privimage.builders import MODEL_FILE, load_denoiser
from privimage.checkpoint import load_checkpoint
from privimage.config import load_config
from privimage.data import ImageDataset, to_tensor
from privimage.merf import class_means
from privimage.pipeline import Pipeline
from privimage.stages.dpmerf import EMBEDDING_FILE, random_features
from privimage.stages.sample import generate
from privimage.stages.warmstart import STAGE as WARM_START, warm_start_images
from privimage.synthetic import balanced_labels, load_synthetic

from lever_runs import cnn_accuracy, public_shares


def per_class_mix(noise: np.ndarray, redrawn: np.ndarray, labels: np.ndarray, noise_share: np.ndarray) -> np.ndarray:
    """Class c's first round(noise_share[c] * n_c) images from `noise`, the rest from `redrawn`."""
    mixed = redrawn.copy()
    for c, share in enumerate(noise_share):
        rows = np.flatnonzero(labels == c)
        take = rows[:int(round(share * len(rows)))]
        mixed[take] = noise[take]
    return mixed


def fit_shares(root: Path, class_names: tuple[str, ...]) -> np.ndarray:
    """Each class's mean pick weight from pretrain.json (0 where it kept no public class)."""
    fit = json.loads((root / "stages" / "pretrain.json").read_text())["public_fit"]
    return np.array([np.mean(list(fit[name].values())) if fit.get(name) else 0.0 for name in class_names])


def release_shares(cfg, root: Path, noise: np.ndarray, redrawn: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class, the share a of pure noise minimising ‖a μ_noise + (1 − a) μ_redrawn − m‖² over the random
    features' part of the release (m its noisy class mean; the noise adds a constant, not a bias, in a)."""
    features, width = random_features(cfg), 2 * cfg.dpmerf.features
    released = class_means(load_checkpoint(root / WARM_START / EMBEDDING_FILE)[0]["noisy_sum"]).double()
    target = released[:, :width] / math.sqrt(1 - cfg.warm_start.public_features)

    def means(images: np.ndarray) -> torch.Tensor:
        phi = features(to_tensor(torch.from_numpy(images))).double()
        return torch.stack([phi[torch.as_tensor(labels == c)].mean(0) for c in range(len(target))])

    mu_noise, mu_redrawn = means(noise), means(redrawn)
    step = mu_noise - mu_redrawn
    return (((target - mu_redrawn) * step).sum(1) / step.pow(2).sum(1)).clamp(0, 1).numpy()


def score_run(root: Path, sigmas: list[float], seeds: list[int]) -> dict:
    cfg = load_config(config_file=root / "config.yaml", overrides=["minutes=null"])
    pipeline = Pipeline(cfg, root)
    real, names, device = pipeline.sensitive_train, pipeline.sensitive_train.class_names, pipeline.device
    labels = balanced_labels(cfg.sample.n, len(names))
    numpy_labels = labels.numpy().astype(np.int64)
    net = load_denoiser(cfg, len(names), pipeline.run.finetune_dir / MODEL_FILE, device)
    rng = lambda: torch.Generator().manual_seed(cfg.seed)  # noqa: E731
    redrawn = load_synthetic(pipeline.run).images
    noise = generate(net, names, labels, cfg, device, rng()).images
    sets = {"redrawn": redrawn}
    unfiltered = OmegaConf.merge(cfg, {"warm_start": {"median_filter": 1}})
    drawn = warm_start_images(unfiltered, pipeline.run, names, device, labels).images
    for sigma in sigmas:
        at = OmegaConf.merge(unfiltered, {"sample": {"warm_start_sigma": sigma}})
        sets[f"unfiltered σ {sigma:g}"] = generate(net, names, labels, at, device, rng(), redraw=drawn).images
    sets["pure noise"] = noise
    sets["fit rule"] = per_class_mix(noise, redrawn, numpy_labels, fit_shares(root, names))
    sets["release rule"] = per_class_mix(noise, redrawn, numpy_labels,
                                         release_shares(cfg, root, noise, redrawn, numpy_labels))
    accuracy = {name: cnn_accuracy(pipeline, ImageDataset(images, numpy_labels, names, name=name), real)
                for name, images in sets.items()}
    probes = {**sets, "real test": pipeline.sensitive_test.images}
    shares = [public_shares(pipeline, probes, seed) for seed in seeds]
    return {"run": str(root), "accuracy": {k: round(v, 4) for k, v in accuracy.items()},
            "public_share": {k: round(float(np.mean([s[k] for s in shares])), 4) for k in probes}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--sigmas", nargs="*", type=float, default=[1.0, 1.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    results = []
    for root in args.runs:
        results.append(score_run(root, args.sigmas, args.seeds))
        print(json.dumps(results[-1]), flush=True)
    columns = list(results[0]["accuracy"])
    print("\n| run | " + " | ".join(columns) + " | real test (public) |")
    print("|---|" + "---|" * (len(columns) + 1))
    for result in results:
        cells = [f"{100 * result['accuracy'][c]:.1f} % ({100 * result['public_share'][c]:.1f} %)" for c in columns]
        print(f"| {result['run']} | " + " | ".join(cells) + f" | {100 * result['public_share']['real test']:.1f} % |")


if __name__ == "__main__":
    main()
