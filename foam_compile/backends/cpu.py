"""The CPU step backend: ``torch.ops.foam.cpu_step_``, one C++ kernel call per param group.

The kernel (:mod:`foam_compile.kernels.cpu`, ``foam_step.cpp``) is shape-generic: one build
per machine serves every model, level and option, so ``torch.compile`` of a FOAM step does no
per-shape code generation for it. The op is opaque: its schema marks exactly what the kernel
writes (the parameters and the moments), it has a fake implementation, and Inductor calls it as
an extern kernel and keeps the writes in place.

It takes every CPU parameter in the ``fp32`` state format with a float32, bfloat16, float16 (on
CPUs with F16C) or float64 dtype, at any level, with every option of the reference. Inside the
op, a parameter whose tensors the kernel cannot read (a non-contiguous moment, say) runs the
plain-torch update instead; gradients with unit last stride are read in place, others copied.
"""

# ruff: noqa: UP045 - the op's signature mirrors its schema (Optional[Tensor]).
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ..hyper import Hyper
from ..kernels import cpu as kernel
from ..reference import effective_level
from ..state import StateFormat
from ..update import foam_update_

__all__ = ["DTYPES", "INCREMENTS_STEPS", "cpu_step_", "step_", "supports"]

try:  # build (once per machine) or load now: the registry imports this module outside traces
    # The dtypes this CPU's build takes, as a constant that a traced supports() can read.
    DTYPES = tuple(d for d in kernel.DTYPES if kernel.supports_dtype(d))
except (OSError, RuntimeError) as exc:  # no compiler, a failed build: plain torch steps instead
    raise ImportError(f"the CPU step kernel is unavailable: {exc}") from exc


def supports(p: Tensor, g: Tensor, level: int, fmt: StateFormat, hp: Hyper) -> str | None:
    if fmt.name != "fp32":
        return f"the CPU kernel does not read state_format={fmt.name!r} yet"
    if p.dtype not in DTYPES:
        return f"the CPU kernel does not take {p.dtype} parameters on this CPU"
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
    lr_tensor = hp.lr if isinstance(hp.lr, Tensor) else None
    torch.ops.foam.cpu_step_(
        list(params),
        list(grads),
        [st["exp_avg"] for st in states],
        [st["exp_avg_sq"] for st in states],
        [st["max_exp_avg_sq"] for st in states] if hp.amsgrad else [],
        [st["step"] for st in states],
        [effective_level(p.shape, st["foam_level"]) for p, st in zip(params, states)],
        0.0 if lr_tensor is not None else float(hp.lr),
        lr_tensor,
        hp.beta1,
        hp.beta2,
        hp.eps,
        hp.weight_decay,
        hp.decoupled_weight_decay,
        hp.amsgrad,
        hp.maximize,
        hp.scale,
        hp.res_scale,
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
    "float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, "
    "bool decoupled_weight_decay, bool amsgrad, bool maximize, float scale, float res_scale) -> ()"
)


def cpu_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
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
    """``foam::cpu_step_``: one FOAM step of ``params`` in place, step counts incremented first.

    ``max_exp_avg_sqs`` is empty without amsgrad; ``lr_tensor``, when given, is the learning
    rate (read once per call) and ``lr`` is ignored. A parameter the kernel cannot read (see
    :func:`foam_compile.kernels.cpu.describe`) runs the plain-torch update.
    """
    hyper = dict(
        lr=float(lr_tensor) if lr_tensor is not None else lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        scale=scale,
        res_scale=res_scale,
    )
    descs, keep, slow = [], [], []
    for i, p in enumerate(params):
        vmax = max_exp_avg_sqs[i] if amsgrad else None
        d = kernel.describe(p, grads[i], exp_avgs[i], exp_avg_sqs[i], vmax, steps[i], levels[i])
        if isinstance(d, str) or not d[0]:  # the kernel cannot read it, or it is empty
            slow.append(i)
        else:
            descs += d[0]
            keep.append(d[1])  # a gradient copy, if one was needed, lives until the call
    kernel.run(descs, increment_steps=True, **hyper)
    for i in slow:
        steps[i] += 1
        hp = Hyper(level=levels[i], **hyper)
        vmax = max_exp_avg_sqs[i] if amsgrad else None
        foam_update_(
            params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], vmax, steps[i], levels[i], hp
        )
    torch.autograd.graph.increment_version(params)


def _fake(*args) -> None:
    return None  # writes its inputs in place, returns nothing


_LIB.impl("cpu_step_", cpu_step_, "CPU")
torch.library.register_fake("foam::cpu_step_", _fake, lib=_LIB)
