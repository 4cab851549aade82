"""When a stage is stale: its fingerprint covers its own config sections and its upstream stages'."""

import pytest

from privimage.config import load_config
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
])
def test_a_change_reruns_its_stage_and_what_follows_only(tmp_path, override, first_stale):
    before, after = fingerprints(tmp_path), fingerprints(tmp_path, override)
    stages = list(before)
    for stage in stages:
        expected_stale = stages.index(stage) >= stages.index(first_stale)
        assert (before[stage] != after[stage]) == expected_stale, stage


def test_nothing_changed_nothing_stale(tmp_path):
    assert fingerprints(tmp_path) == fingerprints(tmp_path)
