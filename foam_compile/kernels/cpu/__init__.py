"""The CPU FOAM step kernel (``foam_step.cpp``) and its thin launcher.

:func:`foam_cpu_step_` steps a list of parameters in one call of the C kernel: it checks the
tensors, writes one 12-integer descriptor per parameter (addresses, ``[rows, n]``, the
gradient's row stride, level, dtype) and calls ``foam_cpu_step`` through ``ctypes``. The kernel
is built on first use (:mod:`.build`: once per machine, cached on disk) and loaded once per
process. Pure kernel code: imports nothing from the rest of foam_compile.

Why ``ctypes`` and a C ABI rather than ``torch.utils.cpp_extension``: the source includes no
torch header, so it compiles in seconds with nothing but a C++ compiler (no ninja, no pybind11,
no ATen headers whose parsing alone costs more than the kernel), and a call costs one
``ctypes`` call plus the descriptors.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from .build import build

__all__ = ["DTYPES", "FIELDS", "foam_cpu_step_", "lanes", "library", "supports_dtype", "why_not"]

# The kernel's dtype codes (enum DType in foam_step.cpp).
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
FIELDS = 12  # int64 per descriptor (struct Desc)
ABI = 1

_lib: ctypes.CDLL | None = None
_lock = threading.Lock()


def library() -> ctypes.CDLL:
    """The kernel library, built if this machine has none cached, loaded once per process."""
    global _lib
    with _lock:
        if _lib is None:
            path, _ = build()
            lib = ctypes.CDLL(str(path))
            if lib.foam_cpu_abi() != ABI:
                raise RuntimeError(f"foam: {path} has ABI {lib.foam_cpu_abi()}, expected {ABI}")
            lib.foam_cpu_step.restype = ctypes.c_int
            lib.foam_cpu_step.argtypes = [
                ctypes.c_void_p,
                ctypes.c_int64,
                *[ctypes.c_double] * 7,
                *[ctypes.c_int] * 4,
            ]
            _lib = lib
    return _lib


def supports_dtype(dtype: torch.dtype) -> bool:
    """Whether the kernel, as built for this CPU, takes parameters of ``dtype``."""
    code = DTYPES.get(dtype)
    return code is not None and bool(library().foam_cpu_supports_dtype(code))


def lanes(dtype: torch.dtype) -> int:
    """Elements per vector in the kernel for ``dtype`` parameters."""
    return int(library().foam_cpu_lanes(DTYPES[dtype]))


def _grad_layout(g: Tensor, rows: int, n: int) -> tuple[Tensor, int] | None:
    """``(g, row stride)`` if the kernel can read ``g`` as ``[rows, n]`` with unit last stride."""
    if g.is_contiguous():
        return g, n
    if g.dim() >= 2 and g.stride(-1) == 1:
        try:
            return g, g.view(rows, n).stride(0)
        except RuntimeError:  # the leading dims do not collapse into one stride
            return None
    return None


def why_not(
    p: Tensor, m: Tensor, v: Tensor, vmax: Tensor | None, step: Tensor, level: int
) -> str | None:
    """Why the kernel cannot step ``p`` with these moments and step count, or None."""
    if p.device.type != "cpu" or p.dtype not in DTYPES or not p.is_contiguous():
        return "the CPU kernel takes contiguous CPU float32/bfloat16/float16/float64 parameters"
    state_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    if p.dim() < 2:
        level = 0
    n = p.shape[-1] if p.dim() else 1
    blocks = p.numel() // max(n, 1) * -(-n // (1 << level))
    for name, s in (("exp_avg", m), ("exp_avg_sq", v), ("max_exp_avg_sq", vmax)):
        if s is None:
            continue
        if s.device.type != "cpu" or s.dtype != state_dtype or not s.is_contiguous():
            return f"{name} is not a contiguous CPU {state_dtype} tensor"
        if s.numel() != blocks:
            return f"{name} has {s.numel()} elements, not the {blocks} blocks of level {level}"
    if step.device.type != "cpu" or step.numel() != 1:
        return "the step count is not a one-element CPU tensor"
    if step.dtype not in (torch.float32, torch.float64):
        return f"the step count is {step.dtype}, not float32/float64"
    return None


def foam_cpu_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    steps: Sequence[Tensor],
    levels: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    scale: float,
    res_scale: float,
    threads: int | None = None,
) -> None:
    """One FOAM step of every parameter, in place, in one kernel call.

    Each parameter is a contiguous CPU tensor of a dtype in :data:`DTYPES`; its moments are
    contiguous, float32 (float64 for float64 parameters) and of the folded shape of
    ``levels[i]`` (0-d and 1-d parameters: level 0); ``steps[i]`` is its new step count, a
    float32/float64 tensor of one element. A gradient with unit last stride whose leading dims
    collapse is read in place; any other layout is copied first. ``threads`` defaults to
    ``torch.get_num_threads()``.
    """
    count = len(params)
    if count == 0:
        return
    descs = []
    keep = []  # copies of gradients the kernel cannot read in place, alive until it returns
    for i in range(count):
        p, g, level = params[i], grads[i], levels[i] if params[i].dim() >= 2 else 0
        numel = p.numel()
        if numel == 0:
            continue
        n = p.shape[-1] if level > 0 else numel
        rows = numel // n
        layout = _grad_layout(g, rows, n) if g.shape == p.shape else None
        if layout is None:
            if g.shape != p.shape:
                raise ValueError(f"foam: gradient {i} has shape {list(g.shape)}, not {p.shape}")
            keep.append(g.contiguous())
            layout = (keep[-1], n)
        g, g_stride = layout
        step = steps[i]
        vmax = max_exp_avg_sqs[i] if amsgrad else None
        why = why_not(p, exp_avgs[i], exp_avg_sqs[i], vmax, step, level)
        if why is not None:
            raise ValueError(f"foam: parameter {i}: {why}")
        descs += [
            p.data_ptr(),
            g.data_ptr(),
            exp_avgs[i].data_ptr(),
            exp_avg_sqs[i].data_ptr(),
            0 if vmax is None else vmax.data_ptr(),
            step.data_ptr(),
            rows,
            n,
            g_stride,
            level,
            DTYPES[p.dtype],
            1 if step.dtype == torch.float64 else 0,
        ]
    if not descs:
        return
    table = (ctypes.c_int64 * len(descs))(*descs)
    bad = library().foam_cpu_step(
        ctypes.addressof(table),
        len(descs) // FIELDS,
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        float(scale),
        float(res_scale),
        int(bool(decoupled_weight_decay)),
        int(bool(amsgrad)),
        int(bool(maximize)),
        int(threads or torch.get_num_threads()),
    )
    if bad:
        raise ValueError(f"foam: the CPU kernel cannot take parameter descriptor {bad - 1}")
    del keep
