"""bfloat16 on the CPU: seconds per pretraining step, per sampler batch, per DP-MERF generator update and
per semantic-classifier step, float32 against the `bf16` keys (pretrain.bf16, sample.bf16, dpmerf.bf16,
semantics.classifier.bf16), as ratios.

    PYTHONPATH=src python benchmarks/bf16_levers.py [--repeats 5] [key=value ...]

Random weights and data of the default shapes (cost does not depend on them); the variants take turns
and the median of each is compared. The ratios differ between CPUs that all have AVX-512 BF16
(docs/performance.md#bf16).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch

from privimage.classifiers import SmallCNN, train_classifier
from privimage.config import load_config
from privimage.merf import Generator, fixed_features, train_generator
from privimage.builders import build_denoiser, diffusion_loss, pretraining_step, sample_batch

CLASSES = 10
PUBLIC_CLASSES = 82  # the built-in public-mix's, which the semantic classifier learns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(overrides=args.overrides)
    d, r, s = cfg.data, cfg.dpmerf, cfg.sample
    torch.manual_seed(0)
    net = build_denoiser(cfg, CLASSES)
    loss_fn, optimizer = diffusion_loss(cfg, CLASSES), torch.optim.Adam(net.parameters(), lr=0.0)
    x = torch.randn(cfg.pretrain.batch_size, d.channels, d.resolution, d.resolution)
    y = torch.randint(0, CLASSES, (len(x),))
    labels = torch.arange(s.batch_size) % CLASSES
    generator = Generator(CLASSES, d.channels, d.resolution, code_dim=r.code_dim, width=r.width)
    features = fixed_features(d.resolution ** 2 * d.channels, r.features, r.length_scale, seed=0)
    targets = torch.randn(CLASSES, 2 * r.features) / math.sqrt(r.features)
    c = cfg.semantics.classifier
    classifier = SmallCNN(d.channels, PUBLIC_CLASSES, width=c.width)
    public_images = torch.randint(0, 256, (c.batch_size, d.resolution, d.resolution, d.channels), dtype=torch.uint8).numpy()
    public_labels = (torch.arange(c.batch_size) % PUBLIC_CLASSES).numpy()

    def pretrain_step(bf16: bool) -> None:
        pretraining_step(net, loss_fn, optimizer, x, y, bf16=bf16)

    def sampler_batch(bf16: bool) -> None:
        sample_batch(net.eval(), labels, cfg, CLASSES, steps=2, bf16=bf16)
        net.train()

    def generator_update(bf16: bool) -> None:
        train_generator(generator, features, targets, steps=1, per_class=r.per_class, lr=0.0, seed=0, bf16=bf16)

    def classifier_step(bf16: bool) -> None:
        train_classifier(classifier, public_images, public_labels, epochs=1, batch_size=c.batch_size, lr=0.0,
                         augment=c.augment, bf16=bf16)

    work: dict[str, Callable[[bool], None]] = {
        f"pretraining step (batch {len(x)})": pretrain_step,
        f"sampler, 2 steps (batch {s.batch_size}, guidance {s.guidance:g})": sampler_batch,
        f"DP-MERF generator update ({r.per_class * CLASSES} images)": generator_update,
        f"semantic classifier step (batch {c.batch_size}, augment {c.augment:g})": classifier_step,
    }
    times: dict[tuple[str, bool], list[float]] = {}
    for name, fn in work.items():
        for bf16 in (False, True):
            fn(bf16)  # warm-up
    for _ in range(args.repeats):
        for name, fn in work.items():
            for bf16 in (False, True):
                started = time.perf_counter()
                fn(bf16)
                times.setdefault((name, bf16), []).append(time.perf_counter() - started)
    print(f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for name in work:
        fp32, bf16 = (statistics.median(times[(name, b)]) for b in (False, True))
        print(f"{name:55s} float32 {fp32:.3f} s  bf16 {bf16:.3f} s  {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
