"""GPU benchmark: the per-tensor FOAM Triton step with float32, int8 and int4 moments, and with
master weights (bfloat16 + int8 corrections), against ``torch.optim.AdamW(fused=True)``.

One LLaMA-size MLP weight (4096 x 11008) at level 2 and a ragged one (4096 x 5461). For each
row: milliseconds per step, the bytes the step must move (p and grad read, p written; codes and
group scales read and written once; the correction read and written once), and the bandwidth
that implies. Steps are device tensors (no host sync timed).

    python benchmarks/quant_kernel_bench.py [--out t.md]   # needs CUDA
    python benchmarks/quant_kernel_bench.py --smoke        # CPU + TRITON_INTERPRET, tiny: checks
                                                           # that the script runs (timings
                                                           # meaningless)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

GROUP = 32


def _timer(fn, iters: int) -> float:
    """Median milliseconds per call over ``iters`` calls (after 3 untimed ones)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if SMOKE:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def moment_bytes(rows: int, nb: int, fmt: str) -> int:
    if fmt == "fp32":
        return rows * nb * 4
    codes = nb if fmt.startswith("int8") else -(-nb // 2)
    return rows * (codes + 4 * -(-nb // GROUP))


def case(shape, level, dtype, fmt, master, device, iters):
    from foam_compile.kernels.foam_adam import foam_adam_quant_step_, foam_adam_step_
    from foam_compile.reference import folded_shape
    from foam_compile.state import get_format

    gen = torch.Generator().manual_seed(0)
    p = (0.02 * torch.randn(shape, generator=gen)).to(device, dtype)
    g = (0.01 * torch.randn(shape, generator=gen)).to(device, dtype)
    fshape = folded_shape(shape, level)
    rho = torch.zeros(shape, dtype=torch.int8, device=device) if master else None
    step = torch.tensor(10.0, device=device)
    kw = dict(lr=1e-4, step=step, level=level, weight_decay=0.01, scale=0.25, master_rho=rho)
    if fmt == "fp32":
        m = torch.zeros(fshape, device=device)
        v = torch.zeros(fshape, device=device)

        def run():
            foam_adam_step_(p, g, m, v, **kw)
    else:
        f = get_format(fmt)
        st = {**f.zeros(p, level, "exp_avg", "signed"), **f.zeros(p, level, "exp_avg_sq", "square")}
        args = (st["exp_avg"], st["exp_avg_scale"], st["exp_avg_sq"], st["exp_avg_sq_scale"])

        def run():
            foam_adam_quant_step_(p, g, *args, bits=f.bits, stochastic=f.stochastic, **kw)

    ms = _timer(run, iters)
    rows, nb = p.numel() // shape[-1], fshape[-1]
    nbytes = 3 * p.numel() * p.element_size() + 2 * 2 * moment_bytes(rows, nb, fmt)
    nbytes += 2 * p.numel() if master else 0
    return ms, nbytes


def adamw(shape, dtype, device, iters):
    p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4, weight_decay=0.01, fused=device != "cpu")
    opt.step()
    ms = _timer(opt.step, iters)
    return ms, 3 * p.numel() * p.element_size() + 2 * 2 * p.numel() * 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = "cpu" if SMOKE else "cuda"
    if not SMOKE and not torch.cuda.is_available():
        print("quant_kernel_bench: needs a CUDA GPU (or --smoke)")
        return 0
    shapes = [((64, 256), 2), ((64, 171), 2)] if SMOKE else [((4096, 11008), 2), ((4096, 5461), 2)]
    iters = 2 if SMOKE else args.iters
    variants = [
        (torch.float32, "fp32", False),
        (torch.float32, "int8", False),
        (torch.float32, "int4", False),
        (torch.float32, "int8-sr", False),
        (torch.bfloat16, "fp32", False),
        (torch.bfloat16, "int8", False),
        (torch.bfloat16, "fp32", True),
        (torch.bfloat16, "int8", True),
    ]
    head = ("shape", "impl", "dtype", "state", "master", "ms/step", "MB moved", "GB/s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, level in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            ms, nbytes = adamw(shape, dtype, device, iters)
            dt = str(dtype).replace("torch.", "")
            lines.append(
                f"| {shape} | AdamW fused | {dt} | fp32 | - | {ms:.3f} | {nbytes / 1e6:.1f} | "
                f"{nbytes / ms / 1e6:.0f} |"
            )
        for dtype, fmt, master in variants:
            ms, nbytes = case(shape, level, dtype, fmt, master, device, iters)
            dt = str(dtype).replace("torch.", "")
            lines.append(
                f"| {shape} | FOAM triton L{level} | {dt} | {fmt} | "
                f"{'int8' if master else '-'} | {ms:.3f} | {nbytes / 1e6:.1f} | "
                f"{nbytes / ms / 1e6:.0f} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
