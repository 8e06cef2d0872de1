"""One FOAM step in one pass: the Triton kernels and their thin torch launchers.

What one pass means (ALGORITHM.md, "Memory"): for a parameter ``p`` viewed as ``rows x n`` at
level ``l`` (blocks of ``B = 2**l`` along the last dim, ``nb = ceil(n / B)`` per row), every element
of ``p`` and ``grad`` is read once, every folded state element (``exp_avg``, ``exp_avg_sq`` and,
with amsgrad, ``max_exp_avg_sq``; float32, shape ``[..., nb]``) is read and written once, and ``p``
is written once. The block means, ``R``, ``M``, ``V`` and the denominator live in registers.

Tiling. A program owns ``TILE`` elements: ``BB = TILE >> l`` consecutive blocks of the flattened
``rows * nb`` block index, seen as a ``[BB, B]`` tile, so the block means are a ``tl.sum`` over
axis 1. When ``n % B == 0`` (``EVEN``, the common case) the tile is one contiguous run, loaded 1-D
and reshaped, which keeps loads full-width even for ``B = 2`` or bfloat16; whole tiles carry no
mask. Otherwise each row's partial last block is masked and divided by the number of elements it
really has (ALGORITHM.md "Folding"; the reference code's zero-pad-and-divide-by-B is not copied).
Level 0 is the flat case with ``B = 1``: ``R = 0``, ``M = m``, ``V = v``, torch.optim.AdamW's step.

Bias correction is computed once per program, never per element. With ``step`` a Python number
(or a CPU tensor next to CUDA parameters) the launcher computes ``1 - beta1**t`` and
``sqrt(1 - beta2**t)`` in float64 on the host. With ``step`` a tensor on the parameters' device
(capturable / CUDA graphs / torch.compile) each program computes them from the loaded step by
exponentiation by squaring in float64, with each beta passed as a float32 hi + lo pair (Triton
passes Python floats as float32): ``1 - beta2**t`` near ``t = 1`` cancels to ~1e-3, and float32
``beta2`` alone would leave it a 1e-5 relative error. ``lr`` is a number or a 0-d tensor on the
device, loaded once per program.

Two kernels share the tile code:

* ``_foam_adam_kernel`` - one tensor per launch, every tensor a real kernel argument. This is the
  kernel behind the ``foam::adam_step_`` ``triton_op`` (ops.py): Inductor reads its TTIR to find
  which arguments are stored to, so it must see the stores land on real arguments.
* ``_foam_adam_multi_kernel`` - a whole group (same dtypes and level) in one launch. An int64 table
  holds each tensor's ``data_ptr()``s; programs own fixed-size chunks of blocks (``chunk -> tensor,
  first block``, like ``multi_tensor_apply``) and cast the loaded addresses with
  ``tl.pointer_type``. Inductor cannot see stores made through such a table (its TTIR analysis
  stops at loads), so this kernel is only ever run from the *opaque* ``foam::adam_step_grouped_``
  custom op, whose ``mutates_args`` declare the mutations. The tables depend only on the tensors'
  addresses and sizes, so they are cached by that content (a hit is always valid) and a steady
  optimizer loop builds and copies nothing.

Autotuning. The per-tensor kernel uses ``@triton.autotune`` over tile size, ``num_warps`` and
``num_stages`` with ``restore_value`` on the four mutated arguments (benchmarking runs the kernel
repeatedly; the autotuner snapshots and restores them, a transient full-size copy once per
tuning key). The multi-tensor kernel cannot be restored that way (its writes go through the
table), so :func:`_multi_config` times the same configs on a bounded scratch group of the same
dtypes and level, once per ``(device, level, dtypes, amsgrad, size bucket)``, and never touches
live state. ``FOAM_TRITON_AUTOTUNE=0`` (and, by default, ``TRITON_INTERPRET=1``) means one
config and nothing timed, i.e. deterministic results; ``FOAM_TRITON_AUTOTUNE=force`` tunes even
in the interpreter, with a wall-clock timer, so CPU tests can exercise the tuning paths.

The interpreter casts float32 -> bfloat16 by truncation where GPUs round to nearest even; under
the interpreter the kernel rounds bfloat16 parameters by hand so CPU tests see GPU numerics.

Tables, caches and CUDA graphs: build the tables (one eager step) before capturing a graph; a
step tensor on the device keeps the captured step free of host reads.

This module imports nothing from the rest of foam_compile. ``TRITON_INTERPRET`` is read by Triton
when the kernels are decorated, i.e. when this module is first imported.
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

__all__ = [
    "HYPER_NAMES",
    "MAX_LEVEL",
    "SUPPORTED_DTYPES",
    "foam_adam_grouped_",
    "foam_adam_step_",
    "is_interpreting",
    "is_tracing",
]

# A tile holds at least one whole block; past B = 1024 a block no longer fits the register budget
# of one program comfortably. ALGORITHM.md's levels in use are 0..8.
MAX_LEVEL = 10
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The launchers' hyperparameter arguments after ``lr`` (and the torch ops', by the same names).
HYPER_NAMES = (
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "decoupled_weight_decay",
    "amsgrad",
    "maximize",
    "scale",
    "res_scale",
)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Weight-decay modes (a constexpr, so the unused branch is compiled out).
_WD_NONE, _WD_DECOUPLED, _WD_COUPLED = 0, 1, 2


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _bf16_rtne(dtype: torch.dtype) -> bool:
    # The interpreter's float32 -> bfloat16 cast truncates; the kernel rounds by hand there.
    return dtype == torch.bfloat16 and is_interpreting()


def _autotune_enabled() -> bool:
    # FOAM_TRITON_AUTOTUNE: "0" = one config; "force" = tune even in the interpreter (CPU timer,
    # used by the tests to exercise the tuning paths); default = tune on GPUs only.
    mode = os.environ.get("FOAM_TRITON_AUTOTUNE", "1")
    return mode == "force" or (mode != "0" and not is_interpreting())


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


def _configs() -> list[triton.Config]:
    # One config when interpreting or asked not to tune: no timer needed, deterministic.
    if not _autotune_enabled():
        return [triton.Config({"TILE": 1024}, num_warps=4, num_stages=1)]
    # A memory-bound streaming kernel: the tile size (bytes in flight per program) and the warps
    # that issue them matter; stages only matter for the multi-tensor kernel's chunk loop.
    return [
        triton.Config({"TILE": tile}, num_warps=warps, num_stages=stages)
        for tile, warps, stages in (
            (1024, 4, 1),
            (2048, 4, 1),
            (2048, 8, 1),
            (4096, 8, 1),
            (2048, 4, 3),
            (4096, 8, 3),
        )
    ]


_CONFIGS = _configs()
# A multi-tensor program walks one chunk of this many elements (a multiple of every TILE).
_CHUNK_ELEMS = 4 * max(c.kwargs["TILE"] for c in _CONFIGS)


# ----------------------------------------------------------------------------- device code
@triton.jit
def _bias_corrections(step, b1_hi, b1_lo, b2_hi, b2_lo):
    """``(1 - beta1**t, sqrt(1 - beta2**t))`` in float32, computed in float64 from a step value.

    Exponentiation by squaring (t is a whole number): multiplications only, no float64 exp/log.
    """
    t = tl.cast(step, tl.int64)
    b1 = tl.cast(b1_hi, tl.float64) + tl.cast(b1_lo, tl.float64)
    b2 = tl.cast(b2_hi, tl.float64) + tl.cast(b2_lo, tl.float64)
    p1 = tl.full((), 1.0, tl.float64)
    p2 = tl.full((), 1.0, tl.float64)
    while t > 0:
        odd = (t & 1) == 1
        p1 = tl.where(odd, p1 * b1, p1)
        p2 = tl.where(odd, p2 * b2, p2)
        b1 = b1 * b1
        b2 = b2 * b2
        t = t >> 1
    bc1 = (1.0 - p1).to(tl.float32)
    sqrt_bc2 = tl.sqrt_rn((1.0 - p2).to(tl.float32))
    return bc1, sqrt_bc2


@triton.jit
def _foam_tile(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    blk0,
    n_blocks,
    n,
    nb,
    decay,
    step_size,
    sqrt_bc2,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    rho,
    LEVEL: tl.constexpr,
    BB: tl.constexpr,
    EVEN: tl.constexpr,
    MASKED: tl.constexpr,
    WD_MODE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BF16_RTNE: tl.constexpr,
):
    """FOAM on blocks ``blk0 .. blk0 + BB`` of one tensor (rows x n, state rows x nb).

    ``EVEN``: ``n % B == 0``, so the tile is ``BB * B`` contiguous elements; it is loaded as one
    1-D run and reshaped to ``[BB, B]`` (full-width vector loads even for B = 2 or bfloat16).
    Otherwise a ``[BB, B]`` tile is gathered row by row with the partial last block masked.
    ``MASKED``: the tile may run past ``n_blocks``; whole tiles go unmasked.
    """
    B: tl.constexpr = 1 << LEVEL
    blk = blk0 + tl.arange(0, BB)
    if MASKED:
        bmask = blk < n_blocks
    else:
        bmask = tl.full((BB,), 1, tl.int1)
    if EVEN:
        # Level 0 included (B = 1): the tile is the flat run of BB elements.
        offs = blk0 * B + tl.arange(0, BB * B)
        if MASKED:
            emask = offs < n_blocks * B
        else:
            emask = tl.full((BB * B,), 1, tl.int1)
    else:
        row = blk // nb
        col0 = (blk - row * nb) * B
        # Elements that exist in each block: B, less for a row's partial last block.
        cnt = tl.where(bmask, tl.minimum(n - col0, B), 1)
        e = tl.arange(0, B)
        offs = (row * n + col0)[:, None] + e[None, :]
        emask = bmask[:, None] & (e[None, :] < cnt[:, None])

    g = tl.load(g_ptr + offs, mask=emask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=emask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if WD_MODE == 1:  # AdamW: decoupled decay first
        p = p * decay
    if WD_MODE == 2:  # Adam: L2 folded into the gradient (after maximize, as torch.optim.Adam)
        g = g + weight_decay * p
    if LEVEL > 0 and EVEN:
        g = tl.reshape(g, (BB, B))
        p = tl.reshape(p, (BB, B))

    if LEVEL == 0:
        gb = g
        qb = g * g
    elif EVEN:
        gb = tl.sum(g, axis=1) * (1.0 / B)  # exact: B is a power of two
        qb = tl.sum(g * g, axis=1) * (1.0 / B)
    else:
        cnt_f = cnt.to(tl.float32)
        # Masked lanes load 0, so the sums run over the elements that exist.
        gb = tl.div_rn(tl.sum(g, axis=1), cnt_f)
        qb = tl.div_rn(tl.sum(g * g, axis=1), cnt_f)

    m = tl.load(m_ptr + blk, mask=bmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + blk, mask=bmask, other=0.0).to(tl.float32)
    m = beta1 * m + one_minus_beta1 * gb
    v = beta2 * v + one_minus_beta2 * qb
    tl.store(m_ptr + blk, m, mask=bmask)
    tl.store(v_ptr + blk, v, mask=bmask)
    if AMSGRAD:
        v_use = tl.maximum(tl.load(vmax_ptr + blk, mask=bmask, other=0.0).to(tl.float32), v)
        tl.store(vmax_ptr + blk, v_use, mask=bmask)
    else:
        v_use = v

    if LEVEL == 0:  # R = 0: M = m, V = v, torch.optim.AdamW's step
        big_m = m
        big_v = v_use
    else:
        r = g - gb[:, None]  # the residual, never stored
        big_m = m[:, None] + rho * r
        big_v = v_use[:, None] + (rho * rho) * (r * r)
    denom = tl.div_rn(tl.sqrt_rn(big_v), sqrt_bc2) + eps
    p = p - step_size * tl.div_rn(big_m, denom)
    if LEVEL > 0 and EVEN:
        p = tl.reshape(p, (BB * B,))
    if BF16_RTNE:
        # Round to nearest even by hand: Triton's interpreter truncates float32 -> bfloat16
        # (GPUs round), which would bias every CPU-tested step toward zero.
        bits = p.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = p.to(p_ptr.dtype.element_ty)
    tl.store(p_ptr + offs, out, mask=emask)


@triton.jit
def _step_scalars(
    lr_ptr,
    step_ptr,
    lr,
    bc1,
    sqrt_bc2,
    b1_hi,
    b1_lo,
    b2_hi,
    b2_lo,
    weight_decay,
    scale,
    LR_FROM_PTR: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr,
):
    """Per-program scalars: ``(decay, step_size, sqrt_bc2)``; ``lr``/``step`` may live on device."""
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
    if STEP_FROM_PTR:
        bc1, sqrt_bc2 = _bias_corrections(tl.load(step_ptr), b1_hi, b1_lo, b2_hi, b2_lo)
    decay = 1.0 - lr * weight_decay
    step_size = lr * scale / bc1
    return decay, step_size, sqrt_bc2


@triton.jit
def _foam_blocks(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    lr_ptr,
    step_ptr,
    blk_start,
    blk_stop,
    n_blocks,
    n,
    nb,
    lr,
    bc1,
    sqrt_bc2,
    b1_hi,
    b1_lo,
    b2_hi,
    b2_lo,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    weight_decay,
    scale,
    rho,
    LEVEL: tl.constexpr,
    BB: tl.constexpr,
    EVEN: tl.constexpr,
    WD_MODE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_FROM_PTR: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr,
    BF16_RTNE: tl.constexpr,
):
    """One program's blocks ``blk_start .. blk_stop`` of one tensor, in tiles of ``BB`` blocks:
    whole tiles unmasked, the one that runs past ``n_blocks`` masked. ``blk_start`` is a multiple
    of ``BB`` (both kernels' programs)."""
    decay, step_size, sqrt_bc2 = _step_scalars(
        lr_ptr,
        step_ptr,
        lr,
        bc1,
        sqrt_bc2,
        b1_hi,
        b1_lo,
        b2_hi,
        b2_lo,
        weight_decay,
        scale,
        LR_FROM_PTR,
        STEP_FROM_PTR,
    )
    for blk0 in range(blk_start, blk_stop, BB):
        if blk0 + BB <= n_blocks:  # a whole tile: no block mask
            _foam_tile(
                p_ptr,
                g_ptr,
                m_ptr,
                v_ptr,
                vmax_ptr,
                tl.multiple_of(blk0, BB),
                n_blocks,
                n,
                nb,
                decay,
                step_size,
                sqrt_bc2,
                b1_hi,
                one_minus_beta1,
                b2_hi,
                one_minus_beta2,
                eps,
                weight_decay,
                rho,
                LEVEL,
                BB,
                EVEN,
                False,
                WD_MODE,
                AMSGRAD,
                MAXIMIZE,
                BF16_RTNE,
            )
        else:  # the tensor's ragged end
            _foam_tile(
                p_ptr,
                g_ptr,
                m_ptr,
                v_ptr,
                vmax_ptr,
                blk0,
                n_blocks,
                n,
                nb,
                decay,
                step_size,
                sqrt_bc2,
                b1_hi,
                one_minus_beta1,
                b2_hi,
                one_minus_beta2,
                eps,
                weight_decay,
                rho,
                LEVEL,
                BB,
                EVEN,
                True,
                WD_MODE,
                AMSGRAD,
                MAXIMIZE,
                BF16_RTNE,
            )


@triton.autotune(
    configs=_CONFIGS,
    key=["LEVEL", "SIZE_BUCKET", "AMSGRAD"],  # tensor dtypes are added to the key by Triton
    restore_value=["p_ptr", "m_ptr", "v_ptr", "vmax_ptr"],
    do_bench=_cpu_do_bench if is_interpreting() else None,  # None: Triton's GPU timer
)
@triton.jit
def _foam_adam_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    lr_ptr,
    step_ptr,
    n_blocks,
    n,
    nb,
    lr,
    bc1,
    sqrt_bc2,
    b1_hi,
    b1_lo,
    b2_hi,
    b2_lo,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    weight_decay,
    scale,
    rho,
    SIZE_BUCKET,  # autotune key only: log2 of the element count
    LEVEL: tl.constexpr,
    EVEN: tl.constexpr,
    WD_MODE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_FROM_PTR: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr,
    BIG: tl.constexpr,
    BF16_RTNE: tl.constexpr,
    TILE: tl.constexpr,
):
    # TILE elements per program, but never less than one whole block.
    BB: tl.constexpr = (TILE + (1 << LEVEL) - 1) >> LEVEL
    pid = tl.program_id(0)
    if BIG:  # more than 2**31 elements: 64-bit offsets
        pid = pid.to(tl.int64)
    blk0 = pid * BB
    _foam_blocks(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        vmax_ptr,
        lr_ptr,
        step_ptr,
        blk0,
        blk0 + BB,
        n_blocks,
        n,
        nb,
        lr,
        bc1,
        sqrt_bc2,
        b1_hi,
        b1_lo,
        b2_hi,
        b2_lo,
        one_minus_beta1,
        one_minus_beta2,
        eps,
        weight_decay,
        scale,
        rho,
        LEVEL,
        BB,
        EVEN,
        WD_MODE,
        AMSGRAD,
        MAXIMIZE,
        LR_FROM_PTR,
        STEP_FROM_PTR,
        BF16_RTNE,
    )


@triton.jit
def _foam_adam_multi_kernel(
    ptr_table,
    meta_table,
    chunk_table,
    lr_ptr,
    step_ptr,
    lr,
    bc1,
    sqrt_bc2,
    b1_hi,
    b1_lo,
    b2_hi,
    b2_lo,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    weight_decay,
    scale,
    rho,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    LEVEL: tl.constexpr,
    EVEN: tl.constexpr,
    WD_MODE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LR_FROM_PTR: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr,
    ALIGNED: tl.constexpr,
    BF16_RTNE: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
    TILE: tl.constexpr,
):
    BB: tl.constexpr = (TILE + (1 << LEVEL) - 1) >> LEVEL
    pid = tl.program_id(0)
    t = tl.load(chunk_table + 2 * pid)  # which tensor
    # Its first block in this chunk: a multiple of CHUNK_BLOCKS by construction.
    blk_start = tl.multiple_of(tl.load(chunk_table + 2 * pid + 1), CHUNK_BLOCKS)
    p_ptr = tl.load(ptr_table + 5 * t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(ptr_table + 5 * t + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(ptr_table + 5 * t + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(ptr_table + 5 * t + 3).to(tl.pointer_type(tl.float32))
    vmax_ptr = tl.load(ptr_table + 5 * t + 4).to(tl.pointer_type(tl.float32))
    n = tl.load(meta_table + 3 * t)
    nb = tl.load(meta_table + 3 * t + 1)
    n_blocks = tl.load(meta_table + 3 * t + 2)
    if ALIGNED:
        # The launcher checked that every address is 16-byte aligned. Addresses loaded from
        # memory carry no alignment facts; stating them lets the compiler vectorise.
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        vmax_ptr = tl.multiple_of(vmax_ptr, 16)
    if STEP_FROM_PTR:
        step_ptr = step_ptr + t  # one step per tensor
    _foam_blocks(
        p_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        vmax_ptr,
        lr_ptr,
        step_ptr,
        blk_start,
        tl.minimum(blk_start + CHUNK_BLOCKS, n_blocks),
        n_blocks,
        n,
        nb,
        lr,
        bc1,
        sqrt_bc2,
        b1_hi,
        b1_lo,
        b2_hi,
        b2_lo,
        one_minus_beta1,
        one_minus_beta2,
        eps,
        weight_decay,
        scale,
        rho,
        LEVEL,
        BB,
        EVEN,
        WD_MODE,
        AMSGRAD,
        MAXIMIZE,
        LR_FROM_PTR,
        STEP_FROM_PTR,
        BF16_RTNE,
    )


# ------------------------------------------------------------------------------- host side
def _run_level(shape: Sequence[int], level: int) -> int:
    """ALGORITHM.md: 0-d and 1-d parameters never fold (they run at level 0)."""
    return level if len(shape) >= 2 else 0


def _state_shape(shape: Sequence[int], level: int) -> tuple[int, ...]:
    """The folded state's shape ``[..., ceil(n / 2**level)]`` at the level ``shape`` runs at."""
    shape = tuple(shape)
    level = _run_level(shape, level)
    if level == 0:
        return shape
    return (*shape[:-1], -(-shape[-1] // (1 << level)))


def _split_f32(x: float) -> tuple[float, float]:
    """``x`` as float32 hi + lo, so a kernel can rebuild it in float64 from float32 arguments."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


class _Hyper:
    """Checked hyperparameters and the scalar kernel arguments derived from them once."""

    def __init__(self, args: dict, where: str):
        """``args``: a launcher's arguments (its ``locals()`` on entry), read by name."""
        for name in ("beta1", "beta2", "eps", "weight_decay", "scale", "res_scale"):
            value = args[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: {name} must be a Python number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{where}: {name} must be finite, got {value!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= args[name] < 1.0:
                raise ValueError(f"{where}: {name}={args[name]!r} must be in [0, 1)")
        self.beta1, self.beta2 = float(args["beta1"]), float(args["beta2"])
        self.b1_hi, self.b1_lo = _split_f32(self.beta1)
        self.b2_hi, self.b2_lo = _split_f32(self.beta2)
        self.eps, self.weight_decay = float(args["eps"]), float(args["weight_decay"])
        self.scale, self.rho = float(args["scale"]), float(args["res_scale"])
        self.amsgrad, self.maximize = bool(args["amsgrad"]), bool(args["maximize"])
        if args["weight_decay"] == 0:
            self.wd_mode = _WD_NONE
        else:
            self.wd_mode = _WD_DECOUPLED if args["decoupled_weight_decay"] else _WD_COUPLED

    def scalars(self, level: int, lr: float, bc1: float, sqrt_bc2: float) -> dict:
        return dict(
            lr=lr,
            bc1=bc1,
            sqrt_bc2=sqrt_bc2,
            b1_hi=self.b1_hi,
            b1_lo=self.b1_lo,
            b2_hi=self.b2_hi,
            b2_lo=self.b2_lo,
            one_minus_beta1=1.0 - self.beta1,
            one_minus_beta2=1.0 - self.beta2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            # alpha scales folded parameters only: level 0 is AdamW exactly (ALGORITHM.md).
            scale=self.scale if level > 0 else 1.0,
            rho=self.rho,
        )


def _host_bias_corrections(t: float, beta1: float, beta2: float) -> tuple[float, float]:
    if not (t >= 1 and float(t).is_integer()):
        raise ValueError(f"step must be the new step count, a whole number >= 1; got {t!r}")
    return 1.0 - beta1**t, math.sqrt(1.0 - beta2**t)


def _check_lr(lr, device: torch.device, where: str):
    """Return ``(lr_value, lr_tensor_or_None)``; a device tensor is read by the kernel."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}: lr as a tensor must have one element, got {list(lr.shape)}")
        if lr.device == device:
            return 0.0, lr
        if lr.device.type == "cpu":
            return float(lr), None
        raise ValueError(f"{where}: lr is on {lr.device}, the parameters on {device}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise ValueError(f"{where}: lr must be a finite number or a 1-element tensor, got {lr!r}")
    return float(lr), None


def _check_step(step, device: torch.device, where: str):
    """Return ``(step_value_or_None, step_tensor_or_None)``."""
    if isinstance(step, Tensor):
        if step.numel() != 1:
            raise ValueError(
                f"{where}: step as a tensor must have one element, got {list(step.shape)}"
            )
        if step.device == device:
            return None, step
        if step.device.type == "cpu":
            return float(step), None
        raise ValueError(f"{where}: step is on {step.device}, the parameters on {device}")
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise ValueError(f"{where}: step must be a number or a 1-element tensor, got {step!r}")
    return float(step), None


def _check_level(level, where: str) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"{where}: level={level!r} must be an int in [0, {MAX_LEVEL}]")
    return level


def _check_tensors(p, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, level, amsgrad, where) -> int:
    """Validate one parameter's tensors; return the level it runs at."""
    if not isinstance(p, Tensor):
        raise ValueError(f"{where}: param must be a tensor, got {type(p).__name__}")
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{where}: param dtype {p.dtype} is not supported; use one of "
            f"{[str(d) for d in SUPPORTED_DTYPES]}"
        )
    if not isinstance(grad, Tensor) or grad.shape != p.shape:
        got = list(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
        raise ValueError(
            f"{where}: grad must be a tensor of the param's shape {list(p.shape)}, got {got}"
        )
    if grad.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{where}: grad dtype {grad.dtype} is not supported; use one of "
            f"{[str(d) for d in SUPPORTED_DTYPES]}"
        )
    level = _run_level(p.shape, _check_level(level, where))
    fshape = _state_shape(p.shape, level)
    named = [("param", p), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)]
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError(f"{where}: amsgrad=True needs max_exp_avg_sq")
        named.append(("max_exp_avg_sq", max_exp_avg_sq))
    for name, x in named:
        if not isinstance(x, Tensor):
            raise ValueError(f"{where}: {name} must be a tensor, got {type(x).__name__}")
        if x.device != p.device:
            raise ValueError(f"{where}: {name} is on {x.device}, param on {p.device}")
        if not x.is_contiguous():
            raise ValueError(
                f"{where}: {name} must be contiguous (shape {list(x.shape)}, "
                f"strides {list(x.stride())}); call .contiguous() first"
            )
        if name in ("param", "grad"):
            continue
        if x.dtype != torch.float32:
            raise ValueError(f"{where}: {name} must be float32, got {x.dtype}")
        if tuple(x.shape) != fshape:
            raise ValueError(
                f"{where}: {name} has shape {list(x.shape)}; a param of shape "
                f"{list(p.shape)} at level {level} needs {list(fshape)}"
            )
    return level


def _geometry(shape: Sequence[int], level: int) -> tuple[int, int, int]:
    """``(n, nb, n_blocks)`` of a tensor viewed as rows x n with blocks of 2**level."""
    numel = math.prod(shape)
    if level == 0:
        return numel, numel, numel
    n = shape[-1]
    nb = -(-n // (1 << level))
    return n, nb, (numel // n) * nb if n else 0


def foam_adam_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None = None,
    *,
    lr: float | Tensor,
    step: float | Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    level: int = 2,
    decoupled_weight_decay: bool = True,
    amsgrad: bool = False,
    maximize: bool = False,
    scale: float = 1.0,
    res_scale: float = 1.0,
) -> None:
    """One FOAM step for one parameter, in place on ``param`` and the folded states (one launch).

    ``step`` is the *new* step count ``t`` (already incremented), a number or a 1-element tensor;
    ``lr`` a number or a 1-element tensor. A tensor on the parameter's device is read by the
    kernel (no host sync, CUDA-graph safe); a CPU tensor next to CUDA parameters is read on the
    host. ``level`` is clamped to 0 for 0-d/1-d parameters (ALGORITHM.md); the states must have
    the folded shape ``[..., ceil(n / 2**level)]`` and dtype float32. ``param``/``grad`` may be
    float32, bfloat16 or float16 (math in float32). ``scale`` (alpha) applies at level >= 1 only.
    Every tensor must be contiguous. Allocates nothing.
    """
    args = dict(locals())  # the arguments as given, for _Hyper
    where = "foam_adam_step_"
    hp = _Hyper(args, where)
    level = _check_tensors(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, level, hp.amsgrad, where
    )
    lr_value, lr_tensor = _check_lr(lr, param.device, where)
    step_value, step_tensor = _check_step(step, param.device, where)
    bc1 = sqrt_bc2 = 1.0
    if step_tensor is None:
        bc1, sqrt_bc2 = _host_bias_corrections(step_value, hp.beta1, hp.beta2)
    numel = param.numel()
    if numel == 0:
        return
    n, nb, n_blocks = _geometry(param.shape, level)
    vmax = max_exp_avg_sq if hp.amsgrad else exp_avg_sq  # unused unless AMSGRAD

    def grid(meta):
        bb = -(-meta["TILE"] // (1 << level))
        return (triton.cdiv(n_blocks, bb),)

    kernel = wrap_triton(_foam_adam_kernel) if is_tracing() else _foam_adam_kernel
    kernel[grid](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        vmax,
        lr_tensor if lr_tensor is not None else exp_avg,  # dummies are never read
        step_tensor if step_tensor is not None else exp_avg,
        n_blocks,
        n,
        nb,
        **hp.scalars(level, lr_value, bc1, sqrt_bc2),
        SIZE_BUCKET=int(numel).bit_length(),
        LEVEL=level,
        EVEN=n % (1 << level) == 0,
        WD_MODE=hp.wd_mode,
        AMSGRAD=hp.amsgrad,
        MAXIMIZE=hp.maximize,
        LR_FROM_PTR=lr_tensor is not None,
        STEP_FROM_PTR=step_tensor is not None,
        BIG=numel >= 2**31 - 2**20,
        BF16_RTNE=_bf16_rtne(param.dtype),
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
_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 32
_MULTI_TUNED: dict = {}


def _tables(device: torch.device, level: int, entries: list[tuple]):
    """Device tables for one launch: ``(ptrs [T*5] i64, meta [T*3], chunks [C*2], C)``.

    ``entries`` are ``(p, g, m, v, vmax addresses, n, nb, n_blocks)``. The tables are a pure
    function of ``entries``, so they are cached by it: a cache hit is always valid.
    """
    key = (device, level, tuple(entries))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    chunk_blocks = max(1, _CHUNK_ELEMS >> level)
    ptrs, meta, chunks = [], [], []
    for i, (*addrs, n, nb, n_blocks) in enumerate(entries):
        ptrs.extend(addrs)
        meta.extend((n, nb, n_blocks))
        for start in range(0, n_blocks, chunk_blocks):
            chunks.extend((i, start))
    idx_dtype = torch.int32 if max(meta + chunks) < 2**31 - 2**20 else torch.int64
    hit = (
        torch.tensor(ptrs, dtype=torch.int64, device=device),
        torch.tensor(meta, dtype=idx_dtype, device=device),
        torch.tensor(chunks, dtype=idx_dtype, device=device),
        len(chunks) // 2,
        chunk_blocks,
    )
    _TABLE_CACHE[key] = hit
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return hit


def _launch_multi(
    tables, config, *, lr_tensor, step_tensor, scalars, p_dtype, g_dtype, level, even, hp, aligned
):
    ptrs, meta, chunks, n_chunks, chunk_blocks = tables
    dummy = ptrs
    _foam_adam_multi_kernel[(n_chunks,)](
        ptrs,
        meta,
        chunks,
        lr_tensor if lr_tensor is not None else dummy,
        step_tensor if step_tensor is not None else dummy,
        **scalars,
        P_DTYPE=_TL_DTYPE[p_dtype],
        G_DTYPE=_TL_DTYPE[g_dtype],
        LEVEL=level,
        EVEN=even,
        WD_MODE=hp.wd_mode,
        AMSGRAD=hp.amsgrad,
        MAXIMIZE=hp.maximize,
        LR_FROM_PTR=lr_tensor is not None,
        STEP_FROM_PTR=step_tensor is not None,
        ALIGNED=aligned,
        BF16_RTNE=_bf16_rtne(p_dtype),
        CHUNK_BLOCKS=chunk_blocks,
        TILE=config.kwargs["TILE"],
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _multi_config(device, level, p_dtype, g_dtype, hp, total: int, launch_kw) -> triton.Config:
    """The multi-tensor kernel's config: timed once per key on a bounded scratch group.

    ``@triton.autotune`` would benchmark on the live tensors, and stores made through the pointer
    table cannot be snapshotted by ``restore_value``; a scratch group of the same dtypes, level
    and flags (at most 2**23 elements) is timed instead, so the live state is never touched.
    """
    if len(_CONFIGS) == 1:
        return _CONFIGS[0]
    bucket = min(23, max(16, int(total).bit_length()))
    if is_interpreting():
        bucket = 12  # the interpreter only checks the tuning path; keep its scratch tiny
    key = (device, level, p_dtype, g_dtype, hp.amsgrad, bucket)
    best = _MULTI_TUNED.get(key)
    if best is not None:
        return best
    n = 4096
    rows = max(1, (1 << bucket) // n)
    nb = n >> level
    p = torch.randn(rows, n, device=device).to(p_dtype)
    g = torch.randn(rows, n, device=device).to(g_dtype)
    m = torch.zeros(rows, max(nb, 1), device=device)
    v = torch.zeros_like(m)
    vmax = torch.zeros_like(m) if hp.amsgrad else v
    entry = (
        p.data_ptr(),
        g.data_ptr(),
        m.data_ptr(),
        v.data_ptr(),
        vmax.data_ptr(),
        *_geometry(p.shape, level),
    )
    tables = _tables(device, level, [entry])
    timings = {}
    for config in _CONFIGS:

        def run(config=config):
            _launch_multi(tables, config, **launch_kw)

        try:
            timings[config] = _do_bench(run)
        except Exception:  # a config that does not compile or fit is skipped
            timings[config] = float("inf")
    best = min(timings, key=timings.get)
    _MULTI_TUNED[key] = best
    _TABLE_CACHE.pop((device, level, (entry,)), None)
    return best


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
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = True,
    amsgrad: bool = False,
    maximize: bool = False,
    scale: float = 1.0,
    res_scale: float = 1.0,
) -> None:
    """One FOAM step over many parameters in a handful of launches, in place.

    Parameters are grouped by ``(param dtype, grad dtype, level, alignment)`` and each group is
    one launch of the multi-tensor kernel. ``state_steps[i]`` is parameter ``i``'s *new* step
    count (already incremented): numbers or CPU tensors are read on the host (groups split by
    value if they differ), tensors on the parameters' device are read by the kernel. ``levels[i]``
    is parameter ``i``'s level (clamped to 0 for 0-d/1-d parameters). Other arguments as
    :func:`foam_adam_step_`. All tensors are checked before any is written.
    """
    args = dict(locals())  # the arguments as given, for _Hyper
    where = "foam_adam_grouped_"
    count = len(params)
    lists = {
        "grads": grads,
        "exp_avgs": exp_avgs,
        "exp_avg_sqs": exp_avg_sqs,
        "state_steps": state_steps,
        "levels": levels,
    }
    if amsgrad:
        if max_exp_avg_sqs is None:
            raise ValueError(f"{where}: amsgrad=True needs max_exp_avg_sqs")
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    for name, seq in lists.items():
        if len(seq) != count:
            raise ValueError(f"{where}: {name} has {len(seq)} entries, params has {count}")
    if count == 0:
        return
    hp = _Hyper(args, where)
    device = params[0].device
    lr_value, lr_tensor = _check_lr(lr, device, where)

    groups: dict[tuple, list] = {}
    for i, p in enumerate(params):
        here = f"{where}: parameter {i}"
        vmax = max_exp_avg_sqs[i] if amsgrad else None
        level = _check_tensors(
            p, grads[i], exp_avgs[i], exp_avg_sqs[i], vmax, levels[i], hp.amsgrad, here
        )
        if p.device != device:
            raise ValueError(f"{here} is on {p.device}, parameter 0 on {device}")
        step_value, step_tensor = _check_step(state_steps[i], device, here)
        if step_value is not None:
            _host_bias_corrections(step_value, hp.beta1, hp.beta2)  # validates the value
        if p.numel() == 0:
            continue
        g, m, v = grads[i], exp_avgs[i], exp_avg_sqs[i]
        vmax = vmax if amsgrad else v
        n, nb, n_blocks = _geometry(p.shape, level)
        addrs = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), vmax.data_ptr())
        aligned = all(a % 16 == 0 for a in addrs)
        even = n % (1 << level) == 0
        # Host steps split groups by value; device steps share one group and a stacked table.
        step_key = ("device",) if step_tensor is not None else ("host", step_value)
        key = (p.dtype, grads[i].dtype, level, even, aligned, step_key)
        groups.setdefault(key, []).append((addrs, (n, nb, n_blocks), step_tensor))

    for (p_dtype, g_dtype, level, even, aligned, step_key), members in groups.items():
        entries = [(*addrs, *geom) for addrs, geom, _ in members]
        tables = _tables(device, level, entries)
        if step_key[0] == "device":
            # One small [T] gather per group; the kernel computes each tensor's bias correction.
            step_tensor = torch.stack([s.reshape(()) for _, _, s in members]).to(torch.float32)
            bc1 = sqrt_bc2 = 1.0
        else:
            step_tensor = None
            bc1, sqrt_bc2 = _host_bias_corrections(step_key[1], hp.beta1, hp.beta2)
        launch_kw = dict(
            lr_tensor=lr_tensor,
            step_tensor=step_tensor,
            scalars=hp.scalars(level, lr_value, bc1, sqrt_bc2),
            p_dtype=p_dtype,
            g_dtype=g_dtype,
            level=level,
            even=even,
            hp=hp,
            aligned=aligned,
        )
        total = sum(geom[2] << level for _, geom, _ in members)
        config = _multi_config(device, level, p_dtype, g_dtype, hp, total, launch_kw)
        _launch_multi(tables, config, **launch_kw)
