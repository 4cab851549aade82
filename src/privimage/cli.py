"""Command line: `privimage <command> [--out DIR] [--preset P] [--config F.yaml] [key=value ...]`.

A thin layer over the Python API (`privimage.api.PrivImage`): it resolves the configuration, hands it
to the API and prints results. Exit status: 2 for a bad command line (typer's own), 3 when privimage
refuses (a `UserError`: bad data, config or run directory, or a full disk), with one line saying what to fix.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

import privimage
from privimage import distributed
from privimage.atomic import read_json
from privimage.config import load_config
from privimage.errors import UserError
from privimage.methods import METHODS, STAGE_TABLE
from privimage.rundir import RunDir

EXIT_REFUSED = 3  # a UserError; typer keeps 2 for a bad command line

PIPELINE, STAGES, TOOLS = "Pipeline", "Stages (each alone, on a run directory)", "Tools"
app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="markdown",
    help="Differentially private synthetic images with semantic-aware pretraining (PrivImage).",
    epilog="Examples:\n\n"
           "* `privimage run --preset quick --out runs/first` — the whole pipeline on the built-in digits, in minutes\n"
           "* `privimage run --out runs/mine data.sensitive=/data/xray privacy.epsilon=1` — your own images\n"
           "* `privimage config --preset quick` — every config key, its value and what it means\n"
           "* `privimage show runs/first` — what a run spent, the stages done, its time plan\n\n"
           "Exit status: 0 done, 2 a bad command line, 3 refused (the one-line error says what to fix), "
           "130 interrupted (run the same command again to continue).",
)
console = Console(stderr=True)

Out = Annotated[Path, typer.Option("--out", "-o", help="Run directory (created if missing).")]
Preset = Annotated[Optional[str], typer.Option("--preset", "-p", help="quick | default | paper")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of config keys.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(
    help="key=value overrides, e.g. privacy.epsilon=1 (`privimage config` lists every key).")]
DEFAULT_OUT = Path("runs/default")


def _minutes_option(help_text: str):
    """`--minutes` as `run` and `bench` both take it: a number, or (bench) a comma-separated list."""
    return Annotated[Optional[str], typer.Option("--minutes", metavar="MINUTES", help=help_text)]


def _parse_minutes(text: str) -> list[float]:
    from privimage.bench import parse_list

    return parse_list(text, "minutes", float)


def _model(out: Path, preset: str | None, config: Path | None, overrides: list[str] | None):
    """The Python API's model for this command line: the CLI only parses and prints."""
    from privimage.api import PrivImage

    return PrivImage.from_config(load_config(preset, config, overrides or (), saved=out / "config.yaml"), out)


def _status(result) -> str:
    return "up to date, skipped" if result.skipped else f"done in {result.seconds:.0f}s"


def _version(value: bool) -> None:
    if value:
        print(f"privimage {privimage.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    """Differentially private synthetic images with semantic-aware pretraining (PrivImage)."""


def _stage_command(stage: str, description: str) -> None:
    """`privimage <stage>`: one stage of the table (methods.STAGE_TABLE) on a run directory."""
    def command(out: Out = DEFAULT_OUT, preset: Preset = None, config: ConfigFile = None,
                overrides: Overrides = None,
                force: Annotated[bool, typer.Option(help="Rerun even if up to date.")] = False) -> None:
        _model(out, preset, config, overrides).run(
            [stage], force=force, on_stage=lambda r: console.print(f"{r.stage}: {_status(r)}"))

    command.__doc__ = description
    app.command(name=stage, rich_help_panel=STAGES,
                epilog=f"Example: `privimage {stage} --out runs/first` (after `privimage run` stopped, or to redo it "
                       "with --force; settings as key=value, e.g. `sample.n=5000`)")(command)


@app.command(rich_help_panel=PIPELINE, epilog=(
    "Examples:\n\n"
    "* `privimage run --preset quick --out runs/first` — a first look, in minutes\n"
    "* `privimage run` — the default preset: built-in digits, ε = 10, 15 minutes, into runs/default\n"
    "* `privimage run --minutes 30 privacy.epsilon=1` — another budget and ε\n\n"
    "Stopped or killed? Run the same command again: it continues where it stopped."))
def run(
    out: Out = DEFAULT_OUT, preset: Preset = None, config: ConfigFile = None, overrides: Overrides = None,
    minutes: _minutes_option("Time budget of the whole run in minutes (the `minutes` key); default: the "
                             "preset's (15 for the default preset, none for quick: step counts as configured).") = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=(
        "Check the input, plan the time and the privacy budget, print both, and stop: nothing is written "
        "and nothing is released."))] = False,
) -> None:
    """Run the whole pipeline of the configured method (privimage: semantics → warmstart → pretrain → finetune →
    sample → evaluate → report)."""
    from privimage.report.summary import print_summary

    extra = []
    if minutes is not None:
        budgets = _parse_minutes(minutes)
        if len(budgets) != 1:
            raise UserError(f"--minutes takes one budget for run (got '{minutes}'): compare budgets with privimage bench")
        extra = [f"minutes={budgets[0]}"]
    model = _model(out, preset, config, [*(overrides or []), *extra])
    if dry_run:
        pipeline = model.pipeline.validate()
        if pipeline.plan is not None:
            plan = pipeline.plan
            print(json.dumps({"time_plan": {"minutes": plan.minutes, "pretrain_steps": plan.pretrain_steps,
                                            "finetune_steps": plan.finetune_steps, "evaluation_trimmed": plan.evaluation,
                                            "expected_seconds": plan.expected_seconds}}, indent=1))
        _print_privacy_plan(pipeline)
        return
    results = model.run(on_stage=lambda r: console.print(f"[bold]{r.stage}[/]: {_status(r)}"))
    print_summary(model.pipeline.run, results, console)


for _stage in STAGE_TABLE.values():
    _stage_command(_stage.name, _stage.description)


@app.command(rich_help_panel=PIPELINE, epilog=(
    "Example: `privimage bench --out runs/bench --epsilons 1,10 --minutes 6,15` — about 2.5 hours on 2 CPU "
    "cores.\n\nEvery run spends a full budget on the same data: the outputs together are not one (ε, δ) release."))
def bench(
    out: Annotated[Path, typer.Option("--out", "-o", help="Benchmark directory: one run directory per method and ε.")] = Path("runs/bench"),
    preset: Preset = None, config: ConfigFile = None, overrides: Overrides = None,
    epsilons: Annotated[str, typer.Option(help="Comma-separated target ε values.")] = "1,10",
    methods: Annotated[str, typer.Option(help=f"Comma-separated methods: {', '.join(METHODS)}.")] = ",".join(METHODS),
    minutes: _minutes_option("Time budgets in minutes, comma-separated: one run per method, ε and budget.") = "6,15",
) -> None:
    """Every method at every ε and time budget; writes bench.md (table) and bench.png (accuracy vs budget)."""
    from privimage.api import PrivImage
    from privimage.bench import bench_configs, bench_row, bench_split_key, parse_list, write_bench, write_bench_split_key

    cfg = load_config(preset, config, overrides or ())
    configs = bench_configs(cfg, parse_list(methods, "methods", str), parse_list(epsilons, "epsilons", float),
                            _parse_minutes(minutes))
    key = bench_split_key(out)
    models = {name: PrivImage.from_config(run_cfg, out / name, key).validate() for name, run_cfg in configs.items()}
    write_bench_split_key(out, key)  # only once every run validated: a bad input leaves nothing behind
    rows = []
    for name, model in models.items():
        console.print(f"[bold]{name}[/]")
        model.run(on_stage=lambda r: console.print(f"  {r.stage}: {_status(r)}"))
        pipeline = model.pipeline
        rows.append(bench_row(name, pipeline.cfg, pipeline.run, pipeline.public_images_used()))
        write_bench(out, rows)  # after every run, so a long benchmark shows its progress
    console.print(f"benchmark: {out / 'bench.md'}, {out / 'bench.png'}")


def _yaml_value(value) -> str:
    """One value in YAML's flow style, as it would be written after `key: ` (a list of one, unwrapped)."""
    return yaml.safe_dump([value], default_flow_style=True, width=float("inf")).strip()[1:-1]


def commented_config(cfg: DictConfig) -> str:
    """`cfg` as YAML in the shape of presets/base.yaml (the schema), with every comment of it kept and
    every value replaced by the resolved one: each key beside what it means."""
    schema = resources.files("privimage.presets").joinpath("base.yaml").read_text()
    lines, sections = [], []  # sections: (indent, name) of the sections enclosing the current line
    for line in schema.splitlines():
        match = re.fullmatch(r"( *)(\w+):( *)([^#]*?)( *)(#.*)?", line)
        if match is None:  # a comment or a blank line
            lines.append(line)
            continue
        indent, key, value = len(match[1]), match[2], match[4]
        while sections and sections[-1][0] >= indent:
            sections.pop()
        if not value:  # a section: its keys follow, indented
            sections.append((indent, key))
            lines.append(line)
            continue
        resolved = OmegaConf.select(cfg, ".".join([name for _, name in sections] + [key]))
        if OmegaConf.is_list(resolved):  # blocks: [1, 1, 1] and the like
            resolved = OmegaConf.to_container(resolved, resolve=True)
        text = f"{match[1]}{key}: {_yaml_value(resolved)}"
        if match[6]:
            text = f"{text:<{match.start(6) - 1}} {match[6]}"
        lines.append(text)
    return "\n".join(lines) + "\n"


@app.command(rich_help_panel=TOOLS, epilog=(
    "Examples:\n\n"
    "* `privimage config` — the default preset\n"
    "* `privimage config --preset quick pretrain.steps=100` — what that command line would run\n"
    "* `privimage config --out runs/first` — what a run directory recorded"))
def config(
    preset: Preset = None, config_file: ConfigFile = None, overrides: Overrides = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Start from this run directory's config.yaml (as the stage commands do).")] = None,
) -> None:
    """Print the resolved configuration: every key privimage knows, its value and its comment."""
    saved = out / "config.yaml" if out is not None else None
    if saved is not None and not saved.is_file():
        raise UserError(f"{out} has no config.yaml: give the --out of a privimage run")
    print(commented_config(load_config(preset, config_file, overrides or (), saved=saved)), end="")


def _ledger_table(run: RunDir) -> Table:
    from privimage.report.summary import privacy_by_stage

    rows, ledger = privacy_by_stage(run)
    table = Table(title="privacy ledger (privacy.json)", show_footer=True)
    for name, footer in (("stage", "total (composed)"), ("mechanism", ""), ("noise multiplier", ""),
                         ("sample rate", ""), ("steps released / booked", ""),
                         ("ε alone", f"{ledger['spent']['epsilon']:.3f} of {ledger['target']['epsilon']:g}")):
        table.add_column(name, footer=footer)
    for entry, (_, epsilon) in zip(ledger["entries"], rows):
        table.add_row(entry["stage"], entry["mechanism"], f"{entry['noise_multiplier']:.4g}",
                      f"{entry['sample_rate']:.4g}", f"{entry.get('released_steps', 0)} / {entry['steps']}",
                      f"{epsilon:.3f}")
    table.caption = f"δ = {ledger['target']['delta']:g}; accountant: {ledger['accountant']}"
    return table


def _stages_table(run: RunDir, stages: tuple[str, ...], plan: dict | None) -> Table:
    table = Table(title="stages (stages/*.json)")
    for name in ("stage", "done", "seconds", "planned seconds", "notes"):
        table.add_column(name)
    for stage in stages:
        marker = run.stages / f"{stage}.json"
        facts = read_json(marker) if marker.exists() else {}
        notes = {k: v for k, v in facts.items() if k not in ("fingerprint", "seconds")}
        planned = (plan or {}).get("expected_seconds", {}).get(stage)
        table.add_row(stage, "yes" if facts else "no", f"{facts['seconds']:.0f}" if facts else "–",
                      "–" if planned is None else f"{planned:.0f}",
                      ", ".join(f"{k}={json.dumps(v)}" for k, v in notes.items()))
    return table


def _plan_lines(run: RunDir, plan: dict | None) -> list[str]:
    """The time plan and where pretraining stopped, in words."""
    marker = run.stages / "pretrain.json"
    notes = read_json(marker) if marker.exists() else {}
    stopped, trained_on = notes.get("stopped_early_at"), notes.get("trained_on_to")
    if plan is None:
        lines = ["time plan: none (minutes: null): the step counts of config.yaml"]
    else:
        lines = [f"time plan (plan.json): {plan['minutes']:g} minutes, {plan['seconds_left'] / 60:.1f} left when "
                 f"planned: {plan['pretrain_steps']} pretraining steps, {plan['finetune_steps']} DP-SGD steps"]
        if plan.get("replanned_seconds_left") is not None:
            lines.append(f"pretraining planned again with {plan['replanned_seconds_left'] / 60:.1f} minutes left, "
                         f"the rest expected {plan.get('slowdown') or 1:.2f}x slower than probed")
        lines.append("probe, seconds per unit: " + ", ".join(f"{k} {v:.3g}" for k, v in plan["throughput"].items()))
    if stopped is not None:
        lines.append(f"pretraining stopped early at step {stopped}, to keep the time budget")
    elif trained_on is not None:
        lines.append(f"pretraining trained on to step {trained_on}: the machine ran faster than planned")
    elif marker.exists():
        lines.append("pretraining ran all its steps")
    return lines


@app.command(rich_help_panel=TOOLS, epilog="Example: `privimage show runs/default`")
def show(run_dir: Annotated[Path, typer.Argument(metavar="DIR", help="A run directory (the --out of a run).")]) -> None:
    """What a run directory holds: its privacy ledger, the stages done, its time plan and where pretraining
    stopped. Reads only shareable files (privacy.json, stages/, plan.json, config.yaml)."""
    run = RunDir(run_dir)
    if not run.ledger.is_file() or not run.config.is_file():
        raise UserError(f"{run_dir} is not a privimage run directory (no privacy.json or config.yaml): "
                        "give the --out of a run")
    cfg = load_config(saved=run.config)
    plan = read_json(run.plan) if run.plan.exists() else None
    out = Console()
    out.print(f"{run_dir}: method {cfg.method}, data.sensitive {cfg.data.sensitive}", highlight=False)
    out.print(_ledger_table(run))
    out.print(_stages_table(run, METHODS[cfg.method].stages_for(cfg), plan))
    for line in _plan_lines(run, plan):
        out.print(line, highlight=False, soft_wrap=True)


@app.command(rich_help_panel=TOOLS, epilog=(
    "Example: `privimage audit --preset quick --out runs/audit privacy.epsilon=1`"))
def audit(
    out: Annotated[Path, typer.Option("--out", "-o", help="New directory for the audit run and audit.json.")] = Path("runs/audit"),
    preset: Preset = None, config: ConfigFile = None, overrides: Overrides = None,
    without_dp_noise: Annotated[bool, typer.Option(
        "--without-dp-noise", hidden=True, help="Debugging only: train without DP noise (no guarantee).")] = False,
) -> None:
    """Empirical privacy audit: canaries in DP fine-tuning, one-run ε lower bound vs the claimed ε (audit.json)."""
    from privimage.audit import run_audit

    if without_dp_noise:
        console.print("[yellow]warning:[/] --without-dp-noise: this training run has NO privacy guarantee")
    result = run_audit(load_config(preset, config, overrides or ()), out, dp_noise=not without_dp_noise)
    console.print(f"ε lower bound {result['epsilon_lower_bound']:.3f} (confidence {1 - result['beta']:g}) vs "
                  f"claimed ε {result['epsilon_claimed']:.3f}; {result['correct_guesses']}/{result['guesses']} "
                  f"guesses right; {out / 'audit.json'}")
    if not result["conclusive"]:
        console.print(f"inconclusive: with {result['guesses']} guesses this audit can prove at most "
                      f"ε = {result['epsilon_lower_bound_max']:.2f}, below the claimed {result['epsilon_claimed']:.3f}, "
                      "so it cannot tell whether the claim holds; raise audit.canaries and audit.guesses")


@app.command(rich_help_panel=TOOLS, epilog=(
    "Examples: `privimage budget` (the default run), `privimage budget privacy.epsilon=1 warm_start.epsilon_share=0.5`"))
def budget(out: Out = DEFAULT_OUT, preset: Preset = None, config: ConfigFile = None, overrides: Overrides = None) -> None:
    """Where ε goes: every release a run of this config books, its σ and its ε alone; prints one JSON object.

    It reads the config as `run` does (an existing --out keeps its own plan) and counts the sensitive
    training images; it writes nothing. With `minutes`, DP-SGD's steps come from a time plan probed now."""
    _print_privacy_plan(_model(out, preset, config, overrides).pipeline.validate())


def _print_privacy_plan(pipeline) -> None:
    from privimage.privacy.plan import summary

    print(json.dumps(summary(pipeline.cfg, len(pipeline.sensitive_train), pipeline.privacy_plan()), indent=1))


@app.command(rich_help_panel=TOOLS, epilog="Example: `privimage datasets`")
def datasets(
    glyph_samples: Annotated[int, typer.Option(help="Images per glyph class (data.glyph_samples).")] = 300,
) -> None:
    """List the built-in datasets with their sizes and classes."""
    from privimage.data import builtin_datasets

    table = Table("name", "role", "images", "classes", "examples", "description")
    for info in builtin_datasets(glyph_samples):
        table.add_row(info.name, info.role, str(info.size), str(info.num_classes),
                      ", ".join(info.example_classes), info.description)
    Console().print(table)


def main() -> None:
    """Under torchrun every rank runs the same command; rank 0 alone prints and writes."""
    distributed.init_from_env()
    main_rank = distributed.is_main()
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(message)s")
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its event reader chatters at INFO
    console.quiet = not main_rank
    try:
        app()
    except UserError as exc:
        console.quiet = False
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_REFUSED)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        console.quiet = False
        console.print(f"[red]error:[/] no space left on device ({exc.filename or 'while writing'}): free some "
                      "space and run the same command again to continue", highlight=False, soft_wrap=True)
        sys.exit(EXIT_REFUSED)
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to continue where it stopped")
        sys.exit(130)
    finally:
        distributed.shutdown()
