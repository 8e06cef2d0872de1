"""Triton kernels for the FOAM step (ALGORITHM.md), their launchers and torch ops.

* :func:`foam_adam_step_` - one parameter, one launch (the kernel behind ``torch.ops.foam.adam_step_``).
* :func:`foam_adam_grouped_` - a list of parameters in a handful of launches (grouped by dtype and
  level; behind ``torch.ops.foam.adam_step_grouped_``).
* ``torch.ops.foam.adam_step_`` / ``torch.ops.foam.adam_step_grouped_`` (:mod:`.ops`) - the same
  steps as torch ops, safe under torch.compile, with a plain-torch path wherever the kernel
  cannot run.

Importing this package never fails for want of triton: the launchers are then ``None`` and
:func:`available` is False; the ops still work through their plain-torch path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import HAS_TRITON, adam_step_, adam_step_grouped_, kernel_supports

if HAS_TRITON:
    from .foam_adam import MAX_LEVEL, foam_adam_grouped_, foam_adam_step_, is_interpreting
else:  # pragma: no cover - exercised only where triton is missing
    MAX_LEVEL = -1
    foam_adam_step_ = None
    foam_adam_grouped_ = None

    def is_interpreting() -> bool:
        return False


__all__ = [
    "HAS_TRITON",
    "MAX_LEVEL",
    "OPS",
    "adam_step_",
    "adam_step_grouped_",
    "available",
    "foam_adam_grouped_",
    "foam_adam_step_",
    "is_interpreting",
    "kernel_supports",
]

# The torch ops this package registers (namespace "foam").
OPS = ("foam::adam_step_", "foam::adam_step_grouped_")


def available(
    params: Sequence[torch.Tensor] | None = None,
    grads: Sequence[torch.Tensor] | None = None,
    levels: Sequence[int] | None = None,
) -> bool:
    """Whether the Triton launchers can run here and, given tensors, on all of them.

    Without arguments: triton imports and there is a CUDA device (or ``TRITON_INTERPRET=1``).
    With ``params`` (and optionally ``grads``/``levels``): each parameter is on CUDA (or CPU when
    interpreting), float32/bfloat16/float16, contiguous, at a level the kernel supports.
    """
    if not HAS_TRITON:
        return False
    if params is None:
        return is_interpreting() or torch.cuda.is_available()
    for i, p in enumerate(params):
        grad = grads[i] if grads is not None else None
        level = levels[i] if levels is not None else 0
        if not kernel_supports(p, grad, level if p.dim() >= 2 else 0):
            return False
    return True
