"""What evaluation costs: seconds per image of Inception at several batch sizes, as ratios to the stage's
(fid.INCEPTION_BATCH), and seconds per image-epoch of each downstream classifier.

    PYTHONPATH=src python benchmarks/evaluation_costs.py [--batches 8,16,32] [--repeats 3]

Random images of the built-in data's shape (cost does not depend on them); batch sizes take turns and
the median of each is compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from privimage.classifiers import train_classifier
from privimage.evaluation.downstream import CLASSIFIERS, DOWNSTREAM_BATCH
from privimage.evaluation.fid import INCEPTION_BATCH, InceptionFeatures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,16,32", help="Inception batch sizes, comma-separated")
    parser.add_argument("--images", type=int, default=64, help="images per Inception timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batches = sorted({int(b) for b in args.batches.split(",")} | {INCEPTION_BATCH})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 28, 28, 1), dtype=np.uint8)
    inception = InceptionFeatures()
    inception(images[:INCEPTION_BATCH])  # warm-up
    times: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(args.repeats):
        for batch in batches:
            started = time.perf_counter()
            inception(images, batch_size=batch)
            times[batch].append((time.perf_counter() - started) / args.images)
    stage = statistics.median(times[INCEPTION_BATCH])
    for batch in batches:
        seconds = statistics.median(times[batch])
        print(f"Inception batch {batch:3d}: {seconds:.3f} s per image, {seconds / stage:.2f}x the stage's "
              f"batch {INCEPTION_BATCH}")
    train = rng.integers(0, 256, (512, 28, 28, 1), dtype=np.uint8)
    labels = np.arange(len(train)) % 10
    for name, build in CLASSIFIERS.items():
        started = time.perf_counter()
        train_classifier(build(1, 10), train, labels, epochs=2, batch_size=DOWNSTREAM_BATCH)
        print(f"classifier {name}: {(time.perf_counter() - started) / (2 * len(train)) * 1000:.2f} ms per image-epoch")


if __name__ == "__main__":
    main()
