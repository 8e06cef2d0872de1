"""One FOAM step in one pass: the Triton kernels and their thin torch launchers.

What one pass means (ALGORITHM.md, "Memory"): for a parameter ``p`` viewed as ``rows x n`` at
level ``l`` (blocks of ``B = 2**l`` along the last dim, ``nb = ceil(n / B)`` per row), every element
of ``p`` and ``grad`` is read once, every folded state element (``exp_avg``, ``exp_avg_sq`` and,
with amsgrad, ``max_exp_avg_sq``; float32, shape ``[..., nb]``) is read and written once, and ``p``
is written once. The block means, ``R``, ``M``, ``V`` and the denominator live in registers.
The tile code is :mod:`.tile`: contiguous 1-D runs reshaped to ``[BB, B]``; even tensors are one
flat row, ragged ones (``n % B != 0``) are walked row by row so that only each row's last tile,
the one with the partial block, is masked.

Index width. A tensor of 2**31 elements or more (``IDX64``, chosen from the element count) does
every index product in int64, so ``block * B`` never wraps. Ragged tensors always do: their
loads are scalar (a row of 5461 elements starts at any alignment), and int64 offsets let the
compiler fold more of the per-element addresses (grouped kernel, 2048 x 8, sm_90: 86 against 112
registers with int32 at level 1, 64 against 77 at level 5). Even tensors keep int32 below 2**31
elements (no register difference, fewer integer instructions). Ragged launches hold at most 8
elements per thread (:func:`.tuning.configs`): at 16, level 1 needed 194 registers against 118
for the even launch.

Bias correction is computed once per program, never per element. With ``step`` a Python number
(or a CPU tensor next to CUDA parameters) the launcher computes ``1 - beta1**t`` and
``sqrt(1 - beta2**t)`` in float64 on the host. With ``step`` a float32 tensor on the parameters'
device (capturable / CUDA graphs / torch.compile) each program computes them from the loaded
step by exponentiation by squaring in float64, with each beta passed as a float32 hi + lo pair
(Triton passes Python floats as float32): ``1 - beta2**t`` near ``t = 1`` cancels to ~1e-3, and
float32 ``beta2`` alone would leave it a 1e-5 relative error. ``lr`` is a number or a 0-d tensor
on the device, loaded once per program.

Two kernels share the tile code:

* ``_foam_adam_kernel`` - one tensor per launch, every tensor a real kernel argument. This is the
  kernel behind the ``foam::adam_step_`` ``triton_op``: Inductor reads its TTIR to find which
  arguments are stored to, so it must see the stores land on real arguments.
* ``_foam_adam_multi_kernel`` - a whole group (same dtypes, level and evenness) in one launch.
  The tables of :mod:`.plans` say which tensor and segment each program owns and where the
  tensors are; the loaded addresses are cast with ``tl.pointer_type``. Inductor cannot see stores
  made through such a table, so this kernel is only ever run from the *opaque*
  ``foam::adam_step_grouped_`` custom op, whose ``mutates_args`` declare the mutations.

Formats (:mod:`.tile`, the format hooks). The per-tensor kernel also takes moments in the
grouped int8/int4 formats (:func:`foam_adam_quant_step_`, nearest or stochastic rounding) and a
bfloat16/float16 parameter's correction bits (``master_rho`` of either per-tensor launcher): one
pass still, codes, group scales and corrections read and written once, each group's scale made
in registers (a grouped tile holds at least one group of 32 blocks). A grouped tensor runs as
one flat row only when its rows hold whole groups (:func:`quant_even`), otherwise row by row.
The multi-tensor kernel takes float32 states and plain parameters.

The grouped launcher's steady state. A call's *plan* (groups, shape-only tables, configs) is
cached by the metadata of every tensor it is given (shapes, dtypes, devices, contiguity, levels,
how steps are passed; :mod:`.plan_cache`): a hit skips validation, since every check is a
function of that metadata.
Addresses are then read (one ``data_ptr`` per tensor) and looked up in the group's pointer slots.
A steady loop therefore launches and does nothing else on the device: no allocation, no copy,
no sync. Device step counters go into the pointer table (one column), so they are read by the
kernel where they live, with no per-step gather.

CUDA graphs. A plan is built, and its configs tuned, on the first (eager) call; building one
while a graph is being captured raises a clear error (``torch.compile(mode="reduce-overhead")``
runs eager warm-up steps first). Inside a capture a new address tuple is still legal (a
pinned, non-blocking copy) and the slot it lands in is kept for the graph's lifetime.

Autotuning (:mod:`.tuning`). The per-tensor kernel uses ``@triton.autotune`` with
``restore_value`` on the four mutated arguments and Triton's on-disk result cache. The
multi-tensor kernel cannot be restored that way, so it is timed on a scratch group sized by the
size model of :mod:`.tuning`, once per key, and the choice is kept on disk.
``FOAM_TRITON_AUTOTUNE=0`` (and, by default, ``TRITON_INTERPRET=1``) means one config and
nothing timed.

The interpreter casts float32 -> bfloat16 by truncation where GPUs round to nearest even; under
the interpreter the kernel rounds bfloat16 parameters by hand so CPU tests see GPU numerics.

This module imports nothing from the rest of foam_compile. ``TRITON_INTERPRET`` is read by Triton
when the kernels are decorated, i.e. when this module is first imported.
"""

from __future__ import annotations

import functools
import operator
import time
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import plan_cache, plans, tuning
from .checks import (
    HYPER_DEFAULTS,
    MAX_LEVEL,
    SUPPORTED_DTYPES,
    KernelHyper,
    check_lr,
    check_quant_tensors,
    check_step,
    check_tensors,
    host_bias_corrections,
    state_shape,
)
from .tile import (
    PARAM_PLAIN,
    PARAM_RHO8,
    PARAM_RHO16,
    QGROUP,
    STATE_FP32,
    STATE_INT4,
    STATE_INT8,
    foam_span,
    step_scalars,
)

__all__ = [
    "MAX_LEVEL",
    "SUPPORTED_DTYPES",
    "foam_adam_grouped_",
    "foam_adam_quant_step_",
    "foam_adam_step_",
    "is_interpreting",
    "is_tracing",
]

_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    # step counters only (torch.optim keeps float32; float64 under a float64 default dtype)
    torch.float64: tl.float64,
    torch.int64: tl.int64,
    torch.int32: tl.int32,
}
is_interpreting = tuning.is_interpreting


def _bf16_rtne(dtype: torch.dtype) -> bool:
    # The interpreter's float32 -> bfloat16 cast truncates; the kernel rounds by hand there.
    return dtype == torch.bfloat16 and is_interpreting()


def _cpu_do_bench(fn, quantiles=None, reps: int = 3, **_):
    """A wall-clock ``do_bench`` for the interpreter (Triton's default one needs a GPU)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    ms = sorted(times)[len(times) // 2] * 1e3
    return [ms] * len(quantiles) if quantiles else ms


def _do_bench(fn):
    if is_interpreting():
        return _cpu_do_bench(fn)
    return triton.testing.do_bench(fn, warmup=5, rep=25)


_CONFIGS = [
    triton.Config({"TILE": tile}, num_warps=warps, num_stages=tuning.NUM_STAGES)
    for tile, warps in tuning.configs()
]


def _block_tile(tile: int, level: int) -> int:
    """Blocks per tile: ``TILE`` elements, but never less than one whole block."""
    return max(1, tile >> level)


# ----------------------------------------------------------------------------- the kernels
def _prune_configs(configs, named_args, **kwargs):
    """Ragged launches take the configs of at most 8 elements per thread (module docstring).
    Pure (no environment read): Dynamo traces it when Inductor compiles the ``triton_op``."""
    even = bool(kwargs.get("EVEN", named_args.get("EVEN", True)))
    kept = [c for c in configs if tuning.allowed((c.kwargs["TILE"], c.num_warps), even)]
    return kept or configs[:1]


@triton.autotune(
    configs=_CONFIGS,
    prune_configs_by={"early_config_prune": _prune_configs},
    # Triton adds the tensors' dtypes to the key; FLAGS holds the state format and rounding
    key=["LEVEL", "EVEN", "FLAGS", "SIZE_BUCKET"],
    restore_value=["p_ptr", "m_ptr", "v_ptr", "vmax_ptr", "ms_ptr", "vs_ptr", "vmaxs_ptr", "r_ptr"],
    do_bench=_cpu_do_bench if is_interpreting() else None,  # None: Triton's GPU timer
    cache_results=True,  # on disk, next to Triton's kernel cache (never in the interpreter)
)
@triton.jit
def _foam_adam_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    ms_ptr,
    vs_ptr,
    vmaxs_ptr,
    r_ptr,
    lr_ptr,
    step_ptr,
    n,
    nb,
    hp,
    step4,
    SIZE_BUCKET,  # autotune key only: log2 of the (saturated) element count
    LEVEL: tl.constexpr,
    EVEN: tl.constexpr,
    LR_FROM_PTR: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr,
    IDX64: tl.constexpr,
    FLAGS: tl.constexpr,
    TILE: tl.constexpr,
):
    """One tile per program. Even: one flat row of ``n`` elements, ``nb`` blocks. Ragged: rows of
    ``n`` elements and ``nb`` blocks, ``ceil(nb / BB)`` programs a row. Grouped states
    (``STATE_FMT`` 1, 2) take at least one group of blocks a tile (:func:`block_tile`), and are
    even only when every row holds whole groups (:func:`quant_even`). ``hp``: the scalars of
    :data:`.tile.HP_FIELDS`; ``FLAGS``: the switches of :data:`.tile.FLAG_FIELDS`."""
    STATE_FMT: tl.constexpr = FLAGS[4]  # tile.FLAG_FIELDS
    MIN_BB: tl.constexpr = 32 if STATE_FMT != 0 else 1  # tile.QGROUP (jit reads no globals)
    BB: tl.constexpr = (TILE >> LEVEL) if (TILE >> LEVEL) > MIN_BB else MIN_BB
    pid = tl.program_id(0)
    if IDX64 or not EVEN:  # int64 index arithmetic (module docstring, "Index width")
        pid = pid.to(tl.int64)
        n = n.to(tl.int64)
        nb = nb.to(tl.int64)
    coef = step_scalars(lr_ptr, step_ptr, hp, LR_FROM_PTR, STEP_FROM_PTR)
    seed4 = tl.cast(step4, tl.int64)  # the stochastic rounding's seed (dead unless STATE_SR)
    if STEP_FROM_PTR:
        seed4 = tl.load(step_ptr).to(tl.int64) * 4
    if EVEN:
        row = 0
        b0 = pid * BB
    else:
        tiles_per_row = (nb + BB - 1) // BB
        row = pid // tiles_per_row
        b0 = (pid - row * tiles_per_row) * BB
    code_row = nb if STATE_FMT != 2 else (nb + 1) // 2  # 4-bit rows: ceil(nb / 2) bytes
    ptrs = (p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, ms_ptr, vs_ptr, vmaxs_ptr, r_ptr)
    starts = (row * n, row * nb, row * code_row, row * ((nb + 31) // 32))  # 32 blocks a group
    b1 = tl.minimum(b0 + BB, nb)
    foam_span(ptrs, starts, seed4, b0, b1, n, coef, LEVEL, BB, EVEN, FLAGS)


@triton.jit
def _foam_adam_multi_kernel(
    ptr_table,
    meta_table,
    chunk_table,
    lr_ptr,
    hp,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    LEVEL: tl.constexpr,
    EVEN: tl.constexpr,
    LR_FROM_PTR: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr,
    STEP_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    IDX64: tl.constexpr,
    FLAGS: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
    TILE: tl.constexpr,
):
    """One segment (``CHUNK_BLOCKS`` blocks of one row) per program; tables from :mod:`.plans`.
    ``hp`` and ``FLAGS`` as the per-tensor kernel takes them (float32 states, plain params)."""
    BB: tl.constexpr = (TILE >> LEVEL) if (TILE >> LEVEL) > 0 else 1
    pid = tl.program_id(0)
    t = tl.load(chunk_table + 2 * pid)  # which tensor
    segment = tl.load(chunk_table + 2 * pid + 1)
    row_ptrs = ptr_table + 6 * t
    p_ptr = tl.load(row_ptrs).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row_ptrs + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(row_ptrs + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row_ptrs + 3).to(tl.pointer_type(tl.float32))
    vmax_ptr = tl.load(row_ptrs + 4).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        # The launcher checked that every address is 16-byte aligned. Addresses loaded from
        # memory carry no alignment facts; stating them lets the compiler vectorise.
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        vmax_ptr = tl.multiple_of(vmax_ptr, 16)
    step_ptr = lr_ptr  # unused unless STEP_FROM_PTR
    if STEP_FROM_PTR:  # this tensor's own step counter, read where it lives
        step_ptr = tl.load(row_ptrs + 5).to(tl.pointer_type(STEP_DTYPE))
    n = tl.load(meta_table + 4 * t)
    nb = tl.load(meta_table + 4 * t + 1)
    if IDX64 or not EVEN:  # int64 index arithmetic (module docstring, "Index width")
        n = n.to(tl.int64)
        nb = nb.to(tl.int64)
        segment = segment.to(tl.int64)
    coef = step_scalars(lr_ptr, step_ptr, hp, LR_FROM_PTR, STEP_FROM_PTR)
    if EVEN:  # one flat row: the segment's first block is a multiple of CHUNK_BLOCKS
        row = 0
        b0 = segment * CHUNK_BLOCKS
    else:
        per_row = tl.load(meta_table + 4 * t + 3)
        row = segment // per_row
        b0 = (segment - row * per_row) * CHUNK_BLOCKS
    # no side tensors (float32 states; the moments stand in for their scales), no correction
    # bits (the parameter stands in), no codes or groups, no seed
    ptrs = (p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, m_ptr, v_ptr, vmax_ptr, p_ptr)
    starts = (row * n, row * nb, row * nb, 0)
    b1 = tl.minimum(b0 + CHUNK_BLOCKS, nb)
    foam_span(ptrs, starts, 0, b0, b1, n, coef, LEVEL, BB, EVEN, FLAGS)


# --------------------------------------------------------------------------- launch choices
def flags(hp, *, bf16, param_fmt=PARAM_PLAIN, state_fmt=STATE_FP32, stochastic=False) -> tuple:
    """The ``FLAGS`` constexpr of both kernels (:data:`.tile.FLAG_FIELDS`): ``hp``'s weight-decay
    mode, amsgrad and maximize, then the parameter and state formats and the rounding."""
    return (hp.wd_mode, hp.amsgrad, hp.maximize, param_fmt, state_fmt, stochastic, bf16)


def single_constexprs(level: int, even: bool, hp: KernelHyper, *, lr_ptr, step_ptr, idx64, **fmt):
    """The constexprs ``foam_adam_step_`` and ``foam_adam_quant_step_`` pass (the AOT check
    enumerates the same function); ``fmt``: the format arguments of :func:`flags`."""
    return dict(
        LEVEL=level,
        EVEN=even,
        LR_FROM_PTR=lr_ptr,
        STEP_FROM_PTR=step_ptr,
        IDX64=idx64,
        FLAGS=flags(hp, **fmt),
    )


def multi_constexprs(
    p_dtype, g_dtype, level: int, even: bool, hp, *, lr_ptr, step_dtype, aligned, idx64, bf16, tile
):
    """The constexprs ``foam_adam_grouped_`` passes (the AOT check enumerates the same function):
    float32 states and plain parameters."""
    return dict(
        P_DTYPE=_TL_DTYPE[p_dtype],
        G_DTYPE=_TL_DTYPE[g_dtype],
        LEVEL=level,
        EVEN=even,
        LR_FROM_PTR=lr_ptr,
        STEP_FROM_PTR=step_dtype is not None,  # steps read from the pointer table
        STEP_DTYPE=_TL_DTYPE.get(step_dtype, tl.float32),
        ALIGNED=aligned,
        IDX64=idx64,
        FLAGS=flags(hp, bf16=bf16),
        CHUNK_BLOCKS=plans.chunk_blocks(level),
        TILE=tile,
    )


# ------------------------------------------------------------------------------ one tensor
@functools.lru_cache(maxsize=64, typed=True)
def _hyper(*values) -> KernelHyper:
    return KernelHyper(**dict(zip(HYPER_DEFAULTS, values)), where="FOAM kernel")


def _checked_hyper(where: str, hyper: dict) -> KernelHyper:
    """The checked hyperparameters: the keyword arguments ``hyper`` of a launcher over
    :data:`.checks.HYPER_DEFAULTS`; cached, since a training loop passes the same ones."""
    unknown = hyper.keys() - HYPER_DEFAULTS.keys()
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword arguments {sorted(unknown)}")
    values = tuple(map(hyper.get, HYPER_DEFAULTS, HYPER_DEFAULTS.values()))
    try:
        return _hyper(*values)
    except TypeError:  # unhashable: let the checks below name the argument
        pass
    except ValueError as exc:
        raise ValueError(str(exc).replace("FOAM kernel", where)) from None
    return KernelHyper(**dict(zip(HYPER_DEFAULTS, values)), where=where)


def _saturation(device: torch.device) -> int:
    return _SATURATION.get(device) or _SATURATION.setdefault(
        device, tuning.saturation_elems(device)
    )


_SATURATION: dict = {}


def foam_adam_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None = None,
    *,
    lr: float | Tensor,
    step: float | Tensor,
    level: int = 2,
    master_rho: Tensor | None = None,
    **hyper,
) -> None:
    """One FOAM step for one parameter, in place on ``param`` and the folded states (one launch).

    ``step`` is the *new* step count ``t`` (already incremented), a number or a 1-element tensor;
    ``lr`` a number or a 1-element tensor. A tensor on the parameter's device is read by the
    kernel (no host sync, CUDA-graph safe); a CPU tensor next to CUDA parameters is read on the
    host. ``level`` is clamped to 0 for 0-d/1-d parameters (ALGORITHM.md); the states must have
    the folded shape ``[..., ceil(n / 2**level)]`` and dtype float32. ``param``/``grad`` may be
    float32, bfloat16 or float16 (math in float32). ``hyper``: ``beta1``, ``beta2``, ``eps``,
    ``weight_decay``, ``decoupled_weight_decay``, ``amsgrad``, ``maximize``, ``scale`` (alpha,
    applied at level >= 1 only) and ``res_scale`` (rho), defaults in :data:`.checks.HYPER_DEFAULTS`.
    Every tensor must be contiguous. Allocates nothing. ``master_rho``: a bfloat16/float16
    parameter's int8/int16 correction bits (``foam_compile/master_weights.py``), read and
    written in the same pass.
    """
    where = "foam_adam_step_"
    hp = _checked_hyper(where, hyper)
    level = check_tensors(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, level, hp.amsgrad, where
    )
    vmax = max_exp_avg_sq if hp.amsgrad else exp_avg_sq  # unused unless AMSGRAD

    def layout():
        rows, n, nb = plans.geometry(param.shape, level)
        return rows, n, nb, plans.is_even(param.shape, level), _block_tile

    # no side tensors in float32: the moments stand in (never read)
    tensors = (param, grad, exp_avg, exp_avg_sq, vmax, exp_avg, exp_avg_sq, vmax)
    _launch_one(where, hp, level, tensors, lr=lr, step=step, master_rho=master_rho, layout=layout)


def _launch_one(where, hp, level, tensors, *, lr, step, master_rho, layout, seeded=False, **fmt):
    """The per-tensor kernel on ``tensors`` (its first eight tensor arguments, ``p_ptr`` ..
    ``vmaxs_ptr``), after the checks of ``master_rho``, ``lr`` and ``step``. ``layout()``:
    ``(rows, n, nb, even, block_tile)``; ``seeded``: the step seeds stochastic rounding (host
    steps pass ``4 * step``, else a constant 4); ``fmt``: the state format of :func:`flags`."""
    param = tensors[0]
    param_fmt = check_rho(param, master_rho, where)
    lr_value, lr_tensor = check_lr(lr, param.device, where)
    step_value, step_tensor = check_step(step, param.device, where)
    bc1 = sqrt_bc2 = 1.0
    step4 = 4
    if step_tensor is None:
        _refuse_host_steps_in_capture(param.device, where)
        bc1, sqrt_bc2 = host_bias_corrections(step_value, hp.beta1, hp.beta2)
        step4 = 4 * int(step_value) if seeded else 4
    numel = param.numel()
    if numel == 0:
        return
    rows, n, nb, even, block_tile = layout()

    def grid(meta):
        return (rows * triton.cdiv(nb, block_tile(meta["TILE"], level)),)

    dummy = tensors[5]  # never read
    kernel = wrap_triton(_foam_adam_kernel) if is_tracing() else _foam_adam_kernel
    kernel[grid](
        *tensors,
        master_rho if master_rho is not None else param,
        lr_tensor if lr_tensor is not None else dummy,
        step_tensor if step_tensor is not None else dummy,
        n,
        nb,
        hp=hp.scalars(level, lr_value, bc1, sqrt_bc2),
        step4=step4,
        SIZE_BUCKET=tuning.size_bucket(numel, _saturation(param.device)),
        **single_constexprs(
            level,
            even,
            hp,
            lr_ptr=lr_tensor is not None,
            step_ptr=step_tensor is not None,
            idx64=plans.needs_idx64(numel),
            bf16=_bf16_rtne(param.dtype),
            param_fmt=param_fmt,
            **fmt,
        ),
    )


# ------------------------------------------------------------------ grouped formats (int8/int4)
def check_rho(param: Tensor, rho: Tensor | None, where: str) -> int:
    """The parameter format for ``param`` and its correction bits (``PARAM_PLAIN`` without)."""
    if rho is None:
        return PARAM_PLAIN
    if param.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"{where}: master_rho belongs to a bfloat16/float16 parameter, got {param.dtype}"
        )
    if not isinstance(rho, Tensor) or rho.dtype not in (torch.int8, torch.int16):
        got = rho.dtype if isinstance(rho, Tensor) else type(rho).__name__
        raise ValueError(f"{where}: master_rho must be an int8 or int16 tensor, got {got}")
    if rho.shape != param.shape or rho.device != param.device or not rho.is_contiguous():
        raise ValueError(
            f"{where}: master_rho must be a contiguous tensor of the parameter's shape "
            f"{list(param.shape)} on {param.device}, got {list(rho.shape)} on {rho.device}"
        )
    return PARAM_RHO8 if rho.dtype == torch.int8 else PARAM_RHO16


def quant_even(shape, level: int) -> bool:
    """Whether a grouped-format tensor may run as one flat row: every row holds whole blocks and
    whole groups (so flat groups are the rows' groups, and 4-bit rows end on a whole byte)."""
    return len(shape) >= 1 and plans.is_even(shape, level) and state_row(shape, level) % QGROUP == 0


def state_row(shape, level: int) -> int:
    """Stored elements in one row of the folded moment (1 for a 0-d parameter)."""
    return state_shape(shape, level)[-1] if len(shape) else 1


def quant_block_tile(tile: int, level: int) -> int:
    """Blocks per tile of a grouped format: at least one group (the kernel's ``BB``)."""
    return max(QGROUP, tile >> level)


def foam_adam_quant_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_scale: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_sq_scale: Tensor,
    max_exp_avg_sq: Tensor | None = None,
    max_exp_avg_sq_scale: Tensor | None = None,
    *,
    bits: int,
    stochastic: bool = False,
    lr: float | Tensor,
    step: float | Tensor,
    level: int = 2,
    master_rho: Tensor | None = None,
    **hyper,
) -> None:
    """:func:`foam_adam_step_` with moments in a grouped format (``bits`` 8 or 4; the layout and
    codes of ``foam_compile/formats/int8.py`` / ``int4.py``): one launch decodes each tile's
    moments, steps, and re-encodes them with group scales made in registers (rounded to nearest,
    or stochastically with the formats' counter-based numbers when ``stochastic``). Nothing
    full-size is allocated. Every tensor is checked before any is written."""
    where = "foam_adam_quant_step_"
    hp = _checked_hyper(where, hyper)
    level = check_quant_tensors(
        param,
        grad,
        [(exp_avg, exp_avg_scale), (exp_avg_sq, exp_avg_sq_scale)]
        + ([(max_exp_avg_sq, max_exp_avg_sq_scale)] if hp.amsgrad else []),
        bits,
        level,
        where,
    )
    vmax, vmax_s = (max_exp_avg_sq, max_exp_avg_sq_scale) if hp.amsgrad else (exp_avg_sq, None)
    vmax_s = exp_avg_sq_scale if vmax_s is None else vmax_s  # unused unless AMSGRAD

    def layout():
        numel = param.numel()
        if quant_even(param.shape, level):
            return 1, numel, numel >> level, True, quant_block_tile
        n = param.shape[-1] if param.dim() else 1
        return numel // n, n, state_row(param.shape, level), False, quant_block_tile

    tensors = (param, grad, exp_avg, exp_avg_sq, vmax, exp_avg_scale, exp_avg_sq_scale, vmax_s)
    _launch_one(
        where,
        hp,
        level,
        tensors,
        lr=lr,
        step=step,
        master_rho=master_rho,
        layout=layout,
        seeded=True,
        state_fmt=STATE_INT8 if bits == 8 else STATE_INT4,
        stochastic=bool(stochastic),
    )


def is_tracing() -> bool:
    """True under Dynamo or a dispatch mode (FakeTensorMode, the FunctionalTensorMode in which a
    ``triton_op`` is decomposed for Inductor, make_fx): then the launch must go through
    ``wrap_triton`` so the kernel lands in the graph. In plain eager it must not, since the
    higher-order-op dispatch costs about a millisecond per launch."""
    if torch.compiler.is_compiling():
        return True
    try:
        from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    except ImportError:  # pragma: no cover - older torch: always trace-safe
        return True
    return is_in_torch_dispatch_mode()


# --------------------------------------------------------------------------- multi-tensor
# Configs chosen in this process: (device, key fields) -> (TILE, num_warps).
_MULTI_TUNED: dict = {}
_DEVICE_NAMES: dict = {}

_PTR = Tensor.data_ptr


class _Group:
    """One launch of the multi-tensor kernel: its members and their shape-only tables.

    ``kind`` is ``(param dtype, grad dtype, level, even, step dtype or None)``; a step dtype means
    the members' step counters are read on the device through the pointer table, ``None`` that
    the launcher passes host-side bias corrections (and splits the group by step value when the
    members' steps differ).
    """

    def __init__(self, kind, members, geoms, cols, device):
        self.p_dtype, self.g_dtype, self.level, self.even, self.step_dtype = kind
        self.members = members
        self.geoms = geoms
        self.cols = cols
        self.device = device
        self.pick = operator.itemgetter(*cols)
        self.tables = plans.GroupTables(geoms, self.level, device)
        self.slots = plans.PointerSlots(len(cols), device)
        self.total = sum(r * n for r, n, _ in geoms)
        self.config = None
        self.splits: dict = {}

    def subgroup(self, positions) -> _Group:
        """The members at ``positions`` (host steps of different values), built once."""
        sub = self.splits.get(positions)
        if sub is None:
            cols = [c for k in positions for c in self.cols[6 * k : 6 * k + 6]]
            kind = (self.p_dtype, self.g_dtype, self.level, self.even, self.step_dtype)
            sub = _Group(
                kind,
                [self.members[k] for k in positions],
                [self.geoms[k] for k in positions],
                cols,
                self.device,
            )
            self.splits[positions] = sub
        return sub

    def captured(self) -> bool:
        return bool(self.slots.captured) or any(s.captured() for s in self.splits.values())


class _Plan:
    """Everything a call's metadata decides, built (and validated) once per metadata."""

    def __init__(self, groups, host_steps, all_step_tensors, device):
        self.groups = groups
        self.host_steps = host_steps  # indices of parameters whose steps are read on the host
        self.all_step_tensors = all_step_tensors
        self.device = device
        self.levels: tuple = ()  # what plan_cache compares, with its guard, to find it again
        self.guard = None


def _build_plan(params, grads, exp_avgs, exp_avg_sqs, vmaxs, steps, levels, hp, where) -> _Plan:
    """Validate every tensor (nothing is written before this passes) and group them."""
    device = params[0].device
    count = len(params)
    kinds: dict[tuple, list] = {}
    host_steps = []
    for i, p in enumerate(params):
        here = f"{where}: parameter {i}"
        vmax = vmaxs[i] if hp.amsgrad else None
        level = check_tensors(
            p, grads[i], exp_avgs[i], exp_avg_sqs[i], vmax, levels[i], hp.amsgrad, here
        )
        if p.device != device:
            raise ValueError(f"{here} is on {p.device}, parameter 0 on {device}")
        step_value, step_tensor = check_step(steps[i], device, here)
        if step_tensor is None:
            host_steps.append(i)
        if p.numel() == 0:
            continue
        even = plans.is_even(p.shape, level)
        step_dtype = None if step_tensor is None else step_tensor.dtype
        if step_dtype is not None and step_dtype not in _TL_DTYPE:
            raise ValueError(f"{here}: a step counter of dtype {step_dtype} is not supported")
        kind = (p.dtype, grads[i].dtype, level, even, step_dtype)
        kinds.setdefault(kind, []).append((i, plans.geometry(p.shape, level)))
    # Flat address tuple of a call: p, g, exp_avg, exp_avg_sq, [max_exp_avg_sq], step, then 0.
    n_lists = 5 if hp.amsgrad else 4
    zero = (n_lists + 1) * count
    groups = []
    for kind, members in kinds.items():
        cols = []
        for i, _ in members:
            vm = 4 * count + i if hp.amsgrad else 3 * count + i
            step_col = n_lists * count + i if kind[4] is not None else zero
            cols += [i, count + i, 2 * count + i, 3 * count + i, vm, step_col]
        idx = [i for i, _ in members]
        groups.append(_Group(kind, idx, [g for _, g in members], cols, device))
    all_tensors = all(isinstance(s, Tensor) for s in steps)
    return _Plan(groups, host_steps, all_tensors, device)


def _launch_multi(
    group_tables,
    ptrs,
    config,
    *,
    level,
    even,
    hp,
    p_dtype,
    g_dtype,
    step_dtype,
    lr_tensor,
    scalars,
    aligned,
):
    tile, warps = config
    dummy = group_tables.meta
    _foam_adam_multi_kernel[(group_tables.n_chunks,)](
        ptrs,
        group_tables.meta,
        group_tables.chunks,
        lr_tensor if lr_tensor is not None else dummy,  # never read unless LR_FROM_PTR
        hp=scalars,
        **multi_constexprs(
            p_dtype,
            g_dtype,
            level,
            even,
            hp,
            lr_ptr=lr_tensor is not None,
            step_dtype=step_dtype,
            aligned=aligned,
            idx64=group_tables.idx64,
            bf16=_bf16_rtne(p_dtype),
            tile=tile,
        ),
        num_warps=warps,
        num_stages=tuning.NUM_STAGES,
    )


def _device_name(device: torch.device) -> str:
    name = _DEVICE_NAMES.get(device)
    if name is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        _DEVICE_NAMES[device] = name
    return name


def _multi_config(group: _Group, hp: KernelHyper) -> tuple[int, int]:
    """The group's config: chosen once per key (this process, else the disk, else timed now)."""
    if group.config is not None:
        return group.config
    choices = tuning.configs(group.even)
    if len(choices) == 1:
        group.config = choices[0]
        return group.config
    bucket = 12 if is_interpreting() else tuning.size_bucket(group.total, _saturation(group.device))
    fields = (str(group.p_dtype), str(group.g_dtype), group.level, group.even, STATE_FP32, bucket)
    key = (group.device, fields)
    choice = _MULTI_TUNED.get(key)
    kernel_hash = getattr(_foam_adam_multi_kernel, "cache_key", "interpreted")
    if choice is None:
        choice = tuning.cached_choice(_device_name(group.device), kernel_hash, fields)
    if choice is None and plans.capturing(group.device):
        return tuning.DEFAULT  # nothing is timed inside a capture; tune on the next eager step
    if choice is None:
        choice, timings = _tune_multi(group, hp, bucket)
        tuning.record_choice(_device_name(group.device), kernel_hash, fields, choice, timings)
    _MULTI_TUNED[key] = choice
    group.config = choice
    return choice


def _tune_multi(group: _Group, hp: KernelHyper, bucket: int):
    """Time every config on a scratch group of the group's dtypes, level and evenness.

    The scratch has ``2**(bucket - 1)`` to ``2**bucket`` elements (the size model of
    :mod:`.tuning`: the group's own size up to saturation); live tensors are never touched.
    """
    device = group.device
    n = 4096 if group.even else 4095  # 4095 is odd: a partial block at every level >= 1
    rows = max(1, (1 << (bucket - 1)) // n)
    level = group.level
    p = torch.randn(rows, n, device=device).to(group.p_dtype)
    g = torch.randn(rows, n, device=device).to(group.g_dtype)
    fshape = (rows, -(-n // (1 << level)))
    m = torch.zeros(fshape, device=device)
    v = torch.zeros(fshape, device=device)
    vmax = torch.zeros(fshape, device=device) if hp.amsgrad else v
    tables = plans.GroupTables([plans.geometry(p.shape, level)], level, device)
    ptrs = torch.tensor(
        [p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), vmax.data_ptr(), 0],
        dtype=torch.int64,
        device=device,
    )
    aligned = all(t.data_ptr() % 16 == 0 for t in (p, g, m, v, vmax))
    bc1, sqrt_bc2 = host_bias_corrections(1, hp.beta1, hp.beta2)
    timings = {}
    for config in tuning.configs(group.even):

        def run(config=config):
            _launch_multi(
                tables,
                ptrs,
                config,
                level=level,
                even=group.even,
                hp=hp,
                p_dtype=group.p_dtype,
                g_dtype=group.g_dtype,
                step_dtype=None,
                lr_tensor=None,
                scalars=hp.scalars(level, 1e-3, bc1, sqrt_bc2),
                aligned=aligned,
            )

        try:
            timings[config] = _do_bench(run)
        except Exception:  # a config that does not compile or fit is skipped
            timings[config] = float("inf")
    return min(timings, key=timings.get), timings


def _refuse_host_steps_in_capture(device: torch.device, where: str) -> None:
    if plans.capturing(device):
        raise RuntimeError(
            f"{where}: a step counter read on the host (a number or a CPU tensor) would be "
            "baked into the CUDA graph being captured, and every replay would reuse its bias "
            "correction; keep the step counters on the device (FOAM(..., capturable=True))"
        )


def _host_step_values(plan: _Plan, steps) -> dict:
    """``{parameter index: step value}`` for the steps read on the host (CPU tensors, numbers)."""
    host = [steps[i] for i in plan.host_steps]
    if plan.all_step_tensors:
        values = list(map(Tensor.item, host))  # the cheapest read of many CPU scalars
    else:
        values = [float(s) for s in host]
    return dict(zip(plan.host_steps, values))


def _run_group(group, flat, hp, lr_value, lr_tensor, step_value) -> None:
    ptrs, aligned = group.slots.get(group.pick(flat))
    if group.step_dtype is None:
        bc1, sqrt_bc2 = host_bias_corrections(step_value, hp.beta1, hp.beta2)
    else:
        bc1 = sqrt_bc2 = 1.0
    _launch_multi(
        group.tables,
        ptrs,
        _multi_config(group, hp),
        level=group.level,
        even=group.even,
        hp=hp,
        p_dtype=group.p_dtype,
        g_dtype=group.g_dtype,
        step_dtype=group.step_dtype,
        lr_tensor=lr_tensor,
        scalars=hp.scalars(group.level, lr_value, bc1, sqrt_bc2),
        aligned=aligned,
    )


def foam_adam_grouped_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    state_steps: Sequence[Tensor | float],
    levels: Sequence[int],
    *,
    lr: float | Tensor,
    **hyper,
) -> None:
    """One FOAM step over many parameters in a handful of launches, in place.

    Parameters are grouped by ``(param dtype, grad dtype, level, even, how the step is read)``
    and each group is one launch of the multi-tensor kernel. ``state_steps[i]`` is parameter
    ``i``'s *new* step count (already incremented): numbers or CPU tensors are read on the host
    (a group is split by value if they differ), tensors on the parameters' device are read by
    the kernel through the pointer table (no gather, no copy). ``levels[i]`` is parameter
    ``i``'s level (clamped to 0 for 0-d/1-d parameters). Other arguments as
    :func:`foam_adam_step_`. All tensors are checked before any is written; a steady loop
    (same shapes, same addresses) allocates, copies and synchronises nothing.
    """
    where = "foam_adam_grouped_"
    count = len(params)
    lists = {
        "grads": grads,
        "exp_avgs": exp_avgs,
        "exp_avg_sqs": exp_avg_sqs,
        "state_steps": state_steps,
        "levels": levels,
    }
    if hyper.get("amsgrad"):
        if max_exp_avg_sqs is None:
            raise ValueError(f"{where}: amsgrad=True needs max_exp_avg_sqs")
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    for name, seq in lists.items():
        if len(seq) != count:
            raise ValueError(f"{where}: {name} has {len(seq)} entries, params has {count}")
    if count == 0:
        return
    hp = _checked_hyper(where, hyper)
    lr_value, lr_tensor = check_lr(lr, params[0].device, where)
    vmaxs = tuple(max_exp_avg_sqs) if hp.amsgrad else ()
    states = (*exp_avgs, *exp_avg_sqs, *vmaxs)
    plan = plan_cache.lookup(
        params,
        grads,
        states,
        state_steps,
        levels,
        hp.amsgrad,
        lambda: _build_plan(
            params, grads, exp_avgs, exp_avg_sqs, vmaxs, state_steps, levels, hp, where
        ),
        params[0].device,
    )
    if plan.all_step_tensors:
        steps = map(_PTR, state_steps)
    else:
        steps = [s.data_ptr() if isinstance(s, Tensor) else 0 for s in state_steps]
    flat = (*map(_PTR, params), *map(_PTR, grads), *map(_PTR, states), *steps, 0)
    values = None
    if plan.host_steps:
        _refuse_host_steps_in_capture(plan.device, where)
        values = _host_step_values(plan, state_steps)
    for group in plan.groups:
        if group.step_dtype is not None:
            _run_group(group, flat, hp, lr_value, lr_tensor, None)
            continue
        mine = [values[i] for i in group.members]
        first = mine[0]
        if all(x == first for x in mine):
            _run_group(group, flat, hp, lr_value, lr_tensor, first)
            continue
        for value in sorted(set(mine)):  # parameters that joined at different steps
            positions = tuple(k for k, x in enumerate(mine) if x == value)
            _run_group(group.subgroup(positions), flat, hp, lr_value, lr_tensor, value)
