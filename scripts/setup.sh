#!/usr/bin/env bash
# Create .venv and install foam-compile with the given extras, on a machine with only Python.
# torch 2.13.0 goes first (the CPU wheel); a bare `torch` requirement would pull a multi-GB
# CUDA build. Usage: scripts/setup.sh EXTRAS   (e.g. "test" or "examples")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
