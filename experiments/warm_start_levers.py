"""Warm-start levers: score the warm start's generator, the model pretrained on its images, and the
fine-tuned model, each with the plain downstream CNN.

Runs privimage's own stages (semantics, warmstart, pretrain, finetune) in a new run directory on a
base run's split, with its own ledger and budget. Each model samples `sample.n` images, scored by the
plain CNN (no augmentation, `evaluate.classifier_epochs`) on the real *training* split (`--split
train`, the validation measure levers are chosen on: the models saw it only through DP) or on the
test split (`--split test`, for a final choice only).

  PYTHONPATH=src python experiments/warm_start_levers.py --base runs/base --out runs/warm/a \
      pretrain.steps=1000 finetune.steps=90 sample.steps=10 [warm_start.samples=10000 warm_start.generator_steps=200 ...]
`--until warmstart` scores the generator alone, its images median-filtered as pretraining sees them (a minute
or two: the quick way to compare releases).
Prints one JSON line: the variant, the three accuracies and public shares (lever_runs.public_share_of), ε spent,
stage seconds.
"""

from __future__ import annotations

import argparse
import json

from lever_runs import add_arguments, cnn_accuracy, diffusion_samples, open_on_base, public_share_of
from privimage.atomic import read_json
from privimage.stages.dpmerf import generator_images, load_generator
from privimage.builders import MODEL_FILE
from privimage.stages.warmstart import despeckle, generator_file
from privimage.synthetic import balanced_labels

STAGES = ("semantics", "warmstart", "pretrain", "finetune")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1], help="the last stage to run and score")
    add_arguments(parser)
    args = parser.parse_args()
    pipeline, real = open_on_base(args)
    cfg, device, names = pipeline.cfg, pipeline.device, pipeline.sensitive_train.class_names
    accuracy, share, seconds = {}, {}, {}

    def score(name, synthetic):
        accuracy[name] = cnn_accuracy(pipeline, synthetic, real)
        share[name] = round(public_share_of(pipeline, synthetic), 4)

    for stage in STAGES[:STAGES.index(args.until) + 1]:
        seconds[stage] = round(pipeline.run_stage(stage).seconds, 1)
        if stage == "warmstart":
            generator = load_generator(cfg, generator_file(pipeline.run), len(names), device)
            drawn = generator_images(generator, balanced_labels(cfg.sample.n, len(names)), names, cfg.seed + 1)
            score("generator", despeckle(drawn, cfg.warm_start.median_filter))  # as pretraining sees them
        elif stage == "pretrain":
            score("pretrained", diffusion_samples(pipeline, pipeline.run.pretrain_dir / MODEL_FILE))
        elif stage == "finetune":
            score("finetuned", diffusion_samples(pipeline, pipeline.run.finetune_dir / MODEL_FILE))
    pipeline.close()
    print(json.dumps({"out": str(args.out), "overrides": args.overrides, "split": args.split, "accuracy": accuracy,
                      "public_share": share, "epsilon": read_json(pipeline.run.ledger)["spent"]["epsilon"],
                      "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
