"""`privimage bench`: every method at every ε and time budget, in one table and one figure.

Each (method, ε, budget) is an ordinary run directory `DIR/<method>-eps<ε>-<M>min` made from the same
configuration: only `method`, `privacy.epsilon` and `minutes` differ, and all share one train/test
split. Equal compute means equal minutes, each method spending them its own way (the planner gives
privimage and pdp pretraining and DP-SGD steps, dpdm DP-SGD steps only). dpmerf does not scale with
the budget (its generator runs its configured steps, in less than the smallest budget): it runs
once per ε, `DIR/dpmerf-eps<ε>`. The owner's real-data reference does not depend on the method and
is left out (`evaluate.reference=false`). Runs are resumable and skipped when done, like `privimage run`.

`bench.datasets` lists data settings to run all of that on, one after another (e.g. the built-in digits and
animals against a public set of glyphs, a domain the public data does not cover); their runs go to
`DIR/<sensitive>-<public>/`. bench.md then ends with privimage's margin over dpmerf per dataset, ε and budget.
The public share of each run (stages/evaluate.py) is private: it goes to `DIR/private/public_share.md`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from privimage.checkpoint import load_checkpoint
from privimage.config import validate
from privimage.errors import UserError
from privimage.methods import METHODS, STAGE_TABLE, Method
from privimage.report.figures import figure_png
from privimage.atomic import read_json, write_bytes, write_text
from privimage.rundir import RunDir
from privimage.stages.evaluate import read_public_share
from privimage.stages.registry import MODEL_MODULES

STAGE_COLUMNS = tuple(name for name, stage in STAGE_TABLE.items() if stage.takes_time)  # in run order


def parse_list(text: str, what: str, convert: Callable[[str], object]) -> list:
    """`1,10` → [1.0, 10.0]; a bad item is a UserError naming the option."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"--{what} is empty: give a comma-separated list")
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise UserError(f"--{what} must be a comma-separated list (got '{text}')") from None


def dataset_label(cfg: DictConfig) -> str:
    """`<sensitive>-<public>`: the last path component of each (a built-in name is its own)."""
    return f"{Path(str(cfg.data.sensitive)).name}-{Path(str(cfg.data.public)).name}"


def with_data(cfg: DictConfig, data: object) -> DictConfig:
    """`cfg` with one entry of `bench.datasets`: a sensitive dataset, or a mapping of `data` keys."""
    layer = {"sensitive": data} if isinstance(data, str) else data
    try:
        return OmegaConf.merge(cfg, {"data": layer})
    except OmegaConfBaseException:
        raise UserError(f"bench.datasets: {data} is neither a dataset nor a mapping of data keys: write e.g. "
                        "[mnist,{sensitive: animals, public: glyphs}]") from None


def bench_configs(cfg: DictConfig, methods: Sequence[str], epsilons: Sequence[float],
                  budgets: Sequence[float]) -> dict[str, DictConfig]:
    """One validated config per run name, differing from `cfg` only in data (`bench.datasets`), method, ε
    and minutes."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    if any(minutes <= 0 for minutes in budgets):
        raise UserError("--minutes must be positive numbers of minutes, e.g. 5,15")
    datasets = list(cfg.bench.datasets)
    data_configs = [with_data(cfg, data) for data in datasets] or [cfg]
    configs = {}
    for data_cfg in data_configs:
        folder = f"{dataset_label(data_cfg)}/" if datasets else ""
        for epsilon in epsilons:  # in this order, so that a benchmark stopped early has whole rows of the table
            for minutes in budgets:
                for method in methods:
                    planned = METHODS[method].follows_budget
                    name = f"{folder}{method}-eps{epsilon:g}" + (f"-{minutes:g}min" if planned else "")
                    if name in configs:
                        continue
                    run_cfg = OmegaConf.merge(data_cfg, {"method": method, "privacy": {"epsilon": float(epsilon)},
                                                         "minutes": minutes if planned else None,
                                                         "evaluate": {"reference": False}})
                    validate(run_cfg)
                    configs[name] = run_cfg
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
    # Trained tensors only: a generator's batch-norm statistics and counters are not parameters.
    return sum(t.numel() for name, t in tensors.items() if t.is_floating_point() and "running_" not in name)


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
        public_images = facts.get("public_images", public_images)  # pretrain's count after pretrain.public_fit
    return {
        "run": name, "dataset": dataset_label(cfg), "method": cfg.method, "epsilon": cfg.privacy.epsilon,
        "minutes": cfg.minutes, "public_share": read_public_share(run),
        "spent": ledger["spent"]["epsilon"],
        "fid": metrics.get("fid"), "accuracy": metrics["accuracy"], "public_images": public_images,
        "parameters": parameter_count(MODEL_MODULES[METHODS[cfg.method].model_stage].model_file(run)),
        "seconds": seconds, "wall": sum(v for v in seconds.values() if v is not None),
        "reused": reused,
    }


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def bench_markdown(rows: list[dict]) -> str:
    classifiers = sorted({name for row in rows for name in row["accuracy"]})
    header = ["dataset", "method", "budget (min)", "ε target", "ε spent", "FID", *(f"accuracy ({c})" for c in classifiers),
              "public images", "parameters", "stages (min)", *(f"{s} s" for s in STAGE_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["dataset"], row["method"], _cell(row["minutes"], "g"), f"{row['epsilon']:g}", f"{row['spent']:.3f}",
                 _cell(row["fid"], ".1f"),
                 *(_cell(row["accuracy"].get(c), ".3f") for c in classifiers), f"{row['public_images']:,}",
                 f"{row['parameters']:,}", f"{row['wall'] / 60:.1f}",
                 *("cached" if s in row.get("reused", ()) else _cell(row["seconds"][s], ".0f") for s in STAGE_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nEqual minutes for every method (`budget`), spent its own way; dpmerf runs its configured steps, "
            "whatever the budget. Accuracy: classifiers trained on the synthetic set without augmentation, tested "
            "on the real test split. `stages (min)` and the stage columns: seconds on each run's budget clock, without "
            "data loading and the planner's probe, where work that reads sensitive data counts at its planned "
            "seconds (none without a plan, as for dpmerf; measured seconds stay in each run's `private/timings.json`). "
            "`–`: not measured (e.g. `evaluate.fid=false`) or stage not part of the method; `cached`: the "
            "model pretrained by an earlier run on the same public images with the same settings was reused.\n")
    return "\n".join(lines) + "\n" + note + margin_markdown(rows, classifiers)


def margin_markdown(rows: list[dict], classifiers: list[str]) -> str:
    """Each method's accuracy minus that of the method it is compared with (`Method.compared_with`: privimage
    against dpmerf), in points, for each dataset, ε and budget that has both."""
    sections = []
    for method in METHODS.values():
        if method.compared_with is None:
            continue
        theirs = {(row["dataset"], row["epsilon"]): row for row in rows if row["method"] == method.compared_with}
        pairs = [(row, theirs[row["dataset"], row["epsilon"]]) for row in rows
                 if row["method"] == method.name and (row["dataset"], row["epsilon"]) in theirs]
        if pairs:
            sections.append(_margin_section(method, pairs, classifiers))
    return "".join(sections)


def _margin_section(method: Method, pairs: list[tuple[dict, dict]], classifiers: list[str]) -> str:
    header = ["dataset", "ε target", "budget (min)", *(f"margin ({c}, points)" for c in classifiers)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, theirs in pairs:
        margins = [None if c not in row["accuracy"] or c not in theirs["accuracy"]
                   else 100 * (row["accuracy"][c] - theirs["accuracy"][c]) for c in classifiers]
        cells = [row["dataset"], f"{row['epsilon']:g}", _cell(row["minutes"], "g"), *(_cell(m, "+.1f") for m in margins)]
        lines.append("| " + " | ".join(cells) + " |")
    mine, baseline = method.name, method.compared_with
    return (f"\n## {mine}'s margin over {baseline}\n\n{mine}'s accuracy minus {baseline}'s at the same ε, on the same "
            f"dataset and split: {method.margin_measures}.\n\n" + "\n".join(lines) + "\n")


def public_share_markdown(rows: list[dict]) -> str:
    """Private to the data owner: the share of each run's samples, and of the real test split, that a
    public-vs-sensitive classifier trained on the sensitive training split calls public."""
    header = ["dataset", "method", "budget (min)", "ε target", "synthetic called public", "real test called public"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        share = row["public_share"] or {}
        lines.append("| " + " | ".join([row["dataset"], row["method"], _cell(row["minutes"], "g"), f"{row['epsilon']:g}",
                                         _cell(share.get("synthetic"), ".3f"), _cell(share.get("real_test"), ".3f")])
                     + " |")
    return ("Private to the data owner (a statistic of the sensitive training split; stages/evaluate.py). `–`: "
            "not measured (`evaluate.public_share=false`).\n\n" + "\n".join(lines) + "\n")


def bench_figure(rows: list[dict]) -> bytes:
    """Accuracy (best classifier) against the budget, one panel per ε; dpmerf, which does not scale
    with the budget, as a level line."""
    epsilons = sorted({row["epsilon"] for row in rows})
    budgets = sorted({row["minutes"] for row in rows if row["minutes"] is not None}) or [1.0]
    several = len({row["dataset"] for row in rows}) > 1
    fig = Figure(figsize=(4.5 * len(epsilons), 3.6))
    axes = fig.subplots(1, len(epsilons), squeeze=False)[0]
    for axis, epsilon in zip(axes, epsilons):
        mine = [row for row in rows if row["epsilon"] == epsilon]
        for dataset, method in dict.fromkeys((row["dataset"], row["method"]) for row in mine):
            points = sorted((row for row in mine if row["method"] == method and row["dataset"] == dataset),
                            key=lambda row: row["minutes"] or 0)
            best = [max(row["accuracy"].values()) for row in points]
            label = f"{dataset}: {method}" if several else method
            if points[0]["minutes"] is None:
                axis.plot([budgets[0], budgets[-1]], [best[0]] * 2, linestyle="--", label=f"{label} (no budget)")
            else:
                axis.plot([row["minutes"] for row in points], best, marker="o", label=label)
        axis.set_title(f"ε = {epsilon:g}")
        axis.set_xlabel("time budget (minutes)")
        axis.set_ylabel("accuracy on real test data")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    return figure_png(fig)


def write_bench(out: Path, rows: list[dict]) -> None:
    write_text(out / "bench.md", bench_markdown(rows))
    write_bytes(out / "bench.png", bench_figure(rows))
    write_text(out / "private" / "public_share.md", public_share_markdown(rows), private=True)
