"""``foam_adam_``: one FOAM step over a param group, the entry every path calls.

The optimizer's ``step``, the graphs the ``"foam"`` backend rewrites and the tests call this one
function. It checks the hyperparameters once (:class:`~foam_compile.hyper.Hyper`), takes the
local shards of ``DTensor`` parameters, increments the step counters, asks the backend registry
(:mod:`foam_compile.backends`) which step backend takes each parameter, and runs each backend
once on its share of the group. A backend whose module sets ``INCREMENTS_STEPS = True``
increments its parameters' step counts itself (in its kernel, so that a compiled step has no
separate kernel for them); the others get them incremented here first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import backends
from .distributed import local_states
from .hyper import Hyper
from .master_weights import check_states

__all__ = ["foam_adam_"]


@torch.no_grad()
def foam_adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    hp: Hyper | None = None,
    **hyper,
) -> None:
    """One FOAM step over a group of parameters, in place.

    ``states[i]`` is parameter ``i``'s state: ``step`` (a tensor, incremented here),
    ``foam_level`` (the level it runs at) and its moments (``exp_avg``, ``exp_avg_sq``, and
    ``max_exp_avg_sq`` with amsgrad) in the folded shape, stored in the state format named by
    ``foam_format`` (``fp32`` when absent), and ``master_rho`` for a bfloat16/float16 parameter
    stepped with ``master_weights``. The hyperparameters come as ``hp`` or as the fields
    of :class:`~foam_compile.hyper.Hyper` by name (``lr`` may be a tensor), which is how the
    graphs rewritten by the ``"foam"`` backend call it.
    """
    hp = Hyper(**hyper) if hp is None else hp
    if not params:
        return
    check_states(params, states, hp.master_weights)  # the backends trust hp about corrections
    params, grads, states = local_states(params, grads, states)  # the math is per shard
    for backend, idx in backends.plan(params, grads, states, hp):
        if not getattr(backend, "INCREMENTS_STEPS", False):
            _increment([states[i]["step"] for i in idx])
        backend.step_(
            [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx], hp
        )


def _increment(steps: list[Tensor]) -> None:
    if all(s.device == steps[0].device for s in steps):
        torch._foreach_add_(steps, 1)
    else:
        for s in steps:
            s += 1
