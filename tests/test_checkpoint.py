from pathlib import Path

import pytest
import torch
from torch import nn

from privimage.checkpoint import load_checkpoint, save_checkpoint
from privimage.diffusion import EMA, EDMPrecond, UNet, edm_loss
from privimage.diffusion.training import Checkpointer
from privimage.errors import UserError


def make_training_state(seed: int) -> tuple[nn.Module, EMA, torch.optim.Adam]:
    torch.manual_seed(seed)
    model = EDMPrecond(UNet(resolution=8, in_channels=1, num_classes=2, base_channels=8, channel_mult=(1, 2)))
    return model, EMA(model), torch.optim.Adam(model.parameters(), lr=1e-3)


def train_step(model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    optimizer.zero_grad()
    edm_loss(model, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), num_classes=2).mean().backward()
    optimizer.step()
    ema.update(model)


def test_the_training_checkpoint_resumes_model_ema_and_adam_exactly(tmp_path: Path) -> None:
    model, ema, optimizer = make_training_state(seed=0)
    for step in range(2):
        train_step(model, ema, optimizer, seed=step)
    committed = []
    Checkpointer(tmp_path, model, ema, optimizer, commit=committed.append).save(2)
    assert committed == [2] and [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]

    resumed_model, resumed_ema, resumed_optimizer = make_training_state(seed=1)
    assert Checkpointer(tmp_path, resumed_model, resumed_ema, resumed_optimizer).restore(committed=2) == 2
    assert resumed_ema.num_updates == 2
    assert set(resumed_optimizer.state_dict()["state"]) == set(optimizer.state_dict()["state"])  # int keys kept

    # One more step from the original and from the restored state must agree exactly.
    train_step(model, ema, optimizer, seed=2)
    train_step(resumed_model, resumed_ema, resumed_optimizer, seed=2)
    for (name, expected), actual in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(expected, actual), name
    for expected, actual in zip(ema.module.parameters(), resumed_ema.module.parameters()):
        assert torch.equal(expected, actual)


def test_a_checkpoint_that_disagrees_with_the_ledger_refuses(tmp_path: Path) -> None:
    model, ema, optimizer = make_training_state(seed=0)
    Checkpointer(tmp_path, model, ema, optimizer).save(3)
    with pytest.raises(UserError, match="records 5 fine-tuning steps as released but .* holds step 3"):
        Checkpointer(tmp_path, model, ema, optimizer).restore(committed=5)


def test_truncated_checkpoint_is_a_user_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, {"w": torch.randn(64)}, {"step": 1})
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(UserError, match=r"model\.safetensors.*use a new --out"):
        load_checkpoint(path)


def test_garbage_and_missing_checkpoints_are_user_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(garbage)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "a.safetensors", {"w": torch.zeros(3)}, {})
    save_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(3)}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    assert torch.equal(load_checkpoint(tmp_path / "a.safetensors")[0]["w"], torch.ones(3))
