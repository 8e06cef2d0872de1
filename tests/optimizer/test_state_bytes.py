"""FOAM keeps only the folded moments: the bytes of its state."""

from __future__ import annotations

import math

import pytest
import torch

from foam_compile import FOAM

from .common import (
    BF16,
    generator,
    new_grads,
    param,
)


# --------------------------------------------------------------------- (4) state bytes
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
@pytest.mark.parametrize(
    "shape, level",
    [((4, 37), 1), ((4, 37), 2), ((2, 3, 13), 3), ((2, 5461), 2), ((6, 3), 3), ((5, 100), 8)],
    ids=str,
)
def test_state_bytes_are_folded(shape, level, dtype, amsgrad):
    gen = generator("bytes", shape, level, dtype)
    p = param(shape, gen, dtype)
    opt = FOAM([p], level=level, amsgrad=amsgrad)
    (p.grad,) = new_grads([p], gen, 0)
    opt.step()
    rows, n = math.prod(shape[:-1]), shape[-1]
    nb = math.ceil(n / 2**level)
    tensors = {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    moments = {k: v for k, v in tensors.items() if k != "step"}
    assert set(moments) == {"exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    moment_bytes = sum(v.numel() * v.element_size() for v in moments.values())
    assert moment_bytes == len(moments) * 4 * rows * nb
    step = tensors["step"]
    assert step.dim() == 0 and step.numel() * step.element_size() == 4
    assert all(v.numel() <= rows * nb < p.numel() for v in moments.values())  # nothing full-size
    total = sum(v.untyped_storage().nbytes() for v in tensors.values())
    assert total == moment_bytes + 4  # no hidden storage behind views
