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
    shutil.copy(final, run / "private" / "checkpoint.next.safetensors")  # killed after commit, before rename
    final.unlink()
    opened(quick(cache_dir), run).run_stage("finetune", force=True)
    assert final.exists() and not (run / "private" / "checkpoint.next.safetensors").exists()


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


def snapshot(run) -> dict[str, bytes]:
    return {str(path.relative_to(run)): path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}


def without_finetune(run):
    """The run as it was before DP fine-tuning: no booking, no checkpoint, no marker, no curves."""
    ledger = json.loads((run / "privacy.json").read_text())
    ledger["entries"] = [entry for entry in ledger["entries"] if entry["stage"] != "finetune"]
    (run / "privacy.json").write_text(json.dumps(ledger))
    for path in (run / "finetune", run / "tensorboard" / "finetune"):
        shutil.rmtree(path)
    (run / "stages" / "finetune.json").unlink()
    return run


def test_uncommitted_dpsgd_steps_never_reach_the_shareable_folder(finetuned, tmp_path, cache_dir, monkeypatch):
    """Killed between writing the state after step 6 and committing it: finetune/ held that state
    (checkpoint.next) while the ledger said 3 steps were released."""
    from privimage.diffusion.training import NEXT_CHECKPOINT_FILE
    from privimage.privacy.ledger import PrivacyLedger

    run = without_finetune(copy_of(finetuned, tmp_path))
    record = PrivacyLedger.record_release

    def killed_at_the_second_commit(self, stage, release, steps):
        if steps == 6:
            raise KeyboardInterrupt
        return record(self, stage, release, steps)

    monkeypatch.setattr(PrivacyLedger, "record_release", killed_at_the_second_commit)
    pipeline = opened(quick(cache_dir), run)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage("finetune")
    monkeypatch.undo()
    assert json.loads((run / "privacy.json").read_text())["entries"][-1]["released_steps"] == 3
    assert sorted(path.name for path in (run / "finetune").iterdir()) == ["checkpoint.safetensors"]
    assert json.loads(load_meta(run / "finetune" / "checkpoint.safetensors"))["step"] == 3
    assert (run / "private" / NEXT_CHECKPOINT_FILE).exists()  # the uncommitted state waits in private/
    assert [step for step, _ in scalars(run, "finetune/dp_loss")] == [1, 2, 3]

    pipeline.run_stage("finetune")  # resumes from step 3, discarding the uncommitted state
    assert json.loads((run / "privacy.json").read_text())["entries"][-1]["released_steps"] == 6
    assert not (run / "private" / NEXT_CHECKPOINT_FILE).exists()
    assert [step for step, _ in scalars(run, "finetune/dp_loss")] == [1, 2, 3, 4, 5, 6]
    pipeline.close()


def load_meta(path) -> str:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as reader:
        return reader.metadata()["privimage"]


def test_a_refused_command_changes_no_file(finetuned, tmp_path, cache_dir):
    """`privimage warmstart warm_start.public_features=0.3` on a finished run was refused after it had
    written the new value into config.yaml (and `privimage sample` refused from then on)."""
    run = copy_of(finetuned, tmp_path)
    before = snapshot(run)
    with pytest.raises(UserError, match="other settings"):
        opened(quick(cache_dir, "warm_start.public_features=0.3"), run).run_stage("warmstart")
    assert snapshot(run) == before
    opened(quick(cache_dir), run).close()  # the lock was released with the refusal


def test_a_stage_whose_file_is_gone_is_not_up_to_date(finetuned, tmp_path, cache_dir):
    """After semantics.json was deleted, `privimage semantics` said "up to date, skipped" and exited 0."""
    run = copy_of(finetuned, tmp_path)
    (run / "semantics.json").unlink()
    ledger = (run / "privacy.json").read_bytes()
    pipeline = opened(quick(cache_dir), run)
    with pytest.raises(UserError, match=r"released but .*semantics\.json is missing.*use a new --out"):
        pipeline.run_stage("semantics")
    pipeline.close()
    env = {**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)}
    result = subprocess.run([sys.executable, "-m", "privimage", "semantics", "--out", str(run)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 3 and "semantics.json is missing" in result.stderr

    shutil.copy(finetuned / "semantics.json", run / "semantics.json")
    (run / "finetune" / "model.safetensors").unlink()  # post-processing of committed steps: made again, free
    pipeline = opened(quick(cache_dir), run)
    assert not pipeline.run_stage("finetune").skipped
    assert (run / "finetune" / "model.safetensors").exists() and (run / "privacy.json").read_bytes() == ledger
    pipeline.close()


def test_a_finished_run_queries_semantics_again_only_when_forced(finetuned, tmp_path, cache_dir):
    """A changed semantics.k booked a second query on a finished run, silently: ε 9.953 -> 9.967."""
    run = copy_of(finetuned, tmp_path)
    before = snapshot(run)
    with pytest.raises(UserError, match=r"releasing it again takes ε [0-9.]+ -> [0-9.]+ of the target 10.*--force"):
        opened(quick(cache_dir, "semantics.k=3"), run)
    assert snapshot(run) == before
    pipeline = Pipeline(quick(cache_dir, "semantics.k=3"), run).validate().create(["semantics"], force=True)
    pipeline.run_stage("semantics", force=True)
    pipeline.close()
    entries = json.loads((run / "privacy.json").read_text())["entries"]
    assert [entry["stage"] for entry in entries] == ["semantics", "warmstart", "finetune", "semantics"]


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
