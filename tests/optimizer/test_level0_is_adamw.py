"""FOAM at level 0 (and its 0-d/1-d parameters at any level) is torch.optim.AdamW / Adam."""

from __future__ import annotations

import pytest
import torch

from foam_compile import FOAM

from .common import (
    generator,
    new_grads,
    odd_params,
    param,
    set_grads,
    twin,
)

# ------------------------------------------------------- (1) level 0 is AdamW / Adam
ADAM_OPTIONS = {
    "wd": dict(weight_decay=0.1),
    "amsgrad": dict(weight_decay=0.1, amsgrad=True),
    "maximize": dict(weight_decay=0.1, maximize=True),
    "amsgrad_maximize": dict(weight_decay=0.01, amsgrad=True, maximize=True),
}


def _compare_with_stock(stock_cls, foam_kwargs, option, lr):
    gen = generator(stock_cls.__name__, option, lr)
    ps = odd_params(gen)
    qs = [twin(p) for p in ps]
    kw = dict(ADAM_OPTIONS[option], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    foam = FOAM(ps, **kw, **foam_kwargs)
    stock = stock_cls(qs, **kw)
    for t in range(10):
        grads = new_grads(ps, gen, t)
        set_grads(ps, grads)
        set_grads(qs, grads)
        foam.step()
        stock.step()
    for i, (p, q) in enumerate(zip(ps, qs)):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=lambda m, i=i: f"param {i}: {m}")
        assert p.stride() == q.stride()
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if kw.get("amsgrad") else ()):
            torch.testing.assert_close(foam.state[p][key], stock.state[q][key])
        assert float(foam.state[p]["step"]) == float(stock.state[q]["step"]) == 10


@pytest.mark.parametrize("lr", [1e-3, 1e-2, 1e-1])
@pytest.mark.parametrize("option", list(ADAM_OPTIONS))
def test_level0_equals_adamw(option, lr):
    _compare_with_stock(torch.optim.AdamW, dict(level=0), option, lr)


@pytest.mark.parametrize("lr", [1e-3, 1e-2, 1e-1])
@pytest.mark.parametrize("option", list(ADAM_OPTIONS))
def test_level0_coupled_decay_equals_adam(option, lr):
    _compare_with_stock(torch.optim.Adam, dict(level=0, decoupled_weight_decay=False), option, lr)


@pytest.mark.parametrize("option", ["wd", "amsgrad_maximize"])
def test_low_dim_params_at_level_2_equal_adamw(option):
    """0-d and 1-d parameters never fold, and FOAM's scale applies to folded parameters only."""
    gen = generator("lowdim", option)
    ps = [param((), gen), param((7,), gen), param((5461,), gen)]
    qs = [twin(p) for p in ps]
    kw = dict(ADAM_OPTIONS[option], lr=1e-3)
    foam = FOAM(ps, **kw, level=2, scale=0.25, res_scale=0.5)
    stock = torch.optim.AdamW(qs, **kw)
    for t in range(5):
        grads = new_grads(ps, gen, t)
        set_grads(ps, grads)
        set_grads(qs, grads)
        foam.step()
        stock.step()
    for p, q in zip(ps, qs):
        assert foam.state[p]["foam_level"] == 0
        assert foam.state[p]["exp_avg"].shape == p.shape
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
