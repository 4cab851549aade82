"""The median of several benchmark runs per dataset and ε: privimage against dpmerf, and the public share.

`privimage bench` writes one run per (method, ε, budget); this reads any number of finished run directories
(from several benchmarks, each on its own split), groups them by dataset, method and ε, and prints one
markdown table: each method's runs and their median (standard CNN, real test split), privimage's margin
over dpmerf's median, and the median public share of privimage's samples and of the real test split.
The public share is a statistic of the sensitive data: the table is for the data owner.

  PYTHONPATH=src python experiments/bench_medians.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from privimage.atomic import read_json
from privimage.bench import dataset_label
from privimage.rundir import RunDir
from privimage.stages.evaluate import read_public_share


def percent(values: list[float]) -> str:
    return ", ".join(f"{100 * v:.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    accuracy, shares = defaultdict(list), defaultdict(list)
    for root in args.runs:
        run = RunDir(root)
        cfg = OmegaConf.load(run.config)
        key = (dataset_label(cfg), float(cfg.privacy.epsilon))
        accuracy[key + (cfg.method,)].append(read_json(run.metrics)["accuracy"]["cnn"])
        share = read_public_share(run)
        if cfg.method == "privimage" and share is not None:
            shares[key].append((share["synthetic"], share["real_test"]))
    header = ("| data | ε | privimage runs (%) | median | dpmerf runs (%) | median | margin (points) "
              "| public share: privimage / real test (median) |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for dataset, epsilon in sorted({key[:2] for key in accuracy}, key=lambda k: (k[0], -k[1])):
        mine, theirs = accuracy[dataset, epsilon, "privimage"], accuracy[dataset, epsilon, "dpmerf"]
        median = statistics.median(mine) if mine else None
        baseline = statistics.median(theirs) if theirs else None
        margin = f"{100 * (median - baseline):+.1f}" if mine and theirs else "–"
        pairs = shares[dataset, epsilon]
        share = (f"{100 * statistics.median(p[0] for p in pairs):.1f} % / "
                 f"{100 * statistics.median(p[1] for p in pairs):.1f} %" if pairs else "–")
        lines.append(f"| {dataset} | {epsilon:g} | {percent(mine)} | {'–' if median is None else f'{100 * median:.1f}'} "
                     f"| {percent(theirs)} | {'–' if baseline is None else f'{100 * baseline:.1f}'} | {margin} "
                     f"| {share} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
