"""Optimizer families: what FOAM needs to know about each stock optimizer it can take over.

One table drives :func:`foam_compile.convert`, the ``fold_adam_states`` pass of the ``"foam"``
backend and :class:`foam_compile.FOAM`: for each family, the stock class, the state keys its step
reads (the pass finds the update in a graph by them), the moments FOAM folds, how a stock param
group's hyperparameters read (its weight-decay style), and the update that replaces the stock
step. Adam and AdamW today; another family is one :class:`Family` and one :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .functional import foam_adam_
from .hyper import Hyper
from .update import moments_of

__all__ = ["FAMILIES", "Family", "family_of", "register", "supported_names"]


@dataclass(frozen=True)
class Family:
    """One stock optimizer class and how FOAM replaces its step."""

    name: str
    stock: type[torch.optim.Optimizer]
    #: Every per-parameter state key the stock step reads or writes (the pass's seeds).
    state_keys: tuple[str, ...]
    #: The stock class's weight decay: decoupled (AdamW) or coupled L2 (Adam).
    decoupled_weight_decay: bool
    #: ``update(params, grads, states, **hyper)``: one FOAM step of a param group.
    update: Callable
    #: ``(state key, kind)`` of the moments FOAM keeps for a group with hyperparameters ``hp``.
    moments: Callable[[Hyper], tuple[tuple[str, str], ...]]
    #: ``read_hyper(group, where) -> Hyper`` for a family whose groups do not use Adam's keys
    #: (e.g. RMSprop's ``alpha``); None reads Adam's.
    read_hyper: Callable[[dict, str], Hyper] | None = None

    def hyper(self, group: dict, where: str = "FOAM") -> Hyper:
        """The hyperparameters of a param group of this family (FOAM keys default)."""
        if self.read_hyper is not None:
            return self.read_hyper(group, where)
        return Hyper.from_group(group, where, decoupled_weight_decay=self.decoupled_weight_decay)


FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    """Add a family (a subclass's family goes before its base's: see :func:`family_of`)."""
    FAMILIES[:] = [f for f in FAMILIES if f.name != family.name]
    FAMILIES.append(family)
    return family


def family_of(obj) -> Family | None:
    """The family of an optimizer (or optimizer class): the nearest stock class in its MRO."""
    cls = obj if isinstance(obj, type) else type(obj)
    by_class = {f.stock: f for f in FAMILIES}
    for base in cls.__mro__:
        if base in by_class:
            return by_class[base]
    return None


def supported_names() -> str:
    """``"torch.optim.Adam, torch.optim.AdamW"``: for error messages."""
    return ", ".join(f"torch.optim.{f.stock.__name__}" for f in FAMILIES)


_ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
register(Family("adam", torch.optim.Adam, _ADAM_KEYS, False, foam_adam_, moments_of))
register(Family("adamw", torch.optim.AdamW, _ADAM_KEYS, True, foam_adam_, moments_of))
