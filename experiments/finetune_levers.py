"""DP fine-tuning levers: fine-tune one pretrained model with variant settings, sample, score.

Each variant runs in its own throwaway run directory with its own ledger (the base run's releases
before DP-SGD, the semantic query and the warm start, booked first, so DP-SGD is calibrated to the same
composed ε). The score is the plain
downstream CNN (no augmentation, `evaluate.classifier_epochs`) trained on the synthetic set and tested
on the real *training* split (`--split train`, the validation measure levers are chosen on: the
generator saw it only through DP) or on the test split (`--split test`, for the final choice only).

  PYTHONPATH=src python experiments/finetune_levers.py --base runs/base --pretrained M.safetensors \
      --out runs/levers/lr1e-3-a --split train finetune.lr=1e-3
Prints one JSON line: the variant, accuracies, finetune / sample seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from privimage.config import load_config
from privimage.data import load_sensitive
from privimage.atomic import read_json
from privimage.evaluation.downstream import downstream_accuracy
from privimage.privacy.ledger import PrivacyLedger
from privimage.rundir import RunDir
from privimage.builders import MODEL_FILE, load_denoiser
from privimage.stages.finetune import finetune
from privimage.stages.sample import generate
from privimage.synthetic import balanced_labels, load_synthetic, write_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a run directory whose semantics stage is done")
    parser.add_argument("--pretrained", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--classifiers", default="cnn")
    parser.add_argument("--no-finetune", action="store_true", help="sample the pretrained model itself")
    parser.add_argument("--evaluate-only", action="store_true", help="score the synthetic set already in --out")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(config_file=args.base / "config.yaml", overrides=args.overrides)
    d = cfg.data
    train, test = load_sensitive(d.sensitive, resolution=d.resolution, channels=d.channels,
                                 test_fraction=d.test_fraction, test_spec=d.sensitive_test,
                                 split_key=RunDir(args.base).split_key.read_bytes())
    run = RunDir(args.out).create()
    device = torch.device("cpu")
    seconds = {}
    model = args.pretrained
    if args.evaluate_only:
        synthetic = load_synthetic(run)
    elif not args.no_finetune:
        ledger = PrivacyLedger.open(run.ledger, cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.accountant)
        base = PrivacyLedger.open(RunDir(args.base).ledger, cfg.privacy.epsilon, cfg.privacy.delta,
                                  cfg.privacy.accountant, create=False)
        for booking in base.entries:
            if booking.stage != "finetune" and ledger.find(booking.stage) is None:
                ledger.book(booking)
        started = time.perf_counter()
        finetune(cfg, run, ledger, train, args.pretrained, device, release="levers")
        seconds["finetune"] = time.perf_counter() - started
        model = run.finetune_dir / MODEL_FILE
    if not args.evaluate_only:
        net = load_denoiser(cfg, train.num_classes, model, device)
        started = time.perf_counter()
        labels = balanced_labels(cfg.sample.n, train.num_classes)
        synthetic = generate(net, train.class_names, labels, cfg, device, torch.Generator().manual_seed(cfg.seed))
        seconds["sample"] = time.perf_counter() - started
        write_synthetic(run, synthetic)
    real = train if args.split == "train" else test
    started = time.perf_counter()
    accuracy = downstream_accuracy(synthetic, real.images, real.labels, classifiers=args.classifiers.split(","),
                                   epochs=cfg.evaluate.classifier_epochs, augment=0.0, seed=cfg.seed)
    seconds["evaluate"] = time.perf_counter() - started
    spent = read_json(run.ledger)["spent"]["epsilon"] if run.ledger.exists() else None
    print(json.dumps({"out": str(args.out), "overrides": args.overrides, "split": args.split, "accuracy": accuracy,
                      "epsilon": spent, "seconds": {k: round(v, 1) for k, v in seconds.items()}}), flush=True)


if __name__ == "__main__":
    main()
