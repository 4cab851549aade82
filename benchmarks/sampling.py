"""Sampling throughput of the default model: images per second of its sampler (sample.*) at batch 100.

    python benchmarks/sampling.py [--preset default] [--batch 100 --steps N] [key=value ...]

The weights are random: the cost of sampling does not depend on them.
"""

from __future__ import annotations

import argparse
import time

import torch

from privimage.config import load_config
from privimage.diffusion import edm_sample
from privimage.builders import build_denoiser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="default: sample.steps")
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

    steps = args.steps or cfg.sample.steps
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.sample.bf16):
        edm_sample(denoiser, labels, shape=shape, num_classes=args.classes, steps=steps, solver="heun")
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in denoiser.parameters())
    print(f"{args.batch} images {channels}x{resolution}x{resolution}, {params:,} parameters, "
          f"{steps} Heun steps ({2 * steps - 1} model calls), bf16 {cfg.sample.bf16}, {torch.get_num_threads()} threads: "
          f"{seconds:.1f} s, {args.batch / seconds:.1f} img/s")


if __name__ == "__main__":
    main()
