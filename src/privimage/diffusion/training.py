"""The training-loop scaffold shared by pretraining and DP fine-tuning: checkpoint, writer, progress.

Loops stay in their stages (stages/pretrain.py, stages/finetune.py), readable in one sitting; what they
share lives here: a two-phase resumable checkpoint of model + EMA + optimizer + step, TensorBoard
scalars and a progress bar, each written by rank 0 alone under torchrun.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter
from tqdm.auto import tqdm

from privimage import distributed
from privimage.atomic import make_private_dir
from privimage.checkpoint import load_checkpoint, save_checkpoint
from privimage.diffusion.ema import EMA
from privimage.errors import UserError

CHECKPOINT_FILE = "checkpoint.safetensors"
NEXT_CHECKPOINT_FILE = "checkpoint.next.safetensors"


class Checkpointer:
    """Saves and restores model + EMA + optimizer + step in one safetensors file, in two phases.

    A save writes the new state into `staging` (`checkpoint.next`), calls `commit(step)`, and only
    then renames it over the checkpoint in `folder`. DP fine-tuning commits by recording the released
    steps in the ledger, so the checkpoint and the ledger can never disagree after a kill: either the
    new state is committed in both or in neither. Its staging folder is the run directory's private/
    (0700), so the shareable `folder` never holds a state the ledger has not counted as released.
    Pretraining (public data) commits nothing and stages beside its checkpoint.
    """

    def __init__(self, folder: Path, net: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                 commit: Callable[[int], None] = lambda step: None, staging: Path | None = None):
        self.path = folder / CHECKPOINT_FILE
        self.next_path = (staging or folder) / NEXT_CHECKPOINT_FILE
        self.private_staging = staging is not None
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.private_staging:
            make_private_dir(self.next_path.parent)
        opt = self.optimizer.state_dict()
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        tensors |= {f"opt.{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}
        save_checkpoint(self.next_path, tensors, {"step": step, "optimizer": {"param_groups": opt["param_groups"]}})


def _saved_step(path: Path) -> int:
    return int(load_checkpoint(path, tensors=False)[1]["step"])


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer_state(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _prefixed(tensors, "opt.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return state


def lr_factor(schedule: str, warmup_steps: int, step: int, steps: int) -> float:
    """Learning-rate multiplier at `step` of `steps`: a linear warm-up (at most a tenth of the steps, so
    that a short planned run still trains), then constant or cosine to zero.

    A function of the step alone, so a resumed run continues the same schedule without saved state.
    """
    warmup_steps = min(warmup_steps, steps // 10)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


class ScalarLog:
    """TensorBoard scalars in an event file that names no host, pid or time: `events.out.tfevents.<n>.privimage`
    (the n-th file of its folder, so a resumed loop appends a file that sorts after the earlier ones), every
    event at wall time 0. torch's SummaryWriter puts the hostname, pid and start time in the file name and
    the real time in every event; none of that belongs in a shareable folder."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        index = len(list(folder.glob("events.out.tfevents.*")))
        self.path = folder / f"events.out.tfevents.{index:010d}.privimage"
        self._records = RecordWriter(open(self.path, "xb"))
        self._write(Event(wall_time=0.0, file_version="brain.Event:2"))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(Event(wall_time=0.0, step=step, summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)])))

    def _write(self, event: Event) -> None:
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


@contextmanager
def scalars(log_dir: Path) -> Iterator[ScalarLog | None]:
    """TensorBoard scalars of one training loop; None on every rank but rank 0, which alone writes."""
    if not distributed.is_main():
        yield None
        return
    writer = ScalarLog(log_dir)
    try:
        yield writer
    finally:
        writer.close()


def progress(desc: str, initial: int, total: int, **options) -> tqdm:
    """A progress bar on rank 0 alone."""
    return tqdm(desc=desc, initial=initial, total=total, disable=not distributed.is_main(), **options)
