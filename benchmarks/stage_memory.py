"""Peak memory (RSS, and GPU memory when on CUDA) and wall time of every stage of the configured method.

    python benchmarks/stage_memory.py [--preset quick] [key=value ...]

Each stage runs as its own `privimage <stage>` process on one fresh run directory, so each peak is
that stage's alone (the operating system's ru_maxrss of the child). On CUDA the stage's peak GPU
memory comes from its marker `stages/<stage>.json`, which the pipeline writes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from privimage.config import load_config
from privimage.methods import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        print(f"preset {args.preset} {' '.join(args.overrides)}")
        print(f"{'stage':10} {'seconds':>8} {'peak RSS (MiB)':>15} {'peak GPU (GiB)':>15}")
        cfg = load_config(args.preset, overrides=args.overrides)
        stages = METHODS[cfg.method].stages_for(cfg)
        for stage in stages:
            command = [sys.executable, "-m", "privimage", stage, "--out", str(out)]
            if stage == stages[0]:  # the first stage fixes the run's config
                command += ["--preset", args.preset, *args.overrides]
            start = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(process.pid, 0)
            seconds = time.perf_counter() - start
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"{stage} failed: {process.stderr.read().decode()[-2000:]}")
            marker = json.loads((out / "stages" / f"{stage}.json").read_text())
            gpu = marker.get("peak_gpu_memory_gib")
            gpu_text = f"{gpu:15.2f}" if gpu is not None else f"{'-':>15}"
            print(f"{stage:10} {seconds:8.1f} {usage.ru_maxrss / 1024:15.0f} {gpu_text}")  # ru_maxrss: KiB


if __name__ == "__main__":
    main()
