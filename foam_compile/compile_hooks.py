"""Dynamo compile-start and compile-end callbacks of the ``"foam"`` backend.

* **Resuming a FOAM checkpoint in an unchanged script**: a stock AdamW that loaded folded state
  would be traced by Dynamo with its stock step and fail on the folded shapes before any backend
  runs. Dynamo runs start callbacks before it traces a frame; there we convert such optimizers,
  so the trace sees FOAM's step. Installed when :mod:`foam_compile.dynamo_backend` is imported,
  which the entry point does when ``backend="foam"`` is looked up.
* **Tensor learning rates**: see :func:`make_lrs_tensors_after_this_compile`.
"""

from __future__ import annotations

import logging
import weakref

import torch

from .convert import convert, stock_name
from .discovery import live_optimizers
from .families import family_of
from .guard import folded_state_problem, mark_refused
from .optimizer import FOAM
from .tensor_lr import make_lrs_tensors

__all__ = [
    "convert_stock_optimizers_holding_folded_state",
    "install",
    "make_lrs_tensors_after_this_compile",
]

log = logging.getLogger("foam_compile")


# Dynamo builds the guards of a graph from the live objects *after* the backend returns, so the
# backend must not turn a float lr into a tensor while it compiles (a float guard would meet a
# tensor). It does so when the compile ends: the next call fails the lr guard once and traces a
# tensor lr, and from then on a scheduler's in-place update of the tensor recompiles nothing.
_TENSOR_LR_PENDING: weakref.WeakSet = weakref.WeakSet()


def make_lrs_tensors_after_this_compile(optimizers) -> None:
    """Turn the float lrs of ``optimizers`` into 0-d tensors when the current compile ends
    (their schedulers keep reporting floats: :mod:`foam_compile.tensor_lr`)."""
    from torch._dynamo.callback import callback_handler

    _TENSOR_LR_PENDING.update(optimizers)

    @torch.compiler.disable
    def once(*_args):
        _make_lrs_tensors()
        if once in callback_handler.end_callbacks:
            callback_handler.end_callbacks.remove(once)

    callback_handler.register_end_callback(once)


def _make_lrs_tensors() -> None:
    for opt in list(_TENSOR_LR_PENDING):
        make_lrs_tensors(opt)
        _TENSOR_LR_PENDING.discard(opt)


@torch.compiler.disable  # runs inside Dynamo's callback lock: Dynamo must not trace it
def on_compile_start(*_args) -> None:
    convert_stock_optimizers_holding_folded_state()


def convert_stock_optimizers_holding_folded_state() -> list[torch.optim.Optimizer]:
    """Convert every live stock optimizer of a known family whose state is FOAM's (folded).

    One whose folded state does not fit its parameters (a checkpoint of another model) is left
    as it is and marked: its step then raises the guard's error outside the graph, naming the
    parameter (an exception raised here would reach the user wrapped in Dynamo's internal
    error).
    """
    converted = []
    for opt in live_optimizers():
        if isinstance(opt, FOAM) or family_of(opt) is None:
            continue
        if any("foam_level" in st for st in opt.state.values()):
            if folded_state_problem(opt) is not None:
                mark_refused(opt)
                continue
            levels = {p: st["foam_level"] for p, st in opt.state.items() if "foam_level" in st}
            convert(opt, levels=levels)  # group options come from the loaded param groups
            log.warning(
                "foam: a %s held FOAM's folded state (a FOAM checkpoint loaded into a stock "
                "optimizer); converted it to FOAM before tracing.",
                stock_name(opt),
            )
            converted.append(opt)
    return converted


def install() -> None:
    """Register :func:`on_compile_start` with Dynamo (again after ``torch._dynamo.reset()``)."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:  # pragma: no cover - older torch: the unchanged-script rescue is off
        return
    if on_compile_start not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(on_compile_start)
