"""Device code shared by the FOAM kernels: one tile, one span of tiles, the per-program scalars.

A *tile* is ``BB`` consecutive blocks of one row (``BB * B`` elements, ``B = 2**LEVEL``) held as
``[BB, B]``, so a block's mean is a sum along axis 1. A *span* is a run of blocks of one row:
its whole tiles of full blocks take the unmasked tile, and only the span's last tile, which
holds the row's partial block when the last dim is not a multiple of ``B``, is masked. There is
no per-block integer division and no 2-D gather.

Layout. Where a tile starts is what decides its register layout. An even tensor's tiles start
at multiples of the tile: one contiguous run loaded as full-width vectors (4 float32 a thread),
reshaped to ``[BB, B]`` with each thread holding whole 4-element pieces of blocks. A ragged
row (5461 columns) starts at any alignment, so Triton's loads are scalar, one element per
thread each; reshaped, a block would be spread over ``B`` lanes, every per-block value
replicated over them, and the block sums made by warp shuffles (the previous ragged path:
150-255 registers, spills). Ragged tiles (``QUADS``) are therefore loaded as four column loads
``x[4q + k]`` joined with ``tl.join``, which puts the joined dimension inside a thread: each
thread again holds whole 4-element quads, as on the even path, and the block sums take the
even path's code (quads never straddle blocks: blocks start at multiples of ``B`` >= 4 within a
row, and for ``B = 2`` a quad is two whole blocks). Stores split the quads back into columns.
The column loads are scalar and strided by 4 elements, but the four of them read the same
cache lines back to back (L1), so DRAM sees each line once.

Formats. Every load and store of a parameter or of a folded state goes through
:func:`load_param` / :func:`store_param` / :func:`load_state` / :func:`store_state`, each
switched by a constexpr (``PARAM_FMT``, ``STATE_FMT``; 0 = plain float32/bf16/fp16 today). A new
state format (int8/int4 codes with scales, issue 12) or a parameter with correction bits
(issue 13) is a new branch in these functions (plus its side pointers), not a second copy of
the tile or of the loops.

Index width. The element offset of a tile is ``ebase``, added to the base pointers before the
in-tile offsets; the kernels make it int64 (``IDX64``) when a tensor has 2**31 elements or
more, so no product of a block index and ``B`` is ever formed in int32 for such tensors.

This module imports nothing from the rest of foam_compile.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Formats a tile can load and store (constexpr values).
PARAM_PLAIN = 0  # the parameter's own dtype, math in float32
PARAM_RHO8 = 1  # bfloat16/float16 + int8 correction bits (foam_compile/master_weights.py)
PARAM_RHO16 = 2  # bfloat16/float16 + int16 correction bits
STATE_FP32 = 0  # float32 folded moments
STATE_INT8 = 1  # int8/uint8 codes + a float32 scale per group (foam_compile/formats/int8.py)
STATE_INT4 = 2  # two 4-bit codes a byte + a float32 scale per group (formats/int4.py)

# The grouped formats' constants, restated (this package imports nothing from foam_compile;
# tests/kernels/test_quant_kernel.py checks they equal foam_compile.formats'): elements per
# group along the stored last dim, and the largest code of each kind (signed, square).
QGROUP = 32
QLEVELS = {STATE_INT8: (127, 255), STATE_INT4: (7, 15)}


@triton.jit
def bias_corrections(step, b1_hi, b1_lo, b2_hi, b2_lo):
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


# The launch's scalar arguments, one tuple ``hp`` in this order (built by
# :meth:`foam_compile.kernels.checks.KernelHyper.scalars`, unpacked by :func:`step_scalars`).
HP_FIELDS = (
    "lr",
    "bc1",
    "sqrt_bc2",
    "b1_hi",
    "b1_lo",
    "b2_hi",
    "b2_lo",
    "one_minus_beta1",
    "one_minus_beta2",
    "eps",
    "weight_decay",
    "scale",
    "rho",
)
# The update's constexpr switches, one tuple ``FLAGS`` in this order (built by
# :func:`foam_compile.kernels.foam_adam.flags`, unpacked by :func:`foam_tile`).
FLAG_FIELDS = ("WD_MODE", "AMSGRAD", "MAXIMIZE", "PARAM_FMT", "STATE_FMT", "STATE_SR", "BF16_RTNE")


@triton.jit
def step_scalars(lr_ptr, step_ptr, hp, LR_FROM_PTR: tl.constexpr, STEP_FROM_PTR: tl.constexpr):
    """The per-program coefficients of the update (``coef``, as :func:`foam_tile` unpacks it)
    from the launch's scalars ``hp`` (:data:`HP_FIELDS`); ``lr``/``step`` may live on device."""
    lr, bc1, sqrt_bc2, b1_hi, b1_lo, b2_hi, b2_lo, omb1, omb2, eps, weight_decay, scale, rho = hp
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
    if STEP_FROM_PTR:
        bc1, sqrt_bc2 = bias_corrections(tl.load(step_ptr), b1_hi, b1_lo, b2_hi, b2_lo)
    decay = 1.0 - lr * weight_decay
    step_size = lr * scale / bc1
    return (decay, step_size, sqrt_bc2, b1_hi, omb1, b2_hi, omb2, eps, weight_decay, rho)


@triton.jit
def _pow2(k):
    """float32 ``2**k`` for int32 ``k`` in ``[-126, 127]``, from its bits (exact)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scale(x, k):
    """``x * 2**k`` as two multiplies by normal powers of two (master_weights._scale): exact
    where the result is normal, one rounding below, and never a subnormal factor."""
    half = k >> 1  # floor(k / 2)
    return x * _pow2(half) * _pow2(k - half)


@triton.jit
def _exponent16(x32, IS_BF16: tl.constexpr):
    """``E`` of master_weights' docstring for a float32 holding a bfloat16/float16 value."""
    MIN_FIELD: tl.constexpr = 1 if IS_BF16 else 113  # 128 - bias
    field = (x32.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.maximum(field, MIN_FIELD) - 127


@triton.jit
def _round_to(x, ptr, BF16_RTNE: tl.constexpr):
    """float32 ``x`` rounded to the dtype ``ptr`` points to (nearest even)."""
    if BF16_RTNE:
        # Round to nearest even by hand: Triton's interpreter truncates float32 -> bfloat16
        # (GPUs round), which would bias every CPU-tested step toward zero.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(ptr.dtype.element_ty)
    return out


@triton.jit
def load_param(ptr, r_ptr, offs, mask, MASKED: tl.constexpr, FMT: tl.constexpr):
    """Parameter (or gradient) elements as float32. ``FMT`` 0: the tensor's own dtype; 1, 2: a
    bfloat16/float16 ``p16`` plus its int8 (``Q`` = 127) / int16 (32767) correction at
    ``r_ptr`` (foam_compile/master_weights.py): ``theta = p16 + (rho * INV_Q) * s(p16)``."""
    tl.static_assert(FMT <= 2, "unknown parameter format")
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(ptr + offs).to(tl.float32)
    if FMT != 0:
        IS_BF16: tl.constexpr = ptr.dtype.element_ty == tl.bfloat16
        M: tl.constexpr = 7 if IS_BF16 else 10
        INV_Q: tl.constexpr = 0.007874015718698502 if FMT == 1 else 3.051850947599719e-05
        if MASKED:
            rho = tl.load(r_ptr + offs, mask=mask, other=0)
        else:
            rho = tl.load(r_ptr + offs)
        c = rho.to(tl.float32) * INV_Q
        k = tl.minimum(_exponent16(x, IS_BF16) - (M + 1), 127)
        x = x + _scale(c, k)  # c * s(p16), s a power of two
    return x


@triton.jit
def store_param(
    ptr,
    r_ptr,
    offs,
    x,
    mask,
    MASKED: tl.constexpr,
    FMT: tl.constexpr,
    BF16_RTNE: tl.constexpr,
):
    """Store float32 ``x`` into the parameter. ``FMT`` 0: rounded to the tensor's own dtype;
    1, 2: ``p16`` = ``x`` rounded, and the correction of the rounding error (``split``)."""
    tl.static_assert(FMT <= 2, "unknown parameter format")
    out = _round_to(x, ptr, BF16_RTNE)
    if MASKED:
        tl.store(ptr + offs, out, mask=mask)
    else:
        tl.store(ptr + offs, out)
    if FMT != 0:
        IS_BF16: tl.constexpr = ptr.dtype.element_ty == tl.bfloat16
        M: tl.constexpr = 7 if IS_BF16 else 10
        Q: tl.constexpr = 127.0 if FMT == 1 else 32767.0
        FMAX: tl.constexpr = 3.3895313892515355e38 if IS_BF16 else 65504.0
        r = out.to(tl.float32)
        k = _exponent16(r, IS_BF16) - (M + 1)  # s = 2**k
        t = _scale(x - r, -k) * Q  # the rounding error is exact; -k <= 134: two normal factors
        rho = tl.minimum(tl.maximum(rint(t), -Q), Q)
        rho = tl.where(tl.abs(r) <= FMAX, rho, 0.0)  # p16 is inf or nan: no correction
        rho = rho.to(tl.int32).to(r_ptr.dtype.element_ty)
        if MASKED:
            tl.store(r_ptr + offs, rho, mask=mask)
        else:
            tl.store(r_ptr + offs, rho)


@triton.jit
def load_state(ptr, idx, mask, MASKED: tl.constexpr, FMT: tl.constexpr):
    """Folded moments of a tile's blocks as float32. ``FMT`` 0: float32 storage."""
    tl.static_assert(FMT == 0, "unknown state format")
    if MASKED:
        x = tl.load(ptr + idx, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + idx)
    return x.to(tl.float32)


@triton.jit
def store_state(ptr, idx, x, mask, MASKED: tl.constexpr, FMT: tl.constexpr):
    """Store a tile's folded moments. ``FMT`` 0: float32 storage."""
    tl.static_assert(FMT == 0, "unknown state format")
    if MASKED:
        tl.store(ptr + idx, x, mask=mask)
    else:
        tl.store(ptr + idx, x)


# ---------------------------------------------------------------------- grouped (int8/int4)
# The contract is foam_compile/formats/int8.py's docstring: every line one float32 operation,
# correctly rounded (div_rn, sqrt_rn), rint half to even, the group max the only reduction.
# A tile of a grouped format holds whole groups: BB is a multiple of QGROUP and tiles start at
# multiples of BB within a row, so each group's scale is made in registers.
# The largest code ``L`` (QLEVELS) is a constexpr expression where it is used, not the return of
# a jit helper: Triton 3.6 does not fold a call that returns a constexpr, so ``L: tl.constexpr =
# helper()`` wraps a runtime f32 of the caller; passed to ``_signed_t`` it is baked into the
# callee as a value of another function ("'tt.splat' op using value defined outside the
# region"), and ``-L`` runs a tensor operator outside the JIT ("Did you forget to add
# @triton.jit"). Triton 3.9 folds the call; the code is the same either way.
@triton.jit
def rint(z):
    """Round half to even (``torch.round``) from ``floor``: ``z - floor(z)`` is exact here."""
    f = tl.floor(z)
    d = z - f
    odd = f - 2.0 * tl.floor(f * 0.5)  # 1.0 for odd f, 0.0 for even
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


@triton.jit
def hash32(x):
    """:func:`foam_compile.formats.codec.hash32` in uint32 arithmetic (products wrap mod 2**32;
    constants from Chris Wellons' hash-prospector, public domain)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def uniform(idx, seed):
    """:func:`foam_compile.formats.codec.uniform`: ``idx`` the flat indices in the moment,
    ``seed`` = ``hash32(4 * step + salt)`` (uint32)."""
    h = hash32(idx.to(tl.uint32) + seed)
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _signed_t(q, L: tl.constexpr):
    y = tl.div_rn(q, L)
    return tl.div_rn(y, 2.0 - tl.abs(y))


@triton.jit
def load_moment(
    ptr,
    sc_ptr,
    at,
    n_valid,
    MASKED: tl.constexpr,
    FMT: tl.constexpr,
    SIGNED: tl.constexpr,
    LEVEL: tl.constexpr,
    BB: tl.constexpr,
):
    """A tile's folded moment as float32 ``[BB]``, decoded; ``at`` = ``(sidx, cbase, gbase)``.
    ``FMT`` 0: float32 at ``sidx``; grouped: codes from ``cbase`` (bytes), group scales from
    ``gbase``. Blocks past the tile's end decode to 0 (they add nothing to a group's max when
    the moment is stored)."""
    sidx, cbase, gbase = at
    B: tl.constexpr = 1 << LEVEL
    j = tl.arange(0, BB)
    bmask = j * B < n_valid
    if FMT == 0:
        x = load_state(ptr, sidx, bmask, MASKED, FMT)
    else:
        NG: tl.constexpr = BB // 32
        L: tl.constexpr = (127.0 if SIGNED else 255.0) if FMT == 1 else (7.0 if SIGNED else 15.0)
        gi = tl.arange(0, NG)
        if MASKED:
            s = tl.load(sc_ptr + gbase + gi, mask=gi * (32 * B) < n_valid, other=0.0)
        else:
            s = tl.load(sc_ptr + gbase + gi)
        if FMT == 1:
            if MASKED:
                q = tl.load(ptr + cbase + j, mask=bmask, other=0).to(tl.int32)
            else:
                q = tl.load(ptr + cbase + j).to(tl.int32)
        else:
            jj = tl.arange(0, BB // 2)
            if MASKED:
                byte = tl.load(ptr + cbase + jj, mask=jj * (2 * B) < n_valid, other=0)
            else:
                byte = tl.load(ptr + cbase + jj)
            byte = byte.to(tl.int32)
            q = tl.reshape(tl.join(byte & 15, byte >> 4), (BB,))  # element 2k low, 2k+1 high
            if SIGNED:
                q = q - 8
        qf = tl.reshape(q.to(tl.float32), (NG, 32))
        if SIGNED:
            xg = _signed_t(qf, L) * s[:, None]
        else:
            u = tl.div_rn(qf, L) * s[:, None]
            xg = u * u
        x = tl.reshape(xg, (BB,))
        if MASKED:
            x = tl.where(bmask, x, 0.0)
    return x


@triton.jit
def store_moment(
    ptr,
    sc_ptr,
    at,
    x,
    n_valid,
    seed,
    MASKED: tl.constexpr,
    FMT: tl.constexpr,
    SIGNED: tl.constexpr,
    SR: tl.constexpr,
    LEVEL: tl.constexpr,
    BB: tl.constexpr,
):
    """Store a tile's folded moment ``x`` (float32 ``[BB]``) at ``at`` (as :func:`load_moment`):
    encoded for a grouped format, group scales from registers, rounded to nearest or (``SR``)
    stochastically with :func:`uniform` of the moment's flat index ``sidx`` and ``seed``."""
    sidx, cbase, gbase = at
    B: tl.constexpr = 1 << LEVEL
    j = tl.arange(0, BB)
    bmask = j * B < n_valid
    if FMT == 0:
        store_state(ptr, sidx, x, bmask, MASKED, FMT)
    else:
        NG: tl.constexpr = BB // 32
        L: tl.constexpr = (127.0 if SIGNED else 255.0) if FMT == 1 else (7.0 if SIGNED else 15.0)
        xg = tl.reshape(x, (NG, 32))
        # tl.max does not propagate NaN: a group holding one takes it through a sum instead
        nan = tl.sum(tl.where(xg != xg, xg, 0.0), axis=1)
        if SIGNED:
            base = tl.abs(xg)
        else:
            base = tl.sqrt_rn(tl.maximum(xg, 0.0))
        s = tl.max(base, axis=1) + nan
        inv = tl.where(s > 0, tl.div_rn(1.0, tl.where(s > 0, s, 1.0)), 0.0)
        if SIGNED:
            t = xg * inv[:, None]
            z = tl.div_rn(t + t, 1.0 + tl.abs(t)) * L
        else:
            t = base * inv[:, None]
            z = t * L
        if SR:
            r = tl.reshape(uniform(sidx, seed), (NG, 32))
            if SIGNED:
                q0 = tl.minimum(tl.maximum(tl.floor(z), -L), L - 1.0)
                a0 = _signed_t(q0, L)
                a1 = _signed_t(q0 + 1.0, L)
                p = tl.div_rn(t - a0, a1 - a0)
            else:
                q0 = tl.minimum(tl.maximum(tl.floor(z), 0.0), L - 1.0)
                a0 = tl.div_rn(q0, L)
                a1 = tl.div_rn(q0 + 1.0, L)
                p = tl.div_rn(t * t - a0 * a0, a1 * a1 - a0 * a0)
            q = tl.where(r < p, q0 + 1.0, q0)
        else:
            q = rint(z)
        q = tl.where(q != q, 0.0, q)  # NaN (a non-finite group) stores 0, as codec._defined
        if not SIGNED:
            q = tl.where((q == 0.0) & (base > 0.0), 1.0, q)  # a positive v never decodes to 0
        gi = tl.arange(0, NG)
        if MASKED:
            tl.store(sc_ptr + gbase + gi, s, mask=gi * (32 * B) < n_valid)
        else:
            tl.store(sc_ptr + gbase + gi, s)
        qi = tl.reshape(q, (BB,)).to(tl.int32)
        if FMT == 1:
            out = qi.to(ptr.dtype.element_ty)
            if MASKED:
                tl.store(ptr + cbase + j, out, mask=bmask)
            else:
                tl.store(ptr + cbase + j, out)
        else:
            if SIGNED:
                qi = qi + 8
            lo, hi = tl.split(tl.reshape(qi, (BB // 2, 2)))
            byte = (lo | (hi << 4)).to(tl.uint8)  # past the row's end: the code of 0 (the pad)
            jj = tl.arange(0, BB // 2)
            if MASKED:
                tl.store(ptr + cbase + jj, byte, mask=jj * (2 * B) < n_valid)
            else:
                tl.store(ptr + cbase + jj, byte)


@triton.jit
def load_param_quads(ptr, r_ptr, q, n_valid, MASKED: tl.constexpr, FMT: tl.constexpr):
    """Elements ``4q .. 4q+3`` as ``[N, 2, 2]`` (element ``4q + 2a + b`` at ``[q, a, b]``), each
    quad inside one thread: four column loads joined (module docstring, "Layout")."""
    o = 4 * q
    c0 = load_param(ptr, r_ptr, o, o < n_valid, MASKED, FMT)
    c1 = load_param(ptr, r_ptr, o + 1, o + 1 < n_valid, MASKED, FMT)
    c2 = load_param(ptr, r_ptr, o + 2, o + 2 < n_valid, MASKED, FMT)
    c3 = load_param(ptr, r_ptr, o + 3, o + 3 < n_valid, MASKED, FMT)
    return tl.join(tl.join(c0, c2), tl.join(c1, c3))


@triton.jit
def store_param_quads(
    ptr, r_ptr, q, x, n_valid, MASKED: tl.constexpr, FMT: tl.constexpr, BF16_RTNE: tl.constexpr
):
    """The inverse of :func:`load_param_quads`: ``x`` is ``[N, 2, 2]``, split into columns."""
    o = 4 * q
    a, b = tl.split(x)
    c0, c2 = tl.split(a)
    c1, c3 = tl.split(b)
    store_param(ptr, r_ptr, o, c0, o < n_valid, MASKED, FMT, BF16_RTNE)
    store_param(ptr, r_ptr, o + 1, c1, o + 1 < n_valid, MASKED, FMT, BF16_RTNE)
    store_param(ptr, r_ptr, o + 2, c2, o + 2 < n_valid, MASKED, FMT, BF16_RTNE)
    store_param(ptr, r_ptr, o + 3, c3, o + 3 < n_valid, MASKED, FMT, BF16_RTNE)


@triton.jit
def foam_tile(
    ptrs,
    bases,
    seed4,
    n_valid,
    coef,
    LEVEL: tl.constexpr,
    BB: tl.constexpr,
    MASKED: tl.constexpr,
    RAGGED: tl.constexpr,
    QUADS: tl.constexpr,
    FLAGS: tl.constexpr,
):
    """FOAM (ALGORITHM.md) on ``BB`` blocks: elements ``ebase + [0, BB*B)``, states ``sbase + j``.

    ``ptrs``: the parameter, gradient, the three moments, their three scale tensors and the
    correction bits; ``bases`` = ``(ebase, sbase, cbase, gbase)``; ``coef``: what
    :func:`step_scalars` returns; ``FLAGS``: the update's switches (:data:`FLAG_FIELDS`).

    ``MASKED``: only the first ``n_valid`` elements exist (a span's last tile); otherwise all
    ``BB * B`` do and nothing is masked. ``RAGGED``: the last existing block may be partial, so
    each block's mean divides by the elements it really has (ALGORITHM.md "Folding"; the
    reference code's zero-pad-and-divide-by-B is not copied); otherwise every block is full and
    the mean is an exact multiplication by ``1/B``. ``QUADS``: the start may be unaligned (a
    ragged row); parameters and gradients go through quad columns (module docstring, "Layout").
    Grouped states (``STATE_FMT`` 1, 2): codes from ``cbase``, scales from ``gbase`` (``ms_ptr``
    ...), stochastic rounding (``STATE_SR``) seeded from ``seed4 = 4 * step`` (int64).
    """
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, ms_ptr, vs_ptr, vmaxs_ptr, r_ptr = ptrs
    ebase, sbase, cbase, gbase = bases
    decay, step_size, sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, wd, rho = coef
    # FLAG_FIELDS (indexed with an annotation: names unpacked from a tuple are not constexpr)
    WD_MODE: tl.constexpr = FLAGS[0]
    AMSGRAD: tl.constexpr = FLAGS[1]
    MAXIMIZE: tl.constexpr = FLAGS[2]
    PARAM_FMT: tl.constexpr = FLAGS[3]
    STATE_FMT: tl.constexpr = FLAGS[4]
    STATE_SR: tl.constexpr = FLAGS[5]
    BF16_RTNE: tl.constexpr = FLAGS[6]
    B: tl.constexpr = 1 << LEVEL
    e = tl.arange(0, BB * B)
    j = tl.arange(0, BB)
    offs = ebase + e
    sidx = sbase + j
    emask = e < n_valid  # dead code unless MASKED

    if QUADS:
        q = tl.arange(0, BB * B // 4)
        g = tl.reshape(load_param_quads(g_ptr + ebase, g_ptr, q, n_valid, MASKED, 0), (BB * B,))
        p = tl.reshape(
            load_param_quads(p_ptr + ebase, r_ptr + ebase, q, n_valid, MASKED, PARAM_FMT), (BB * B,)
        )
    else:
        g = load_param(g_ptr, g_ptr, offs, emask, MASKED, 0)  # gradients are plain tensors
        p = load_param(p_ptr, r_ptr, offs, emask, MASKED, PARAM_FMT)
    at = (sidx, cbase, gbase)
    m = load_moment(m_ptr, ms_ptr, at, n_valid, MASKED, STATE_FMT, True, LEVEL, BB)
    v = load_moment(v_ptr, vs_ptr, at, n_valid, MASKED, STATE_FMT, False, LEVEL, BB)
    if MAXIMIZE:
        g = -g
    if WD_MODE == 1:  # AdamW: decoupled decay first
        p = p * decay
    if WD_MODE == 2:  # Adam: L2 folded into the gradient (after maximize, as torch.optim.Adam)
        g = g + wd * p

    if LEVEL == 0:
        gb = g
        qb = g * g
    else:
        g = tl.reshape(g, (BB, B))
        p = tl.reshape(p, (BB, B))
        s1 = tl.sum(g, axis=1)
        s2 = tl.sum(g * g, axis=1)
        if MASKED and RAGGED:
            # Elements that exist in each block: B, fewer in the row's partial last block (and
            # clamped to 1 past the end, where nothing is stored).
            cnt = tl.minimum(tl.maximum(n_valid - j * B, 1), B).to(tl.float32)
            gb = tl.div_rn(s1, cnt)
            qb = tl.div_rn(s2, cnt)
        else:
            gb = s1 * (1.0 / B)  # exact: B is a power of two
            qb = s2 * (1.0 / B)

    m = beta1 * m + one_minus_beta1 * gb
    v = beta2 * v + one_minus_beta2 * qb
    seeds = tl.cast(seed4, tl.uint32)  # 4 * step mod 2**32, as codec.hash32's first mask
    store_moment(
        m_ptr, ms_ptr, at, m, n_valid, hash32(seeds + 1),
        MASKED, STATE_FMT, True, STATE_SR, LEVEL, BB,
    )  # fmt: skip
    store_moment(
        v_ptr, vs_ptr, at, v, n_valid, hash32(seeds + 2),
        MASKED, STATE_FMT, False, STATE_SR, LEVEL, BB,
    )  # fmt: skip
    if AMSGRAD:
        vmax = load_moment(vmax_ptr, vmaxs_ptr, at, n_valid, MASKED, STATE_FMT, False, LEVEL, BB)
        v_use = tl.maximum(vmax, v)
        store_moment(
            vmax_ptr, vmaxs_ptr, at, v_use, n_valid, hash32(seeds + 3),
            MASKED, STATE_FMT, False, STATE_SR, LEVEL, BB,
        )  # fmt: skip
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
    if QUADS:
        p = tl.reshape(p, (BB * B // 4, 2, 2))
        store_param_quads(p_ptr + ebase, r_ptr + ebase, q, p, n_valid, MASKED, PARAM_FMT, BF16_RTNE)
    else:
        if LEVEL > 0:
            p = tl.reshape(p, (BB * B,))
        store_param(p_ptr, r_ptr, offs, p, emask, MASKED, PARAM_FMT, BF16_RTNE)


@triton.jit
def foam_span(
    ptrs,
    starts,
    seed4,
    b0,
    b1,
    n_row,
    coef,
    LEVEL: tl.constexpr,
    BB: tl.constexpr,
    EVEN: tl.constexpr,
    FLAGS: tl.constexpr,
):
    """Blocks ``[b0, b1)`` of one row of ``n_row`` elements; ``starts`` = ``(erow, srow, crow,
    grow)``, the row's first element, state, code byte and group scale. ``ptrs``, ``coef`` and
    ``FLAGS`` as :func:`foam_tile` takes them.

    Whole tiles of full blocks run unmasked; what is left (fewer than ``BB`` full blocks and,
    for a ragged row, its partial block) is one masked tile. ``b0`` must be a multiple of ``BB``
    for the unmasked tiles to keep their alignment facts. Grouped states: ``b0`` is then a
    multiple of ``BB``, itself a multiple of the group, so every tile holds whole groups.
    """
    erow, srow, crow, grow = starts
    STATE_FMT: tl.constexpr = FLAGS[4]  # FLAG_FIELDS
    CB: tl.constexpr = 2 if STATE_FMT == 2 else 1  # blocks per code byte
    B: tl.constexpr = 1 << LEVEL
    full_end = tl.minimum(b1, n_row >> LEVEL)  # blocks before this one are full
    n_tiles = tl.maximum(full_end - b0, 0) // BB
    for k in range(0, n_tiles):
        b = tl.multiple_of(b0 + k * BB, BB)
        bases = (erow + b * B, srow + b, crow + b // CB, grow + b // 32)
        foam_tile(ptrs, bases, seed4, BB * B, coef, LEVEL, BB, False, False, not EVEN, FLAGS)
    rest = b0 + n_tiles * BB
    if rest < b1:
        bases = (erow + rest * B, srow + rest, crow + rest // CB, grow + rest // 32)
        n_valid = tl.minimum(n_row, b1 * B) - rest * B
        foam_tile(ptrs, bases, seed4, n_valid, coef, LEVEL, BB, True, not EVEN, not EVEN, FLAGS)
