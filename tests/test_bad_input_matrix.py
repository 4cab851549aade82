"""The rest of the bad-input matrix (file-level cases are in test_data_user.py): each case is handled
correctly or is a one-line error with exit status 3, no traceback and no half-made run directory."""

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from privimage import atomic, cli
from privimage.checkpoint import load_checkpoint
from privimage.data import load_dataset


def privimage(*args, cwd, cache_dir):
    return subprocess.run([sys.executable, "-m", "privimage", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)}, timeout=300)


def one_line_error(result, *words):
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]  # not progress bars
    assert result.returncode == 3, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, lines
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_unicode_names_and_a_class_with_one_image(tmp_path):
    root = tmp_path / "données"
    for name, count in (("chat 猫", 3), ("chien ü", 1)):
        for i in range(count):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((5, 5), 40 * (i + 1), np.uint8)).save(root / name / f"é{i}.png")
    data = load_dataset(str(root), resolution=8)
    assert data.class_names == ("chat 猫", "chien ü")
    assert np.bincount(data.labels).tolist() == [3, 1]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["privacy.delta=1"], ["privacy.delta"]),
        (["privacy.epsilon=-0.5"], ["privacy.epsilon"]),
        (["method=dpdm", "privacy.epsilon=1e-6"], ["noise multiplier"]),  # too small for a single DP step
        (["evaluate.fid=true", "evaluate.fid_weights=/nonexistent/inception.pt"], ["evaluate.fid_weights"]),
        (["evaluate.augment=-1"], ["evaluate.augment"]),
        (["semantics.per_class=7"], ["semantics.per_class"]),  # 10 classes x 7 picks > the 62 quick glyphs
    ],
)
def test_bad_values_are_refused_before_the_run_dir_exists(tmp_path, cache_dir, overrides, words):
    result = privimage("run", "--preset", "quick", "--out", "r", *overrides, cwd=tmp_path, cache_dir=cache_dir)
    one_line_error(result, *words)
    assert not (tmp_path / "r").exists()


def test_a_stage_before_its_inputs_exist_leaves_no_directory(tmp_path, cache_dir):
    result = privimage("finetune", "--preset", "quick", "--out", "r", cwd=tmp_path, cache_dir=cache_dir)
    one_line_error(result, "needs 'semantics' first")
    assert not (tmp_path / "r").exists()


def test_disk_full_while_writing_a_checkpoint(tmp_path, cache_dir, monkeypatch, capsys):
    """The failed write leaves the previous checkpoint whole and no temporary file; the run resumes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRIVIMAGE_CACHE", str(cache_dir))
    args = ["privimage", "run", "--preset", "quick", "--out", "r", "pretrain.steps=6", "pretrain.checkpoint_every=2"]
    real_fsync, calls = os.fsync, {"checkpoints": 0}

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").find("checkpoint.next.safetensors") >= 0:
            calls["checkpoints"] += 1
            if calls["checkpoints"] == 2:  # the second pretraining checkpoint finds the disk full
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left" in lines[0] and "run the same command again" in lines[0]
    checkpoint = tmp_path / "r" / "pretrain" / "checkpoint.safetensors"
    _, meta = load_checkpoint(checkpoint)
    assert meta["step"] == 2  # the last good checkpoint, intact
    assert not [p for p in checkpoint.parent.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    monkeypatch.setattr(sys, "argv", [args[0], "pretrain", *args[2:]])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)
    _, meta = load_checkpoint(checkpoint)
    assert meta["step"] == 6
