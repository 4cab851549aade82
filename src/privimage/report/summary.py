"""The closing summary of `privimage run`: what was spent, by whom, and where the data is."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from privimage.privacy.ledger import PrivacyLedger
from privimage.atomic import read_json
from privimage.rundir import RunDir


def privacy_by_stage(run: RunDir) -> tuple[list[tuple[str, float]], dict]:
    """(stage, ε of that entry alone) per ledger entry, and the ledger file as written (its `spent` composed)."""
    ledger = PrivacyLedger.read(run.ledger)
    return [(b.stage, epsilon) for b, epsilon in zip(ledger.entries, ledger.epsilon_alone())], read_json(run.ledger)


def print_summary(run: RunDir, results: list, console: Console) -> None:
    rows, ledger = privacy_by_stage(run)
    table = Table(title="privacy spent", show_footer=True)
    table.add_column("stage", footer="total (composed)")
    table.add_column("ε alone", footer=f"{ledger['spent']['epsilon']:.3f} of {ledger['target']['epsilon']:g}")
    for stage, epsilon in rows:
        table.add_row(stage, f"{epsilon:.3f}")
    console.print(table)
    console.print(f"δ = {ledger['target']['delta']:g}; accountant: {ledger['accountant']}")
    if run.metrics.exists():  # its figures are statistics of the sensitive data: never printed
        console.print(f"metrics (private to the data owner, outside the guarantee): {run.metrics}", markup=False)
    console.print(f"synthetic data: {run.synthetic} (PNG folders in {run.synthetic_images}/)")
    if run.report.exists():
        console.print(f"report (private to the data owner): {run.report}")
