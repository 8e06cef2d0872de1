"""The CPU step backend: ``torch.ops.foam.cpu_step_``, one C++ kernel call per param group.

The kernel (:mod:`foam_compile.kernels.cpu`, ``foam_step.cpp``) is shape-generic: one build
per machine serves every model, level and option, so ``torch.compile`` of a FOAM step does no
per-shape code generation for it. The op is opaque: its schema marks exactly what the kernel
writes (the parameters and the moments), it has a fake implementation, and Inductor calls it as
an extern kernel and keeps the writes in place.

It takes every CPU parameter with a float32, bfloat16, float16 (on CPUs with F16C) or float64
dtype, at any level, with every option of the reference, in the ``fp32`` state format and (not
float64) in the grouped formats ``int8``/``int4`` and their stochastic ``-sr`` variants: the
kernel decodes a group of 32 blocks, updates it and encodes it back with the codec's float32
arithmetic (:mod:`foam_compile.formats.codec`). bfloat16/float16 parameters with correction
bits (``master_weights``) are stepped as their float32 weights in the same pass
(:mod:`foam_compile.master_weights`'s codec). Inside the op, a parameter whose tensors the
kernel cannot read (a non-contiguous moment, say) runs the plain-torch update instead;
gradients with unit last stride are read in place, others copied.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import master_weights
from ..formats.grouped import GroupedFormat
from ..hyper import OP_SCHEMA_TAIL, Hyper, op_hyper, op_kwargs
from ..kernels import cpu as kernel
from ..reference import effective_level
from ..state import StateFormat, format_of, get_format
from ..update import foam_update_, moments_of
from . import step_lists

__all__ = ["DTYPES", "INCREMENTS_STEPS", "MASTER_WEIGHTS", "cpu_step_", "step_", "supports"]

#: The kernel reads and writes bfloat16/float16 weights' correction bits (``backends.select``).
MASTER_WEIGHTS = True

try:  # build (once per machine) or load now: the registry imports this module outside traces
    # The dtypes this CPU's build takes, as a constant that a traced supports() can read.
    DTYPES = tuple(d for d in kernel.DTYPES if kernel.supports_dtype(d))
except (OSError, RuntimeError) as exc:  # no compiler, a failed build: plain torch steps instead
    raise ImportError(f"the CPU step kernel is unavailable: {exc}") from exc


def _kernel_reads(fmt: StateFormat) -> bool:
    """Whether the kernel reads moments stored in ``fmt``: float, or formats/int8.py and int4.py
    exactly (the code levels and group size are compiled in)."""
    if fmt.name == "fp32":
        return True
    if not isinstance(fmt, GroupedFormat) or fmt.bits not in kernel.GROUPED:
        return False
    levels = {8: {"signed": 127, "square": 255}, 4: {"signed": 7, "square": 15}}[fmt.bits]
    return fmt.group == kernel.GROUPED[fmt.bits][0] and fmt.levels == levels


def supports(p: Tensor, g: Tensor, level: int, fmt: StateFormat, hp: Hyper) -> str | None:
    if not _kernel_reads(fmt):
        return f"the CPU kernel does not read state_format={fmt.name!r}"
    if p.dtype not in DTYPES:
        return f"the CPU kernel does not take {p.dtype} parameters on this CPU"
    if fmt.name != "fp32" and p.dtype == torch.float64:
        return (
            f"state_format={fmt.name!r} is float32 arithmetic: float64 parameters run it in "
            "plain torch"
        )
    if not p.is_contiguous():
        return "the CPU kernel takes contiguous parameters"
    if g.dtype != p.dtype or g.shape != p.shape:
        return "the CPU kernel takes gradients of the parameter's dtype and shape"
    return None


# The op increments the step counts itself (functional.foam_adam_ leaves them to it): a compiled
# FOAM step is then nothing but extern calls, with no Inductor kernel to generate or compile.
INCREMENTS_STEPS = True


def step_(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], hp: Hyper
) -> None:
    """The whole list in one op call (one kernel call, threads over all of its rows)."""
    fmts = [st.get("foam_format", "fp32") for st in states]
    grouped = [st for st, f in zip(states, fmts) if f != "fp32"]
    corrected = [master_weights.RHO_KEY in st for st in states]
    torch.ops.foam.cpu_step_(
        *step_lists(params, grads, states, hp),
        [effective_level(p.shape, st["foam_level"]) for p, st in zip(params, states)],
        fmts if grouped else [],
        [st["exp_avg_scale"] for st in grouped],
        [st["exp_avg_sq_scale"] for st in grouped],
        [st["max_exp_avg_sq_scale"] for st in grouped] if hp.amsgrad else [],
        corrected if any(corrected) else [],
        [st[master_weights.RHO_KEY] for st, c in zip(states, corrected) if c],
        **op_kwargs(hp),
    )


# The op is defined with torch.library.Library rather than torch.library.custom_op: the latter's
# Python wrapper bumps each mutated tensor's version counter one by one and checks aliasing at
# every call, which cost 10x the kernel launch for a group of 64 parameters (measured: 15.6 ms
# against 1.15 ms per call on a loaded 2-core CPU). The schema's alias annotations (a!) are the
# mutations Inductor and AOTAutograd trust; the parameters' version counters are bumped in one
# call, as an in-place torch op would.
_LIB = torch.library.Library("foam", "FRAGMENT")
_LIB.define(
    "cpu_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, int[] levels, "
    "str[] formats, Tensor(f!)[] exp_avg_scales, Tensor(g!)[] exp_avg_sq_scales, "
    "Tensor(h!)[] max_exp_avg_sq_scales, bool[] corrected, Tensor(i!)[] corrections, "
    f"{OP_SCHEMA_TAIL}) -> ()"
)


def cpu_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    levels: list[int],
    formats: list[str],
    exp_avg_scales: list[Tensor],
    exp_avg_sq_scales: list[Tensor],
    max_exp_avg_sq_scales: list[Tensor],
    corrected: list[bool],
    corrections: list[Tensor],
    lr_tensor: Tensor | None,
    **kwargs,
) -> None:
    """``foam::cpu_step_``: one FOAM step of ``params`` in place, step counts incremented first.

    ``max_exp_avg_sqs`` is empty without amsgrad; ``lr_tensor``, when given, is the learning
    rate (read once per call) and ``lr`` is ignored. ``formats``: each parameter's state format
    name (empty: all ``fp32``); the ``*_scales`` lists hold the scales of the parameters not in
    ``fp32``, in order. ``corrected``: whether each parameter has correction bits (empty: none);
    ``corrections`` holds them, in order. ``kwargs``: :data:`foam_compile.hyper.OP_KWARGS`. A
    parameter the kernel cannot read (see :func:`foam_compile.kernels.cpu.describe`) runs the
    plain-torch update.
    """
    hyper = op_hyper(lr_tensor, kwargs)
    hyper["lr"] = float(hyper["lr"])  # a tensor lr is read once per call
    amsgrad = hyper["amsgrad"]
    descs, keep, slow = [], [], []
    gi = ci = 0  # the next entries of the scale and correction lists
    for i, p in enumerate(params):
        vmax = max_exp_avg_sqs[i] if amsgrad else None
        fmt = get_format(formats[i]) if formats else None
        extra = {}
        if fmt is not None and fmt.name != "fp32":
            vs = max_exp_avg_sq_scales[gi] if amsgrad else None
            extra = dict(bits=fmt.bits, group=fmt.group, stochastic=fmt.stochastic,
                         scales=(exp_avg_scales[gi], exp_avg_sq_scales[gi], vs))  # fmt: skip
            gi += 1
        if corrected and corrected[i]:
            extra["corr"] = corrections[ci]
            ci += 1
        d = kernel.describe(
            p, grads[i], exp_avgs[i], exp_avg_sqs[i], vmax, steps[i], levels[i], **extra
        )
        if isinstance(d, str) or not d[0]:  # the kernel cannot read it, or it is empty
            slow.append((i, extra))
        else:
            descs += d[0]
            keep.append(d[1])  # a gradient copy, if one was needed, lives until the call
    kernel.run(descs, increment_steps=True, **hyper)
    for i, extra in slow:
        steps[i] += 1
        _plain_step(i, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, levels,
                    formats, extra, Hyper(level=levels[i], **hyper))  # fmt: skip
    torch.autograd.graph.increment_version(params)


def _plain_step(i, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, levels, formats,
                extra, hp: Hyper) -> None:  # fmt: skip
    """Parameter ``i`` by the plain-torch update, through its format and correction."""
    amsgrad = hp.amsgrad
    st = {"step": steps[i], "foam_level": levels[i], "exp_avg": exp_avgs[i],
          "exp_avg_sq": exp_avg_sqs[i]}  # fmt: skip
    if amsgrad:
        st["max_exp_avg_sq"] = max_exp_avg_sqs[i]
    if formats and formats[i] != "fp32":
        st["foam_format"] = formats[i]
        for key, sc in zip(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), extra["scales"]):
            if sc is not None:
                st[f"{key}_scale"] = sc
    fmt = format_of(st)
    moments = moments_of(hp)
    values = [fmt.decode(st, key, kind, params[i]) for key, kind in moments]
    m, v, vmax = (*values, None)[:3]
    rho = extra.get("corr")
    theta = params[i] if rho is None else master_weights.join(params[i], rho)
    foam_update_(theta, grads[i], m, v, vmax, steps[i], levels[i], hp)
    if rho is not None:
        master_weights.split_(theta, params[i], rho)
    for (key, kind), value in zip(moments, values):
        fmt.write_(st, key, kind, value)


def _fake(*args, **kwargs) -> None:
    return None  # writes its inputs in place, returns nothing


_LIB.impl("cpu_step_", cpu_step_, "CPU")
torch.library.register_fake("foam::cpu_step_", _fake, lib=_LIB)
