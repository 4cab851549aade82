"""Cost of the DP fine-tuning levers per step: K, bf16 autocast and the trained subset, as ratios.

    python benchmarks/dp_step_levers.py [--batch 64 --repeats 2]

One DPSGD step of the default U-Net on a random batch for each variant; the variants take turns, and
the best time of each is compared with K = 2, float32, all weights (the old default). Uses torch's
thread count: set OMP_NUM_THREADS to measure one thread.
"""

from __future__ import annotations

import argparse
import time

import torch

from privimage.config import load_config
from privimage.diffusion.adapters import set_trainable
from privimage.builders import build_denoiser, diffusion_loss
from privimage.privacy.dpsgd import DPSGD

VARIANTS = [("all", 2, False), ("all", 2, True), ("all", 1, False), ("all", 1, True),
            ("norms_biases", 1, True), ("lora", 1, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config()
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 1, cfg.data.resolution, cfg.data.resolution), torch.randint(0, 10, (args.batch,))
    steps = {}
    for trainable, k, bf16 in VARIANTS:
        net = build_denoiser(cfg, 10)
        set_trainable(net, trainable, cfg.finetune.lora_rank)
        trained = [p for p in net.parameters() if p.requires_grad]
        engine = DPSGD(net, diffusion_loss(cfg, 10), clip_norm=1e-3, noise_multiplier=1.0,
                       expected_batch_size=args.batch, noise_multiplicity=k, max_physical_batch=128, bf16=bf16)
        optimizer = torch.optim.Adam(trained, lr=1e-4)
        engine.step(x, y, optimizer)  # warm-up
        steps[(trainable, k, bf16)] = (engine, optimizer, sum(p.numel() for p in trained))
    best = {v: float("inf") for v in VARIANTS}
    for _ in range(args.repeats):
        for variant, (engine, optimizer, _) in steps.items():
            started = time.perf_counter()
            engine.step(x, y, optimizer)
            best[variant] = min(best[variant], time.perf_counter() - started)
    for (trainable, k, bf16), seconds in best.items():
        print(f"trainable={trainable:13s} K={k} bf16={bf16!s:5s} coordinates={steps[(trainable, k, bf16)][2]:7,d} "
              f"{seconds:.3f} s/step  {best[VARIANTS[0]] / seconds:.2f}x")


if __name__ == "__main__":
    main()
