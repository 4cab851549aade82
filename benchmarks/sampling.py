"""Sampling throughput of the default model: images per second of an 18-step Heun sampler at batch 100.

    python benchmarks/sampling.py [--resolution 28 --channels 1 --base-channels 32 --batch 100 --steps 18]

The weights are random: the cost of sampling does not depend on them.
"""

from __future__ import annotations

import argparse
import time

import torch

from privimage.diffusion import EDMPrecond, UNet, edm_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    unet = UNet(resolution=args.resolution, in_channels=args.channels, num_classes=args.classes,
                base_channels=args.base_channels)
    denoiser = EDMPrecond(unet).eval()
    labels = torch.arange(args.batch) % args.classes
    shape = (args.channels, args.resolution, args.resolution)
    edm_sample(denoiser, labels[:2], shape=shape, num_classes=args.classes, steps=2)  # warm-up

    start = time.perf_counter()
    edm_sample(denoiser, labels, shape=shape, num_classes=args.classes, steps=args.steps, solver="heun")
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in unet.parameters())
    print(f"{args.batch} images {args.channels}x{args.resolution}x{args.resolution}, {params:,} parameters, "
          f"{args.steps} Heun steps ({2 * args.steps - 1} model calls), {torch.get_num_threads()} threads: "
          f"{seconds:.1f} s, {args.batch / seconds:.1f} img/s")


if __name__ == "__main__":
    main()
