"""`privimage bench`: runs per method, ε and time budget, bench.md and bench.png."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from privimage.bench import bench_configs, bench_figure, bench_markdown, parse_list, write_bench
from privimage.config import load_config
from privimage.errors import UserError


def row(method, epsilon, fid, accuracy, minutes=5.0, dataset="mnist-public-mix"):
    seconds = {"semantics": None, "warmstart": 4.0, "pretrain": 12.0, "finetune": 3.0, "dpmerf": None, "sample": 1.0,
               "evaluate": 2.0}
    return {"run": f"{method}-eps{epsilon:g}", "dataset": dataset, "method": method, "epsilon": epsilon,
            "minutes": minutes, "public_share": None,
            "spent": 0.99 * epsilon, "fid": fid, "accuracy": {"cnn": accuracy}, "public_images": 1234,
            "parameters": 5678, "seconds": seconds, "wall": 18.0}


def test_markdown_has_one_row_per_run_and_marks_what_was_not_measured():
    table = bench_markdown([row("pdp", 1.0, None, 0.5), row("dpdm", 10.0, 88.2, 0.7, minutes=None)])
    lines = table.splitlines()
    assert lines[0].startswith("| dataset | method | budget (min) | ε target | ε spent | FID | accuracy (cnn) |")
    assert lines[2].startswith("| mnist-public-mix | pdp | 5 | 1 | 0.990 | – | 0.500 | 1,234 | 5,678 | 0.3 | – | 4 | "
                               "12 | 3 | – |")
    assert lines[3].startswith("| mnist-public-mix | dpdm | – | 10 | 9.900 | 88.2 | 0.700 |")
    assert "margin" not in table  # no privimage and dpmerf pair


def test_the_markdown_ends_with_privimages_margin_over_dpmerf_per_dataset_and_epsilon():
    rows = [row("privimage", 10.0, None, 0.80), row("dpmerf", 10.0, None, 0.75, minutes=None),
            row("privimage", 10.0, None, 0.60, dataset="animals-glyphs"),
            row("dpmerf", 10.0, None, 0.70, minutes=None, dataset="animals-glyphs"),
            row("privimage", 1.0, None, 0.50)]  # no dpmerf at eps 1: no margin
    margins = bench_markdown(rows).split("privimage's margin over dpmerf")[1].splitlines()
    table = [line for line in margins if line.startswith("| ") and "dataset" not in line]
    assert table == ["| mnist-public-mix | 10 | 5 | +5.0 |", "| animals-glyphs | 10 | 5 | -10.0 |"]


def test_the_public_share_table_is_written_under_private(tmp_path):
    rows = [row("privimage", 10.0, None, 0.8) | {"public_share": {"synthetic": 0.238, "real_test": 0.0}},
            row("dpmerf", 10.0, None, 0.75, minutes=None)]
    write_bench(tmp_path, rows)
    text = (tmp_path / "private" / "public_share.md").read_text()
    assert "| mnist-public-mix | privimage | 5 | 10 | 0.238 | 0.000 |" in text
    assert "| mnist-public-mix | dpmerf | – | 10 | – | – |" in text
    assert "public_share" not in (tmp_path / "bench.md").read_text() and "0.238" not in (tmp_path / "bench.md").read_text()


def test_bench_datasets_run_every_method_on_each_dataset_in_its_own_folder():
    cfg = load_config("quick", overrides=["bench.datasets=[mnist,{sensitive: animals, public: glyphs}]"])
    configs = bench_configs(cfg, ["privimage", "dpmerf"], [1.0], [5.0])
    assert {name: (c.data.sensitive, c.data.public) for name, c in configs.items()} == {
        "mnist-glyphs/privimage-eps1-5min": ("mnist", "glyphs"), "mnist-glyphs/dpmerf-eps1": ("mnist", "glyphs"),
        "animals-glyphs/privimage-eps1-5min": ("animals", "glyphs"), "animals-glyphs/dpmerf-eps1": ("animals", "glyphs")}
    with pytest.raises(UserError, match="bench.datasets"):
        bench_configs(load_config("quick", overrides=["bench.datasets=[{sensitiv: animals}]"]), ["dpmerf"], [1.0], [5.0])


def test_every_planned_method_runs_at_every_budget_and_dpmerf_once_per_epsilon():
    configs = bench_configs(load_config("quick"), ["privimage", "dpmerf"], [1.0, 10.0], [5.0, 15.0])
    assert sorted(configs) == ["dpmerf-eps1", "dpmerf-eps10", "privimage-eps1-15min", "privimage-eps1-5min",
                               "privimage-eps10-15min", "privimage-eps10-5min"]
    assert configs["privimage-eps10-5min"].minutes == 5.0 and configs["dpmerf-eps1"].minutes is None
    assert not any(cfg.evaluate.reference for cfg in configs.values())
    with pytest.raises(UserError, match="--minutes"):
        bench_configs(load_config("quick"), ["privimage"], [1.0], [0.0])


def test_the_figure_plots_accuracy_against_the_budget_for_each_epsilon():
    rows = [row("privimage", e, 80.0, a, m) for e, a, m in ((1.0, 0.5, 5.0), (1.0, 0.6, 15.0), (10.0, 0.7, 5.0))]
    png = bench_figure(rows + [row("dpmerf", 1.0, 90.0, 0.4, minutes=None),
                               row("dpmerf", 1.0, 90.0, 0.3, minutes=None, dataset="animals-glyphs")])
    assert png.startswith(b"\x89PNG")


def test_list_options_are_checked():
    assert parse_list("1, 10", "epsilons", float) == [1.0, 10.0]
    with pytest.raises(UserError, match="--epsilons"):
        parse_list("1,ten", "epsilons", float)


@pytest.mark.slow
def test_bench_runs_every_method_within_the_budget(tmp_path, cache_dir):
    result = subprocess.run(
        [sys.executable, "-m", "privimage", "bench", "--preset", "quick", "--out", "b", "--methods", "pdp,dpmerf",
         "--epsilons", "5", "--minutes", "1", "sample.n=20", "evaluate.classifier_epochs=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    bench = tmp_path / "b"
    lines = (bench / "bench.md").read_text().splitlines()
    assert [line.split(" | ")[:3] for line in lines[2:4]] == [["| mnist-glyphs", "pdp", "1"],
                                                              ["| mnist-glyphs", "dpmerf", "–"]]
    Image.open(bench / "bench.png").verify()
    assert json.loads((bench / "pdp-eps5-1min" / "plan.json").read_text())["finetune_steps"] >= 1
    ledgers = [json.loads((bench / name / "privacy.json").read_text()) for name in ("pdp-eps5-1min", "dpmerf-eps5")]
    assert [[entry["stage"] for entry in ledger["entries"]] for ledger in ledgers] == [["finetune"], ["dpmerf"]]
    assert all(4.9 < ledger["spent"]["epsilon"] <= 5 for ledger in ledgers)
    column = lines[0].split(" | ").index("public images")
    public_used = [line.split(" | ")[column] for line in lines[2:4]]
    assert public_used == ["2,480", "0"]  # quick's public set: 62 glyphs x 40


def test_a_bad_input_leaves_no_benchmark_folder(tmp_path, cache_dir):
    result = subprocess.run(
        [sys.executable, "-m", "privimage", "bench", "--preset", "quick", "--out", "b", "--methods", "pdp,dpdm",
         "data.sensitive=/nonexistent/images"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)})
    assert result.returncode == 3 and "does not exist" in result.stderr
    assert not (tmp_path / "b").exists()  # not even the shared split key
