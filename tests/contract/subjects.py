"""The three optimizers every contract test runs against, and the oracle each is held to.

- ``foam0``: ``FOAM(level=0)``, which must equal ``torch.optim.AdamW`` (``Adam`` with
  ``decoupled_weight_decay=False``): its oracle is the stock class on twin parameters, and the
  float64 model at level 0.
- ``foam2``: ``FOAM(level=2)``: the float64 model of docs/algorithm.md at level 2.
- ``convert``: ``foam_compile.convert(torch.optim.AdamW(...))`` (level 2 by default): the same
  float64 model.

Constructor kwargs are torch's own (``torch_inputs``); the flags FOAM has no use for
(``foreach``, ``fused``, ``differentiable``, ``capturable`` on the CPU) are dropped on the way in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from float64_model import Hyper, ParamModel, param_tolerance
from torch import nn

import foam_compile
from foam_compile import FOAM

#: torch's implementation flags: FOAM has one step per device (README, "Contracts FOAM does not
#: share"), so it takes none of them.
IMPL_FLAGS = ("foreach", "fused", "differentiable", "capturable")


def foam_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in IMPL_FLAGS}


@dataclass(frozen=True)
class Subject:
    name: str
    level: int
    build_fn: Callable

    def build(self, params, stock=torch.optim.AdamW, **kwargs) -> torch.optim.Optimizer:
        return self.build_fn(params, stock, foam_kwargs(kwargs))

    def __repr__(self) -> str:
        return self.name


def _foam(level):
    def build(params, stock, kwargs):
        coupled = stock is torch.optim.Adam
        kwargs = dict(kwargs)
        if coupled:
            kwargs.setdefault("weight_decay", 0.0)  # Adam's default, not AdamW's 1e-2
        return FOAM(params, level=level, decoupled_weight_decay=not coupled, **kwargs)

    return build


def _convert(params, stock, kwargs):
    return foam_compile.convert(stock(params, **kwargs))


SUBJECTS = [
    Subject("foam0", 0, _foam(0)),
    Subject("foam2", 2, _foam(2)),
    Subject("convert", 2, _convert),
]


def hyper_of(kwargs: dict, stock=torch.optim.AdamW) -> Hyper:
    """The float64 model's hyperparameters for torch-style ``kwargs`` (tensors read as floats)."""
    number = lambda x: float(x.item()) if torch.is_tensor(x) else float(x)  # noqa: E731
    coupled = stock is torch.optim.Adam
    betas = kwargs.get("betas", (0.9, 0.999))
    return Hyper(
        lr=number(kwargs.get("lr", 1e-3)),
        betas=(number(betas[0]), number(betas[1])),
        eps=number(kwargs.get("eps", 1e-8)),
        weight_decay=number(kwargs.get("weight_decay", 0.0 if coupled else 1e-2)),
        amsgrad=bool(kwargs.get("amsgrad", False)),
        maximize=bool(kwargs.get("maximize", False)),
        decoupled_weight_decay=not coupled,
    )


class Oracle:
    """What ``subject`` must compute for ``params``: a float64 model per parameter (and, at
    level 0, torch's own optimizer on twin parameters)."""

    def __init__(self, subject: Subject, params, kwargs: dict, stock=torch.optim.AdamW):
        self.hp = hyper_of(kwargs, stock)
        self.models = [ParamModel.create(p, subject.level) for p in params]
        self.twins, self.stock = None, None
        if subject.level == 0:
            self.twins = [nn.Parameter(p.detach().clone()) for p in params]
            stock_kwargs = {k: v for k, v in kwargs.items() if k != "capturable"}
            self.stock = stock(self.twins, **copy.deepcopy(stock_kwargs))

    def step(self, grads) -> None:
        for model, g in zip(self.models, grads):
            if g is not None:
                model.step(g, self.hp)
        if self.stock is not None:
            for q, g in zip(self.twins, grads):
                q.grad = None if g is None else g.clone()
            self.stock.step()

    def check(self, params) -> None:
        __tracebackhide__ = True
        for i, (p, model) in enumerate(zip(params, self.models)):
            math = torch.float64 if p.dtype == torch.float64 else torch.float32
            tol = param_tolerance(model, p.dtype, math)
            err = (p.detach().double() - model.p).abs()
            assert bool((err <= tol).all()), f"param {i}: {float((err - tol).max()):.3e} over"
            if self.stock is not None:  # level 0 is AdamW: within both roundings of the model
                q = self.twins[i].detach().double()
                assert bool(((p.detach().double() - q).abs() <= 2 * tol).all()), f"param {i}"
