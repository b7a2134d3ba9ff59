#!/usr/bin/env bash
# Create .venv (if missing) and install fedkd with its test tools.
# TORCH_SPEC picks the PyTorch build installed first (default: torch==2.13.0, which on
# the project's CI machines is a local CPU build; set TORCH_SPEC=torch for the newest).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "fedkd installed in .venv ($(.venv/bin/python -c 'import fedkd, torch, flwr; print("torch", torch.__version__, "flwr", flwr.__version__)'))"
