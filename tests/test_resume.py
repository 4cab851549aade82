"""SIGKILL at random moments of every stage, then the same command: the run finishes, its ledger holds
each mechanism exactly once, and every artifact is whole."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from privimage.checkpoint import load_checkpoint
from privimage.config import load_config
from privimage.pipeline import Pipeline
from privimage.privacy.ledger import Booking
from privimage.stages.semantics import query_mechanism

pytestmark = pytest.mark.slow

COMMAND = [sys.executable, "-m", "privimage", "run", "--preset", "quick", "--out", "r"]


def opened(cfg, out) -> Pipeline:
    """Validate, then lock and create the run directory, as the CLI does."""
    return Pipeline(cfg, out).validate().create()


def kill_during(stage_before: str, root, env, rng) -> None:
    """Start the run, wait until `stage_before` has finished, then SIGKILL it a random moment later."""
    process = subprocess.Popen(COMMAND, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = root / "r" / ("config.yaml" if stage_before == "start" else f"stages/{stage_before}.json")
    deadline = time.monotonic() + 600
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_killed_runs_resume_with_an_exact_ledger_and_whole_artifacts(tmp_path, cache_dir):
    env = {**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)}
    rng = random.Random(0)
    for stage_before in ("start", "semantics", "warmstart", "pretrain", "pretrain", "finetune", "sample"):
        kill_during(stage_before, tmp_path, env, rng)
    final = subprocess.run(COMMAND, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]

    run = tmp_path / "r"
    ledger = json.loads((run / "privacy.json").read_text())
    assert [entry["stage"] for entry in ledger["entries"]] == ["semantics", "warmstart", "finetune"]
    assert ledger["spent"]["epsilon"] <= ledger["target"]["epsilon"]
    for name in ("semantics.json", "metrics.json"):
        json.loads((run / name).read_text())
    for name in ("warmstart/embedding.safetensors", "warmstart/generator.safetensors", "pretrain/model.safetensors",
                 "pretrain/checkpoint.safetensors", "finetune/model.safetensors", "finetune/checkpoint.safetensors"):
        load_checkpoint(run / name)
    with np.load(run / "synthetic.npz") as data:
        assert data["images"].shape == (100, 28, 28, 1)
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".synthetic.")]


def test_a_query_booked_before_a_kill_is_not_booked_again(tmp_path, cache_dir):
    cfg = load_config("quick", None, [f"data.cache_dir={cache_dir}"])
    pipeline = opened(cfg, tmp_path / "r")
    release = pipeline.stage_fingerprint("semantics")
    pipeline.ledger.book(Booking("semantics", query_mechanism(cfg), release))  # booked, then killed before semantics.json
    pipeline.run_stage("semantics")
    assert [m.stage for m in pipeline.ledger.reread().entries] == ["semantics"]
    pipeline.run_stage("semantics", force=True)  # semantics.json holds this release: reused, not redone
    assert [m.stage for m in pipeline.ledger.reread().entries] == ["semantics"]
