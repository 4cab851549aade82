"""When a stage is stale: its fingerprint covers its own config sections and its upstream stages'."""

import pytest

from privimage.config import load_config
from privimage.methods import WARM_START_DPMERF_KEYS
from privimage.pipeline import Pipeline


def fingerprints(tmp_path, *overrides) -> dict[str, str]:
    pipeline = Pipeline(load_config("quick", None, list(overrides)), tmp_path / "run")
    return {stage: pipeline.stage_fingerprint(stage) for stage in pipeline.stages()}


@pytest.mark.parametrize("override, first_stale", [
    ("sample.n=50", "sample"),
    ("evaluate.classifier_epochs=3", "evaluate"),
    ("finetune.lr=0.01", "finetune"),
    ("pretrain.steps=21", "pretrain"),
    ("semantics.k=3", "semantics"),
    ("warm_start.generator_steps=6", "warmstart"),
    ("dpmerf.features=90", "warmstart"),
    ("dpmerf.steps=6", None),  # method=dpmerf's generator steps: the warm start has its own
])
def test_a_change_reruns_its_stage_and_what_follows_only(tmp_path, override, first_stale):
    before, after = fingerprints(tmp_path), fingerprints(tmp_path, override)
    stages = list(before)
    for stage in stages:
        expected_stale = first_stale is not None and stages.index(stage) >= stages.index(first_stale)
        assert (before[stage] != after[stage]) == expected_stale, stage


def test_the_warm_start_reads_every_dpmerf_key_but_the_baselines_steps():
    cfg = load_config("quick", None, [])
    assert set(WARM_START_DPMERF_KEYS) == set(cfg.dpmerf) - {"steps"}


def test_nothing_changed_nothing_stale(tmp_path):
    assert fingerprints(tmp_path) == fingerprints(tmp_path)
