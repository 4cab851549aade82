"""DP-SGD throughput (images/s) and peak GPU memory of the `paper` model at the paper's batch sizes.

    python benchmarks/gpu_dpsgd.py [--logical 4096 8192 16384] [--physical 512] [--k 8] [--steps 3]

One logical batch of B images runs as micro-batches of `--physical` rows (samples x K noise draws),
exactly as `privimage finetune` does; the timed steps follow one warm-up step. Needs CUDA (pass
`--device cpu` with small batches for a smoke test). Under bf16 autocast when `--bf16`.
"""

from __future__ import annotations

import argparse
import time

import torch

from privimage.config import load_config
from privimage.builders import build_denoiser, diffusion_loss
from privimage.privacy.dpsgd import DPSGD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logical", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--physical", type=int, default=512, help="rows (samples x K) per forward pass")
    parser.add_argument("--k", type=int, default=8, help="noise multiplicity K")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run on a GPU machine, or pass --device cpu with small batches")
    cfg = load_config("paper", overrides=["data.sensitive=unused", "data.public=unused"])
    torch.manual_seed(0)
    net = build_denoiser(cfg, 10).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-4)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    params = sum(p.numel() for p in net.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"paper model: {params:,} parameters, {shape}, K={args.k}, physical {args.physical} rows, {name}")
    for logical in args.logical:
        engine = DPSGD(net, diffusion_loss(cfg, 10), clip_norm=1e-3, noise_multiplier=1.0,
                       expected_batch_size=logical, noise_multiplicity=args.k, max_physical_batch=args.physical)
        x = torch.randn(logical, *shape, device=device)
        y = torch.arange(logical, device=device) % 10
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for step in range(args.steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                engine.step(x, y, optimizer)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step:  # the first step is warm-up
                times.append(time.perf_counter() - start)
        seconds = sum(times) / len(times)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"logical batch {logical}: {seconds:.2f} s/step, {logical / seconds:,.0f} img/s "
              f"({logical * args.k / seconds:,.0f} rows/s), peak memory {peak:.1f} GiB")


if __name__ == "__main__":
    main()
