"""Stages 3-4: non-private pretraining on the selected public data, then DP-SGD fine-tuning.

Both loops are resumable: their checkpoint holds model, EMA, optimizer and step, written atomically
every `checkpoint_every` steps, so a killed stage continues where its last checkpoint left it. The
finished stage writes `model.safetensors` (the EMA weights), the artifact the next stage reads.
"""

from __future__ import annotations

import dataclasses
import math
import os
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
from privimage.diffusion.edm import EDMPrecond, edm_loss
from privimage.diffusion.ema import EMA
from privimage.diffusion.unet import UNet
from privimage.errors import UserError
from privimage.privacy.accountant import (FixedReleasesExceedTarget, Mechanism, NoiseBeyondLimit,
                                          calibrate_noise_multiplier, compose_epsilon)
from privimage.privacy.dpsgd import DPSGD, poisson_batches
from privimage.privacy.ledger import Booking, PrivacyLedger
from privimage.rundir import RunDir
from privimage.runtime import dp_noise_source

MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
NEXT_CHECKPOINT_FILE = "checkpoint.next.safetensors"


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
    """Saves and restores model + EMA + optimizer + step in one safetensors file, in two phases.

    A save writes the new state beside the old one (`checkpoint.next`), calls `commit(step)`, and only
    then renames it over the checkpoint. DP fine-tuning commits by recording the released steps in the
    ledger, so the checkpoint and the ledger can never disagree after a kill: either the new state is
    committed in both or in neither. Pretraining (public data) commits nothing.
    """

    def __init__(self, folder: Path, net: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                 commit: Callable[[int], None] = lambda step: None):
        self.path = folder / CHECKPOINT_FILE
        self.next_path = folder / NEXT_CHECKPOINT_FILE
        self.net, self.ema, self.optimizer, self.commit = net, ema, optimizer, commit

    def restore(self, committed: int | None = None) -> int:
        """Load the last saved state and return its step.

        `committed` is the step the ledger says was released (None: nothing to check). A state the
        ledger did not commit is discarded; a committed state that is gone refuses, since training
        again from an earlier one would release those steps a second time.
        """
        if distributed.is_main() and self.next_path.exists():
            if committed is None or _saved_step(self.next_path) == committed:
                os.replace(self.next_path, self.path)  # the kill fell between commit and rename
            else:
                self.next_path.unlink()  # never committed: nothing of it left the process
        distributed.barrier()
        step = _saved_step(self.path) if self.path.exists() else 0
        if committed is not None and step != committed:
            found = f"holds step {step}" if self.path.exists() else "is missing"
            raise UserError(
                f"the ledger records {committed} fine-tuning steps as released but {self.path} {found}: "
                "training on would release steps a second time; use a new --out"
            )
        if step == 0:
            return 0
        tensors, meta = load_checkpoint(self.path)
        self.net.load_state_dict(_prefixed(tensors, "model."))
        self.ema.load_state_dict(_prefixed(tensors, "ema."))
        self.optimizer.load_state_dict(meta["optimizer"] | {"state": _optimizer_state(tensors)})
        return step

    def save(self, step: int) -> None:
        """Rank 0 writes (every rank holds the same weights); the others wait until it has."""
        if distributed.is_main():
            self._write(step)
            self.commit(step)
            os.replace(self.next_path, self.path)
        distributed.barrier()

    def _write(self, step: int) -> None:
        opt = self.optimizer.state_dict()
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        tensors |= {f"opt.{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}
        save_checkpoint(self.next_path, tensors, {"step": step, "optimizer": {"param_groups": opt["param_groups"]}})


def _saved_step(path: Path) -> int:
    return int(load_checkpoint(path)[1]["step"])


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
    fine-tuning stays in float32, where per-sample norms decide the clipping.
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
    labels = torch.as_tensor(data.labels)  # images are read a batch at a time: a set of any size fits
    per_rank = math.ceil(p.batch_size / distributed.world_size())
    loss_fn = diffusion_loss(cfg, num_classes)
    rank_seed = distributed.rank_seed(cfg.seed)
    generator = torch.Generator().manual_seed(rank_seed + start)
    torch.manual_seed(rank_seed + start)  # diffusion noise: each rank and each resumed segment its own
    net.train()
    with _scalars(run, "pretrain") as writer, _progress(range(start, p.steps), "pretrain", start, p.steps) as bar:
        for step in bar:
            index = torch.randint(len(labels), (per_rank,), generator=generator)
            x = to_tensor(torch.from_numpy(data.images[index.numpy()]).to(device))  # uint8 over the bus
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(trained, x, labels[index].to(device)).mean()
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


def finetune_steps(cfg: DictConfig, num_samples: float) -> tuple[float, int]:
    """(sample rate, steps) of DP-SGD. N is treated as public, as in Opacus and the paper."""
    f = cfg.finetune
    sample_rate = min(1.0, f.batch_size / num_samples)
    steps = math.ceil(f.epochs / sample_rate) if f.epochs is not None else int(f.steps)
    return sample_rate, steps


def plan_finetune(cfg: DictConfig, num_samples: float, fixed: list[Mechanism]) -> Mechanism:
    """The DP-SGD mechanism whose composition with `fixed` meets the target ε exactly (calibrated σ)."""
    sample_rate, steps = finetune_steps(cfg, num_samples)
    try:
        sigma = calibrate_noise_multiplier(cfg.privacy.epsilon, cfg.privacy.delta, sample_rate, steps, fixed=fixed,
                                           accountant=cfg.privacy.accountant)
    except FixedReleasesExceedTarget as error:
        raise UserError(f"{error}: raise semantics.query_sigma or privacy.epsilon") from None
    except NoiseBeyondLimit as error:
        raise UserError(f"{error}: raise privacy.epsilon or lower finetune.steps") from None
    return Mechanism(sigma, sample_rate, steps)


def finetune(
    cfg: DictConfig, run: RunDir, ledger: PrivacyLedger, sensitive: ImageDataset, pretrained: Path | None,
    device: torch.device, *, release: str = "", dp_noise: bool = True, planned_size: float | None = None,
) -> None:
    """DP-SGD on the sensitive training split, starting from the pretrained EMA weights.

    Nothing that depends on a step leaves the process before the state after that step is durable
    and the ledger records the step as released: the noisy losses for TensorBoard and the progress
    bar wait in memory until the next checkpoint commits them. A kill loses at most those pending
    values, never releases a step the ledger does not count, and the rerun continues from the
    committed state, so every step is released once.

    Under torchrun each rank Poisson-samples its own shard of the data (together: one Poisson sample
    of the whole set), the clipped sums are all-reduced and rank 0 adds the noise, once.
    `planned_size` replaces N in q = batch_size / N and in the expected batch q·N (the audit: neither
    may depend on how many canaries joined).
    `dp_noise=False` is for `privimage audit --without-dp-noise` only: it voids the guarantee the ledger
    states, to show that the audit can tell.
    """
    f = cfg.finetune
    folder = run.finetune_dir
    ledger = ledger.reread()  # under torchrun only rank 0 booked the earlier stages
    booking = ledger.find("finetune")
    earlier = ledger.mechanisms(excluding_stage="finetune")
    if booking is None:
        # Deterministic, so the same on every rank; `release` lets a killed run find its booking.
        booking = Booking("finetune", plan_finetune(cfg, planned_size or len(sensitive), earlier), release)
        if distributed.is_main():
            ledger.book(booking)  # the whole planned spend, before the first noisy step
        distributed.barrier()
    elif booking.release != release:
        raise UserError(
            f"{run.root} has spent its fine-tuning budget with other settings (finetune, pretraining or "
            "semantics changed since): restore them, or use a new --out for the new settings"
        )
    released = ledger.reread().released_steps("finetune", release)
    mechanism = booking.mechanism

    torch.manual_seed(cfg.seed)
    net = build_denoiser(cfg, sensitive.num_classes)
    if pretrained is not None:
        tensors, _ = load_checkpoint(pretrained)
        net.load_state_dict(tensors)
    net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=f.lr)
    ema = EMA(net, decay=f.ema)
    checkpoint = _Checkpointer(folder, net, ema, optimizer,
                               commit=lambda step: ledger.record_release("finetune", release, step))
    start = checkpoint.restore(committed=released)
    torch.manual_seed(distributed.rank_seed(cfg.seed) + start)  # diffusion noise: each rank its own

    noise = dp_noise_source(cfg.privacy.secure_rng)
    engine = DPSGD(
        net, diffusion_loss(cfg, sensitive.num_classes), clip_norm=f.clip_norm,
        noise_multiplier=mechanism.noise_multiplier if dp_noise else 0.0,
        expected_batch_size=mechanism.sample_rate * (planned_size or len(sensitive)),
        noise_multiplicity=f.noise_multiplicity, max_physical_batch=f.max_physical_batch, noise=noise,
    )
    shard = distributed.shard(torch.arange(len(sensitive)))
    images = torch.as_tensor(sensitive.images[shard.numpy()], device=device)
    labels = torch.as_tensor(sensitive.labels[shard.numpy()], device=device)
    batches = poisson_batches(len(images), mechanism.sample_rate, mechanism.steps - start, noise)
    pending: list[tuple[int, float]] = []  # (step, noisy loss) computed but not yet committed
    # No clock in what fine-tuning writes: step times follow the Poisson batch sizes.
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"
    with _scalars(run, "finetune") as writer, tqdm(
        desc="finetune (DP-SGD)", initial=start, total=mechanism.steps, bar_format=bar_format,
        disable=not distributed.is_main(),
    ) as bar:
        for step, index in enumerate(batches, start=start):
            index = index.to(device)
            pending.append((step + 1, engine.step(to_tensor(images[index]), labels[index], optimizer)))
            ema.update(net)
            bar.update()
            if (step + 1) % f.checkpoint_every == 0 or step + 1 == mechanism.steps:
                checkpoint.save(step + 1)  # commits the steps in the ledger: now they may leave
                _release_pending(pending, writer, bar, earlier, mechanism, cfg.privacy)
                pending = []
    if distributed.is_main():
        save_checkpoint(folder / MODEL_FILE, ema.module.state_dict(), {"stage": "finetune", "steps": mechanism.steps})
    distributed.barrier()


def _release_pending(pending: list[tuple[int, float]], writer: SummaryWriter | None, bar: tqdm,
                     earlier: list[Mechanism], mechanism: Mechanism, privacy: DictConfig) -> None:
    """Show and log committed steps: noisy losses (DP-SGD releases them) and the ε spent so far."""
    if not pending:
        return
    last = pending[-1][0]
    spent = compose_epsilon(earlier + [dataclasses.replace(mechanism, steps=last)], privacy.delta, privacy.accountant)
    if writer is not None:
        for step, noisy_loss in pending:
            writer.add_scalar("finetune/dp_loss", noisy_loss, step, walltime=0.0)
        writer.add_scalar("finetune/epsilon", spent, last, walltime=0.0)
        writer.flush()
    bar.set_postfix(dp_loss=f"{pending[-1][1]:.4f}", eps=f"{spent:.3f}")
