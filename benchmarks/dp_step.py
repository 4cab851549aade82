"""Cost of privacy per step: DP-SGD step time / non-private step time, default U-Net, batch 64.

    python benchmarks/dp_step.py [--preset default] [--batch 64 --repeats 7] [key=value ...]

Both steps see the same data and loss with the same noise multiplicity K (the non-private step runs
the batch K times over and averages); the DP step adds per-sample gradients, clipping and noise.
The two steps alternate, `--repeats` timed rounds after a warm-up, and the medians are compared;
torch's default thread count. The DP step runs micro-batches of `--batch` rows (samples x K).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from privimage.config import load_config
from privimage.builders import build_denoiser, diffusion_loss
from privimage.privacy.dpsgd import DPSGD


def median_seconds(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time of each step; the steps take turns, so a change in machine load hits them alike."""
    for step in steps.values():
        step()  # warm-up: allocator, thread pool, first-call dispatch
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--multiplicities", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("overrides", nargs="*", help="config key=value, e.g. model.base_channels=32")
    args = parser.parse_args()
    cfg = load_config(args.preset, overrides=args.overrides)
    resolution, channels = cfg.data.resolution, cfg.data.channels

    torch.manual_seed(0)
    net = build_denoiser(cfg, args.classes).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.randn(args.batch, channels, resolution, resolution)
    y = torch.arange(args.batch) % args.classes
    loss_fn = diffusion_loss(cfg, args.classes)

    params = sum(p.numel() for p in net.parameters())
    print(f"{params:,} parameters, batch {args.batch}, {channels}x{resolution}x{resolution}, "
          f"{torch.get_num_threads()} threads")
    for k in args.multiplicities:
        def plain_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net, x.repeat_interleave(k, dim=0), y.repeat_interleave(k, dim=0)).mean().backward()
            optimizer.step()

        engine = DPSGD(net, loss_fn, clip_norm=1e-3, noise_multiplier=1.0, expected_batch_size=args.batch,
                       noise_multiplicity=k, max_physical_batch=args.batch)
        seconds = median_seconds({"plain": plain_step, "dp": lambda: engine.step(x, y, optimizer)}, args.repeats)
        plain, private = seconds["plain"], seconds["dp"]
        print(f"K={k}: non-private {plain * 1e3:.0f} ms, DP-SGD {private * 1e3:.0f} ms, ratio {private / plain:.2f}x")


if __name__ == "__main__":
    main()
