"""bf16/fp16 weights plus error-correction bits instead of a float32 master copy.

A low-precision parameter ``p16`` (bfloat16 or float16) carries, in ``optimizer.state[p]``
under :data:`RHO_KEY`, a per-element signed correction ``rho`` (int8 or int16, the parameter's
shape, sharded like it) so that the optimizer's float32 weight is

    theta = float32(p16) + (rho / Q) * s        Q = 127 (int8) or 32767 (int16)

where ``s`` is half a unit in the last place of ``p16``: the largest error of rounding a value to
``p16``'s format. The forward and backward read ``p16`` only; every step reconstructs ``theta``
(:func:`join`), runs the FOAM update in float32, and stores ``theta`` again (:func:`split`).
The scheme is FlashOptim's (arXiv 2602.23349, "error-correction bits"; its public code computes
the scale in ``_compute_ecc_bits``); this module is written from that description, with the
arithmetic pinned down below so that fused kernels reproduce it.

Precision: ``p16`` keeps 8 significant bits (bfloat16) or 11 (float16); ``rho`` cuts the
rounding error into ``2 Q + 1`` levels, so one split-and-join errs by at most ``s / (2 Q)``
(plus one float32 rounding): relative ``2**-8 / 254 ~ 2**-16`` for bfloat16 + int8 ("24-bit"
weights: 16 + 8 stored bits) and ``2**-8 / 65534 ~ 2**-24`` for bfloat16 + int16 ("32-bit", as
fine as float32's own rounding). Each step rounds once, so over many steps the errors add up
as any master copy's do (a float32 master's at ``2**-24`` per step).

The exact arithmetic (all float32 with round-to-nearest-even; a kernel that follows it matches
:func:`split` and :func:`join` bit for bit). ``M``, ``BIAS`` = mantissa bits and exponent bias of
the 16-bit format (bfloat16: 7, 127; float16: 10, 15)::

    E(p16)  = biased exponent field of p16, raised to 1 for zero and subnormals (they share the
              smallest normal's spacing), minus BIAS             (all-ones field: inf/nan)
    s(p16)  = 2 ** (E - M - 1)                 a power of two, built from its bits, exact; for
              bfloat16 zero and subnormals 2**-134, a float32 subnormal (flushing: see below)
    split(theta):
        p16 = round_to_nearest_even(theta)     the ordinary cast (the reference writes it as
                                               rint(theta * 2**-k) * 2**k, 2**k = 2 s at
                                               theta's binade)
        d   = theta - float32(p16)             exact (a rounding error is representable)
        q   = d * 2**-(E - M - 1)              exact (|q| <= 1), as two multiplies by normal
                                               powers of two: 2**134 does not exist in
                                               float32, and a divide by a subnormal s is
                                               flushed or approximate on some GPUs
        rho = clamp(rint(q * Q), -Q, Q)        q * Q rounded to float32 first, then rint (ties
                                               to even); 0 where p16 is inf or nan
    join(p16, rho):
        c     = float32(rho) * INV_Q           INV_Q = float32(1 / Q), a multiply (not a divide)
        theta = float32(p16) + c * s(p16)      c * s is exact for |p16| >= 2**-111 (bfloat16;
                                               always for float16), so a fused multiply-add
                                               gives the same bits there; below it (bfloat16
                                               values under 4e-34) the reference rounds c * s
                                               first and a fused kernel may differ by 2**-149.

No step divides or scales by a subnormal: a device that flushes float32 subnormals to zero
gets the same bits for weights above ``2**-100`` and, below, a zero correction (never inf or
nan). The tests run the codec with ``torch.set_flush_denormal(True)`` to hold that.

Float32 and float64 parameters are their own master weights: they carry no correction whatever
the option says. :func:`full_precision_state_dict` exports the reconstructed float32 weights.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from . import distributed

__all__ = [
    "LOW_PRECISION",
    "OPTIONS",
    "RHO_KEY",
    "check_option",
    "check_states",
    "full_precision_state_dict",
    "half_ulp",
    "join",
    "load_full_precision_state_dict",
    "quantize",
    "reconcile_",
    "split",
    "split_",
    "uses_correction",
]

#: The state key of a parameter's correction.
RHO_KEY = "master_rho"
#: ``master_weights=`` choices: the correction's dtype and its largest magnitude ``Q``.
OPTIONS: dict[str, tuple[torch.dtype, int]] = {
    "int8": (torch.int8, 127),
    "int16": (torch.int16, 32767),
}
_WIDTH_OF = {dtype: name for name, (dtype, _q) in OPTIONS.items()}
#: Parameter dtypes that take a correction: (mantissa bits, exponent bits, exponent bias).
LOW_PRECISION: dict[torch.dtype, tuple[int, int, int]] = {
    torch.bfloat16: (7, 8, 127),
    torch.float16: (10, 5, 15),
}


def _f32(x: float) -> float:
    """``x`` rounded to float32 (as a Python float holding that float32's value)."""
    return struct.unpack("f", struct.pack("f", x))[0]


#: ``float32(1 / Q)``: :func:`join` multiplies by it (a correctly rounded product everywhere;
#: a float32 divide is approximate by default in some kernel languages).
INV_Q = {q: _f32(1.0 / q) for _dtype, q in OPTIONS.values()}


def check_option(value, where: str = "FOAM") -> str | None:
    """``master_weights`` as given: ``None``, ``"int8"`` or ``"int16"``; raises otherwise."""
    if value is None or (isinstance(value, str) and value in OPTIONS):
        return value
    raise ValueError(
        f"{where}: invalid master_weights={value!r}; use None (the parameters are the weights), "
        "'int8' (bf16/fp16 weights + 8 correction bits: 24-bit precision) or 'int16' (+16 bits: "
        "as precise as a float32 master)"
    )


def uses_correction(p: Tensor, option: str | None) -> bool:
    """Whether a parameter of ``p``'s dtype carries a correction under ``option``."""
    return option is not None and p.dtype in LOW_PRECISION


# ------------------------------------------------------------------------------ the codec
def _pow2(k: Tensor) -> Tensor:
    """float32 ``2**k`` for int32 ``k`` in ``[-149, 127]``, from its bits (exact)."""
    normal = torch.bitwise_left_shift((k + 127).clamp(min=1), 23)  # the exponent field
    subnormal = torch.bitwise_left_shift(torch.ones_like(k), (k + 149).clamp(0, 22))
    return torch.where(k >= -126, normal, subnormal).view(torch.float32)


def _scale(x: Tensor, k: Tensor) -> Tensor:
    """``x * 2**k`` for int32 ``k`` in ``[-252, 254]``: two multiplies by normal powers of two,
    each exact (no divide, no subnormal factor: a GPU that flushes subnormals or divides
    approximately still gets the same bits for normal operands)."""
    half = torch.div(k, 2, rounding_mode="floor")
    return x * _pow2(half) * _pow2(k - half)


def _exponent(x32: Tensor, dtype: torch.dtype) -> Tensor:
    """``E`` of a float32 ``x32`` read in ``dtype``'s binades (int32): floor(log2|x|), raised to
    ``dtype``'s smallest normal exponent for zero and subnormals; 128 for inf and nan."""
    _mant, _exp_bits, bias = LOW_PRECISION[dtype]
    field = torch.bitwise_and(torch.bitwise_right_shift(x32.view(torch.int32), 23), 0xFF)
    return field.clamp(min=1).clamp(min=128 - bias) - 127


def _half_ulp32(x32: Tensor, dtype: torch.dtype) -> Tensor:
    """``s`` of a float32 holding a ``dtype`` value: ``2**(E - M - 1)`` (inf/nan: any value)."""
    mant = LOW_PRECISION[dtype][0]
    return _pow2((_exponent(x32, dtype) - (mant + 1)).clamp(max=127))


def half_ulp(p16: Tensor) -> Tensor:
    """``s(p16)`` of the module docstring, as float32 (exact): half the spacing of ``p16``'s
    values at ``|p16|`` (upwards); zero and subnormals share the smallest normal's spacing."""
    return _half_ulp32(p16.to(torch.float32), p16.dtype)


def _round16(theta: Tensor, dtype: torch.dtype) -> Tensor:
    """``theta`` (float32) rounded to nearest-even in ``dtype``, kept in float32 (exact).

    ``rint(theta * 2**-k) * 2**k`` with ``2**k`` the spacing at ``theta``'s binade: the same bits
    as the cast (ties go to the even integer, i.e. the even mantissa; a carry into the next binade
    lands on its power of two; past the largest value it gives inf once cast). Written out
    because Inductor drops a narrowing cast inside a fused kernel (``emulate_precision_casts``
    is off by default), which would leave ``d = 0`` below.
    """
    k = _exponent(theta, dtype) - LOW_PRECISION[dtype][0]  # the spacing is 2**k
    return torch.where(torch.isfinite(theta), _scale(torch.round(_scale(theta, -k)), k), theta)


def _quantize32(theta: Tensor, r: Tensor, dtype: torch.dtype, width: str) -> Tensor:
    """``rho`` for float32 ``theta`` and ``r``, its rounding to ``dtype`` held in float32."""
    int_dtype, q = OPTIONS[width]
    k = _exponent(r, dtype) - (LOW_PRECISION[dtype][0] + 1)  # s = 2**k
    t = _scale(theta - r, -k) * float(q)
    rho = torch.round(t).clamp(-q, q)  # torch.round: ties to even
    finite = r.abs() <= torch.finfo(dtype).max  # p16 is inf or nan otherwise
    return torch.where(finite, rho, torch.zeros_like(rho)).to(int_dtype)


def quantize(theta: Tensor, p16: Tensor, width: str) -> Tensor:
    """``rho`` for float ``theta`` and ``p16``, its rounding to a 16-bit dtype, as ``width``."""
    return _quantize32(theta.to(torch.float32), p16.to(torch.float32), p16.dtype, width)


def split(theta: Tensor, dtype: torch.dtype = torch.bfloat16, width: str = "int8"):
    """``(p16, rho)``: float ``theta`` as a ``dtype`` value plus a ``width`` correction."""
    if dtype not in LOW_PRECISION:
        raise ValueError(f"split: dtype must be one of {list(LOW_PRECISION)}, got {dtype}")
    check_option(width, "split")
    theta = theta.to(torch.float32)
    r = _round16(theta, dtype)
    return r.to(dtype), _quantize32(theta, r, dtype, width)


def join(p16: Tensor, rho: Tensor) -> Tensor:
    """The float32 weight that ``p16`` and its correction ``rho`` stand for."""
    q = OPTIONS[_WIDTH_OF[rho.dtype]][1]
    c = rho.to(torch.float32) * INV_Q[q]
    return p16.to(torch.float32) + c * half_ulp(p16)


def split_(theta: Tensor, p16: Tensor, rho: Tensor) -> None:
    """Store float32 ``theta`` into the existing ``p16`` and ``rho``, in place."""
    theta = theta.to(torch.float32)
    r = _round16(theta, p16.dtype)
    p16.copy_(r)  # exact: r is a p16 value
    rho.copy_(_quantize32(theta, r, p16.dtype, _WIDTH_OF[rho.dtype]))


# ------------------------------------------------------------------------- optimizer state
def _zeros_like_param(p: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero correction shaped and placed like ``p`` (a DTensor with its placements)."""
    return distributed.zeros_folded(p, 0, dtype)


def reconcile_(p: Tensor, state: dict, option: str | None, what: str) -> None:
    """Make ``state``'s correction agree with ``option`` for parameter ``p``, in place.

    A missing correction starts at zero (``theta = p`` exactly: a fresh state, a checkpoint
    saved without one, or the option switched on mid-run); one of the other width is re-coded
    (``p`` is kept); with the option off, a correction is dropped (``p`` already is
    ``theta`` rounded). A correction on a float32/float64 parameter is refused: it has no
    meaning there.
    """
    rho = state.get(RHO_KEY)
    if rho is not None:
        check_rho(p, rho, "FOAM", what)
    if rho is not None and p.dtype not in LOW_PRECISION:
        raise RuntimeError(
            f"FOAM: {what} has correction bits ({RHO_KEY!r}) but is {p.dtype}; they belong to "
            "bfloat16/float16 weights. Load the weights at the dtype they were saved in, or "
            "export float32 weights with foam_compile.master_weights.full_precision_state_dict."
        )
    if not uses_correction(p, option):
        state.pop(RHO_KEY, None)
        return
    want = OPTIONS[option][0]
    if rho is None:
        state[RHO_KEY] = _zeros_like_param(p, want)
    elif rho.dtype != want:
        with torch.no_grad():
            theta = join(distributed.local(p), distributed.local(rho))
            new = _zeros_like_param(p, want)
            distributed.local(new).copy_(quantize(theta, distributed.local(p), option))
        state[RHO_KEY] = new


def check_rho(p: Tensor, rho, where: str, what: str) -> None:
    """Raise a ``ValueError`` unless ``rho`` can be ``p``'s correction (checkpoint loads)."""
    if not isinstance(rho, Tensor) or rho.dtype not in _WIDTH_OF:
        got = rho.dtype if isinstance(rho, Tensor) else type(rho).__name__
        raise ValueError(
            f"{where}: {RHO_KEY!r} of {what} is {got}; a correction is an int8 or int16 tensor"
        )
    if tuple(rho.shape) != tuple(p.shape):
        raise ValueError(
            f"{where}: {RHO_KEY!r} of {what} has shape {list(rho.shape)}, expected "
            f"{list(p.shape)} (the parameter's). Was the checkpoint saved for a different model?"
        )


def check_states(params: Sequence[Tensor], states: Sequence[dict], option: str | None) -> None:
    """Raise unless each state's correction is the one ``option`` gives its parameter.

    ``FOAM`` reconciles its state before stepping; this guards direct callers of
    :func:`foam_compile.functional.foam_adam_`, whose step backends read ``option`` to know
    whether a parameter carries a correction.
    """
    for i, (p, st) in enumerate(zip(params, states)):
        rho = st.get(RHO_KEY)
        have = None if rho is None else _WIDTH_OF.get(rho.dtype, str(rho.dtype))
        want = option if uses_correction(p, option) else None
        if have != want:
            raise ValueError(
                f"foam_adam_: parameter {i} (shape {list(p.shape)}, {p.dtype}) has correction "
                f"{have!r} in its state but master_weights={option!r} asks for {want!r}; pass "
                "the master_weights its state was made with (FOAM does this itself)."
            )


# ------------------------------------------------------------------------------- export
def _named(model) -> Iterable[tuple[str, Tensor]]:
    return model.named_parameters() if hasattr(model, "named_parameters") else model.items()


def full_precision_state_dict(model, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """``model``'s parameters as float32 tensors, with their corrections applied.

    ``model`` is a module (or a ``{name: parameter}`` dict). Parameters with correction bits
    in ``optimizer`` give ``join(p, rho)``; the others are cast to float32 (float64 ones stay
    float64). ``DTensor`` parameters give ``DTensor`` results placed like them.
    """
    out = {}
    for name, p in _named(model):
        rho = optimizer.state.get(p, {}).get(RHO_KEY)
        with torch.no_grad():
            if rho is None:
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                out[name] = p.detach().to(dtype).clone()
                continue
            theta = join(distributed.local(p.detach()), distributed.local(rho))
            if distributed.is_dtensor(p):
                full = distributed.zeros_folded(p, 0, torch.float32)
                distributed.local(full).copy_(theta)
                theta = full
            out[name] = theta
    return out


def load_full_precision_state_dict(
    model, optimizer: torch.optim.Optimizer, state_dict: dict[str, Tensor]
) -> None:
    """Set ``model``'s weights from float32 ``state_dict`` (e.g. a float32 checkpoint).

    Low-precision parameters with a correction in ``optimizer`` (created by a step, or by
    ``reconcile_``) get ``split(theta)``: the rounded value and the correction, so no
    precision is lost up to the correction's own; the others get ``theta`` cast to their dtype.
    Every name and shape is checked before anything is written.
    """
    named = dict(_named(model))
    missing = sorted(set(named) - set(state_dict))
    if missing:
        raise KeyError(f"load_full_precision_state_dict: no value for {missing}")
    for name, p in named.items():
        if tuple(state_dict[name].shape) != tuple(p.shape):
            raise ValueError(
                f"load_full_precision_state_dict: {name!r} has shape "
                f"{list(state_dict[name].shape)}, the parameter {list(p.shape)}"
            )
    with torch.no_grad():
        for name, p in named.items():
            value = distributed.like_param(state_dict[name].detach(), p)
            theta = distributed.local(value).to(torch.float32)
            rho = optimizer.state.get(p, {}).get(RHO_KEY)
            if rho is None:
                distributed.local(p).copy_(theta)
            else:
                split_(theta, distributed.local(p), distributed.local(rho))
