"""Configuration layering and validation: every mistake is one clear UserError."""

import pytest

from privimage.config import PRESETS, load_config
from privimage.errors import UserError


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    overrides = ["data.public=/p", "data.sensitive=/s"] if preset == "paper" else []
    cfg = load_config(preset, overrides=overrides)
    assert cfg.privacy.epsilon > 0


def test_layers_apply_in_order(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("privacy:\n  epsilon: 3.0\nsample:\n  n: 7\n")
    cfg = load_config("quick", file, ["privacy.epsilon=2"])
    assert (cfg.privacy.epsilon, cfg.sample.n, cfg.pretrain.batch_size) == (2, 7, 32)


def test_saved_config_is_the_starting_point(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text("sample:\n  n: 11\n")
    assert load_config(saved=saved).sample.n == 11
    assert load_config("quick", saved=saved).sample.n == 100  # an explicit preset wins


@pytest.mark.parametrize(
    "override, words",
    [
        ("privacy.epsilon=-1", "privacy.epsilon"),
        ("privacy.epsilon=0", "privacy.epsilon"),
        ("privacy.delta=1", "privacy.delta"),
        ("privacy.delta=0", "privacy.delta"),
        ("privacy.accountant=moments", "privacy.accountant"),
        ("data.channels=2", "data.channels"),
        ("data.resolution=4", "data.resolution"),
        ("semantics.k=0", "semantics.k"),
        ("finetune.clip_norm=0", "finetune.clip_norm"),
        ("finetune.trainable=heads", "finetune.trainable"),
        ("finetune.lora_rank=0", "finetune.lora_rank"),
        ("finetune.lr_schedule=step", "finetune.lr_schedule"),
        ("finetune.warmup_steps=-1", "finetune.warmup_steps"),
        ("finetune.bf16=1", "finetune.bf16"),
        ("pretrain.bf16=fast", "pretrain.bf16"),
        ("sample.bf16=0", "sample.bf16"),
        ("dpmerf.bf16=2", "dpmerf.bf16"),
        ("semantics.classifier.bf16=2", "semantics.classifier.bf16"),
        ("finetune.lr=0", "finetune.lr"),
        ("finetune.ema=1", "finetune.ema"),
        ("evaluate.reference=2", "evaluate.reference"),
        ("method=gan", "method"),
        ("data.resolution=29", "divisible by 2"),
        ("model.base_channels=15", "model.base_channels"),
        ("model.patch_size=3", "model.patch_size must be a positive integer dividing"),
        ("model.patch_size=0", "model.patch_size"),
        ("sample.steps=0", "sample.steps"),
        ("minutes=0", "minutes"),
        ("finetune=3", "'finetune' is a section"),
        ("semantics.classifier=1", "'semantics.classifier' is a section"),
        ("nonsense.key=1", "unknown config key 'nonsense"),
        ("semantics.typo=1", "unknown config key 'semantics.typo'"),
        ("novalue", "key=value"),
    ],
)
def test_bad_values_are_one_line_errors(override, words):
    with pytest.raises(UserError) as info:
        load_config("quick", overrides=[override])
    assert words in str(info.value) and "\n" not in str(info.value)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="unknown preset"):
        load_config("huge")
    with pytest.raises(UserError, match="does not exist"):
        load_config(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("privacy: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(config_file=bad)
