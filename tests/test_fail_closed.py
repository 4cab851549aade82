"""The guarantee off the happy path: interrupted, rerun, concurrent, or missing files (issue: fail closed).

Each test here failed on the code before the fix it covers.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from privimage.config import load_config
from privimage.data import ImageDataset
from privimage.errors import UserError
from privimage.pipeline import Pipeline
from privimage.privacy.dpsgd import DPSGD

FINETUNE = ["finetune.steps=6", "finetune.checkpoint_every=3"]


def opened(cfg, out) -> Pipeline:
    """Validate, then lock and create the run directory, as the CLI does."""
    return Pipeline(cfg, out).validate().create()


def quick(cache_dir, *overrides):
    return load_config("quick", None, [f"data.cache_dir={cache_dir}", *FINETUNE, *overrides])


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, cache_dir):
    """A quick run through DP fine-tuning, copied by each test that changes it."""
    root = tmp_path_factory.mktemp("fail-closed") / "run"
    pipeline = opened(quick(cache_dir), root)
    for stage in ("semantics", "warmstart", "pretrain", "finetune"):
        pipeline.run_stage(stage)
    pipeline.close()
    return root


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def scalars(run, tag: str) -> list:
    """Every value ever written for `tag`, across all event files (a restart appends a new file)."""
    return [(event.step, event.wall_time) for path in sorted((run / "tensorboard" / "finetune").iterdir())
            for event in EventFileLoader(str(path)).Load() for value in event.summary.value if value.tag == tag]


def test_an_interrupt_between_checkpoints_releases_no_step_twice(tmp_path, cache_dir, monkeypatch):
    """Ctrl-C at step 5 of 6 (checkpoint at 3), rerun: 6 noisy losses were released, 6 charged (not 4 + 3)."""
    pipeline = opened(quick(cache_dir), tmp_path / "run")
    for stage in ("semantics", "warmstart", "pretrain"):
        pipeline.run_stage(stage)
    real_step, calls = DPSGD.step, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(DPSGD, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage("finetune")
    monkeypatch.undo()
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert ledger["entries"][-1]["released_steps"] == 3  # only what the checkpoint holds
    assert [step for step, _ in scalars(tmp_path / "run", "finetune/dp_loss")] == [1, 2, 3]

    pipeline.run_stage("finetune")
    losses = scalars(tmp_path / "run", "finetune/dp_loss")
    booked = json.loads((tmp_path / "run" / "privacy.json").read_text())["entries"][-1]
    assert [step for step, _ in losses] == list(range(1, booked["steps"] + 1))  # each step released once
    assert booked["released_steps"] == booked["steps"] == 6
    assert {wall for _, wall in losses} == {0.0}  # no clock: step times follow the Poisson batch sizes
    pipeline.close()


def test_a_released_query_whose_file_is_gone_is_not_queried_again(finetuned, tmp_path, cache_dir):
    run = copy_of(finetuned, tmp_path)
    before = (run / "privacy.json").read_bytes()
    (run / "semantics.json").unlink()
    pipeline = opened(quick(cache_dir), run)
    with pytest.raises(UserError, match="use a new --out"):
        pipeline.run_stage("semantics", force=True)
    assert (run / "privacy.json").read_bytes() == before


def test_a_released_finetune_whose_checkpoint_is_gone_does_not_train_again(finetuned, tmp_path, cache_dir):
    run = copy_of(finetuned, tmp_path)
    before = (run / "privacy.json").read_bytes()
    (run / "finetune" / "checkpoint.safetensors").unlink()
    pipeline = opened(quick(cache_dir), run)
    with pytest.raises(UserError, match="use a new --out"):
        pipeline.run_stage("finetune", force=True)
    assert (run / "privacy.json").read_bytes() == before
    assert not (run / "finetune" / "checkpoint.safetensors").exists()


def test_an_uncommitted_checkpoint_is_discarded_and_a_committed_one_kept(finetuned, tmp_path, cache_dir):
    """The two-phase save: a state written but not committed in the ledger never counts."""
    run = copy_of(finetuned, tmp_path)
    final = run / "finetune" / "checkpoint.safetensors"
    shutil.copy(final, run / "finetune" / "checkpoint.next.safetensors")  # killed after commit, before rename
    final.unlink()
    opened(quick(cache_dir), run).run_stage("finetune", force=True)
    assert final.exists() and not (run / "finetune" / "checkpoint.next.safetensors").exists()


def test_a_second_process_on_the_same_run_directory_is_refused(finetuned, tmp_path, cache_dir):
    run = copy_of(finetuned, tmp_path)
    holder = opened(quick(cache_dir), run)
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
        opened(quick(cache_dir), run)
    result = subprocess.run([sys.executable, "-m", "privimage", "finetune", "--out", str(run)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)})
    assert result.returncode == 3 and f"pid {os.getpid()}" in result.stderr
    holder.close()
    opened(quick(cache_dir), run).close()  # free again once the holder is done


def test_what_killed_writes_left_is_removed_when_the_run_is_reopened(finetuned, tmp_path, cache_dir):
    """A SIGKILL inside an atomic write leaves its temporary file behind (the resume test caught one of the
    warm start's generator); reopening the run under its lock removes such files, and nothing else."""
    run = copy_of(finetuned, tmp_path)
    kept = [path for path in run.rglob("*") if path.is_file()]
    leftovers = [run / "warmstart" / ".generator.safetensors.k1ll3d.tmp", run / ".synthetic.k1ll3d.tmp" / "0" / "0.png"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    opened(quick(cache_dir), run).close()
    assert not leftovers[0].exists() and not (run / ".synthetic.k1ll3d.tmp").exists()
    assert all(path.exists() for path in kept)


@pytest.mark.parametrize("lost", ["privacy.json", "private/split.key"])
def test_a_run_directory_with_results_but_no_ledger_or_split_key_is_refused(finetuned, tmp_path, cache_dir, lost):
    run = copy_of(finetuned, tmp_path)
    (run / lost).unlink()
    with pytest.raises(UserError, match="use a new --out"):
        opened(quick(cache_dir), run)
    assert not (run / lost).exists()  # never recreated empty


def test_evaluation_measures_against_the_test_split_and_caches_only_in_private(tmp_path, monkeypatch):
    """FID/precision/recall use test images; their features stay in the run's private/ folder (0700/0600)."""
    from privimage.stages import evaluate as stage
    from privimage.rundir import RunDir

    seen = []

    class Recording:
        def __init__(self, weights, device):
            self.name = "recording"

        def __call__(self, images, batch_size):
            seen.append(images.copy())
            return images.reshape(len(images), -1)[:, :8].astype(np.float64) + np.random.default_rng(0).normal(
                size=(len(images), 8))

    monkeypatch.setattr(stage, "InceptionFeatures", Recording)
    rng = np.random.default_rng(0)

    def dataset(value, n):
        images = np.full((n, 8, 8, 1), value, np.uint8) + rng.integers(0, 5, (n, 8, 8, 1), dtype=np.uint8)
        return ImageDataset(images, np.arange(n) % 2, ("a", "b"), "d")

    train, test, synthetic = dataset(10, 40), dataset(200, 30), dataset(100, 20)
    run = RunDir(tmp_path / "run").create()
    np.savez(run.synthetic, images=synthetic.images, labels=synthetic.labels, class_names=np.array(["a", "b"]))
    cfg = load_config("quick", None, ["evaluate.fid=true", "evaluate.fid_samples=16", "evaluate.classifiers=[cnn]",
                                      "evaluate.classifier_epochs=1"])
    stage.run_evaluation(cfg, run, train, test, torch.device("cpu"))
    real = seen[0]
    assert real.min() >= 200  # the real side of FID is the test split, not the training split
    files = [p for p in run.private.rglob("*") if p.is_file()]
    assert any(p.parent.name == "fid" for p in files)
    assert run.private.stat().st_mode & 0o777 == 0o700 and (run.private / "fid").stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)
