from pathlib import Path

import pytest
import torch
from torch import nn

from privimage.checkpoint import load_checkpoint, save_checkpoint, state_from_tensors, state_tensors
from privimage.diffusion import EMA, EDMPrecond, UNet, edm_loss
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


def test_round_trip_of_model_ema_and_adam_resumes_training_exactly(tmp_path: Path) -> None:
    model, ema, optimizer = make_training_state(seed=0)
    for step in range(2):
        train_step(model, ema, optimizer, seed=step)
    tensors, structure = state_tensors(
        {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()})
    assert "optimizer.state.0.exp_avg" in tensors and "ema.module.unet.input_conv.weight" in tensors
    save_checkpoint(tmp_path / "ckpt.safetensors", tensors, {"step": 2, "state": structure})

    loaded_tensors, metadata = load_checkpoint(tmp_path / "ckpt.safetensors")
    assert metadata["step"] == 2
    state = state_from_tensors(loaded_tensors, metadata["state"])
    resumed_model, resumed_ema, resumed_optimizer = make_training_state(seed=1)
    resumed_model.load_state_dict(state["model"])
    resumed_ema.load_state_dict(state["ema"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    assert resumed_ema.num_updates == 2
    assert set(resumed_optimizer.state_dict()["state"]) == set(optimizer.state_dict()["state"])  # int keys kept

    # One more step from the original and from the restored state must agree exactly.
    train_step(model, ema, optimizer, seed=2)
    train_step(resumed_model, resumed_ema, resumed_optimizer, seed=2)
    for (name, expected), actual in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(expected, actual), name
    for expected, actual in zip(ema.module.parameters(), resumed_ema.module.parameters()):
        assert torch.equal(expected, actual)


def test_state_structure_keeps_containers_and_scalars() -> None:
    state = {"a": [torch.ones(2), (3, 0.5)], 7: {"flag": True, "none": None, "name": "x"}}
    tensors, structure = state_tensors(state, prefix="s")
    assert list(tensors) == ["s.a.0"]
    restored = state_from_tensors(tensors, structure)
    assert restored[7] == {"flag": True, "none": None, "name": "x"}
    assert restored["a"][1] == (3, 0.5) and torch.equal(restored["a"][0], torch.ones(2))


def test_state_tensors_rejects_unstorable_values() -> None:
    with pytest.raises(TypeError, match="set"):
        state_tensors({"bad": {1, 2}})


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
