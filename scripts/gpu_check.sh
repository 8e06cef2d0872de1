#!/usr/bin/env bash
# The first run on a CUDA GPU, in one command (issue 17). On a machine without one it says so
# and exits 0 without running anything.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: ${OUT:-gpu_check_out}
#
# What it does, each stage under its own time limit (about 9 minutes in all on one H100/H200
# with 16 cores; the limits add up to 585 s):
#   1. environment: GPU, torch, Triton, Python (torch is never reinstalled); pytest, hypothesis
#      and pytest-xdist from ./.whl if they are missing (scripts/gpu_wheels.sh fills ./.whl
#      on a machine with a package index: the GPU machines reach nothing outside);
#   2. the ahead-of-time compile of the CI sample with the Triton installed there (3.6 on the
#      GPU machines; 3.9 was checked on the CPU), registers and spills;
#   3. the GPU tests: tests/kernels/test_gpu.py (kernel vs the float64 model on LLaMA-size
#      ragged/even tensors, no allocation and no host-to-device copy in steady state, the
#      launcher in a CUDA graph, torch.compile of a FOAM step with Inductor and with
#      mode="reduce-overhead", the triton_op under Inductor, tuning kept on disk, FSDP2 on one
#      device) and the kernel suites (test_foam_kernel.py, test_ragged.py, test_capturable.py,
#      test_index_width.py, and issue 12/13's test_quant_kernel.py (int8/int4 moments, nearest
#      and stochastic) and test_master_kernel.py (bf16/fp16 + correction bits)) compiled for
#      the device instead of interpreted;
#   4. benchmarks/kernel_bench.py on the LLaMA 60m/350m/1b shapes (FOAM triton vs
#      AdamW(fused=True), % of copy bandwidth);
#   5. benchmarks/step_bench.py --device cuda on the same shapes (compiled FOAM step vs
#      AdamW fused);
#   6. benchmarks/quant_kernel_bench.py: the per-tensor kernel with fp32 / int8 / int4 /
#      int8-sr moments and bf16 + int8 master weights on 4096 x 11008 and 4096 x 5461 at level 2,
#      against AdamW fused;
# and writes OUT_DIR/RESULTS_rows.md (the rows for benchmarks/RESULTS.md) plus each stage's log.
# A stage that fails or times out is recorded and the next one still runs; the exit code is the
# number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"

DRY="${GPU_CHECK_DRY_RUN:-0}"  # 1: check this script's plumbing on any machine (echo stages)
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: '$PY' cannot import torch; set PYTHON to the interpreter that has it."
  exit 2
fi
if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False);"
  echo "gpu_check: nothing was run. Run this script where a CUDA GPU is visible."
  exit 0
fi
unset TRITON_INTERPRET
export FOAM_TUNE_CACHE="$PWD/$OUT_DIR/tune.json"

failed=0
stage() {  # stage NAME SECONDS CMD...: run CMD with a time limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  if [ "$DRY" = 1 ]; then
    echo "would run: $*" >"$OUT_DIR/$name.log"
  else
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  fi
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT_DIR/stages.txt"
  tail -n 3 "$OUT_DIR/$name.log"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

# 1. environment and test tools
"$PY" - >"$OUT_DIR/env.txt" 2>&1 <<'EOF'
import platform, torch, triton
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {torch.cuda.get_device_name(0)}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
else:
    print("device: none (dry run)")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"python {platform.python_version()}")
EOF
cat "$OUT_DIR/env.txt"
if ! "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --find-links .whl pytest hypothesis pytest-xdist
  else
    "$PY" -m pip install -q pytest hypothesis pytest-xdist || true
  fi
fi
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi

# 2. ahead-of-time compile with this machine's Triton
stage aot 75 "$PY" -m foam_compile.kernels.aot --ci --workers 12 --cache "$OUT_DIR/aot-cache" \
  --table "$OUT_DIR/aot.md"

# 3. the GPU tests (one config, nothing timed, for the correctness suites: fewer compiles)
stage tests_gpu 120 "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} \
  tests/kernels/test_gpu.py
stage tests_kernels 160 env FOAM_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider \
  ${XDIST[@]+"${XDIST[@]}"} tests/kernels/test_foam_kernel.py tests/kernels/test_ragged.py \
  tests/kernels/test_capturable.py tests/kernels/test_index_width.py \
  tests/kernels/test_quant_kernel.py tests/kernels/test_master_kernel.py

# 4-5. benchmarks on the LLaMA shapes
stage kernel_bench 90 "$PY" benchmarks/kernel_bench.py --size 60m 350m 1b --iters 20 \
  --out "$OUT_DIR/kernel_bench.md"
stage step_bench 100 "$PY" benchmarks/step_bench.py --device cuda --size 60m 350m 1b \
  --dtype bfloat16 --case paper --impl "FOAM compiled" "AdamW fused" --reps 10 --warmup 2 \
  --out "$OUT_DIR/step_bench.md"
stage quant_bench 40 "$PY" benchmarks/quant_kernel_bench.py --iters 20 \
  --out "$OUT_DIR/quant_bench.md"

# The rows for benchmarks/RESULTS.md
{
  echo "## GPU ($(date -u +%Y-%m-%d), scripts/gpu_check.sh)"
  echo
  sed 's/^/    /' "$OUT_DIR/env.txt"
  echo
  echo "Stages:"
  echo
  sed 's/^/    /' "$OUT_DIR/stages.txt"
  echo
  for part in kernel_bench step_bench quant_bench aot; do
    if [ -s "$OUT_DIR/$part.md" ]; then
      echo "### $part"
      echo
      cat "$OUT_DIR/$part.md"
      echo
    fi
  done
  echo "### test summaries"
  echo
  for part in tests_gpu tests_kernels; do
    echo "    $part: $(grep -E '(passed|failed|error)' "$OUT_DIR/$part.log" | tail -n 1)"
  done
  grep -h "FOAM / AdamW" "$OUT_DIR/kernel_bench.log" 2>/dev/null | sed 's/^/    /'
} >"$OUT_DIR/RESULTS_rows.md"
echo "gpu_check: rows for benchmarks/RESULTS.md in $OUT_DIR/RESULTS_rows.md; $failed stage(s) failed"
exit "$failed"
