#!/usr/bin/env bash
# Fill ./.whl with the test tools scripts/gpu_check.sh installs on a GPU machine that reaches no
# package index: pytest, hypothesis and pytest-xdist with their dependencies, for CPython
# 3.10-3.13 on x86_64 Linux (hypothesis ships compiled wheels). Run it where pip can download,
# then carry .whl with the working tree (it is git-ignored). torch is not downloaded: the GPU
# machines have their own.
set -euo pipefail
cd "$(dirname "$0")/.."
for py in 3.10 3.11 3.12 3.13; do
  python3 -m pip download -q -d .whl --only-binary=:all: --python-version "$py" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    pytest hypothesis pytest-xdist 2>/dev/null || echo "gpu_wheels: nothing for Python $py"
done
du -sh .whl
