"""Shared parameters, options and helpers of the ``FOAM`` optimizer tests (``tests/optimizer/``).

Every shape list holds a last dim that no block divides (partial last blocks); inputs are fresh
random tensors from a generator seeded by the test's own parameters. Tolerances come from the
dtypes' unit roundoff and the number of steps (``float64_model.param_tolerance``), except where a
fixed bound is the contract under test (level 0 == AdamW within 1e-6).
"""

from __future__ import annotations

import copy
import zlib

import torch
from float64_model import (
    F64,
    Hyper,
    unit_roundoff,
)
from torch import nn

BF16 = torch.bfloat16
GRAD_SCALES = (4.0, 1.0, 0.25, 2.0, 0.5)  # shrinking steps make amsgrad's max differ from v
# Last dims 5, 13, 37, 3 and 5461 leave a partial last block at every level >= 1 (3 is shorter
# than one block at level >= 2); 16 divides into whole blocks up to level 4 (the no-tail path).
SHAPES = [(3, 5), (2, 3, 13), (4, 37), (6, 3), (2, 16)]
OPTIONS = {
    "adamw": Hyper(),
    "coupled": Hyper(decoupled_weight_decay=False, weight_decay=0.1),
    "amsgrad": Hyper(amsgrad=True, weight_decay=0.1),
    "maximize": Hyper(maximize=True),
    "scale_rho": Hyper(scale=0.25, res_scale=0.5),
    "everything": Hyper(
        lr=3e-2,
        betas=(0.8, 0.95),
        weight_decay=0.05,
        decoupled_weight_decay=False,
        amsgrad=True,
        maximize=True,
        scale=0.25,
        res_scale=2.0,
    ),
}
# For bf16 weights: with coupled decay the bf16-rounded weight feeds back into the gradient, which
# the bf16 tolerance (one rounding per step, errors only added up) does not cover.
EVERYTHING_DECOUPLED = Hyper(
    lr=3e-2,
    betas=(0.8, 0.95),
    weight_decay=0.05,
    amsgrad=True,
    maximize=True,
    scale=0.25,
    res_scale=2.0,
)


# ------------------------------------------------------------------------------ helpers
def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, gen, dtype=torch.float32, std=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=F64) * std).to(dtype)


def param(shape, gen, dtype=torch.float32, std=1.0) -> nn.Parameter:
    return nn.Parameter(randn(shape, gen, dtype, std))


def twin(p: torch.Tensor) -> nn.Parameter:
    """An independent copy with the same strides (non-contiguous stays non-contiguous)."""
    return nn.Parameter(strided_copy(p.detach(), p))


def odd_params(gen, dtype=torch.float32) -> list[nn.Parameter]:
    """0-d, 1-d, 2-d, 3-d and three non-contiguous parameters."""
    ps = [
        param((), gen, dtype),
        param((7,), gen, dtype),
        param((5, 9), gen, dtype),
        param((2, 3, 5), gen, dtype),
        nn.Parameter(randn((9, 5), gen, dtype).t()),  # transposed
        nn.Parameter(randn((5, 2, 3), gen, dtype).permute(1, 2, 0)),  # permuted 3-d
        nn.Parameter(randn((4, 12), gen, dtype)[:, ::3]),  # strided slice
    ]
    assert [p.is_contiguous() for p in ps] == [True] * 4 + [False] * 3
    return ps


def new_grads(params, gen, t: int) -> list[torch.Tensor]:
    """Fresh gradients, laid out like their parameters (non-contiguous ones too)."""
    s = GRAD_SCALES[t % len(GRAD_SCALES)]
    return [strided_copy(randn(p.shape, gen, p.dtype) * s, p) for p in params]


def strided_copy(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(like.shape, like.stride(), dtype=x.dtype).copy_(x)


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = strided_copy(g, g)


def run(opt, params, models, hp: Hyper, steps: int, gen) -> None:
    """Step ``opt`` and the models on the same fresh gradients."""
    for t in range(steps):
        grads = new_grads(params, gen, t)
        set_grads(params, grads)
        opt.step()
        for model, g in zip(models, grads):
            model.step(g, hp)


def state_tensors(opt) -> dict:
    return {
        (i, k): v
        for i, p in enumerate(opt.param_groups[0]["params"])
        for k, v in opt.state[p].items()
        if isinstance(v, torch.Tensor)
    }


def snapshot(opt, params):
    state = {id(p): copy.deepcopy(dict(opt.state[p])) for p in params if p in opt.state}
    return [p.detach().clone() for p in params], state


def assert_unchanged(snap, opt, params) -> None:
    values, state = snap
    for i, (p, v) in enumerate(zip(params, values)):
        assert torch.equal(p.detach(), v), f"parameter {i} changed"
    assert {id(p) for p in params if p in opt.state and opt.state[p]} == set(state)
    for p in params:
        if id(p) not in state:
            continue
        before, now = state[id(p)], opt.state[p]
        assert set(before) == set(now), f"state keys changed: {set(before)} -> {set(now)}"
        for k, v in before.items():
            if isinstance(v, torch.Tensor):
                assert now[k].shape == v.shape and torch.equal(now[k], v), f"state {k!r} changed"
            else:
                assert now[k] == v, f"state {k!r} changed"


def _fold_tolerance(x: torch.Tensor, level: int) -> float:
    return (2**level + 1) * unit_roundoff(torch.float32) * float(x.abs().max())
