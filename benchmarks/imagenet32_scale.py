"""Peak memory and wall time of `privimage semantics` with an ImageNet32-sized public set.

    python benchmarks/imagenet32_scale.py [--images 1281167] [--pngs 20000] [key=value ...]

Synthesises `--images` random 32×32×3 images of 1000 classes in ImageNet32's batch format (ten
pickles `train_data_batch_1..10`, labels 1..1000) and a small CIFAR-10-format sensitive set in a
temporary folder, then measures, each as its own process (peak RSS = the child's ru_maxrss):

1. converting the public set into the cache (`load_dataset(..., convert=True)`);
2. `privimage semantics` on it (small classifier: quick preset, one epoch, no augmentation), which
   trains on, and queries with, the converted set read a batch at a time;
3. decoding a folder of `--pngs` PNGs (the same pixels) into the cache: images/s over all cores.

Extra key=value arguments override the semantics run's config.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 1000
SIDE = 32


def batch_rows(count: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (count, 3 * SIDE * SIDE), dtype=np.uint8)


def write_public(folder: Path, images: int, rng: np.random.Generator) -> None:
    """ImageNet32's layout: ten batch files of channel-major rows, 1-based labels."""
    folder.mkdir()
    for index, count in enumerate(np.array_split(np.arange(images), 10)):
        batch = {"data": batch_rows(len(count), rng), "labels": (count % CLASSES + 1).tolist()}
        with open(folder / f"train_data_batch_{index + 1}", "wb") as fh:
            pickle.dump(batch, fh, protocol=4)


def write_cifar(folder: Path, train: int, test: int, rng: np.random.Generator) -> None:
    folder.mkdir()
    for name, count in (("data_batch_1", train), ("test_batch", test)):
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": batch_rows(count, rng), b"labels": list(np.arange(count) % 10)}, fh, protocol=2)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, fh, protocol=2)


def write_pngs(folder: Path, count: int, rng: np.random.Generator) -> None:
    rows = batch_rows(count, rng).reshape(count, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    for index, image in enumerate(rows):
        path = folder / f"c{index % 10}" / f"{index:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)


def measure(command: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GiB, stdout) of `command` as a child process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # the child's own peak, not this process's
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(command[:4])} failed: {err.read()[-2000:]}")
        return seconds, usage.ru_maxrss / 2**20, out.read()  # ru_maxrss: KiB


def convert(path: Path, env: dict) -> tuple[float, float]:
    """(seconds of the conversion itself, without starting Python, peak RSS in GiB)."""
    code = ("import sys, time; from privimage.data import load_dataset; start = time.perf_counter(); "
            "load_dataset(sys.argv[1], resolution=32, channels=3, convert=True); print(time.perf_counter() - start)")
    _, peak, stdout = measure([sys.executable, "-c", code, str(path)], env)
    return float(stdout), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_281_167, help="public images (ImageNet32: 1,281,167)")
    parser.add_argument("--sensitive", type=int, default=5000, help="sensitive training images")
    parser.add_argument("--pngs", type=int, default=20_000, help="PNGs in the folder-decoding measurement")
    parser.add_argument("overrides", nargs="*", help="config key=value for the semantics run")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "PRIVIMAGE_CACHE": str(root / "cache")}
        write_public(root / "Imagenet32_train", args.images, rng)
        write_cifar(root / "cifar-10-batches-py", args.sensitive, args.sensitive // 5, rng)
        print(f"public: {args.images:,} images of {SIDE}×{SIDE}×3 ({args.images * 3 * SIDE * SIDE / 1e9:.2f} GB of "
              f"pixels), {CLASSES} classes; sensitive: {args.sensitive:,} (CIFAR-10 format)")

        seconds, peak = convert(root / "Imagenet32_train", env)
        print(f"convert into the cache: {seconds:7.1f} s, peak RSS {peak:.2f} GiB")

        command = [sys.executable, "-m", "privimage", "semantics", "--out", str(root / "run"), "--preset", "quick",
                   f"data.public={root / 'Imagenet32_train'}", f"data.sensitive={root / 'cifar-10-batches-py'}",
                   "data.resolution=32", "data.channels=3", "semantics.classifier.epochs=1",
                   "semantics.classifier.batch_size=512", "semantics.classifier.augment=0", *args.overrides]
        seconds, peak, _ = measure(command, env)
        print(f"privimage semantics:    {seconds:7.1f} s, peak RSS {peak:.2f} GiB ({' '.join(args.overrides)})")

        write_pngs(root / "pngs", args.pngs, rng)
        seconds, peak = convert(root / "pngs", env)
        workers = len(os.sched_getaffinity(0))
        print(f"decode {args.pngs:,} PNGs:    {seconds:7.1f} s ({args.pngs / seconds:,.0f} images/s on {workers} "
              f"cores), peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
