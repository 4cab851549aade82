"""Command line: `privimage <command> [--out DIR] [--preset P] [--config F.yaml] [key=value ...]`.

A thin layer over the Python API (`privimage.api.PrivImage`): it resolves the configuration, hands it
to the API and prints results. Every `UserError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from privimage import distributed
from privimage.config import load_config
from privimage.errors import UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Differentially private synthetic images with semantic-aware pretraining (PrivImage).",
)
console = Console(stderr=True)

Out = Annotated[Path, typer.Option("--out", "-o", help="Run directory (created if missing).")]
Preset = Annotated[Optional[str], typer.Option("--preset", "-p", help="quick | default | paper")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of config keys.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. privacy.epsilon=1")]
DEFAULT_OUT = Path("runs/default")


def _model(out: Path, preset: str | None, config: Path | None, overrides: list[str] | None):
    """The Python API's model for this command line: the CLI only parses and prints."""
    from privimage.api import PrivImage

    return PrivImage.from_config(load_config(preset, config, overrides or (), saved=out / "config.yaml"), out)


def _status(result) -> str:
    return "up to date, skipped" if result.skipped else f"done in {result.seconds:.0f}s"


def _stage_command(stage: str, help_text: str) -> None:
    def command(out: Out = DEFAULT_OUT, preset: Preset = None, config: ConfigFile = None,
                overrides: Overrides = None,
                force: Annotated[bool, typer.Option(help="Rerun even if up to date.")] = False) -> None:
        _model(out, preset, config, overrides).run(
            [stage], force=force, on_stage=lambda r: console.print(f"{r.stage}: {_status(r)}"))

    command.__doc__ = help_text
    app.command(name=stage)(command)


@app.command()
def run(
    out: Out = DEFAULT_OUT, preset: Preset = None, config: ConfigFile = None, overrides: Overrides = None,
    minutes: Annotated[Optional[float], typer.Option(
        help="Time budget of the whole run (the `minutes` key); default: the step counts as configured.")] = None,
) -> None:
    """Run the whole pipeline: semantics → warmstart → pretrain → finetune → sample → evaluate → report."""
    from privimage.report.summary import print_summary

    extra = [f"minutes={minutes}"] if minutes is not None else []
    model = _model(out, preset, config, [*(overrides or []), *extra])
    results = model.run(on_stage=lambda r: console.print(f"[bold]{r.stage}[/]: {_status(r)}"))
    print_summary(model.pipeline.run, results, console)


_stage_command("semantics", "Train the semantic classifier on public data, query it with DP, select semantics.")
_stage_command("warmstart", "A DP-MERF release (warm_start.epsilon_share of ε) whose generator's images join pretraining.")
_stage_command("pretrain", "Pretrain the diffusion model on the selected public images (and the warm start's).")
_stage_command("finetune", "Fine-tune the pretrained model with DP-SGD on the sensitive training split.")
_stage_command("dpmerf", "method=dpmerf: one noisy release of mean embeddings, a generator fitted to it, its samples.")
_stage_command("evaluate", "FID, downstream accuracy, precision/recall and memorization of the synthetic set.")
_stage_command("report", "Write report.html: config, privacy ledger, semantics, samples, metrics.")


@app.command()
def sample(out: Out = DEFAULT_OUT, preset: Preset = None, config: ConfigFile = None, overrides: Overrides = None,
           n: Annotated[Optional[int], typer.Option("--n", help="Number of images (sample.n).")] = None) -> None:
    """Sample a labelled synthetic dataset (synthetic.npz, PNG folders, samples.png); no privacy cost."""
    extra = [f"sample.n={n}"] if n is not None else []
    _model(out, preset, config, [*(overrides or []), *extra]).run(
        ["sample"], on_stage=lambda r: console.print(f"sample: {_status(r)}"))


@app.command()
def bench(
    out: Annotated[Path, typer.Option("--out", "-o", help="Benchmark directory: one run directory per method and ε.")] = Path("runs/bench"),
    preset: Preset = None, config: ConfigFile = None, overrides: Overrides = None,
    epsilons: Annotated[str, typer.Option(help="Comma-separated target ε values.")] = "1,10",
    methods: Annotated[str, typer.Option(help="Comma-separated methods: privimage, pdp, dpdm, dpmerf.")] = "privimage,pdp,dpdm,dpmerf",
    minutes: Annotated[str, typer.Option(help="Comma-separated time budgets in minutes, one run per method, ε and budget.")] = "6,15",
) -> None:
    """Every method at every ε and time budget; writes bench.md (table) and bench.png (accuracy vs budget)."""
    from privimage.api import PrivImage
    from privimage.bench import bench_configs, bench_row, bench_split_key, parse_list, write_bench, write_bench_split_key

    cfg = load_config(preset, config, overrides or ())
    configs = bench_configs(cfg, parse_list(methods, "methods", str), parse_list(epsilons, "epsilons", float),
                            parse_list(minutes, "minutes", float))
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


@app.command()
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


@app.command()
def budget(
    epsilon: Annotated[float, typer.Option(help="Target ε.")],
    delta: Annotated[float, typer.Option(help="Target δ.")],
    query_sigma: Annotated[float, typer.Option(help="Noise multiplier of the semantic query (0: no query).")],
    sample_rate: Annotated[float, typer.Option(help="DP-SGD Poisson sampling rate q.")],
    steps: Annotated[int, typer.Option(help="DP-SGD steps T.")],
    accountant: Annotated[str, typer.Option(help="rdp | prv")] = "rdp",
) -> None:
    """Calibrate DP-SGD's noise so that query + DP-SGD meet (ε, δ); prints one JSON object."""
    from privimage.privacy.accountant import FixedReleasesExceedTarget, NoiseBeyondLimit, budget as compute_budget

    if not 0 < sample_rate <= 1:
        raise UserError(f"--sample-rate must be in (0, 1] (got {sample_rate})")
    if steps < 1:
        raise UserError(f"--steps must be >= 1 (got {steps})")
    if accountant not in ("rdp", "prv"):
        raise UserError(f"--accountant must be rdp or prv (got {accountant})")
    if epsilon <= 0 or not 0 < delta < 1 or query_sigma < 0:
        raise UserError("need --epsilon > 0, 0 < --delta < 1 and --query-sigma >= 0")
    try:
        print(json.dumps(compute_budget(epsilon, delta, query_sigma, sample_rate, steps, accountant)))
    except FixedReleasesExceedTarget as error:
        raise UserError(f"{error}: raise --query-sigma or --epsilon") from None
    except NoiseBeyondLimit as error:
        raise UserError(f"{error}: raise --epsilon or lower --steps") from None


@app.command()
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
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        console.quiet = False
        console.print(f"[red]error:[/] no space left on device ({exc.filename or 'while writing'}): free some "
                      "space and run the same command again to continue", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to continue where it stopped")
        sys.exit(130)
    finally:
        distributed.shutdown()
