"""Quantized EMAs going stale (Topollai and Choromanska, arXiv 2603.16731): a step whose change is
below half a code step rounds back to the stored code, and the moment stops following.

At beta2 = 0.999 the per-step change of ``v`` is 0.1% of the gap to its target, far below an
8-bit code step (0.4% of the group's scale near the top), so under nearest rounding any ``v``
that must move *relative to its group's scale* stops. What the tests find:

* the issue's cases pass with nearest rounding: a constant gradient (``v`` grows in proportion
  to the group's scale, which is exact), and a gradient that shrinks 10x everywhere (the whole
  group shrinks together and the float32 scale follows it exactly);
* when part of a group shrinks and the rest does not, nearest rounding leaves the shrinking
  elements at their old codes (``v`` off by ~60% after 1000 steps), and so does a gradient that
  is noise of constant size;
* the fix: stochastic rounding, unbiased in the moment's own domain (``"int8-sr"``,
  ``"int4-sr"``): each store is right on average, so the EMA moves by its true amount in
  expectation and follows (errors of about 2% / 10%, the 4-bit one being the rounding's own
  noise: a code step is 17 times wider).

A gradient that is noise of constant size does not show it: there nearest rounding kept ``v``
within 2% over 1200 steps (occasional large squares push codes up and down).

The error measure throughout: ``||v' - v|| / ||v||`` over the parameter, ``v'`` the decoded
``exp_avg_sq`` of the quantized optimizer and ``v`` the float32 FOAM's, both fed the same
gradients. Bounds: the issue's 5% (8-bit) and 10% (4-bit).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from foam_compile import FOAM
from foam_compile.state import format_of

BOUND = {"int8": 0.05, "int8-sr": 0.05, "int4": 0.10, "int4-sr": 0.10}
SHAPE = (16, 128)  # level 0: 64 groups of 32; level 2: one group of 32 blocks per row


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(fmt: str, gradient, steps: int, level: int, every=()) -> dict[int, tuple[float, float]]:
    """``{step: (relative error of v, mean decoded v)}`` after the given steps."""
    p, q = nn.Parameter(torch.zeros(SHAPE)), nn.Parameter(torch.zeros(SHAPE))
    kw = dict(lr=0.0, betas=(0.9, 0.999), weight_decay=0.0, level=level)
    quant, ref = FOAM([p], **kw), FOAM([q], **kw)
    quant._set_layout(p, state_format=fmt)
    out = {}
    for t in range(1, steps + 1):
        g = gradient(t)
        p.grad, q.grad = g.clone(), g.clone()
        quant.step()
        ref.step()
        if t in every or t == steps:
            st = quant.state[p]
            v_q = format_of(st).decode(st, "exp_avg_sq", "square", p).double()
            v = ref.state[q]["exp_avg_sq"].double()
            out[t] = (float((v_q - v).norm() / v.norm()), float(v_q.mean()))
    return out


G = torch.randn(SHAPE, generator=_g(1))
HALF = torch.rand(SHAPE, generator=_g(2)) < 0.5  # elements that shrink in the mixed case


@pytest.mark.parametrize("level", [0, 2])
@pytest.mark.parametrize("fmt", list(BOUND))
def test_constant_gradient_200_steps(fmt, level):
    err, _ = run(fmt, lambda t: G, 200, level)[200]
    assert err <= BOUND[fmt], err


@pytest.mark.parametrize("level", [0, 2])
@pytest.mark.parametrize("fmt", list(BOUND))
def test_v_follows_a_gradient_that_shrinks_10x(fmt, level):
    res = run(fmt, lambda t: G if t <= 200 else G / 10, 1200, level, every=(200,))
    (err0, v0), (err, v1) = res[200], res[1200]
    assert err0 <= BOUND[fmt] and err <= BOUND[fmt], (err0, err)
    # float32 FOAM's v falls to 0.999**1000 + (1 - 0.999**1000) / 100 = 0.374 of its value
    assert v1 < 0.45 * v0, (v0, v1)


@pytest.mark.parametrize("fmt", ["int8-sr", "int4-sr"])
@pytest.mark.parametrize("level", [0, 2])
def test_stochastic_rounding_follows_when_part_of_a_group_shrinks(fmt, level):
    """The issue's bound at 8 bits; at 4 bits 1.5 times it, for the rounding's own noise (the
    same case under nearest rounding is off by ~60%: the next test)."""
    err, _ = run(fmt, lambda t: G if t <= 200 else torch.where(HALF, G / 10, G), 1200, level)[1200]
    assert err <= BOUND[fmt] * (1.5 if fmt == "int4-sr" else 1.0), err


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_nearest_rounding_goes_stale_when_part_of_a_group_shrinks(fmt):
    """The finding, pinned: the shrinking elements keep their codes (use ``-sr`` there)."""
    err, _ = run(fmt, lambda t: G if t <= 200 else torch.where(HALF, G / 10, G), 1200, 0)[1200]
    assert err > 4 * BOUND[fmt], err
