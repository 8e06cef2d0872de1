"""The FOAM update as one function that eager mode, Dynamo and Inductor all run.

One parameter at a time (:func:`_foam_param_`), by the device and the level:

* **CUDA**: the whole group goes to the fused Triton kernel (``torch.ops.foam.adam_step_grouped_``).
* **Levels 1..3 elsewhere** (CPU): ``torch.ops.foam.folded_update_``
  (:mod:`foam_compile.cpu_lowering`). Eager it runs :func:`_folded_param_` below; under
  Inductor its own lowering emits two vectorised C++ loop nests that write ``p`` and the state in
  place and allocate nothing (that module's docstring says why plain torch cannot get there).
* **Level 0, 1-d parameters, levels above 3**: plain torch here, which Inductor fuses well
  enough: level 0 is elementwise, and blocks of 16 or more are real (not unrolled) reductions.

The plain-torch folded code is shaped for Inductor's C++ backend all the same (it is what any
other backend compiles): bias corrections as ``exp(t * log(beta))`` in float64, which Inductor
computes once per step rather than once per vector (``pow`` is re-evaluated per vector), a block
nest writing a small table (``torch.stack`` guarantees it is realised), and an element nest over
``[rows, n/8, 8]`` lanes that picks each lane's block value with ``where`` instead of an integer
division (which would make the vectoriser gather lane by lane).

The math is ALGORITHM.md's and is tested against :mod:`foam_compile.reference`;
``tests/test_functional_inductor.py`` pins the generated code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_lowering
from .distributed import local_views

__all__ = ["foam_adam_"]

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


def _scalars(step: Tensor | float, lr, beta1: float, beta2: float, scale: float, dtype):
    """``(step_size, inv_sqrt_bc2)`` for one parameter step: ``lr * scale / bc1`` and ``bc2**-0.5``.

    Tensors (of ``dtype``) when ``step`` is a tensor, Python floats otherwise.
    """
    if not isinstance(step, Tensor):
        t = float(step)
        return lr * scale / (1 - beta1**t), (1 - beta2**t) ** -0.5
    step_size = (lr * scale / _bias_correction(step, beta1)).to(dtype)
    inv_sqrt_bc2 = _bias_correction(step, beta2).rsqrt().to(dtype)
    return step_size, inv_sqrt_bc2


def _gradient(p: Tensor, g: Tensor, hp, compute: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(p, g)`` in the compute dtype, ``g`` negated for ``maximize`` and with Adam's coupled decay."""
    _, _, _, wd, decoupled, _, maximize, _ = hp
    pf, gf = p.to(compute), g.to(compute)
    if maximize:
        gf = -gf
    if not decoupled and wd != 0:
        gf = gf + wd * pf
    return pf, gf


def _adam_param_(p, g, m, v, vmax, *, step_size, inv_sqrt_bc2, decay, hp, compute) -> None:
    """Level 0: AdamW/Adam elementwise (any shape, 0-d included); one loop nest."""
    beta1, beta2, eps, _, _, amsgrad, _, _ = hp
    pf, gf = _gradient(p, g, hp, compute)
    m_new = m * beta1 + gf * (1 - beta1)
    v_new = v * beta2 + (gf * gf) * (1 - beta2)
    v_use = torch.maximum(vmax, v_new) if amsgrad else v_new
    p.copy_(pf * decay - step_size * m_new / (v_use.sqrt() * inv_sqrt_bc2 + eps))
    m.copy_(m_new)
    v.copy_(v_new)
    if amsgrad:
        vmax.copy_(v_use)


def _pad_last(x: Tensor, size: int) -> Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _folded_param_(p, g, m, v, vmax, level, *, step_size, inv_sqrt_bc2, decay, hp, compute):
    """Level >= 1 for a parameter of at least 2 dims: a block nest, then an element nest."""
    beta1, beta2, eps, _, _, amsgrad, _, rho = hp
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
    v_use = torch.maximum(_pad_last(vmax.reshape(rows, nb), nbp), v_new) if amsgrad else v_new
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
    new_p = p3 * decay - step_size * big_m / (big_v.sqrt() * inv_sqrt_bc2 + eps)
    p.copy_(new_p.view(rows, groups * lanes)[:, :n].reshape(p.shape))
    m.copy_(m_new[:, :nb].reshape(m.shape))
    v.copy_(v_new[:, :nb].reshape(v.shape))
    if amsgrad:
        vmax.copy_(v_use[:, :nb].reshape(vmax.shape))


def _foam_param_(p, g, m, v, vmax, step, level, *, lr, hp, scale):
    """One FOAM step for one parameter (``step`` already incremented), in place."""
    beta1, beta2, _, wd, decoupled, _, _, _ = hp
    if p.numel() == 0:
        return
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    # alpha scales folded parameters only: at level 0 FOAM is AdamW exactly (ALGORITHM.md).
    step_size, inv_sqrt_bc2 = _scalars(
        step, lr, beta1, beta2, scale if level > 0 else 1.0, compute
    )
    decay = 1 - lr * wd if decoupled else 1.0
    if level > 0 and cpu_lowering.supports(p, level):
        _folded_update_op(p, g, m, v, vmax, level, step_size, inv_sqrt_bc2, decay, hp, compute)
        return
    kw = dict(step_size=step_size, inv_sqrt_bc2=inv_sqrt_bc2, decay=decay, hp=hp, compute=compute)
    if level == 0 or p.dim() < 2:
        _adam_param_(p, g, m, v, vmax, **kw)
    else:
        _folded_param_(p, g, m, v, vmax, level, **kw)


def _folded_update_op(p, g, m, v, vmax, level, step_size, inv_sqrt_bc2, decay, hp, compute):
    """The same step through ``torch.ops.foam.folded_update_``: eager it runs
    :func:`_folded_param_`; under Inductor its own lowering (no per-call block table)."""
    beta1, beta2, eps, wd, decoupled, _, maximize, rho = hp

    def tensor(x):
        if isinstance(x, Tensor):
            return x.to(compute)
        return torch.tensor(x, dtype=compute, device=p.device)

    torch.ops.foam.folded_update_(
        p, g, m, v, vmax, tensor(step_size), tensor(inv_sqrt_bc2),
        None if not decoupled or wd == 0 else tensor(decay), level, beta1, beta2, eps,
        0.0 if decoupled else float(wd), maximize, rho, cpu_lowering.VERSION,
    )


def _use_triton(tensors: list[Tensor]) -> bool:
    """CUDA tensors go to the fused Triton kernel (its op falls back per tensor where the kernel
    does not apply: float64, non-contiguous, very deep levels)."""
    if not tensors or not tensors[0].is_cuda:
        return False
    from . import kernels

    return kernels.HAS_TRITON


@torch.no_grad()
def foam_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    levels: list[int],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    scale: float,
    res_scale: float,
) -> None:
    """One FOAM step over a group of parameters, in place; increments each ``state_steps`` entry.

    ``levels[i]`` is the level parameter ``i`` runs at (its state is already in that folded
    shape). Hyperparameters follow ``torch.optim.AdamW``; ``scale`` and ``res_scale`` are FOAM's
    alpha and rho, and ``scale`` applies to folded parameters (level >= 1) only.
    """
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = local_views(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs
    )  # DTensor shards (FSDP2): the math is local, folds never cross a shard
    hp = (beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, res_scale)
    for step in state_steps:
        step += 1
    if _use_triton(params):
        lr_tensor = lr if isinstance(lr, Tensor) else None
        torch.ops.foam.adam_step_grouped_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [],
            state_steps, levels, float(lr) if lr_tensor is None else 0.0, lr_tensor,
            beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
            scale, res_scale,
        )
        return
    for i, p in enumerate(params):
        _foam_param_(
            p, grads[i], exp_avgs[i], exp_avg_sqs[i],
            max_exp_avg_sqs[i] if amsgrad else None, state_steps[i], levels[i],
            lr=lr, hp=hp, scale=scale,
        )
