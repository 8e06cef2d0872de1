"""The FOAM update in plain torch: the one copy that eager mode, Inductor and every fallback run.

:func:`foam_update_` steps one parameter in place from float moments (the state format decodes
and encodes around it). It is ALGORITHM.md's rule, shaped for Inductor's C++ backend, since
under ``torch.compile`` this is the code Inductor fuses wherever no fast path applies:

* bias corrections as ``exp(t * log(beta))`` in float64, which Inductor computes once per step
  rather than once per vector (``pow`` is re-evaluated per vector);
* level 0 (and 0-d/1-d parameters) elementwise: one loop nest, as AdamW;
* folded parameters as a block nest writing a small table (``torch.stack`` guarantees it is
  realised), then an element nest over ``[rows, n/8, 8]`` lanes that picks each lane's block
  value with ``where`` instead of an integer division (which would make the vectoriser gather
  lane by lane).

:mod:`foam_compile.reference` is the readable spec; this module is tested against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .hyper import Hyper

__all__ = [
    "AMSGRAD_MOMENT",
    "LANES",
    "MOMENTS",
    "bias_scalars",
    "compute_dtype",
    "decay_factor",
    "folded_step_",
    "foam_update_",
    "moments_of",
]

# The moments of the Adam update, in the order the fast paths take them, and what each holds
# (a state format may code a signed moment and a square differently).
MOMENTS = (("exp_avg", "signed"), ("exp_avg_sq", "square"))
AMSGRAD_MOMENT = ("max_exp_avg_sq", "square")

# Lanes per group in the element nest: one AVX2 float32 vector, so a group's block values are
# loaded once per vector. 8 also keeps K = G / B <= 2 at level 2 (the paper's level), within the
# element nest's read budget; level 1 (K = 4) exceeds it and costs one full-size buffer.
LANES = 8


def _bias_correction(step: Tensor, beta: float) -> Tensor:
    """``1 - beta**step`` in float64, written with ``exp``.

    ``exp`` (not ``pow``, not ``expm1``) is on Inductor's list of "heavy" CPU ops, so the scalar is
    computed once per step rather than once per vector; float64 keeps ``1 - beta**t`` as accurate
    as the reference's Python floats (no cancellation worth a float32 ulp at ``t = 1``).
    """
    if beta == 0.0:
        return torch.ones_like(step, dtype=torch.float64)
    return 1 - torch.exp(step.to(torch.float64) * math.log(beta))


def _lr(hp: Hyper, dtype: torch.dtype):
    """``lr`` for math in ``dtype``: a tensor ``lr`` (float32 when a scheduler made it) is cast
    first, so that float64 parameters do not take products rounded to float32."""
    return hp.lr.to(dtype) if isinstance(hp.lr, Tensor) else hp.lr


def bias_scalars(step: Tensor | float, hp: Hyper, level: int, dtype: torch.dtype):
    """``(step_size, inv_sqrt_bc2)``: ``lr * alpha / (1 - beta1**t)`` and ``(1 - beta2**t)**-0.5``.

    ``step`` is the new step count ``t``. Tensors of ``dtype`` when ``step`` is a tensor, Python
    floats otherwise (a tensor of ``dtype`` for ``step_size`` when ``lr`` is a tensor).
    """
    scale = hp.step_scale(level)
    if not isinstance(step, Tensor):
        t = float(step)
        return _lr(hp, dtype) * scale / (1 - hp.beta1**t), (1 - hp.beta2**t) ** -0.5
    step_size = (_lr(hp, torch.float64) * scale / _bias_correction(step, hp.beta1)).to(dtype)
    inv_sqrt_bc2 = _bias_correction(step, hp.beta2).rsqrt().to(dtype)
    return step_size, inv_sqrt_bc2


def decay_factor(hp: Hyper, dtype: torch.dtype = torch.float32):
    """``1 - lr * weight_decay`` (in ``dtype`` when ``lr`` is a tensor) for AdamW's decoupled
    decay, 1.0 otherwise."""
    if hp.decoupled_weight_decay and hp.weight_decay != 0:
        return 1 - _lr(hp, dtype) * hp.weight_decay
    return 1.0


def compute_dtype(p: Tensor) -> torch.dtype:
    """The update's dtype: float32 whatever the parameter's, float64 for float64 parameters."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _gradient(p: Tensor, g: Tensor, hp: Hyper, compute: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(p, g)`` in the compute dtype; ``g`` negated for maximize, plus Adam's coupled decay."""
    pf, gf = p.to(compute), g.to(compute)
    if hp.maximize:
        gf = -gf
    if not hp.decoupled_weight_decay and hp.weight_decay != 0:
        gf = gf + hp.weight_decay * pf
    return pf, gf


def moments_of(hp: Hyper) -> tuple[tuple[str, str], ...]:
    """``(state key, kind)`` of every moment a parameter keeps under ``hp``."""
    return MOMENTS + ((AMSGRAD_MOMENT,) if hp.amsgrad else ())


def foam_update_(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    vmax: Tensor | None,
    step: Tensor | float,
    level: int,
    hp: Hyper,
) -> None:
    """One FOAM step of one parameter, in place on ``p`` and the float moments ``m``, ``v`` (and
    ``vmax`` with amsgrad), which have the folded shape of ``level``; ``step`` is the new count."""
    if p.numel() == 0:
        return
    compute = compute_dtype(p)
    step_size, inv_sqrt_bc2 = bias_scalars(step, hp, level, compute)
    decay = decay_factor(hp, compute)
    kw = dict(step_size=step_size, inv_sqrt_bc2=inv_sqrt_bc2, decay=decay, hp=hp)
    if level == 0 or p.dim() < 2:
        _elementwise_(p, g, m, v, vmax, **kw)
    else:
        folded_step_(p, g, m, v, vmax, level, **kw)


def _elementwise_(p, g, m, v, vmax, *, step_size, inv_sqrt_bc2, decay, hp: Hyper) -> None:
    """Level 0: AdamW/Adam elementwise (any shape, 0-d included); one loop nest."""
    pf, gf = _gradient(p, g, hp, compute_dtype(p))
    m_new = m * hp.beta1 + gf * (1 - hp.beta1)
    v_new = v * hp.beta2 + (gf * gf) * (1 - hp.beta2)
    v_use = torch.maximum(vmax, v_new) if hp.amsgrad else v_new
    p.copy_(pf * decay - step_size * m_new / (v_use.sqrt() * inv_sqrt_bc2 + hp.eps))
    m.copy_(m_new)
    v.copy_(v_new)
    if hp.amsgrad:
        vmax.copy_(v_use)


def _pad_last(x: Tensor, size: int) -> Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def folded_step_(p, g, m, v, vmax, level, *, step_size, inv_sqrt_bc2, decay, hp: Hyper) -> None:
    """Level >= 1 for a parameter of at least 2 dims: a block nest, then an element nest.

    The step scalars come precomputed (:func:`bias_scalars`, :func:`decay_factor`), so the CPU
    fast path's op can run this as its eager body.
    """
    beta1, beta2, rho = hp.beta1, hp.beta2, hp.res_scale
    compute = compute_dtype(p)
    n = p.shape[-1]
    rows = p.numel() // n
    block = 1 << level
    nb = -(-n // block)  # blocks per row; the state's last dim
    lanes = max(LANES, block)  # elements per lane group
    k = lanes // block  # blocks per group
    groups = -(-n // lanes)
    nbp = groups * k  # blocks per row, counting the empty ones that fill the last group
    pf, gf = _gradient(p.reshape(rows, n), g.reshape(rows, n), hp, compute)
    gp = _pad_last(gf, groups * lanes)  # zeros past n: they add nothing to a block sum

    # ---- block nest: block means, new moments, and blk for the element nest.
    gb3 = gp.view(rows, nbp, block)
    if nbp * block == n:
        gb, qb = gb3.mean(-1), (gb3 * gb3).mean(-1)
    else:  # partial last block (and empty filler blocks): divide by the elements that exist
        count = (n - torch.arange(nbp, device=p.device) * block).clamp(1, block)
        gb, qb = gb3.sum(-1) / count, (gb3 * gb3).sum(-1) / count
    m_new = _pad_last(m.reshape(rows, nb), nbp) * beta1 + gb * (1 - beta1)
    v_new = _pad_last(v.reshape(rows, nb), nbp) * beta2 + qb * (1 - beta2)
    v_use = torch.maximum(_pad_last(vmax.reshape(rows, nb), nbp), v_new) if hp.amsgrad else v_new
    # M = m_new + rho*(g - gb) = (m_new - rho*gb) + rho*g: one block value for M, two for V.
    blk = torch.stack([m_new - rho * gb, v_use, gb]).view(3, rows, groups, k, 1)

    # ---- element nest over [rows, groups, lanes]: block values broadcast, picked per lane.
    lane = torch.arange(lanes, device=p.device)

    def per_lane(q: Tensor) -> Tensor:  # [rows, groups, k, 1] -> broadcastable to the lanes
        out = q[:, :, k - 1]
        for j in range(k - 2, -1, -1):
            out = torch.where(lane < (j + 1) * block, q[:, :, j], out)
        return out

    g3 = gp.view(rows, groups, lanes)
    r = g3 - per_lane(blk[2])
    big_m = per_lane(blk[0]) + rho * g3
    big_v = per_lane(blk[1]) + (rho * rho) * (r * r)
    p3 = _pad_last(pf, groups * lanes).view(rows, groups, lanes)
    new_p = p3 * decay - step_size * big_m / (big_v.sqrt() * inv_sqrt_bc2 + hp.eps)
    p.copy_(new_p.view(rows, groups * lanes)[:, :n].reshape(p.shape))
    m.copy_(m_new[:, :nb].reshape(m.shape))
    v.copy_(v_new[:, :nb].reshape(v.shape))
    if hp.amsgrad:
        vmax.copy_(v_use[:, :nb].reshape(vmax.shape))
