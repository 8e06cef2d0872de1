"""The eager FOAM reference: ALGORITHM.md written as plain torch, one parameter at a time.

Every fast path in the package (the optimizer's compiled update, the rewritten graphs of the
``"foam"`` backend, the Triton kernel) is tested against :func:`reference_step`, and this module is
tested against an independent float64 model in ``tests/test_reference.py``. It favours reading
like the paper over speed: it materialises ``R``, ``M`` and ``V``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["fold", "unfold", "folded_shape", "effective_level", "reference_step"]


def effective_level(shape: torch.Size | tuple[int, ...], level: int) -> int:
    """The level a parameter of ``shape`` really runs at: 0-d and 1-d parameters never fold."""
    return level if len(shape) >= 2 else 0


def folded_shape(shape: torch.Size | tuple[int, ...], level: int) -> tuple[int, ...]:
    """``[..., n] -> [..., ceil(n / 2**level)]``, leading dims kept (blocks never cross rows)."""
    shape = tuple(shape)
    if level == 0 or not shape:
        return shape
    return (*shape[:-1], math.ceil(shape[-1] / 2**level))


def fold(x: Tensor, level: int) -> Tensor:
    """Block mean over ``2**level`` consecutive elements of the last dim.

    A partial last block averages only the elements that exist (the reference code zero-pads and
    divides by the full block size, which biases the last block low; ALGORITHM.md "Folding").
    """
    if level == 0 or x.shape[-1] == 0:
        return x
    n, block = x.shape[-1], 2**level
    nb = math.ceil(n / block)
    pad = nb * block - n
    padded = torch.nn.functional.pad(x, (0, pad))
    sums = padded.reshape(*x.shape[:-1], nb, block).sum(-1)
    counts = torch.full((nb,), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = block - pad
    return sums / counts


def unfold(y: Tensor, level: int, n: int) -> Tensor:
    """``unfold(y)[..., i] = y[..., i // 2**level]``, cut back to the last dim ``n``."""
    if level == 0:
        return y
    return y.repeat_interleave(2**level, dim=-1)[..., :n]


@torch.no_grad()
def reference_step(
    p: Tensor,
    grad: Tensor,
    state: dict,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    level: int,
    decoupled_weight_decay: bool = True,
    amsgrad: bool = False,
    maximize: bool = False,
    scale: float = 1.0,
    res_scale: float = 1.0,
) -> None:
    """One FOAM step for one parameter, in place on ``p`` and ``state``.

    ``state`` holds ``step`` (a number or 0-d tensor), ``exp_avg`` and ``exp_avg_sq`` (and
    ``max_exp_avg_sq`` with amsgrad) in the folded shape; missing entries start at zero. The math
    runs in float32 (float64 if the parameter is float64), as ALGORITHM.md prescribes.
    """
    level = effective_level(p.shape, level)
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    lr = float(lr)
    n = p.shape[-1] if p.dim() else 1
    fshape = folded_shape(p.shape, level)
    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
        if key not in state:  # float32, as the optimizer; float64 parameters keep float64
            state[key] = torch.zeros(fshape, dtype=compute, device=p.device)

    g = grad.to(compute)
    if maximize:
        g = -g
    w = p.to(compute)
    if not decoupled_weight_decay and weight_decay != 0:
        g = g + weight_decay * w
    step = state.get("step", 0)
    t = float(step) + 1
    if decoupled_weight_decay:
        w = w * (1 - lr * weight_decay)

    gb = fold(g, level)
    qb = fold(g * g, level)
    r = g - unfold(gb, level, n)
    m_f = beta1 * state["exp_avg"].to(compute) + (1 - beta1) * gb
    v_f = beta2 * state["exp_avg_sq"].to(compute) + (1 - beta2) * qb
    v_use = v_f
    if amsgrad:
        v_use = torch.maximum(state["max_exp_avg_sq"].to(compute), v_f)
        state["max_exp_avg_sq"].copy_(v_use)
    m_full = unfold(m_f, level, n) + res_scale * r
    v_full = unfold(v_use, level, n) + res_scale**2 * r * r
    if level == 0:
        scale = 1.0  # alpha scales folded parameters only; level 0 is AdamW exactly
    bc1 = 1 - beta1**t
    bc2 = 1 - beta2**t
    w = w - (lr * scale / bc1) * m_full / (v_full.sqrt() / math.sqrt(bc2) + eps)

    p.copy_(w)
    state["exp_avg"].copy_(m_f)
    state["exp_avg_sq"].copy_(v_f)
    state["step"] = torch.tensor(t) if isinstance(step, Tensor) else t
