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

from ..hyper import Hyper, op_hyper, op_kwargs, op_signature
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
from . import step_lists

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


def kernel_supports(param: Tensor, grad: Tensor | None = None, level: int = 0) -> bool:
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
    plain = [i for i, st in enumerate(states) if "foam_format" not in st and RHO_KEY not in st]
    if len(plain) < len(states):
        plain = [i for i, st in enumerate(states) if _plain(st)]
        for i, st in enumerate(states):
            if not _plain(st):
                _one_step(params[i], grads[i], st, hp)
        params = [params[i] for i in plain]
        grads = [grads[i] for i in plain]
        states = [states[i] for i in plain]
    if not params:
        return
    torch.ops.foam.adam_step_grouped_(
        *step_lists(params, grads, states, hp),
        [st["foam_level"] for st in states],
        **op_kwargs(hp),
    )


def _plain(st: dict) -> bool:
    return format_of(st).name == "fp32" and RHO_KEY not in st


def _one_step(p, g, st, hp: Hyper) -> None:
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
        **op_kwargs(hp),
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


def _no_output(*args, **kwargs) -> None:
    """The ops' fake: they write their inputs in place and return nothing to describe."""
    return None


def _op(name: str, impl, mutates, kind=torch.library.triton_op):
    """``foam::<name>`` from ``impl``: its annotated tensor arguments and ``lr_tensor``, then the
    keyword-only :data:`foam_compile.hyper.OP_KWARGS` (the schema is inferred from the
    signature)."""
    op = kind(f"foam::{name}", op_signature(impl), mutates_args=mutates)
    op.register_fake(_no_output)
    return op


# ----------------------------------------------------------------------------- one tensor
def _adam_step_impl(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    step: float,
    step_tensor: Optional[Tensor],
    level: int,
    lr_tensor: Optional[Tensor],
    **kwargs,
) -> None:
    step = step if step_tensor is None else step_tensor
    kw = dict(step=step, level=level, **op_hyper(lr_tensor, kwargs))
    # The interpreter runs on real memory and cannot be traced: when torch.compile traces this op
    # on CPU, the plain-torch body is what it sees.
    if kernel_supports(param, grad, level) and not (is_interpreting() and is_tracing()):
        foam_adam_step_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, **kw)
    else:
        _fallback_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, **kw)


adam_step_ = _op("adam_step_", _adam_step_impl, _ONE_MUTATES)


# --------------------------------------------------------------------------- many tensors
def _adam_step_grouped_impl(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    levels: list[int],
    lr_tensor: Optional[Tensor],
    **kwargs,
) -> None:
    amsgrad = kwargs["amsgrad"]
    hp = op_hyper(lr_tensor, kwargs)
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


adam_step_grouped_ = _op(
    "adam_step_grouped_", _adam_step_grouped_impl, _GROUPED_MUTATES, kind=torch.library.custom_op
)


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
    lr_tensor: Optional[Tensor],
    **kwargs,
) -> None:
    """One parameter whose moments are in ``state_format`` and/or that carries correction bits
    ``master_rho``: every tensor a real argument (a ``triton_op``, as ``adam_step_``)."""
    fmt = get_format(state_format)
    hyper = op_hyper(lr_tensor, kwargs)
    kw = dict(step=step, level=level, master_rho=master_rho, **hyper)
    if (
        grouped_format_reason(fmt) is None
        and kernel_supports(param, grad, level)
        and not (is_interpreting() and is_tracing())
    ):
        if fmt.name == "fp32":
            foam_adam_step_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, **kw)
        else:
            codes = (exp_avg, exp_avg_scale, exp_avg_sq, exp_avg_sq_scale)  # the op's order
            amsgrad = (max_exp_avg_sq, max_exp_avg_sq_scale)
            bits = dict(bits=fmt.bits, stochastic=fmt.stochastic)
            foam_adam_quant_step_(param, grad, *codes, *amsgrad, **bits, **kw)
        return
    # Where the kernel cannot run: the plain-torch backend on the same tensors.
    state = {"step": step, "foam_level": level, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if fmt.name != "fp32":
        state.update(
            foam_format=state_format, exp_avg_scale=exp_avg_scale, exp_avg_sq_scale=exp_avg_sq_scale
        )
    if kwargs["amsgrad"]:
        state["max_exp_avg_sq"] = max_exp_avg_sq
        if fmt.name != "fp32":
            state["max_exp_avg_sq_scale"] = max_exp_avg_sq_scale
    width = None
    if master_rho is not None:
        state[RHO_KEY] = master_rho
        width = "int8" if master_rho.dtype == torch.int8 else "int16"
    from . import plain_torch

    hp = Hyper(level=level, master_weights=width, **hyper)
    plain_torch.step_([param], [grad], [state], hp)


adam_step_formats_ = _op("adam_step_formats_", _adam_step_formats_impl, _FORMATS_MUTATES)
