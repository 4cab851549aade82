"""Stages 3-4: non-private pretraining on the selected public data, then DP-SGD fine-tuning.

Both loops are resumable: their checkpoint holds model, EMA, optimizer and step, written atomically
every `checkpoint_every` steps, so a killed stage continues where its last checkpoint left it. The
finished stage writes `model.safetensors` (the EMA weights), the artifact the next stage reads.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from privimage import distributed
from privimage.checkpoint import load_checkpoint, save_checkpoint
from privimage.data import ImageDataset, to_tensor
from privimage.diffusion.adapters import merged_state_dict, set_trainable
from privimage.diffusion.edm import EDMPrecond, edm_loss
from privimage.diffusion.ema import EMA
from privimage.diffusion.unet import UNet
from privimage.errors import UserError
from privimage.privacy.accountant import Mechanism, calibrate_noise_multiplier, compose_epsilon
from privimage.privacy.dpsgd import DPSGD, poisson_batches
from privimage.privacy.ledger import PrivacyLedger
from privimage.rundir import RunDir
from privimage.runtime import noise_generator, private_torch_generator

MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"


def build_denoiser(cfg: DictConfig, num_classes: int) -> EDMPrecond:
    m = cfg.model
    unet = UNet(
        resolution=cfg.data.resolution, in_channels=cfg.data.channels, num_classes=num_classes,
        base_channels=m.base_channels, channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
    )
    return EDMPrecond(unet, sigma_data=m.sigma_data)


def load_denoiser(cfg: DictConfig, num_classes: int, path: Path, device: torch.device) -> EDMPrecond:
    net = build_denoiser(cfg, num_classes)
    tensors, _ = load_checkpoint(path)
    net.load_state_dict(tensors)
    return net.to(device).eval()


def diffusion_loss(cfg: DictConfig, num_classes: int) -> Callable:
    """Per-sample EDM loss with the configured label dropout; `forward` is the denoiser."""
    m = cfg.model

    def loss(forward: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return edm_loss(forward, x, y, num_classes=num_classes, sigma_data=m.sigma_data, label_dropout=m.label_dropout)

    return loss


class _Checkpointer:
    """Saves and restores model + EMA + optimizer + step in one safetensors file."""

    def __init__(self, folder: Path, net: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer):
        self.path = folder / CHECKPOINT_FILE
        self.net, self.ema, self.optimizer = net, ema, optimizer

    def restore(self) -> int:
        if not self.path.exists():
            return 0
        tensors, meta = load_checkpoint(self.path)
        self.net.load_state_dict(_prefixed(tensors, "model."))
        self.ema.load_state_dict(_prefixed(tensors, "ema."))
        self.optimizer.load_state_dict(meta["optimizer"] | {"state": _optimizer_state(tensors)})
        return int(meta["step"])

    def save(self, step: int) -> None:
        """Rank 0 writes (every rank holds the same weights); the others wait until it has."""
        if distributed.is_main():
            self._write(step)
        distributed.barrier()

    def _write(self, step: int) -> None:
        opt = self.optimizer.state_dict()
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        tensors |= {f"opt.{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}
        save_checkpoint(self.path, tensors, {"step": step, "optimizer": {"param_groups": opt["param_groups"]}})


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer_state(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _prefixed(tensors, "opt.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return state


@contextmanager
def _scalars(run: RunDir, stage: str) -> Iterator[SummaryWriter | None]:
    """TensorBoard scalars of one stage; None on every rank but rank 0, which alone writes."""
    if not distributed.is_main():
        yield None
        return
    writer = SummaryWriter(log_dir=str(run.tensorboard / stage))
    try:
        yield writer
    finally:
        writer.close()


def _progress(iterable, desc: str, initial: int, total: int) -> tqdm:
    return tqdm(iterable, desc=desc, initial=initial, total=total, disable=not distributed.is_main())


def pretrain(cfg: DictConfig, run: RunDir, data: ImageDataset, num_classes: int, device: torch.device) -> None:
    """Non-private EDM training on public images; `data.labels == num_classes` means unconditional.

    Under torchrun the net trains as DDP: each rank draws batch_size / world_size images per step.
    On CUDA the forward pass runs under bf16 autocast (weights, optimizer and EMA stay float32); DP
    fine-tuning autocasts only with `finetune.bf16`, and its per-sample norms and clipping stay float32.
    """
    p = cfg.pretrain
    folder = run.pretrain_dir
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    net = build_denoiser(cfg, num_classes).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=p.lr)
    ema = EMA(net, decay=p.ema)
    checkpoint = _Checkpointer(folder, net, ema, optimizer)
    start = checkpoint.restore()
    trained = DistributedDataParallel(net) if distributed.is_distributed() else net
    images = torch.as_tensor(data.images, device=device)  # uint8: a large public set stays small
    labels = torch.as_tensor(data.labels, device=device)
    per_rank = math.ceil(p.batch_size / distributed.world_size())
    loss_fn = diffusion_loss(cfg, num_classes)
    rank_seed = distributed.rank_seed(cfg.seed)
    generator = torch.Generator().manual_seed(rank_seed + start)
    torch.manual_seed(rank_seed + start)  # diffusion noise: each rank and each resumed segment its own
    net.train()
    with _scalars(run, "pretrain") as writer, _progress(range(start, p.steps), "pretrain", start, p.steps) as bar:
        for step in bar:
            index = torch.randint(len(images), (per_rank,), generator=generator).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(trained, to_tensor(images[index]), labels[index]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update(net)
            if writer is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                writer.add_scalar("pretrain/loss", loss.item(), step + 1)
            if (step + 1) % p.checkpoint_every == 0 or step + 1 == p.steps:
                checkpoint.save(step + 1)
    if distributed.is_main():
        save_checkpoint(folder / MODEL_FILE, ema.module.state_dict(), {"stage": "pretrain", "steps": p.steps})
    distributed.barrier()


def finetune_steps(cfg: DictConfig, num_samples: int) -> tuple[float, int]:
    """(sample rate, steps) of DP-SGD. N is treated as public, as in Opacus and the paper."""
    f = cfg.finetune
    sample_rate = min(1.0, f.batch_size / num_samples)
    steps = math.ceil(f.epochs / sample_rate) if f.epochs is not None else int(f.steps)
    return sample_rate, steps


def plan_finetune(cfg: DictConfig, num_samples: int, fixed: list[Mechanism]) -> Mechanism:
    """The DP-SGD mechanism whose composition with `fixed` meets the target ε exactly (calibrated σ)."""
    sample_rate, steps = finetune_steps(cfg, num_samples)
    sigma = calibrate_noise_multiplier(
        cfg.privacy.epsilon, cfg.privacy.delta, sample_rate, steps, fixed=fixed, accountant=cfg.privacy.accountant
    )
    return Mechanism(stage="finetune", mechanism="subsampled_gaussian", noise_multiplier=sigma,
                     sample_rate=sample_rate, steps=steps)


def lr_factor(schedule: str, warmup_steps: int, step: int, steps: int) -> float:
    """Learning-rate multiplier at `step` of `steps`: a linear warm-up, then constant or cosine to zero.

    A function of the step alone, so a resumed run continues the same schedule without saved state.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def finetune(
    cfg: DictConfig, run: RunDir, ledger: PrivacyLedger, sensitive: ImageDataset, pretrained: Path | None,
    device: torch.device, *, release: str = "", dp_noise: bool = True,
) -> None:
    """DP-SGD on the sensitive training split, starting from the pretrained EMA weights.

    Under torchrun each rank Poisson-samples its own shard of the data (together: one Poisson sample
    of the whole set), the clipped sums are all-reduced and rank 0 adds the noise, once.
    `dp_noise=False` is for `privimage audit --without-dp-noise` only: it voids the guarantee the ledger
    states, to show that the audit can tell.
    """
    f = cfg.finetune
    folder = run.finetune_dir
    ledger = ledger.reread()  # under torchrun only rank 0 booked the earlier stages
    mechanism = ledger.find("finetune")
    earlier = [m for m in ledger.entries if m.stage != "finetune"]
    if mechanism is None:
        # Deterministic, so the same on every rank; `release` lets a killed run find its booking.
        mechanism = dataclasses.replace(plan_finetune(cfg, len(sensitive), earlier), release=release)
        if distributed.is_main():
            ledger.book(mechanism)  # the whole planned spend, before the first noisy step
        distributed.barrier()
    elif mechanism.release != release:
        raise UserError(
            f"{run.root} has spent its fine-tuning budget with other settings (finetune, pretraining or "
            "semantics changed since): restore them, or use a new --out for the new settings"
        )

    torch.manual_seed(cfg.seed)
    net = build_denoiser(cfg, sensitive.num_classes)
    if pretrained is not None:
        tensors, _ = load_checkpoint(pretrained)
        net.load_state_dict(tensors)
    set_trainable(net, f.trainable, f.lora_rank)
    net.to(device).train()
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=f.lr)
    ema = EMA(net, decay=f.ema)
    checkpoint = _Checkpointer(folder, net, ema, optimizer)
    start = checkpoint.restore()
    torch.manual_seed(distributed.rank_seed(cfg.seed) + start)  # diffusion noise: each rank its own

    engine = DPSGD(
        net, diffusion_loss(cfg, sensitive.num_classes), clip_norm=f.clip_norm,
        noise_multiplier=mechanism.noise_multiplier if dp_noise else 0.0, expected_batch_size=mechanism.sample_rate * len(sensitive),
        noise_multiplicity=f.noise_multiplicity, max_physical_batch=f.max_physical_batch,
        generator=noise_generator(device, cfg.privacy.secure_rng), secure_noise=cfg.privacy.secure_rng, bf16=f.bf16,
    )
    shard = distributed.shard(torch.arange(len(sensitive)))
    images = torch.as_tensor(sensitive.images[shard.numpy()], device=device)
    labels = torch.as_tensor(sensitive.labels[shard.numpy()], device=device)
    epsilon_every = max(1, mechanism.steps // 25)
    spent = compose_epsilon(earlier, cfg.privacy.delta, cfg.privacy.accountant)
    batches = poisson_batches(len(images), mechanism.sample_rate, mechanism.steps - start, private_torch_generator())
    with _scalars(run, "finetune") as writer, _progress(None, "finetune (DP-SGD)", start, mechanism.steps) as bar:
        for step, index in enumerate(batches, start=start):
            index = index.to(device)
            optimizer.param_groups[0]["lr"] = f.lr * lr_factor(f.lr_schedule, f.warmup_steps, step, mechanism.steps)
            noisy_loss = engine.step(to_tensor(images[index]), labels[index], optimizer)
            ema.update(net)
            if (step + 1) % epsilon_every == 0 or step + 1 == mechanism.steps:  # an accountant call is not free
                spent = compose_epsilon(
                    earlier + [dataclasses.replace(mechanism, steps=step + 1)], cfg.privacy.delta, cfg.privacy.accountant
                )
                if writer is not None:
                    writer.add_scalar("finetune/epsilon", spent, step + 1)
            if writer is not None:
                writer.add_scalar("finetune/dp_loss", noisy_loss, step + 1)
            bar.set_postfix(dp_loss=f"{noisy_loss:.4f}", eps=f"{spent:.3f}")
            bar.update()
            if (step + 1) % f.checkpoint_every == 0 or step + 1 == mechanism.steps:
                checkpoint.save(step + 1)
    if distributed.is_main():
        save_checkpoint(folder / MODEL_FILE, merged_state_dict(ema.module), {"stage": "finetune", "steps": mechanism.steps})
    distributed.barrier()
