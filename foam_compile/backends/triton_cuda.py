"""The Triton step backend (CUDA): the fused kernels as torch ops.

Why the ops are built differently (the rule Inductor relies on is that an op's declared mutations
are the truth):

* ``foam::adam_step_`` (one parameter) is a ``torch.library.triton_op``. Under torch.compile it is
  decomposed into its body, so Inductor sees the user kernel, reads its TTIR and learns which
  arguments it stores to. That analysis is only right because the kernel takes every tensor as
  a real argument.
* ``foam::adam_step_grouped_`` (a whole group, a handful of launches) is an opaque
  ``torch.library.custom_op``. Its kernel stores through a table of ``data_ptr()``s, which
  Inductor's TTIR analysis cannot follow (it would think nothing is written and could reorder or
  drop the step). Opaque, the op's ``mutates_args`` are what Inductor trusts; they name exactly the
  written lists.
* ``foam::adam_step_formats_`` (one parameter whose moments are int8/int4 codes, nearest or
  stochastic, and/or that carries master-weight correction bits) is a ``triton_op`` like
  ``adam_step_``: codes, group scales and ``master_rho`` are real arguments, decoded, stepped
  and re-encoded in the kernel's one pass (``kernels/tile.py``, "Formats").

The backend steps a group through ``adam_step_grouped_``, and each parameter with grouped codes
or correction bits through ``adam_step_formats_``. Step counters are incremented once
per step, by the one ``torch._foreach_add_`` in :func:`foam_compile.functional.foam_adam_`; the
kernel reads device counters where they live (a column of its pointer table), so a capturable
step (``capturable=True``, steps on the device) does no host read, no gather and no copy: it can
be captured by ``torch.compile(mode="reduce-overhead")`` once an eager step has built the
kernel's tables (cudagraph trees run eager warm-up steps first). The ops also run where the kernel
cannot (CPU without ``TRITON_INTERPRET=1``, float64, a level above the kernel's ``MAX_LEVEL``):
there they run the one plain-torch update (:mod:`foam_compile.update`). ``lr``/``step`` are
split into a number and an optional tensor (a tensor, when given, wins): op schemas have no
"float or Tensor". Importing this module imports Triton; the registry does so only when a CUDA
parameter is seen.
"""

# ruff: noqa: UP045 - the op signatures keep typing.Optional: torch.library's schema inference
# reads these annotations at runtime, and Optional[Tensor] is the spelling every torch >= 2.11
# understands.
import operator
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ..hyper import Hyper, op_scalars
from ..kernels.foam_adam import (
    MAX_LEVEL,
    SUPPORTED_DTYPES,
    foam_adam_grouped_,
    foam_adam_quant_step_,
    foam_adam_step_,
    is_interpreting,
    is_tracing,
)
from ..kernels.tile import QGROUP, QLEVELS, STATE_INT4, STATE_INT8
from ..master_weights import RHO_KEY
from ..state import StateFormat, format_of, get_format
from ..update import foam_update_

#: This backend steps parameters with correction bits (``backends.select``): its kernels read and
#: write ``master_rho`` in the step's pass (tests/kernels/test_master_kernel.py).
MASTER_WEIGHTS = True

__all__ = [
    "adam_step_",
    "adam_step_grouped_",
    "adam_step_formats_",
    "kernel_supports",
    "step_",
    "supports",
]

_DTYPE = operator.attrgetter("dtype")
_ONE_MUTATES = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_GROUPED_MUTATES = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def kernel_supports(param: Tensor, grad: Optional[Tensor] = None, level: int = 0) -> bool:
    """Whether the Triton kernel can take this parameter (device, dtypes, layout, level)."""
    device_ok = param.device.type == "cuda" or (param.device.type == "cpu" and is_interpreting())
    tensors = (param,) if grad is None else (param, grad)
    return (
        device_ok
        and all(t.dtype in SUPPORTED_DTYPES and t.is_contiguous() for t in tensors)
        and 0 <= level <= MAX_LEVEL
    )


def grouped_format_reason(fmt: StateFormat) -> str | None:
    """``None`` if the kernel reads ``fmt``: float32, or a grouped format whose group and code
    levels are the ones the kernel restates (:mod:`foam_compile.kernels.tile`)."""
    if fmt.name == "fp32":
        return None
    bits = getattr(fmt, "bits", None)
    want = {8: QLEVELS[STATE_INT8], 4: QLEVELS[STATE_INT4]}.get(bits)
    levels = getattr(fmt, "levels", {})
    if (
        want is None
        or getattr(fmt, "group", None) != QGROUP
        or (levels.get("signed"), levels.get("square")) != want
    ):
        return f"the Triton kernel does not read state_format={fmt.name!r}"
    return None


def supports(p: Tensor, g: Tensor, level: int, fmt: StateFormat, hp: Hyper) -> str | None:
    reason = grouped_format_reason(fmt)
    if reason is not None:
        return reason
    if not kernel_supports(p, g, level):
        return (
            f"the Triton kernel takes contiguous float32/bfloat16/float16 tensors at levels "
            f"0..{MAX_LEVEL} (got {p.dtype}, level {level})"
        )
    return None


def step_(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], hp: Hyper
) -> None:
    """One grouped launch per (dtype, level) for the float32 states; one launch per parameter
    whose moments are grouped codes or that carries correction bits
    (``foam::adam_step_formats_``)."""
    lr_tensor = hp.lr if isinstance(hp.lr, Tensor) else None
    lr_value = float(hp.lr) if lr_tensor is None else 0.0
    plain = [i for i, st in enumerate(states) if "foam_format" not in st and RHO_KEY not in st]
    if len(plain) < len(states):
        plain = [i for i, st in enumerate(states) if _plain(st)]
        for i, st in enumerate(states):
            if not _plain(st):
                _one_step(params[i], grads[i], st, lr_value, lr_tensor, hp)
        params = [params[i] for i in plain]
        grads = [grads[i] for i in plain]
        states = [states[i] for i in plain]
    if not params:
        return
    torch.ops.foam.adam_step_grouped_(
        list(params),
        list(grads),
        [st["exp_avg"] for st in states],
        [st["exp_avg_sq"] for st in states],
        [st["max_exp_avg_sq"] for st in states] if hp.amsgrad else [],
        [st["step"] for st in states],
        [st["foam_level"] for st in states],
        lr_value,
        lr_tensor,
        **op_scalars(hp),
    )


def _plain(st: dict) -> bool:
    return format_of(st).name == "fp32" and RHO_KEY not in st


def _one_step(p, g, st, lr_value, lr_tensor, hp: Hyper) -> None:
    """``foam::adam_step_formats_``: one parameter with grouped codes or correction bits."""
    fmt = format_of(st)
    ams = hp.amsgrad
    side = fmt.name != "fp32"
    torch.ops.foam.adam_step_formats_(
        p,
        g,
        st["exp_avg"],
        st["exp_avg_scale"] if side else None,
        st["exp_avg_sq"],
        st["exp_avg_sq_scale"] if side else None,
        st["max_exp_avg_sq"] if ams else None,
        st["max_exp_avg_sq_scale"] if ams and side else None,
        st.get(RHO_KEY),
        fmt.name,
        st["step"],
        st["foam_level"],
        lr_value,
        lr_tensor,
        **op_scalars(hp),
    )


def _split_supported(params, grads, levels) -> tuple[list[int], list[int]]:
    """``(indices the kernel takes, the others)``. One pass over each list's metadata decides the
    common case (all taken) without a Python call per parameter: host time matters at a few
    hundred parameters per step."""
    dtypes = set(map(_DTYPE, params)) | set(map(_DTYPE, grads))
    devices = {p.device.type for p in params}
    if (
        dtypes <= set(SUPPORTED_DTYPES)
        and (devices == {"cuda"} or (devices == {"cpu"} and is_interpreting()))
        and all(map(Tensor.is_contiguous, params))
        and all(map(Tensor.is_contiguous, grads))
        and all(isinstance(lv, int) and 0 <= lv <= MAX_LEVEL for lv in levels)
    ):
        return list(range(len(params))), []
    fast, slow = [], []
    for i, p in enumerate(params):
        (fast if kernel_supports(p, grads[i], levels[i]) else slow).append(i)
    return fast, slow


def _fallback_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, step, level, lr, **hyper):
    """Where the kernel cannot run: the plain-torch update."""
    hp = Hyper(lr=lr, level=level, **hyper)
    foam_update_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, level, hp)


# ----------------------------------------------------------------------------- one tensor
def _adam_step_impl(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    step: float,
    step_tensor: Optional[Tensor],
    lr: float,
    lr_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    level: int,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    scale: float,
    res_scale: float,
) -> None:
    kw = dict(
        step=step if step_tensor is None else step_tensor,
        lr=lr if lr_tensor is None else lr_tensor,
        level=level,
        **op_scalars(locals()),
    )
    # The interpreter runs on real memory and cannot be traced: when torch.compile traces this op
    # on CPU, the plain-torch body is what it sees.
    if kernel_supports(param, grad, level) and not (is_interpreting() and is_tracing()):
        foam_adam_step_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, **kw)
    else:
        _fallback_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, **kw)


def _adam_step_fake(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    step,
    step_tensor,
    lr,
    lr_tensor,
    beta1,
    beta2,
    eps,
    weight_decay,
    level,
    decoupled_weight_decay,
    amsgrad,
    maximize,
    scale,
    res_scale,
) -> None:
    # Mutates in place, returns nothing: there is no output to describe.
    return None


adam_step_ = torch.library.triton_op("foam::adam_step_", _adam_step_impl, mutates_args=_ONE_MUTATES)
adam_step_.register_fake(_adam_step_fake)


# --------------------------------------------------------------------------- many tensors
def _adam_step_grouped_impl(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    levels: list[int],
    lr: float,
    lr_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    scale: float,
    res_scale: float,
) -> None:
    hp = dict(lr=lr if lr_tensor is None else lr_tensor, **op_scalars(locals()))
    fast, slow = _split_supported(params, grads, levels)
    if len(fast) == len(params):  # the common case: the lists go to the kernel as they are
        foam_adam_grouped_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs if amsgrad else None,
            state_steps,
            levels,
            **hp,
        )
        return
    if fast:

        def pick(seq):
            return [seq[i] for i in fast]

        foam_adam_grouped_(
            pick(params),
            pick(grads),
            pick(exp_avgs),
            pick(exp_avg_sqs),
            pick(max_exp_avg_sqs) if amsgrad else None,
            pick(state_steps),
            pick(levels),
            **hp,
        )
    for i in slow:
        _fallback_(
            params[i],
            grads[i],
            exp_avgs[i],
            exp_avg_sqs[i],
            max_exp_avg_sqs[i] if amsgrad else None,
            step=state_steps[i],
            level=levels[i],
            **hp,
        )


def _adam_step_grouped_fake(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    levels,
    lr,
    lr_tensor,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled_weight_decay,
    amsgrad,
    maximize,
    scale,
    res_scale,
) -> None:
    return None


adam_step_grouped_ = torch.library.custom_op(
    "foam::adam_step_grouped_", _adam_step_grouped_impl, mutates_args=_GROUPED_MUTATES
)
adam_step_grouped_.register_fake(_adam_step_grouped_fake)


# ------------------------------------------------- grouped formats (int8/int4), correction bits
_FORMATS_MUTATES = (
    "param",
    "exp_avg",
    "exp_avg_scale",
    "exp_avg_sq",
    "exp_avg_sq_scale",
    "max_exp_avg_sq",
    "max_exp_avg_sq_scale",
    "master_rho",
)


def _adam_step_formats_impl(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_scale: Optional[Tensor],
    exp_avg_sq: Tensor,
    exp_avg_sq_scale: Optional[Tensor],
    max_exp_avg_sq: Optional[Tensor],
    max_exp_avg_sq_scale: Optional[Tensor],
    master_rho: Optional[Tensor],
    state_format: str,
    step: Tensor,
    level: int,
    lr: float,
    lr_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    scale: float,
    res_scale: float,
) -> None:
    """One parameter whose moments are in ``state_format`` and/or that carries correction bits
    ``master_rho``: every tensor a real argument (a ``triton_op``, as ``adam_step_``)."""
    hyper = op_scalars(locals())
    fmt = get_format(state_format)
    lr_any = lr if lr_tensor is None else lr_tensor
    kw = dict(lr=lr_any, step=step, level=level, master_rho=master_rho, **hyper)
    if (
        grouped_format_reason(fmt) is None
        and kernel_supports(param, grad, level)
        and not (is_interpreting() and is_tracing())
    ):
        if fmt.name == "fp32":
            foam_adam_step_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, **kw)
        else:
            foam_adam_quant_step_(
                param,
                grad,
                exp_avg,
                exp_avg_scale,
                exp_avg_sq,
                exp_avg_sq_scale,
                max_exp_avg_sq,
                max_exp_avg_sq_scale,
                bits=fmt.bits,
                stochastic=fmt.stochastic,
                **kw,
            )
        return
    # Where the kernel cannot run: the plain-torch backend on the same tensors.
    state = {"step": step, "foam_level": level, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if fmt.name != "fp32":
        state.update(
            foam_format=state_format, exp_avg_scale=exp_avg_scale, exp_avg_sq_scale=exp_avg_sq_scale
        )
    if amsgrad:
        state["max_exp_avg_sq"] = max_exp_avg_sq
        if fmt.name != "fp32":
            state["max_exp_avg_sq_scale"] = max_exp_avg_sq_scale
    width = None
    if master_rho is not None:
        state[RHO_KEY] = master_rho
        width = "int8" if master_rho.dtype == torch.int8 else "int16"
    from . import plain_torch

    hp = Hyper(lr=lr_any, level=level, master_weights=width, **hyper)
    plain_torch.step_([param], [grad], [state], hp)


def _adam_step_formats_fake(*args, **kwargs) -> None:
    return None


adam_step_formats_ = torch.library.triton_op(
    "foam::adam_step_formats_", _adam_step_formats_impl, mutates_args=_FORMATS_MUTATES
)
adam_step_formats_.register_fake(_adam_step_formats_fake)
