"""The CPU FOAM step kernel (``foam_step.cpp``) and its thin launcher.

:func:`foam_cpu_step_` steps a list of parameters in one call of the C kernel: it checks the
tensors, writes one 20-integer descriptor per parameter (addresses, ``[rows, n]``, the
gradient's row stride, level, dtype, the moments' format and scales, the correction bits) and
calls ``foam_cpu_step`` through ``ctypes``. The kernel is built on first use (:mod:`.build`:
once per machine, cached on disk) and loaded once per process. Pure kernel code: imports
nothing from the rest of foam_compile.

Why ``ctypes`` and a C ABI rather than ``torch.utils.cpp_extension``: the source includes no
torch header, so it compiles with nothing but a C++ compiler (no ninja, no pybind11, no ATen
headers), and a call costs one ``ctypes`` call plus the descriptors. The build is once per
machine but not short: every (dtype, state format, correction, level) combination is its own
template instance (about 1 CPU-minute with GCC 12; amsgrad and coupled decay are run-time flags).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from . import build as _build

__all__ = [
    "DTYPES",
    "FIELDS",
    "describe",
    "foam_cpu_step_",
    "lanes",
    "library",
    "run",
    "supports_dtype",
]

# The kernel's dtype codes (enum DType in foam_step.cpp).
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
FIELDS = 20  # int64 per descriptor (struct Desc)
ABI = 3
#: Grouped moment codes the kernel reads (formats/int8.py, int4.py): bits -> (group, dtypes of
#: the signed and the square codes). Anything else is refused.
GROUPED = {8: (32, torch.int8, torch.uint8), 4: (32, torch.uint8, torch.uint8)}
#: Correction bits (master_weights.py) the kernel reads, by dtype: the descriptor's width.
CORRECTIONS = {torch.int8: 8, torch.int16: 16}

_lib: ctypes.CDLL | None = None
_codes: frozenset[int] | None = None
_lock = threading.Lock()


def library() -> ctypes.CDLL:
    """The kernel library, built if this machine has none cached, loaded once per process."""
    global _lib
    with _lock:
        if _lib is None:
            path, _ = _build.build()
            lib = ctypes.CDLL(str(path))
            if lib.foam_cpu_abi() != ABI:
                raise RuntimeError(f"foam: {path} has ABI {lib.foam_cpu_abi()}, expected {ABI}")
            lib.foam_cpu_step.restype = ctypes.c_int
            lib.foam_cpu_step.argtypes = [
                ctypes.c_void_p,
                ctypes.c_int64,
                *[ctypes.c_double] * 7,
                *[ctypes.c_int] * 5,
            ]
            _lib = lib
    return _lib


def _supported() -> frozenset[int]:
    global _codes
    if _codes is None:
        lib = library()
        _codes = frozenset(c for c in DTYPES.values() if lib.foam_cpu_supports_dtype(c))
    return _codes


def supports_dtype(dtype: torch.dtype) -> bool:
    """Whether the kernel, as built for this CPU, takes parameters of ``dtype``."""
    return DTYPES.get(dtype) in _supported()


def lanes(dtype: torch.dtype) -> int:
    """Elements per vector in the kernel for ``dtype`` parameters."""
    return int(library().foam_cpu_lanes(DTYPES[dtype]))


def _grad_layout(g: Tensor, rows: int, n: int) -> tuple[Tensor, int]:
    """``(g, row stride)`` with ``g`` readable as ``[rows, n]`` with unit last stride: in place
    when its layout allows, else a contiguous copy."""
    if g.is_contiguous():
        return g, n
    if g.dim() >= 2 and g.stride(-1) == 1:
        try:
            return g, g.view(rows, n).stride(0)
        except RuntimeError:  # the leading dims do not collapse into one stride
            pass
    return g.contiguous(), n


_F32, _F64 = torch.float32, torch.float64


def describe(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    vmax: Tensor | None,
    step: Tensor,
    level: int,
    *,
    bits: int = 0,
    group: int = 0,
    stochastic: bool = False,
    scales: Sequence[Tensor | None] = (None, None, None),
    corr: Tensor | None = None,
) -> tuple[list[int], Tensor] | str:
    """``(descriptor, gradient the kernel reads)`` for one parameter, or why the kernel cannot
    take it. Keep the gradient alive until the kernel has run (it may be a copy).

    ``bits`` 8 or 4: the moments are grouped codes (``group`` elements a float32 scale, the
    scales in ``scales``, rounded stochastically with ``stochastic``); 0: float moments.
    ``corr``: the parameter's int8/int16 correction bits (bfloat16/float16 parameters).
    One pass of cheap attribute reads: this runs for every parameter at every step.
    """
    code = DTYPES.get(p.dtype)
    if code is None or not p.is_cpu or not p.is_contiguous() or code not in _supported():
        return "the CPU kernel takes contiguous CPU float32/bfloat16/float16/float64 parameters"
    if g.shape != p.shape or g.dtype != p.dtype or not g.is_cpu:
        return "the CPU kernel takes a CPU gradient of the parameter's shape and dtype"
    numel = p.numel()
    if numel == 0:
        return [], g
    if p.dim() < 2:
        level = 0
    if bits:
        # grouped codes follow the moment's own rows, level 0 included (groups never cross one)
        n = p.shape[-1] if p.dim() else 1
    else:
        n = p.shape[-1] if level else max(numel, 1)
    rows = numel // n
    nb = (n + (1 << level) - 1) >> level
    corr_bits = 0
    if corr is not None:
        corr_bits = CORRECTIONS.get(corr.dtype, 0)
        if not corr_bits or p.dtype not in (torch.bfloat16, torch.float16):
            return "correction bits are int8/int16 tensors of a bfloat16/float16 parameter"
        if not corr.is_cpu or not corr.is_contiguous() or corr.shape != p.shape:
            return "the correction bits are not a contiguous CPU tensor of the parameter's shape"
    reason = _check_moments(p, m, v, vmax, rows, nb, bits, group, scales)
    if reason:
        return reason
    if not step.is_cpu or step.numel() != 1 or step.dtype not in (_F32, _F64):
        return "the step count is not a one-element float32/float64 CPU tensor"
    g, g_stride = _grad_layout(g, rows, n)
    sc = [0 if s is None else s.data_ptr() for s in scales]
    return [
        p.data_ptr(),
        g.data_ptr(),
        m.data_ptr(),
        v.data_ptr(),
        0 if vmax is None else vmax.data_ptr(),
        step.data_ptr(),
        rows,
        n,
        g_stride,
        level,
        code,
        int(step.dtype == _F64),
        bits,
        int(bool(stochastic)),
        *sc,
        0 if corr is None else corr.data_ptr(),
        corr_bits,
        0,
    ], g


def _check_moments(p, m, v, vmax, rows, nb, bits, group, scales) -> str | None:
    """Why the moments cannot be read as ``[rows, nb]`` float / grouped-code moments, or None."""
    if not bits:
        state_dtype = _F64 if p.dtype == _F64 else _F32
        for s in (m, v, vmax):
            if s is None:
                continue
            if not s.is_cpu or s.dtype != state_dtype or not s.is_contiguous():
                return f"a moment is not a contiguous CPU {state_dtype} tensor"
            if s.numel() != rows * nb:
                return f"a moment has {s.numel()} elements, not the {rows * nb} blocks"
        return None
    if bits not in GROUPED or group != GROUPED[bits][0] or p.dtype == _F64:
        return f"the CPU kernel reads {sorted(GROUPED)}-bit codes in groups of 32, not float64"
    width = nb if bits == 8 else (nb + 1) // 2
    ngroups = -(-nb // group)
    for s, sc, dtype in zip((m, v, vmax), scales, GROUPED[bits][1:] + GROUPED[bits][2:]):
        if s is None:
            continue
        if not s.is_cpu or s.dtype != dtype or not s.is_contiguous() or s.numel() != rows * width:
            return f"a moment's codes are not a contiguous CPU {dtype} tensor of {rows * width}"
        if sc is None or not sc.is_cpu or sc.dtype != _F32 or not sc.is_contiguous():
            return "a moment's scales are not a contiguous CPU float32 tensor"
        if sc.numel() != rows * ngroups:
            return f"a moment has {sc.numel()} scales, not the {rows * ngroups} groups"
    return None


# The kernel's scalar arguments, in the order of foam_cpu_step()'s C signature.
_FLOAT_ARGS = ("lr", "beta1", "beta2", "eps", "weight_decay", "scale", "res_scale")
_FLAG_ARGS = ("decoupled_weight_decay", "amsgrad", "maximize")
_HYPER_ARGS = frozenset(_FLOAT_ARGS + _FLAG_ARGS)


def run(
    descs: list[int], *, increment_steps: bool = False, threads: int | None = None, **hyper
) -> None:
    """Call the kernel on concatenated descriptors (:func:`describe`; an empty parameter's is
    empty). ``hyper``: every one of ``lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``,
    ``scale``, ``res_scale``, ``decoupled_weight_decay``, ``amsgrad`` and ``maximize``. With
    ``increment_steps`` the kernel adds 1 to each step count before the step."""
    if hyper.keys() != _HYPER_ARGS:
        raise TypeError(
            f"run() takes the keyword arguments {sorted(_HYPER_ARGS)}, got {sorted(hyper)}"
        )
    if not descs:
        return
    table = (ctypes.c_int64 * len(descs))(*descs)
    bad = library().foam_cpu_step(
        ctypes.addressof(table),
        len(descs) // FIELDS,
        *(float(hyper[name]) for name in _FLOAT_ARGS),
        *(int(bool(hyper[name])) for name in _FLAG_ARGS),
        int(bool(increment_steps)),
        int(threads or torch.get_num_threads()),
    )
    if bad:
        raise ValueError(f"foam: the CPU kernel cannot take parameter descriptor {bad - 1}")


def foam_cpu_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    steps: Sequence[Tensor],
    levels: Sequence[int],
    **hyper,
) -> None:
    """One FOAM step of every parameter, in place, in one kernel call.

    Each parameter is a contiguous CPU tensor of a dtype in :data:`DTYPES`; its moments are
    contiguous, float32 (float64 for float64 parameters) and of the folded shape of
    ``levels[i]`` (0-d and 1-d parameters: level 0); ``steps[i]`` is its new step count, a
    float32/float64 tensor of one element. A gradient with unit last stride whose leading dims
    collapse is read in place; any other layout is copied first. ``hyper``: ``lr``, ``beta1``,
    ``beta2``, ``eps``, ``weight_decay``, ``decoupled_weight_decay``, ``amsgrad``,
    ``maximize``, ``scale``, ``res_scale`` and optionally ``increment_steps`` (add 1 to each
    step count first; default False) and ``threads`` (default ``torch.get_num_threads()``).
    Raises ``ValueError`` before writing anything if a parameter cannot be taken.
    """
    descs, keep = [], []
    for i, p in enumerate(params):
        vmax = max_exp_avg_sqs[i] if hyper.get("amsgrad") else None
        d = describe(p, grads[i], exp_avgs[i], exp_avg_sqs[i], vmax, steps[i], levels[i])
        if isinstance(d, str):
            raise ValueError(f"foam: parameter {i}: {d}")
        descs += d[0]
        keep.append(d[1])
    run(descs, **hyper)
    for i, p in enumerate(params):
        if hyper.get("increment_steps") and p.numel() == 0:
            steps[i] += 1
