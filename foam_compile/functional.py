"""The FOAM update as one plain-torch function that eager mode, Dynamo and Inductor all run.

Written for Inductor: the gradient is viewed as ``[..., nb, B]`` and the folded moments are
broadcast over the block axis, so the block means, ``R``, ``M`` and ``V`` live inside one loop
nest per parameter shape and no full-size temporary is written (an integer division ``i // B`` in
the index math would stop Inductor's C++ vectoriser; a view does not). A partial last block (``n``
not a multiple of ``B``) is a second, one-block view over the tail. On CUDA, where the Triton
kernel is available, :func:`foam_adam_` hands each group of tensors to that kernel instead.

The math is ALGORITHM.md's and is tested against :mod:`foam_compile.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["foam_adam_"]


def _scalars(step: Tensor | float, lr, beta1, beta2, scale):
    """Bias-correction terms, once per parameter step (tensors when ``step`` is a tensor).

    In float64: ``1 - 0.999**t`` in float32 cancels to ~1e-4 relative error at small ``t``
    (torch's eager AdamW computes these as Python floats for the same reason). A 0-d float64
    tensor does not promote the float32 tensors it multiplies.
    """
    if isinstance(step, Tensor):
        step = step.to(torch.float64)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    return lr * scale / bc1, bc2**-0.5


def _block_update(p, g, m, v, vmax, *, block, step_size, inv_sqrt_bc2, decay, hp):
    """FOAM on ``p, g`` of shape ``[..., k*block]`` with moments ``[..., k]``; returns new values."""
    beta1, beta2, eps, wd, decoupled, amsgrad, maximize, res_scale = hp
    gf = g.float().unflatten(-1, (-1, block))
    pf = p.float().unflatten(-1, (-1, block))
    if maximize:
        gf = -gf
    if not decoupled and wd != 0:
        gf = gf + wd * pf
    gb = gf.mean(-1, keepdim=True)
    qb = (gf * gf).mean(-1, keepdim=True)
    m_new = m.unsqueeze(-1) * beta1 + gb * (1 - beta1)
    v_new = v.unsqueeze(-1) * beta2 + qb * (1 - beta2)
    v_use = torch.maximum(vmax.unsqueeze(-1), v_new) if amsgrad else v_new
    r = gf - gb
    big_m = m_new + res_scale * r
    big_v = v_use + (res_scale * res_scale) * (r * r)
    pf = pf * decay - step_size * big_m / (big_v.sqrt() * inv_sqrt_bc2 + eps)
    return (
        pf.flatten(-2),
        m_new.squeeze(-1),
        v_new.squeeze(-1),
        v_use.squeeze(-1) if amsgrad else None,
    )


def _foam_param_(p, g, m, v, vmax, step, level, *, lr, hp, scale):
    beta1, beta2, eps, wd, decoupled, amsgrad, maximize, res_scale = hp
    # alpha scales folded parameters only: at level 0 FOAM is AdamW exactly (ALGORITHM.md).
    step_size, inv_sqrt_bc2 = _scalars(step, lr, beta1, beta2, scale if level > 0 else 1.0)
    decay = 1 - lr * wd if decoupled else 1.0
    kw = dict(step_size=step_size, inv_sqrt_bc2=inv_sqrt_bc2, decay=decay, hp=hp)
    if level == 0:
        # Plain AdamW/Adam: a block of one element, R = 0. Works for 0-d tensors too.
        shape = p.shape
        parts = _block_update(
            p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
            vmax.reshape(-1) if amsgrad else None, block=1, **kw,
        )
        new_p, new_m, new_v, new_vmax = (None if x is None else x.reshape(shape) for x in parts)
    else:
        n, block = p.shape[-1], 2**level
        full = n // block
        head = full * block
        if head == n:
            new_p, new_m, new_v, new_vmax = _block_update(p, g, m, v, vmax, block=block, **kw)
        else:
            # Main blocks and the partial last block (mean over its own elements only).
            sl = (slice(None),) * (p.dim() - 1)
            tails = _block_update(
                p[sl + (slice(head, n),)], g[sl + (slice(head, n),)],
                m[sl + (slice(full, full + 1),)], v[sl + (slice(full, full + 1),)],
                vmax[sl + (slice(full, full + 1),)] if amsgrad else None,
                block=n - head, **kw,
            )
            if full:
                heads = _block_update(
                    p[sl + (slice(0, head),)], g[sl + (slice(0, head),)],
                    m[sl + (slice(0, full),)], v[sl + (slice(0, full),)],
                    vmax[sl + (slice(0, full),)] if amsgrad else None,
                    block=block, **kw,
                )
                parts = [
                    None if a is None else torch.cat([a, b], dim=-1) for a, b in zip(heads, tails)
                ]
            else:
                parts = list(tails)
            new_p, new_m, new_v, new_vmax = parts
    p.copy_(new_p)
    m.copy_(new_m)
    v.copy_(new_v)
    if amsgrad:
        vmax.copy_(new_vmax)


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
