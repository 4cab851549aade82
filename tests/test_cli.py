"""The command line as a user meets it: help for every command, the configuration with its comments, a
run directory's state, one-line errors with exit status 3 (typer's 2 for a bad command line), nothing
half-written."""

import json
import os
import subprocess
import sys

import pytest
import typer
import yaml
from omegaconf import OmegaConf

from privimage import __version__
from privimage.cli import EXIT_REFUSED, app
from privimage.config import load_config


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
        (["run", "--out", "r", "--minutes", "6,15"], "privimage bench"),
        (["run", "--out", "r", "--minutes", "soon"], "--minutes"),
    ],
)
def test_bad_input_is_one_line_exit_3_and_no_run_dir(tmp_path, args, words):
    result = privimage(*args, cwd=tmp_path)
    assert result.returncode == EXIT_REFUSED == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_budget_refuses_a_query_that_spends_everything(tmp_path, cache_dir):
    result = privimage("budget", "--preset", "quick", "--out", "r", f"data.cache_dir={cache_dir}",
                       "privacy.epsilon=0.1", "semantics.query_sigma=1", cwd=tmp_path)
    assert result.returncode == EXIT_REFUSED and "semantics.query_sigma" in result.stderr
    assert not (tmp_path / "r").exists()  # the tool writes nothing


def test_datasets_lists_builtins(tmp_path):
    result = privimage("datasets", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("mnist", "public-mix", "glyphs", "animals", "uci-digits"):
        assert name in result.stdout


def test_budget_too_small_to_train_is_refused_before_the_run_dir_exists(tmp_path, cache_dir):
    result = privimage("run", "--preset", "quick", "--out", "r", "privacy.epsilon=0.05", cwd=tmp_path,
                       env={"PRIVIMAGE_CACHE": str(cache_dir)})
    assert result.returncode == EXIT_REFUSED and "semantics.query_sigma" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_changing_the_target_of_a_run_dir_is_refused(tmp_path, cache_dir):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("privacy:\n  epsilon: 3.0\n")
    result = privimage("run", "--preset", "quick", "--out", "r", cwd=tmp_path, env={"PRIVIMAGE_CACHE": str(cache_dir)})
    assert result.returncode == EXIT_REFUSED and "use a new --out" in result.stderr


def test_a_bad_command_line_is_typers_exit_2_not_a_refusal(tmp_path):
    result = privimage("run", "--out", "r", "--no-such-flag", cwd=tmp_path)
    assert result.returncode == 2 and "--no-such-flag" in result.stderr
    assert not (tmp_path / "r").exists()


def commands():
    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", ["", *commands()])
def test_every_command_has_help_with_an_example(tmp_path, command):
    result = privimage(*([command] if command else []), "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "Example" in result.stdout


def test_help_groups_the_commands(tmp_path):
    text = privimage("--help", cwd=tmp_path).stdout
    panels = [text.index(title) for title in ("Pipeline", "Stages", "Tools")]
    assert panels == sorted(panels)
    for group, members in (("Pipeline", ["run", "bench"]), ("Tools", ["config", "show", "audit", "budget"])):
        section = text[text.index(group):]
        assert all(f" {name} " in section for name in members), group


def test_version(tmp_path):
    result = privimage("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"privimage {__version__}"


def test_config_prints_every_resolved_key_beside_its_comment(tmp_path):
    result = privimage("config", "--preset", "quick", "privacy.delta=1e-6", "finetune.trainable=lora", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(yaml.safe_load(result.stdout))
    expected = load_config("quick", None, ["privacy.delta=1e-6", "finetune.trainable=lora"])
    assert OmegaConf.to_container(printed) == OmegaConf.to_container(expected)  # every key, every value
    lines = result.stdout.splitlines()
    assert any(line.startswith("  delta: 1.0e-06") for line in lines)
    trainable = lines.index(next(line for line in lines if line.startswith("  trainable: lora")))
    assert "Weights DP-SGD trains" in "\n".join(lines[trainable - 3:trainable])  # its comment, above it
    assert any(line.startswith("  steps: 20 ") and "scaled with finetune.steps" in line for line in lines)


def test_config_of_a_run_directory_and_of_a_missing_one(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("privacy:\n  epsilon: 3.0\n")
    result = privimage("config", "--out", "r", cwd=tmp_path)
    assert result.returncode == 0 and "  epsilon: 3.0" in result.stdout
    result = privimage("config", "--out", "missing", cwd=tmp_path)
    assert result.returncode == EXIT_REFUSED and "no config.yaml" in result.stderr


def test_an_unknown_key_points_to_privimage_config(tmp_path):
    result = privimage("run", "--out", "r", "finetune.stpes=3", cwd=tmp_path)
    assert result.returncode == EXIT_REFUSED
    assert "finetune.stpes" in result.stderr and "privimage config" in result.stderr and "src/" not in result.stderr


def write_finished_run(root):
    """A run directory as a budgeted run leaves it, with a private figure in every private file."""
    (root / "stages").mkdir(parents=True)
    (root / "private").mkdir()
    (root / "config.yaml").write_text("minutes: 15\n")
    ledger = {"target": {"epsilon": 10.0, "delta": 1e-5}, "accountant": "rdp", "spent": {"epsilon": 9.94, "delta": 1e-5},
              "entries": [{"stage": "semantics", "mechanism": "gaussian", "noise_multiplier": 10.0, "sample_rate": 1.0,
                           "steps": 1, "release": "a", "released_steps": 1},
                          {"stage": "finetune", "mechanism": "subsampled_gaussian", "noise_multiplier": 0.86,
                           "sample_rate": 0.125, "steps": 14, "release": "b", "released_steps": 9}]}
    (root / "privacy.json").write_text(json.dumps(ledger))
    (root / "plan.json").write_text(json.dumps({
        "minutes": 15, "seconds_left": 840.0, "throughput": {"pretrain_step": 0.147}, "pretrain_steps": 2935,
        "finetune_steps": 14, "expected_seconds": {"semantics": 70.0, "pretrain": 440.0, "finetune": 40.0},
        "replanned_seconds_left": 660.0, "slowdown": 1.1}))
    (root / "stages" / "semantics.json").write_text(json.dumps({"fingerprint": "f", "seconds": 72.4}))
    (root / "stages" / "pretrain.json").write_text(json.dumps(
        {"fingerprint": "g", "seconds": 449.0, "stopped_early_at": 2875, "pretraining_images": 7040}))
    (root / "metrics.json").write_text(json.dumps({"accuracy": {"cnn": 0.123456789}}))
    (root / "private" / "reference.json").write_text(json.dumps({"accuracy": {"cnn": 0.987654321}}))


def test_show_prints_the_ledger_stages_plan_and_where_pretraining_stopped(tmp_path):
    write_finished_run(tmp_path / "r")
    result = privimage("show", "r", cwd=tmp_path, env={"COLUMNS": "200"})  # rich's tables: no wrapped cells
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "9.940 of 10" in out and "9 / 14" in out  # composed ε; DP-SGD steps released of booked
    assert "2935 pretraining steps, 14 DP-SGD steps" in out and "11.0 minutes left" in out
    assert "stopped early at step 2875" in out and "pretraining_images=7040" in out
    assert "ran all its steps" not in out and "trained on" not in out
    done = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if line.count("│") > 5}
    assert done["semantics"] == "yes" and done["finetune"] == "no" and done["warmstart"] == "no"
    assert "12345" not in out and "98765" not in out  # metrics.json and private/ are never read


def test_show_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "d").mkdir()
    result = privimage("show", "d", cwd=tmp_path)
    assert result.returncode == EXIT_REFUSED and "not a privimage run directory" in result.stderr
