"""Configuration: base defaults ← preset ← YAML file ← `key=value` overrides, validated once.

`presets/base.yaml` lists every key privimage knows; anything else is a typo and is refused. The
resolved configuration is what a run directory records in `config.yaml`, so a stage rerun alone
reads exactly what the earlier stages used.
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from privimage.diffusion.adapters import TRAINABLE
from privimage.errors import UserError
from privimage.methods import METHODS, STAGE_TABLE

PRESETS = ("quick", "default", "paper")


def _preset_yaml(name: str) -> DictConfig:
    text = resources.files("privimage.presets").joinpath(f"{name}.yaml").read_text()
    return OmegaConf.create(text)


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    """Merge `layer` into the struct-locked `base`; unknown keys become a one-line UserError."""
    try:
        merged = OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        reason = str(exc).splitlines()[0]
        if isinstance(exc, ConfigKeyError):
            raise UserError(
                f"{source}: unknown config key '{key}': `privimage config` lists every key privimage knows"
            ) from None
        raise UserError(f"{source}: bad value for '{key}': {reason}") from None
    _check_sections(base, merged, source)
    return merged


def _check_sections(base: DictConfig, merged: DictConfig, source: str, prefix: str = "") -> None:
    """A section stays a section: `finetune=3` would replace every fine-tuning key with a number."""
    for key, value in base.items_ex(resolve=False):
        if isinstance(value, DictConfig):
            name = f"{prefix}{key}"
            if not isinstance(merged.get(key), DictConfig):
                raise UserError(f"{source}: '{name}' is a section, not a value: set its keys, e.g. {name}.<key>=...")
            _check_sections(value, merged[key], source, f"{name}.")


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override '{item}' is not of the form key=value, e.g. privacy.epsilon=1")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise UserError(f"overrides: {str(exc).splitlines()[0]}: write them as key=value") from None


def _keys_layer(keys: Mapping[str, Any]) -> DictConfig:
    """{"finetune.steps": 60, ...} (the Python API's overrides) as a nested config layer."""
    layer = OmegaConf.create({})
    for key, value in keys.items():
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{key}' is not a config key: write it as section.key, e.g. finetune.steps")
        OmegaConf.update(layer, key, value, force_add=True)
    return layer


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    saved: str | Path | None = None,
) -> DictConfig:
    """Resolve a configuration.

    `overrides` are `key=value` strings (the command line) or a mapping of dotted keys to values (the
    Python API); both go through the same merge and validation. With neither `preset` nor `config_file`, an existing run's `saved` config.yaml is the starting
    point (so `privimage sample --out DIR` continues the run it names); otherwise the `default`
    preset.
    """
    cfg = _preset_yaml("base")
    OmegaConf.set_struct(cfg, True)
    if preset is None and config_file is None and saved is not None and Path(saved).exists():
        cfg = _merge(cfg, OmegaConf.load(saved), str(saved))
    else:
        name = preset or "default"
        if name not in PRESETS:
            raise UserError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
        cfg = _merge(cfg, _preset_yaml(name), f"preset {name}")
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise UserError(f"config file {path} does not exist: pass the path of a YAML file")
            try:
                layer = OmegaConf.load(path)
            except Exception as exc:  # yaml errors come in many types
                raise UserError(f"config file {path} is not valid YAML ({exc.__class__.__name__}): fix its syntax") from None
            cfg = _merge(cfg, layer, str(path))
    layer = _keys_layer(overrides) if isinstance(overrides, Mapping) else _parse_overrides(overrides)
    cfg = _merge(cfg, layer, "overrides")
    validate(cfg)
    return cfg


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(cfg: DictConfig) -> None:
    """Refuse values that would fail later, with the key and the fix in one line."""
    p = cfg.privacy
    _check(_is_number(p.epsilon) and p.epsilon > 0, f"privacy.epsilon must be a number > 0 (got {p.epsilon})")
    _check(_is_number(p.delta) and 0 < p.delta < 1, f"privacy.delta must be in (0, 1), e.g. 1e-5 (got {p.delta})")
    _check(p.accountant in ("rdp", "prv"), f"privacy.accountant must be rdp or prv (got {p.accountant})")
    _check(isinstance(p.secure_rng, bool), f"privacy.secure_rng must be true or false (got {p.secure_rng})")
    _check(cfg.minutes is None or (_is_number(cfg.minutes) and cfg.minutes > 0),
           f"minutes must be a number of minutes > 0, or null for the configured step counts (got {cfg.minutes})")
    _check(cfg.method in METHODS, f"method must be one of {', '.join(METHODS)} (got {cfg.method})")
    method = METHODS[cfg.method]
    _check(cfg.data.sensitive is not None, "data.sensitive is not set: give a built-in name, a folder or an .npz")
    if method.uses_public_data:
        _check(cfg.data.public is not None, "data.public is not set: give a built-in name, a folder or an .npz")
    _check(isinstance(cfg.data.resolution, int) and cfg.data.resolution >= 8,
           f"data.resolution must be an integer >= 8 (got {cfg.data.resolution})")
    _check(cfg.data.channels in (1, 3), f"data.channels must be 1 or 3 (got {cfg.data.channels})")
    _check(_is_number(cfg.data.test_fraction) and 0 < cfg.data.test_fraction < 1,
           f"data.test_fraction must be in (0, 1) (got {cfg.data.test_fraction})")
    s = cfg.semantics
    _check(isinstance(s.k, int) and s.k >= 1, f"semantics.k must be an integer >= 1 (got {s.k})")
    _check(_is_number(s.query_sigma) and s.query_sigma >= 0,
           f"semantics.query_sigma must be >= 0 (got {s.query_sigma})")
    _check(not method.queries_semantics or s.query_sigma > 0,
           f"semantics.query_sigma must be > 0 for method={cfg.method} (the vote query needs noise): e.g. 20")
    _check(s.per_class is None or (isinstance(s.per_class, int) and s.per_class >= 1),
           f"semantics.per_class must be null or an integer >= 1 (got {s.per_class})")
    _check(s.classifier.arch in ("cnn", "resnet"),
           f"semantics.classifier.arch must be cnn or resnet (got {s.classifier.arch})")
    f = method.configure(cfg).finetune  # dpdm's own section, where it has one
    _check(_is_number(f.clip_norm) and f.clip_norm > 0, f"finetune.clip_norm must be > 0 (got {f.clip_norm})")
    _check(isinstance(f.noise_multiplicity, int) and f.noise_multiplicity >= 1,
           f"finetune.noise_multiplicity must be an integer >= 1 (got {f.noise_multiplicity})")
    _check(f.epochs is not None or (isinstance(f.steps, int) and f.steps >= 1),
           f"finetune.steps must be an integer >= 1 (got {f.steps})")
    _check(f.epochs is None or (_is_number(f.epochs) and f.epochs > 0),
           f"finetune.epochs must be null or > 0 (got {f.epochs})")
    _check(_is_number(f.batch_size) and f.batch_size >= 1, f"finetune.batch_size must be >= 1 (got {f.batch_size})")
    _check(_is_number(f.lr) and f.lr > 0, f"finetune.lr must be > 0 (got {f.lr})")
    for section, schedule in (("pretrain", cfg.pretrain), ("finetune", f)):
        _check(schedule.lr_schedule in ("constant", "cosine"),
               f"{section}.lr_schedule must be constant or cosine (got {schedule.lr_schedule})")
        _check(isinstance(schedule.warmup_steps, int) and schedule.warmup_steps >= 0,
               f"{section}.warmup_steps must be an integer >= 0 (got {schedule.warmup_steps})")
    _check(f.trainable in TRAINABLE, f"finetune.trainable must be one of {', '.join(TRAINABLE)} (got {f.trainable})")
    _check(isinstance(f.lora_rank, int) and f.lora_rank >= 1,
           f"finetune.lora_rank must be an integer >= 1 (got {f.lora_rank})")
    for section in ("semantics.classifier", "pretrain", "finetune", "dpmerf", "sample"):
        bf16 = OmegaConf.select(cfg, f"{section}.bf16")
        _check(isinstance(bf16, bool), f"{section}.bf16 must be true or false (got {bf16})")
    _check(_is_number(f.ema) and 0 <= f.ema < 1, f"finetune.ema must be in [0, 1) (got {f.ema})")
    for key in ("pretrain.batch_size", "finetune.max_physical_batch", "sample.batch_size"):
        value = OmegaConf.select(cfg, key)
        _check(isinstance(value, int) and value >= 1, f"{key} must be an integer >= 1 (got {value})")
    _check(isinstance(cfg.sample.n, int) and cfg.sample.n >= 1, f"sample.n must be an integer >= 1 (got {cfg.sample.n})")
    _check(cfg.sample.solver in ("heun", "euler"), f"sample.solver must be heun or euler (got {cfg.sample.solver})")
    _check(_is_number(cfg.sample.warm_start_share) and 0 <= cfg.sample.warm_start_share <= 1,
           f"sample.warm_start_share must lie in [0, 1], e.g. 0.5 (got {cfg.sample.warm_start_share})")
    _check(cfg.sample.warm_start_sigma is None or (_is_number(cfg.sample.warm_start_sigma)
                                                    and cfg.sample.warm_start_sigma > 0),
           f"sample.warm_start_sigma must be a noise level > 0, e.g. 1, or null (got {cfg.sample.warm_start_sigma})")
    _check(isinstance(cfg.sample.warm_start_steps, int) and cfg.sample.warm_start_steps >= 1,
           f"sample.warm_start_steps must be an integer >= 1, e.g. 6 (got {cfg.sample.warm_start_steps})")
    _check(isinstance(cfg.sample.steps, int) and cfg.sample.steps >= 1,
           f"sample.steps must be an integer >= 1, e.g. 18 (got {cfg.sample.steps})")
    m = cfg.model
    levels = len(m.channel_mult)
    _check(levels >= 1, "model.channel_mult is empty: give one multiplier per resolution level, e.g. [1, 2, 2]")
    _check(isinstance(m.patch_size, int) and m.patch_size >= 1 and cfg.data.resolution % m.patch_size == 0,
           f"model.patch_size must be a positive integer dividing data.resolution {cfg.data.resolution}, "
           f"e.g. 1 or 2 (got {m.patch_size})")
    _check(cfg.data.resolution // m.patch_size % 2 ** (levels - 1) == 0,
           f"model.channel_mult has {levels} levels, which need data.resolution / model.patch_size divisible by "
           f"{2 ** (levels - 1)} (got {cfg.data.resolution} / {m.patch_size}): use fewer levels or another resolution")
    _check(isinstance(m.base_channels, int) and m.base_channels >= 2 and m.base_channels % 2 == 0,
           f"model.base_channels must be an even integer such as 32 (got {m.base_channels})")
    r = cfg.dpmerf
    for key in ("features", "steps", "per_class", "code_dim", "width"):
        _check(isinstance(r[key], int) and r[key] >= 1, f"dpmerf.{key} must be a positive integer (got {r[key]})")
    for key in ("length_scale", "lr"):
        _check(_is_number(r[key]) and r[key] > 0, f"dpmerf.{key} must be a number > 0 (got {r[key]})")
    w = cfg.warm_start
    _check(_is_number(w.epsilon_share) and 0 <= w.epsilon_share < 1,
           f"warm_start.epsilon_share must be in [0, 1), 0 for no warm start (got {w.epsilon_share})")
    for key in ("samples", "generator_steps"):
        _check(isinstance(w[key], int) and w[key] >= 1, f"warm_start.{key} must be a positive integer (got {w[key]})")
    _check(isinstance(w.median_filter, int) and w.median_filter >= 1 and w.median_filter % 2 == 1,
           f"warm_start.median_filter must be an odd positive integer, 1 for none (got {w.median_filter})")
    _check(_is_number(w.public_features) and 0 <= w.public_features <= 1,
           f"warm_start.public_features must be in [0, 1], 0 for random features alone (got {w.public_features})")
    share = cfg.pretrain.warm_start_share
    _check(share is None or (_is_number(share) and 0 < share < 1),
           f"pretrain.warm_start_share must be null or in (0, 1), the share of each batch (got {share})")
    uses_generator = [stage for stage in method.stages_for(cfg) if STAGE_TABLE[stage].fits_generator]
    if uses_generator:
        _check(cfg.data.resolution % 4 == 0, f"the DP-MERF generator ({', '.join(uses_generator)}) upsamples "
                                             f"twice: data.resolution must be a multiple of 4 (got {cfg.data.resolution}), "
                                             "or warm_start.epsilon_share=0")
    e = cfg.evaluate
    _check(isinstance(e.classifier_epochs, int) and e.classifier_epochs >= 1,
           f"evaluate.classifier_epochs must be an integer >= 1 (got {e.classifier_epochs})")
    _check(_is_number(e.augment) and e.augment >= 0,
           f"evaluate.augment must be a number >= 0, 0 for no augmented measure (got {e.augment})")
    _check(isinstance(e.reference, bool), f"evaluate.reference must be true or false (got {e.reference})")
    a = cfg.audit
    for key in ("canaries", "guesses", "public_images", "steps", "batch_size", "score_draws"):
        _check(isinstance(a[key], int) and a[key] >= 1,
               f"audit.{key} must be a positive integer (got {a[key]})")
    _check(_is_number(a.beta) and 0 < a.beta < 1, f"audit.beta must be in (0, 1) (got {a.beta})")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of config sections (DictConfig or plain values), for caches and staleness."""
    plain = [OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig) else p for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
