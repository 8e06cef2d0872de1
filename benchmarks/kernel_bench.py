"""GPU benchmark: the FOAM Triton step against ``torch.optim.AdamW(fused=True)``.

For each case it prints milliseconds per optimizer step, the bytes one step must move (read ``p``
and ``grad``, write ``p``, read and write each state element once; ALGORITHM.md "Memory"), the
bandwidth that implies, and that bandwidth as a share of a measured device-to-device copy
(``dst.copy_(src)``), the practical ceiling for a streaming kernel.

    python benchmarks/kernel_bench.py                 # needs CUDA; prints the table
    python benchmarks/kernel_bench.py --out t.md      # ... and writes it as Markdown
    python benchmarks/kernel_bench.py --smoke         # CPU + TRITON_INTERPRET, tiny: checks the
                                                      # script runs (timings meaningless)

Cases: one large matrix at several levels, and a LLaMA-130M-like parameter list (the paper's
recipe: 2-d attention/MLP weights folded, embeddings and norms at level 0) run through the
multi-tensor launcher. Steps are device tensors (capturable style), so no host sync is timed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402


def bytes_moved(params, levels, amsgrad=False) -> int:
    """Bytes one fused step must move: ``foam_compile.cost_model``'s formula (ALGORITHM.md
    "Memory"), float32 state for FOAM and AdamW alike."""
    from foam_compile.cost_model import step_bytes

    return sum(
        step_bytes(p.shape, level, param_dtype=p.dtype, amsgrad=amsgrad)
        for p, level in zip(params, levels)
    )


def _timer(fn, iters: int, warmup: int) -> float:
    """Mean milliseconds per call (CUDA events; wall clock in smoke mode)."""
    for _ in range(warmup):
        fn()
    if SMOKE:
        import time

        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e3 / iters
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / iters


def copy_bandwidth(device, nbytes: int, iters: int, warmup: int) -> float:
    """GB/s of ``dst.copy_(src)`` (counts the read and the write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _timer(lambda: dst.copy_(src), iters, warmup)
    return 2 * nbytes / ms / 1e6


def llama_like(device, dtype, scale: int):
    """(params, levels): a LLaMA-130M-like list (hidden 768, 12 layers) divided by ``scale``."""
    h, inter, vocab, layers = 768 // scale, 2048 // scale, 32000 // scale, 12
    shapes = [((vocab, h), 0)]
    for _ in range(layers):
        shapes += [((h, h), 2)] * 4 + [((inter, h), 2)] * 2 + [((h, inter), 2)] + [((h,), 0)] * 2
    shapes += [((h,), 0), ((vocab, h), 0)]
    params = [torch.randn(s, device=device).to(dtype) for s, _ in shapes]
    return params, [lvl for _, lvl in shapes]


def run_case(name, params, levels, *, amsgrad, iters, warmup, copy_gbs, rows):
    from foam_compile import kernels

    device = params[0].device
    grads = [torch.randn_like(p) for p in params]

    def folded(p, level):
        level = level if p.dim() >= 2 else 0
        if level == 0:
            return torch.zeros(p.shape, device=device)
        return torch.zeros(*p.shape[:-1], -(-p.shape[-1] // (1 << level)), device=device)

    ms_ = [folded(p, lv) for p, lv in zip(params, levels)]
    vs_ = [folded(p, lv) for p, lv in zip(params, levels)]
    vmax_ = [folded(p, lv) for p, lv in zip(params, levels)] if amsgrad else None
    steps = [torch.tensor(10.0, device=device) for _ in params]
    lr = torch.tensor(1e-4, device=device)

    def foam():
        kernels.foam_adam_grouped_(
            params,
            grads,
            ms_,
            vs_,
            vmax_,
            steps,
            levels,
            lr=lr,
            weight_decay=0.01,
            amsgrad=amsgrad,
            scale=0.25,
        )

    ms = _timer(foam, iters, warmup)
    nbytes = bytes_moved(params, levels, amsgrad)
    gbs = nbytes / ms / 1e6
    dtype = str(params[0].dtype).replace("torch.", "")
    lv = "/".join(str(x) for x in sorted(set(levels)))
    rows.append(
        (
            name,
            "FOAM triton",
            dtype,
            lv,
            sum(p.numel() for p in params) / 1e6,
            ms,
            nbytes / 1e6,
            gbs,
            100 * gbs / copy_gbs,
        )
    )


def run_adamw(name, params, *, amsgrad, iters, warmup, copy_gbs, rows):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, amsgrad=amsgrad, fused=True)
    opt.step()  # materialise the state outside the timing
    ms = _timer(opt.step, iters, warmup)
    nbytes = bytes_moved(ps, [0] * len(ps), amsgrad)
    gbs = nbytes / ms / 1e6
    dtype = str(params[0].dtype).replace("torch.", "")
    rows.append(
        (
            name,
            "AdamW fused",
            dtype,
            "-",
            sum(p.numel() for p in ps) / 1e6,
            ms,
            nbytes / 1e6,
            gbs,
            100 * gbs / copy_gbs,
        )
    )


def run_llama(size, dtype, device, *, amsgrad, iters, warmup, copy_gbs, rows):
    """The LLaMA shapes of ``step_bench.py`` (60m / 350m / 1b) under the paper's policy: level 2
    on the block weights, level 0 on embedding, head and norms; against fused AdamW."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from step_bench import CONFIGS, LEVEL, llama_shapes

    cfg = CONFIGS.get(size, dict(hidden=64, inter=171, layers=2, heads=4, vocab=256))  # "tiny"
    shapes = llama_shapes(cfg)
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [(0.02 * torch.randn(s, generator=gen)).to(device, dtype) for s, _ in shapes]
    levels = [LEVEL if block and len(s) >= 2 else 0 for s, block in shapes]
    name = f"llama-{size} ({len(params)} params)"
    kw = dict(amsgrad=amsgrad, iters=iters, warmup=warmup, copy_gbs=copy_gbs, rows=rows)
    run_adamw(name, params, **kw)
    run_case(name, params, levels, **kw)
    adamw, foam = rows[-2], rows[-1]
    print(f"{name} {dtype}: FOAM / AdamW(fused) = {foam[5] / adamw[5]:.3f}, {foam[8]:.0f}% copy")
    del params


def table(rows) -> str:
    head = ("case", "impl", "dtype", "level", "Mparams", "ms/step", "MB moved", "GB/s", "% copy BW")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.3f} | "
            f"{r[6]:.1f} | {r[7]:.0f} | {r[8]:.0f}% |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under the interpreter")
    parser.add_argument("--amsgrad", action="store_true")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument(
        "--size",
        nargs="+",
        choices=("60m", "350m", "1b", "tiny"),
        help="LLaMA shapes of step_bench.py instead of the default cases",
    )
    args = parser.parse_args()

    if not SMOKE and not torch.cuda.is_available():
        print(
            "kernel_bench: no CUDA device; this benchmark needs a GPU (use --smoke to check "
            "that the script runs on CPU). Skipping."
        )
        return 0
    device = "cpu" if SMOKE else "cuda"
    iters, warmup = (2, 1) if SMOKE else (args.iters, 5)
    scale = 64 if SMOKE else 1
    big = (64, 96) if SMOKE else (8192, 8192)

    copy_gbs = copy_bandwidth(device, (1 << 20) if SMOKE else (1 << 30), iters, warmup)
    rows = []
    for size in args.size or ():
        for dtype in (torch.float32, torch.bfloat16):
            run_llama(
                size,
                dtype,
                device,
                amsgrad=args.amsgrad,
                iters=iters,
                warmup=warmup,
                copy_gbs=copy_gbs,
                rows=rows,
            )
    for dtype in (torch.float32, torch.bfloat16) if not args.size else ():
        w = torch.randn(big, device=device).to(dtype)
        run_adamw(
            f"{big[0]}x{big[1]}",
            [w],
            amsgrad=args.amsgrad,
            iters=iters,
            warmup=warmup,
            copy_gbs=copy_gbs,
            rows=rows,
        )
        for level in (0, 2, 3, 8):
            run_case(
                f"{big[0]}x{big[1]}",
                [w.clone()],
                [level],
                amsgrad=args.amsgrad,
                iters=iters,
                warmup=warmup,
                copy_gbs=copy_gbs,
                rows=rows,
            )
        params, levels = llama_like(device, dtype, scale)
        run_adamw(
            "llama-130M-like",
            params,
            amsgrad=args.amsgrad,
            iters=iters,
            warmup=warmup,
            copy_gbs=copy_gbs,
            rows=rows,
        )
        run_case(
            "llama-130M-like",
            params,
            levels,
            amsgrad=args.amsgrad,
            iters=iters,
            warmup=warmup,
            copy_gbs=copy_gbs,
            rows=rows,
        )
        run_case(
            "llama-130M-like",
            [p.clone() for p in params],
            [0] * len(params),
            amsgrad=args.amsgrad,
            iters=iters,
            warmup=warmup,
            copy_gbs=copy_gbs,
            rows=rows,
        )

    import triton

    dev_name = "CPU (interpreter, timings meaningless)" if SMOKE else torch.cuda.get_device_name()
    header = (
        f"device: {dev_name}; torch {torch.__version__}; triton {triton.__version__}; "
        f"python {platform.python_version()}; {datetime.date.today()}; "
        f"measured copy bandwidth {copy_gbs:.0f} GB/s; amsgrad={args.amsgrad}"
    )
    text = header + "\n\n" + table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
