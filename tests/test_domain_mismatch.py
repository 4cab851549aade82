"""A sensitive domain the public set does not cover: animal silhouettes against a public set of glyphs.

The semantic query still picks a glyph for every animal; the release shows that (almost) none of them
fits, so pretraining leaves their images out and those animals are drawn from the warm start's images.
The public share of the samples, a statistic of the training split, is written under private/ only.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def animals_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("domain")
    result = subprocess.run(
        [sys.executable, "-m", "privimage", "run", "--preset", "quick", "--out", "run", "data.sensitive=animals",
         "data.public=glyphs", "evaluate.classifiers=[cnn]"],
        cwd=root, capture_output=True, text=True, timeout=900, env={**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def test_no_glyph_is_pretrained_on_as_an_animal(animals_run):
    selected = json.loads((animals_run / "semantics.json").read_text())["selected"]
    assert all(pick.startswith("glyph:") for picks in selected.values() for pick in picks)  # the query must pick
    pretrain = json.loads((animals_run / "stages" / "pretrain.json").read_text())
    weights = [w for row in pretrain["public_fit"].values() for w in row.values()]
    assert set(pretrain["public_fit"]) == set(selected)
    assert sum(w == 0 for w in weights) >= 8  # a silhouette may happen to fit a glyph (a giraffe an l), most cannot
    kept = sum(w > 0 for w in weights)
    glyph_samples, warm_start_samples = 40, 100  # the quick preset's
    assert pretrain["public_images"] == glyph_samples * kept
    assert pretrain["pretraining_images"] == glyph_samples * kept + warm_start_samples


def test_the_public_share_is_private_and_measured_on_samples_and_real_test_images(animals_run):
    share = json.loads((animals_run / "private" / "public_share.json").read_text())
    assert share["public_set"] == "glyphs"
    assert 0 <= share["synthetic"] <= 1 and 0 <= share["real_test"] <= 1
    assert share["real_test"] < 0.1  # animals and glyphs are easy to tell apart, even after one epoch
    assert "public_share" not in (animals_run / "metrics.json").read_text()
