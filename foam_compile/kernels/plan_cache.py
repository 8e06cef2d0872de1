"""The grouped launcher's plans, cached by the metadata of a call's tensors.

A *plan* (groups, shape-only tables, configs) is a function of every fact the launcher's checks
read: shapes, dtypes, devices, contiguity, levels and how step counters are passed. Nothing is
trusted between steps, so each call must show that its facts are a cached plan's. Two ways:

* the key (:func:`call_key`): every fact as one flat tuple, read in Python (~0.7 us a tensor);
  the dict it indexes holds every plan;
* the guard: once a plan exists, Dynamo's C++ tensor check (``TensorGuards``, the check its
  compiled graphs run on every call: Python type, dispatch keys, dtype, device, sizes, strides,
  requires_grad) compares the call's tensors to the plan's in ~0.12 us a tensor. A call's
  recent plan is found by a hint (its state list's first tensor and length), and the guard
  decides; a miss falls back to the key. Equal sizes and strides to tensors that passed the
  checks mean contiguous tensors that pass them too. ``TensorGuards`` is private: where it
  is missing or behaves differently (checked on the plan's own tensors), the key alone is used.

Plans whose tables a captured CUDA graph reads are never evicted.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable

import torch
from torch import Tensor

from . import plans

try:
    from torch._C._dynamo.guards import TensorGuards
except ImportError:  # pragma: no cover - a torch without Dynamo's guards: keys only
    TensorGuards = None

CACHE_SIZE = 16

_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_CONTIG = Tensor.is_contiguous
_STEP_META = operator.attrgetter("device", "dtype", "shape")
_FLOAT32 = {torch.float32}
_INT = {int}
_ONE = {1}

_plans: dict = {}  # key -> plan
_hints: dict = {}  # (len(states), amsgrad, id(states[0])) -> plan: where the guard looks first
_clock = itertools.count()


def _steps_key(steps) -> tuple:
    """What the checks read of the step counters: their kinds, devices, dtypes and sizes (a few
    sets when they are all tensors alike, as an optimizer passes them)."""
    types = set(map(type, steps))
    if len(types) == 1 and issubclass(next(iter(types)), Tensor):
        devices = set(map(_DEVICE, steps))
        dtypes = set(map(_DTYPE, steps))
        if len(devices) == 1 and len(dtypes) == 1 and set(map(Tensor.numel, steps)) == _ONE:
            return (*types, *devices, *dtypes)
    return (None, *(_STEP_META(s) if isinstance(s, Tensor) else type(s) for s in steps))


def call_key(params, grads, states: tuple, steps, levels, amsgrad: bool):
    """Every fact the checks read, as one flat hashable tuple, or ``None`` when the full checks
    must run (an input is not a tensor, or a fact the checks always reject: tensors on several
    devices, a non-contiguous one, a state not float32; the checks then name it). Facts shared
    by all tensors are reduced before they enter the key, so hashing it stays cheap."""
    try:
        tensors = (*params, *grads, *states)
        devices = set(map(_DEVICE, tensors))  # not get_device(): -1 for CPU and meta alike
        if (
            set(map(type, levels)) != _INT  # a bool or a float level is refused by the checks
            or len(devices) != 1
            or not all(map(_CONTIG, tensors))
            or set(map(_DTYPE, states)) != _FLOAT32
        ):
            return None
        return (
            amsgrad,
            *devices,
            *levels,
            *map(_DTYPE, params),
            *map(_DTYPE, grads),
            *map(_SHAPE, tensors),
            *_steps_key(steps),
        )
    except (AttributeError, TypeError):
        return None


def _guard(tensors: tuple):
    """A ``TensorGuards`` that passes exactly these tensors' metadata, or ``None``."""
    if TensorGuards is None:
        return None
    try:
        guard = TensorGuards(
            *tensors,
            dynamic_dims_sizes=[list(t.shape) for t in tensors],  # all static
            dynamic_dims_strides=[list(t.stride()) for t in tensors],
        )
        return guard if guard.check(*tensors) else None
    except Exception:  # another torch's signature or semantics: keys only
        return None


def lookup(params, grads, states: tuple, steps, levels, amsgrad: bool, build: Callable, device):
    """The plan for this call: the guard's, else the key's, else ``build()`` (then cached)."""
    hint = (len(states), amsgrad, id(states[0]))
    plan = _hints.get(hint)
    if (
        plan is not None
        and plan.guard is not None
        and plan.levels == tuple(levels)
        and plan.guard.check(*params, *grads, *states, *steps)
        and set(map(type, levels)) == _INT
    ):
        plan.last_use = next(_clock)
        return plan
    key = call_key(params, grads, states, steps, levels, amsgrad)
    plan = _plans.get(key) if key is not None else None
    if plan is None:
        plan = _new_plan(key, build, device)
        plan.levels = tuple(levels)
        tensors = (*params, *grads, *states, *steps)
        # A key means int levels; the guard checks tensors only, so steps must all be tensors.
        plan.guard = _guard(tensors) if key is not None and plan.all_step_tensors else None
    else:
        plan.last_use = next(_clock)
    if plan.guard is not None:
        _hints.pop(hint, None)  # re-inserted last: the oldest hints go first
        _hints[hint] = plan
        if len(_hints) > 4 * CACHE_SIZE:
            del _hints[next(iter(_hints))]
    return plan


def _new_plan(key, build: Callable, device):
    if plans.capturing(device):
        raise RuntimeError(
            "foam_adam_grouped_: a new set of parameters (shapes, dtypes or levels) cannot be "
            "prepared while a CUDA graph is being captured; run one step eagerly before "
            "capturing (torch.compile's mode='reduce-overhead' does that by itself)"
        )
    plan = build()
    plan.last_use = next(_clock)
    if key is not None:
        _plans[key] = plan
        # Drop the least recently used plan, never one whose tables a captured graph reads.
        evictable = [k for k, v in _plans.items() if not any(g.captured() for g in v.groups)]
        if len(_plans) > CACHE_SIZE and evictable:
            victim = _plans.pop(min(evictable, key=lambda k: _plans[k].last_use))
            for hint in [h for h, p in _hints.items() if p is victim]:
                del _hints[hint]
    return plan


def cached() -> list:
    """The cached plans, oldest first."""
    return list(_plans.values())


def clear() -> None:
    _plans.clear()
    _hints.clear()
