#!/usr/bin/env bash
# Set up and run the test suite (CPU; Triton kernels run under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "test,examples,integrations"
. .venv/bin/activate
python -m pytest -q "$@"
