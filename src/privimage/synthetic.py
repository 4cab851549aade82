"""The synthetic dataset: its labels, fixed in advance, and its files in the run directory.

Every method's model stage writes its images here the same way (`write_synthetic`) and the later stages
read them back (`load_synthetic`), whichever model drew them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from privimage.atomic import TEMPORARY_SUFFIX, atomic_path, write_bytes
from privimage.data import ImageDataset
from privimage.report.figures import image_grid, png_bytes
from privimage.rundir import RunDir

GRID_COLUMNS = 10


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels cycling through the classes: balanced and fixed in advance, so they read no data."""
    return torch.arange(n) % num_classes


def warm_start_count(cfg: DictConfig, has_warm_start: bool) -> int:
    """How many of the `sample.n` images the warm start's generator draws (none without a warm start)."""
    return round(cfg.sample.warm_start_share * cfg.sample.n) if has_warm_start else 0


def write_synthetic(run: RunDir, data: ImageDataset) -> None:
    """`synthetic.npz`, one PNG folder per class under `synthetic/`, and the `samples.png` grid."""
    with atomic_path(run.synthetic) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=data.images, labels=data.labels, class_names=np.array(data.class_names))
    staging = Path(tempfile.mkdtemp(prefix=".synthetic.", suffix=TEMPORARY_SUFFIX, dir=run.root))
    staging.chmod(0o755)  # mkdtemp makes it private to the owner
    try:
        for index, (image, label) in enumerate(zip(data.images, data.labels)):
            folder = staging / safe_folder_name(data.class_names[label])
            folder.mkdir(exist_ok=True)
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{index:06d}.png")
        shutil.rmtree(run.synthetic_images, ignore_errors=True)
        staging.rename(run.synthetic_images)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    rows = [data.images[data.labels == c][:GRID_COLUMNS] for c in range(len(data.class_names))]
    write_bytes(run.samples_grid, png_bytes(image_grid(rows)))


def load_synthetic(run: RunDir) -> ImageDataset:
    with np.load(run.synthetic) as data:
        return ImageDataset(images=data["images"], labels=data["labels"].astype(np.int64),
                            class_names=tuple(str(n) for n in data["class_names"]), name="synthetic")


def safe_folder_name(name: str) -> str:
    """Class names become folder names: keep them readable but never a path."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_.: " else "_" for ch in name).strip(". ")
    return cleaned.replace(":", "_") or "class"
