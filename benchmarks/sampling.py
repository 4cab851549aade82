"""Sampling throughput of the default model: images per second of an 18-step Heun sampler at batch 100.

    python benchmarks/sampling.py [--preset default] [--batch 100 --steps 18] [key=value ...]

The weights are random: the cost of sampling does not depend on them.
"""

from __future__ import annotations

import argparse
import time

import torch

from privimage.config import load_config
from privimage.diffusion import edm_sample
from privimage.stages.pretrain import build_denoiser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", help="config key=value, e.g. model.base_channels=32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, overrides=args.overrides)
    resolution, channels = cfg.data.resolution, cfg.data.channels

    denoiser = build_denoiser(cfg, args.classes).eval()
    labels = torch.arange(args.batch) % args.classes
    shape = (channels, resolution, resolution)
    edm_sample(denoiser, labels[:2], shape=shape, num_classes=args.classes, steps=2)  # warm-up

    start = time.perf_counter()
    edm_sample(denoiser, labels, shape=shape, num_classes=args.classes, steps=args.steps, solver="heun")
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in denoiser.parameters())
    print(f"{args.batch} images {channels}x{resolution}x{resolution}, {params:,} parameters, "
          f"{args.steps} Heun steps ({2 * args.steps - 1} model calls), {torch.get_num_threads()} threads: "
          f"{seconds:.1f} s, {args.batch / seconds:.1f} img/s")


if __name__ == "__main__":
    main()
