"""Stage 5: sample a labelled synthetic dataset from the fine-tuned model.

Labels are uniform over the sensitive classes (balanced, fixed in advance), so sampling reads no
sensitive data and costs no privacy. Writes `synthetic.npz` (read back by `load_synthetic`), one PNG
folder per class and the `samples.png` grid.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from privimage import distributed
from privimage.data import ImageDataset, to_uint8
from privimage.report.figures import image_grid, png_bytes
from privimage.atomic import TEMPORARY_SUFFIX, atomic_path, write_bytes
from privimage.builders import MODEL_FILE, load_denoiser, sample_batch
from privimage.rundir import RunDir

if TYPE_CHECKING:
    from privimage.pipeline import Pipeline

GRID_COLUMNS = 10


def generate(
    net: torch.nn.Module, class_names: tuple[str, ...], labels: torch.Tensor, cfg: DictConfig, device: torch.device,
    generator: torch.Generator,
) -> ImageDataset:
    """One image per label; under torchrun each rank samples its share and every rank gets all of them."""
    s = cfg.sample
    num_classes = len(class_names)
    mine = distributed.shard(torch.arange(len(labels)))
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    chunks = []
    for start in tqdm(range(0, len(mine), s.batch_size), desc="sample", unit="batch", disable=not distributed.is_main()):
        batch = labels[mine[start:start + s.batch_size]].to(device)
        x = sample_batch(net, batch, cfg, num_classes, steps=s.steps, bf16=s.bf16, generator=generator)
        chunks.append(to_uint8(x.cpu()))
    images = np.concatenate(chunks) if chunks else np.zeros((0, *shape[1:], shape[0]), np.uint8)
    pieces = distributed.gather((mine.numpy(), images))
    order = np.concatenate([indices for indices, _ in pieces])
    everything = np.concatenate([part for _, part in pieces])[np.argsort(order)]
    return ImageDataset(images=everything, labels=labels.numpy().astype(np.int64), class_names=class_names,
                        name="synthetic")


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels cycling through the classes: balanced and fixed in advance, so they read no data."""
    return torch.arange(n) % num_classes


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


def run(pipeline: Pipeline) -> None:
    cfg, names, device = pipeline.cfg, pipeline.sensitive_train.class_names, pipeline.device
    net = load_denoiser(cfg, len(names), pipeline.run.finetune_dir / MODEL_FILE, device)
    generator = torch.Generator(device=device).manual_seed(distributed.rank_seed(cfg.seed))
    data = generate(net, names, balanced_labels(cfg.sample.n, len(names)), cfg, device, generator)
    if distributed.is_main():
        write_synthetic(pipeline.run, data)


def safe_folder_name(name: str) -> str:
    """Class names become folder names: keep them readable but never a path."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_.: " else "_" for ch in name).strip(". ")
    return cleaned.replace(":", "_") or "class"
