"""The README as a new user follows it: every command of its quick start runs (on the quick preset), the run
directory it describes is the one a run writes, and CI runs the README's test command."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from privimage.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def quick_start_commands() -> list[list[str]]:
    """The quick start's shell lines as argument lists, comments dropped."""
    block = re.search(r"```bash\n(.*?)```", section("Quick start"), re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if shlex.split(line, comments=True)]


def on_the_quick_preset(command: list[str]) -> list[str]:
    """`.venv/bin/privimage CMD ...` as this interpreter runs it, with `--preset quick` where CMD takes a preset."""
    assert command[0] == ".venv/bin/privimage", command
    name, args = command[1], command[2:]
    takes_preset = any(p.name == "preset" for p in typer.main.get_command(app).commands[name].params)
    extra = ["--preset", "quick"] if takes_preset and "--preset" not in args else []
    return [sys.executable, "-m", "privimage", name, *args, *extra]


@pytest.mark.slow
def test_every_quick_start_command_runs(tmp_path, cache_dir):
    commands = quick_start_commands()
    assert [c[1] for c in commands] == ["run", "show", "config", "run"]
    outputs = []
    for command in commands:
        result = subprocess.run(on_the_quick_preset(command), cwd=tmp_path, capture_output=True, text=True,
                                timeout=900, env={**os.environ, "PRIVIMAGE_CACHE": str(cache_dir)})
        assert result.returncode == 0, (command, result.stderr[-3000:])
        outputs.append(result.stdout)
    assert "privacy ledger" in outputs[1] and "minutes:" in outputs[2]
    for run in ("runs/first", "runs/default"):
        assert (tmp_path / run / "synthetic.npz").is_file()

    # The run-directory table names every file and folder a finished run writes.
    table = section("Quick start").split("| path |", 1)[1]
    named = set(re.findall(r"`([^`/*<]+)", table))
    written = {p.name for p in (tmp_path / "runs" / "first").iterdir()}
    assert written - named == set()


def test_the_quick_start_commands_are_what_a_user_types():
    commands = quick_start_commands()
    assert commands[0][:4] == [".venv/bin/privimage", "run", "--preset", "quick"]
    assert commands[-1] == [".venv/bin/privimage", "run"]  # then the main job, the default preset


def test_ci_runs_the_readmes_test_command():
    """README command 2 sets up and runs the tests; .ci/run calls the same two commands."""
    commands = re.search(r"# 2\. set up and run the test suite\n(.+)\n", README).group(1).split(" && ")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands == ["bash scripts/setup.sh", ".venv/bin/python -m pytest -q"]
    assert ci[-2:] == commands
    assert re.search(r"# 1\. set up and run the main job.*\n(.+)\n", README).group(1) == \
        "bash scripts/setup.sh && .venv/bin/privimage run"
