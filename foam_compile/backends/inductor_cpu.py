"""``torch.ops.foam.folded_update_``: the folded FOAM step as one op with its own Inductor lowering.

Why an op with a hand-written lowering rather than plain torch for Inductor to fuse: the element
update needs, per 8-lane vector, the block sums of two blocks (8 scalar loads of ``g``), their two
moments and ``p``, ``g`` and the step scalars: 16 loads. Inductor's lowering heuristics realise
any expression with more than 12 loads (``realize_cpu_acc_reads_threshold``), or with more than 4
that is used twice (``realize_reads_threshold``), into a buffer. Written in plain torch, the
update therefore needs a block table written by one loop nest and read by the next, allocated
per call: for a large parameter that table is tens of MB, and on Linux each call's fresh
allocation costs a page fault per 4 KiB (measured: 43.7 ms per step of a 4096x4096 parameter, of
which 27 ms were page faults; the same code in a process that never returns memory: 16.4 ms).

The lowering below builds the two loop nests itself (``ir.Pointwise`` written into the inputs
with ``mutate_to``, as Inductor's own ``copy_`` does), so no heuristic applies:

1. **block nest** over the folded state: each block's mean of ``g`` and ``g**2`` from its
   ``B`` elements, the new moments stored in place (scalar code: one block per iteration);
2. **element nest** over ``p``'s range, vectorised: per vector of ``LANES`` elements, the
   ``K = LANES / B`` block means of ``g`` (scalar loads at ``FloorDiv(x, LANES)``, uniform across
   the vector, then broadcast), the new moments just stored, each lane's block picked by
   ``where(lane < B*(j+1), ...)``, then ``R``, ``M``, ``V`` and ``p`` stored.

Traffic per element at level 2: ``p`` read and written, ``g`` read twice, the state read twice
and written once at a quarter size: 22 bytes (the ideal single pass: 16; AdamW: 28). Nothing is
allocated. Measured on 2 CPU cores, one 4096x4096 float32 parameter: 15.4 ms per step, against
42.2 ms for compiled AdamW and 13.0 ms for torch's fused CPU AdamW.

Eager, and anywhere the lowering does not apply (symbolic shapes under ``dynamic=True``, other
devices, an Inductor whose internals differ: Inductor then calls the op as an extern kernel),
the op runs the plain-torch update (:func:`foam_compile.update.folded_step_`): same math, same
results. Level 0 and levels above :data:`MAX_LEVEL` are left to the plain-torch backend: level
0 is elementwise, and blocks of 16 or more are real (not unrolled) reductions for Inductor.
"""

# ruff: noqa: UP045 - torch.library reads these annotations at runtime (Optional[Tensor]).
import inspect
import logging
import zlib
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ..hyper import Hyper
from ..state import StateFormat
from ..update import bias_scalars, compute_dtype, decay_factor, folded_step_

log = logging.getLogger(__name__)

__all__ = ["MAX_LEVEL", "folded_update_", "step_", "supports"]

# Blocks of up to 8 elements: at most 8 scalar loads of g per block per vector.
MAX_LEVEL = 3


def supports(p: Tensor, g: Tensor, level: int, fmt: StateFormat, hp: Hyper) -> str | None:
    if not 1 <= level <= MAX_LEVEL or p.dim() < 2:
        return f"the CPU lowering takes folded parameters at levels 1..{MAX_LEVEL}"
    if fmt.name != "fp32":
        return f"the CPU lowering does not read state_format={fmt.name!r}"
    if p.numel() == 0:
        return "empty parameter"
    return None


def step_(
    params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], hp: Hyper
) -> None:
    """Each parameter through ``foam::folded_update_`` (one op call, two loop nests, each)."""
    coupled = 0.0 if hp.decoupled_weight_decay else hp.weight_decay
    for p, g, st in zip(params, grads, states):
        level, compute = st["foam_level"], compute_dtype(p)
        step_size, inv_sqrt_bc2 = bias_scalars(st["step"], hp, level, compute)
        decay = decay_factor(hp, compute)

        def tensor(x, compute=compute, device=p.device):
            if isinstance(x, Tensor):
                return x.to(device=device, dtype=compute)
            return torch.tensor(x, dtype=compute, device=device)

        torch.ops.foam.folded_update_(
            p,
            g,
            st["exp_avg"],
            st["exp_avg_sq"],
            st.get("max_exp_avg_sq") if hp.amsgrad else None,
            tensor(step_size),
            tensor(inv_sqrt_bc2),
            None if isinstance(decay, float) and decay == 1.0 else tensor(decay),
            level,
            hp.beta1,
            hp.beta2,
            hp.eps,
            coupled,
            hp.maximize,
            hp.res_scale,
            VERSION,
        )


@torch.library.custom_op(
    "foam::folded_update_", mutates_args=("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
)
def folded_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    step_size: Tensor,
    inv_sqrt_bc2: Tensor,
    decay: Optional[Tensor],
    level: int,
    beta1: float,
    beta2: float,
    eps: float,
    coupled_weight_decay: float,
    maximize: bool,
    res_scale: float,
    version: int,
) -> None:
    """One FOAM step of one folded parameter (level 1..3, at least 2-d), in place.

    ``step_size = lr * scale / (1 - beta1**t)`` and ``inv_sqrt_bc2 = (1 - beta2**t)**-0.5`` are
    0-d tensors in the compute dtype; ``decay`` is ``1 - lr * wd`` (decoupled decay) or None;
    ``coupled_weight_decay`` is Adam's ``wd`` added to the gradient (0 for AdamW). ``version``
    names the lowering's code (:data:`VERSION`): it is a constant of every traced graph, so a
    changed lowering never reuses a compiled graph cached by an older one.
    """
    hp = Hyper(
        lr=0.0,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=coupled_weight_decay,
        decoupled_weight_decay=coupled_weight_decay == 0.0,
        amsgrad=max_exp_avg_sq is not None,
        maximize=maximize,
        res_scale=res_scale,
    )
    folded_step_(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
        level,
        step_size=step_size,
        inv_sqrt_bc2=inv_sqrt_bc2,
        decay=1.0 if decay is None else decay,
        hp=hp,
    )


@folded_update_.register_fake
def _fake(*args, **kwargs) -> None:
    """Mutates in place, returns nothing; tracing for Inductor comes through here first."""
    _register_lowering()
    return None


# ---------------------------------------------------------------------------------- lowering


def _lanes(dtype: torch.dtype) -> int:
    """Elements per vector in Inductor's C++ code for ``dtype`` (1 where it does not vectorise)."""
    try:
        from torch._inductor import cpu_vec_isa

        isa = cpu_vec_isa.pick_vec_isa()
        return int(isa.nelements(dtype)) if isa else 1
    except Exception:  # an Inductor without this helper: any power of two is correct
        return 8


def _lower(  # noqa: C901 - one Inductor IR builder; the CPU kernel of issue 16 replaces it
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    step_size,
    inv_sqrt_bc2,
    decay,
    level,
    beta1,
    beta2,
    eps,
    coupled_weight_decay,
    maximize,
    res_scale,
    version,
):
    import sympy
    from torch._inductor import ir
    from torch._inductor.lowering import mutate_to
    from torch._inductor.virtualized import ops
    from torch.utils._sympy.functions import FloorDiv, ModularIndexing

    sizes = list(param.get_size())
    compute = step_size.get_dtype()
    n = int(sizes[-1])
    block = 1 << level
    nb = -(-n // block)
    # Inductor's vector length for a kernel is that of its narrowest dtype (16 for bf16 on AVX2).
    narrowest = min((param.get_dtype(), grad.get_dtype(), compute), key=lambda d: d.itemsize)
    lanes = max(block, _lanes(narrowest))
    k = lanes // block  # blocks per vector
    ragged = n % block != 0  # a partial last block: mask and count its elements

    # Computed inputs (the gradient from a backward, the bias corrections' exp) are realised
    # once: the loops below read g ~10 times per vector and the scalars once per vector.
    for t in (grad, step_size, inv_sqrt_bc2, decay):
        if t is not None:
            t.realize()

    def loader(t):
        """``t``'s values in the compute dtype (no conversion where it already is)."""
        if t is None:
            return None
        load, dtype = t.make_loader(), t.get_dtype()
        return load if dtype == compute else (lambda index: ops.to_dtype(load(index), compute))

    load_p, load_g, load_m, load_v, load_vmax, load_ss, load_ib, load_decay = map(
        loader, (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step_size, inv_sqrt_bc2, decay)
    )

    def const(x):
        return ops.constant(x, compute)

    def grad_at(lead, e):
        """The gradient the moments see at element ``e``: maximize's sign, Adam's decay."""
        x = load_g([*lead, e])
        if maximize:
            x = ops.neg(x)
        if coupled_weight_decay != 0.0:
            x = ops.add(x, ops.mul(const(coupled_weight_decay), load_p([*lead, e])))
        return x

    def block_means(lead, b, squares: bool):
        """``gb`` (and ``qb`` with ``squares``) of block ``b``, a sympy index, from g."""
        s = q = None
        for i in range(block):
            e = b * block + i
            x = grad_at(lead, sympy.Min(e, n - 1) if ragged else e)
            if ragged:
                inside = ops.lt(ops.index_expr(e, torch.int64), ops.constant(n, torch.int64))
                x = ops.where(inside, x, const(0.0))
            s = x if s is None else ops.add(s, x)
            if squares:
                q = ops.mul(x, x) if q is None else ops.add(q, ops.mul(x, x))
        if ragged:
            count = ops.index_expr(sympy.Min(block, n - b * block), torch.int64)
            count = ops.to_dtype(count, compute)
            return ops.truediv(s, count), q and ops.truediv(q, count)
        return ops.mul(s, const(1.0 / block)), q and ops.mul(q, const(1.0 / block))

    def new_moment(lead, b, which):
        """The new ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` of block ``b``, from the old."""
        gb, qb = block_means(lead, b, squares=which != "m")
        if which == "m":
            return ops.add(
                ops.mul(load_m([*lead, b]), const(beta1)), ops.mul(gb, const(1.0 - beta1))
            )
        v_new = ops.add(ops.mul(load_v([*lead, b]), const(beta2)), ops.mul(qb, const(1.0 - beta2)))
        return ops.maximum(load_vmax([*lead, b]), v_new) if which == "vmax" else v_new

    def new_state(which, dtype):
        def inner(index):
            *lead, b = index
            return ops.to_dtype(new_moment(lead, b, which), dtype)

        return inner

    load_v_use = load_vmax if load_vmax is not None else load_v

    def new_param(index):
        """Runs after the state stores: ``m`` and ``v`` (or ``vmax``) hold the new moments."""
        *lead, x = index
        lane = ops.index_expr(ModularIndexing(x, 1, lanes), torch.int64)
        per_block = []
        for j in range(k):
            b = FloorDiv(x, lanes) * k + j
            b = sympy.Min(b, nb - 1) if ragged else b
            per_block.append(
                (block_means(lead, b, squares=False)[0], load_m([*lead, b]), load_v_use([*lead, b]))
            )

        def pick(i):  # this lane's block
            out = per_block[k - 1][i]
            for j in range(k - 2, -1, -1):
                first = ops.lt(lane, ops.constant((j + 1) * block, torch.int64))
                out = ops.where(first, per_block[j][i], out)
            return out

        gb, m_new, v_use = pick(0), pick(1), pick(2)
        r = ops.sub(grad_at(lead, x), gb)
        big_m = ops.add(m_new, ops.mul(const(res_scale), r))
        big_v = ops.add(v_use, ops.mul(const(res_scale * res_scale), ops.mul(r, r)))
        denom = ops.add(ops.mul(ops.sqrt(big_v), load_ib([])), const(eps))
        p = load_p(index)
        if load_decay is not None:
            p = ops.mul(p, load_decay([]))
        update = ops.truediv(ops.mul(load_ss([]), big_m), denom)
        return ops.to_dtype(ops.sub(p, update), param.get_dtype())

    device = param.get_device()
    state_sizes = [*sizes[:-1], nb]

    def pointwise(fn, dtype, ranges):
        return ir.Pointwise.create(device=device, dtype=dtype, inner_fn=fn, ranges=ranges)

    # Order is meaning here: a node reads a buffer as it stands when the node is created, before
    # or after a ``mutate_to`` of it, and Inductor's scheduler keeps that order. ``vmax`` reads
    # the old ``v``, so it is stored before ``v``; the parameter reads the new moments (and the
    # old ``p`` for Adam's coupled decay, which every state node read before ``p`` changes).
    for state, which in ((exp_avg, "m"), (max_exp_avg_sq, "vmax"), (exp_avg_sq, "v")):
        if state is not None:
            dtype = state.get_dtype()
            mutate_to(state, pointwise(new_state(which, dtype), dtype, state_sizes))
    mutate_to(param, pointwise(new_param, param.get_dtype(), sizes))
    return None


def _lower_or_call(*args, **kwargs):
    """Inductor's lowering of the op: :func:`_lower` for static shapes on CPU; otherwise (symbolic
    shapes under ``dynamic=True``, another device) Inductor calls the op as it is."""
    import sympy
    from torch._inductor.lowering import fallback_handler

    param = args[0]
    static = all(isinstance(s, (int, sympy.Integer)) for s in param.get_size())
    if param.get_device().type == "cpu" and static:
        return _lower(*args, **kwargs)
    op = torch.ops.foam.folded_update_.default
    return fallback_handler(op, add_to_fallback_set=False)(*args, **kwargs)


_registered = False


def _register_lowering() -> None:
    """Register :func:`_lower` with Inductor once, when a graph with the op is first traced."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        from torch._inductor.lowering import register_lowering

        register_lowering(torch.ops.foam.folded_update_.default, type_promotion_kind=None)(
            _lower_or_call
        )
    except Exception as exc:  # Inductor then calls the op itself: correct, just not fused
        log.warning("foam_compile: no Inductor lowering for foam::folded_update_ (%s)", exc)


# The lowering's code, as a number baked into every traced call (see ``version`` above).
VERSION = zlib.crc32(inspect.getsource(_lower).encode())
