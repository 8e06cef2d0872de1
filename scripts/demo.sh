#!/usr/bin/env bash
# Set up and run the main demo: a LLaMA-style model on Shakespeare, AdamW vs FOAM fp32 vs FOAM int8
# (CPU: about 11 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh examples
. .venv/bin/activate
python examples/train_llama.py "$@"
