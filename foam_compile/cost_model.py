"""What a fold level costs one parameter: state bytes, bytes moved per step, and error.

The byte counts are sympy formulas (ALGORITHM.md "Memory") so that the planner, the reports and
the docs quote one source; :func:`cost` evaluates them for a concrete parameter. A state format
(:mod:`foam_compile.state`) brings its own per-moment formula, scales included
(:func:`state_bytes_formula`); :data:`STATE_BYTES` is float32's. The error side is
measured, not modelled: :class:`ErrorMeter` accumulates from real gradients, for every candidate
level, the share of gradient energy that lies *inside* blocks, ``||g - unfold(fold(g))||^2 /
||g||^2``. That residual is what FOAM's moments forget: fold is linear, so FOAM's folded moments
are exactly the block means of Adam's, and only the within-block part of past gradients is lost
(the current step's residual is added back through ``rho``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from functools import cache

import sympy as sp
import torch
from torch import Tensor

from .reference import effective_level, fold
from .state import get_format

__all__ = [
    "ROWS",
    "N",
    "LEVEL",
    "PARAM_SIZE",
    "GRAD_SIZE",
    "STATE_SIZE",
    "MOMENTS",
    "BLOCKS",
    "STATE_BYTES",
    "ADAMW_STATE_BYTES",
    "STEP_BYTES",
    "ADAMW_STEP_BYTES",
    "WHITE_NOISE_ERROR",
    "Cost",
    "cost",
    "dims",
    "max_useful_level",
    "state_bytes",
    "adamw_state_bytes",
    "step_bytes",
    "adamw_step_bytes",
    "white_noise_error",
    "residual_energies",
    "ErrorMeter",
    "QUANT_ERROR_PRIOR",
    "MomentMeter",
    "quantization_errors",
    "state_bytes_formula",
]

# ----------------------------------------------------------------------------------- formulas
# A parameter is viewed as ``[rows, n]``: n is the last dim, rows the product of the others
# (blocks never cross rows). Sizes are bytes per element.
ROWS, N = sp.symbols("rows n", integer=True, positive=True)
LEVEL = sp.Symbol("level", integer=True, nonnegative=True)
PARAM_SIZE, GRAD_SIZE, STATE_SIZE = sp.symbols("s_p s_g s_s", integer=True, positive=True)
MOMENTS = sp.Symbol("k", integer=True, positive=True)  # 2 (exp_avg, exp_avg_sq), 3 with amsgrad

BLOCKS = sp.ceiling(N / 2**LEVEL)
#: Optimizer-state bytes: every moment is stored in the folded shape ``[rows, ceil(n / 2**l)]``.
#: The step counter (one scalar per parameter) is left out.
STATE_BYTES = MOMENTS * STATE_SIZE * ROWS * BLOCKS
ADAMW_STATE_BYTES = STATE_BYTES.subs(LEVEL, 0)
#: Bytes a fused step moves: read p and g, write p, read and write every folded moment once.
STEP_BYTES = ROWS * N * (2 * PARAM_SIZE + GRAD_SIZE) + 2 * MOMENTS * STATE_SIZE * ROWS * BLOCKS
ADAMW_STEP_BYTES = STEP_BYTES.subs(LEVEL, 0)
#: Expected residual share for gradients that are white noise along the last dim: a block of c
#: iid elements keeps 1/c of its energy in its mean, so the rows keep nb/n. Used as the error
#: when nothing was measured.
WHITE_NOISE_ERROR = 1 - BLOCKS / N

_SYMBOLS = (ROWS, N, LEVEL, PARAM_SIZE, GRAD_SIZE, STATE_SIZE, MOMENTS)


def state_bytes_formula(state_format: str = "fp32") -> tuple[sp.Expr, sp.Expr]:
    """``(state bytes, step bytes)`` as sympy expressions for moments stored in ``state_format``.

    The format's ``moment_bytes(rows, blocks, itemsize)`` (codes and scales) for each of the
    ``k`` moments; a fused step reads and writes every state byte once. ``"fp32"`` gives
    :data:`STATE_BYTES` and :data:`STEP_BYTES`.
    """
    fmt = get_format(state_format, "cost_model")
    state = MOMENTS * fmt.moment_bytes(ROWS, BLOCKS, STATE_SIZE)
    return state, ROWS * N * (2 * PARAM_SIZE + GRAD_SIZE) + 2 * state


@cache
def _compiled(name: str):
    # lambdify: evaluating sympy with subs() costs ~100 us; the planner evaluates thousands.
    # 2**-level is a power of two, so ceil(n * 2**-level) is exact in float for n < 2**53.
    if name.startswith("format:"):
        _, fmt, which = name.split(":")
        expr = state_bytes_formula(fmt)[which == "step"]
    else:
        expr = globals()[name]
    return sp.lambdify(_SYMBOLS, expr, "math")


def _eval(name: str, rows: int, n: int, level: int, sp_: int, sg: int, ss: int, k: int):
    return _compiled(name)(rows, n, level, sp_, sg, ss, k)


# ----------------------------------------------------------------------------- evaluation
def dims(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """``(rows, n)``: the last dim and the product of the leading ones (0-d: ``(1, 1)``)."""
    shape = tuple(shape)
    if not shape:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def max_useful_level(shape: torch.Size | tuple[int, ...]) -> int:
    """``ceil(log2 n)``: one block already spans the row; deeper levels change nothing."""
    if len(shape) < 2:
        return 0
    return max(shape[-1] - 1, 0).bit_length()


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _state_dtype(param_dtype: torch.dtype, state_dtype: torch.dtype | None) -> torch.dtype:
    # Mirrors optimizer.state_dtype: float32 moments, float64 for float64 parameters.
    if state_dtype is not None:
        return state_dtype
    return torch.float64 if param_dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Cost:
    """One parameter at one level; bytes from the module's formulas."""

    shape: tuple[int, ...]
    level: int  # the effective level (0 for 0-d and 1-d parameters)
    blocks: int  # ceil(n / 2**level)
    state_bytes: int
    adamw_state_bytes: int
    step_bytes: int
    adamw_step_bytes: int
    state_format: str = "fp32"


def cost(
    shape: torch.Size | tuple[int, ...],
    level: int,
    *,
    param_dtype: torch.dtype = torch.float32,
    grad_dtype: torch.dtype | None = None,
    state_dtype: torch.dtype | None = None,
    amsgrad: bool = False,
    state_format: str = "fp32",
) -> Cost:
    """Evaluate every byte formula for a parameter of ``shape`` at ``level``.

    ``grad_dtype`` defaults to ``param_dtype``; ``state_dtype`` to float32 (float64 for float64
    parameters), as the optimizer stores it. AdamW's figures use the same state dtype (and
    float32 moments); FOAM's use ``state_format``'s formula (:func:`state_bytes_formula`).
    """
    shape = tuple(shape)
    level = effective_level(shape, int(level))
    rows, n = dims(shape)
    args = (
        rows,
        n,
        level,
        _size(param_dtype),
        _size(grad_dtype or param_dtype),
        _size(_state_dtype(param_dtype, state_dtype)),
        3 if amsgrad else 2,
    )
    fmt = "" if state_format == "fp32" else f"format:{state_format}:"
    return Cost(
        shape=shape,
        level=level,
        blocks=-(-n // 2**level),
        state_bytes=int(_eval(f"{fmt}state" if fmt else "STATE_BYTES", *args)),
        adamw_state_bytes=int(_eval("ADAMW_STATE_BYTES", *args)),
        step_bytes=int(_eval(f"{fmt}step" if fmt else "STEP_BYTES", *args)),
        adamw_step_bytes=int(_eval("ADAMW_STEP_BYTES", *args)),
        state_format=state_format,
    )


def state_bytes(shape, level: int, **kw) -> int:
    """FOAM's optimizer-state bytes (moments only) for ``shape`` at ``level``; see :func:`cost`."""
    return cost(shape, level, **kw).state_bytes


def adamw_state_bytes(shape, **kw) -> int:
    """AdamW's optimizer-state bytes for ``shape`` with the same state dtype."""
    return cost(shape, 0, **kw).adamw_state_bytes


def step_bytes(shape, level: int, **kw) -> int:
    """Bytes a fused FOAM step moves for ``shape`` at ``level``."""
    return cost(shape, level, **kw).step_bytes


def adamw_step_bytes(shape, **kw) -> int:
    """Bytes a fused AdamW step moves for ``shape``."""
    return cost(shape, 0, **kw).adamw_step_bytes


def white_noise_error(shape: torch.Size | tuple[int, ...], level: int) -> float:
    """:data:`WHITE_NOISE_ERROR` for ``shape`` at ``level`` (0 for 0-d/1-d parameters)."""
    level = effective_level(tuple(shape), int(level))
    rows, n = dims(shape)
    if level == 0 or n == 0:
        return 0.0
    return float(_eval("WHITE_NOISE_ERROR", rows, n, level, 1, 1, 1, 2))


# ---------------------------------------------------------------------------------- error
@torch.no_grad()
def residual_energies(grad: Tensor, max_level: int) -> tuple[Tensor, Tensor]:
    """``(r, e)``: ``r[l] = ||g - unfold(fold(g, l))||^2`` for ``l = 0..max_level``; ``e = ||g||^2``


    Float64 on ``grad``'s device. Uses ``||g - unfold(fold g)||^2 = ||g||^2 - sum_b S_b^2 / c_b``
    (block sums ``S_b`` over ``c_b`` elements), and block sums at level ``l+1`` are pair sums of
    those at ``l``: one pass per level over a tensor half the size of the last, so the temporaries
    add up to about one gradient. Levels past :func:`max_useful_level` repeat its value.
    """
    g = grad.detach().float()
    total = torch.sum(g * g, dtype=torch.float64)
    if grad.dim() < 2 or grad.numel() == 0:  # never folds: nothing is lost
        return torch.zeros(max_level + 1, dtype=torch.float64, device=g.device), total
    n = grad.shape[-1]
    g = g.reshape(-1, n)
    out = [torch.zeros((), dtype=torch.float64, device=g.device)]
    sums = g
    counts = torch.ones(n, dtype=torch.float64, device=g.device)
    cap = min(max_useful_level(grad.shape), max_level)
    for _ in range(cap):
        if sums.shape[-1] % 2:
            sums = torch.nn.functional.pad(sums, (0, 1))
            counts = torch.nn.functional.pad(counts, (0, 1))
        sums = sums.unflatten(-1, (-1, 2)).sum(-1, dtype=torch.float64)
        counts = counts.unflatten(-1, (-1, 2)).sum(-1)
        kept = ((sums * sums).sum(0) / counts).sum()
        out.append((total - kept).clamp_min(0))
    out += [out[-1]] * (max_level - cap)
    return torch.stack(out), total


class GradFeed:
    """What a meter fed once per step adds to its ``update(key, grad)``."""

    def update_from(self, named_params: Iterable[tuple[Hashable, Tensor]]) -> int:
        """``update(name, p.grad)`` for every parameter that has a gradient; returns how many."""
        fed = 0
        for key, p in named_params:
            if p.grad is not None:
                self.update(key, p.grad)
                fed += 1
        return fed


class ErrorMeter(GradFeed):
    """Per-parameter residual share of gradient energy, for every level ``0..max_level``.

    Feed it ``update(key, grad)`` once per calibration step (``key``: the parameter's name). It
    keeps, per key, ``max_level + 2`` float64 scalars on the gradient's device (no host sync per
    step) and a step count; nothing full-size survives a call. :meth:`errors` returns
    ``sum_t ||R_t||^2 / sum_t ||g_t||^2`` per level: the window's average share, weighted by each
    step's gradient energy so that a near-zero gradient cannot dominate it. A parameter whose
    gradients were all zero has error 0 at every level.
    """

    def __init__(self, max_level: int = 8):
        if max_level < 0:
            raise ValueError(f"ErrorMeter: max_level must be >= 0, got {max_level}")
        self.max_level = int(max_level)
        self._residual: dict[Hashable, Tensor] = {}
        self._energy: dict[Hashable, Tensor] = {}
        self._steps: dict[Hashable, int] = {}

    def update(self, key: Hashable, grad: Tensor) -> None:
        """Add one step's gradient of parameter ``key``."""
        if grad.is_sparse:
            grad = grad.to_dense()
        residual, energy = residual_energies(grad, self.max_level)
        if key in self._residual:
            self._residual[key] += residual
            self._energy[key] += energy
        else:
            self._residual[key], self._energy[key] = residual, energy
        self._steps[key] = self._steps.get(key, 0) + 1

    def __contains__(self, key: Hashable) -> bool:
        return key in self._residual

    def keys(self) -> list[Hashable]:
        return list(self._residual)

    def steps(self, key: Hashable) -> int:
        """How many gradients of ``key`` were fed."""
        return self._steps.get(key, 0)

    def errors(self, key: Hashable) -> list[float] | None:
        """Residual share per level ``0..max_level`` (``None`` if ``key`` was never fed)."""
        if key not in self._residual:
            return None
        energy = float(self._energy[key])
        if energy == 0.0:
            return [0.0] * (self.max_level + 1)
        return [min(float(r) / energy, 1.0) for r in self._residual[key].tolist()]


# ------------------------------------------------------------------------ quantization error
#: Quantization error share of each format for moments nobody measured: the one-shot direction
#: error of ``benchmarks/quant_codecs.py`` on a byte-level LLaMA's moments, squared
#: (``benchmarks/RESULTS.md``). Used like :data:`WHITE_NOISE_ERROR`: a prior that knows sizes only.
QUANT_ERROR_PRIOR = {"fp32": 0.0, "int8": 3e-4, "int4": 4e-2}


def _direction(m: Tensor, v: Tensor, bc1: float, bc2: float, eps: float) -> Tensor:
    """Adam's step direction ``(m / bc1) / (sqrt(v / bc2) + eps)``, float64."""
    return (m.double() / bc1) / ((v.double().clamp_min(0) / bc2).sqrt() + eps)


def _block_counts(n: int, level: int, device) -> Tensor:
    """Elements in each block of a row at ``level`` (the last block may be partial)."""
    block = 2**level
    nb = -(-n // block)
    return (n - torch.arange(nb, device=device, dtype=torch.float64) * block).clamp(1, block)


@torch.no_grad()
def quantization_errors(
    m: Tensor,
    v: Tensor,
    levels: Iterable[int],
    formats: Iterable[str],
    *,
    step: int,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> dict[tuple[int, str], float]:
    """Share of Adam's direction energy that storing the folded moments in a format changes.

    ``m``, ``v``: a parameter's full-size (level-0) moments after ``step`` steps (AdamW's, or a
    :class:`MomentMeter`'s). For each level ``l`` and format ``f``: fold both (FOAM's moments
    are exactly their block means), encode and decode in ``f`` (nearest rounding), and return
    ``sum_b c_b (d'_b - d_b)^2 / sum_i D_i^2``: ``d``/``d'`` the direction of the folded moments
    before/after the round trip, ``c_b`` the elements of block ``b``, ``D`` the level-0
    direction. Capped at 1. Comparable with the folding residual share and additive with it:
    the quantization error of a folded moment is constant on each block while the folding
    residual has zero mean on each block, so the two are orthogonal and their energies add.
    """
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    total = float((_direction(m, v, bc1, bc2, eps) ** 2).sum())
    shape = tuple(m.shape)
    n = shape[-1] if shape else 1
    out = {}
    for level in sorted({effective_level(shape, int(lv)) for lv in levels}):
        mf, vf = fold(m.float(), level), fold(v.float(), level)
        d = _direction(mf, vf, bc1, bc2, eps)
        weight = _block_counts(n, level, m.device) if shape else torch.ones((), dtype=torch.float64)
        for name in formats:
            if name == "fp32" or total == 0.0:
                out[(level, name)] = 0.0
                continue
            fmt = get_format(name, "quantization_errors")
            p = torch.empty(shape, device="meta")
            state = {"foam_level": level}
            state.update(fmt.encode(mf, p, "exp_avg", "signed"))
            state.update(fmt.encode(vf, p, "exp_avg_sq", "square"))
            dq = _direction(
                fmt.decode(state, "exp_avg", "signed", p),
                fmt.decode(state, "exp_avg_sq", "square", p),
                bc1,
                bc2,
                eps,
            )
            err = float((((dq - d) ** 2) * weight).sum())
            out[(level, name)] = min(err / total, 1.0)
    return out


class MomentMeter:
    """Adam's moments of each parameter over the calibration gradients, for
    :func:`quantization_errors` when no optimizer holds them (:func:`foam_compile.plan`).

    Keeps two float32 tensors per parameter (AdamW's state) until it is dropped.
    """

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self._m: dict[Hashable, Tensor] = {}
        self._v: dict[Hashable, Tensor] = {}
        self._steps: dict[Hashable, int] = {}

    @torch.no_grad()
    def update(self, key: Hashable, grad: Tensor) -> None:
        g = (grad.to_dense() if grad.is_sparse else grad).detach().float()
        if key not in self._m:
            self._m[key], self._v[key] = torch.zeros_like(g), torch.zeros_like(g)
        self._m[key].lerp_(g, 1 - self.beta1)
        self._v[key].mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        self._steps[key] = self._steps.get(key, 0) + 1

    def __contains__(self, key: Hashable) -> bool:
        return key in self._m

    def errors(self, key, levels, formats) -> dict[tuple[int, str], float] | None:
        """:func:`quantization_errors` of ``key``'s moments (``None`` if never fed)."""
        if key not in self._m:
            return None
        return quantization_errors(
            self._m[key],
            self._v[key],
            levels,
            formats,
            step=self._steps[key],
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
        )
