"""Tensor learning rates that a compiled step reads without recompiling, and logs that still
get floats.

Dynamo guards on a float ``lr``: every scheduler step would recompile FOAM's step (until
Dynamo's recompile limit, then it runs eagerly). A 0-d tensor ``lr`` is read as a graph input
instead; torch's schedulers write it in place (``lr_scheduler._update_param_group_val``:
``fill_``), so nothing recompiles. But torch's schedulers then report tensors too
(``get_last_lr()`` returns ``group["lr"].clone()``), and a training script that logs
``json.dumps(sched.get_last_lr())`` breaks on a change it never asked for.

So when FOAM makes an lr a tensor (the ``"foam"`` backend by default, ``convert(tensor_lr=True)``)
it also makes the schedulers already attached to that optimizer report Python floats again:
each gets a subclass of its own class whose ``get_last_lr`` returns floats (``isinstance`` and
``state_dict`` are unchanged; the instance stays the same object). A scheduler created after the
conversion sees a tensor lr, as with any tensor lr in torch. ``param_group["lr"]`` itself is the
tensor: read it with ``float(...)``.
"""

from __future__ import annotations

import gc

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

__all__ = ["float_lrs", "make_lrs_tensors", "schedulers_of"]

_FLOAT_CLASSES: dict[type, type] = {}


def float_lrs(values) -> list:
    """``values`` with every one-element tensor as a Python float."""
    return [v.item() if isinstance(v, Tensor) and v.numel() == 1 else v for v in values]


def _float_class(cls: type) -> type:
    """``cls`` with ``get_last_lr`` returning floats (cached, and picklable by name)."""
    if getattr(cls, "_foam_float_lr", False):
        return cls
    if cls not in _FLOAT_CLASSES:
        name = f"FloatLR{cls.__name__}"

        def get_last_lr(self):
            return float_lrs(cls.get_last_lr(self))

        get_last_lr.__doc__ = "The last learning rates, as Python floats (FOAM's tensor lr)."
        new = type(
            name,
            (cls,),
            {"__module__": __name__, "get_last_lr": get_last_lr, "_foam_float_lr": True},
        )
        globals()[name] = new
        _FLOAT_CLASSES[cls] = new
    return _FLOAT_CLASSES[cls]


def schedulers_of(opt: torch.optim.Optimizer) -> list:
    """The live LR schedulers stepping ``opt`` (one heap scan)."""
    kinds = (LRScheduler, ReduceLROnPlateau)
    return [
        o
        for o in gc.get_objects()
        if issubclass(type(o), kinds) and getattr(o, "optimizer", None) is opt
    ]


def make_lrs_tensors(opt: torch.optim.Optimizer) -> None:
    """Turn ``opt``'s float lrs into 0-d float32 tensors; its schedulers keep reporting floats."""
    changed = False
    for group in opt.param_groups:
        if not isinstance(group["lr"], Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
            changed = True
    if changed:
        for sched in schedulers_of(opt):
            sched.__class__ = _float_class(type(sched))
