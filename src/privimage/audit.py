"""`privimage audit`: an empirical lower bound on the ε that DP fine-tuning really has.

m canaries (random block patterns, nothing like the data) each join the training set with
probability 1/2, drawn from OS entropy. Each canary has a class of its own, so one row of the
denoiser's label embedding is trained by that canary alone: the most telling mark an image can leave.
DP-SGD then fine-tunes a fresh denoiser on a slice of the *public* data plus the canaries that joined,
with `privimage finetune`'s own training (`stages.finetune.dp_finetune`), its own ledger and a sampling
rate fixed in advance (it must not depend on how many canaries joined). The sensitive data is never
read: an audit spends nothing. A canary's score is how much its diffusion loss changes when its
label's embedding row is reset to its initial weights (both losses on the same fixed noise draws):
only a member has taught its label anything. The one-run audit (privacy/audit_bound.py) turns the
guesses into a lower bound on ε, which must stay below the ε the ledger claims. The audit can prove at
most `epsilon_lower_bound_max` (every guess right); a claim above it is inconclusive, whatever the
training does. With the DP noise switched off (`--without-dp-noise`, a debugging switch that voids the
guarantee) the bound should exceed the claim by far: that is what shows the audit can see a leak.
"""

from __future__ import annotations

import copy
import secrets
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from privimage.config import to_yaml
from privimage.data import ImageDataset, default_cache_dir, load_dataset, to_tensor
from privimage.diffusion.edm import EDMPrecond, edm_loss
from privimage.builders import build_denoiser, diffusion_loss
from privimage.stages.finetune import dp_finetune
from privimage.errors import UserError
from privimage.privacy.accountant import Mechanism, NoiseBeyondLimit, calibrate_noise_multiplier
from privimage.privacy.audit_bound import correct_guesses, epsilon_lower_bound
from privimage.privacy.ledger import PrivacyLedger
from privimage.privacy.release import open_release
from privimage.atomic import write_json, write_text
from privimage.rundir import RunDir
from privimage.runtime import dp_noise_source, resolve_device, seeded

CANARY_BLOCK = 4  # pixels per side of a canary's random blocks


def make_canaries(count: int, resolution: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 N×H×W×C random black/white block patterns: far from any natural image and from each other."""
    cells = -(-resolution // CANARY_BLOCK)
    blocks = (rng.random((count, cells, cells, 1)) < 0.5).astype(np.uint8) * 255
    patterns = blocks.repeat(CANARY_BLOCK, axis=1).repeat(CANARY_BLOCK, axis=2)[:, :resolution, :resolution]
    return np.repeat(patterns, channels, axis=3)


@torch.no_grad()
def diffusion_losses(net: EDMPrecond, images: np.ndarray, labels: np.ndarray, *, draws: int, seed: int,
                     sigma_data: float, device: torch.device) -> np.ndarray:
    """Each image's EDM training loss (no label dropout), averaged over `draws` draws fixed by `seed`."""
    x, y = to_tensor(images).to(device), torch.as_tensor(labels, device=device)
    total = torch.zeros(len(x), dtype=torch.float64)
    with seeded(seed, device):
        for _ in range(draws):
            losses = edm_loss(net, x, y, num_classes=net.unet.num_classes, sigma_data=sigma_data, label_dropout=0.0)
            total += losses.double().cpu()
    return (total / draws).numpy()


def audit_mechanism(cfg: DictConfig, planned_size: float) -> Mechanism:
    """DP-SGD with the audit's batch and steps, σ calibrated to the whole target (the audit spends nothing else).

    q = audit.batch_size / `planned_size`, the expected training set fixed before the coin flips: neither q
    nor the expected batch may depend on how many canaries joined."""
    a, p = cfg.audit, cfg.privacy
    sample_rate = min(1.0, a.batch_size / planned_size)
    try:
        sigma = calibrate_noise_multiplier(p.epsilon, p.delta, sample_rate, a.steps, accountant=p.accountant)
    except NoiseBeyondLimit as error:
        raise UserError(f"{error}: raise privacy.epsilon or lower audit.steps") from None
    return Mechanism(sigma, sample_rate, a.steps)


def run_audit(cfg: DictConfig, out: Path, *, dp_noise: bool = True) -> dict:
    a, d = cfg.audit, cfg.data
    if 2 * a.guesses > a.canaries:
        raise UserError(f"audit.guesses={a.guesses} is more than half of audit.canaries={a.canaries}: lower it")
    run = RunDir(out)
    if run.root.exists() and any(run.root.iterdir()):
        raise UserError(f"{run.root} is not empty: an audit needs a new --out")
    device = resolve_device(cfg.device)
    cache_dir = Path(d.cache_dir) if d.cache_dir else default_cache_dir()
    public = load_dataset(d.public, resolution=d.resolution, channels=d.channels, cache_dir=cache_dir,
                          glyph_samples=d.glyph_samples, seed=0, convert=True)
    planned_size = a.public_images + a.canaries / 2  # the expected training set, fixed before the coin flips
    mechanism = audit_mechanism(cfg, planned_size)  # a budget too small refuses here, before anything is written
    rng = np.random.default_rng(secrets.randbits(256))  # who is in stays unknown to everyone until the scores are in
    canaries = make_canaries(a.canaries, d.resolution, d.channels, rng)
    canary_labels = public.num_classes + np.arange(a.canaries)  # a class of its own for each canary
    class_names = public.class_names + tuple(f"canary:{i}" for i in range(a.canaries))
    included = rng.random(a.canaries) < 0.5
    real = public.subset(np.sort(rng.permutation(len(public))[: a.public_images]))
    data = ImageDataset(np.concatenate([real.images, canaries[included]]),
                        np.concatenate([real.labels, canary_labels[included]]), class_names, name="audit")

    run.create()
    lock = run.lock()
    write_text(run.config, to_yaml(cfg))
    ledger = PrivacyLedger.open(run.ledger, cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.accountant)
    with seeded(cfg.seed):
        initial = build_denoiser(cfg, data.num_classes)  # fine-tuning from scratch
    trained = copy.deepcopy(initial)
    dp_finetune(trained, data, open_release(ledger, "finetune", "", lambda: mechanism),
                OmegaConf.merge(cfg.finetune, {"lr": a.lr}), loss=diffusion_loss(cfg, data.num_classes),
                expected_size=planned_size, folder=run.finetune_dir, staging=run.private,
                tensorboard=run.tensorboard / "finetune", seed=cfg.seed, noise=dp_noise_source(cfg.privacy.secure_rng),
                device=device, dp_noise=dp_noise)

    labels_reset = copy.deepcopy(trained)
    labels_reset.unet.class_embed.load_state_dict(initial.unet.class_embed.state_dict())  # the rows it started from
    options = dict(draws=a.score_draws, seed=cfg.seed, sigma_data=cfg.model.sigma_data, device=device)
    losses = [diffusion_losses(net.to(device).eval(), canaries, canary_labels, **options)
              for net in (trained, labels_reset)]
    scores = np.abs(losses[0] - losses[1])
    correct = correct_guesses(scores, included, a.guesses)
    ledger = ledger.reread()
    claimed, delta, total = ledger.spent_epsilon(), cfg.privacy.delta, 2 * a.guesses
    attainable = epsilon_lower_bound(total, total, a.beta, delta, a.canaries)
    result = {
        "epsilon_lower_bound": epsilon_lower_bound(correct, total, a.beta, delta, a.canaries),
        "epsilon_lower_bound_max": attainable,
        "conclusive": claimed <= attainable,
        "epsilon_claimed": claimed,
        "delta": delta,
        "dp_noise": dp_noise,
        "canaries": a.canaries, "guesses": total, "correct_guesses": correct, "beta": a.beta,
        "sample_rate": mechanism.sample_rate,
        "method": "one-run audit, Steinke, Nasr & Jagielski 2023, (ε, δ) bound; score = |loss change when the "
                  "canary's label row is reset|; public images + canaries, no sensitive data",
    }
    write_json(run.root / "audit.json", result)
    lock.release()
    return result
