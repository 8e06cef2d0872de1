"""The FOAM step as torch ops: ``torch.ops.foam.adam_step_`` and ``torch.ops.foam.adam_step_grouped_``.

Why two ops, built differently (the rule Inductor relies on is that an op's declared mutations
are the truth):

* ``foam::adam_step_`` (one parameter) is a ``torch.library.triton_op``. Under torch.compile it is
  decomposed into its body, so Inductor sees the user kernel, reads its TTIR and learns which
  arguments it stores to. That analysis is only right because ``_foam_adam_kernel`` takes every
  tensor as a real argument.
* ``foam::adam_step_grouped_`` (a whole group, a handful of launches) is an opaque
  ``torch.library.custom_op``. Its kernel stores through a table of ``data_ptr()``s, which
  Inductor's TTIR analysis cannot follow (it would think nothing is written and could reorder or
  drop the step). Opaque, the op's ``mutates_args`` are what Inductor trusts; they name exactly the
  written lists.

Both ops run everywhere. On CUDA (or on CPU under ``TRITON_INTERPRET=1``) with float32/bfloat16/
float16 tensors they launch the Triton kernels; otherwise (no triton, CPU, float64, level above
the kernel's ``MAX_LEVEL``) they run :func:`_adam_step_torch`, the same math in plain torch. Where
triton is not importable, ``foam::adam_step_`` is a plain ``custom_op`` with the same schema.

Arguments as :func:`foam_compile.kernels.foam_adam.foam_adam_step_`, with ``lr``/``step`` split
into a number and an optional tensor (a tensor, when given, wins): op schemas have no
"float or Tensor". Under torch.compile pass ``step_tensor`` on the parameters' device (a CPU step
would be read with ``.item()``, which cannot be traced).
"""

# ruff: noqa: UP045 - the op signatures keep typing.Optional: torch.library's schema inference
# reads these annotations at runtime, and Optional[Tensor] is the spelling every torch >= 2.11
# understands.
import logging
import math
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

try:
    from .foam_adam import (
        MAX_LEVEL,
        SUPPORTED_DTYPES,
        _tracing,
        foam_adam_grouped_,
        foam_adam_step_,
        is_interpreting,
    )

    HAS_TRITON = True
except Exception as exc:  # no triton, or one that cannot load here: the torch path only
    log.debug("foam_compile.kernels: Triton kernels unavailable (%s)", exc)
    HAS_TRITON = False
    MAX_LEVEL = -1
    SUPPORTED_DTYPES = ()

    def is_interpreting() -> bool:
        return False

    def _tracing() -> bool:
        return False


__all__ = ["HAS_TRITON", "adam_step_", "adam_step_grouped_", "kernel_supports"]

_ONE_MUTATES = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_GROUPED_MUTATES = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def kernel_supports(param: Tensor, grad: Optional[Tensor] = None, level: int = 0) -> bool:
    """Whether the Triton kernel can take this parameter (device, dtypes, layout, level)."""
    if not HAS_TRITON:
        return False
    device_ok = param.device.type == "cuda" or (param.device.type == "cpu" and is_interpreting())
    tensors = (param,) if grad is None else (param, grad)
    return (
        device_ok
        and all(t.dtype in SUPPORTED_DTYPES and t.is_contiguous() for t in tensors)
        and 0 <= level <= MAX_LEVEL
    )


# ------------------------------------------------------------------------ plain-torch path
def _adam_step_torch(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, step, lr, beta1,
                     beta2, eps, weight_decay, level, decoupled_weight_decay, amsgrad, maximize,
                     scale, res_scale) -> None:
    """ALGORITHM.md in plain torch for one parameter (``step``/``lr``: numbers or 0-d tensors).

    The fallback when the kernel cannot run; float32 math (float64 for float64 parameters).
    """
    level = level if param.dim() >= 2 else 0
    compute = torch.float64 if param.dtype == torch.float64 else torch.float32
    g = grad.to(compute)
    if maximize:
        g = -g
    w = param.to(compute)
    if not decoupled_weight_decay and weight_decay != 0:
        g = g + weight_decay * w
    if decoupled_weight_decay and weight_decay != 0:
        w = w * (1 - lr * weight_decay)
    if level == 0:
        gb, qb, r = g, g * g, None
    else:
        n, block = param.shape[-1], 1 << level
        nb = -(-n // block)
        pad = nb * block - n
        blocks = torch.nn.functional.pad(g, (0, pad)).unflatten(-1, (nb, block))
        counts = torch.full((nb,), float(block), dtype=compute, device=param.device)
        counts[-1] = block - pad  # the partial last block averages its own elements only
        gb = blocks.sum(-1) / counts
        qb = (blocks * blocks).sum(-1) / counts
        r = g - gb.repeat_interleave(block, dim=-1)[..., :n]
    m = exp_avg.to(compute) * beta1 + gb * (1 - beta1)
    v = exp_avg_sq.to(compute) * beta2 + qb * (1 - beta2)
    v_use = torch.maximum(max_exp_avg_sq.to(compute), v) if amsgrad else v
    if r is None:
        big_m, big_v = m, v_use
    else:
        n = param.shape[-1]
        big_m = m.repeat_interleave(1 << level, dim=-1)[..., :n] + res_scale * r
        big_v = v_use.repeat_interleave(1 << level, dim=-1)[..., :n] + res_scale**2 * r * r
    alpha = scale if level > 0 else 1.0
    if isinstance(step, Tensor):
        step = step.to(device=param.device, dtype=torch.float64)
        bc1 = 1 - beta1**step
        sqrt_bc2 = (1 - beta2**step).sqrt()
    else:
        bc1 = 1 - beta1**step
        sqrt_bc2 = math.sqrt(1 - beta2**step)
    w = w - (lr * alpha / bc1) * (big_m / (big_v.sqrt() / sqrt_bc2 + eps))
    param.copy_(w)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if amsgrad:
        max_exp_avg_sq.copy_(v_use)


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
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, level=level,
        decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize,
        scale=scale, res_scale=res_scale,
    )
    # The interpreter runs on real memory and cannot be traced: when torch.compile traces this op
    # on CPU, the plain-torch body is what it sees.
    if kernel_supports(param, grad, level) and not (is_interpreting() and _tracing()):
        foam_adam_step_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, **kw)
    else:
        _adam_step_torch(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, **kw)


def _adam_step_fake(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, step_tensor, lr,
                    lr_tensor, beta1, beta2, eps, weight_decay, level, decoupled_weight_decay,
                    amsgrad, maximize, scale, res_scale) -> None:
    # Mutates in place, returns nothing: there is no output to describe.
    return None


if HAS_TRITON and hasattr(torch.library, "triton_op"):
    adam_step_ = torch.library.triton_op(
        "foam::adam_step_", _adam_step_impl, mutates_args=_ONE_MUTATES
    )
else:
    adam_step_ = torch.library.custom_op(
        "foam::adam_step_", _adam_step_impl, mutates_args=_ONE_MUTATES
    )
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
    hp = dict(
        lr=lr if lr_tensor is None else lr_tensor, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=amsgrad, maximize=maximize, scale=scale, res_scale=res_scale,
    )
    fast, slow = [], []
    for i, p in enumerate(params):
        (fast if kernel_supports(p, grads[i], levels[i]) else slow).append(i)
    if fast:
        def pick(seq):
            return [seq[i] for i in fast]

        foam_adam_grouped_(
            pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
            pick(max_exp_avg_sqs) if amsgrad else None, pick(state_steps), pick(levels), **hp,
        )
    for i in slow:
        _adam_step_torch(
            params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
            max_exp_avg_sqs[i] if amsgrad else None, step=state_steps[i], level=levels[i], **hp,
        )


def _adam_step_grouped_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                            levels, lr, lr_tensor, beta1, beta2, eps, weight_decay,
                            decoupled_weight_decay, amsgrad, maximize, scale, res_scale) -> None:
    return None


adam_step_grouped_ = torch.library.custom_op(
    "foam::adam_step_grouped_", _adam_step_grouped_impl, mutates_args=_GROUPED_MUTATES
)
adam_step_grouped_.register_fake(_adam_step_grouped_fake)
