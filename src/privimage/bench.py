"""`privimage bench`: every method at every ε, at equal compute, in one table and one figure.

Each (method, ε) is an ordinary run directory `DIR/<method>-eps<ε>` made from the same configuration
(same model, same DP-SGD steps and batch, same pretraining steps for privimage and pdp): only `method`
and `privacy.epsilon` differ, and all share one train/test split. Runs are resumable and skipped when
done, like `privimage run`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from privimage.checkpoint import load_checkpoint
from privimage.config import validate
from privimage.stages.pretrain import MODEL_FILE
from privimage.errors import UserError
from privimage.methods import METHODS
from privimage.report.figures import figure_png
from privimage.atomic import read_json, write_bytes, write_text
from privimage.rundir import RunDir

STAGE_COLUMNS = ("semantics", "pretrain", "finetune", "sample", "evaluate")


def parse_list(text: str, what: str, convert: Callable[[str], object]) -> list:
    """`1,10` → [1.0, 10.0]; a bad item is a UserError naming the option."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"--{what} is empty: give a comma-separated list")
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise UserError(f"--{what} must be a comma-separated list (got '{text}')") from None


def bench_configs(cfg: DictConfig, methods: Sequence[str], epsilons: Sequence[float]) -> dict[str, DictConfig]:
    """One validated config per run name, differing from `cfg` only in method and ε."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    configs = {}
    for method in methods:
        for epsilon in epsilons:
            run_cfg = OmegaConf.merge(cfg, {"method": method, "privacy": {"epsilon": float(epsilon)}})
            validate(run_cfg)
            configs[f"{method}-eps{epsilon:g}"] = run_cfg
    return configs


def bench_split_key(out: Path) -> bytes:
    """The benchmark's train/test split key, shared by all its runs so that they differ only in method.

    Read from DIR/private/split.key, or new (write it with `write_bench_split_key` once the runs validate).
    """
    path = Path(out) / "private" / "split.key"
    return path.read_bytes() if path.exists() else secrets.token_bytes(32)


def write_bench_split_key(out: Path, key: bytes) -> None:
    path = Path(out) / "private" / "split.key"
    if not path.exists():
        write_bytes(path, key, private=True)


def parameter_count(model_file: Path) -> int:
    tensors, _ = load_checkpoint(model_file)
    return sum(tensor.numel() for tensor in tensors.values())  # the denoiser has no buffers: all are parameters


def bench_row(name: str, cfg: DictConfig, run: RunDir, public_images: int) -> dict:
    """What bench.md shows about one finished run, read from its artifacts."""
    ledger, metrics = read_json(run.ledger), read_json(run.metrics)
    seconds, reused = {}, []
    for stage in STAGE_COLUMNS:
        marker = run.stages / f"{stage}.json"
        facts = read_json(marker) if marker.exists() else {}
        seconds[stage] = facts.get("seconds")
        if facts.get("reused_cached_model"):
            reused.append(stage)
    return {
        "run": name, "method": cfg.method, "epsilon": cfg.privacy.epsilon, "spent": ledger["spent"]["epsilon"],
        "fid": metrics.get("fid"), "accuracy": metrics["accuracy"], "public_images": public_images,
        "parameters": parameter_count(run.finetune_dir / MODEL_FILE), "seconds": seconds,
        "reused": reused,
    }


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def bench_markdown(rows: list[dict]) -> str:
    classifiers = sorted({name for row in rows for name in row["accuracy"]})
    header = ["method", "ε target", "ε spent", "FID", *(f"accuracy ({c})" for c in classifiers), "public images",
              "parameters", *(f"{s} s" for s in STAGE_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], f"{row['epsilon']:g}", f"{row['spent']:.3f}", _cell(row["fid"], ".1f"),
                 *(_cell(row["accuracy"].get(c), ".3f") for c in classifiers), f"{row['public_images']:,}",
                 f"{row['parameters']:,}",
                 *("cached" if s in row.get("reused", ()) else _cell(row["seconds"][s], ".0f") for s in STAGE_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nSame model, same DP-SGD steps and batch for every method; privimage and pdp pretrain for the same "
            "number of steps. Accuracy: classifiers trained on the synthetic set, tested on the real test split. "
            "`–`: not measured (e.g. `evaluate.fid=false`) or stage not part of the method; `cached`: the model "
            "pretrained by an earlier run on the same public images with the same settings was reused.\n")
    return "\n".join(lines) + "\n" + note


def bench_figure(rows: list[dict]) -> bytes:
    fig = Figure(figsize=(9, 3.6))
    fid_axis, accuracy_axis = fig.subplots(1, 2)
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = sorted((row for row in rows if row["method"] == method), key=lambda row: row["epsilon"])
        epsilons = [row["epsilon"] for row in mine]
        if all(row["fid"] is not None for row in mine):
            fid_axis.plot(epsilons, [row["fid"] for row in mine], marker="o", label=method)
        best = [max(row["accuracy"].values()) for row in mine]
        accuracy_axis.plot(epsilons, best, marker="o", label=method)
    for axis, label in ((fid_axis, "FID (lower is better)"), (accuracy_axis, "accuracy, best classifier")):
        axis.set_xscale("log")
        axis.set_xlabel("ε")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    return figure_png(fig)


def write_bench(out: Path, rows: list[dict]) -> None:
    write_text(out / "bench.md", bench_markdown(rows))
    write_bytes(out / "bench.png", bench_figure(rows))
