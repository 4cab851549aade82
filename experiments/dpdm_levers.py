"""dpdm levers: DP-SGD from a random initialisation with variant settings, on a base run's split.

Runs the dpdm method's DP-SGD in a new run directory on the base run's split, with its own ledger and
budget, then samples and scores like the other lever benchmarks: `sample.n` images, the plain CNN, the
real *training* split by default. To compare batch sizes at equal compute, keep batch_size × steps fixed.

  PYTHONPATH=src python experiments/dpdm_levers.py --base runs/base --out runs/dpdm-b128 \
      dpdm.batch_size=128 dpdm.steps=560
Prints one JSON line: accuracy, the DP-SGD mechanism (σ, q, T) and its seconds.
"""

from __future__ import annotations

import argparse
import json
import time

from lever_runs import add_arguments, cnn_accuracy, diffusion_samples, open_on_base
from privimage.stages.finetune import finetune, model_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    args.overrides = ["method=dpdm", *args.overrides]
    pipeline, real = open_on_base(args)
    started = time.perf_counter()
    finetune(pipeline.cfg, pipeline.run, pipeline.ledger, pipeline.sensitive_train, None, pipeline.device,
             release="levers")
    seconds = time.perf_counter() - started
    accuracy = cnn_accuracy(pipeline, diffusion_samples(pipeline, model_file(pipeline.run)), real)
    mechanism = pipeline.ledger.reread().find("finetune").mechanism
    print(json.dumps({"out": str(args.out), "overrides": args.overrides, "split": args.split, "accuracy": accuracy,
                      "sigma": mechanism.noise_multiplier, "sample_rate": mechanism.sample_rate,
                      "steps": mechanism.steps, "finetune_seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
