"""The command line as a user meets it: one-line errors, exit status 2, nothing half-written."""

import json
import os
import subprocess
import sys

import pytest


def privimage(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "privimage", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "--out", "r", "privacy.epsilon=-1"], "privacy.epsilon"),
        (["run", "--out", "r", "privacy.delta=1.5"], "privacy.delta"),
        (["run", "--out", "r", "--preset", "nope"], "unknown preset"),
        (["run", "--out", "r", "no.such.key=1"], "unknown config key"),
        (["run", "--out", "r", "data.sensitive=missing_folder"], "missing_folder"),
        (["run", "--out", "r", "--minutes", "0"], "minutes must be a number"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run_dir(tmp_path, args, words):
    result = privimage(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_budget_prints_calibrated_json(tmp_path):
    result = privimage("budget", "--epsilon", "10", "--delta", "1e-5", "--query-sigma", "20",
                       "--sample-rate", "0.25", "--steps", "60", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) >= {"noise_multiplier", "epsilon", "epsilon_query_only", "epsilon_dpsgd_only", "delta", "accountant"}
    assert 0.99 * 10 <= out["epsilon"] <= 10
    assert out["epsilon_query_only"] < out["epsilon"] and out["epsilon_dpsgd_only"] < out["epsilon"]


def test_budget_refuses_a_query_that_spends_everything(tmp_path):
    result = privimage("budget", "--epsilon", "0.1", "--delta", "1e-5", "--query-sigma", "1",
                       "--sample-rate", "0.25", "--steps", "60", cwd=tmp_path)
    assert result.returncode == 2 and "--query-sigma" in result.stderr


def test_datasets_lists_builtins(tmp_path):
    result = privimage("datasets", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("mnist", "public-mix", "glyphs", "animals", "uci-digits"):
        assert name in result.stdout


def test_budget_too_small_to_train_is_refused_before_the_run_dir_exists(tmp_path, cache_dir):
    result = privimage("run", "--preset", "quick", "--out", "r", "privacy.epsilon=0.05", cwd=tmp_path,
                       env={"PRIVIMAGE_CACHE": str(cache_dir)})
    assert result.returncode == 2 and "semantics.query_sigma" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_changing_the_target_of_a_run_dir_is_refused(tmp_path, cache_dir):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("privacy:\n  epsilon: 3.0\n")
    result = privimage("run", "--preset", "quick", "--out", "r", cwd=tmp_path, env={"PRIVIMAGE_CACHE": str(cache_dir)})
    assert result.returncode == 2 and "use a new --out" in result.stderr
