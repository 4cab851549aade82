"""Stage 6: `report.html`, one self-contained page (images embedded) about a run.

It shows the config, the privacy ledger and how ε was spent over the run, the selected semantics
with public examples, the training curves, synthetic samples beside real test examples, and the
metrics. It is written for the data owner alone (0600): the real examples come from the held-out test split.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from privimage import distributed
from privimage.config import to_yaml
from privimage.data import ImageDataset
from privimage.privacy.ledger import PrivacyLedger
from privimage.report.figures import figure_png, image_grid, png_bytes
from privimage.atomic import read_json, write_text
from privimage.rundir import RunDir
from privimage.stages.evaluate import read_reference
from privimage.synthetic import load_synthetic

if TYPE_CHECKING:
    from privimage.pipeline import Pipeline

EXAMPLES = 8
CURVE_POINTS = 40

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}pre{background:#f7f7f7;padding:1em;overflow:auto;max-height:30em}
img.pix{image-rendering:pixelated}.note{color:#666;font-size:.9em}
"""


def _img(png: bytes, alt: str, scale: int = 1, css: str = "") -> str:
    data = base64.b64encode(png).decode()
    style = f' style="zoom:{scale}"' if scale != 1 else ""
    return f'<img class="{css}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{style}>'


def _plain(value: object) -> str:
    """A number to 3 decimals, a dict as `key value, ...` with its numbers so."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _spending_curve(ledger: PrivacyLedger) -> bytes:
    """Composed ε after each fraction of each mechanism's steps, the earlier mechanisms included."""
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    for booking, steps, epsilon in ledger.spending_curve(CURVE_POINTS):
        ax.plot(steps, epsilon, marker=".", label=f"{booking.stage} ({booking.mechanism.kind})")
    ax.axhline(ledger.target_epsilon, color="red", linestyle="--", label="target ε")
    ax.set_xlabel("steps of the mechanism")
    ax.set_ylabel("composed ε")
    ax.legend(fontsize=8)
    return figure_png(fig)


def _loss_curves(run: RunDir) -> bytes | None:
    curves = {}
    for stage_dir in sorted(run.tensorboard.glob("*")):
        events = EventAccumulator(str(stage_dir)).Reload()
        for tag in events.Tags()["scalars"]:
            if "loss" in tag:
                curves[tag] = [(s.step, s.value) for s in events.Scalars(tag)]
    if not curves:
        return None
    fig = Figure(figsize=(4 * len(curves), 3))
    for ax, (tag, points) in zip(np.atleast_1d(fig.subplots(1, len(curves))), curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, linewidth=0.8)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    return figure_png(fig)


def _semantics_section(run: RunDir, public: ImageDataset | None) -> str:
    if not run.semantics.exists() or public is None:
        return "<p>No semantic query in this run (method without selection).</p>"
    semantics = read_json(run.semantics)
    index = {name: i for i, name in enumerate(public.class_names)}
    rows = []
    for sensitive_name, picks in semantics["selected"].items():
        examples = [public.images[public.labels == index[p]][:4] for p in picks]
        rows.append(f"<tr><td>{html.escape(sensitive_name)}</td><td>{html.escape(', '.join(picks))}</td>"
                    f"<td>{_img(png_bytes(image_grid([np.concatenate(examples)])), 'public examples', 2, 'pix')}</td></tr>")
    diagnostics = "".join(f"<li>{html.escape(k)}: {html.escape(_plain(v))}</li>" for k, v in semantics["diagnostics"].items())
    return (f"<p>k = {semantics['k']}, query σ = {semantics['query_sigma']}, {semantics['public_images']} public images "
            f"kept ({100 * semantics['public_fraction']:.1f}% of the public set).</p>"
            "<table><tr><th>sensitive class</th><th>selected semantics</th><th>public examples</th></tr>"
            + "".join(rows) + f"</table><p class=note>Diagnostics (public data and the noisy picks only):</p><ul>{diagnostics}</ul>")


def _samples_section(run: RunDir, test: ImageDataset) -> str:
    synthetic = load_synthetic(run)
    rows = []
    for c, name in enumerate(synthetic.class_names):
        fake = image_grid([synthetic.images[synthetic.labels == c][:EXAMPLES]])
        real = image_grid([test.images[test.labels == c][:EXAMPLES]])
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{_img(png_bytes(fake), 'synthetic', 2, 'pix')}</td>"
                    f"<td>{_img(png_bytes(real), 'real', 2, 'pix')}</td></tr>")
    return "<table><tr><th>class</th><th>synthetic</th><th>real (test split)</th></tr>" + "".join(rows) + "</table>"


def _metrics_section(run: RunDir) -> str:
    if not run.metrics.exists():
        return "<p>Not evaluated.</p>"
    metrics = read_json(run.metrics)
    rows = [[f"accuracy ({name}, trained on synthetic without augmentation, tested on the real test split)",
             f"{100 * v:.2f} %"] for name, v in metrics["accuracy"].items()]
    rows += [[f"accuracy_augmented ({name}, the same trained with augmentation; not the headline)", f"{100 * v:.2f} %"]
             for name, v in metrics.get("accuracy_augmented", {}).items()]
    for key in ("fid", "precision", "recall"):
        if key in metrics:
            rows.append([key, f"{metrics[key]:.4g}"])
    if "fid_samples" in metrics:
        rows.append(["FID samples (real / synthetic)", f"{metrics['fid_samples']['real']} / {metrics['fid_samples']['synthetic']}"])
    memo = metrics["memorization"]
    rows.append([f"synthetic closer to train than {100 * memo['quantile']:.0f}% of test images",
                 f"{100 * memo['fraction_closer']:.2f} %"])
    return _table(["metric", "value"], rows)


def _plan_section(run: RunDir) -> str:
    """The `--minutes` plan: probe throughputs, planned steps, expected and measured minutes per stage."""
    if not run.plan.exists():
        return "<p>No time budget: step counts as configured.</p>"
    plan = read_json(run.plan)
    measured = {}
    for stage in plan["expected_seconds"]:
        marker = run.stages / f"{stage}.json"
        measured[stage] = read_json(marker).get("seconds") if marker.exists() else None
    rows = [[stage, f"{seconds / 60:.2f}", "–" if measured[stage] is None else f"{measured[stage] / 60:.2f}"]
            for stage, seconds in plan["expected_seconds"].items()]
    probe = ", ".join(f"{name} {value * 1000:.3g} ms" for name, value in plan["throughput"].items())
    replanned = plan.get("replanned_seconds_left")
    again = "" if replanned is None else (f" (pretraining planned again with {replanned / 60:.1f} min left, the rest"
                                          f" expected {plan.get('slowdown') or 1:.2f}x slower than probed)")
    pretrained = run.stages / "pretrain.json"
    notes = read_json(pretrained) if pretrained.exists() else {}
    stopped, trained_on = notes.get("stopped_early_at"), notes.get("trained_on_to")
    late = ("" if stopped is None else f" (stopped after {stopped}: the machine ran slower than planned)") + (
        "" if trained_on is None else f" (trained on to {trained_on}: the machine ran faster than planned)")
    trimmed = plan.get("evaluation") or {}
    trims = "" if not trimmed else (" Trimmed to fit the training floors: "
                                    + ", ".join(f"evaluate.{k}={v}" for k, v in trimmed.items()) + ".")
    return (f"<p>Budget {plan['minutes']:g} min, {plan['seconds_left'] / 60:.1f} min left when planned: "
            f"{plan['pretrain_steps']} pretraining steps{again}{late}, {plan['finetune_steps']} DP-SGD steps."
            f"{html.escape(trims)}</p>"
            + _table(["stage", "expected min", "min on the budget's clock"], rows)
            + f"<p class=note>Probe on random data (per unit): {html.escape(probe)}</p>")


def _reference_section(run: RunDir) -> str:
    reference = read_reference(run)
    if reference is None:
        return "<p>Not measured (evaluate.reference is off).</p>"
    rows = [[f"accuracy ({name}, trained on {reference['train_images']} real training images, tested on the test split)",
             f"{100 * v:.2f} %"] for name, v in reference["accuracy"].items()]
    return ("<p class=note>Private to the data owner (from private/reference.json): it is a statistic of the "
            "sensitive training split, outside the privacy guarantee. It shows what real data as large as the "
            "synthetic set gives the same classifiers.</p>" + _table(["metric", "value"], rows))


def write_report(cfg: DictConfig, run: RunDir, public: ImageDataset | None, test: ImageDataset) -> Path:
    ledger = PrivacyLedger.read(run.ledger)
    ledger_rows = [[b.stage, m.kind, f"{m.noise_multiplier:.4g}", f"{m.sample_rate:.4g}", m.steps, f"{epsilon:.3f}"]
                   for b, m, epsilon in zip(ledger.entries, ledger.mechanisms(), ledger.epsilon_alone())]
    curves = _loss_curves(run)
    sections = [
        f"<h1>privimage run</h1><p class=note>{html.escape(str(run.root))} · method {html.escape(cfg.method)}</p>",
        "<h2>Privacy</h2>",
        f"<p><b>Spent ε = {ledger.spent_epsilon():.3f}</b> of the target ε = {ledger.target_epsilon:g} at "
        f"δ = {ledger.target_delta:g} ({html.escape(ledger.accountant)} accountant, all stages composed).</p>",
        _table(["stage", "mechanism", "noise multiplier", "sample rate", "steps", "ε alone"], ledger_rows),
        _img(_spending_curve(ledger), "privacy spending curve"),
        "<h2>Time plan</h2>", _plan_section(run),
        "<h2>Selected semantics</h2>", _semantics_section(run, public),
        "<h2>Training</h2>",
        _img(curves, "loss curves") if curves else "<p>No training curves recorded.</p>",
        "<p class=note>The fine-tuning loss is the DP estimate released with each noisy gradient.</p>",
        "<h2>Samples</h2>", _samples_section(run, test),
        "<h2>Metrics</h2>", _metrics_section(run),
        "<h2>Real-data reference (private to the owner)</h2>", _reference_section(run),
        "<h2>Configuration</h2>", f"<pre>{html.escape(to_yaml(cfg))}</pre>",
    ]
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>privimage report</title><style>{_STYLE}</style>"
            f"</head><body>{''.join(sections)}</body></html>")
    write_text(run.report, page, private=True)  # real test images: the owner's alone (rundir.FILES)
    return run.report


def run(pipeline: Pipeline) -> None:
    if distributed.is_main():
        public = pipeline.public if pipeline.method.queries_semantics else None
        write_report(pipeline.cfg, pipeline.run, public, pipeline.sensitive_test)
