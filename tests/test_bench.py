"""`privimage bench`: equal-compute runs per method and ε, bench.md and bench.png."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from privimage.bench import bench_markdown, parse_list
from privimage.errors import UserError


def row(method, epsilon, fid, accuracy):
    return {"run": f"{method}-eps{epsilon:g}", "method": method, "epsilon": epsilon, "spent": 0.99 * epsilon,
            "fid": fid, "accuracy": {"cnn": accuracy}, "public_images": 1234, "parameters": 5678,
            "seconds": {"semantics": None, "pretrain": 12.0, "finetune": 3.0, "sample": 1.0, "evaluate": 2.0}}


def test_markdown_has_one_row_per_run_and_marks_what_was_not_measured():
    table = bench_markdown([row("pdp", 1.0, None, 0.5), row("dpdm", 10.0, 88.2, 0.7)])
    lines = table.splitlines()
    assert lines[0].startswith("| method | ε target | ε spent | FID | accuracy (cnn) |")
    assert lines[2].startswith("| pdp | 1 | 0.990 | – | 0.500 | 1,234 | 5,678 | – | 12 |")
    assert lines[3].startswith("| dpdm | 10 | 9.900 | 88.2 | 0.700 |")


def test_list_options_are_checked():
    assert parse_list("1, 10", "epsilons", float) == [1.0, 10.0]
    with pytest.raises(UserError, match="--epsilons"):
        parse_list("1,ten", "epsilons", float)


@pytest.mark.slow
def test_bench_runs_every_method_at_equal_compute(tmp_path, cache_dir):
    result = subprocess.run(
        [sys.executable, "-m", "privimage", "bench", "--preset", "quick", "--out", "b", "--methods", "pdp,dpdm",
         "--epsilons", "5", "pretrain.steps=4", "sample.n=20", "evaluate.classifier_epochs=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    bench = tmp_path / "b"
    lines = (bench / "bench.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| pdp", "| dpdm"]
    Image.open(bench / "bench.png").verify()
    ledgers = [json.loads((bench / name / "privacy.json").read_text()) for name in ("pdp-eps5", "dpdm-eps5")]
    (pdp,), (dpdm,) = (ledger["entries"] for ledger in ledgers)  # no query: DP-SGD has the whole budget
    assert (pdp["steps"], pdp["sample_rate"], pdp["noise_multiplier"]) == (
        dpdm["steps"], dpdm["sample_rate"], dpdm["noise_multiplier"])
    assert all(ledger["spent"]["epsilon"] <= 5 for ledger in ledgers)
    public_used = [line.split(" | ")[-7] for line in lines[2:4]]
    assert public_used[0] == "2,480" and public_used[1] == "0"  # quick's public set: 62 glyphs x 40


def test_a_bad_input_leaves_no_benchmark_folder(tmp_path, cache_dir):
    result = subprocess.run(
        [sys.executable, "-m", "privimage", "bench", "--preset", "quick", "--out", "b", "--methods", "pdp,dpdm",
         "data.sensitive=/nonexistent/images"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)})
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not (tmp_path / "b").exists()  # not even the shared split key
