"""Which of a finished run's synthetic images the public-share CNN calls public, per class, with a picture.

The evaluate stage reports only the share (`private/public_share.json`); this retrains the same CNN (same seed
and settings) and writes `OUT/called_public.png` (one row per class: the first images it calls public) and
prints each class's count. A statistic of the sensitive training split: OUT is for the data owner.

  PYTHONPATH=src python experiments/public_calls.py RUN --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from privimage.config import load_config
from privimage.evaluation.public_share import called_public
from privimage.pipeline import Pipeline
from privimage.report.figures import image_grid
from privimage.synthetic import load_synthetic

PER_ROW = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = load_config(config_file=args.run / "config.yaml", overrides=["minutes=null"])
    pipeline = Pipeline(cfg, args.run)
    synthetic, names = load_synthetic(pipeline.run), pipeline.sensitive_train.class_names
    calls = called_public(pipeline.public.images, pipeline.sensitive_train.images, {"synthetic": synthetic.images},
                          seed=cfg.seed, device=str(pipeline.device))["synthetic"]
    counts, rows = {}, []
    for label, name in enumerate(names):
        mine = (synthetic.labels == label) & calls
        counts[name] = int(mine.sum())
        rows.append(synthetic.images[mine][:PER_ROW])
    args.out.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(args.out / "called_public.png")
    print(json.dumps({"run": str(args.run), "share": round(float(calls.mean()), 4), "per_class": counts,
                      "sigma": cfg.sample.warm_start_sigma}))


if __name__ == "__main__":
    main()
