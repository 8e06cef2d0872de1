"""Optimizer-step benchmark: FOAM's compiled step against torch AdamW (foreach, fused, compiled).

The parameters are the weight shapes of the LLaMA configs of the FOAM repo (60M, 350M, 1B: per
layer q, k, v, o ``[h, h]``, gate/up ``[inter, h]``, down ``[h, inter]``, two RMSNorms ``[h]``;
plus the embedding and the lm_head ``[vocab, h]`` and a final norm). Two cases per size:

* ``paper``: every parameter, FOAM at level 2 on the block weights and level 0 (plain AdamW) on the
  embedding, lm_head and norms -- the paper's policy;
* ``block``: the block weights only (all at level 2).

Implementations, each stepping the same parameters and gradients (shared between them to fit in
memory; the values drift but stay finite, timing is all that is measured):

* ``FOAM compiled``: ``torch.compile(FOAM(..., lr=tensor).step)``. On CUDA, FOAM's step calls the
  Triton kernel; on CPU the C++ step kernel (``foam::cpu_step_``).
* ``FOAM int8 compiled``, ``FOAM int4 compiled``: the same with every moment in the grouped
  ``int8`` / ``int4`` state format (``foam_compile/formats``), which the CPU kernel decodes and
  encodes in its one pass (``--state-format`` picks the format of ``FOAM compiled`` instead).
* ``AdamW foreach``, ``AdamW fused``: eager ``torch.optim.AdamW(foreach=True / fused=True)``.
* ``AdamW compiled``: ``torch.compile(AdamW(..., lr=tensor).step)``.
* ``DeepSpeedCPUAdam`` (CPU, when ``deepspeed`` is importable; run with ``DS_ACCELERATOR=cpu``):
  DeepSpeed's hand-vectorised CPU Adam (AdamW mode), the bar for offloaded optimizer steps. Its
  C++ op is compiled on first use, so its "1st step s" includes that build when not cached.

Steps are timed round-robin (one step of each implementation in turn, ``--reps`` rounds) so that
machine load hits all of them alike; the table gives the median and the minimum. "MB/step" is
the traffic a fused step must move (``foam_compile.cost_model``: read p and g, write p, read and
write each state element once; AdamW's state is in the parameter dtype, as torch keeps it), "GB/s"
divides it by the median time, and "% copy" relates that to a ``dst.copy_(src)`` of a large
tensor measured in the same run. ``FOAM/x`` is FOAM's median time over x's (< 1: FOAM is faster).
"faults/step" counts minor page faults (CPU): a compiled step allocates its temporaries per call,
and once the C allocator has handed that memory back to the OS each step touches it afresh. On
CUDA the table adds the growth of ``torch.cuda.max_memory_allocated`` during one step.

    python benchmarks/step_bench.py                       # CPU: 60m, float32 and bfloat16
    python benchmarks/step_bench.py --size 60m 350m --dtype float32 --reps 20 --threads 1
    python benchmarks/step_bench.py --device cuda --size 60m 350m 1b --out table.md
    python benchmarks/step_bench.py --dtype float32 --case block \
        --impl "FOAM compiled" "FOAM int8 compiled" "FOAM int4 compiled"
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time

try:
    import resource  # minor page faults per step (POSIX)
except ImportError:  # pragma: no cover
    resource = None

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from foam_compile import FOAM  # noqa: E402
from foam_compile.cost_model import cost  # noqa: E402

# The FOAM repo's LLaMA configs (hidden, intermediate, layers, heads, vocab).
CONFIGS = {
    "60m": dict(hidden=512, inter=1376, layers=8, heads=8, vocab=32000),
    "350m": dict(hidden=1024, inter=2736, layers=24, heads=16, vocab=32000),
    "1b": dict(hidden=2048, inter=5461, layers=24, heads=32, vocab=32000),
}
LEVEL = 2  # the paper's fold level for block weights
IMPLS = (
    "FOAM compiled",
    "FOAM int8 compiled",
    "FOAM int4 compiled",
    "AdamW foreach",
    "AdamW fused",
    "AdamW compiled",
    "DeepSpeedCPUAdam",
)


def foam_format(impl: str, default: str = "fp32") -> str:
    """The state format of a FOAM row: ``FOAM int8 compiled`` -> ``int8``."""
    words = impl.split()
    return words[1] if len(words) == 3 else default


def deepspeed_adam():
    """DeepSpeed's ``DeepSpeedCPUAdam`` class, or None where deepspeed is not importable."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception:  # not installed, or no accelerator it can use
        return None
    return DeepSpeedCPUAdam


def llama_shapes(cfg: dict) -> list[tuple[tuple[int, ...], bool]]:
    """``[(shape, is_block_weight)]`` in model order."""
    h, inter, vocab = cfg["hidden"], cfg["inter"], cfg["vocab"]
    shapes = [((vocab, h), False)]
    for _ in range(cfg["layers"]):
        shapes += [((h, h), True)] * 4 + [((inter, h), True)] * 2 + [((h, inter), True)]
        shapes += [((h,), False)] * 2
    shapes += [((h,), False), ((vocab, h), False)]
    return shapes


def minor_faults() -> int:
    """Minor page faults of this process so far: first touches of freshly mapped memory, which is
    what a step pays for buffers allocated per call once the allocator has returned them."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """GB/s of ``dst.copy_(src)``, counting the read and the write (median of ``reps``)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / statistics.median(times[2:]) / 1e9


def make_steppers(params, block_mask, device, impls, state_format="fp32"):
    """``{impl: step function}`` over the shared ``params`` (grads already set)."""
    lr = torch.tensor(1e-3, device=device)
    steppers = {}
    for impl in impls:
        if impl.startswith("FOAM"):
            groups = [
                {"params": [p for p, b in zip(params, block_mask) if b], "level": LEVEL},
                {"params": [p for p, b in zip(params, block_mask) if not b], "level": 0},
            ]
            opt = FOAM([g for g in groups if g["params"]], lr=lr, weight_decay=0.01)
            fmt = foam_format(impl, state_format)
            if fmt != "fp32":
                for p in params:
                    opt._set_layout(p, state_format=fmt)  # internal until it is an option
            steppers[impl] = (opt, torch.compile(opt.step))
        elif impl == "AdamW compiled":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
            steppers[impl] = (opt, torch.compile(opt.step))
        elif impl == "DeepSpeedCPUAdam":
            opt = deepspeed_adam()(params, lr=1e-3, weight_decay=0.01, adamw_mode=True)
            steppers[impl] = (opt, opt.step)
        else:
            kw = {"foreach": True} if impl == "AdamW foreach" else {"fused": True}
            opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **kw)
            steppers[impl] = (opt, opt.step)
    return steppers


def bytes_per_step(params, block_mask, impl: str, state_format: str = "fp32") -> int:
    total = 0
    for p, b in zip(params, block_mask):
        if impl.startswith("FOAM"):
            fmt = foam_format(impl, state_format)
            level = LEVEL if b else 0
            total += cost(p.shape, level, param_dtype=p.dtype, state_format=fmt).step_bytes
        else:  # torch keeps AdamW's moments in the parameter dtype, DeepSpeed in float32
            state = torch.float32 if impl == "DeepSpeedCPUAdam" else p.dtype
            total += cost(p.shape, 0, param_dtype=p.dtype, state_dtype=state).adamw_step_bytes
    return total


def run_case(size, case, dtype, device, args, copy_gbs, rows) -> None:
    shapes = llama_shapes(CONFIGS[size])
    if case == "block":
        shapes = [(s, b) for s, b in shapes if b]
    gen = torch.Generator(device="cpu").manual_seed(0)
    params, block_mask = [], []
    for shape, is_block in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device, dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device, dtype)
        params.append(p)
        block_mask.append(is_block)
    n = sum(p.numel() for p in params)
    impls = [i for i in IMPLS if i in args.impl]
    if "DeepSpeedCPUAdam" in impls and (device.type != "cpu" or deepspeed_adam() is None):
        impls.remove("DeepSpeedCPUAdam")
    steppers = make_steppers(params, block_mask, device, impls, args.state_format)

    compile_s, mem_growth = {}, {}
    for impl, (_, step) in steppers.items():  # first steps: state creation and compilation
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        compile_s[impl] = time.perf_counter() - t
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            sync(device)
            mem_growth[impl] = torch.cuda.max_memory_allocated(device) - before

    times = {impl: [] for impl in steppers}
    faults = dict.fromkeys(steppers, 0)
    for _ in range(args.reps):
        for impl, (_, step) in steppers.items():
            f0 = minor_faults()
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            times[impl].append((time.perf_counter() - t) * 1e3)
            faults[impl] += minor_faults() - f0

    foam_ms = statistics.median(times["FOAM compiled"]) if "FOAM compiled" in times else None
    for impl in steppers:
        med, best = statistics.median(times[impl]), min(times[impl])
        nbytes = bytes_per_step(params, block_mask, impl, args.state_format)
        gbs = nbytes / med / 1e6
        ratio = foam_ms / med if foam_ms is not None and impl != "FOAM compiled" else None
        rows.append(
            dict(
                size=size,
                case=case,
                dtype=str(dtype).replace("torch.", ""),
                impl=impl,
                mparams=n / 1e6,
                med=med,
                min=best,
                mb=nbytes / 1e6,
                gbs=gbs,
                pct=100 * gbs / copy_gbs,
                ratio=ratio,
                first_s=compile_s[impl],
                faults=faults[impl] / args.reps,
                mem=mem_growth.get(impl),
            )
        )
        print(format_row(rows[-1]), flush=True)
    del steppers, params
    gc.collect()
    torch._dynamo.reset()


HEAD = (
    "size",
    "case",
    "dtype",
    "Mparams",
    "impl",
    "ms/step (median)",
    "ms (min)",
    "MB/step",
    "GB/s",
    "% copy",
    "FOAM/x",
    "faults/step",
    "1st step s",
)


def format_row(r: dict, md: bool = False) -> str:
    cells = [
        r["size"],
        r["case"],
        r["dtype"],
        f"{r['mparams']:.1f}",
        r["impl"],
        f"{r['med']:.2f}",
        f"{r['min']:.2f}",
        f"{r['mb']:.0f}",
        f"{r['gbs']:.1f}",
        f"{r['pct']:.0f}%",
        "-" if r["ratio"] is None else f"{r['ratio']:.2f}",
        f"{r['faults']:.0f}",
        f"{r['first_s']:.1f}",
    ]
    if r.get("mem") is not None:
        cells.append(f"{r['mem'] / 2**20:.0f}")
    return ("| " + " | ".join(cells) + " |") if md else "  ".join(f"{c:>10}" for c in cells)


def table(rows) -> str:
    head = list(HEAD) + (
        ["step mem growth MiB"] if any(r.get("mem") is not None for r in rows) else []
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [format_row(r, md=True) for r in rows]
    return "\n".join(lines)


def environment(device: torch.device, copy_gbs: float) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
        except (OSError, StopIteration):
            pass
        name += f", {torch.get_num_threads()} threads"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return (
        f"device: {name}; torch {torch.__version__}, triton {triton_version}; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"copy bandwidth {copy_gbs:.1f} GB/s"
        + (f"; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else "")
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--size",
        nargs="+",
        choices=sorted(CONFIGS),
        default=None,
        help="default: 60m on CPU; 60m 350m 1b on CUDA",
    )
    parser.add_argument(
        "--dtype", nargs="+", choices=("float32", "bfloat16"), default=("float32", "bfloat16")
    )
    parser.add_argument("--case", nargs="+", choices=("paper", "block"), default=("paper", "block"))
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=IMPLS)
    parser.add_argument(
        "--state-format",
        default="fp32",
        help="state format of the 'FOAM compiled' row (fp32, int8, int4, int8-sr, int4-sr)",
    )
    parser.add_argument("--reps", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--copy-mb", type=int, default=512, help="size of the copy_ probe")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.size or (["60m"] if device.type == "cpu" else ["60m", "350m", "1b"])
    copy_gbs = copy_bandwidth(device, args.copy_mb * 2**20, reps=max(args.reps, 5))
    env = environment(device, copy_gbs)
    print(env)
    print("  ".join(f"{h:>10}" for h in HEAD))
    rows: list[dict] = []
    for size in sizes:
        for dtype in args.dtype:
            for case in args.case:
                run_case(size, case, getattr(torch, dtype), device, args, copy_gbs, rows)
    text = env + "\n\n" + table(rows) + "\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
