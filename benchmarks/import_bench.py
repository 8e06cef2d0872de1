"""What ``import foam_compile`` adds to ``import torch``: the median of fresh processes.

    python benchmarks/import_bench.py            # 5 processes each
    python benchmarks/import_bench.py --runs 9

Each run is a new interpreter that imports torch, then (in the second column) foam_compile,
and reports both times; the heavy modules a user would only pay for on first use (Dynamo,
Inductor, sympy, Triton, torch.distributed.tensor) are listed if the import loaded them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import foam_compile
t2 = time.perf_counter()
heavy = ["torch._dynamo", "torch._inductor", "sympy", "networkx", "triton",
         "torch.distributed.tensor"]
loaded = [m for m in heavy if m in sys.modules]
print(json.dumps({"torch": t1 - t0, "foam": t2 - t1, "loaded": loaded}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=root)
    rows = []
    for _ in range(args.runs):
        out = subprocess.run(
            [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    torch_s = statistics.median(r["torch"] for r in rows)
    foam_s = statistics.median(r["foam"] for r in rows)
    loaded = sorted({m for r in rows for m in r["loaded"]})
    print("| runs | import torch (s, median) | + foam_compile (s, median) | heavy modules loaded |")
    print("|---:|---:|---:|---|")
    print(f"| {args.runs} | {torch_s:.3f} | {foam_s:.3f} | {', '.join(loaded) or 'none'} |")


if __name__ == "__main__":
    main()
