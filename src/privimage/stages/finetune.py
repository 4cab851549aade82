"""Stage 4: DP-SGD fine-tuning of the pretrained denoiser on the sensitive training split.

It books its whole spend before the first noisy step, calibrating σ so that the composition with
the earlier releases meets the target, and commits every checkpoint in the ledger (released steps)
before anything that depends on those steps leaves the process. The finished stage writes
`finetune/model.safetensors` (the EMA weights), which the sample stage reads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from privimage import distributed
from privimage.builders import MODEL_FILE, build_denoiser, diffusion_loss, finetune_schedule, load_denoiser
from privimage.checkpoint import load_checkpoint, save_checkpoint
from privimage.data import ImageDataset, to_tensor
from privimage.diffusion.ema import EMA
from privimage.diffusion.adapters import merged_state_dict, set_trainable
from privimage.diffusion.training import Checkpointer, ScalarLog, lr_factor, progress, scalars
from privimage.errors import UserError
from privimage.privacy.accountant import (FixedReleasesExceedTarget, Mechanism, NoiseBeyondLimit,
                                          calibrate_noise_multiplier, compose_epsilon)
from privimage.privacy.dpsgd import DPSGD, poisson_batches
from privimage.privacy.ledger import Booking, PrivacyLedger
from privimage.rundir import RunDir
from privimage.runtime import dp_noise_source, seeded
from privimage.stages.sample import generate

if TYPE_CHECKING:
    from privimage.pipeline import Pipeline


def plan_finetune(cfg: DictConfig, num_samples: float, fixed: list[Mechanism]) -> Mechanism:
    """The DP-SGD mechanism whose composition with `fixed` meets the target ε exactly (calibrated σ)."""
    sample_rate, steps = finetune_schedule(cfg, num_samples)
    try:
        sigma = calibrate_noise_multiplier(cfg.privacy.epsilon, cfg.privacy.delta, sample_rate, steps, fixed=fixed,
                                           accountant=cfg.privacy.accountant)
    except FixedReleasesExceedTarget as error:
        warm_start = ", or lower warm_start.epsilon_share" if cfg.warm_start.epsilon_share > 0 else ""
        raise UserError(f"{error}: raise semantics.query_sigma or privacy.epsilon{warm_start}") from None
    except NoiseBeyondLimit as error:
        raise UserError(f"{error}: raise privacy.epsilon or lower finetune.steps") from None
    return Mechanism(sigma, sample_rate, steps)


mechanism = plan_finetune  # what the stage books (methods.py)


def release_key(pipeline: Pipeline) -> str:
    """The name of the release this config books: the stage's fingerprint (upstream stages included)."""
    return pipeline.stage_fingerprint("finetune")


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

    with seeded(cfg.seed):
        net = build_denoiser(cfg, sensitive.num_classes)
    if pretrained is not None:
        tensors, _ = load_checkpoint(pretrained)
        net.load_state_dict(tensors)
    set_trainable(net, f.trainable, f.lora_rank)
    net.to(device).train()
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=f.lr)
    ema = EMA(net, decay=f.ema)
    checkpoint = Checkpointer(folder, net, ema, optimizer, staging=run.private,
                              commit=lambda step: ledger.record_release("finetune", release, step))
    start = checkpoint.restore(committed=released)

    noise = dp_noise_source(cfg.privacy.secure_rng)
    engine = DPSGD(
        net, diffusion_loss(cfg, sensitive.num_classes), clip_norm=f.clip_norm,
        noise_multiplier=mechanism.noise_multiplier if dp_noise else 0.0,
        expected_batch_size=mechanism.sample_rate * (planned_size or len(sensitive)),
        noise_multiplicity=f.noise_multiplicity, max_physical_batch=f.max_physical_batch, noise=noise, bf16=f.bf16,
    )
    shard = distributed.shard(torch.arange(len(sensitive)))
    images = torch.as_tensor(sensitive.images[shard.numpy()], device=device)
    labels = torch.as_tensor(sensitive.labels[shard.numpy()], device=device)
    batches = poisson_batches(len(images), mechanism.sample_rate, mechanism.steps - start, noise)
    pending: list[tuple[int, float]] = []  # (step, noisy loss) computed but not yet committed
    # No clock in what fine-tuning writes: step times follow the Poisson batch sizes.
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"
    # Diffusion noise (not DP noise): each rank and each resumed segment its own.
    with seeded(distributed.rank_seed(cfg.seed) + start, device), scalars(run.tensorboard / "finetune") as writer, \
            progress("finetune (DP-SGD)", start, mechanism.steps, bar_format=bar_format) as bar:
        for step, index in enumerate(batches, start=start):
            index = index.to(device)
            optimizer.param_groups[0]["lr"] = f.lr * lr_factor(f.lr_schedule, f.warmup_steps, step, mechanism.steps)
            pending.append((step + 1, engine.step(to_tensor(images[index]), labels[index], optimizer)))
            ema.update(net)
            bar.update()
            if (step + 1) % f.checkpoint_every == 0 or step + 1 == mechanism.steps:
                checkpoint.save(step + 1)  # commits the steps in the ledger: now they may leave
                _release_pending(pending, writer, bar, earlier, mechanism, cfg.privacy)
                pending = []
    if distributed.is_main():
        save_checkpoint(folder / MODEL_FILE, merged_state_dict(ema.module),
                        {"stage": "finetune", "steps": mechanism.steps, "class_names": list(sensitive.class_names)})
    distributed.barrier()


def _release_pending(pending: list[tuple[int, float]], writer: ScalarLog | None, bar: tqdm,
                     earlier: list[Mechanism], mechanism: Mechanism, privacy: DictConfig) -> None:
    """Show and log committed steps: noisy losses (DP-SGD releases them) and the ε spent so far."""
    if not pending:
        return
    last = pending[-1][0]
    spent = compose_epsilon(earlier + [dataclasses.replace(mechanism, steps=last)], privacy.delta, privacy.accountant)
    if writer is not None:
        for step, noisy_loss in pending:
            writer.add_scalar("finetune/dp_loss", noisy_loss, step)
        writer.add_scalar("finetune/epsilon", spent, last)
        writer.flush()
    bar.set_postfix(dp_loss=f"{pending[-1][1]:.4f}", eps=f"{spent:.3f}")


def model_file(run: RunDir) -> Path:
    return run.finetune_dir / MODEL_FILE


def sampler(cfg: DictConfig, run: RunDir, class_names: tuple[str, ...], device: torch.device) -> Callable:
    """(labels, torch.Generator) → uint8 images from the fine-tuned model (methods.Method.model_stage)."""
    net = load_denoiser(cfg, len(class_names), model_file(run), device)
    return lambda labels, generator: generate(net, class_names, labels, cfg, device, generator).images


def run(pipeline: Pipeline) -> None:
    pretrained = pipeline.run.pretrain_dir / MODEL_FILE if pipeline.method.pretrains else None
    finetune(pipeline.cfg, pipeline.run, pipeline.ledger, pipeline.sensitive_train, pretrained, pipeline.device,
             release=release_key(pipeline))
