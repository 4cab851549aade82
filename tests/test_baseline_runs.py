"""The baselines as runs: dpmerf's one release booked and released once, pdp's pretraining on public labels."""

import json
import shutil

import numpy as np
import pytest
import torch
from merf_runs import finished_run, quick, release_residual

from privimage.checkpoint import load_checkpoint
from privimage.errors import UserError
from privimage.pipeline import Pipeline


@pytest.fixture(scope="module")
def dpmerf_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("dpmerf") / "run"
    return root, finished_run(root, quick(cache_dir, "method=dpmerf", "privacy.epsilon=2"))


def test_dpmerf_books_one_gaussian_release_and_writes_a_synthetic_set(dpmerf_run):
    root, _ = dpmerf_run
    ledger = json.loads((root / "privacy.json").read_text())
    (entry,) = ledger["entries"]
    assert (entry["stage"], entry["sample_rate"], entry["steps"], entry["released_steps"]) == ("dpmerf", 1.0, 1, 1)
    assert 1.9 < ledger["spent"]["epsilon"] <= 2.0
    with np.load(root / "synthetic.npz") as data:
        assert data["images"].shape == (100, 28, 28, 1) and sorted(set(data["labels"].tolist())) == list(range(10))
    assert json.loads((root / "metrics.json").read_text())["accuracy"]


@pytest.mark.parametrize("method", ["dpmerf", "pdp", "dpdm"])
def test_the_privacy_plan_is_what_the_method_books(method, tmp_path, cache_dir, dpmerf_run):
    """`privimage budget` and `run --dry-run` print Pipeline.privacy_plan: for every method, what its
    stages book (the privimage method: tests/test_pipeline_e2e.py)."""
    if method == "dpmerf":
        root, cfg = dpmerf_run[0], quick(cache_dir, "method=dpmerf", "privacy.epsilon=2")
    else:
        root, cfg = tmp_path / "run", quick(cache_dir, f"method={method}", "pretrain.steps=2")
        pipeline = Pipeline(cfg, root).validate().create()
        if method == "pdp":
            pipeline.run_stage("pretrain")
        pipeline.run_stage("finetune")
        pipeline.close()
    planned = Pipeline(cfg, root).validate().privacy_plan()
    booked = json.loads((root / "privacy.json").read_text())["entries"]
    assert [(r.stage, r.mechanism.noise_multiplier, r.mechanism.sample_rate, r.mechanism.steps) for r in planned] == [
        (e["stage"], pytest.approx(e["noise_multiplier"], rel=1e-9), e["sample_rate"], e["steps"]) for e in booked]


def test_the_released_embedding_is_the_exact_sum_plus_noise_of_the_booked_std(dpmerf_run):
    """Reference: the exact sum recomputed from the training split; the difference is the noise."""
    residual, sigma = release_residual(*dpmerf_run, "dpmerf")
    assert residual.std().item() == pytest.approx(sigma, rel=0.05) and abs(residual.mean().item()) < 0.1 * sigma


def test_a_released_embedding_whose_file_is_gone_is_not_released_again(dpmerf_run, tmp_path, cache_dir):
    root, _ = dpmerf_run
    run = tmp_path / "run"
    shutil.copytree(root, run)
    before = (run / "privacy.json").read_bytes()
    (run / "dpmerf" / "embedding.safetensors").unlink()
    pipeline = Pipeline(quick(cache_dir, "method=dpmerf", "privacy.epsilon=2"), run).validate().create()
    with pytest.raises(UserError, match="use a new --out"):
        pipeline.run_stage("dpmerf", force=True)
    assert (run / "privacy.json").read_bytes() == before


def test_a_new_generator_reuses_the_release_and_new_features_refuse(dpmerf_run, tmp_path, cache_dir):
    root, _ = dpmerf_run
    run = tmp_path / "run"
    shutil.copytree(root, run)
    released = (run / "dpmerf" / "embedding.safetensors").read_bytes()
    before = (run / "privacy.json").read_bytes()
    Pipeline(quick(cache_dir, "method=dpmerf", "privacy.epsilon=2", "dpmerf.steps=3"), run).validate().create() \
        .run_stage("dpmerf")
    assert (run / "dpmerf" / "embedding.safetensors").read_bytes() == released
    assert (run / "privacy.json").read_bytes() == before
    pipeline = Pipeline(quick(cache_dir, "method=dpmerf", "privacy.epsilon=2", "dpmerf.features=50"), run)
    with pytest.raises(UserError, match="other settings"):
        pipeline.validate().create().run_stage("dpmerf")
    assert (run / "privacy.json").read_bytes() == before


def test_pdp_pretrains_on_public_labels_and_fine_tunes_on_seeded_random_rows(tmp_path, cache_dir):
    pipeline = Pipeline(quick(cache_dir, "method=pdp", "pretrain.steps=2"), tmp_path / "run").validate().create()
    pipeline.run_stage("pretrain")
    rows = json.loads((tmp_path / "run" / "stages" / "pretrain.json").read_text())["label_rows"]
    public_names = pipeline.public.class_names
    assert list(rows) == list(pipeline.sensitive_train.class_names)
    assert set(rows.values()) <= set(public_names) and len(set(rows.values())) == 10
    assert list(rows.values()) != list(public_names[:10])  # not the first rows
    public_model = load_checkpoint(tmp_path / "run" / "pretrain" / "public-labels.safetensors")[0]
    model = load_checkpoint(tmp_path / "run" / "pretrain" / "model.safetensors")[0]
    embedding = "unet.class_embed.weight"
    assert public_model[embedding].shape[0] == len(public_names) + 1 and model[embedding].shape[0] == 11
    first = public_names.index(rows["0"])
    assert torch.equal(model[embedding][0], public_model[embedding][first])
