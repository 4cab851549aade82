"""Stage 5: sample a labelled synthetic dataset from the fine-tuned model (and the warm start's generator).

Labels are uniform over the sensitive classes (balanced, fixed in advance), so sampling reads no
sensitive data and costs no privacy. With a warm start, `sample.warm_start_share` of the images start from its
generator's (a DP output too, so post-processing): each is noised to `sample.warm_start_sigma` and redrawn by
the diffusion model (SDEdit), which keeps the generator's shapes and gives them the sensitive data's look that
DP-SGD taught it (docs/experiments.md#round-12). Writes
`synthetic.npz` (read back by `synthetic.load_synthetic`), one PNG folder per class and the `samples.png` grid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from privimage import distributed
from privimage.builders import MODEL_FILE, load_denoiser, sample_batch
from privimage.data import ImageDataset, to_tensor, to_uint8
from privimage.stages.warmstart import warm_start_images
from privimage.synthetic import balanced_labels, warm_start_count, write_synthetic

if TYPE_CHECKING:
    from privimage.pipeline import Pipeline


def generate(
    net: torch.nn.Module, class_names: tuple[str, ...], labels: torch.Tensor, cfg: DictConfig, device: torch.device,
    generator: torch.Generator, redraw: np.ndarray | None = None,
) -> ImageDataset:
    """One image per label, from pure noise, or redrawn from the images `redraw` (one per label) noised to
    `sample.warm_start_sigma`; under torchrun each rank samples its share and every rank gets all of them."""
    s = cfg.sample
    num_classes = len(class_names)
    mine = distributed.shard(torch.arange(len(labels)))
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    chunks = []
    for start in tqdm(range(0, len(mine), s.batch_size), desc="sample", unit="batch", disable=not distributed.is_main()):
        rows = mine[start:start + s.batch_size]
        batch = labels[rows].to(device)
        if redraw is None:
            x = sample_batch(net, batch, cfg, num_classes, steps=s.steps, bf16=s.bf16, generator=generator)
        else:
            x = sample_batch(net, batch, cfg, num_classes, steps=s.warm_start_steps, bf16=s.bf16, generator=generator,
                             init=to_tensor(torch.from_numpy(redraw[rows.numpy()])), sigma_max=s.warm_start_sigma)
        chunks.append(to_uint8(x.cpu()))
    images = np.concatenate(chunks) if chunks else np.zeros((0, *shape[1:], shape[0]), np.uint8)
    pieces = distributed.gather((mine.numpy(), images))
    order = np.concatenate([indices for indices, _ in pieces])
    everything = np.concatenate([part for _, part in pieces])[np.argsort(order)]
    return ImageDataset(images=everything, labels=labels.numpy().astype(np.int64), class_names=class_names,
                        name="synthetic")


def run(pipeline: Pipeline) -> None:
    cfg, names, device = pipeline.cfg, pipeline.sensitive_train.class_names, pipeline.device
    labels = balanced_labels(cfg.sample.n, len(names))
    from_noise = len(labels) - warm_start_count(cfg, pipeline.method.has_warm_start(cfg))
    net = load_denoiser(cfg, len(names), pipeline.run.finetune_dir / MODEL_FILE, device)
    generator = torch.Generator(device=device).manual_seed(distributed.rank_seed(cfg.seed))
    data = generate(net, names, labels[:from_noise], cfg, device, generator)
    if from_noise < len(labels):
        drawn = warm_start_images(cfg, pipeline.run, names, device, labels[from_noise:])
        if cfg.sample.warm_start_sigma is not None:
            drawn = generate(net, names, labels[from_noise:], cfg, device, generator, redraw=drawn.images)
        data = ImageDataset(np.concatenate([data.images, drawn.images]), np.concatenate([data.labels, drawn.labels]),
                            names, name="synthetic")
    pipeline.note("sample", from_noise=from_noise, from_warm_start=len(labels) - from_noise)
    if distributed.is_main():
        write_synthetic(pipeline.run, data)
