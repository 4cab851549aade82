"""What a run directory promises on every path (issue 38): the checks that need no finished run.

Each test here failed on the code before the fix it covers; the ones that need a finished run are in
test_fail_closed.py, test_api.py and test_pipeline_e2e.py, beside the runs they reuse.
"""

import os
import socket
import stat

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from privimage.atomic import write_text
from privimage.checkpoint import save_checkpoint
from privimage.config import load_config
from privimage.diffusion.training import scalars
from privimage.errors import UserError
from privimage.merf import SIZE_WEIGHT, embedding_sum
from privimage.pipeline import Pipeline


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_files_are_the_owners_and_shareable_ones_world_readable(tmp_path):
    """A safetensors file came out 0600 (safetensors replaces the file it is given), and a private file
    written beside shareable ones made their folder 0700."""
    folder = tmp_path / "run"
    folder.mkdir()
    folder.chmod(0o755)
    umask = os.umask(0o022)
    try:
        save_checkpoint(folder / "model.safetensors", {"w": torch.zeros(2)}, {})
        write_text(folder / "report.html", "real images", private=True)
    finally:
        os.umask(umask)
    assert mode(folder / "model.safetensors") == 0o644
    assert mode(folder / "report.html") == 0o600
    assert mode(folder) == 0o755  # the run directory stays readable: its shareable files are


def test_every_file_a_run_writes_has_one_classification():
    from privimage.rundir import PRIVATE, SHAREABLE, classify

    for name in ("config.yaml", "privacy.json", "plan.json", "stages/finetune.json", "semantics.json",
                 "warmstart/embedding.safetensors", "finetune/model.safetensors", "synthetic/7/000007.png",
                 "tensorboard/finetune/events.out.tfevents.0000000000.privimage", "synthetic.npz", "samples.png"):
        assert classify(name) == SHAREABLE, name
    for name in (".lock", "metrics.json", "report.html", "private/split.key", "private/fid/features-0.npz",
                 "private/checkpoint.next.safetensors"):
        assert classify(name) == PRIVATE, name
    with pytest.raises(UserError, match="not a file privimage writes"):
        classify("notes.txt")


def test_tensorboard_event_files_carry_no_host_pid_or_clock(tmp_path):
    for _ in range(2):  # a resumed loop adds a second file, which sorts after the first
        with scalars(tmp_path / "finetune") as writer:
            writer.add_scalar("finetune/dp_loss", 0.5, 3)
    files = sorted((tmp_path / "finetune").iterdir())
    assert len(files) == 2
    for path in files:
        assert socket.gethostname() not in path.name and str(os.getpid()) not in path.name
        events = list(EventFileLoader(str(path)).Load())
        assert {event.wall_time for event in events} == {0.0}
        assert [(e.step, v.tag) for e in events for v in e.summary.value] == [(3, "finetune/dp_loss")]


def test_a_non_finite_feature_row_adds_nothing_to_the_dpmerf_release():
    """DP-SGD drops a non-finite gradient; the DP-MERF sum took a NaN row in and released NaN."""
    rows = torch.tensor([[0.6, 0.8], [float("nan"), 0.0], [3.0, 4.0]])  # unit, not finite, too long
    one_batch = [(torch.arange(3.0)[:, None], torch.zeros(3, dtype=torch.long))]  # image i has feature row i
    total = embedding_sum(lambda x: rows[x.long().flatten()], one_batch, 1)
    assert torch.isfinite(total).all()
    unit = torch.tensor([0.6 * SIZE_WEIGHT, 0.8 * SIZE_WEIGHT, SIZE_WEIGHT], dtype=torch.float64)
    too_long = torch.tensor([3.0, 4.0, 1.0], dtype=torch.float64) * SIZE_WEIGHT
    assert torch.allclose(total[0], unit + too_long / too_long.norm())  # every row adds a vector of norm ≤ 1


def quick(cache_dir, *overrides):
    return load_config("quick", None, [f"data.cache_dir={cache_dir}", *overrides])


def test_delta_at_least_one_over_n_is_refused(cache_dir, tmp_path):
    """The built-in MNIST's training split holds about 4,000 images: δ = 1e-3 lets one of them out."""
    with pytest.raises(UserError, match=r"privacy.delta=0.001 is not below 1/N .* set privacy.delta="):
        Pipeline(quick(cache_dir, "privacy.delta=1e-3"), tmp_path / "run").validate()
    assert not (tmp_path / "run").exists()


def test_public_data_that_is_the_sensitive_data_is_refused(cache_dir, tmp_path):
    images = np.zeros((8, 28, 28, 1), np.uint8)
    np.savez(tmp_path / "digits.npz", images=images, labels=np.arange(8) % 2)
    (tmp_path / "sub").mkdir()
    for public, sensitive in (("mnist", "mnist"), (tmp_path / "sub" / ".." / "digits.npz", tmp_path / "digits.npz")):
        with pytest.raises(UserError, match="data.public and data.sensitive are the same data"):
            Pipeline(quick(cache_dir, f"data.public={public}", f"data.sensitive={sensitive}"), tmp_path / "run").validate()


def test_two_processes_started_together_share_one_split(cache_dir, tmp_path):
    """Both validate a new run directory (each drawing a split key), then take the lock in turn: the
    second used to train on its own split under the first one's key file."""
    first = Pipeline(quick(cache_dir), tmp_path / "run").validate()
    second = Pipeline(quick(cache_dir), tmp_path / "run").validate()
    first.create().close()
    with pytest.raises(UserError, match="another train/test split .* run the same command again"):
        second.create()
    assert (tmp_path / "run" / "private" / "split.key").read_bytes() == first.split_key
    Pipeline(quick(cache_dir), tmp_path / "run").validate().create().close()  # the same command again works
