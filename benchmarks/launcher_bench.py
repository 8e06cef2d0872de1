"""Host time of the grouped launcher per optimizer step, launches stubbed (CPU only, no GPU).

What is measured is everything ``foam_adam_grouped_`` does on the host for one step of a whole
model: checks (or the cached plan that stands for them), tables, addresses, step counters, the
config lookup and the argument packing, up to the kernel launch, which is replaced by a no-op.
The parameters are meta tensors of the LLaMA shapes of ``step_bench.py`` (real shapes and
strides, no memory), under the paper's policy (block weights at level 2, the rest at level 0):
the 1B config is 219 parameters in 3 launches. Two step modes: ``device`` (capturable: the
counters live with the parameters and the kernel reads them) and ``host`` (CPU counters, read
on the host: torch.optim's default).

Steps are timed round-robin across the implementations (``--baseline DIR`` adds the launcher of
another checkout, e.g. the code before issue 17) and the table gives median and minimum per
step, plus the aten ops (allocations, copies) run in steady state, counted with a dispatch mode.
"CPU ms" is the thread's CPU time (``time.thread_time``): on a shared machine it leaves out the
time the process waits for a core, which the wall-clock column includes.

    python benchmarks/launcher_bench.py
    python benchmarks/launcher_bench.py --size 60m 350m 1b --reps 300 --baseline /tmp/old
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU needed; the launches are stubbed anyway

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from step_bench import CONFIGS, LEVEL, llama_shapes  # noqa: E402

from foam_compile.kernels import foam_adam  # noqa: E402


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _AtenCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _load_baseline(root: str):
    """The grouped launcher of another checkout: its ``foam_compile.kernels`` package imported
    under another name (it registers no op, so both can live in one process)."""
    folder = os.path.join(root, "foam_compile", "kernels")
    spec = importlib.util.spec_from_file_location(
        "baseline_kernels",
        os.path.join(folder, "__init__.py"),
        submodule_search_locations=[folder],
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    module = importlib.import_module("baseline_kernels.foam_adam")
    for name in ("_foam_adam_multi_kernel", "_foam_adam_kernel"):
        setattr(module, name, _NoLaunch())
    return module


def make_args(size: str, step_mode: str):
    shapes = llama_shapes(CONFIGS[size])
    params, grads, ms, vs, steps, levels = [], [], [], [], [], []
    for shape, is_block in shapes:
        level = LEVEL if is_block and len(shape) >= 2 else 0
        fshape = (*shape[:-1], -(-shape[-1] // (1 << level))) if level else shape
        params.append(torch.empty(shape, device="meta"))
        grads.append(torch.empty(shape, device="meta"))
        ms.append(torch.empty(fshape, device="meta"))
        vs.append(torch.empty(fshape, device="meta"))
        device = "meta" if step_mode == "device" else "cpu"
        steps.append(torch.tensor(1.0, device=device))
        levels.append(level)
    return (params, grads, ms, vs, None, steps, levels), dict(lr=1e-3, weight_decay=0.01)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", choices=sorted(CONFIGS), default=["1b"])
    parser.add_argument(
        "--steps", nargs="+", choices=("device", "host"), default=["device", "host"]
    )
    parser.add_argument("--reps", type=int, default=200, help="timed steps per implementation")
    parser.add_argument("--baseline", help="a checkout whose launcher is timed alongside")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    args = parser.parse_args(argv)

    foam_adam._foam_adam_multi_kernel = _NoLaunch()
    foam_adam._foam_adam_kernel = _NoLaunch()
    impls = {"this checkout": foam_adam.foam_adam_grouped_}
    if args.baseline:
        impls["baseline"] = _load_baseline(args.baseline).foam_adam_grouped_

    rows = []
    for size in args.size:
        for mode in args.steps:
            call, kw = make_args(size, mode)
            n_params = len(call[0])
            times = {name: [] for name in impls}
            cpu = {name: [] for name in impls}
            ops = {}
            for name, fn in impls.items():  # first steps: plans, tables, tuning lookups
                for _ in range(3):
                    fn(*call, **kw)
                log = _AtenCount()
                with log:
                    fn(*call, **kw)
                ops[name] = log.ops
            for _ in range(args.reps):
                for name, fn in impls.items():
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    fn(*call, **kw)
                    cpu[name].append((time.thread_time() - start_cpu) * 1e3)
                    times[name].append((time.perf_counter() - start) * 1e3)
            for name in impls:
                copies = sum("copy" in op or "_to_copy" in op for op in ops[name])
                rows.append(
                    (
                        size,
                        n_params,
                        mode,
                        name,
                        statistics.median(cpu[name]),
                        min(cpu[name]),
                        statistics.median(times[name]),
                        len(ops[name]),
                        copies,
                    )
                )
                print(rows[-1], flush=True)

    load = os.getloadavg()
    header = (
        f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch {torch.__version__}; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; {args.reps} round-robin reps"
    )
    head = (
        "size",
        "params",
        "steps",
        "launcher",
        "CPU ms/step (median)",
        "CPU ms (min)",
        "wall ms (median)",
        "aten ops/step",
        "copies/step",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | "
            f"{r[7]} | {r[8]} |"
        )
    text = header + "\n\n" + "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
