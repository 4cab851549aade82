"""Stage 4: DP-SGD fine-tuning of the pretrained denoiser on the sensitive training split.

It books its whole spend before the first noisy step, calibrating σ so that the composition with
the earlier releases meets the target, and commits every checkpoint in the ledger (released steps)
before anything that depends on those steps leaves the process (privacy/release.py). The finished stage
writes `finetune/model.safetensors` (the EMA weights), which the sample stage reads. `dp_finetune` is the
training alone, on plain arguments: `privimage audit` calls it on its own model, data and settings.
"""

from __future__ import annotations

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
                                          calibrate_noise_multiplier)
from privimage.privacy.dpsgd import DPSGD, LossFn, poisson_batches
from privimage.privacy.ledger import PrivacyLedger
from privimage.privacy.noise import NoiseSource
from privimage.privacy.release import Release, open_release
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


def finetune(cfg: DictConfig, run: RunDir, ledger: PrivacyLedger, sensitive: ImageDataset, pretrained: Path | None,
             device: torch.device, *, release: str = "") -> None:
    """The stage: book DP-SGD's whole planned spend (`release` lets a killed run find its booking), then
    train the pretrained denoiser (`dp_finetune`) and save its EMA weights as `finetune/model.safetensors`."""
    ledger = ledger.reread()  # under torchrun only rank 0 booked the earlier stages
    earlier = ledger.mechanisms(excluding_stage="finetune")
    booked = open_release(  # deterministic, so the same on every rank; rank 0 books it before the first noisy step
        ledger, "finetune", release, lambda: plan_finetune(cfg, len(sensitive), earlier), book=distributed.is_main(),
        other_release=f"{run.root} has spent its fine-tuning budget with other settings (finetune, pretraining or "
                      "semantics changed since): restore them, or use a new --out for the new settings")
    distributed.barrier()
    with seeded(cfg.seed):
        net = build_denoiser(cfg, sensitive.num_classes)
    if pretrained is not None:
        tensors, _ = load_checkpoint(pretrained)
        net.load_state_dict(tensors)
    ema = dp_finetune(net, sensitive, booked, cfg.finetune, loss=diffusion_loss(cfg, sensitive.num_classes),
                      expected_size=len(sensitive), folder=run.finetune_dir, staging=run.private,
                      tensorboard=run.tensorboard / "finetune", seed=cfg.seed,
                      noise=dp_noise_source(cfg.privacy.secure_rng), device=device)
    if distributed.is_main():
        save_checkpoint(run.finetune_dir / MODEL_FILE, merged_state_dict(ema.module),
                        {"stage": "finetune", "steps": booked.mechanism.steps,
                         "class_names": list(sensitive.class_names)})
    distributed.barrier()


def dp_finetune(net: torch.nn.Module, data: ImageDataset, release: Release, settings: DictConfig, *, loss: LossFn,
                expected_size: float, folder: Path, staging: Path, tensorboard: Path, seed: int, noise: NoiseSource,
                device: torch.device, dp_noise: bool = True) -> EMA:
    """DP-SGD on `data` from `net`'s weights (trained in place) with the booked `release`'s σ, q and
    steps and the `finetune` section's `settings`; returns the EMA of the weights.

    Nothing that depends on a step leaves the process before the state after that step is durable
    and the ledger records the step as released: checkpoints are staged in `staging` (private) and
    moved into `folder` only after the ledger commit; the noisy losses for TensorBoard and the progress
    bar wait in memory until the next checkpoint commits them. A kill loses at most those pending
    values, never releases a step the ledger does not count, and the rerun continues from the
    committed state, so every step is released once.

    Under torchrun each rank Poisson-samples its own shard of the data (together: one Poisson sample
    of the whole set), the clipped sums are all-reduced and rank 0 adds the noise, once.
    `expected_size` is N in the expected batch q·N (the audit's is fixed before its canaries join).
    `dp_noise=False` is for `privimage audit --without-dp-noise` only: it voids the guarantee the ledger
    states, to show that the audit can tell.
    """
    f, mechanism = settings, release.mechanism
    set_trainable(net, f.trainable, f.lora_rank)
    net.to(device).train()
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=f.lr)
    ema = EMA(net, decay=f.ema)
    checkpoint = Checkpointer(folder, net, ema, optimizer, staging=staging, commit=release.record)
    start = checkpoint.restore(committed=release.released_steps())

    engine = DPSGD(
        net, loss, clip_norm=f.clip_norm, noise_multiplier=mechanism.noise_multiplier if dp_noise else 0.0,
        expected_batch_size=mechanism.sample_rate * expected_size, noise_multiplicity=f.noise_multiplicity,
        max_physical_batch=f.max_physical_batch, noise=noise, bf16=f.bf16,
    )
    shard = distributed.shard(torch.arange(len(data)))
    images = torch.as_tensor(data.images[shard.numpy()], device=device)
    labels = torch.as_tensor(data.labels[shard.numpy()], device=device)
    batches = poisson_batches(len(images), mechanism.sample_rate, mechanism.steps - start, noise)
    pending: list[tuple[int, float]] = []  # (step, noisy loss) computed but not yet committed
    # No clock in what fine-tuning writes: step times follow the Poisson batch sizes.
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"
    # Diffusion noise (not DP noise): each rank and each resumed segment its own.
    with seeded(distributed.rank_seed(seed) + start, device), scalars(tensorboard) as writer, \
            progress("finetune (DP-SGD)", start, mechanism.steps, bar_format=bar_format) as bar:
        for step, index in enumerate(batches, start=start):
            index = index.to(device)
            optimizer.param_groups[0]["lr"] = f.lr * lr_factor(f.lr_schedule, f.warmup_steps, step, mechanism.steps)
            pending.append((step + 1, engine.step(to_tensor(images[index]), labels[index], optimizer)))
            ema.update(net)
            bar.update()
            if (step + 1) % f.checkpoint_every == 0 or step + 1 == mechanism.steps:
                checkpoint.save(step + 1)  # commits the steps in the ledger: now they may leave
                _release_pending(pending, writer, bar, release)
                pending = []
    return ema


def _release_pending(pending: list[tuple[int, float]], writer: ScalarLog | None, bar: tqdm, release: Release) -> None:
    """Show and log committed steps: noisy losses (DP-SGD releases them) and the ε spent so far."""
    if not pending:
        return
    last = pending[-1][0]
    spent = release.epsilon_after(last)
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
