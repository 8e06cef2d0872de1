"""Cold-compile benchmark: the first step of ``torch.compile(opt.step)`` for FOAM and for AdamW.

Models of 8, 64 and 256 parameter tensors (LLaMA-like shapes cycling through ``[h, h]``,
``[inter, h]``, ``[h, inter]``, ``[h]``; FOAM at level 2 on the matrices and level 0 on the
vectors, the paper's policy). Each measurement runs in a fresh process with an empty Inductor
cache (a new ``TORCHINDUCTOR_CACHE_DIR``), so it includes Dynamo's trace, AOTAutograd and
Inductor's code generation and C++ compilation. The FOAM CPU kernel is built once per machine,
not per model: its cache (``FOAM_CPU_CACHE_DIR``) is kept between runs, and the one-time build
is timed on its own (an empty kernel cache, first row of the table). Processes run round-robin
(FOAM, AdamW, FOAM, ...) so that machine load hits both alike; the table gives medians.

    python benchmarks/compile_bench.py                     # 8, 64, 256 tensors, 3 rounds
    python benchmarks/compile_bench.py --tensors 8 64 --reps 1 --out table.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
IMPLS = ("FOAM compiled", "AdamW compiled")


def shapes(count: int, hidden: int = 256, inter: int = 688) -> list[tuple[int, ...]]:
    cycle = [(hidden, hidden), (inter, hidden), (hidden, inter), (hidden,)]
    return [cycle[i % len(cycle)] for i in range(count)]


def child(impl: str, count: int) -> None:
    """Runs in the fresh process: build the optimizer, time the first compiled step."""
    sys.path.insert(0, ROOT)
    import torch

    from foam_compile import FOAM

    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes(count):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    lr = torch.tensor(1e-3)
    if impl == "FOAM compiled":
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "level": 2},
            {"params": [p for p in params if p.dim() < 2], "level": 0},
        ]
        opt = FOAM([g for g in groups if g["params"]], lr=lr, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    step = torch.compile(opt.step)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    step()
    print(json.dumps({"first_s": first, "second_ms": (time.perf_counter() - start) * 1e3}))


def run_child(impl: str, count: int, kernel_cache: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="compile_bench_") as inductor_cache:
        env = dict(
            os.environ, TORCHINDUCTOR_CACHE_DIR=inductor_cache, FOAM_CPU_CACHE_DIR=kernel_cache
        )
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", impl, str(count)],
            env=env,
            capture_output=True,
            text=True,
        )
    if out.returncode != 0:
        raise RuntimeError(f"{impl} with {count} tensors failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def kernel_build_seconds(kernel_cache: str) -> float:
    """The one-time build of the FOAM CPU kernel into an empty cache, in a fresh process."""
    code = (
        f"import sys, time; sys.path.insert(0, {ROOT!r}); "
        "from foam_compile.kernels.cpu import build; t = time.perf_counter(); "
        "path, built = build.build(); assert built; print(time.perf_counter() - t)"
    )
    env = dict(os.environ, FOAM_CPU_CACHE_DIR=kernel_cache)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return float(out.stdout.strip().splitlines()[-1])


def environment() -> str:
    import torch

    name = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return (
        f"device: {name}, {os.cpu_count()} CPUs; torch {torch.__version__}; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}"
        + (f"; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else "")
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=(8, 64, 256))
    parser.add_argument("--reps", type=int, default=3, help="rounds per size (median)")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    parser.add_argument(
        "--kernel-cache",
        help="an existing FOAM CPU kernel cache to reuse (skips timing the one-time build)",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return

    env = environment()
    print(env, flush=True)
    with tempfile.TemporaryDirectory(prefix="foam_cpu_kernel_") as empty:
        kernel_cache = args.kernel_cache or empty
        build = "reused" if args.kernel_cache else f"{kernel_build_seconds(kernel_cache):.1f} s"
        print(f"FOAM CPU kernel, one-time build per machine: {build}", flush=True)
        lines = [
            "| tensors | impl | 1st step s (median) | runs | 2nd step ms | FOAM/AdamW |",
            "|---|---|---|---|---|---|",
        ]
        for count in args.tensors:
            runs = {impl: [] for impl in IMPLS}
            for _ in range(args.reps):
                for impl in IMPLS:
                    runs[impl].append(run_child(impl, count, kernel_cache))
                    r = runs[impl][-1]
                    print(f"{count:5d} {impl:15s} {r['first_s']:7.1f} s", flush=True)
            med = {i: statistics.median(r["first_s"] for r in runs[i]) for i in IMPLS}
            for impl in IMPLS:
                ratio = med["FOAM compiled"] / med[impl] if impl != "FOAM compiled" else None
                lines.append(
                    f"| {count} | {impl} | {med[impl]:.1f} | "
                    + ", ".join(f"{r['first_s']:.1f}" for r in runs[impl])
                    + f" | {statistics.median(r['second_ms'] for r in runs[impl]):.1f} | "
                    + ("-" if ratio is None else f"{ratio:.2f}")
                    + " |"
                )
    text = f"{env}\n\nFOAM CPU kernel, one-time build: {build}\n\n" + "\n".join(lines)
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
