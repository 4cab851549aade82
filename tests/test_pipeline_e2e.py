"""The whole pipeline on the `quick` preset, as a user runs it: every artifact, the ledger, skipping."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def privimage(*args, cwd, cache_dir):
    env = {**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)}
    return subprocess.run([sys.executable, "-m", "privimage", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("e2e")
    first = privimage("run", "--preset", "quick", "--out", "run", cwd=root, cache_dir=cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    return root / "run", first


def test_every_artifact_is_written(quick_run):
    run, _ = quick_run
    for name in ("config.yaml", "privacy.json", "semantics.json", "pretrain/model.safetensors",
                 "finetune/model.safetensors", "synthetic.npz", "samples.png", "metrics.json", "report.html"):
        assert (run / name).is_file(), name
    with np.load(run / "synthetic.npz") as data:
        images, labels, names = data["images"], data["labels"], list(data["class_names"])
    assert images.dtype == np.uint8 and images.shape == (100, 28, 28, 1)
    assert names == [str(d) for d in range(10)]
    assert np.bincount(labels, minlength=10).tolist() == [10] * 10  # uniform labels
    assert sum(len(list((run / "synthetic" / n).glob("*.png"))) for n in names) == 100
    Image.open(run / "samples.png").verify()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"cnn", "resnet"} and all(0 <= a <= 1 for a in metrics["accuracy"].values())


def test_ledger_composes_query_and_dpsgd_within_target(quick_run):
    run, _ = quick_run
    ledger = json.loads((run / "privacy.json").read_text())
    assert [e["stage"] for e in ledger["entries"]] == ["semantics", "finetune"]
    assert ledger["spent"]["epsilon"] <= ledger["target"]["epsilon"]
    assert ledger["spent"]["epsilon"] >= 0.99 * ledger["target"]["epsilon"]  # the calibration uses the budget


def test_semantics_artifact_holds_only_noisy_values(quick_run):
    run, _ = quick_run
    semantics = json.loads((run / "semantics.json").read_text())
    assert set(semantics["selected"]) == {str(d) for d in range(10)}
    rows = np.array(list(semantics["noisy_votes"]["rows"].values()))
    assert not np.allclose(rows, np.round(rows))  # noisy, hence not integer vote counts


def test_summary_reports_spend_and_location(quick_run):
    _, first = quick_run
    assert "privacy spent" in first.stderr and "synthetic.npz" in first.stderr


def test_second_identical_run_skips_every_stage(quick_run, cache_dir):
    run, _ = quick_run
    before = (run / "privacy.json").read_text()
    again = privimage("run", "--preset", "quick", "--out", "run", cwd=run.parent, cache_dir=cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("up to date, skipped") == 6
    assert (run / "privacy.json").read_text() == before  # nothing spent twice
