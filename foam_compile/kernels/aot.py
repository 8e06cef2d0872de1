"""Ahead-of-time compile of the FOAM kernels for NVIDIA GPUs, on a machine without one.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch,
32))`` runs Triton's whole pipeline (TTIR, TTGIR, LLVM, PTX) and the ``ptxas`` that ships in
the Triton wheel, so each launch the ops can make is checked down to a cubin. Registers and
local memory come from ``cuobjdump -res-usage`` on that cubin (also shipped in the wheel):
Triton 3.6 and 3.9 put ``n_regs``/``n_spills`` on a compiled kernel only when a driver loads
it, which needs a GPU. ``LOCAL`` is the per-thread local memory; these kernels declare no local
arrays, so it is spill space.

What a launcher can request is enumerated from the launchers' own constexpr builders
(:func:`foam_adam.multi_constexprs`, :func:`foam_adam.single_constexprs`) over every value
they can take on a GPU: 11 levels (even and ragged), 9 (param, grad) dtype pairs, 3 weight-decay
modes, amsgrad, maximize, lr (number, float32 or float64 tensor), step (host, or a float32,
float64, int64 or int32 device counter), aligned or not, int32 or int64 indices, 4 configs,
2 architectures: hundreds of thousands of combinations. :func:`covering` picks the variants
compiled: every (level, even) pair on both architectures with the heaviest flags (the register
table), every config at every level on sm_90, and every other value of every flag at least
once (:func:`ci_sample` is the subset the test suite compiles; see its docstring).

Each compile runs in a fresh worker process (the test processes set ``TRITON_INTERPRET=1``,
under which ``@triton.jit`` makes interpreter objects that cannot be compiled), and results
are cached on disk by a hash of the kernels' source files, the Triton version and the variant.

    python -m foam_compile.kernels.aot --all --workers 2 --table aot.md
    python -m foam_compile.kernels.aot --ci

This module imports nothing from the rest of foam_compile.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import inspect
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence

from . import tuning

ARCHS = (90, 80)
LEVELS = tuple(range(11))  # 0 .. MAX_LEVEL
CONFIGS = tuning.CONFIGS
GRID_CONFIG = (2048, 8)  # the register table's config: 8 elements a thread, allowed even and ragged
DTYPES = ("fp32", "bf16", "fp16")
DTYPE_PAIRS = tuple((p, g) for p in DTYPES for g in DTYPES)
STEP_KINDS = ("fp32", None, "fp64", "i64", "i32")
# Grouped state formats: the per-tensor kernel only (the grouped launch takes float32 states).
QUANT_STATES = ("int8", "int4", "int8-sr", "int4-sr")  # a device counter's dtype, None = host
LR_KINDS = ("fp32", None, "fp64")
_HERE = pathlib.Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Variant:
    """One launch a launcher can make: kernel, target, config and the launch-time choices."""

    kernel: str  # "multi" | "single"
    arch: int
    level: int
    even: bool
    tile: int = 4096
    warps: int = 8
    p: str = "fp32"
    g: str = "fp32"
    wd: int = 2
    amsgrad: bool = True
    maximize: bool = True
    lr: str | None = "fp32"
    step: str | None = "fp32"
    aligned: bool = True
    idx64: bool = False
    state: str = "fp32"  # the state format: "fp32", "int8", "int4", "int8-sr", "int4-sr"
    rho: str | None = None  # master weights: the correction bits' width ("int8", "int16")

    def heaviest(self) -> Variant:
        return self

    def pair(self) -> Variant:
        """The same launch with the other evenness (for the ragged / even register ratio)."""
        return dataclasses.replace(self, even=not self.even)

    def label(self) -> str:
        flags = [f"wd{self.wd}"]
        flags += ["ams"] if self.amsgrad else []
        flags += ["max"] if self.maximize else []
        flags += [f"lr:{self.lr or 'host'}", f"step:{self.step or 'host'}"]
        flags += [] if self.aligned else ["unaligned"]
        flags += ["i64"] if self.idx64 else []
        flags += [] if self.state == "fp32" else [self.state]
        flags += [f"rho:{self.rho}"] if self.rho else []
        return " ".join(flags)


def requestable(v: Variant) -> bool:
    """Whether a launcher can make this launch (a ragged launch holds <= 8 elements a thread)."""
    # level 0 runs ragged only for grouped states (rows that do not hold whole groups)
    flat_ok = v.even or v.level > 0 or v.state != "fp32"
    return flat_ok and tuning.allowed((v.tile, v.warps), v.even)


def _heavy(kernel, arch, level, even, config) -> Variant:
    tile, warps = config
    return Variant(kernel, arch, level, even or level == 0, tile, warps)


def grid(kernel: str = "multi", archs=ARCHS, config=GRID_CONFIG) -> list[Variant]:
    """Every (level, even) pair at the heaviest flags: the register table's rows."""
    out = []
    for arch in archs:
        for level in LEVELS:
            for even in (True, False) if level else (True,):
                out.append(_heavy(kernel, arch, level, even, config))
    return [v for v in out if requestable(v)]


def flag_coverage(kernel: str, arch: int = 90, level: int = 2) -> list[Variant]:
    """Each non-default value of each launch choice once, the rest at their defaults (level 2,
    ragged, the grid config)."""
    base = Variant(kernel, arch, level, False, *GRID_CONFIG)
    out = [dataclasses.replace(base, p=p, g=g) for p, g in DTYPE_PAIRS[1:]]
    out += [dataclasses.replace(base, wd=wd) for wd in (0, 1)]
    out += [
        dataclasses.replace(base, amsgrad=False),
        dataclasses.replace(base, maximize=False),
        dataclasses.replace(base, aligned=False),
        dataclasses.replace(base, idx64=True),
        dataclasses.replace(base, idx64=True, even=True),
    ]
    out += [dataclasses.replace(base, lr=lr) for lr in LR_KINDS[1:]]
    out += [dataclasses.replace(base, step=s) for s in STEP_KINDS[1:]]
    return out


def covering() -> list[Variant]:
    """The full check (``--all``): the register grid of both kernels on both architectures,
    every allowed config at every (level, even) on sm_90, and every flag value once per
    kernel."""
    out = grid("multi") + grid("single")
    for config in CONFIGS:
        out += grid("multi", archs=(90,), config=config)
    out += flag_coverage("multi") + flag_coverage("single")
    out += quant_sample()
    return _unique(v for v in out if requestable(v))


def compact_flags(kernel: str, arch: int = 90, level: int = 2) -> list[Variant]:
    """Every non-default value of every launch choice in 8 variants: variant ``k`` takes the
    ``k``-th alternative of each choice that has one (dtype pairs have 8)."""
    alts = {
        "pg": DTYPE_PAIRS[1:],
        "wd": (0, 1),
        "amsgrad": (False,),
        "maximize": (False,),
        "aligned": (False,),
        "idx64": (True,),
        "lr": LR_KINDS[1:],
        "step": STEP_KINDS[1:],
    }
    base = Variant(kernel, arch, level, False, *GRID_CONFIG)
    out = []
    for k in range(max(len(x) for x in alts.values())):
        pick = {name: vals[k] for name, vals in alts.items() if k < len(vals)}
        p, g = pick.pop("pg", (base.p, base.g))
        out.append(dataclasses.replace(base, p=p, g=g, **pick))
    return out


def ci_sample() -> list[Variant]:
    """The variants the test suite compiles (32; about a minute cold on 2 idle cores, seconds
    from the cache). Covered, for the multi-tensor kernel: every level 0..10 on sm_90 (even and
    ragged alternating; both at levels 2 and 5, for the register ratio), levels 0, 1, 2, 3, 5, 8
    and 10 on sm_80 (the other evenness), every config at level 2 (their cubins must differ),
    every dtype pair and every flag value (:func:`compact_flags`); for the per-tensor kernel
    (the ``triton_op``): levels 0, 2 and 8 ragged on sm_90, level 2 on sm_80."""
    out = []
    for arch, levels in ((90, LEVELS), (80, (0, 1, 2, 3, 5, 8, 10))):
        for level in levels:
            even = level == 0 or (level % 2 == 0) == (arch == 90)
            allowed = [c for c in CONFIGS if tuning.allowed(c, even)]
            out.append(_heavy("multi", arch, level, even, allowed[level % len(allowed)]))
    for level in (2, 5):
        out += [_heavy("multi", 90, level, even, GRID_CONFIG) for even in (True, False)]
    out += [_heavy("multi", 90, 2, True, config) for config in CONFIGS]
    out += compact_flags("multi")
    out += [_heavy("single", 90, level, False, GRID_CONFIG) for level in (0, 2, 8)]
    out.append(_heavy("single", 80, 2, False, GRID_CONFIG))
    out += quant_sample()
    return _unique(v for v in out if requestable(v))


def quant_sample() -> list[Variant]:
    """The grouped state formats and master weights (per-tensor kernel): int8 and int4 at
    levels 0-4 on sm_90 (ragged, and even at levels 0 and 2), both stochastic variants, sm_80
    at level 2; bf16/fp16 parameters with int8/int16 corrections, float32 and int8 moments,
    even and ragged, both architectures; heaviest flags."""

    def ragged(arch, level, state):
        return dataclasses.replace(
            _heavy("single", arch, level, False, GRID_CONFIG), even=False, state=state
        )

    out = []
    for state in ("int8", "int4"):
        out += [ragged(90, level, state) for level in range(5)]
        even = _heavy("single", 90, 0, True, GRID_CONFIG)
        out += [dataclasses.replace(even, level=lv, state=state) for lv in (0, 2)]
        out.append(ragged(80, 2, state))
    out += [ragged(arch, 2, state) for state in ("int8-sr", "int4-sr") for arch in ARCHS]
    out.append(ragged(90, 4, "int4-sr"))
    # master weights: bf16/fp16 parameters with int8/int16 correction bits (issue 13)
    for arch in ARCHS:
        out.append(dataclasses.replace(ragged(arch, 2, "fp32"), p="bf16", g="bf16", rho="int8"))
    out.append(dataclasses.replace(ragged(90, 1, "int8"), p="fp16", g="fp16", rho="int16"))
    even = dataclasses.replace(_heavy("single", 90, 0, True, GRID_CONFIG), p="bf16", g="bf16")
    out += [dataclasses.replace(even, rho="int16"), dataclasses.replace(even, level=3, rho="int8")]
    return out


def _unique(variants: Iterable[Variant]) -> list[Variant]:
    return list(dict.fromkeys(variants))


# ------------------------------------------------------------------------------ compiling
def _unwrap(obj):
    """The Python function under a ``@triton.jit`` / ``@triton.autotune`` / interpreter object."""
    while hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def source_hash() -> str:
    """What a cached result depends on: the device code (``tile.py`` and the two kernels), what
    decides a launch's arguments (the constexpr builders, the configs, the chunk size, this
    module's signature and measurement code) and the Triton version. Docstrings and host code
    elsewhere can change without recompiling anything."""
    from importlib.metadata import version

    from . import foam_adam, plans

    parts = [(_HERE / "tile.py").read_text(), version("triton")]
    for obj in (
        foam_adam._foam_adam_kernel,
        foam_adam._foam_adam_multi_kernel,
        foam_adam.single_constexprs,
        foam_adam.multi_constexprs,
        plans.chunk_blocks,
        tuning.allowed,
        Variant,
        launch_signature,
        compile_one,
        _res_usage,
    ):
        parts.append(inspect.getsource(_unwrap(obj)))
    parts += [
        repr(tuning.CONFIGS),
        repr(plans.CHUNK_ELEMS),
        repr(sorted(map(str, foam_adam._TL_DTYPE.values()))),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _tl_dtype(name):
    import triton.language as tl

    return {
        "fp32": tl.float32,
        "bf16": tl.bfloat16,
        "fp16": tl.float16,
        "fp64": tl.float64,
        "i64": tl.int64,
        "i32": tl.int32,
    }[name]


def _torch_dtype(name):
    import torch

    return {
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp64": torch.float64,
        "i64": torch.int64,
        "i32": torch.int32,
    }[name]


class _Flags:
    """The attributes of the launchers' KernelHyper that their constexpr builders read."""

    def __init__(self, v: Variant):
        self.wd_mode = v.wd
        self.amsgrad = v.amsgrad
        self.maximize = v.maximize


def launch_signature(v: Variant):
    """``(fn, signature, constexprs, attrs, options)`` exactly as the launcher would launch."""
    from . import foam_adam, tile

    flags = _Flags(v)
    if v.kernel == "multi":
        fn = foam_adam._foam_adam_multi_kernel
        constexprs = foam_adam.multi_constexprs(
            _torch_dtype(v.p),
            _torch_dtype(v.g),
            v.level,
            v.even,
            flags,
            lr_ptr=v.lr is not None,
            step_dtype=None if v.step is None else _torch_dtype(v.step),
            aligned=v.aligned,
            idx64=v.idx64,
            bf16=False,
            tile=v.tile,
        )
        meta = "*i64" if v.idx64 else "*i32"
        pointers = {
            "ptr_table": "*i64",
            "meta_table": meta,
            "chunk_table": "*i32",
            "lr_ptr": f"*{v.lr}" if v.lr else meta,  # the meta table stands in when unused
        }
        ints = {}
    else:
        fn = foam_adam._foam_adam_kernel.fn  # the autotuner's JITFunction
        constexprs = foam_adam.single_constexprs(
            v.level,
            v.even,
            flags,
            lr_ptr=v.lr is not None,
            step_ptr=v.step is not None,
            idx64=v.idx64,
            bf16=False,
            state_fmt={"fp32": 0, "int8": 1, "int4": 2}[v.state.removesuffix("-sr")],
            stochastic=v.state.endswith("-sr"),
            param_fmt={None: 0, "int8": 1, "int16": 2}[v.rho],
        )
        constexprs["TILE"] = v.tile
        codes = v.state != "fp32"
        pointers = {
            "p_ptr": f"*{v.p}",
            "g_ptr": f"*{v.g}",
            "m_ptr": ("*i8" if v.state.startswith("int8") else "*u8") if codes else "*fp32",
            "v_ptr": "*u8" if codes else "*fp32",
            "vmax_ptr": "*u8" if codes else "*fp32",
            "ms_ptr": "*fp32",  # the group scales (the moments themselves in float32)
            "vs_ptr": "*fp32",
            "vmaxs_ptr": "*fp32",
            "r_ptr": {"int8": "*i8", "int16": "*i16"}.get(v.rho, f"*{v.p}"),  # else: p again
            "lr_ptr": f"*{v.lr}" if v.lr else "*fp32",
            "step_ptr": f"*{v.step}" if v.step else "*fp32",
        }
        # n, nb: a ragged row (5461 at level 2: no divisibility) or a flat even tensor (D).
        ints = {"n": "i64" if v.idx64 else "i32", "nb": "i64" if v.idx64 else "i32"}
        ints["SIZE_BUCKET"] = "i32"
        ints["step4"] = "i32"
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            if v.aligned or name.endswith("table"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ints:
            signature[name] = ints[name]
            if v.even and name in ("n", "nb"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "hp":  # the scalars, a tuple (Python floats are passed as float32)
            signature[name] = ("fp32",) * len(tile.HP_FIELDS)
        else:
            signature[name] = "fp32"
    constexprs = {
        k: (_tl_dtype(x) if isinstance(x, str) else x)  # the builders pass tl dtypes already
        for k, x in constexprs.items()
    }
    options = {"num_warps": v.warps, "num_stages": 1}
    return fn, signature, constexprs, attrs, options


def _res_usage(cubin: bytes) -> dict:
    import tempfile

    import triton

    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    line = next(x for x in out.splitlines() if "REG:" in x)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return {
        "regs": int(fields["REG"]),
        "local": int(fields["LOCAL"]),
        "stack": int(fields["STACK"]),
    }


def compile_one(v: Variant) -> dict:
    """Compile ``v`` to a cubin (in this process; it must not be interpreting) and measure it."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns; 3.6's default is on
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, options = launch_signature(v)
    start = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", v.arch, 32), options=options)
    except Exception as exc:  # reported, and the test fails on it
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    ptx = kernel.asm["ptx"]
    out = _res_usage(kernel.asm["cubin"])
    out.update(
        seconds=round(time.perf_counter() - start, 2),
        ld_v4=ptx.count("ld.global.v4") + ptx.count("ld.global.L1::evict_last.v4"),
        ld_v2=ptx.count("ld.global.v2"),
        ld=ptx.count("ld.global"),
        shfl=ptx.count("shfl.sync"),
        cubin_sha=hashlib.sha256(kernel.asm["cubin"]).hexdigest()[:16],
        triton=triton.__version__,
    )
    out["ttir"] = kernel.asm["ttir"]
    return out


def _key(v: Variant, src_hash: str) -> str:
    raw = json.dumps([src_hash, dataclasses.astuple(v)])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _worker(payload: str) -> str:
    """Subprocess entry: compile a JSON list of variants, print a JSON list of results."""
    return json.dumps([compile_one(Variant(*fields)) for fields in json.loads(payload)])


def _spawn(batch: list[Variant], env: dict) -> list[dict]:
    payload = json.dumps([dataclasses.astuple(v) for v in batch])
    code = "import sys; from foam_compile.kernels import aot; print(aot._worker(sys.stdin.read()))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        cwd=str(_HERE.parents[1]),
    )
    if proc.returncode != 0:
        err = {"error": f"worker failed: {proc.stderr[-2000:]}"}
        return [err] * len(batch)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_all(
    variants: Sequence[Variant],
    *,
    workers: int = 2,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Results for ``variants``: registers, local memory, load counts, the cubin's hash and the
    TTIR (cached by source hash; misses compiled in ``workers`` fresh processes that do not
    interpret)."""
    src_hash = source_hash()
    cache = pathlib.Path(cache_dir) if cache_dir else None
    results: dict[int, dict] = {}
    todo = []
    for i, v in enumerate(variants):
        path = cache / f"{_key(v, src_hash)}.json" if cache else None
        if path is not None and path.exists():
            results[i] = json.loads(path.read_text())
        else:
            todo.append(i)
    if todo:
        env = {k: x for k, x in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(_HERE.parents[1]), env.get("PYTHONPATH", "")])
        # Interleave so that each worker gets a share of the slow (deep-level) variants.
        batches = [todo[k::workers] for k in range(max(1, workers)) if todo[k::workers]]
        with cf.ThreadPoolExecutor(len(batches)) as pool:
            futures = {pool.submit(_spawn, [variants[i] for i in b], env): b for b in batches}
            for fut, batch in futures.items():
                for i, res in zip(batch, fut.result()):
                    results[i] = res
                    if cache is not None and "error" not in res:
                        cache.mkdir(parents=True, exist_ok=True)
                        path = cache / f"{_key(variants[i], src_hash)}.json"
                        path.write_text(json.dumps(res))
    return [dict(results[i], variant=variants[i]) for i in range(len(variants))]


# ---------------------------------------------------------------------------------- report
def occupancy(regs: int, warps: int) -> int:
    """Resident programs per SM from registers alone (65536 per SM, allocated per warp in units
    of 256, at most 64 warps and 32 programs per SM on sm_80/sm_90)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // (per_warp * warps)
    return max(0, min(by_regs, 64 // warps, 32))


def table(results: Sequence[dict]) -> str:
    head = (
        "kernel",
        "arch",
        "level",
        "rows",
        "p/g",
        "TILE x warps",
        "flags",
        "regs",
        "spill B",
        "programs/SM",
        "v4 loads",
        "shfl",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        v = r["variant"]
        if "error" in r:
            lines.append(f"| {v.kernel} | sm_{v.arch} | {v.level} | error: {r['error'][:60]} |")
            continue
        lines.append(
            "| "
            + " | ".join(
                str(x)
                for x in (
                    v.kernel,
                    f"sm_{v.arch}",
                    v.level,
                    "even" if v.even else "ragged",
                    f"{v.p}/{v.g}",
                    f"{v.tile} x {v.warps}",
                    v.label(),
                    r["regs"],
                    r["local"],
                    occupancy(r["regs"], v.warps),
                    r["ld_v4"],
                    r["shfl"],
                )
            )
            + " |"
        )
    return "\n".join(lines)


def grid_table(results: Sequence[dict], config=GRID_CONFIG) -> str:
    """The register grid: one row per level, registers (and spill bytes when any) of the even
    and the ragged launch of each kernel on each architecture, heaviest flags, one config."""
    cells = {}
    for r in results:
        v = r["variant"]
        base = _heavy(v.kernel, v.arch, v.level, v.even, config)
        if "error" in r or v != base:
            continue
        spill = f" ({r['local']} B spill)" if r["local"] else ""
        cells[(v.kernel, v.arch, v.level, v.even)] = f"{r['regs']}{spill}"
    cols = [(k, a, e) for k in ("multi", "single") for a in ARCHS for e in (True, False)]
    head = ["level"] + [f"{k} sm_{a} {'even' if e else 'ragged'}" for k, a, e in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for level in LEVELS:
        row = [str(level)] + [cells.get((k, a, level, e), "-") for k, a, e in cols]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="the full covering set")
    which.add_argument("--ci", action="store_true", help="the test suite's sample (default)")
    which.add_argument("--grid", action="store_true", help="the register table only")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--cache", default=str(_HERE.parents[1] / ".cache" / "aot"))
    parser.add_argument("--table", help="write the Markdown table to this file")
    args = parser.parse_args(argv)
    variants = (
        covering() if args.all else grid("multi") + grid("single") if args.grid else ci_sample()
    )
    start = time.perf_counter()
    results = compile_all(variants, workers=args.workers, cache_dir=args.cache)
    text = table(results)
    print(text)
    errors = [r for r in results if "error" in r]
    import triton

    print(
        f"\n{len(results)} variants, {len(errors)} errors, triton {triton.__version__}, "
        f"{time.perf_counter() - start:.0f} s"
    )
    if args.table:
        pathlib.Path(args.table).write_text(text + "\n\n" + grid_table(results) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
